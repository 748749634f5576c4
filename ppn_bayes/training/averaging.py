"""Iterate averaging over the guide-only phase's last steps, and the optimizer's spread as width.

``train.guide_average_steps = N`` (0: off) averages the trainable score-posterior parameters (the
guide's, and the push's where it trains in the phase) over the last ``min(N, guide_steps)`` optimizer
steps of the run (off when that is under two), and exports the average. The math, and why:

* **Where a run ends is a draw.** At a constant learning rate, stochastic-gradient iterates
  ``theta_t`` do not settle at the optimum ``theta*`` of the ELBO: they wander around it in a
  stationary distribution ``pi_lr`` whose width the rate and the gradient noise set (Mandt, Hoffman &
  Blei 2017, "Stochastic gradient descent as approximate Bayesian inference"). On the demo the noise is
  large (a fresh price, masks and two blocks every step): at a constant ``guide_lr`` 0.2 the guide's
  means spread by 0.40 (rms) over the last 45 steps, against 0.10 for its own sds. The last iterate is then one draw from
  ``pi_lr``, and another seed's run ends at another, which is why refits that differ only in
  ``train.seed`` keep different layers (issue 12's refit check: the seed moved keep-sets more than
  resampling the data did).
* **The average estimates theta*.** The Polyak-Ruppert average ``theta_bar = (1/N) sum_t theta_t`` over
  the window has a variance about ``tau/N`` times the iterates' (``tau`` their autocorrelation time),
  so it is a better estimate of the optimum than the last iterate (SWA, Izmailov et al. 2018, is the
  same average for weights; ``torch.optim.swa_utils`` keeps it for a whole module, here it is kept for
  two parameter groups and checkpointed with the run).
* **The spread becomes width.** What another fit would report is ``q_theta`` at ``theta ~ pi_lr``: the
  mixture ``integral q_theta dpi_lr(theta)``. The exported guide is that mixture moment-matched per
  latent (law of total variance): mean ``mean_t mu_t`` and marginal variance
  ``mean_t s_t^2 + var_t mu_t`` (unconstrained space; a low-rank guide keeps its averaged factor ``W``
  and its correlations, its diagonal ``scale`` set so that the marginal sds are these). So the
  inclusion probabilities forecast what the run would keep had the optimizer's noise fallen
  otherwise, not only what the data leave open; the report says so.

What it is not: a convergence certificate. A window of a few dozen steps on a run that is still
travelling mixes drift into the spread (which then widens q by how far the fit moved, the honest
direction to err). So the window also keeps its trace, the guide's marginal means and log-sds after
each of its steps (``average.loc_trace``, ``average.log_sd_trace``, ``[N, dim]`` float64, in the
checkpoint), and the ``guide_average`` record carries the check of
:func:`ppn_bayes.bayes.diagnostics.window_stationarity` (``window_*``: split R-hat over the window's
iterates, the drift of the means between its halves, the average's Monte-Carlo error). For a run
that averaged, that check is the convergence verdict of
:func:`ppn_bayes.bayes.guides.guide_convergence`: at a constant rate the last-interval flattening rate
measures the optimizer's jitter, which never falls, while the question is whether the iterates still
drift. The window should run at a constant rate (``train.guide_schedule:
constant``): under a decaying rate the late iterates freeze and their spread reads too small.
The running sums are checkpointed (``average.*`` tensors), so a resumed run averages exactly what an
uninterrupted one does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppn_bayes.bayes.diagnostics import window_stationarity
from ppn_bayes.bayes.guides import guide_marginals, set_marginal_sds
from ppn_bayes.errors import RunError
from ppn_bayes.training.schedule import total_steps

if TYPE_CHECKING:
    from ppn_bayes.training.session import Session


#: the window's traces of the guide's marginals, ``[n, dim]`` (a resumed window of another length keeps its rows)
TRACES = ("average.loc_trace", "average.log_sd_trace")


def window_steps(t) -> int:
    """The window's length: ``guide_average_steps`` capped at the guide-only phase's length (a shortened
    phase, ``--set train.guide_steps=2``, keeps it); 0 (off) when that leaves fewer than two iterates."""
    n = min(t.guide_average_steps, t.guide_steps)
    return n if n >= 2 else 0


def window_start(t) -> int:
    """The optimizer step after which the window's iterates are summed: iterates after steps
    ``window_start + 1 .. total`` (the last :func:`window_steps`) are averaged."""
    return total_steps(t) - window_steps(t)


def averaged_parameters(s: Session) -> dict[str, nn.Parameter]:
    """The parameters the window averages, by checkpoint name: the guide's (``guide.*``) and the push
    group's (``model.*``: splines, amplitude corrections, score level)."""
    out = {f"guide.{n}": p for n, p in s.guide.named_parameters()}
    out.update({f"model.{n}": p for n, p in s.ppn.named_parameters() if not n.startswith("gated.") and p.requires_grad})
    return out


def sum_shapes(params: dict[str, nn.Parameter], guide, n: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the running sums of an ``n``-iterate window over ``params`` (by name) and
    ``guide``'s marginals, and of the window's trace of those marginals (``[n, dim]``: the stationarity
    check, :func:`ppn_bayes.bayes.diagnostics.window_stationarity`)."""
    out = {f"average.sum.{k}": tuple(p.shape) for k, p in params.items()}
    dim = int(guide_marginals(guide)[0].numel())
    out.update({"average.loc_sum": (dim,), "average.loc_sq_sum": (dim,), "average.var_sum": (dim,),
                "average.window_start": (1,), "average.loc_trace": (n, dim), "average.log_sd_trace": (n, dim),
                "average.count": (1,)})
    return out


def zero_sums(params: dict[str, nn.Parameter], guide, first: int, n: int) -> dict[str, torch.Tensor]:
    """Zeroed running sums (float64, on the parameters' device) of an ``n``-iterate window whose iterates
    are those after step ``first``."""
    device = next(iter(params.values())).device
    out = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k, shape in sum_shapes(params, guide, n).items()}
    out["average.window_start"].fill_(first)
    return out


@torch.no_grad()
def add_iterate(sums: dict[str, torch.Tensor], params: dict[str, nn.Parameter], guide) -> None:
    """Add the current iterate of ``params`` and of ``guide``'s marginals to the window's sums, and the
    marginals to its trace."""
    for k, p in params.items():
        sums[f"average.sum.{k}"] += p.detach().double()
    loc, sd = guide_marginals(guide)
    sums["average.loc_sum"] += loc.double()
    sums["average.loc_sq_sum"] += loc.double().pow(2)
    sums["average.var_sum"] += sd.double().pow(2)
    row = int(sums["average.count"][0])
    if row < sums["average.loc_trace"].shape[0]:
        sums["average.loc_trace"][row] = loc.double()
        sums["average.log_sd_trace"][row] = sd.double().clamp_min(1e-30).log()
    sums["average.count"] += 1


@torch.no_grad()
def load_average(sums: dict[str, torch.Tensor], params: dict[str, nn.Parameter], guide, n: int) -> dict[str, Any]:
    """Load the average of the ``n`` summed iterates into ``params`` and widen ``guide``'s marginal sds to
    ``sqrt(mean s^2 + var mu)`` (module docstring); returns the ``guide_average`` record's numbers, with
    the window's stationarity check as ``window_*`` (:func:`~ppn_bayes.bayes.diagnostics.window_stationarity`;
    absent under ``WINDOW_MIN_ITERATES`` traced iterates)."""
    _, sd_last = guide_marginals(guide)
    for k, p in params.items():
        p.copy_((sums[f"average.sum.{k}"] / n).to(p.dtype))
    mean = sums["average.loc_sum"] / n
    spread = (sums["average.loc_sq_sum"] / n - mean.pow(2)).clamp_min(0.0)
    within = sums["average.var_sum"] / n
    sd = (within + spread).sqrt()
    set_marginal_sds(guide, sd.float())
    ratio = (sd.float() / sd_last.clamp_min(1e-30)).log().mean().exp()
    out = {"steps": n, "loc_spread_rms": float(spread.mean().sqrt()), "sd_within_rms": float(within.mean().sqrt()),
           "widening": float(((within + spread) / within.clamp_min(1e-300)).sqrt().log().mean().exp()),
           "sd_ratio_to_last": float(ratio)}
    rows = min(int(sums["average.count"][0]), sums["average.loc_trace"].shape[0])
    check = window_stationarity(sums["average.loc_trace"][:rows], sums["average.log_sd_trace"][:rows], sd)
    return out | {f"window_{k}": v for k, v in (check or {}).items()}


def average_shapes(s: Session) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the running sums (what a checkpoint's ``average.*`` tensors must be); empty
    when averaging is off or the guide has no latents."""
    if window_steps(s.recipe.train) == 0 or not hasattr(s.guide, "auto"):
        return {}
    return sum_shapes(averaged_parameters(s), s.guide, window_steps(s.recipe.train))


def start(s: Session) -> dict[str, torch.Tensor] | None:
    """Zeroed running sums and the window's first step, or ``None`` when averaging is off."""
    if not average_shapes(s):
        return None
    t = s.recipe.train
    return zero_sums(averaged_parameters(s), s.guide, window_start(t), window_steps(t))


@torch.no_grad()
def restore(s: Session, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Load a checkpoint's sums (taken after ``step`` steps). Sums of another window (a finished run
    resumed for more steps: the recipe moved the window) are dropped when the new window starts at or
    after ``step`` (no iterate of it was summed yet); a window that moved under iterates already summed
    cannot be rebuilt, and that is a one-line error."""
    if s.average is None:
        return
    fresh = window_start(s.recipe.train)
    saved = tensors.get("average.window_start")
    if saved is not None and int(saved.reshape(-1)[0]) == fresh:
        for name, value in tensors.items():
            if name in TRACES and name in s.average and value.shape[1:] == s.average[name].shape[1:]:
                rows = min(value.shape[0], s.average[name].shape[0])  # same start, longer or shorter window
                s.average[name][:rows].copy_(value[:rows])
            elif name.startswith("average."):
                if name not in s.average or tuple(value.shape) != tuple(s.average[name].shape):
                    raise RunError(f"the checkpoint's {name} does not fit this run's guide and push; start a new run")
                s.average[name].copy_(value)
    elif step > fresh:
        raise RunError(f"the checkpoint at step {step} lies inside the averaging window that train.guide_average_steps / "
                       f"guide_steps now ask for (after step {fresh}), but its sums are of another window (or none); "
                       "resume with the recipe's old values, or start a new run")


def accumulate(s: Session, done: int) -> None:
    """Add the iterate after optimizer step ``done`` to the sums when it lies in the window."""
    if s.average is None or done <= window_start(s.recipe.train):
        return
    add_iterate(s.average, averaged_parameters(s), s.guide)


def apply(s: Session) -> dict[str, Any] | None:
    """Load the window's average into the parameters and widen the guide's sds by the spread of its
    means (module docstring); returns the ``guide_average`` record's numbers, ``None`` when off."""
    if s.average is None:
        return None
    return load_average(s.average, averaged_parameters(s), s.guide, window_steps(s.recipe.train))
