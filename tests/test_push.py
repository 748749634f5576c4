"""The push: splines, lambda draws, straight-through masks, expected size, amplitudes (issue 3, "Push")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from scipy.interpolate import BSpline

from ppn_bayes.backbone.units import Dims, UnitInventory
from ppn_bayes.bayes.push import (
    MonotoneSpline,
    Push,
    _clamped_knots,
    bspline_basis,
    draw_lambda,
    straight_through_bernoulli,
)
from ppn_bayes.config import PushConfig

K_SE = 4.5  # Monte-Carlo tolerances in standard errors (a correct implementation fails w.p. < 1e-5)


def _inv(L=2, H=2, kv=2, G=2, kinds=("layers", "heads", "groups")) -> UnitInventory:
    dims = Dims(num_layers=L, num_heads=H, num_kv_heads=kv, head_dim=4, hidden=8, intermediate=4 * G,
                mlp_matrices=3, layer_extra_params=16)
    return UnitInventory(dims, group_size=4, kinds=kinds)


# ------------------------------------------------------------------ splines
@pytest.mark.parametrize("n_ctrl", [4, 5, 7, 10])
def test_bspline_basis_matches_scipy(n_ctrl):
    """Every basis function equals scipy's BSpline on the same clamped knots, x = 1 included."""
    t = _clamped_knots(n_ctrl).numpy()
    x = np.linspace(0.0, 1.0, 201)
    ours = bspline_basis(torch.from_numpy(x), n_ctrl).numpy()
    ref = np.stack([BSpline(t, np.eye(n_ctrl)[j], 3, extrapolate=False)(x) for j in range(n_ctrl)], -1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)  # float64 both: rounding only
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-12)  # partition of unity


@settings(max_examples=60, deadline=None)
@given(theta=arrays(np.float64, (3, 9), elements=st.floats(-30, 30)),
       start=st.floats(-5, 5))
def test_spline_monotone_and_starts_at_start(theta, start):
    """For any theta the curve is non-decreasing on [0, 1] and f(0) is exactly the fixed start."""
    spline = MonotoneSpline(3, 10, start=start, end=start + 1.0)
    with torch.no_grad():
        spline.theta.copy_(torch.from_numpy(theta))
        x = torch.linspace(0, 1, 257, dtype=torch.float64)
        f = spline(x)  # [257, 3]
        f0 = spline(torch.zeros(()))
    scale = 1.0 + float(f.abs().max())
    assert torch.all(f.diff(dim=0) >= -1e-6 * scale)  # float32 control points: rounding only
    assert torch.all(f0 == torch.tensor(start, dtype=torch.float32))


def test_thresholds_at_zero_are_minus_one_over_t():
    inv = _inv()
    push = Push(inv, PushConfig(temperature=0.5))
    torch.manual_seed(0)
    with torch.no_grad():
        push.thresholds_spline.theta.normal_(0, 3)
    for kind, tau in push.thresholds(0.0).items():
        assert torch.all(tau == -2.0), kind
    tau_big = push.thresholds(50.0)
    assert all(torch.all(tau_big[k] > -2.0) for k in tau_big)


def _scores(inv: UnitInventory, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layers": (inv.num_layers,), "heads": (inv.num_layers, inv.num_heads),
              "groups": (inv.num_layers, inv.num_groups)}
    return {k: torch.randn(shapes[k], generator=gen) for k in inv.kinds}


@pytest.mark.parametrize("kinds", [("layers",), ("heads", "groups"), ("layers", "heads", "groups")])
def test_size_curve_init_hits_the_target_size_at_every_price(kinds):
    """After calibration the expected kept fraction (nesting included) follows 1 / (1 + rate * lambda).

    Tolerance 0.04 for lambda in (0, 10]: the thresholds are a least-squares spline fit to the exact
    per-price solution, and a 4-layer inventory's size is a steep function of the threshold.
    """
    inv = _inv(L=4, H=4, kv=4, G=4, kinds=kinds)
    cfg = PushConfig(rate=0.3, temperature=0.5)
    push = Push(inv, cfg)
    scores = _scores(inv, seed=len(kinds))
    push.calibrate_thresholds(scores)
    for lam in (0.1, 0.5, 1.0, 3.0, 10.0):
        size = float(push.expected_size(push.inclusion(scores, lam)))
        assert size == pytest.approx(1.0 / (1.0 + 0.3 * lam), abs=0.04), (lam, size)
    ctrl = push.thresholds_spline.control_points()
    assert torch.all(ctrl[:, 0] == -2.0) and torch.all(ctrl.diff(dim=-1) > 0)


def test_size_curve_init_half_price_moves_the_curve():
    inv = _inv(L=4, kinds=("layers",))
    scores = _scores(inv, seed=0)
    sizes = []
    for half in (1.0, 10.0):
        push = Push(inv, PushConfig(init_half_price=half))
        push.calibrate_thresholds(scores)
        sizes.append(float(push.expected_size(push.inclusion(scores, half))))
    assert sizes == pytest.approx([0.5, 0.5], abs=0.04)


# ------------------------------------------------------------------ lambda
def test_draw_lambda_dense_fraction_and_exponential_tail():
    cfg = PushConfig(rate=0.3, p_dense=1 / 3)
    gen = torch.Generator().manual_seed(0)
    lam = np.array([draw_lambda(cfg, gen) for _ in range(30_000)])
    dense = (lam == 0.0).mean()
    assert abs(dense - 1 / 3) < K_SE * math.sqrt((1 / 3) * (2 / 3) / lam.size)
    tail = lam[lam > 0]
    ks = stats.kstest(tail, stats.expon(scale=1 / cfg.rate).cdf)
    assert ks.pvalue > 1e-3  # fixed seed; a wrong rate (e.g. 1/0.3 vs 0.3) gives p ~ 0
    assert stats.kstest(tail, stats.expon(scale=1 / 0.35).cdf).pvalue < 1e-6  # the test has power


# ------------------------------------------------------------------ masks
def test_straight_through_forward_is_hard_mean_is_rho_gradient_is_one():
    rho = torch.tensor([0.02, 0.3, 0.5, 0.77, 0.99], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    m = straight_through_bernoulli(rho.expand(n, -1), gen)
    assert torch.all((m == 0) | (m == 1))  # exactly 0/1 in the forward pass
    se = torch.sqrt(rho * (1 - rho) / n)
    assert torch.all((m.mean(0) - rho).abs() < K_SE * se)
    w = torch.randn(5, generator=gen)
    (m[0] * w).sum().backward()
    torch.testing.assert_close(rho.grad, w)  # d m / d rho = 1 (straight-through)


def test_masks_nest_to_rho():
    """Sampled masks are drawn from the own probabilities: E[nest(m)] = nested rho; with mask
    'expected' the gates are the own probabilities, so the gate the network applies is nested rho."""
    inv = _inv(L=3, H=2, kv=1, G=3)
    torch.manual_seed(0)
    scores = {"layers": torch.randn(3), "heads": torch.randn(3, 2), "groups": torch.randn(3, 3)}
    push = Push(inv, PushConfig(mask="expected"))
    rho = push.inclusion(scores, 1.5)
    eff = push.nest(push.sample_masks(rho))
    for k in rho:
        torch.testing.assert_close(eff[k], rho[k])
    push_s = Push(inv, PushConfig(mask="sample"))
    gen = torch.Generator().manual_seed(1)
    n = 4000
    mean = {k: torch.zeros_like(v) for k, v in rho.items()}
    for _ in range(n):
        for k, v in push_s.nest(push_s.sample_masks(rho, gen)).items():
            mean[k] += v.detach() / n
    for k in rho:
        se = torch.sqrt(rho[k] * (1 - rho[k]) / n).detach()
        assert torch.all((mean[k] - rho[k].detach()).abs() < K_SE * se + 1e-6), k


# ------------------------------------------------------------------ expected size
def _exact_expected_fraction(inv: UnitInventory, own: dict[str, torch.Tensor], currency="flops") -> float:
    """E[kept_cost(m)] / total over independent own-probability masks, by enumerating every mask."""
    names = [(k, idx) for k in inv.kinds for idx in np.ndindex(*own[k].shape)]
    probs = [float(own[k][idx]) for k, idx in names]
    total = inv.total_cost(currency)
    out = 0.0
    for bits in itertools.product((0, 1), repeat=len(names)):
        p = math.prod(q if b else 1 - q for q, b in zip(probs, bits))
        if p == 0.0:
            continue
        masks = {k: torch.zeros(own[k].shape) for k in inv.kinds}
        for (k, idx), b in zip(names, bits):
            masks[k][idx] = b
        out += p * inv.kept_cost(inv.keepset_from_masks(masks), currency) / total
    return out


def _own(inv: UnitInventory, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layers": (inv.num_layers,), "heads": (inv.num_layers, inv.num_heads),
              "groups": (inv.num_layers, inv.num_groups)}
    return {k: torch.rand(shapes[k], generator=gen, dtype=torch.float64) for k in inv.kinds}


@pytest.mark.parametrize("kinds", [("layers",), ("heads",), ("layers", "heads"), ("layers", "groups"),
                                   ("layers", "heads", "groups")])
def test_expected_size_equals_exact_expected_kept_fraction(kinds):
    """Without GQA the linear per-unit costs are exact, so rho_bar = E[kept_cost] / total (1024 masks)."""
    inv = _inv(L=2, H=2, kv=2, G=2, kinds=kinds)
    push = Push(inv, PushConfig())
    own = _own(inv, seed=len(kinds))
    rho = push.nest({k: v.float() for k, v in own.items()})
    assert float(push.expected_size(rho)) == pytest.approx(_exact_expected_fraction(inv, own), abs=1e-6)


def test_expected_size_hand_computed():
    """Two equal layers, rho = (0.25, 1): expected fraction (0.25 + 1) / 2."""
    inv = _inv(L=2, kinds=("layers",))
    push = Push(inv, PushConfig())
    assert float(push.expected_size({"layers": torch.tensor([0.25, 1.0])})) == pytest.approx(0.625, abs=1e-7)
    assert float(push.expected_size({"layers": torch.ones(2)})) == pytest.approx(1.0, abs=1e-6)


def test_expected_size_under_gqa_is_exact_for_whole_groups_and_a_lower_bound_otherwise():
    """Under GQA the model splits a KV head's cost among its query heads: exact when a KV group's
    heads go together, and below the exact expectation (which charges K/V once if any head stays)."""
    inv = _inv(L=2, H=4, kv=2, G=2, kinds=("heads",))
    push = Push(inv, PushConfig())
    whole = {"heads": torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)}
    assert float(push.expected_size({"heads": whole["heads"].float()})) == pytest.approx(
        _exact_expected_fraction(inv, whole), abs=1e-6)
    own = {"heads": torch.tensor([[0.5, 0.5, 0.2, 0.9], [0.1, 0.6, 0.3, 0.3]], dtype=torch.float64)}
    lin = float(push.expected_size({"heads": own["heads"].float()}))
    assert lin < _exact_expected_fraction(inv, own)


# ------------------------------------------------------------------ amplitudes
def test_amplitudes_are_one_on_dense_steps():
    inv = _inv(L=3, H=2, kv=1, G=2)
    push = Push(inv, PushConfig(amplitude=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (push.s_heads, push.s_groups, push.s_attn, push.s_mlp, push.amp_spline.theta):
            p.normal_(0, 2)
    amp = push.amplitudes(0.0)
    for k, v in amp.items():
        assert torch.all(v == 1.0), k
    assert push.gates(None, 0.0) == {}  # dense step: nothing to set
    amp1 = push.amplitudes(2.0)
    assert any(torch.any(v != 1.0) for v in amp1.values())  # and they do act when lambda > 0
