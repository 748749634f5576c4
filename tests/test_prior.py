"""The score prior's samples match the analytic law of every level (issue 3, "Prior").

Each check compares an empirical quantity with its analytic value. Tolerances come from the Monte
Carlo standard error (SE) of that quantity and are set at 4.5 SE, so a correct prior fails a single
check with probability < 1e-5 while a wrong scale (say 10 % off) moves the statistic by many SEs:

* the empirical CDF at an analytic quantile q has SE sqrt(q (1 - q) / n);
* a sample mean of N(0, s^2) draws has SE s / sqrt(n); a sample sd has SE ~ s / sqrt(2 n).

The law checks use ``centre: false`` (the hierarchy's sample sites as written); the centred form the
``ours`` preset uses is a deterministic map of the same sites, checked exactly by
``test_centred_offsets_are_the_centred_map_of_the_same_sites``.

Seeds are fixed, so the draws (and the test outcome) are the same on every run.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from scipy import stats

from ppn_bayes.backbone.units import Dims, UnitInventory
from ppn_bayes.bayes.prior import ScorePrior, centred_log_norms
from ppn_bayes.config import PriorConfig

L, H, G = 8, 4, 4
K_SE = 4.5  # tolerance in Monte-Carlo standard errors


def _inventory(kinds=("layers", "heads", "groups")) -> UnitInventory:
    dims = Dims(num_layers=L, num_heads=H, num_kv_heads=H, head_dim=4, hidden=16, intermediate=32, mlp_matrices=3)
    return UnitInventory(dims, group_size=8, kinds=kinds)


def _norms() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"layers": torch.rand(L, generator=gen) + 0.5, "heads": torch.rand(L, H, generator=gen) + 0.5,
            "groups": torch.rand(L, G, generator=gen) + 0.5}


def _prior(cfg: PriorConfig, kinds=("layers", "heads", "groups")) -> ScorePrior:
    prior = ScorePrior(_inventory(kinds), _norms(), cfg)
    with torch.no_grad():  # non-zero levels, so a test would see a level that was dropped or doubled
        prior.level.copy_(torch.tensor([0.7, -0.3, 1.1][: len(prior.kinds)]))
    return prior


def _draw(prior, n: int, seed: int, data: dict | None = None) -> dict[str, np.ndarray]:
    """``n`` sequential prior traces (the prior is not vectorized); every site stacked on axis 0."""
    pyro.set_rng_seed(seed)
    model = prior if data is None else pyro.poutine.condition(prior, data=data)
    out: dict[str, list] = {}
    with torch.no_grad():
        for _ in range(n):
            tr = pyro.poutine.trace(model).get_trace()
            for name, site in tr.nodes.items():
                if site["type"] == "sample" and not site_is_subsample(site):
                    out.setdefault(name, []).append(site["value"].double().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


def _offsets(prior: ScorePrior, draws: dict, kind: str) -> np.ndarray:
    """delta = score - level - z (the latent offset the prior adds to the norm anchor)."""
    level = float(prior.level.detach()[prior.kinds.index(kind)])
    return draws[f"score_{kind}"] - level - getattr(prior, f"z_{kind}").double().numpy()


def _assert_cdf(samples: np.ndarray, quantile: float, q: float) -> None:
    """P(X <= quantile) is q, within K_SE standard errors of the empirical CDF."""
    x = np.asarray(samples).ravel()
    se = math.sqrt(q * (1 - q) / x.size)
    assert abs((x <= quantile).mean() - q) < K_SE * se, (q, (x <= quantile).mean(), se)


def _assert_std_normal(e: np.ndarray) -> None:
    x = np.asarray(e).ravel()
    n = x.size
    assert abs(x.mean()) < K_SE / math.sqrt(n)
    assert abs(x.std() - 1.0) < K_SE / math.sqrt(2 * n)


@pytest.fixture(scope="module")
def hs():
    cfg = PriorConfig(kind="horseshoe", global_scale=0.3, slab_scale=2.0, slab_df=4.0, child_scale=0.5, centre=False)
    prior = _prior(cfg)
    return prior, cfg, _draw(prior, 3000, seed=0)


@pytest.fixture(scope="module")
def normal():
    cfg = PriorConfig(kind="normal", global_scale=0.4, child_scale=0.25, centre=False)
    prior = _prior(cfg)
    return prior, cfg, _draw(prior, 3000, seed=1)


# ------------------------------------------------------------------ horseshoe levels
def test_tau0_is_halfcauchy(hs):
    """tau0 ~ HalfCauchy(s): median s, 90 % quantile s * tan(0.45 pi)."""
    _, cfg, d = hs
    s = cfg.global_scale
    _assert_cdf(d["tau0"], s, 0.5)
    _assert_cdf(d["tau0"], s * math.tan(0.45 * math.pi), 0.9)
    _assert_cdf(d["tau0"], s * math.tan(0.05 * math.pi), 0.1)


def test_local_scales_are_halfcauchy_one(hs):
    _, _, d = hs
    assert d["lam_layers"].shape == (3000, L)
    _assert_cdf(d["lam_layers"], 1.0, 0.5)
    _assert_cdf(d["lam_layers"], math.tan(0.45 * math.pi), 0.9)


def test_slab_is_inverse_gamma(hs):
    """caux ~ InvGamma(nu / 2, nu / 2): compare the CDF at its 10/50/90 % quantiles (scipy)."""
    _, cfg, d = hs
    ig = stats.invgamma(a=cfg.slab_df / 2, scale=cfg.slab_df / 2)
    for q in (0.1, 0.5, 0.9):
        _assert_cdf(d["caux"], ig.ppf(q), q)


def test_layer_offsets_follow_regularized_horseshoe(hs):
    """delta_l = tau0 * lamt_l * e_l with lamt from Piironen & Vehtari (2017, C.1), e_l ~ N(0, 1),
    and the slab caps the effective scale: tau0 * lamt_l < c = slab_scale * sqrt(caux)."""
    prior, cfg, d = hs
    delta = _offsets(prior, d, "layers")
    tau0, caux, lam = d["tau0"][:, None], d["caux"][:, None], d["lam_layers"]
    c2 = cfg.slab_scale**2 * caux
    scale = tau0 * np.sqrt(c2 * lam**2 / (c2 + tau0**2 * lam**2))
    e = d["e_layers"]
    np.testing.assert_allclose(delta, scale * e, rtol=1e-4, atol=1e-6)  # float32 scores
    assert np.all(scale <= np.sqrt(c2) * (1 + 1e-9))
    assert np.all(scale <= tau0 * lam * (1 + 1e-9))  # the slab only ever shrinks the horseshoe scale
    _assert_std_normal(e)


def test_children_pool_around_their_layer(hs):
    """delta_lh = delta_l + sig_l^h e_lh, sig ~ HalfNormal(child_scale) (median 0.6745 * s)."""
    prior, cfg, d = hs
    delta_l = _offsets(prior, d, "layers")
    for kind, width in (("heads", H), ("groups", G)):
        child = _offsets(prior, d, kind)
        sig = d[f"sig_{kind}"]
        assert child.shape == (3000, L, width)
        _assert_cdf(sig, cfg.child_scale * stats.halfnorm.ppf(0.5), 0.5)
        _assert_cdf(sig, cfg.child_scale * stats.halfnorm.ppf(0.9), 0.9)
        recon = delta_l[..., None] + sig[..., None] * d[f"e_{kind}"]
        # scores are float32: compare at float32 resolution of the score, not of the small offset
        np.testing.assert_allclose(child, recon, rtol=0, atol=1e-6 * (1 + np.abs(d[f"score_{kind}"]).max()) * 8)
        _assert_std_normal(d[f"e_{kind}"])


def test_layer_offset_given_scales_is_normal_with_capped_sd():
    """Conditioned on (tau0, caux, lam), delta_l ~ N(0, tau0 * lamt_l): sample sd matches the hand
    value for every layer, including a huge lam whose sd is capped at c by the slab."""
    cfg = PriorConfig(kind="horseshoe", global_scale=0.3, slab_scale=2.0, slab_df=4.0, centre=False)
    prior = _prior(cfg, kinds=("layers",))
    tau0, caux = 0.3, 1.5
    lam = torch.tensor([0.05, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0, 1e4])
    n = 2000
    d = _draw(prior, n, seed=2, data={"tau0": torch.tensor(tau0), "caux": torch.tensor(caux), "lam_layers": lam})
    delta = _offsets(prior, d, "layers")
    c2 = cfg.slab_scale**2 * caux
    sd = tau0 * torch.sqrt(c2 * lam**2 / (c2 + tau0**2 * lam**2)).double().numpy()
    assert sd[-1] == pytest.approx(math.sqrt(c2), rel=1e-3)  # the slab's cap (hand check of the formula)
    emp = delta.std(axis=0)
    np.testing.assert_allclose(emp, sd, rtol=K_SE / math.sqrt(2 * n))
    assert np.all(np.abs(delta.mean(axis=0)) < K_SE * sd / math.sqrt(n))


def test_children_given_parent_are_normal_with_sig_sd():
    cfg = PriorConfig(kind="normal", global_scale=0.4, child_scale=0.5, centre=False)
    prior = _prior(cfg, kinds=("layers", "heads"))
    e_l = torch.linspace(-1.5, 1.5, L)
    sig = torch.linspace(0.1, 1.0, L)
    n = 2000
    d = _draw(prior, n, seed=3, data={"global_scale": torch.tensor(0.4), "e_layers": e_l, "sig_heads": sig})
    child = _offsets(prior, d, "heads")  # [n, L, H]
    parent = (0.4 * e_l).double().numpy()
    m = child.mean(axis=(0, 2))
    s = child.std(axis=(0, 2))
    se_m = sig.double().numpy() / math.sqrt(n * H)
    np.testing.assert_array_less(np.abs(m - parent), K_SE * se_m)
    np.testing.assert_allclose(s, sig.double().numpy(), rtol=K_SE / math.sqrt(2 * n * H))


# ------------------------------------------------------------------ normal and none
def test_normal_hierarchy(normal):
    """kind normal: s ~ HalfNormal(global_scale), delta_l = s * e_l."""
    prior, cfg, d = normal
    assert "tau0" not in d and "lam_layers" not in d
    _assert_cdf(d["global_scale"], cfg.global_scale * stats.halfnorm.ppf(0.5), 0.5)
    _assert_cdf(d["global_scale"], cfg.global_scale * stats.halfnorm.ppf(0.9), 0.9)
    np.testing.assert_allclose(_offsets(prior, d, "layers"), d["global_scale"][:, None] * d["e_layers"],
                               rtol=1e-4, atol=1e-6)
    _assert_std_normal(d["e_layers"])
    # heads: marginal variance s^2 + sig^2 integrates to global^2 + child^2 (both HalfNormal: E[x^2] = scale^2)
    heads = _offsets(prior, d, "heads")
    n = heads.shape[0]
    var = cfg.global_scale**2 + cfg.child_scale**2
    # second moment of a scale mixture: SE estimated from the draws themselves
    m2 = (heads**2).mean(axis=(1, 2))
    assert abs(m2.mean() - var) < K_SE * m2.std() / math.sqrt(n)


def test_latent_names_match_trace(hs, normal):
    for prior, _, d in (hs, normal):
        names = prior.latent_names()
        assert set(names) == {k for k in d if not k.startswith("score_")}


def test_none_has_no_latents_and_scores_are_level_plus_centred_log_norms():
    prior = _prior(PriorConfig(kind="none"))
    assert prior.latent_names() == []
    tr = pyro.poutine.trace(prior).get_trace()
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert latent == []
    z = centred_log_norms(_norms())
    for i, kind in enumerate(prior.kinds):
        expect = float(prior.level.detach()[i]) + z[kind]
        torch.testing.assert_close(tr.nodes[f"score_{kind}"]["value"], expect)
        assert abs(float(z[kind].mean())) < 1e-6  # centred per kind


def test_centred_offsets_are_the_centred_map_of_the_same_sites():
    """centre: true (the default) changes no sample site; the scores are the uncentred offsets with the
    layer mean removed, and each layer's child deviations with their within-layer mean removed. So the
    layer offsets sum to 0 and a layer's heads (groups) average to its offset. Exact up to float32."""
    raw = _prior(PriorConfig(kind="horseshoe", global_scale=0.3, centre=False))
    cen = _prior(PriorConfig(kind="horseshoe", global_scale=0.3))
    assert PriorConfig().centre is True
    dr, dc = _draw(raw, 50, seed=4), _draw(cen, 50, seed=4)
    for name in raw.latent_names():
        np.testing.assert_array_equal(dr[name], dc[name])  # same sites, same draws
    lay_r, lay_c = _offsets(raw, dr, "layers"), _offsets(cen, dc, "layers")
    np.testing.assert_allclose(lay_c, lay_r - lay_r.mean(1, keepdims=True), atol=2e-6)
    assert np.abs(lay_c.sum(1)).max() < 1e-5
    for kind in ("heads", "groups"):
        ch_r, ch_c = _offsets(raw, dr, kind), _offsets(cen, dc, kind)
        dev = ch_r - lay_r[..., None]
        expect = lay_c[..., None] + dev - dev.mean(-1, keepdims=True)
        np.testing.assert_allclose(ch_c, expect, atol=5e-6)
        np.testing.assert_allclose(ch_c.mean(-1), lay_c, atol=5e-6)
