"""Exit prices, the one priority order they give, and the fill of a budget along it.

**Order (why keep-sets nest).** Ranking by a quantile of ``a_u - tau_l(lambda*)`` at each size's own
``lambda*`` would give a different order per size (``tau_l`` differs per layer, so curves cross) and
keep-sets would not nest. Instead each unit gets its *exit price*: in posterior draw ``k`` the push
keeps unit ``u`` at price ``x`` iff ``a_u^k > tau_l(x)`` (and its layer is kept), so it leaves at
``x_u^k = tau_l^{-1}(a_u^k)``, nested as ``min(own, layer's)``. The unit's priority is the
``q``-quantile of ``x_u^k`` over joint draws. Because ``tau`` does not depend on the draw, *at every
price at once* the units whose ``q``-quantile margin ``Q_q(a_u - tau_l(x))`` is positive are exactly
those with priority above ``x``: one global order agrees with the brief's per-``lambda*`` ranking on
which side of zero every unit is, for every ``lambda*``. Beyond the spline's range the exit
coordinate continues with the margin itself (``x < 0``: ``a - tau(0)``; ``x > 1``: ``1 + a - tau(1)``),
so the key is continuous and strictly increasing in the score.

**Fill.** The keep-set is the longest prefix of that order whose *exact* cost
(:meth:`UnitInventory.kept_cost`: a layer's own cost when it enters, a GQA KV head once with its
first query head) fits the budget; layers left with no head and no channel group are dropped. A
prefix of one order is nested across budgets and currencies by construction and never exceeds the
budget. See ``docs/keepsets.md`` for the quantile property.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppn_bayes.bayes.unit_table import UnitTable

GRID = 4096  # spline grid for inverting tau_l(x); piecewise-linear error ~1e-7 in x


# ---------------------------------------------------------------------------------------- ordering


def _invert(tau: torch.Tensor, xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exit coordinates of scores ``a [R, n]`` against increasing grids ``tau [R, M]`` at ``xs [M]``.

    Inside the spline's range: the ``x`` where ``tau(x) = a`` (linear between grid points); below
    ``tau(0)``: ``a - tau(0)`` (< 0); above ``tau(1)``: ``1 + a - tau(1)`` (> 1). Continuous and
    strictly increasing in ``a``.
    """
    tau, a = tau.double().contiguous(), a.double().contiguous()
    M = tau.shape[1]
    j = torch.searchsorted(tau, a).clamp(1, M - 1)
    t0, t1 = tau.gather(1, j - 1), tau.gather(1, j)
    x0, x1 = xs[j - 1], xs[j]
    frac = ((a - t0) / (t1 - t0).clamp_min(1e-300)).clamp(0.0, 1.0)
    inside = x0 + frac * (x1 - x0)
    lo, hi = tau[:, :1], tau[:, -1:]
    return torch.where(a <= lo, a - lo, torch.where(a >= hi, 1.0 + (a - hi), inside))


def threshold_grid(posterior, points: int = GRID) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``x`` grid ``[M]`` on [0, 1] and ``tau_{l,kind}(x)`` on it: ``{kind: [L, M]}``."""
    xs = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    push = posterior.push
    with torch.no_grad():
        vals = push.threshold_values(xs).double()  # [M, kinds, L]
    return xs, {k: vals[:, i, :].transpose(0, 1).contiguous() for i, k in enumerate(push.kinds)}


def exit_coordinates(posterior, table: UnitTable, scores: dict[str, torch.Tensor], nested: bool = True
                     ) -> torch.Tensor:
    """Per-draw exit prices ``[K, N]`` (in ``x = lambda / (1 + lambda)`` units), nested through layers
    (``nested=False``: each unit's own exit price, its layer ignored)."""
    xs, tau = threshold_grid(posterior)
    L = posterior.inventory.num_layers
    out = {}
    for k in table.kinds:
        s = scores[k].double()
        K = s.shape[0]
        rows = s.reshape(K, L, -1).permute(1, 0, 2).reshape(L, -1)  # [L, K * width]
        e = _invert(tau[k], xs, rows).reshape(L, K, -1).permute(1, 0, 2)  # [K, L, width]
        out[k] = e[..., 0] if k == "layers" else e
    if nested and "layers" in out:
        for k in ("heads", "groups"):
            if k in out:
                out[k] = torch.minimum(out[k], out["layers"].unsqueeze(-1))
    return table.flatten(out)


def quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile over dim 0 with linear interpolation (torch.quantile's rule, no size limit);
    non-decreasing in ``q`` and in every entry."""
    s = x.sort(dim=0).values
    pos = q * (s.shape[0] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.shape[0] - 1)
    w = pos - lo
    if w == 0.0:
        return s[lo].clone()
    # ``a + w (b - a)``, capped at ``b``, is non-decreasing in ``q`` even after rounding (the textbook
    # ``a (1 - w) + b w`` is not: two quantiles 4e-18 apart could swap by an ulp). Equal neighbours,
    # infinite ones included, give ``a`` itself.
    gap = s[hi] - s[lo]
    return torch.where(gap > 0, torch.minimum(s[lo] + w * gap, s[hi]), s[lo])


# ------------------------------------------------------------------------------------------- filling


@dataclass
class Fill:
    keep: torch.Tensor  # [B, N] bool
    cut_key: torch.Tensor  # [B] key of the first unit left out (-inf when all fit)


def fill(table: UnitTable, keys: torch.Tensor, budget: float, currency: str) -> Fill:
    """Longest prefix of each row's order (keys descending; ties: canonical order, layers first)
    whose exact cost fits ``budget``; then drop layers with neither heads nor groups left."""
    B, N = keys.shape
    order = unit_order(table, keys, currency)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(N).expand(B, N))
    cost = table.base_cost[currency].expand(B, N).clone()
    heads = (table.kv_id >= 0).nonzero().flatten()
    if heads.numel() and table.kv_cost[currency] > 0:
        kv = table.kv_id[heads]
        n_kv = int(kv.max()) + 1
        first = torch.full((B, n_kv), N, dtype=pos.dtype)
        first.scatter_reduce_(1, kv.expand(B, -1), pos[:, heads], reduce="amin")
        charged = pos[:, heads] == first.gather(1, kv.expand(B, -1))
        cost[:, heads] += charged.to(torch.float64) * table.kv_cost[currency]
    cum = cost.gather(1, order).cumsum(1)
    n_keep = (cum <= budget - table.fixed_cost[currency]).sum(1)  # costs >= 0, so cum is non-decreasing
    keep = pos < n_keep.unsqueeze(1)
    sorted_keys = keys.gather(1, order)
    cut = torch.where(n_keep < N, sorted_keys.gather(1, n_keep.clamp(max=N - 1).unsqueeze(1)).squeeze(1),
                      torch.full((B,), -math.inf, dtype=keys.dtype))
    return Fill(drop_empty_layers(table, keep), cut)


def unit_order(table: UnitTable, keys: torch.Tensor, currency: str) -> torch.Tensor:
    """Units by descending key; ties keep the canonical order (a layer before its children).

    For a layer-count target every unit takes its layer's key and ties go by layer index, so a
    layer and all its heads and groups enter together: ``--layers n`` keeps the n layers that stay
    longest, whole (children cost no layers, and a prefix that stopped at a layer would strand
    them).
    """
    if currency == "layers" and "layers" in table.kinds:
        L = table.inventory.num_layers
        layer_keys = keys[:, :L]  # layers come first in the canonical order
        keys = layer_keys.gather(1, table.layer.expand(keys.shape[0], -1))
        by_layer = torch.sort(table.layer, stable=True).indices
        order = torch.sort(keys[:, by_layer], dim=1, descending=True, stable=True).indices
        return by_layer[order]
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


def drop_empty_layers(table: UnitTable, keep: torch.Tensor) -> torch.Tensor:
    """A kept layer whose heads and groups are all gated and all dropped does nothing but cost norms."""
    kinds = set(table.kinds)
    if "layers" not in kinds or not {"heads", "groups"} <= kinds:
        return keep
    L = table.inventory.num_layers
    child = table.kind_id > 0
    counts = torch.zeros(keep.shape[0], L, dtype=torch.long)
    counts.index_add_(1, table.layer[child], keep[:, child].long())
    is_layer = (table.kind_id == 0).nonzero().flatten()
    keep = keep.clone()
    keep[:, is_layer] &= counts[:, table.layer[is_layer]] > 0
    return keep
