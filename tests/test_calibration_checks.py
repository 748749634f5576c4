"""Calibration statistics (ppn_bayes.analysis.calibration_checks) on constructed inputs with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from ppn_bayes.analysis import calibration_checks as cc

# Four forecasts, worked by hand: p = 0, 0.2, 0.8, 1 against outcomes 0, 1, 1, 1.
P = [0.0, 0.2, 0.8, 1.0]
Y = [0, 1, 1, 1]


def test_brier_and_skill_by_hand():
    assert cc.brier(P, Y) == pytest.approx((0 + 0.64 + 0.04 + 0) / 4)  # 0.17
    s = cc.brier_skill(P, Y, 0.75)  # uninformed: every forecast at the base rate 3/4
    assert s["brier_uninformed"] == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4)  # 0.1875
    assert s["brier_skill"] == pytest.approx(1 - 0.17 / 0.1875)
    assert math.isnan(cc.brier_skill([1, 0], [1, 0], [1, 0])["brier_skill"])  # B_0 = 0: skill undefined


def test_reliability_and_ece_by_hand():
    curve = cc.reliability_curve(P, Y, bins=10)
    assert [r["count"] for r in curve] == [1, 1, 0, 0, 0, 0, 0, 1, 0, 1]  # 0 -> bin 0, 0.2 -> (0.1, 0.2], ...
    assert curve[1]["mean_forecast"] == pytest.approx(0.2) and curve[1]["observed"] == 1.0
    assert math.isnan(curve[2]["observed"])
    assert cc.ece(P, Y, bins=10) == pytest.approx((0.8 + 0.2) / 4)  # 0.25
    assert cc.max_bin_gap(curve, min_count=1) == pytest.approx(0.8)
    assert cc.max_bin_gap(curve, min_count=2) is None


def test_confident_contradicted_by_hand():
    out = cc.confident_contradicted([0.0, 0.01, 0.5, 0.97, 0.99], [0, 1, 1, 0, 1])
    assert out == {"confident": 4, "contradicted": 0.5}  # 0.01 -> 1 and 0.97 -> 0 went the other way
    assert math.isnan(cc.confident_contradicted([0.5], [1])["contradicted"])


def test_jaccard_by_hand():
    a, b, c = [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]
    assert cc.jaccard(a, b) == pytest.approx(1 / 3)
    assert cc.jaccard([0, 0], [0, 0]) == 1.0
    assert cc.mean_pairwise_jaccard([a, b, c]) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outcomes"):
        cc.brier([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="probabilities"):
        cc.brier([1.5], [1])


def test_ece_bound_has_power():
    """A calibrated forecaster passes issue 12's bound (ECE <= 0.1, positive skill); an overconfident one
    (logits x 4, the posterior-too-narrow failure) fails it. n = 4000: each of 10 bins holds ~400
    forecasts, so a calibrated bin's frequency is off by ~0.025 (binomial sd), far inside 0.1."""
    g = torch.Generator().manual_seed(0)
    q = torch.rand(4000, generator=g, dtype=torch.float64)
    y = torch.bernoulli(q, generator=g)
    good = cc.score_forecasts(q, y, base=float(y.mean()))
    assert good["ece"] < 0.05 and good["brier_skill"] > 0.2
    sure = torch.sigmoid(4 * torch.logit(q))
    bad = cc.score_forecasts(sure, y, base=float(y.mean()))
    assert bad["ece"] > 0.1, bad["ece"]  # the bound catches it
    assert bad["contradicted"] > 0.05 and bad["brier"] > good["brier"]
