"""Posterior -> lambda* -> nested keep-sets, with inclusion probabilities (the "posterior to mask" step).

Reads only the run's small posterior files (:class:`~ppn_bayes.bayes.posterior.Posterior`), never the model.

**Target.** A size is asked for in one currency: a fraction of decoder parameters (``size``), a
decoder parameter count (``params``), a number of layers (``layers``) or a FLOPs-per-token budget
(``flops``: a fraction when <= 1, else FLOPs per token). Embeddings and the LM head are never pruned
and are not part of the budget.

**lambda\\*.** The push's expected kept cost ``E_posterior[sum_u cost_u * rho_u(lambda)]`` (nested
``rho``) falls monotonically as the price grows (thresholds are non-decreasing in lambda), so
``lambda*`` is found by bisection on ``x = lambda / (1 + lambda)`` in ``[0, 1]``.

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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.config import check_seed
from ppn_bayes.errors import ConfigError, SizeError

KIND_ORDER = ("layers", "heads", "groups")
GRID = 4096  # spline grid for inverting tau_l(x); piecewise-linear error ~1e-7 in x
X_MAX = 1.0 - 1e-9  # largest price the bisection reports: lambda ~ 1e9, beyond any trained price
CHUNK = 64  # posterior draws filled at once (bounds memory for neuron-level inventories)
MAX_DRAWS = 100_000  # posterior draws held at once: draws x units float32 scores (1e5 x 1e3 units = 400 MB)


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A requested size: ``kind`` as the user gave it, the ``currency`` it is measured in, the
    absolute ``budget`` in that currency and the ``total`` (whole decoder) in it."""

    kind: str  # size | params | layers | flops
    value: float
    currency: str  # params | flops | layers
    budget: float
    total: float

    @property
    def fraction(self) -> float:
        return self.budget / self.total


def parse_target(inventory: UnitInventory, size: float | None = None, params: float | None = None,
                 layers: int | None = None, flops: float | None = None) -> Target:
    """Validate exactly one target and convert it to an absolute budget (one-line SizeError otherwise)."""
    given = {k: v for k, v in (("size", size), ("params", params), ("layers", layers), ("flops", flops))
             if v is not None}
    if len(given) != 1:
        raise SizeError(f"give exactly one target (size, params, layers or flops), got {sorted(given) or 'none'}")
    kind, value = next(iter(given.items()))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SizeError(f"{kind} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise SizeError(f"{kind} {value:g} is not a finite number; ask for a size such as --size 0.5")
    if value <= 0:
        raise SizeError(f"{kind} must be > 0, got {value:g}; ask for a positive size such as --size 0.5")
    if kind == "size":
        if value > 1:
            raise SizeError(f"size {value:g} is a fraction of the decoder's parameters and must be in (0, 1]; "
                            "use --params for a parameter count")
        total = inventory.total_cost("params")
        return Target(kind, value, "params", value * total, total)
    if kind == "params":
        total = inventory.total_cost("params")
        if value > total:
            raise SizeError(f"params {value:.0f} exceeds the decoder's {total:.0f} parameters "
                            "(embeddings are not pruned); ask for at most that")
        return Target(kind, value, "params", value, total)
    if kind == "flops":
        total = inventory.total_cost("flops")
        budget = value * total if value <= 1 else value
        if budget > total:
            raise SizeError(f"flops {value:g} exceeds the decoder's {total:.0f} FLOPs per token; ask for at most "
                            "that, or a fraction in (0, 1]")
        return Target(kind, value, "flops", budget, total)
    if "layers" not in inventory.kinds:
        raise SizeError("this run does not gate whole layers, so a layer count cannot be met; "
                        "ask for --size, --params or --flops")
    L = inventory.num_layers
    if value != int(value) or not 1 <= value <= L:
        raise SizeError(f"layers must be a whole number between 1 and {L}, got {value:g}")
    return Target(kind, value, "layers", float(int(value)), float(L))


# -------------------------------------------------------------------------------------- unit table


@dataclass
class UnitTable:
    """Every gated unit in one flat, canonical order (layers, then heads, then groups, row-major)
    with its exact incremental costs; converts between flat ``[..., N]`` and per-kind tensors."""

    inventory: UnitInventory
    kinds: tuple[str, ...]
    kind_id: torch.Tensor  # [N] index into KIND_ORDER
    layer: torch.Tensor  # [N]
    index: torch.Tensor  # [N] layer index, head index or group index
    kv_id: torch.Tensor  # [N] global KV-head id of a head, -1 otherwise
    base_cost: dict[str, torch.Tensor]  # currency -> [N] cost without the KV share
    kv_cost: dict[str, float]  # currency -> K/V cost charged with a KV head's first query head
    fixed_cost: dict[str, float]  # currency -> cost of what is never gated (ungated layers and their units)

    @classmethod
    def build(cls, inventory: UnitInventory) -> UnitTable:
        inv, L = inventory, inventory.num_layers
        H, G = inv.num_heads, inv.num_groups
        kinds = tuple(k for k in KIND_ORDER if k in inv.kinds)
        widths = {"layers": 1, "heads": H, "groups": G}
        kid, lay, idx = [], [], []
        for k in kinds:
            w = widths[k]
            kid.append(torch.full((L * w,), KIND_ORDER.index(k)))
            lay.append(torch.arange(L).repeat_interleave(w))
            idx.append(torch.arange(L) if k == "layers" else torch.arange(w).repeat(L))
        kind_id, layer, index = torch.cat(kid), torch.cat(lay), torch.cat(idx)
        is_head = kind_id == 1
        kv_id = torch.where(is_head, layer * inv.dims.num_kv_heads + index // inv.dims.kv_group, -1)
        base, kv = {}, {}
        for cur in ("params", "flops"):
            base[cur], kv[cur] = cls._costs(inv, kind_id, index, cur)
        base["layers"] = (kind_id == 0).to(torch.float64)
        kv["layers"] = 0.0
        fixed = {cur: inv.kept_cost(KeepSet(), cur) for cur in ("params", "flops")}
        fixed["layers"] = 0.0
        return cls(inv, kinds, kind_id, layer, index, kv_id, base, kv, fixed)

    @staticmethod
    def _costs(inv: UnitInventory, kind_id: torch.Tensor, index: torch.Tensor, cur: str
               ) -> tuple[torch.Tensor, float]:
        """Exact incremental costs, measured with :meth:`UnitInventory.kept_cost` itself (so the two
        can never disagree): a layer's own cost, a head's own q/o cost (+ the KV share on its group's
        first head), a group's channels."""
        c = inv.kept_cost
        layer_own = c(KeepSet(layers=[0]), cur)
        cost = torch.zeros(kind_id.shape[0], dtype=torch.float64)
        cost[kind_id == 0] = layer_own
        kv = 0.0
        if "heads" in inv.kinds:
            first = c(KeepSet(layers=[0], heads=[(0, 0)]), cur) - layer_own
            if inv.dims.kv_group > 1:
                own = c(KeepSet(layers=[0], heads=[(0, 0), (0, 1)]), cur) - layer_own - first
            else:
                own = first
            kv = first - own
            cost[kind_id == 1] = own
        if "groups" in inv.kinds:
            G = inv.num_groups
            by_group = torch.empty(G, dtype=torch.float64)
            for g in _distinct_groups(inv):  # group 0 stands for every full-width group
                value = c(KeepSet(layers=[0], groups=[(0, g)]), cur) - layer_own
                by_group[g:] = value
            cost[kind_id == 2] = by_group[index[kind_id == 2]]
        return cost, float(kv)

    @property
    def size(self) -> int:
        return int(self.kind_id.shape[0])

    def flatten(self, per_kind: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{kind: [..., L(, W)]}`` -> ``[..., N]`` in the canonical order."""
        L = self.inventory.num_layers
        parts = []
        for k in self.kinds:
            v = per_kind[k]
            lead = v.shape[: v.ndim - (1 if k == "layers" else 2)]
            parts.append(v.reshape(*lead, -1) if k != "layers" else v.reshape(*lead, L))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., N]`` -> ``{kind: [..., L(, W)]}``."""
        inv = self.inventory
        widths = {"layers": 1, "heads": inv.num_heads, "groups": inv.num_groups}
        out, start = {}, 0
        for k in self.kinds:
            n = inv.num_layers * widths[k]
            v = flat[..., start:start + n]
            out[k] = v if k == "layers" else v.reshape(*flat.shape[:-1], inv.num_layers, widths[k])
            start += n
        return out

    def keepset(self, keep: torch.Tensor) -> KeepSet:
        """A ``[N]`` boolean row -> the canonical :class:`KeepSet` (ungated kinds filled in)."""
        sel = keep.nonzero().flatten()
        k, l, i = self.kind_id[sel].tolist(), self.layer[sel].tolist(), self.index[sel].tolist()
        ks = KeepSet(layers=[li for kk, li in zip(k, l) if kk == 0],
                     heads=[(li, ii) for kk, li, ii in zip(k, l, i) if kk == 1],
                     groups=[(li, ii) for kk, li, ii in zip(k, l, i) if kk == 2])
        return self.inventory.complete(ks)

    def unit_name(self, u: int) -> str:
        k, l, i = int(self.kind_id[u]), int(self.layer[u]), int(self.index[u])
        return f"layer {l}" if k == 0 else (f"head {l}.{i}" if k == 1 else f"group {l}.{i}")


def _distinct_groups(inv: UnitInventory) -> list[int]:
    """Group 0 and, when the last group is narrower, the last one (all others equal group 0)."""
    G = inv.num_groups
    sizes = inv.group_sizes()
    return [0] if G == 1 or int(sizes[-1]) == int(sizes[0]) else [0, G - 1]


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
    order = _order(table, keys, currency)
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
    return Fill(_drop_empty_layers(table, keep), cut)


def _order(table: UnitTable, keys: torch.Tensor, currency: str) -> torch.Tensor:
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


def _drop_empty_layers(table: UnitTable, keep: torch.Tensor) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------ lambda*


def expected_cost(posterior, table: UnitTable, scores: dict[str, torch.Tensor], lam: float, currency: str
                  ) -> torch.Tensor:
    """Per-draw expected kept cost ``[K]`` at price ``lam`` (nested rho, linear unit costs)."""
    rho = posterior.inclusion(scores, lam)
    inv = posterior.inventory
    if currency == "layers":
        costs = {"layers": torch.ones(inv.num_layers, dtype=torch.float64)}
    else:
        costs = inv.unit_costs(currency)
    K = next(iter(scores.values())).shape[0]
    lay = rho.get("layers", torch.ones(K, inv.num_layers)).double()
    total = torch.zeros(K, dtype=torch.float64)
    for k, c in costs.items():
        r = rho[k].double() if k in rho else (lay if k == "layers" else lay.unsqueeze(-1).expand(K, *c.shape))
        total += (r * c).reshape(K, -1).sum(1)
    return total


def x_to_lambda(x: float) -> float:
    return x / (1.0 - x)


def solve_lambda(posterior, table: UnitTable, scores: dict[str, torch.Tensor], target: Target,
                 iters: int = 50) -> tuple[float, float, bool]:
    """``(lambda*, expected fraction at lambda*, saturated)``: bisection on x in [0, X_MAX].

    ``saturated`` is True when even the largest price leaves more than the target expected (the
    run's thresholds never pushed that far); lambda* is then X_MAX's price and the fill alone meets
    the budget.
    """
    def frac(x: float) -> float:
        return float(expected_cost(posterior, table, scores, x_to_lambda(x), target.currency).mean()) / target.total

    if frac(0.0) <= target.fraction:
        return 0.0, frac(0.0), False
    if frac(X_MAX) > target.fraction:
        return x_to_lambda(X_MAX), frac(X_MAX), True
    lo, hi = 0.0, X_MAX
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if frac(mid) > target.fraction:
            lo = mid
        else:
            hi = mid
    return x_to_lambda(hi), frac(hi), False


# ------------------------------------------------------------------------------------------- results


@dataclass
class KeepsetResult:
    """A keep-set at one size with how close it came and how sure the posterior is about it.

    Per-unit tensors are dicts ``{kind: [L] | [L, H] | [L, G]}`` over the gated kinds:
    ``inclusion`` (pi: share of posterior draws whose own keep-set, filled by the same rule at the
    same budget, keeps the unit), ``rho`` (the push's Bernoulli mask probability at lambda*,
    posterior mean), ``score_ci``/``gate_ci`` (``[3, ...]``: 5 %, 50 %, 95 % posterior quantiles of
    the score and of rho), ``priority`` (the order key: higher stays longer).
    """

    keep: KeepSet
    target: Target
    lam: float
    lambda_saturated: bool
    expected_size_at_lambda: float
    quantile: float
    num_draws: int
    seed: int
    achieved: dict[str, float]
    inclusion: dict[str, torch.Tensor]
    rho: dict[str, torch.Tensor]
    score_ci: dict[str, torch.Tensor]
    gate_ci: dict[str, torch.Tensor]
    priority: dict[str, torch.Tensor]
    p_equal: float
    boundary: list[dict[str, Any]]
    min_size: float
    cut_key: float
    eval: dict[str, Any] | None = field(default=None)
    draw_keep: torch.Tensor | None = field(default=None, repr=False)  # [K, N] each draw's own keep-set
    table: UnitTable | None = field(default=None, repr=False)
    posterior: Any = field(default=None, repr=False)

    def sampled_keepsets(self, n: int | None = None) -> list[KeepSet]:
        """The keep-sets of the first ``n`` posterior draws (each filled by the same rule and budget):
        sampled sub-networks at this size, for held-out loss bands and the posterior predictive."""
        rows = self.draw_keep if n is None else self.draw_keep[:n]
        return [self.table.keepset(r) for r in rows]

    @property
    def requested_size(self) -> float:
        return self.target.fraction

    @property
    def achieved_size(self) -> float:
        return self.achieved[f"{self.target.currency}_fraction"]

    @property
    def achieved_params(self) -> float:
        return self.achieved["params"]

    @property
    def achieved_flops(self) -> float:
        return self.achieved["flops"]

    def to_dict(self, per_unit: bool = True) -> dict[str, Any]:
        """The JSON form printed by ``ppn keepset --json``."""
        t = self.target
        out: dict[str, Any] = {
            "keep": self.keep.to_dict(),
            "target": {"kind": t.kind, "value": t.value, "currency": t.currency, "budget": t.budget},
            "requested_size": t.fraction,
            "achieved_size": self.achieved_size,
            "currency": t.currency,
            "requested": t.budget,
            "achieved": self.achieved[t.currency],
            "achieved_params": self.achieved["params"],
            "achieved_params_fraction": self.achieved["params_fraction"],
            "achieved_flops": self.achieved["flops"],
            "achieved_flops_fraction": self.achieved["flops_fraction"],
            "achieved_layers": int(self.achieved["layers"]),
            "lambda": self.lam,
            "lambda_saturated": self.lambda_saturated,
            "expected_size_at_lambda": self.expected_size_at_lambda,
            "quantile": self.quantile,
            "draws": self.num_draws,
            "seed": self.seed,
            "p_equal": self.p_equal,
            "boundary": self.boundary,
            "min_size": self.min_size,
        }
        if per_unit:
            lists = lambda d: {k: v.tolist() for k, v in d.items()}
            out["inclusion"] = lists(self.inclusion)
            out["rho"] = lists(self.rho)
            out["score_ci"] = {k: {"q05": v[0].tolist(), "q50": v[1].tolist(), "q95": v[2].tolist()}
                               for k, v in self.score_ci.items()}
            out["gate_ci"] = {k: {"q05": v[0].tolist(), "q50": v[1].tolist(), "q95": v[2].tolist()}
                              for k, v in self.gate_ci.items()}
        if self.eval is not None:
            out["eval"] = self.eval
        return out


def check_quantile(quantile: float) -> float:
    q = float(quantile)
    if not 0.0 < q < 1.0:  # NaN included
        raise ConfigError(f"quantile must be in (0, 1), got {quantile}; 0.5 is the median, 0.1 risk-averse")
    return q


class KeepsetSolver:
    """Keep-sets of one posterior at any number of sizes, from one set of joint draws.

    All sizes asked of one solver share the draws and hence one priority order per quantile, so
    their keep-sets are nested.
    """

    def __init__(self, posterior, num_draws: int = 256, seed: int = 0):
        if not 1 <= int(num_draws) <= MAX_DRAWS:
            raise ConfigError(f"draws must be between 1 and {MAX_DRAWS:,} (joint draws of every unit score are "
                              f"held in memory), got {num_draws}; 256 (the default) to 4096 are typical")
        check_seed(seed)
        self.posterior = _as_posterior(posterior)
        self.inventory: UnitInventory = self.posterior.inventory
        self.table = UnitTable.build(self.inventory)
        self.num_draws, self.seed = int(num_draws), int(seed)

    # The draws are taken on first use, so that a bad target or quantile fails before they cost anything.
    @cached_property
    def scores(self) -> dict[str, torch.Tensor]:
        draws = self.posterior.draws(self.num_draws, seed=self.seed)
        return {k: draws[k].double() for k in self.table.kinds}

    @cached_property
    def exits(self) -> torch.Tensor:
        return exit_coordinates(self.posterior, self.table, self.scores)  # [K, N]

    def priority(self, quantile: float = 0.5) -> torch.Tensor:
        """Flat priority keys ``[N]``: the ``quantile`` of each unit's exit price over the draws."""
        return quantile_rows(self.exits, check_quantile(quantile))

    def solve(self, size: float | None = None, params: float | None = None, layers: int | None = None,
              flops: float | None = None, quantile: float = 0.5) -> KeepsetResult:
        target = parse_target(self.inventory, size, params, layers, flops)
        check_quantile(quantile)
        keys = self.priority(quantile)
        min_cost = self._min_cost(keys, target.currency)
        if target.budget < min_cost:
            raise SizeError(f"{target.kind} {target.value:g} is below the smallest model this run can make "
                            f"({min_cost / target.total:.4g} of the decoder's {target.currency}); "
                            f"ask for at least {_fmt_min(target, min_cost)}")
        point = fill(self.table, keys.unsqueeze(0), target.budget, target.currency)
        keep_row = point.keep[0]
        keep = self.table.keepset(keep_row)
        lam, expected, saturated = solve_lambda(self.posterior, self.table, self.scores, target)
        draws_keep = torch.cat([fill(self.table, self.exits[i:i + CHUNK], target.budget, target.currency).keep
                                for i in range(0, self.num_draws, CHUNK)])
        pi = draws_keep.double().mean(0)
        p_equal = float((draws_keep == keep_row).all(1).double().mean())
        rho_draws = self.posterior.inclusion(self.scores, lam)
        result = KeepsetResult(
            keep=keep, target=target, lam=lam, lambda_saturated=saturated, expected_size_at_lambda=expected,
            quantile=float(quantile), num_draws=self.num_draws, seed=self.seed,
            achieved=achieved_costs(self.inventory, keep),
            inclusion=self.table.unflatten(pi),
            rho={k: v.double().mean(0) for k, v in rho_draws.items()},
            score_ci={k: _ci(v) for k, v in self.scores.items()},
            gate_ci={k: _ci(v.double()) for k, v in rho_draws.items()},
            priority=self.table.unflatten(keys),
            p_equal=p_equal, boundary=boundary_units(self.table, pi, keep_row),
            min_size=min_cost / target.total, cut_key=float(point.cut_key[0]),
            draw_keep=draws_keep, table=self.table, posterior=self.posterior,
        )
        return result

    def _min_cost(self, keys: torch.Tensor, currency: str) -> float:
        """Exact cost of the shortest non-empty prefix (after dropping empty layers) of the order."""
        N = self.table.size
        order = _order(self.table, keys.unsqueeze(0), currency)[0]
        for n in range(1, N + 1):
            keep = torch.zeros(1, N, dtype=torch.bool)
            keep[0, order[:n]] = True
            if _drop_empty_layers(self.table, keep).any():
                raw = self.table.keepset(keep[0])
                return self.inventory.kept_cost(raw, currency) if currency != "layers" else float(len(raw.layers))
        return 0.0  # pragma: no cover - a non-empty inventory always has a content unit


def _fmt_min(target: Target, min_cost: float) -> str:
    if target.kind == "size":
        return f"--size {min_cost / target.total:.4g}"
    if target.kind == "flops" and target.value <= 1:
        return f"--flops {min_cost / target.total:.4g}"
    return f"--{target.kind} {math.ceil(min_cost)}"


def _ci(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([quantile_rows(v, q) for q in (0.05, 0.5, 0.95)])


def achieved_costs(inventory: UnitInventory, keep: KeepSet) -> dict[str, float]:
    """Exact params, FLOPs per token and layers of a keep-set, absolute and as fractions."""
    p, f = inventory.kept_cost(keep, "params"), inventory.kept_cost(keep, "flops")
    n = len(inventory.complete(keep).layers)
    return {"params": p, "params_fraction": p / inventory.total_cost("params"),
            "flops": f, "flops_fraction": f / inventory.total_cost("flops"),
            "layers": float(n), "layers_fraction": n / inventory.num_layers}


def boundary_units(table: UnitTable, pi: torch.Tensor, keep_row: torch.Tensor, lo: float = 0.1,
                   hi: float = 0.9) -> list[dict[str, Any]]:
    """Units whose keep decision is uncertain (``lo < pi < hi``), most uncertain first."""
    idx = ((pi > lo) & (pi < hi)).nonzero().flatten().tolist()
    idx.sort(key=lambda u: abs(float(pi[u]) - 0.5))
    return [{"unit": table.unit_name(u), "kind": KIND_ORDER[int(table.kind_id[u])], "layer": int(table.layer[u]),
             "index": int(table.index[u]), "pi": float(pi[u]), "kept": bool(keep_row[u])} for u in idx]


def _as_posterior(obj):
    """Accept a Posterior, a Run (anything with ``.posterior``) or a run directory path."""
    from ppn_bayes.bayes.posterior import Posterior

    if isinstance(obj, (str, Path)):
        return Posterior.from_dir(obj)
    if hasattr(obj, "posterior") and not hasattr(obj, "draws"):
        return obj.posterior
    return obj


# ------------------------------------------------------------------------------------------- public API


def keepset(posterior, size: float | None = None, params: float | None = None, layers: int | None = None,
            flops: float | None = None, quantile: float = 0.5, num_draws: int = 256, seed: int = 0
            ) -> KeepsetResult:
    """The keep-set at one target size (give exactly one of ``size``, ``params``, ``layers``, ``flops``).

    ``posterior`` is a :class:`~ppn_bayes.bayes.posterior.Posterior`, a :class:`~ppn_bayes.run.Run` or a run
    directory. ``quantile`` ranks units by that posterior quantile of their exit price (0.5 median;
    lower is risk-averse). Raises :class:`~ppn_bayes.errors.SizeError` for sizes that cannot be met.
    """
    return KeepsetSolver(posterior, num_draws, seed).solve(size, params, layers, flops, quantile)


def keepsets(posterior, sizes: list[float], quantile: float = 0.5, num_draws: int = 256, seed: int = 0,
             currency: str = "size") -> list[KeepsetResult]:
    """Keep-sets at several sizes (``currency``: size, params, layers or flops), nested by construction."""
    solver = KeepsetSolver(posterior, num_draws, seed)
    return [solver.solve(**{currency: s}, quantile=quantile) for s in sizes]


def inclusion(posterior, size: float | None = None, params: float | None = None, layers: int | None = None,
              flops: float | None = None, quantile: float = 0.5, num_draws: int = 256, seed: int = 0
              ) -> dict[str, torch.Tensor]:
    """Per-unit inclusion probabilities pi at a size: ``{kind: [L] | [L, H] | [L, G]}``."""
    return keepset(posterior, size, params, layers, flops, quantile, num_draws, seed).inclusion
