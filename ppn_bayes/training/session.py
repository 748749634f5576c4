"""What is trained, and the live objects of one training process.

:class:`Objective` holds everything that is trained in one module (what DDP wraps; FSDP shards its
base model); its forward pass gives the ELBO terms (:func:`elbo_terms`) and the per-token loss.
:class:`Session` is one process's model, guide, adapters, data and optimizer, built by
:func:`ppn_bayes.training.build.build`. Both live here, apart from the loop, so that the loop's helpers
(checkpoints, data parallel, held-out evaluation) can name them without importing the loop.

* **Per-token objective.** The loss is ``-ELBO / N_tokens`` (``N_tokens`` = the training set's predicted
  tokens). It has the same gradients' *direction* as ``-ELBO`` but an O(1) scale, so learning rates and
  gradient clipping mean the same thing for a 100k-token demo and a 5B-token run.
* **The ELBO is computed term by term** (:func:`elbo_terms`, the same sums that ``Trace_ELBO`` forms for
  reparameterized sites; a test checks they agree): the ``tokens`` factor (likelihood), the ``compute``
  factor (the push's price) and ``kl`` (``log q - log p`` of the score latents).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from ppn_bayes.config import Recipe
from ppn_bayes.device import full_precision

GROUPS = ("guide", "push", "weights", "weights_nodecay")


def elbo_terms(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    """One-particle ELBO split into its terms: ``tokens``, ``compute``, ``kl`` and ``elbo``.

    Same construction as ``Trace_ELBO`` for reparameterized guides: trace the guide, replay the model
    against it, and sum the (plate-scaled) log densities. ``kl`` is the single-sample estimate
    ``log q(z) - log p(z)`` of the score latents (``elbo = tokens + compute - kl``).
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    zero = torch.zeros((), device=args[0].device if args and torch.is_tensor(args[0]) else None)  # the data's device
    tokens, compute, logp, logq = zero, zero, zero, zero
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name == "tokens":
            tokens = tokens + site["log_prob_sum"]
        elif name == "compute":
            compute = compute + site["log_prob_sum"]
        else:  # latent sites (and deterministic ones, whose log density is masked to 0)
            logp = logp + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            logq = logq + site["log_prob_sum"]
    kl = logq - logp
    return {"tokens": tokens, "compute": compute, "kl": kl, "elbo": tokens + compute - kl}


class Objective(nn.Module):
    """Everything that is trained, in one module (what DDP wraps; FSDP shards its base model);
    ``forward`` gives the ELBO terms and ``loss = -ELBO / N_tokens``."""

    def __init__(self, model: nn.Module, guide: nn.Module, lora: nn.Module | None = None):
        super().__init__()
        self.model, self.guide, self.lora = model, guide, lora

    def forward(self, input_ids: torch.Tensor, subsample: torch.Tensor, **fixed: Any) -> dict[str, torch.Tensor]:
        # float32 throughout (guide samples and log densities, the push, the ELBO's sums); the model
        # turns autocast on around the LM's forward pass alone (PPNModel.autocast_dtype). ``fixed``:
        # the sandwich's ``lam`` and ``teacher_logits`` for this pass (PPNModel.forward).
        with full_precision():
            terms = elbo_terms(self.model, self.guide, input_ids, subsample=subsample, **fixed)
        loss = -terms["elbo"] / self.model.num_tokens
        if not loss.requires_grad:
            # A dense step with nothing to learn from it (the paper preset has no latents, and frozen
            # weights): a zero gradient, but through the graph, so backward and DDP's reducer see the
            # same step as always (AdamW still moves by momentum, as for unused splines on dense steps).
            loss = loss + 0.0 * sum(p.sum() for p in self.model.push.parameters())
        terms["loss"] = loss
        return terms


@dataclass(kw_only=True)
class Session:
    """The live objects of one training process, built by :func:`build` from named parts (keywords only:
    seventeen positional fields would be a transposition waiting to happen)."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    base_path: Path
    gated: Any
    ppn: Any
    guide: nn.Module
    lora: Any
    objective: Objective
    wrapped: nn.Module
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    groups: dict[str, list[nn.Parameter]]
    named_weights: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    seconds: float = 0.0
    callbacks: list = field(default_factory=list)
    guide_init: tuple = ()  # guides.guide_marginals right after the guide was built (before any restore)
    average: dict | None = None  # the guide-average window's running sums (training/averaging.py), None = off
    settle: list | None = None  # the settle phase's keep-sets (training/settle.py), solved at its first step

    @property
    def main(self) -> bool:
        return self.rank == 0
