"""Calibrating the learning rate ``beta`` of the Gibbs posterior over unit scores.

The score posterior is a generalized (Gibbs) posterior: ``pi(a | D) ~ p(a) exp(-beta L(a))`` with
``L(a) = sum over training blocks of E_{lambda, m}[NLL(block | a, lambda, m)]`` (the token loss with
the price and the masks integrated out; PPNModel's ``tokens`` factor). ``beta = 1`` treats every token
as an independent observation of the scores; tokens of one chapter are not (the same characters,
topic and style), so the posterior is too narrow. ``beta`` is *estimated* here, with the chapter (or
document) as the independent unit.

``beta`` itself comes from :func:`~ppn_bayes.analysis.information_match.information_match`
(:mod:`ppn_bayes.analysis.information_match`: matching the Gibbs posterior's covariance to the sandwich
covariance over independent units, ``I`` from blocks grouped by unit, the directions it is computed
in); this module computes the per-block gradients it reads, runs ``ppn calibrate`` and re-derives the
posterior.

**lambda and the masks: common random numbers.** Every block is evaluated at the same ``R`` draws:
prices at the stratified quantiles ``(r + 1/2) / R`` of ``Exp(rate)``, mask uniforms from the same
seeds, so every block sees the same ``R`` sub-networks. Dense draws (``lambda = 0``, probability
``p_dense``) carry no gradient to the scores and enter only as the factor ``1 - p_dense``. What is
calibrated is therefore the loss averaged over those ``R`` common draws, a deterministic proxy for the
full integral over ``lambda`` and the masks (more draws, a closer proxy). Its per-draw mean over
blocks is removed (common to every unit, it moves no covariance). The draws' spread within a block is
*not* subtracted as Monte-Carlo noise: with stratified prices it is mostly the difference between
sub-networks at different prices, a real part of the proxy's gradient (subtracting it, as one would
for independent draws, left the within-chapter part negative on the demo).

**J through straight-through masks: a Gauss-Newton form.** The masks are hard 0/1 in the forward
pass; autograd's second derivative through the straight-through estimator is meaningless and finite
differences of hard masks are dominated by masks flipping. ``J`` is the generalized Gauss-Newton
matrix of the token loss, ``sum_t (dz_t/da)^T (diag p_t - p_t p_t^T) (dz_t/da)`` (``z_t`` the logits, the
Jacobian the straight-through one), which is positive semi-definite and equals the expected Fisher
information of the model's own predictive distribution. It is estimated without second derivatives:
with next tokens ``y^_t`` *sampled from the model* (contexts fixed), the block gradient
``G^ = sum_t grad log p(y^_t | x_<t)`` has ``E[G^ G^T] = GGN`` exactly (the cross terms vanish because
each ``E[grad log p(y^_t)] = 0``). Dropped: the residual term of the Hessian (``(p_t - onehot(y_t))``
times the logits' second derivative in ``a``), the curvature of ``E_m`` through the Bernoulli
probabilities (``rho''``), and the compute factor's curvature (deterministic in the data: it changes
neither ``I`` nor which units are independent, only the posterior's centre and, slightly, its width).

**Re-deriving the posterior.** At the calibrated ``beta`` the guide is refitted by a guide-only SVI
phase (Pyro's ``Trace_ELBO``; weights, push and prior levels frozen, as ``train.guide_steps`` does),
starting from the fitted guide: no retraining of the network. It follows the run's own guide-only
phase: the run's ``guide_schedule`` (cosine or constant), and where the run averaged
(``train.guide_average_steps``), the average of the re-derivation's last ``min(N, calibration.steps)``
iterates, the sds widened by their spread (:mod:`ppn_bayes.training.averaging`), so a calibrated
posterior is not narrower than the uncalibrated one merely for ending at one iterate. The original
posterior files are kept in ``RUN/posterior.uncalibrated/`` (every later ``ppn calibrate`` starts from them), the re-derived
ones replace the run's (``posterior.json`` then says ``tempering: beta``) so every later command reads
the calibrated posterior, the gradients behind beta go to ``RUN/calibration.safetensors`` (for
re-analysis), and the run's ``manifest.json`` records how (``calibration``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppn_bayes.analysis.information_match import information_match
from ppn_bayes.bayes.guides import guide_marginals
from ppn_bayes.bayes.model import PPNModel, sequence_nll
from ppn_bayes.bayes.posterior import FILES as POSTERIOR_FILES
from ppn_bayes.bayes.posterior import Posterior, save_posterior
from ppn_bayes.config import recipe_from_dict
from ppn_bayes.data.corpus import block_units
from ppn_bayes.errors import ConfigError, DataError, RunError
from ppn_bayes.files import atomic_save_tensors, writer_lock
from ppn_bayes.training import rundir
from ppn_bayes.training.averaging import add_iterate, load_average, zero_sums
from ppn_bayes.training.schedule import lr_multiplier

METHOD = "information matching, k / tr(J^-1 I) over chapters, Gauss-Newton curvature"
GRADIENTS = "calibration.safetensors"
GIVEN = "given (--beta), not estimated"
BACKUP = "posterior.uncalibrated"


# ------------------------------------------------------------------------ gradients of a network


def price_draws(rate: float, draws: int, seed: int) -> list[tuple[float, int]]:
    """``(lambda, mask seed)`` of ``draws`` common random numbers: prices at the stratified quantiles
    ``(r + 1/2) / draws`` of ``Exp(rate)`` (the dense share is handled as a factor), seeds hashed."""
    seeds = np.random.SeedSequence([int(seed), 7]).generate_state(draws, np.uint64) >> np.uint64(1)
    return [(-math.log(1.0 - (r + 0.5) / draws) / rate, int(s)) for r, s in enumerate(seeds)]


def block_gradients(ppn: PPNModel, scores: dict[str, torch.Tensor], blocks: torch.Tensor,
                    draws: list[tuple[float, int]], seed: int = 0, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block gradients of the summed token NLL with respect to the unit scores, at ``scores``.

    ``blocks [S, B, T]``; returns ``(grads, fisher)`` of shape ``[S, B, R, d]`` (``d`` all scores of the
    gated kinds, flattened in inventory order): with the true next tokens, and with next tokens
    sampled from the network itself (the Monte-Carlo Fisher, see the module docstring). Every block
    sees the same ``draws`` (price, mask seed): common random numbers. ``bar``: a progress bar to
    advance by one per block and draw.
    """
    kinds = list(ppn.inventory.kinds)
    S, B = blocks.shape[:2]
    d = sum(scores[k].numel() for k in kinds)
    grads = torch.zeros(S, B, len(draws), d, dtype=torch.float64)
    fisher = torch.zeros_like(grads)
    device = next(ppn.gated.parameters()).device
    label_gen = torch.Generator().manual_seed(int(seed) ^ 0x9E3779B9)
    for r, (lam, mask_seed) in enumerate(draws):
        for s in range(S):
            for b in range(B):
                a = {k: scores[k].detach().clone().requires_grad_(True) for k in kinds}
                rho = ppn.push.inclusion(a, lam)
                masks = ppn.push.sample_masks(rho, torch.Generator().manual_seed(mask_seed))
                gates = ppn.push.gates(masks, lam)
                ids = blocks[s, b].unsqueeze(0).to(device)
                with ppn.gated.gates(**gates):
                    logits = ppn.gated(input_ids=ids).logits
                nll, _ = sequence_nll(logits, ids, None)
                lg = logits[0, :-1].float()
                sampled = torch.multinomial(lg.detach().softmax(-1).cpu(), 1, generator=label_gen).squeeze(-1)
                nll_hat = F.cross_entropy(lg, sampled.to(device), reduction="sum")
                params = [a[k] for k in kinds]
                g1 = torch.autograd.grad(nll.sum(), params, retain_graph=True, allow_unused=True)
                g2 = torch.autograd.grad(nll_hat, params, allow_unused=True)
                grads[s, b, r] = _flat(g1, params)
                fisher[s, b, r] = _flat(g2, params)
                if bar is not None:
                    bar.update(1)
    return grads, fisher


def _flat(gs, params) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double().cpu() for g, p in zip(gs, params)])


def sample_unit_blocks(unit_of: torch.Tensor, units: int, per_unit: int, seed: int) -> torch.Tensor:
    """``[S, B]`` block indices: ``S <= units`` units drawn at random among those with at least
    ``per_unit`` blocks, and ``per_unit`` distinct blocks of each (seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    counts = torch.bincount(unit_of)
    eligible = (counts >= per_unit).nonzero().flatten()
    if eligible.numel() < 3:
        raise DataError(f"only {eligible.numel()} units have >= {per_unit} training blocks; calibration needs 3 "
                        "or more: use more training blocks (data.train_blocks), calibration.unit: documents "
                        "with more documents, or a smaller calibration.blocks_per_unit")
    chosen = eligible[torch.randperm(eligible.numel(), generator=gen)[:units]]
    rows = []
    for u in chosen.tolist():
        members = (unit_of == u).nonzero().flatten()
        rows.append(members[torch.randperm(members.numel(), generator=gen)[:per_unit]])
    return torch.stack(rows)


# ----------------------------------------------------------------------- re-deriving the posterior


def rederive_guide(model, guide, batch_fn, steps: int, lr: float, beta: float, scale: float = 1.0,
                   seed: int = 0, bar=None, schedule: str = "cosine", average_steps: int = 0
                   ) -> tuple[list[float], dict[str, Any] | None]:
    """Refit ``guide`` to ``model`` at tempering ``beta`` by ``steps`` of guide-only SVI (Adam at ``lr``,
    ``schedule``: cosine decay to 0, or constant); everything in ``model`` stays as it is.
    ``batch_fn(step) -> (args, kwargs)`` gives the model's arguments; the loss is ``-ELBO / scale``. The
    model reads ``model.tempering``; it is set to ``beta``.

    ``average_steps = N >= 2``: export the average of the last ``min(N, steps)`` iterates, the guide's
    sds widened by the spread of its means, as the run's ``train.guide_average_steps`` does
    (:mod:`ppn_bayes.training.averaging`; a window under two iterates is off). Returns the per-step
    losses and the window's ``guide_average`` numbers (``None`` when off)."""
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"rederive_guide: schedule must be cosine or constant, got {schedule!r}")
    model.tempering = float(beta)
    for p in model.parameters():
        p.requires_grad_(False)
    args, kwargs = batch_fn(0)
    with torch.no_grad(), pyro.poutine.block():
        guide(*args, **kwargs)  # an autoguide creates its parameters on first call
    named = {n: p for n, p in guide.named_parameters() if p.requires_grad}
    if not named:
        return [], None
    window = min(int(average_steps), steps) if average_steps >= 2 and steps >= 2 else 0
    sums = zero_sums(named, guide, steps - window, window) if window else None
    opt = torch.optim.Adam(list(named.values()), lr=lr)
    elbo = pyro.infer.Trace_ELBO()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier(step, steps, 0, schedule)
        args, kwargs = batch_fn(step)
        torch.manual_seed(int(seed) * 1_000_003 + step)
        if hasattr(model, "set_generator"):
            model.set_generator(torch.Generator().manual_seed(int(seed) * 7_919 + step))
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if sums is not None and step >= steps - window:
            add_iterate(sums, named, guide)
        if bar is not None:
            bar.update(1)
    return losses, (load_average(sums, named, guide, window) if sums is not None else None)


def _score_sds(post: Posterior, draws: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean posterior sd of each kind's scores (over joint draws)."""
    d = post.draws(draws, seed=seed)
    return {k: float(d[k].std(0).mean()) for k in post.inventory.kinds}


def _backup(run_dir: Path) -> Path:
    """``RUN/posterior.uncalibrated/``: the run's original posterior files, copied once (a directory
    built under a temporary name and renamed into place, so it is whole or absent)."""
    dest = run_dir / BACKUP
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{BACKUP}.tmp-", dir=run_dir))
    try:
        for name in POSTERIOR_FILES:
            shutil.copy2(run_dir / name, tmp / name)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------- the command


def calibrate_run(run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, device: str = "cpu",
                  progress: bool = False, beta: float | None = None) -> dict[str, Any]:
    """Estimate ``beta`` for a finished run, re-derive its posterior at it (``calibration.steps > 0``) and
    record ``calibration`` in its manifest; returns that record. ``overrides``: ``calibration.*`` keys
    (the run's recipe gives the rest). ``beta``: use this value instead of estimating one (method
    :data:`GIVEN`; e.g. the trained beta again, to see what the extra guide steps alone do). Always
    starts from the posterior the run was trained with."""
    if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta must be a finite number > 0, got {beta}")

    run_dir = Path(run_dir)
    with writer_lock(run_dir, "ppn calibrate"):
        run = rundir.RunDir(run_dir)
        if run.status != "finished":
            raise RunError(f"run {run_dir} is not finished (status {run.status}); let `ppn fit` finish or "
                           "--resume it, then calibrate")
        if not (run_dir / "posterior.json").is_file():
            raise RunError(f"{run_dir} has no posterior.json; pass a run directory written by `ppn fit`")
        run.check()
        recipe = run.recipe
        if overrides:
            data = recipe.to_dict()
            data["calibration"] = {**data["calibration"], **overrides}
            recipe = recipe_from_dict(data)
        c, t = recipe.calibration, recipe.train
        source = run_dir / BACKUP if (run_dir / BACKUP).is_dir() else run_dir
        post = Posterior.from_dir(source)
        if not post.prior.latent_names():
            raise RunError(f"run {run_dir} has no latent scores (prior.kind: none, the paper preset): there is "
                           "no posterior to calibrate")
        trained_with = float(run.manifest.get("tempering", t.tempering))
        tic = time.perf_counter()
        tok = run.load_tokenizer()
        try:
            blocks, unit_of, _ = block_units(tok, "train", recipe.data.block_size, recipe.data.corpus, c.unit,
                                             max_blocks=recipe.data.train_blocks,
                                             bootstrap_seed=recipe.data.bootstrap_seed,
                                             bootstrap_unit=recipe.data.bootstrap_unit)
        except DataError as err:
            raise DataError(f"calibration.unit {c.unit}: {err}") from None
        num_sequences = int(run.manifest.get("num_sequences", blocks.shape[0]))
        if num_sequences != blocks.shape[0]:
            raise RunError(f"run {run_dir} trained on {num_sequences} blocks but its corpus now packs into "
                           f"{blocks.shape[0]}; calibrate with the corpus and tokenizer it was trained on")
        unit_of = torch.unique(unit_of, return_inverse=True)[1]  # units that have training blocks, 0..n-1
        sizes = torch.bincount(unit_of)
        rows = sample_unit_blocks(unit_of, c.units, c.blocks_per_unit, c.seed) if beta is None else None
        gated = run.load_model(device=device)
        gated.model.requires_grad_(False)
        norms = {k: getattr(post.prior, f"z_{k}").exp() for k in post.inventory.kinds}
        ppn = PPNModel(gated, post.prior.config, post.push.config, num_sequences=num_sequences,
                       tokens_per_sequence=recipe.data.block_size, norms=norms, tempering=trained_with)
        ppn.prior, ppn.push = post.prior, post.push  # the run's fitted push and prior levels
        ppn.to(device)
        post.guide.to(device)
        if beta is None:
            method, details = METHOD, _estimate(run_dir, ppn, post, blocks, rows, sizes, c, device, progress)
            beta = details.pop("beta")
        else:
            method, details = GIVEN, {"seed": c.seed, "device": device}
        details["seconds"] = round(time.perf_counter() - tic, 1)
        details["score_sd_before"] = _score_sds(post)
        status = "not rederived"
        if c.steps > 0:
            tic = time.perf_counter()
            sd_before = _guide_sds(post.guide)
            train_blocks = blocks.to(device)
            B = t.batch_size

            def batch_fn(step):
                idx = torch.randint(0, num_sequences, (B,), generator=torch.Generator().manual_seed(c.seed * 100_003 + step))
                return (train_blocks[idx],), {"subsample": idx.to(device)}

            bar = _bar(progress, c.steps, f"ppn calibrate: guide at beta {beta:.3g}", "step")
            schedule, lr = t.guide_schedule or t.schedule, c.lr or t.guide_lr or t.lr_guide
            losses, average = rederive_guide(ppn, post.guide, batch_fn, c.steps, lr, beta,
                                             scale=ppn.num_tokens, seed=c.seed, bar=bar, schedule=schedule,
                                             average_steps=t.guide_average_steps)
            if bar is not None:
                bar.close()
            backup = _backup(run_dir)
            save_posterior(run_dir, post.prior, post.push, post.guide, post.prior.config, post.push.config,
                           _guide_cfg(source), tempering=beta)
            status = "rederived"
            details.update({"steps": c.steps, "lr": lr, "rederive_seconds":
                            round(time.perf_counter() - tic, 1), "loss_first": losses[0], "loss_last": losses[-1],
                            "guide_scale_ratio": float((_guide_sds(post.guide) / sd_before).log().mean().exp()),
                            "score_sd_after": _score_sds(post), "original": str(backup.relative_to(run_dir)),
                            "schedule": schedule, "average": average})
        record = {"method": method, "beta": beta, "unit": c.unit, "n_units": int(sizes.numel()),
                  "trained_with_beta": trained_with, "posterior": status, "details": details}
        rundir.update_manifest(run_dir, calibration=record)
        return record


def _estimate(run_dir: Path, ppn: PPNModel, post: Posterior, blocks: torch.Tensor, rows: torch.Tensor,
              sizes: torch.Tensor, c, device: str, progress: bool) -> dict[str, Any]:
    """The gradient pass and :func:`information_match`: ``beta`` and the manifest's ``details``."""
    tic = time.perf_counter()
    scores = post.median_scores()
    draws = price_draws(post.push.config.rate, c.draws, c.seed)
    bar = _bar(progress, rows.numel() * len(draws), "ppn calibrate: gradients", "block")
    grads, fisher = block_gradients(ppn, {k: v.to(device) for k, v in scores.items()}, blocks[rows], draws,
                                    seed=c.seed, bar=bar)
    if bar is not None:
        bar.close()
    atomic_save_tensors({"grads": grads, "fisher": fisher, "unit_sizes": sizes, "blocks": rows},
                        run_dir / GRADIENTS)  # for re-analysis: information_match(grads, fisher, unit_sizes)
    est = information_match(grads, fisher, sizes.tolist(), p_dense=post.push.config.p_dense,
                            max_dims=c.max_dims, bootstrap=c.bootstrap, seed=c.seed)
    beta = float(est["beta"])
    if not math.isfinite(beta) or beta <= 0:
        raise RunError(f"the calibration of {run_dir} gave beta = {beta}; sample more units "
                       "(calibration.units) or draws (calibration.draws)")
    details = {k: est[k] for k in ("beta", "se", "interval_90", "beta_lhw", "dims", "dims_total", "df",
                                   "curvature_captured", "between_share", "sampled_units", "blocks_per_unit",
                                   "draws", "n_blocks", "mean_unit_blocks", "bootstrap")}
    details.update({"seed": c.seed, "gradient_seconds": round(time.perf_counter() - tic, 1), "device": device})
    return details


def _bar(enabled: bool, total: int, desc: str, unit: str):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _guide_sds(guide) -> torch.Tensor:
    return guide_marginals(guide)[1].cpu().clamp_min(1e-30)


def _guide_cfg(source: Path):
    """The guide configuration recorded in ``source/posterior.json`` (already validated on load)."""
    return recipe_from_dict({"guide": json.loads((source / "posterior.json").read_text())["guide"]}).guide
