"""Posterior -> lambda* -> nested keep-sets, with inclusion probabilities (the "posterior to mask" step).

Reads only the run's small posterior files (:class:`~ppn_bayes.bayes.posterior.Posterior`), never the model.

The steps live in their own modules: :mod:`~ppn_bayes.bayes.unit_table` (the target and every
unit's exact cost), :mod:`~ppn_bayes.bayes.lambda_star` (the price that meets it in expectation) and
:mod:`~ppn_bayes.bayes.exit_order` (why keep-sets nest: one priority order of exit prices, filled to
the budget). This module ties them together in :class:`KeepsetSolver`: one set of joint posterior
draws, hence one order per quantile and nested keep-sets at every size, each with its inclusion
probabilities (the share of draws whose own keep-set, filled by the same rule, keeps the unit) and the
units whose decision is uncertain. See ``docs/keepsets.md`` for the quantile property.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.bayes.exit_order import drop_empty_layers, exit_coordinates, fill, quantile_rows, unit_order
from ppn_bayes.bayes.lambda_star import solve_lambda
from ppn_bayes.bayes.posterior import Posterior
from ppn_bayes.bayes.unit_table import KIND_ORDER, Target, UnitTable, parse_target
from ppn_bayes.config import check_seed
from ppn_bayes.errors import ConfigError, SizeError

CHUNK = 64  # posterior draws filled at once (bounds memory for neuron-level inventories)
MAX_DRAWS = 100_000  # posterior draws held at once: draws x units float32 scores (1e5 x 1e3 units = 400 MB)


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
        order = unit_order(self.table, keys.unsqueeze(0), currency)[0]
        for n in range(1, N + 1):
            keep = torch.zeros(1, N, dtype=torch.bool)
            keep[0, order[:n]] = True
            if drop_empty_layers(self.table, keep).any():
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
