"""Checks of the inference itself, arviz side: export of posterior draws and convergence.

This is the only module that imports arviz (0.x API), so moving to arviz 1.x (``arviz_base.from_dict``
nested by group, ``arviz_stats.summary``) is a one-file change.

* :func:`to_inference_data` turns joint posterior draws of every latent and score site into an
  ``InferenceData`` with named dims (``layer``, ``head``, ``group``); :func:`save_netcdf` writes it
  atomically; :func:`summary` is ``az.summary``; :func:`convergence` is the worst split R-hat and
  smallest bulk ESS per variable; :func:`window_stationarity` reads an averaging window's optimizer
  iterates as a chain (is it stationary, is its average precise?).

The guide's PSIS k-hat is in :mod:`~ppn_bayes.bayes.psis`, the NUTS gold standard in
:mod:`~ppn_bayes.bayes.nuts_check`; both use this module's arviz.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import xarray as xr

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

from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.errors import ConfigError
from ppn_bayes.files import atomic_write_with

SITE_DIMS: dict[str, tuple[str, ...]] = {
    "tau0": (), "caux": (), "global_scale": (),
    "e_layers": ("layer",), "lam_layers": ("layer",), "sig_heads": ("layer",), "sig_groups": ("layer",),
    "e_heads": ("layer", "head"), "e_groups": ("layer", "group"),
    "score_layers": ("layer",), "score_heads": ("layer", "head"), "score_groups": ("layer", "group"),
}


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


def _halves_as_chains(post: xr.Dataset) -> xr.Dataset:
    """One chain's first and last halves as two chains (split R-hat); an odd count leaves out the middle draw."""
    n = post.sizes["draw"]
    half = n // 2
    first = post.isel(chain=[0], draw=slice(0, half))
    second = post.isel(chain=[0], draw=slice(n - half, n)).assign_coords(draw=first.draw, chain=[1])
    return xr.concat([first, second], dim="chain")


def convergence(idata: az.InferenceData) -> dict[str, dict[str, float]]:
    """Worst rank-normalized split R-hat and smallest bulk ESS per variable (Vehtari et al. 2021).

    With a single chain, its two halves are treated as two chains (split-R-hat); arviz then splits
    each again, which only makes the check stricter.
    """
    post = idata.posterior
    rhat = az.rhat(_halves_as_chains(post) if post.sizes["chain"] == 1 else post)
    ess = az.ess(post, method="bulk")
    return {name: {"rhat": float(rhat[name].max()), "ess_bulk": float(ess[name].min())} for name in post.data_vars}


# ------------------------------------------------------------------ the averaging window's iterates
#: a window shorter than this has too few iterates per quarter for a split R-hat
WINDOW_MIN_ITERATES = 8
#: stationary: every marginal's split R-hat over the window at most this (the usual rule, Vehtari et al. 2021)
WINDOW_RHAT_TOL = 1.1
#: precise: the window average's Monte-Carlo error at most this fraction of the exported posterior sd
WINDOW_MCSE_TOL = 0.1


def window_stationarity(loc: torch.Tensor, log_sd: torch.Tensor, sd: torch.Tensor) -> dict[str, float] | None:
    """Is a window of optimizer iterates stationary, and is its average precise? (Dhaka et al. 2020).

    ``loc``, ``log_sd``: ``[N, D]``, the guide's marginal means and log-sds (unconstrained space) after
    each of the window's ``N`` steps; ``sd``: ``[D]``, the sds the run exports. ``None`` when
    ``N < WINDOW_MIN_ITERATES``.

    At a constant learning rate the iterates of a converged fit are a stationary, autocorrelated
    sequence around the optimum (Mandt et al. 2017), so the question for a run that exports their
    average is not whether they stopped moving, which they never do, but whether they stopped
    *drifting*. Dhaka, Catalina, Andersen, Magnusson, Huggins & Vehtari ("Robust, accurate stochastic
    optimization for variational inference", NeurIPS 2020) read it as MCMC output: the window's two
    halves are two chains, and arviz's rank-normalized split R-hat (Vehtari et al. 2021, which splits
    each again: four quarters compared) is 1 for a stationary sequence and grows with drift between
    the quarters. **Stationary**: every marginal's R-hat (means and log-sds) ``<= WINDOW_RHAT_TOL``.
    Then the average estimates the optimum with Monte-Carlo error ``MCSE = sd_t(mu) / sqrt(ESS)``
    (the iterates' autocorrelation counted by the effective sample size). **Precise**: that error is
    at most ``WINDOW_MCSE_TOL`` of the exported sd of every latent, i.e. the optimizer's leftover
    noise moves the exported mean by a tenth of the posterior's own width.

    Returns the worst R-hat (``rhat``, with ``rhat_loc`` and ``rhat_log_sd``), the share of marginals
    over the tolerance (``rhat_over``), the smallest bulk ESS of the means (``ess_min``) and the
    largest MCSE of the average in units of the exported sd (``mcse_rel``), and ``drift``, the largest
    shift of a mean between the window's halves in units of its exported sd (what a drifting window
    folds into the width). With the run's own widened sds (``sd^2 = mean s^2 + var_t(mu)``, the
    window's) the drift is bounded: the iterates' variance is at least that of their two halves'
    means, ``(shift/2)^2`` on an even window (``(N-1)/N`` of it on an odd one, whose middle iterate
    is in neither half), so ``drift <= 2`` (``2 sqrt(N/(N-1))`` for odd ``N``: 2.02 on 45 iterates),
    reached when the width is all travel and the halves are two points; a linear trend reads
    ``sqrt(3)``. A drift near the bound says the exported width is the fit's travel, not the
    posterior's. A marginal that did not move at all (a constant sequence, where R-hat is
    undefined) counts as stationary.

    What a short window can say: R-hat needs effective draws. A stationary AR(1) sequence with
    lag-1 correlation 0.5 over 45 iterates (about 15 effective draws, four per quarter) reads a
    worst R-hat of 1.3-1.6 over 30 marginals (tests/test_guide_average.py), so such a window is "not
    shown stationary": on short windows the check errs toward not certifying. The other way round, a
    drift slow against the jitter can hide in the noise of any finite window; the drift and MCSE
    numbers say how large a shift could pass.
    """
    loc, log_sd, sd = loc.double().cpu(), log_sd.double().cpu(), sd.double().cpu()
    n = loc.shape[0]
    if n < WINDOW_MIN_ITERATES or loc.shape[1] == 0:
        return None
    half = n // 2
    dims = ("chain", "draw", "dim")
    ds = xr.Dataset({"loc": (dims, loc.numpy()[None]), "log_sd": (dims, log_sd.numpy()[None])},
                    coords={"chain": [0], "draw": range(n)})
    # a marginal that never moved is a constant sequence: R-hat, ESS and MCSE are undefined there
    moved = {name: (x.max(0).values - x.min(0).values) > 0 for name, x in (("loc", loc), ("log_sd", log_sd))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = az.rhat(_halves_as_chains(ds))
        ess = torch.as_tensor(az.ess(ds[["loc"]], method="bulk")["loc"].values)
        mcse = torch.as_tensor(az.mcse(ds[["loc"]], method="mean")["loc"].values)
    r_loc, r_sd = (torch.where(moved[name] & torch.as_tensor(r[name].values).isfinite(), torch.as_tensor(r[name].values), 1.0)
                   for name in ("loc", "log_sd"))
    ess = torch.where(moved["loc"] & ess.isfinite(), ess, torch.full_like(ess, float(n)))
    mcse = torch.where(moved["loc"] & mcse.isfinite(), mcse, torch.zeros_like(mcse))
    drift = (loc[n - half:].mean(0) - loc[:half].mean(0)).abs() / sd.clamp_min(1e-30)
    worst = torch.maximum(r_loc, r_sd)
    return {"rhat": float(worst.max()), "rhat_loc": float(r_loc.max()), "rhat_log_sd": float(r_sd.max()),
            "rhat_over": float((worst > WINDOW_RHAT_TOL).double().mean()), "ess_min": float(ess.min()),
            "mcse_rel": float((mcse / sd.clamp_min(1e-30)).max()), "drift": float(drift.max()), "iterates": float(n)}
