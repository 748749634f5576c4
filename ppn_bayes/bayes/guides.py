"""Variational guides over the unit-score latents.

Both guides come from ``pyro.infer.autoguide`` and are built on :class:`~ppn_bayes.bayes.prior.ScorePrior`
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

**Is the guide fitted?** (:func:`guide_summary`, :func:`guide_convergence`.) Every ``train.log_every``
steps the run logs a ``{"type": "guide"}`` record: the guide's marginal sds in the unconstrained space
(min / mean / max, and their geometric-mean ratio to the initial sds), ``scale_move``, the rms of
the log ratios of the sds to their initial values, the rms distance of its means from their initial
values, and ``kl``, a Monte-Carlo estimate of ``KL(q || p)`` between the
guide and the score prior (64 draws with the same random numbers at every record, so that changes
between records are changes of q, not Monte-Carlo noise): the part of the ELBO that is the score
posterior's own (the rest, the expected likelihood, is the training loss). A quantity has
*flattened* when its change over the last logging interval, per unit of the guide's learning rate
spent there, is at most ``tol`` (0.25) of its average rate since the start. Per unit of learning
rate, because Adam moves a parameter by about ``lr`` per step while the gradient keeps its sign: a
fit that is still travelling keeps its average rate, a converged one falls to the noise floor; and
a cosine schedule that merely stops the optimizer does not count as convergence. The scales are
judged by ``scale_move``, not by the mean log-sd: sds that move apart (some shrink where the data
inform, others grow toward the prior) cancel in a mean, whose net change is then near zero and makes
any residual jitter read as many times its "average rate" (measured on the demo: sds 0.009-0.40
from 0.05 with the mean log-sd ratio at 1.09, read as 171 %; the means, 9 %).

A run that exports the average of its last iterates (``train.guide_average_steps``,
:mod:`ppn_bayes.training.averaging`) is judged by its window instead: converged when the window's
iterates are stationary (split R-hat <= 1.1 for every marginal) and their average precise (MCSE at
most 0.1 posterior sds), :func:`ppn_bayes.bayes.diagnostics.window_stationarity`. At the constant
rate such a window needs, the flattening rates measure the optimizer's jitter, which never falls.

The guides run in float32 whatever autocast says (:func:`ppn_bayes.device.fp32`): the low-rank
guide's ``LowRankMultivariateNormal`` forms its capacitance matrix by a matmul that bf16 autocast
would run in bf16 and then calls ``cholesky``, which has no bf16 CUDA kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_median
from pyro.nn import PyroModule

from ppn_bayes.bayes.diagnostics import WINDOW_MCSE_TOL, WINDOW_RHAT_TOL
from ppn_bayes.bayes.prior import ScorePrior
from ppn_bayes.config import GuideConfig
from ppn_bayes.device import fp32
from ppn_bayes.errors import ConfigError


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


# ---------------------------------------------------------------------------------- is it fitted?

KL_DRAWS = 64


def _autoguide(guide: PyroModule) -> AutoNormal | AutoLowRankMultivariateNormal | None:
    """The autoguide inside a :class:`ScoreGuide`, the guide itself when it is one, else ``None``."""
    if isinstance(guide, (AutoNormal, AutoLowRankMultivariateNormal)):
        return guide
    return getattr(guide, "auto", None)


@torch.no_grad()
def guide_marginals(guide: PyroModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat means and marginal sds of the guide in the unconstrained space (empty for no latents), on
    the guide's device (a copy: no host transfer, so building a session never syncs). ``guide``: a
    :class:`ScoreGuide` or a bare autoguide of either kind."""
    auto = _autoguide(guide)
    if auto is None:
        return torch.zeros(0), torch.zeros(0)
    if isinstance(auto, AutoLowRankMultivariateNormal):
        # Pyro's q is N(loc, diag(scale) (W W^T + I) diag(scale)) (its get_posterior scales the factor W
        # by `scale`), so a marginal sd is scale * sqrt(1 + |W_i|^2), not sqrt(scale^2 + |W_i|^2)
        sd = auto.scale * (1.0 + auto.cov_factor.pow(2).sum(-1)).sqrt()
        return auto.loc.detach().float().clone(), sd.detach().float().clone()
    names = [n for n, _ in auto.prototype_trace.iter_stochastic_nodes()]
    locs = torch.cat([getattr(auto.locs, n).detach().reshape(-1) for n in names])
    scales = torch.cat([getattr(auto.scales, n).detach().reshape(-1) for n in names])
    return locs.float().clone(), scales.float().clone()


@torch.no_grad()
def set_marginal_sds(guide: PyroModule, sd: torch.Tensor) -> None:
    """Set the guide's marginal sds (unconstrained space, :func:`guide_marginals`' flat order) to ``sd``, in
    place (the parameter objects stay the ones the optimizer holds). A low-rank guide keeps its factor
    ``W`` and correlations: its ``scale`` becomes ``sd / sqrt(1 + |W_i|^2)``."""
    auto = _autoguide(guide)
    if auto is None:
        return
    to_unconstrained = torch.distributions.transform_to(auto.scale_constraint).inv
    sd = sd.to(dtype=torch.float32)
    dim = int(guide_marginals(guide)[1].numel())
    if sd.numel() != dim:
        raise ValueError(f"set_marginal_sds: {sd.numel()} sds for a guide with {dim} latent dimensions")
    if isinstance(auto, AutoLowRankMultivariateNormal):
        scale = sd.to(auto.cov_factor.device) / (1.0 + auto.cov_factor.detach().float().pow(2).sum(-1)).sqrt()
        auto.scale_unconstrained.copy_(to_unconstrained(scale))
        return
    start = 0
    for name, _ in auto.prototype_trace.iter_stochastic_nodes():
        param = getattr(auto.scales, f"{name}_unconstrained")
        n = param.numel()
        value = sd[start:start + n].reshape(param.shape).to(param.device, param.dtype)
        param.copy_(to_unconstrained(value))
        start += n


@torch.no_grad()
def kl_estimate(guide: PyroModule, prior: PyroModule, draws: int = KL_DRAWS, seed: int = 0) -> float:
    """``KL(q || p)`` of the score latents by ``draws`` guide samples with fixed random numbers
    (``seed``); the torch RNG of the caller is left as it was."""
    auto = getattr(guide, "auto", None)
    if auto is None:
        return 0.0
    total = 0.0
    with torch.random.fork_rng(devices=[]), pyro.poutine.block():
        torch.manual_seed(seed)
        for _ in range(draws):
            gtr = pyro.poutine.trace(auto).get_trace()
            mtr = pyro.poutine.trace(pyro.poutine.replay(prior, trace=gtr)).get_trace()
            total += float(gtr.log_prob_sum()) - float(mtr.log_prob_sum())
    return total / draws


def guide_summary(guide: PyroModule, prior: PyroModule, init: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """The ``guide`` record's numbers (see the module docstring); ``init`` = :func:`guide_marginals` at
    the start of the run."""
    loc, sd = guide_marginals(guide)
    if loc.numel() == 0:
        return {}
    loc0, sd0 = init
    log_ratio = (sd.clamp_min(1e-30) / sd0.clamp_min(1e-30)).log()
    return {"scale_min": float(sd.min()), "scale_mean": float(sd.mean()), "scale_max": float(sd.max()),
            "log_scale_mean": float(sd.clamp_min(1e-30).log().mean()),
            "scale_ratio": float(log_ratio.mean().exp()), "scale_move": float(log_ratio.pow(2).mean().sqrt()),
            "loc_move": float((loc - loc0).pow(2).mean().sqrt()),
            "kl": kl_estimate(guide, prior)}


CONVERGENCE_KEYS = ("kl", "scale_move", "loc_move")


def guide_convergence(records: Sequence[dict[str, Any]], tol: float = 0.25) -> dict[str, Any] | None:
    """Did the guide flatten? From a run's ``guide`` records (each with ``step``, ``lr_sum`` = the
    guide learning rate spent so far, and :func:`guide_summary`'s numbers). ``None`` when there are
    fewer than three records (nothing to judge)."""
    recs = sorted((r for r in records if r.get("type") == "guide" and "kl" in r), key=lambda r: r["step"])
    if len(recs) < 3:
        return None
    first, prev, last = recs[0], recs[-2], recs[-1]
    # runs written before scale_move was logged are judged on log_scale_mean, as they were then
    keys = CONVERGENCE_KEYS if all("scale_move" in r for r in (first, prev, last)) else ("kl", "log_scale_mean", "loc_move")
    lr_all = max(last["lr_sum"] - first["lr_sum"], 1e-30)
    lr_last = max(last["lr_sum"] - prev["lr_sum"], 1e-30)
    rates = {}
    for key in keys:
        total = abs(last[key] - first[key]) / lr_all
        recent = abs(last[key] - prev[key]) / lr_last
        rates[key] = recent / total if total > 0 else 0.0
    worst = max(rates, key=rates.get)
    out = {"flattened": rates[worst] <= tol, "tol": tol, "relative_rate": rates, "worst": worst,
           "steps": [first["step"], prev["step"], last["step"]], "scale_ratio": last["scale_ratio"],
           "loc_move": last["loc_move"], "kl": last["kl"], "kl_first": first["kl"]}
    avg = [r for r in records if r.get("type") == "guide_average" and "window_rhat" in r]
    if not avg:
        return out | {"converged": out["flattened"]}
    window = {k.removeprefix("window_"): v for k, v in max(avg, key=lambda r: r["step"]).items() if k.startswith("window_")}
    window |= {"steps": int(window["iterates"]), "rhat_tol": WINDOW_RHAT_TOL, "mcse_tol": WINDOW_MCSE_TOL,
               "stationary": window["rhat"] <= WINDOW_RHAT_TOL, "precise": window["mcse_rel"] <= WINDOW_MCSE_TOL}
    return out | {"window": window, "converged": window["stationary"] and window["precise"]}


def convergence_warning(conv: dict[str, Any] | None) -> str | None:
    """The one-line warning ``ppn keepset`` and ``ppn report`` print, or ``None`` when all is well."""
    if conv is None or conv["converged"]:
        return None
    return "warning: " + not_converged_text(conv)


def not_converged_text(conv: dict[str, Any]) -> str:
    """What has not converged and how far, for a ``guide_convergence`` result that did not converge: the
    averaging window's check where the run exported a window average, else the flattening rates."""
    win = conv.get("window")
    if win is not None and not win["stationary"]:
        return (f"the score posterior has not converged (its averaging window drifts: split R-hat up to "
                f"{win['rhat']:.2f} over the last {win['steps']} iterates, above {win['rhat_tol']} for "
                f"{win['rhat_over']:.0%} of the guide's marginals; a mean moved up to {win['drift']:.2f} posterior "
                "sds between the window's halves), so its width is mostly the fit's travel, not evidence: train "
                "longer, e.g. a longer guide-only phase (train.guide_steps)")
    if win is not None:
        return (f"the score posterior's averaging window is stationary (split R-hat <= {win['rhat_tol']}) but its "
                f"average is imprecise (Monte-Carlo error up to {win['mcse_rel']:.2f} posterior sds, "
                f"{win['ess_min']:.0f} effective iterates at the fewest), so its uncertainty is not yet evidence: "
                "average more iterates (train.guide_steps and train.guide_average_steps)")
    w = conv["worst"]
    label = {"kl": "its KL to the prior", "scale_move": "its scales", "log_scale_mean": "its scales",
             "loc_move": "its means"}[w]
    a, b = conv["steps"][1], conv["steps"][2]
    return (f"the score posterior has not converged ({label} still moved at "
            f"{conv['relative_rate'][w]:.0%} of its average rate between steps {a} and {b}; scales "
            f"{conv['scale_ratio']:.2f}x their init), so its uncertainty is not yet evidence: train longer, "
            "e.g. a longer guide-only phase (train.guide_steps)")
