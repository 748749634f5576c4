"""Identifiability of the ``ours`` parameterization (docs/method.md, "Identifiability").

The gates see the model only through the nested inclusion probabilities ``rho_u(lambda)``. A latent
direction is confounded with the point estimates when moving it can be undone, to first order, by
moving the point estimates: its Jacobian column lies in the span of theirs. The check: stack
``rho_u(lambda)`` over every unit and a grid of prices into one vector ``y``; ``J_lat = dy / d e_layers``
(the latent layer sites), ``J_pt = dy / d theta`` over every point-estimated parameter the optimizer
trains outside the language model (the ``push`` group of :func:`ppn_bayes.training.build._param_groups`:
splines, amplitude scales and, where trained, the score levels). The relative least-squares residual
of a latent direction projected on ``col(J_pt)`` is 1 for a direction no point estimate can mimic
and 0 for a confounded one; over all combinations of the latents its minimum is the smallest sine
of the principal angles between the two column spaces.

Price grid: ``lambda`` in [0.2, 8] (x = lambda / (1 + lambda) >= 1/6, where the first B-spline basis
function vanishes: 95 % of the non-dense draws at rate 0.3 lie there). On it the old per-layer
curves absorb a layer offset *exactly*, so the power check's residual is float32 rounding (~1e-6).
"""

from __future__ import annotations

import pyro
import pytest
import torch

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.config import PriorConfig, PushConfig
from ppn_bayes.training.build import _param_groups
from tests.tiny_models import tiny_model

LAMS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


def _model(prior: PriorConfig, push: PushConfig) -> PPNModel:
    hf = tiny_model("llama", seed=0)
    g = gate(hf, group_size=16)  # 3 layers, 6 heads, 4 groups: all three kinds nested
    model = PPNModel(g, prior, push, num_sequences=4, tokens_per_sequence=12)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a generic point: curves off their initial straight lines
        model.push.thresholds_spline.theta.add_(0.3 * torch.randn(model.push.thresholds_spline.theta.shape,
                                                                 generator=gen))
    return model


def _jacobians(model: PPNModel) -> tuple[torch.Tensor, torch.Tensor]:
    prior, push = model.prior, model.push
    pyro.set_rng_seed(0)
    with torch.no_grad():
        tr = pyro.poutine.trace(prior).get_trace()
    fixed = {n: s["value"].detach() for n, s in tr.nodes.items() if n in prior.latent_names()}
    fixed["tau0"] = torch.tensor(1.0)  # layer offsets of order 1: gates well inside (0, 1)
    e_layers = fixed.pop("e_layers").clone().requires_grad_(True)
    point = _param_groups(None, model, torch.nn.Module(), None, {})["push"]
    scores = pyro.poutine.condition(prior, data={**fixed, "e_layers": e_layers})()
    y = torch.cat([torch.cat([r.reshape(-1) for r in push.inclusion(scores, lam).values()]) for lam in LAMS])
    rows_lat, rows_pt = [], []
    for i in range(y.numel()):
        grads = torch.autograd.grad(y[i], [e_layers, *point], retain_graph=True, allow_unused=True)
        rows_lat.append(grads[0].reshape(-1))
        rows_pt.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                  for g, p in zip(grads[1:], point)]))
    return torch.stack(rows_lat).double(), torch.stack(rows_pt).double()


def _principal_sines(j_lat: torch.Tensor, j_pt: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between ``col(j_lat)`` and ``col(j_pt)``, ascending.

    The smallest is the relative least-squares residual of the *best* latent combination projected
    on the point estimates' span (0: some latent direction is absorbed by them). Ranks are numerical
    (singular values above 1e-7 of the largest: the float32 noise floor is ~1e-7 relative), so a
    latent direction that moves no gate (the centred common mode) is not counted.
    """
    def basis(m: torch.Tensor) -> torch.Tensor:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        return u[:, s > 1e-7 * s.max()]

    cos = torch.linalg.svdvals(basis(j_pt).T @ basis(j_lat)).clamp(max=1.0)
    return (1.0 - cos**2).clamp_min(0.0).sqrt().sort().values


def test_layer_offsets_are_not_in_the_span_of_the_point_estimates():
    """``ours`` (shared curves per kind, centred offsets, frozen levels): no combination of the layer
    latents is absorbed by the point estimates. Threshold 0.1 on the smallest principal sine: a
    shared curve moves every layer's gates at once, so it can mimic the part of a contrast that is
    correlated with how sensitive each layer's gates are (observed smallest sine 0.26 on this
    3-layer net), but not the contrast itself; the old parameterization reads ~1e-8."""
    model = _model(PriorConfig(), PushConfig())
    assert model.push.shared and not model.prior.level.requires_grad
    j_lat, j_pt = _jacobians(model)
    assert j_lat.norm(dim=0).min() > 1e-3  # the layer latents do move the gates
    sines = _principal_sines(j_lat, j_pt)
    assert sines.numel() == model.inventory.num_layers - 1  # centring: L - 1 contrasts move the gates
    assert sines.min() > 0.1, sines


def test_power_the_old_per_layer_curves_absorb_every_layer_offset():
    """Power check: the parameterization of runs before the correction (per-layer curves, uncentred
    offsets, trained levels) fails the same test: every latent direction is in the span to rounding."""
    model = _model(PriorConfig(centre=False), PushConfig(thresholds="per_layer"))
    j_lat, j_pt = _jacobians(model)
    assert j_lat.norm(dim=0).min() > 1e-3
    sines = _principal_sines(j_lat, j_pt)
    assert sines.numel() == model.inventory.num_layers
    assert sines.max() < 1e-3, sines


def test_shared_curves_without_centring_leave_only_the_common_mode():
    """Shared curves alone (no centring, trained levels) are confounded in one direction only, the
    mean of the layer offsets (= a shift of every curve): of the L latent directions exactly one is
    absorbed. This is why the offsets are centred."""
    model = _model(PriorConfig(centre=False), PushConfig())
    model.prior.level.requires_grad_(True)  # as a trained level would be
    sines = _principal_sines(*_jacobians(model))
    assert sines.numel() == model.inventory.num_layers
    assert sines[0] < 1e-3 and sines[1] > 0.1, sines


@pytest.mark.parametrize("thresholds", ["shared", "per_layer"])
def test_threshold_values_layout(thresholds):
    """``Push.threshold_values`` is the one place that knows the series layout: per kind and layer the
    value equals the series it should read, for both layouts."""
    model = _model(PriorConfig(kind="none"), PushConfig(thresholds=thresholds))
    push, L = model.push, model.inventory.num_layers
    x = torch.tensor([0.1, 0.5, 0.9])
    vals = push.threshold_values(x)
    raw = push.thresholds_spline(x)
    assert vals.shape == (3, len(push.kinds), L)
    for k in range(len(push.kinds)):
        for l in range(L):
            series = k if thresholds == "shared" else k * L + l
            torch.testing.assert_close(vals[:, k, l], raw[:, series])


def test_old_run_files_load_as_trained_and_a_mismatch_is_one_line(tmp_path):
    """posterior.json of runs before the correction has neither ``push.thresholds`` nor ``prior.centre``:
    such a run loads with per-layer curves and uncentred offsets (what it was trained with), and its
    thresholds come back exactly; a push.safetensors that does not fit posterior.json is a RunError."""
    import json

    from ppn_bayes.bayes.guides import make_guide
    from ppn_bayes.bayes.posterior import Posterior, save_posterior
    from ppn_bayes.config import GuideConfig
    from ppn_bayes.errors import RunError

    prior, push = PriorConfig(centre=False), PushConfig(thresholds="per_layer")
    model = _model(prior, push)
    guide = make_guide(model.prior, GuideConfig())
    save_posterior(tmp_path, model.prior, model.push, guide, prior, push, GuideConfig())
    meta = json.loads((tmp_path / "posterior.json").read_text())
    del meta["push"]["thresholds"], meta["prior"]["centre"]
    (tmp_path / "posterior.json").write_text(json.dumps(meta))
    post = Posterior.from_dir(tmp_path)
    assert not post.push.shared and post.prior.config.centre is False
    for k, v in model.push.thresholds(1.3).items():
        torch.testing.assert_close(post.thresholds(1.3)[k], v.detach())
    meta["push"]["thresholds"] = "shared"
    (tmp_path / "posterior.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="does not match posterior.json"):
        Posterior.from_dir(tmp_path)
