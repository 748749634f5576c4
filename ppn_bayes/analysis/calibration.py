"""Calibrating the learning rate ``beta`` of the Gibbs posterior over unit scores.

The score posterior is a generalized (Gibbs) posterior: ``pi(a | D) ~ p(a) exp(-beta L(a))`` with
``L(a) = sum over training blocks of E_{lambda, m}[NLL(block | a, lambda, m)]`` (the token loss with
the price and the masks integrated out; PPNModel's ``tokens`` factor). ``beta = 1`` treats every token
as an independent observation of the scores; tokens of one chapter are not (the same characters,
topic and style), so the posterior is too narrow. ``beta`` is *estimated* here, with the chapter (or
document) as the independent unit.

**Information matching** (Holmes & Walker 2017; Lyddon, Holmes & Walker 2019). Near its mode the
Gibbs posterior has covariance ``(beta J)^-1``, ``J`` the Hessian of ``L``; the minimiser of ``L``
varies from one data set to another with the sandwich covariance ``J^-1 I J^-1``, ``I`` the variance
of the gradient of ``L`` over data sets, i.e. the sum over *independent units* ``c`` of the variance of
the unit's gradient ``g_c``. ``beta`` makes the two agree. In the coordinates where ``J`` is the
identity the sandwich is ``J^-1/2 I J^-1/2``, whose eigenvalues are the design effects of the
directions (how many times each independent unit was counted); matching its trace to the
posterior's ``k / beta``::

    beta = k / tr(J^-1 I)                                     (the estimate used)

(``tr(J^-1 I)`` is Takeuchi's effective number of parameters), and Lyddon-Holmes-Walker's
``beta = tr(J I^-1 J) / tr(J)`` (recorded beside it as ``beta_lhw``). Both are 1 for a correctly
specified likelihood (``I = J``) and exactly ``1 / k`` when every independent unit is counted ``k``
times (``I = k J``); both are invariant to rescaling the loss. They differ in how they average
unequal design effects (arithmetic vs ``J``-weighted harmonic) and, decisively here, in what they
need: ``tr(J^-1 I)`` is *linear* in ``I``, so an unbiased ``I`` gives a nearly unbiased ``beta``, while
``I^-1`` from a few dozen units is dominated by its noise (the between-unit part is a difference of
two estimated covariances, often indefinite). On the synthetic model of tests/test_calibration.py
(true beta 0.2, 6 directions, 20 seeds each) the trace form averaged 0.193-0.204 with 30-60 units of
4-6 blocks (0.237 with 40 units of 2 blocks: hence ``blocks_per_unit: 4``), the inverse form
0.075-0.19 (measured before the draw-noise correction was dropped; the test's own figures are in its
docstring).

**I from blocks grouped by unit.** Training blocks are packed across chapter boundaries; each is
assigned to the chapter of its middle token (:func:`ppn_bayes.data.corpus.block_units`). A unit's gradient
is the sum of its blocks'. From ``S`` sampled units with ``B >= 2`` blocks each, a one-way random
effects decomposition separates the spread of blocks within a unit (``W``, ``S (B - 1)`` degrees of
freedom) from the spread of the units' mean gradients (``M``, ``S - 1`` df)::

    Sigma_between = M - W / B          (covariance of two blocks of the same unit)
    Sigma_within  = W
    I = N Sigma_within + (sum_c m_c^2) Sigma_between      (N blocks; unit c has m_c of them)

so a chapter of ``m_c`` blocks counts ``m_c`` times the within-part but ``m_c^2`` times the common
part. With ``Sigma_between = 0`` the blocks are independent and ``beta -> tr(J)/tr(Sigma_within)``.

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

**Few units, many scores.** ``J^-1`` is estimated from ``n_J = S B R`` Monte-Carlo Fisher terms;
``beta`` is computed in the ``k`` directions of largest curvature (the top eigenvectors of ``J``, the
directions the data inform most): as many as hold :data:`CURVATURE_SHARE` of ``tr(J)``, at most
``n_J // 4`` and ``max_dims``. (A unit solidly kept or dropped at every drawn price has no gradient
at all; whitening by its near-zero curvature would weigh noise like a decision.) It is multiplied by
``n_J / (n_J - k - 1)``, which undoes the inverse-Wishart inflation of ``tr(J^-1 ...)``. The traces of
the within and between parts are clamped at 0 (a covariance cannot be negative). ``beta_lhw`` is
computed in at most ``(S - 1) // 3`` directions with both parts projected onto the positive
semi-definite cone and its inverse corrected by ``(nu - k - 1) / nu`` (``nu``: Satterthwaite's degrees
of freedom of ``I``). The standard error comes from a bootstrap over the sampled units (on the
synthetic check it overstates the spread over seeds by 10-25 %: conservative).

**Re-deriving the posterior.** At the calibrated ``beta`` the guide is refitted by a guide-only SVI
phase (Pyro's ``Trace_ELBO``; weights, push and prior levels frozen, as ``train.guide_steps`` does),
starting from the fitted guide: no retraining of the network. The original posterior files are kept
in ``RUN/posterior.uncalibrated/`` (every later ``ppn calibrate`` starts from them), the re-derived
ones replace the run's (``posterior.json`` then says ``tempering: beta``) so every later command reads
the calibrated posterior, the gradients behind beta go to ``RUN/calibration.safetensors`` (for
re-analysis), and the run's ``manifest.json`` records how (``calibration``).
"""

from __future__ import annotations

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

from ppn_bayes.bayes.model import PPNModel, sequence_nll
from ppn_bayes.bayes.posterior import FILES as POSTERIOR_FILES
from ppn_bayes.bayes.posterior import Posterior, save_posterior
from ppn_bayes.data.corpus import block_units
from ppn_bayes.errors import ConfigError, DataError, RunError

METHOD = "information matching, k / tr(J^-1 I) over chapters, Gauss-Newton curvature"
#: beta is computed in the leading curvature directions that hold this share of tr(J): the rest are
#: directions the data hardly inform (units solidly kept or dropped at every drawn price, whose score
#: moves no gate), where J^-1 would weigh pure noise as much as the directions that decide the keep-set.
CURVATURE_SHARE = 0.95
GRADIENTS = "calibration.safetensors"
GIVEN = "given (--beta), not estimated"
BACKUP = "posterior.uncalibrated"


# --------------------------------------------------------------------------------- the estimator


def _cov(x: torch.Tensor) -> torch.Tensor:
    """Sample covariance of the rows of ``x [n, d]`` (``n - 1`` in the denominator)."""
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / max(x.shape[0] - 1, 1)


def _psd(a: torch.Tensor, floor: float) -> torch.Tensor:
    """The symmetric part of ``a`` with eigenvalues clipped below at ``floor``."""
    vals, vecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (vecs * vals.clamp_min(floor)) @ vecs.T


def _satterthwaite(parts: list[tuple[float, int]]) -> float:
    """Satterthwaite's degrees of freedom of ``sum_i a_i X_i`` from ``(a_i tr X_i, df_i)``."""
    total = sum(t for t, _ in parts)
    return total**2 / max(sum(t * t / max(df, 1) for t, df in parts), 1e-300)


def _beta_once(g: torch.Tensor, f: torch.Tensor, n_blocks: int, sum_sq: float, w: float,
               max_dims: int | None) -> dict[str, float]:
    """One estimate from true-label gradients ``g [S, B, R, d]`` and sampled-label gradients ``f`` (same
    shape) of ``S`` units x ``B`` blocks x ``R`` draws; ``n_blocks`` / ``sum_sq``: the data's block count
    and ``sum_c m_c^2``; ``w = 1 - p_dense``."""
    S, B, R, d = g.shape
    dev = g - g.mean((0, 1), keepdim=True)  # the per-draw part common to every block moves no covariance
    gb = w * dev.mean(2)  # [S, B, d]: each block's gradient, draws averaged
    gs = gb.mean(1)  # [S, d]: unit means
    M = _cov(gs)
    if B >= 2:
        W = ((gb - gs[:, None]).reshape(-1, d).T @ (gb - gs[:, None]).reshape(-1, d)) / (S * (B - 1))
    else:  # one block per unit: units are single blocks (sum_sq == n_blocks), nothing to separate
        W = torch.zeros(d, d, dtype=g.dtype)
    J = w * torch.einsum("sbri,sbrj->ij", f, f) / (S * B * R)  # GGN per block (Monte-Carlo Fisher)
    lam, vec = torch.linalg.eigh(0.5 * (J + J.T))
    lam, vec = lam.flip(0), vec.flip(1)
    n_j = S * B * R  # Monte-Carlo Fisher terms behind J
    share = lam.clamp_min(0).cumsum(0) / lam.clamp_min(0).sum().clamp_min(1e-300)
    k_share = int((share < CURVATURE_SHARE).sum()) + 1  # directions holding CURVATURE_SHARE of tr(J)
    k = min(d, max(1, n_j // 4), k_share, max_dims or d)
    lam_k = lam[:k].clamp_min(1e-30)
    white = vec[:, :k] / lam_k.sqrt()  # J-whitened coordinates of the k directions of largest curvature
    Mw, Ww = (white.T @ X @ white for X in (M, W))
    if B >= 2:
        between, within = Mw - Ww / B, Ww
        nu = _satterthwaite([(sum_sq * float(torch.trace(Mw)), S - 1),
                             ((n_blocks - sum_sq / B) * float(torch.trace(Ww)), S * (B - 1))])
    else:  # units of one block: no common part
        between, within = torch.zeros_like(Mw), Mw
        nu = float(S - 1)
    # Both parts are covariances: their traces are clamped at 0 (the between part's estimate, a
    # difference, can come out negative when the units hardly differ).
    t_between = max(float(torch.trace(between)), 0.0)
    t_within = max(float(torch.trace(within)), 1e-30)
    # The estimate: k / tr(J^-1 I), J = N diag(lam) being N * identity in whitened coordinates; J^-1
    # estimated from n_J Monte-Carlo Fisher terms is inflated by n_J / (n_J - k - 1) (the
    # inverse-Wishart mean), which the first factor undoes.
    beta = (n_j / max(n_j - k - 1, 1)) * n_blocks * k / (n_blocks * t_within + sum_sq * t_between)
    # For reference, Lyddon-Holmes-Walker's tr(J I^-1 J) / tr(J) = N sum lam_i (I_w^-1)_ii / sum lam_i in
    # the k_lhw <= (S - 1) // 3 leading directions (I^-1 needs many more units than directions), both
    # parts projected onto the positive semi-definite cone, the inverse bias-corrected by
    # (nu - k_lhw - 1) / nu (the inverse-Wishart mean, nu Satterthwaite's degrees of freedom).
    k2 = min(k, max(1, (S - 1) // 3))
    I_w = n_blocks * _psd(within[:k2, :k2], 0.0) + sum_sq * _psd(between[:k2, :k2], 0.0)
    I_w = _psd(I_w, 1e-6 * max(float(torch.trace(I_w)) / k2, 1e-30))
    inv_diag = torch.linalg.inv(I_w).diagonal()
    lead = lam_k[:k2]
    beta_lhw = (max(nu - k2 - 1, 1.0) / nu) * n_blocks * float((lead * inv_diag).sum()) / float(lead.sum())
    return {"beta": beta, "beta_lhw": beta_lhw, "dims": k, "dims_total": d, "df": nu,
            "curvature_captured": float(lam_k.sum() / lam.clamp_min(0).sum().clamp_min(1e-30)),
            "between_share": sum_sq * t_between / (n_blocks * t_within + sum_sq * t_between)}


def information_match(grads: torch.Tensor, fisher: torch.Tensor, unit_sizes: list[int] | torch.Tensor,
                      p_dense: float = 0.0, max_dims: int | None = None, bootstrap: int = 200,
                      seed: int = 0) -> dict[str, Any]:
    """``beta`` by information matching (module docstring) from per-block score gradients.

    ``grads``/``fisher``: ``[S, B, R, d]``: the gradient of each of ``B`` blocks of ``S`` sampled units
    at ``R`` common (lambda, mask) draws with the true next tokens, and with next tokens sampled from
    the model. ``unit_sizes``: the number of blocks of *every* unit of the training data (for ``N`` and
    ``sum m_c^2``). ``p_dense``: the share of dense draws, which carry no gradient. Returns ``beta``,
    its bootstrap standard error ``se`` (units resampled; 0 replicates: nan) and what it was made of.
    """
    grads, fisher = torch.as_tensor(grads).double(), torch.as_tensor(fisher).double()
    if grads.ndim != 4 or grads.shape != fisher.shape:
        raise ValueError(f"grads and fisher must both be [units, blocks, draws, dims], got "
                         f"{tuple(grads.shape)} and {tuple(fisher.shape)}")
    sizes = torch.as_tensor(unit_sizes, dtype=torch.float64)
    n_blocks, sum_sq = float(sizes.sum()), float((sizes**2).sum())
    S, B = grads.shape[:2]
    if S < 3:
        raise ValueError(f"need at least 3 sampled units, got {S}")
    if B < 2 and sum_sq != n_blocks:
        raise ValueError("one block per sampled unit cannot separate within- from between-unit spread; "
                         "sample >= 2 blocks per unit")
    w = 1.0 - float(p_dense)
    out = _beta_once(grads, fisher, int(n_blocks), sum_sq, w, max_dims)
    gen = torch.Generator().manual_seed(int(seed))
    reps = []
    for _ in range(int(bootstrap)):
        idx = torch.randint(0, S, (S,), generator=gen)
        reps.append(_beta_once(grads[idx], fisher[idx], int(n_blocks), sum_sq, w, max_dims)["beta"])
    if reps:
        arr = np.asarray(reps)
        out["se"] = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
        out["interval_90"] = [float(np.quantile(arr, 0.05)), float(np.quantile(arr, 0.95))]
    else:
        out["se"], out["interval_90"] = float("nan"), None
    out.update({"sampled_units": S, "blocks_per_unit": B, "draws": int(grads.shape[2]), "n_blocks": int(n_blocks),
                "mean_unit_blocks": sum_sq / n_blocks, "bootstrap": int(bootstrap)})
    return out


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
                   seed: int = 0, bar=None) -> list[float]:
    """Refit ``guide`` to ``model`` at tempering ``beta`` by ``steps`` of guide-only SVI (Adam, cosine
    decay from ``lr``); everything in ``model`` stays as it is. ``batch_fn(step) -> (args, kwargs)`` gives
    the model's arguments; the loss is ``-ELBO / scale``. The model reads ``model.tempering``; it is set
    to ``beta``. Returns the per-step losses."""
    model.tempering = float(beta)
    for p in model.parameters():
        p.requires_grad_(False)
    args, kwargs = batch_fn(0)
    with torch.no_grad(), pyro.poutine.block():
        guide(*args, **kwargs)  # an autoguide creates its parameters on first call
    params = [p for p in guide.parameters() if p.requires_grad]
    if not params:
        return []
    opt = torch.optim.Adam(params, lr=lr)
    elbo = pyro.infer.Trace_ELBO()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
        args, kwargs = batch_fn(step)
        torch.manual_seed(int(seed) * 1_000_003 + step)
        if hasattr(model, "set_generator"):
            model.set_generator(torch.Generator().manual_seed(int(seed) * 7_919 + step))
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    return losses


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
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.files import writer_lock
    from ppn_bayes.training import rundir

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
                                             max_blocks=recipe.data.train_blocks)
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
            losses = rederive_guide(ppn, post.guide, batch_fn, c.steps, c.lr or t.guide_lr or t.lr_guide, beta,
                                    scale=ppn.num_tokens, seed=c.seed, bar=bar)
            if bar is not None:
                bar.close()
            backup = _backup(run_dir)
            save_posterior(run_dir, post.prior, post.push, post.guide, post.prior.config, post.push.config,
                           _guide_cfg(source), tempering=beta)
            status = "rederived"
            details.update({"steps": c.steps, "lr": c.lr or t.guide_lr or t.lr_guide, "rederive_seconds":
                            round(time.perf_counter() - tic, 1), "loss_first": losses[0], "loss_last": losses[-1],
                            "guide_scale_ratio": float((_guide_sds(post.guide) / sd_before).log().mean().exp()),
                            "score_sd_after": _score_sds(post), "original": str(backup.relative_to(run_dir))})
        record = {"method": method, "beta": beta, "unit": c.unit, "n_units": int(sizes.numel()),
                  "trained_with_beta": trained_with, "posterior": status, "details": details}
        rundir.update_manifest(run_dir, calibration=record)
        return record


def _estimate(run_dir: Path, ppn: PPNModel, post: Posterior, blocks: torch.Tensor, rows: torch.Tensor,
              sizes: torch.Tensor, c, device: str, progress: bool) -> dict[str, Any]:
    """The gradient pass and :func:`information_match`: ``beta`` and the manifest's ``details``."""
    from ppn_bayes.files import atomic_save_tensors

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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _guide_sds(guide) -> torch.Tensor:
    from ppn_bayes.bayes.guides import guide_marginals

    return guide_marginals(guide)[1].cpu().clamp_min(1e-30)


def _guide_cfg(source: Path):
    """The guide configuration recorded in ``source/posterior.json`` (already validated on load)."""
    import json

    from ppn_bayes.config import recipe_from_dict

    return recipe_from_dict({"guide": json.loads((source / "posterior.json").read_text())["guide"]}).guide
