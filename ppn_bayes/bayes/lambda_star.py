"""lambda*: the price at which the push's expected kept cost meets a target.

**lambda\\*.** The push's expected kept cost ``E_posterior[sum_u cost_u * rho_u(lambda)]`` (nested
``rho``) falls monotonically as the price grows (thresholds are non-decreasing in lambda), so
``lambda*`` is found by bisection on ``x = lambda / (1 + lambda)`` in ``[0, 1]``.
"""

from __future__ import annotations

import torch

from ppn_bayes.bayes.unit_table import Target, UnitTable

X_MAX = 1.0 - 1e-9  # largest price the bisection reports: lambda ~ 1e9, beyond any trained price


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
