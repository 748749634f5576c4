"""``beta`` by information matching, from per-block gradients of the unit scores (the estimator).

``beta`` is the learning rate of the Gibbs posterior over unit scores, ``pi(a | D) ~ p(a) exp(-beta L(a))``
with ``L`` the token loss summed over training blocks (:mod:`ppn_bayes.analysis.calibration`: what it
is, the gradients this reads, the command). It is estimated with the chapter (or document) as the
independent unit.

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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: beta is computed in the leading curvature directions that hold this share of tr(J): the rest are
#: directions the data hardly inform (units solidly kept or dropped at every drawn price, whose score
#: moves no gate), where J^-1 would weigh pure noise as much as the directions that decide the keep-set.
CURVATURE_SHARE = 0.95


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
