"""The Pyro model: hierarchical prior over unit scores + the push + the masked network's likelihood.

One generative story per training step::

    a            ~ ScorePrior                         latent unit scores (ppn_bayes.bayes.prior)
    lambda       ~ 0 w.p. p_dense, else Exp(rate)     auxiliary noise, like dropout
    rho          = push.inclusion(a, lambda)          nested inclusion probabilities
    m            = straight-through Bernoulli(rho)    auxiliary noise (not a sample site: see below)
    factor       -N * beta * lambda * rho_bar         compute prior log p(m | lambda) = -lambda cost(m)
    tokens | m   ~ the masked LM                      inside pyro.plate over sequences, scaled to N

Design choices (PYRO-NOTES.md, "Putting the push into a Pyro model"):

* Latent sites are only the small score tensors; the LM's weights, the splines, the amplitude
  scales (and, with per-layer curves only, the score levels) are point estimates (plain ``nn.Parameter``s of this ``PyroModule``),
  optimized by the same ELBO as the guide.
* ``lambda`` and the masks are drawn inside the model with the straight-through estimator rather
  than as discrete ``pyro.sample`` sites, so ``Trace_ELBO`` keeps reparameterized, low-variance
  gradients (a discrete site would fall back to score-function gradients).
* The likelihood is the token NLL of each sequence, summed over its tokens, as a ``pyro.factor``
  inside ``pyro.plate("seqs", size=num_sequences)``: the minibatch is scaled to the data set size.
  ``beta`` (tempering, recorded in the run) multiplies the likelihood and the compute factor alike,
  so the prior's weight relative to the data is ``1 / beta``.
* The compute factor is scaled by the data set's token count ``N`` for the same reason: the paper's
  per-token objective is ``mean NLL + lambda * rho_bar``; multiplying by ``N`` keeps the balance.
* Mixed precision covers the language model alone: with ``autocast_dtype`` set (bf16 on CUDA) only
  the masked LM's forward pass runs under autocast; the prior, the push, the token NLL's reductions
  and the factors stay float32 (see :mod:`ppn_bayes.device`).
* Nothing in a step waits for the device: :class:`StepInfo` keeps 0-dim tensors, read (one sync)
  when the step's record is logged.
* **In-place distillation** (``distill_weight`` w > 0; docs/method.md, "Distillation"). On a pruned
  step (lambda > 0) the ``tokens`` factor is ``-beta * loss_seq`` with
  ``loss_seq = w * KL(p_teacher || p_sub) + (1 - w) * NLL``, both summed over the sequence's predicted
  tokens (pads excluded): the loss of a generalized (Gibbs) posterior of the gates. The forward KL is
  the cross-entropy to the teacher's distribution minus its entropy, so ``-KL`` is the expected
  log-likelihood of tokens drawn from the teacher up to a constant in the gates: per token it is on
  the NLL's scale, and the plate scaling, ``beta`` and the compute factor's ``N`` keep their meaning.
  The teacher's logits carry no gradient (computed under ``torch.no_grad`` or given detached); a
  dense step trains on the data alone (its KL to a ``self`` teacher is 0 by definition), so with
  w = 0 or on dense steps nothing differs from the plain model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from ppn_bayes.backbone.gated import GATE_NAMES, GatedLM
from ppn_bayes.bayes.prior import ScorePrior
from ppn_bayes.bayes.push import Push, draw_lambda
from ppn_bayes.config import PriorConfig, PushConfig
from ppn_bayes.device import autocast_context


@dataclass
class StepInfo:
    """What one model execution saw, for progress bars and metrics: floats or 0-dim tensors (on the
    device, so that the step does not wait for it); :meth:`values` reads them."""

    token_loss: float | torch.Tensor = float("nan")
    lam: float = 0.0
    sampled_size: float | torch.Tensor = 1.0
    expected_size: float | torch.Tensor = 1.0
    distill_kl: float | torch.Tensor | None = None  # per-token KL to the teacher (distilled pruned steps)

    def values(self) -> dict[str, float]:
        out = {"token_loss": float(self.token_loss), "lam": float(self.lam),
               "sampled_size": float(self.sampled_size), "expected_size": float(self.expected_size)}
        if self.distill_kl is not None:
            out["distill_kl"] = float(self.distill_kl)
        return out


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL per sequence ``[B]`` and predicted-token counts ``[B]`` (pads excluded)."""
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    nll = nll.view(labels.shape)
    keep = torch.ones_like(nll) if attention_mask is None else attention_mask[:, 1:].to(nll.dtype)
    return (nll * keep).sum(-1), keep.sum(-1)


def sequence_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
    """Forward KL ``sum_v p_T (log p_T - log p_S)`` of the next-token distributions, summed over each
    sequence's predicted tokens ``[B]`` (the positions :func:`sequence_nll` counts; pads excluded).

    Forward (teacher first): mode-covering, the student must put mass wherever the teacher does; it is
    the cross-entropy to the teacher's soft labels minus the teacher's entropy (docs/method.md).
    """
    student = F.log_softmax(logits[:, :-1].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    keep = torch.ones_like(kl) if attention_mask is None else attention_mask[:, 1:].to(kl.dtype)
    return (kl * keep).sum(-1)


class PPNModel(PyroModule):
    """Prior + push + likelihood around a :class:`GatedLM`.

    Args:
        gated: the gated backbone (its weights become point estimates of this module).
        prior: prior configuration; push: push configuration.
        num_sequences: sequences in the training set (plate size); ``tokens_per_sequence`` sets N.
        norms: unit weight norms (defaults to ``gated.unit_norms()``), the score anchors.
        tempering: likelihood tempering factor beta.
        autocast_dtype: the LM's forward pass under autocast in this dtype (CUDA only; ``None``: off).
        distill_weight: w of the distilled loss on pruned steps (0: the data NLL alone).
        teacher: a function ``(input_ids, attention_mask) -> logits`` giving the teacher's logits
            (``None``: the gated network itself with every gate on, under ``torch.no_grad``).
    """

    def __init__(self, gated: GatedLM, prior: PriorConfig, push: PushConfig, num_sequences: int,
                 tokens_per_sequence: int, norms: dict[str, torch.Tensor] | None = None, tempering: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, distill_weight: float = 0.0,
                 teacher: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None):
        super().__init__()
        self.gated = gated
        self.inventory = gated.inventory
        norms = gated.unit_norms() if norms is None else norms
        self.norms = {k: v.detach() for k, v in norms.items()}  # where the weights are; .to() moves the rest
        self.prior = ScorePrior(self.inventory, self.norms, prior)
        self.push = Push(self.inventory, push)
        if self.push.shared:
            # one curve per kind already sets each kind's level: a trained c_kind would duplicate it
            self.prior.level.requires_grad_(False)
        if push.init == "size_curve":
            self.push.calibrate_thresholds(self.prior.initial_scores())
        self.num_sequences = int(num_sequences)
        self.num_tokens = float(num_sequences * (tokens_per_sequence - 1))
        self.tempering = float(tempering)
        self.autocast_dtype = autocast_dtype
        self.last = StepInfo()
        self._generator: torch.Generator | None = None
        if not 0.0 <= float(distill_weight) <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        self.distill_weight = float(distill_weight)
        self.teacher = teacher
        self.keep_dense_logits = False  # the sandwich: keep a dense pass's logits (detached) as the teacher's
        self.dense_logits: torch.Tensor | None = None

    def set_generator(self, generator: torch.Generator | None) -> None:
        """A dedicated RNG for lambda and mask draws (so resumed runs replay the same noise)."""
        self._generator = generator

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits, without gradient: ``teacher`` if given, else the gated network dense."""
        if self.teacher is not None:
            return self.teacher(input_ids, attention_mask).detach()
        with self.gated.gates(**dict.fromkeys(GATE_NAMES)), autocast_context(input_ids.device, self.autocast_dtype):
            return self.gated(input_ids=input_ids, attention_mask=attention_mask).logits.detach()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lam: float | None = None, subsample: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None,
                keep_masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run one step of the generative story; returns the minibatch's summed token loss.

        ``lam`` fixes the price (``None`` draws it as in training); ``subsample`` are the batch's
        indices into the training set (for the plate's scaling; defaults to ``arange(B)``).
        ``teacher_logits``: the teacher's logits for this batch (detached), when the caller has them
        already (the sandwich's dense pass); otherwise a distilled pruned step computes them.
        ``keep_masks``: the hard masks of a fixed keep-set, with ``lam`` its price (the settle phase,
        ``training/settle.py``): nothing is drawn and there is no compute term, the scores' sites are
        still sampled (the guide must match the model) but no gate depends on them.
        """
        scores = self.prior()
        if lam is None:
            lam = draw_lambda(self.push.config, self._generator)
        if keep_masks is not None:
            if not lam > 0:
                raise ValueError(f"keep_masks need the keep-set's price lambda* > 0, got lam={lam}")
            masks = keep_masks
            sampled = expected = self.push.expected_size(keep_masks).detach()
        elif lam > 0:
            rho = self.push.inclusion(scores, lam)
            masks = self.push.sample_masks(rho, self._generator)
            rho_bar = self.push.expected_size(rho)
            pyro.factor("compute", -self.num_tokens * self.tempering * lam * rho_bar)
            hard = self.push.nest({k: v.detach() for k, v in masks.items()})
            sampled = self.push.expected_size(hard).detach()
            expected = rho_bar.detach()
        else:
            masks, sampled, expected = None, 1.0, 1.0
        gates = self.push.gates(masks, lam)
        batch = input_ids.shape[0]
        idx = torch.arange(batch, device=input_ids.device) if subsample is None else subsample
        with self.gated.gates(**gates), autocast_context(input_ids.device, self.autocast_dtype):
            logits = self.gated(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.keep_dense_logits and lam == 0:
            self.dense_logits = logits.detach()
        nll, count = sequence_nll(logits, input_ids, attention_mask)
        loss, kl_tok = nll, None
        if self.distill_weight > 0 and lam > 0:
            if teacher_logits is None:
                teacher_logits = self.teacher_logits(input_ids, attention_mask)
            kl = sequence_kl(logits, teacher_logits.detach(), attention_mask)
            w = self.distill_weight
            loss = kl if w == 1.0 else w * kl + (1.0 - w) * nll
            kl_tok = kl.detach().sum() / count.sum()
        with pyro.plate("seqs", size=self.num_sequences, subsample=idx):
            pyro.factor("tokens", -self.tempering * loss)
        self.last = StepInfo((nll.detach().sum() / count.sum()), float(lam), sampled, expected, kl_tok)
        return loss.sum()
