"""The Pyro model: hierarchical prior over unit scores + the push + the masked network's likelihood.

One generative story per training step::

    a            ~ ScorePrior                         latent unit scores (ppn_bayes.prior)
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
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.config import PriorConfig, PushConfig
from ppn_bayes.device import autocast_context
from ppn_bayes.prior import ScorePrior
from ppn_bayes.push import Push, draw_lambda


@dataclass
class StepInfo:
    """What one model execution saw, for progress bars and metrics: floats or 0-dim tensors (on the
    device, so that the step does not wait for it); :meth:`values` reads them."""

    token_loss: float | torch.Tensor = float("nan")
    lam: float = 0.0
    sampled_size: float | torch.Tensor = 1.0
    expected_size: float | torch.Tensor = 1.0

    def values(self) -> dict[str, float]:
        return {"token_loss": float(self.token_loss), "lam": float(self.lam),
                "sampled_size": float(self.sampled_size), "expected_size": float(self.expected_size)}


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL per sequence ``[B]`` and predicted-token counts ``[B]`` (pads excluded)."""
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    nll = nll.view(labels.shape)
    keep = torch.ones_like(nll) if attention_mask is None else attention_mask[:, 1:].to(nll.dtype)
    return (nll * keep).sum(-1), keep.sum(-1)


class PPNModel(PyroModule):
    """Prior + push + likelihood around a :class:`GatedLM`.

    Args:
        gated: the gated backbone (its weights become point estimates of this module).
        prior: prior configuration; push: push configuration.
        num_sequences: sequences in the training set (plate size); ``tokens_per_sequence`` sets N.
        norms: unit weight norms (defaults to ``gated.unit_norms()``), the score anchors.
        tempering: likelihood tempering factor beta.
        autocast_dtype: the LM's forward pass under autocast in this dtype (CUDA only; ``None``: off).
    """

    def __init__(self, gated: GatedLM, prior: PriorConfig, push: PushConfig, num_sequences: int,
                 tokens_per_sequence: int, norms: dict[str, torch.Tensor] | None = None, tempering: float = 1.0,
                 autocast_dtype: torch.dtype | None = None):
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

    def set_generator(self, generator: torch.Generator | None) -> None:
        """A dedicated RNG for lambda and mask draws (so resumed runs replay the same noise)."""
        self._generator = generator

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lam: float | None = None, subsample: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step of the generative story; returns the minibatch's summed token NLL.

        ``lam`` fixes the price (``None`` draws it as in training); ``subsample`` are the batch's
        indices into the training set (for the plate's scaling; defaults to ``arange(B)``).
        """
        scores = self.prior()
        if lam is None:
            lam = draw_lambda(self.push.config, self._generator)
        if lam > 0:
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
        nll, count = sequence_nll(logits, input_ids, attention_mask)
        with pyro.plate("seqs", size=self.num_sequences, subsample=idx):
            pyro.factor("tokens", -self.tempering * nll)
        self.last = StepInfo((nll.detach().sum() / count.sum()), float(lam), sampled, expected)
        return nll.sum()
