"""Statistics that check whether probabilistic keep decisions mean what they say.

A forecaster states ``p_i`` = P(event ``i``) and the world answers ``y_i`` in {0, 1}. Two events are
scored by the benchmarks of issue 12: "another fit of the same recipe keeps unit u at this size"
(``benchmarks/calibration_refits.py``, ``p`` = the inclusion probability pi a run reports) and "swapping
kept unit u for dropped unit v lowers the held-out loss" (``benchmarks/calibration_swaps.py``).

* **Brier score** ``B = mean_i (p_i - y_i)^2`` (0 perfect; a proper scoring rule, so it cannot be
  gamed by hedging).
* **Uninformed forecast**: every forecast at a base rate ``b_i`` that needs no posterior (for keep
  decisions, the kept fraction of units of that kind at that size: a forecaster that knows only how
  many units are kept). Its Brier score ``B_0`` is the bar; **Brier skill** ``1 - B / B_0`` is > 0 only
  when the posterior knows more than the count (1 perfect; negative: worse than knowing nothing).
* **Reliability curve and ECE**: forecasts in ``bins`` equal-width bins on [0, 1] (right-closed, the
  first bin also holds 0: :func:`ppn_bayes.analysis.uncertainty.reliability`'s rule), each bin's mean forecast
  against its observed frequency and count; the expected calibration error is
  ``sum_b (n_b / n) |freq_b - mean forecast_b|``. Default 10 bins: with a few hundred forecasts a bin
  holds tens of them, and the goal of issue 12 (ECE <= 0.1) is the width of one bin.
* **Confident forecasts contradicted**: among forecasts with ``p < 0.05`` or ``p > 0.95``, the share
  whose outcome went the other way. A calibrated forecaster contradicts at most ~5 % of them; a
  posterior that is sure where refits disagree contradicts many more.
* **Jaccard overlap** ``|A & B| / |A | B|`` of keep-sets, and its mean over all pairs of refits.

Everything here takes plain tensors (or lists) and returns floats and dicts, so the benchmarks and
their tests share one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ppn_bayes.analysis.uncertainty import reliability

BINS = 10
CONFIDENT = 0.05  # a forecast below this or above 1 - this is "confident"


def _as_pair(p: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} forecasts but {y.numel()} outcomes; give one outcome per forecast")
    if p.numel() == 0:
        raise ValueError("no forecasts to score")
    if bool(((p < 0) | (p > 1)).any()) or bool(((y != 0) & (y != 1)).any()):
        raise ValueError("forecasts must be probabilities in [0, 1] and outcomes 0 or 1")
    return p, y


def brier(p: Any, y: Any) -> float:
    """``mean (p - y)^2``."""
    p, y = _as_pair(p, y)
    return float(((p - y) ** 2).mean())


def brier_skill(p: Any, y: Any, base: Any) -> dict[str, float]:
    """Brier score of ``p``, of the uninformed forecast ``base`` (a float or one per forecast), and the
    skill ``1 - B / B_0`` (``nan`` when ``B_0 = 0``: the outcomes were all predictable from the count)."""
    p, y = _as_pair(p, y)
    b0 = torch.as_tensor(base, dtype=torch.float64).expand_as(p)
    score, ref = brier(p, y), brier(b0, y)
    return {"brier": score, "brier_uninformed": ref, "brier_skill": 1.0 - score / ref if ref > 0 else float("nan")}


def reliability_curve(p: Any, y: Any, bins: int = BINS) -> list[dict[str, float]]:
    """Per bin: ``lo``, ``hi``, ``count``, ``mean_forecast``, ``observed`` (``nan`` for an empty bin)."""
    p, y = _as_pair(p, y)
    return [{"lo": r["lo"], "hi": r["hi"], "count": r["count"], "mean_forecast": r["confidence"],
             "observed": r["accuracy"]} for r in reliability(p, y, bins)]


def ece(p: Any, y: Any, bins: int = BINS) -> float:
    """Expected calibration error over :func:`reliability_curve`'s bins."""
    curve = reliability_curve(p, y, bins)
    n = sum(r["count"] for r in curve)
    return sum(r["count"] / n * abs(r["observed"] - r["mean_forecast"]) for r in curve if r["count"])


def max_bin_gap(curve: Sequence[dict[str, float]], min_count: int = 10) -> float | None:
    """Largest ``|observed - mean forecast|`` over bins holding at least ``min_count`` forecasts
    (issue 12's swap goal: within 0.1 of the diagonal in every such bin); ``None`` when no bin has that many."""
    gaps = [abs(r["observed"] - r["mean_forecast"]) for r in curve if r["count"] >= min_count]
    return max(gaps) if gaps else None


def confident_contradicted(p: Any, y: Any, eps: float = CONFIDENT) -> dict[str, float]:
    """``{"confident": n, "contradicted": fraction}`` of forecasts ``p < eps`` with ``y = 1`` or
    ``p > 1 - eps`` with ``y = 0`` among the confident ones (``nan`` when there are none)."""
    p, y = _as_pair(p, y)
    lo, hi = p < eps, p > 1 - eps
    n = int((lo | hi).sum())
    wrong = int((lo & (y == 1)).sum() + (hi & (y == 0)).sum())
    return {"confident": n, "contradicted": wrong / n if n else float("nan")}


def jaccard(a: Any, b: Any) -> float:
    """``|A & B| / |A | B|`` of two boolean membership vectors (1 for two empty sets)."""
    a, b = torch.as_tensor(a).bool().flatten(), torch.as_tensor(b).bool().flatten()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def mean_pairwise_jaccard(sets: Sequence[Any]) -> float:
    """Mean Jaccard overlap over all unordered pairs of keep-sets (``nan`` for fewer than two)."""
    vals = [jaccard(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    return sum(vals) / len(vals) if vals else float("nan")


def score_forecasts(p: Any, y: Any, base: Any, bins: int = BINS) -> dict[str, Any]:
    """Every statistic above for one set of forecasts: Brier (+ uninformed, skill), ECE, the curve,
    confident forecasts contradicted, and the number of forecasts."""
    p, y = _as_pair(p, y)
    return {"n": int(p.numel()), **brier_skill(p, y, base), "ece": ece(p, y, bins), "bins": bins,
            **confident_contradicted(p, y), "curve": reliability_curve(p, y, bins)}
