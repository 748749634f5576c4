"""PSIS k-hat: how far the guide is from the posterior (Pareto-smoothed importance sampling).

:func:`psis_khat`: Pareto-smoothed importance sampling diagnostic of a guide (Yao et al. 2018).
With ``a ~ q`` and log weights ``log w = log p(a, data) - log q(a)``, the generalized-Pareto shape
``k`` of the upper tail of ``w`` says how far ``q`` is from the posterior: ``k < 0.5`` good,
``0.5 <= k <= 0.7`` questionable, ``k > 0.7`` bad (importance weights with infinite variance).
It needs a log density that is a deterministic function of the latents: a fixed price ``lam``
and the push's ``expected`` masks (applied here for the duration of the call), frozen weights, a
fixed (held-out) batch. :func:`psis_khat_fitted` is the diagnostic of a training run's own
approximation instead: against the density SVI actually fits, price and masks integrated out
inside the log with the same numbers for every particle (a deterministic quadrature of the price,
fixed mask draws reweighted to each particle's law), on the training batch at the training
scaling, summed in float64. Random draws of the price per particle, even with shared seeds, leave
an estimation error that varies with the scores by more nats than q's own misfit (measured: sd
9.6 nats across particles against the log weights' own 6.1), so the diagnostic then reads "bad"
for any guide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ppn_bayes.bayes.diagnostics import az  # the one module that imports arviz (0.x; see there)
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.config import PushConfig
from ppn_bayes.errors import ConfigError

KHAT_GOOD, KHAT_BAD = 0.5, 0.7


# ------------------------------------------------------------------ PSIS
def khat_reading(k: float) -> str:
    """Yao et al. (2018)'s reading of the Pareto shape of the importance weights."""
    if k < KHAT_GOOD:
        return "good"
    if k <= KHAT_BAD:
        return "questionable"
    return "bad"


@contextlib.contextmanager
def deterministic_push(model: Any) -> Iterator[None]:
    """Within the block a :class:`PPNModel` uses ``mask: expected`` (rho itself, no Bernoulli noise),
    so its log density is a deterministic function of the latents given ``lam``. Other models pass."""
    push = getattr(model, "push", None)
    if push is None or not isinstance(getattr(push, "config", None), PushConfig):
        yield
        return
    saved = push.config
    push.config = dataclasses.replace(saved, mask="expected")
    try:
        yield
    finally:
        push.config = saved


def log_importance_weights(model, guide, *args, num_particles: int = 500, seed: int = 0,
                           **kwargs) -> torch.Tensor:
    """``log p(a, data) - log q(a)`` for ``num_particles`` draws ``a ~ q`` (one model run per draw).

    Sequential rather than Pyro's vectorized ``psis_diagnostic`` because the language model is not
    vectorized over particles; the result is the same quantity.
    """
    if isinstance(model, PPNModel) and kwargs.get("lam") is None:
        raise ConfigError("psis_khat needs a fixed price: pass lam=... (e.g. lam=1.0), not a random draw")
    pyro.set_rng_seed(seed)
    out = torch.empty(num_particles, dtype=torch.float64)
    with torch.no_grad(), deterministic_push(model):
        for i in range(num_particles):
            gtr = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
            mtr = pyro.poutine.trace(pyro.poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
            if i == 0:
                _check_guide_covers(mtr, gtr)
            out[i] = float(mtr.log_prob_sum()) - float(gtr.log_prob_sum())
    return out


def _check_guide_covers(model_trace, guide_trace) -> None:
    missing = [n for n, s in model_trace.nodes.items()
               if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
               and n not in guide_trace.nodes]
    if missing:
        raise ConfigError(f"the guide does not sample {missing}; pass the guide built for this model")


def psis_khat(model, guide, *args, num_particles: int = 500, seed: int = 0, **kwargs) -> dict[str, Any]:
    """PSIS diagnostic of ``guide`` for ``model(*args, **kwargs)``.

    For the PPN model pass the held-out batch and a fixed price: ``psis_khat(m, guide, ids, lam=1.0)``.
    Returns ``khat``, its ``reading`` (good / questionable / bad), the relative importance-sampling
    ESS of the smoothed weights (``1 / (n sum w_i^2)``, 1 = perfect), the ELBO estimate ``mean(log w)``
    and the log-evidence estimate ``log mean w``.

    If the log weights are constant to 1e-3 (the guide *is* the posterior up to rounding), every
    weight lies within a factor ``e^0.001`` of the others: the weights are bounded, the Pareto fit is
    degenerate (arviz returns inf), and ``khat`` is reported as ``-inf`` (good).
    """
    lw = log_importance_weights(model, guide, *args, num_particles=num_particles, seed=seed, **kwargs)
    return khat_of(lw)


def khat_of(lw: torch.Tensor) -> dict[str, Any]:
    """:func:`psis_khat`'s numbers from given log importance weights ``[n]``."""
    if not torch.isfinite(lw).all():
        raise ConfigError("some log importance weights are not finite; check the model/guide pair and the batch")
    lw_np = lw.double().numpy()
    if float(lw.max() - lw.min()) < 1e-3:
        k, smoothed = float("-inf"), lw_np
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smoothed, k = az.psislw(lw_np.copy())
        k = float(k)
    w = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    return {
        "khat": k,
        "reading": khat_reading(k),
        "num_particles": int(lw.numel()),
        "ess_fraction": float(1.0 / (lw_np.size * np.sum(w**2))),
        "elbo": float(lw.mean()),
        "log_evidence": float(torch.logsumexp(lw.double(), 0) - math.log(lw.numel())),
    }


def price_quadrature(config: PushConfig, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic quadrature of the price law: ``lambda = 0`` with weight ``p_dense`` and the
    ``nodes``-point Gauss-Laguerre rule for ``Exp(rate)`` (``int_0^inf e^-x f(x / rate) dx``) with
    weight ``1 - p_dense``, less its far nodes of relative weight < 1e-12. Returns ``(lambdas,
    weights)`` in float64, the weights summing to 1."""
    if nodes < 1:
        raise ConfigError(f"price_nodes must be >= 1, got {nodes}")
    x, w = np.polynomial.laguerre.laggauss(nodes)
    keep = w > 1e-12 * w.max()  # the far nodes weigh < 1e-12 of a nat per nat: they only cost model runs
    x, w = x[keep], w[keep]
    lams = torch.tensor(np.concatenate([[0.0], x / config.rate]), dtype=torch.float64)
    weights = torch.tensor(np.concatenate([[config.p_dense], (1.0 - config.p_dense) * w]), dtype=torch.float64)
    return lams, weights / weights.sum()


def _sums64(trace) -> dict[str, float]:
    """Plate-scaled log densities of a trace's sample sites, summed in float64: ``tokens``,
    ``compute`` and ``latent`` (everything else; deterministic sites are masked to 0). At production
    scaling the token factor is ~1e5-1e7 nats, where a float32 sum rounds by 0.01-1 nat: more than
    the differences between particles that PSIS reads."""
    out = {"tokens": 0.0, "compute": 0.0, "latent": 0.0}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"]).double()
        if site["mask"] is not None:
            lp = lp * torch.as_tensor(site["mask"], dtype=torch.float64)
        lp = lp * float(site["scale"])
        out[name if name in ("tokens", "compute") else "latent"] += float(lp.sum())
    return out


@contextlib.contextmanager
def _fixed_masks(push: Any, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block ``push.sample_masks`` returns the given hard (own) masks."""
    push.sample_masks = lambda rho, generator=None: masks
    try:
        yield
    finally:
        del push.sample_masks


def _bernoulli_log_prob(masks: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for k, m in masks.items():
        p = own[k].double().clamp(1e-12, 1 - 1e-12)
        total = total + (m.double() * p.log() + (1 - m.double()) * (-p).log1p()).sum()
    return float(total)


def fitted_log_weights(model: PPNModel, guide, input_ids: torch.Tensor, subsample: torch.Tensor | None = None, *,
                       num_particles: int = 200, price_nodes: int = 16, mask_draws: int = 16,
                       seed: int = 0) -> torch.Tensor:
    """``log ptilde(a) - log q(a)`` (float64) for ``num_particles`` draws ``a ~ q``, ``ptilde`` the
    density SVI fits.

    Training maximizes ``E_q[ E_{lambda, m} log p(D, compute | a, lambda, m) ] - KL(q || p)``, i.e. it
    minimizes ``KL(q || ptilde)`` with ``ptilde(a) ∝ p(a) exp(E_{lambda, m}[tokens + compute])``: the
    price and the masks are noise integrated out *inside* the log (a Gibbs posterior, not a mixture).
    The plate's scaling is the model's (production: ``num_sequences`` >> batch), the batch is the
    one given (the training batch). Both log densities are of the constrained latents: the model's
    at the value, the autoguide's as its unconstrained Normal plus ``log |d u / d a|`` (its Delta
    site), so positive scales (HalfCauchy, HalfNormal, InverseGamma) carry their Jacobian on both
    sides alike.

    The inner expectation must be the *same smooth function* of ``a`` for every particle, else its
    estimation error, which varies with ``a`` by many nats at production scaling, reads as a poor
    guide. So (common random numbers taken to their limit):

    * the price by deterministic quadrature (:func:`price_quadrature`: ``lambda = 0`` plus a
      ``price_nodes``-point Gauss-Laguerre rule), not by random draws;
    * with ``mask: expected`` the likelihood is then exact (the gates are ``rho`` itself);
    * with ``mask: sample`` the hard masks are ``mask_draws`` fixed draws per price node from a
      *reference* law, the inclusion probabilities at the guide's median, self-normalized-reweighted
      to each particle's own Bernoulli law: ``E_{m ~ rho(a)} f(m) ~ sum_r w_r f(m_r) / sum_r w_r``,
      ``w_r = p(m_r | rho(a)) / p(m_r | rho_ref)``, which is smooth in ``a``. (Drawing the masks
      afresh per particle, even with shared seeds, makes the estimate a step function of ``a``.)
    """
    lams, lam_w = price_quadrature(model.push.config, price_nodes)
    sampled = model.push.config.mask == "sample"
    refs: list[list[dict[str, torch.Tensor]]] = []
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    with torch.no_grad():
        if sampled:
            scores0 = guide_median_scores(model, guide)
            for lam in lams.tolist():
                own0 = model.push.unnest(model.push.inclusion(scores0, lam)) if lam > 0 else {}
                refs.append([{k: (torch.rand(v.shape, generator=gen, dtype=torch.float64) < v.double().cpu())
                              .to(v.dtype).to(v.device) for k, v in own0.items()} for _ in range(mask_draws)])
    out = torch.empty(num_particles, dtype=torch.float64)
    dense: float | None = None
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        for i in range(num_particles):
            gtr = pyro.poutine.trace(guide).get_trace(input_ids, subsample=subsample)
            logq = _sums64(gtr)["latent"]
            replayed = pyro.poutine.replay(model, trace=gtr)
            lik, logp = 0.0, None
            for j, (lam, wj) in enumerate(zip(lams.tolist(), lam_w.tolist())):
                if lam == 0 and dense is not None:  # a dense step does not read the scores
                    lik += wj * dense
                    continue
                if not sampled or lam == 0:
                    mtr = pyro.poutine.trace(replayed).get_trace(input_ids, subsample=subsample, lam=lam)
                    t = _sums64(mtr)
                    f = t["tokens"] + t["compute"]
                else:
                    scores = pyro.poutine.replay(model.prior, trace=gtr)()
                    own = model.push.unnest(model.push.inclusion(scores, lam))
                    own0 = model.push.unnest(model.push.inclusion(scores0, lam))
                    vals, logw = [], []
                    for m in refs[j]:
                        with _fixed_masks(model.push, m):
                            mtr = pyro.poutine.trace(replayed).get_trace(input_ids, subsample=subsample, lam=lam)
                        t = _sums64(mtr)
                        vals.append(t["tokens"] + t["compute"])
                        logw.append(_bernoulli_log_prob(m, own) - _bernoulli_log_prob(m, own0))
                    w = torch.softmax(torch.tensor(logw, dtype=torch.float64), 0)
                    f = float((w * torch.tensor(vals, dtype=torch.float64)).sum())
                if i == 0 and j == 0:
                    _check_guide_covers(mtr, gtr)
                lik += wj * f
                logp = t["latent"]
                if lam == 0:
                    dense = f
            out[i] = logp + lik - logq
    return out


@torch.no_grad()
def guide_median_scores(model: PPNModel, guide) -> dict[str, torch.Tensor]:
    """The unit scores at the guide's median latents (the reference law of the sampled masks)."""
    med = guide.median()
    return pyro.poutine.condition(model.prior, data=med)()


def psis_khat_fitted(model: PPNModel, guide, input_ids: torch.Tensor, subsample: torch.Tensor | None = None, *,
                     num_particles: int = 200, price_nodes: int = 16, mask_draws: int = 16,
                     seed: int = 0) -> dict[str, Any]:
    """PSIS k-hat of ``guide`` against the density it was fitted to (:func:`fitted_log_weights`): the
    diagnostic of the training run's own approximation, on its training batch and scaling."""
    lw = fitted_log_weights(model, guide, input_ids, subsample, num_particles=num_particles,
                            price_nodes=price_nodes, mask_draws=mask_draws, seed=seed)
    return {**khat_of(lw), "price_nodes": int(price_nodes),
            "mask_draws": int(mask_draws) if model.push.config.mask == "sample" else 0}
