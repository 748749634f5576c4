"""Checks of the inference itself: arviz export, PSIS k-hat of the guide, and the NUTS gold standard.

This is the only module that imports arviz (0.x API), so moving to arviz 1.x (``arviz_base.from_dict``
nested by group, ``arviz_stats.summary``) is a one-file change.

* :func:`to_inference_data` turns joint posterior draws of every latent and score site into an
  ``InferenceData`` with named dims (``layer``, ``head``, ``group``); :func:`save_netcdf` writes it
  atomically; :func:`summary` is ``az.summary``.
* :func:`psis_khat`: Pareto-smoothed importance sampling diagnostic of a guide (Yao et al. 2018).
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
* :func:`nuts_check`: Pyro's NUTS on the layer-gate-only model (a handful of latents, frozen
  weights, a fixed calibration batch, fixed ``lam``), R-hat and ESS per site, and the comparison of
  the NUTS posterior of the layer scores with a mean-field SVI fit of the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS, Predictive, Trace_ELBO
from pyro.poutine.util import site_is_subsample
from scipy import stats

with warnings.catch_warnings():  # arviz 0.x announces its 1.x refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az
    from arviz import _log as _arviz_log


class _OneChainShapeFilter(logging.Filter):
    """Drop arviz's "Shape validation failed ... chains=2" warning: SVI draws are one chain by nature
    (R-hat is then undefined and the summary shows NaN, which says so); every other arviz message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Shape validation failed" not in record.getMessage()


_arviz_log.addFilter(_OneChainShapeFilter())

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.bayes.guides import make_guide
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
from ppn_bayes.errors import ConfigError
from ppn_bayes.files import atomic_write_with

SITE_DIMS: dict[str, tuple[str, ...]] = {
    "tau0": (), "caux": (), "global_scale": (),
    "e_layers": ("layer",), "lam_layers": ("layer",), "sig_heads": ("layer",), "sig_groups": ("layer",),
    "e_heads": ("layer", "head"), "e_groups": ("layer", "group"),
    "score_layers": ("layer",), "score_heads": ("layer", "head"), "score_groups": ("layer", "group"),
}
KHAT_GOOD, KHAT_BAD = 0.5, 0.7


# ------------------------------------------------------------------ arviz export
def _coords(inventory: UnitInventory) -> dict[str, list[int]]:
    return {"layer": list(range(inventory.num_layers)), "head": list(range(inventory.num_heads)),
            "group": list(range(inventory.num_groups))}


def _dim_sizes(inventory: UnitInventory) -> dict[str, int]:
    return {k: len(v) for k, v in _coords(inventory).items()}


def samples_to_inference_data(samples: dict[str, Any], inventory: UnitInventory, chains: int,
                              sample_stats: dict[str, Any] | None = None) -> az.InferenceData:
    """Draws ``{site: [chains * draws, ...] or [chains, draws, ...]}`` -> ``InferenceData`` with dims.

    Sites not in :data:`SITE_DIMS` are skipped; a site's trailing shape is taken from the inventory,
    so Predictive's extra singleton dims (``[K, 1]`` for scalars) reshape away.
    """
    sizes = _dim_sizes(inventory)
    posterior, dims = {}, {}
    for name, value in samples.items():
        if name not in SITE_DIMS:
            continue
        arr = torch.as_tensor(value).detach().double().cpu().numpy()
        shape = tuple(sizes[d] for d in SITE_DIMS[name])
        posterior[name] = arr.reshape(chains, -1, *shape)
        dims[name] = list(SITE_DIMS[name])
    used = {d for ds in dims.values() for d in ds}
    coords = {k: v for k, v in _coords(inventory).items() if k in used}
    return az.from_dict(posterior=posterior, coords=coords, dims=dims, sample_stats=sample_stats)


def to_inference_data(posterior, num_draws: int = 1000, seed: int = 0, chains: int = 1) -> az.InferenceData:
    """Joint draws from a :class:`~ppn_bayes.bayes.posterior.Posterior` (``chains * num_draws`` in all) as arviz data.

    Variables: every latent site (``e_layers``, ``tau0``, ``lam_layers``, ``caux`` or ``global_scale``,
    ``sig_*``, ``e_*``) and the scores ``score_layers`` ``[layer]``, ``score_heads`` ``[layer, head]``,
    ``score_groups`` ``[layer, group]``. SVI draws are independent, so ``chains > 1`` just splits
    them (R-hat is then a check of the draw code, not of convergence).
    """
    if num_draws < 1 or chains < 1:
        raise ConfigError(f"num_draws and chains must be >= 1, got {num_draws} and {chains}")
    draws = posterior.draws(num_draws * chains, seed=seed)
    named = {(f"score_{k}" if k in ("layers", "heads", "groups") else k): v for k, v in draws.items()}
    return samples_to_inference_data(named, posterior.inventory, chains)


def save_netcdf(idata: az.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` to NetCDF (h5netcdf engine) through a temporary file and an atomic rename."""
    return atomic_write_with(Path(path), lambda tmp: idata.to_netcdf(tmp, engine="h5netcdf"), suffix=".nc")


def load_netcdf(path: str | Path) -> az.InferenceData:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; write it with save_netcdf (or `ppn report RUN`)")
    return az.from_netcdf(str(path), engine="h5netcdf")


def summary(idata: az.InferenceData, var_names: list[str] | None = None):
    """``az.summary`` (mean, sd, HDI, MCSE, ESS, R-hat) as a pandas DataFrame."""
    with warnings.catch_warnings():  # one-chain R-hat warns; the table shows NaN, which is the truth
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=var_names)


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


# ------------------------------------------------------------------ NUTS vs SVI
@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Weights without gradients for the block (NUTS and the check's SVI move only the latents)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gate_only_model(gated: GatedLM | PPNModel, batch_size: int, prior: PriorConfig | None = None,
                    tokens_per_sequence: int = 2, tempering: float = 1.0) -> PPNModel:
    """The layer-gate-only PPN model for the NUTS check (``mask: expected``, no amplitudes).

    A :class:`PPNModel` is used as it is (its trained thresholds and levels included); a
    :class:`GatedLM` gets a fresh model with ``num_sequences = batch_size`` (no up-scaling of the
    calibration batch: the posterior is that of the batch itself).
    """
    if isinstance(gated, PPNModel):
        model = gated
    else:
        model = PPNModel(gated, prior or PriorConfig(kind="normal"), PushConfig(mask="expected", amplitude=False),
                         num_sequences=batch_size, tokens_per_sequence=tokens_per_sequence, tempering=tempering)
    if tuple(model.inventory.kinds) != ("layers",):
        raise ConfigError(f"the NUTS check gates layers only, this model gates {list(model.inventory.kinds)}; "
                          "wrap the model with gate(model, kinds=('layers',))")
    if model.prior.config.kind == "none":
        raise ConfigError("prior kind 'none' has no latent scores to check; use prior kind 'normal' or 'horseshoe'")
    return model


def run_nuts(model: PPNModel, args: tuple, kwargs: dict, num_warmup: int, num_samples: int, chains: int,
             seed: int, max_tree_depth: int = 6) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``chains`` sequential NUTS chains (separate seeds; a torch LM does not fork well), stacked
    ``[chains, num_samples, ...]``, and the divergence count per chain."""
    per_chain, divergences = [], []
    for c in range(chains):
        pyro.set_rng_seed(seed + 1000 * c)
        kernel = NUTS(model, max_tree_depth=max_tree_depth, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        per_chain.append(mcmc.get_samples())
        divergences.append(len(mcmc.diagnostics()["divergences"]["chain 0"]))
    samples = {k: torch.stack([s[k] for s in per_chain]) for k in per_chain[0]}
    return samples, {"divergences": divergences}


def fit_svi(model: PPNModel, args: tuple, kwargs: dict, steps: int, lr: float, seed: int,
            guide_cfg: GuideConfig | None = None, num_particles: int = 2, lr_push: float | None = None,
            hide: tuple[str, ...] = ()):
    """Mean-field SVI of the guide (weights frozen; the push too unless ``lr_push`` is given, then its
    splines and, where trained, score levels are learned jointly, as in training); lr decays linearly
    to lr/10 so the final parameters sit near the optimum rather than wherever the last noisy step
    left them. ``hide``: model sites left out of the objective (``poutine.block``), e.g. ``("compute",)``
    to fit the posterior of the scores' own prior without the price factor (simulation-based
    calibration draws its truths from that prior)."""
    pyro.set_rng_seed(seed)
    guide = make_guide(model.prior, guide_cfg or GuideConfig())
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
    target = pyro.poutine.block(model, hide=list(hide)) if hide else model
    loss_fn = (lambda *a, **k: elbo.differentiable_loss(target, guide, *a, **k)) if hide else elbo(model, guide)
    groups = [{"params": list(guide.parameters()), "lr": lr}]
    if lr_push is not None:
        push = [p for n, p in model.named_parameters() if not n.startswith("gated.") and p.requires_grad]
        groups.append({"params": push, "lr": lr_push})
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(*args, **kwargs)
        loss.backward()
        opt.step()
        sched.step()
    return guide


def layer_score_draws(model: PPNModel, samples: dict[str, torch.Tensor] | None = None, guide=None,
                 num_samples: int = 1000) -> torch.Tensor:
    """Layer scores ``[S, L]`` for given latent draws (NUTS) or drawn from a guide (SVI)."""
    with torch.no_grad():
        if samples is not None:
            pred = Predictive(model.prior, posterior_samples=samples, return_sites=["score_layers"])
        else:
            pred = Predictive(model.prior, guide=guide, num_samples=num_samples, return_sites=["score_layers"])
        return pred()["score_layers"].reshape(-1, model.inventory.num_layers)


def compare_scores(nuts: torch.Tensor, svi: torch.Tensor) -> dict[str, Any]:
    """Means, sds and their agreement: Spearman and Kendall rank correlation of the means, the largest
    absolute gap, and the largest gap in units of the NUTS sd."""
    mn, sn = nuts.mean(0).double(), nuts.std(0).double()
    ms, ss = svi.mean(0).double(), svi.std(0).double()
    gap = (ms - mn).abs()
    return {
        "nuts_mean": mn.tolist(), "nuts_sd": sn.tolist(), "svi_mean": ms.tolist(), "svi_sd": ss.tolist(),
        "spearman": float(stats.spearmanr(mn.numpy(), ms.numpy()).statistic),
        "kendall": float(stats.kendalltau(mn.numpy(), ms.numpy()).statistic),
        "max_abs_diff": float(gap.max()),
        "max_diff_in_nuts_sd": float((gap / sn.clamp_min(1e-12)).max()),
        "sd_ratio": (ss / sn.clamp_min(1e-12)).tolist(),
    }


def convergence(idata: az.InferenceData) -> dict[str, dict[str, float]]:
    """Worst rank-normalized split R-hat and smallest bulk ESS per variable (Vehtari et al. 2021).

    With a single chain, its two halves are treated as two chains (split-R-hat); arviz then splits
    each again, which only makes the check stricter.
    """
    post = idata.posterior
    if post.sizes["chain"] == 1:
        half = post.sizes["draw"] // 2
        first = post.isel(chain=[0], draw=slice(0, half))
        second = post.isel(chain=[0], draw=slice(half, 2 * half)).assign_coords(draw=first.draw, chain=[1])
        rhat = az.rhat(xr.concat([first, second], dim="chain"))
    else:
        rhat = az.rhat(post)
    ess = az.ess(post, method="bulk")
    return {name: {"rhat": float(rhat[name].max()), "ess_bulk": float(ess[name].min())} for name in post.data_vars}


def nuts_check(gated: GatedLM | PPNModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, lam: float = 1.0, prior: PriorConfig | None = None, tempering: float = 1.0,
               num_warmup: int = 200, num_samples: int = 200, chains: int = 2, svi_steps: int = 600,
               svi_lr: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """NUTS on the layer-gate-only model vs mean-field SVI of the same model, on one fixed batch.

    Returns ``sites``: R-hat and bulk ESS per site (worst element, :func:`convergence`; two chains
    by default, run one after the other), the divergences per chain, the NUTS and SVI means and
    sds of the layer scores and their agreement (:func:`compare_scores`), and ``idata`` (the NUTS
    draws as arviz data, latents and scores).
    """
    if chains < 1 or num_samples < 4:
        raise ConfigError("nuts_check needs chains >= 1 and num_samples >= 4")
    model = gate_only_model(gated, input_ids.shape[0], prior, input_ids.shape[1], tempering)
    args, kwargs = (input_ids,), {"attention_mask": attention_mask, "lam": float(lam)}
    with frozen(model.gated), deterministic_push(model):
        samples, stats_ = run_nuts(model, args, kwargs, num_warmup, num_samples, chains, seed)
        nuts_scores = layer_score_draws(model, {k: v.flatten(0, 1) for k, v in samples.items()})
        guide = fit_svi(model, args, kwargs, svi_steps, svi_lr, seed)
        svi_scores = layer_score_draws(model, guide=guide, num_samples=2000)
    idata = samples_to_inference_data({**samples, "score_layers": nuts_scores}, model.inventory, chains)
    per_site = convergence(idata)
    return {"sites": per_site, "divergences": stats_["divergences"], "chains": chains,
            "num_warmup": num_warmup, "num_samples": num_samples, "lam": float(lam),
            "scores": compare_scores(nuts_scores, svi_scores), "idata": idata, "guide": guide}
