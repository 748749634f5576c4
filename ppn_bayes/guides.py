"""Variational guides over the unit-score latents.

Both guides come from ``pyro.infer.autoguide`` and are built on :class:`~ppn_bayes.prior.ScorePrior`
alone (the only part of the model with latent sites), wrapped so that they accept and ignore the
model's arguments. Building them on the prior rather than on the whole model means the guide can be
set up, saved and re-loaded (kilobytes) without the language model: the posterior-to-mask step
reads only these parameters.

* ``mean_field``: :class:`~pyro.infer.autoguide.AutoNormal`, ``q(z) = prod_i N(z_i | mu_i, s_i)`` in the
  unconstrained space (positive scales through ``exp``), the default.
* ``low_rank``: :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`,
  ``q(z) = N(mu, W W^T + D)`` with ``W`` of rank ``r``: captures the coupling between an offset and its
  local scale that mean-field misses (PYRO-NOTES.md), at ``O(r * #latents)`` parameters.

The paper preset has no latent offsets (``prior.kind: none``); its guide is :class:`EmptyGuide`.

The guides run in float32 whatever autocast says (:func:`ppn_bayes.device.fp32`): the low-rank
guide's ``LowRankMultivariateNormal`` forms its capacitance matrix by a matmul that bf16 autocast
would run in bf16 and then calls ``cholesky``, which has no bf16 CUDA kernel.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_median
from pyro.nn import PyroModule

from ppn_bayes.config import GuideConfig
from ppn_bayes.device import fp32
from ppn_bayes.errors import ConfigError
from ppn_bayes.prior import ScorePrior


class ScoreGuide(PyroModule):
    """An autoguide over :class:`ScorePrior`'s latents that ignores the full model's arguments."""

    def __init__(self, prior: ScorePrior, config: GuideConfig):
        super().__init__()
        self.kind = config.kind
        if config.kind == "mean_field":
            self.auto = AutoNormal(prior, init_loc_fn=init_to_median, init_scale=config.init_scale)
        elif config.kind == "low_rank":
            self.auto = AutoLowRankMultivariateNormal(prior, rank=config.rank, init_loc_fn=init_to_median,
                                                      init_scale=config.init_scale)
        else:  # pragma: no cover - config validation catches this
            raise ConfigError(f"guide.kind: unknown guide {config.kind!r}; use mean_field or low_rank")
        self.auto()  # create the parameters now (lazy creation breaks DDP and checkpoint loading)

    @fp32
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.auto()

    @fp32
    def median(self) -> dict[str, torch.Tensor]:
        return self.auto.median()


class EmptyGuide(PyroModule):
    """The guide of a model without latent sites (the paper preset): it samples nothing."""

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {}

    def median(self) -> dict[str, torch.Tensor]:
        return {}


def make_guide(prior: ScorePrior, config: GuideConfig) -> PyroModule:
    """The guide for ``prior`` (with its parameters already created)."""
    if not prior.latent_names():
        return EmptyGuide()
    with torch.no_grad(), pyro.poutine.block():
        return ScoreGuide(prior, config)


def guide_state(guide: PyroModule) -> dict[str, torch.Tensor]:
    """The guide's parameters as a flat tensor dict (what ``guide.safetensors`` holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in guide.state_dict().items()}
