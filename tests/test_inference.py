"""Does the inference find what is there? Recovery of known layer importances, and SVI vs NUTS (issue 3).

The network (tests/synthetic.py) is a real tiny Llama whose six layers contribute with known weights
``w = (1.2, 0, 0.8, 0.1, 0.5, 0.03)`` while their weight norms rank them in exactly the reverse order,
so the norm anchor alone gets every pair wrong and the order must come from the likelihood.
"""

from __future__ import annotations

import arviz as az
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.diagnostics import convergence
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.bayes.nuts_check import fit_svi, layer_score_draws, nuts_check
from ppn_bayes.config import PriorConfig, PushConfig
from tests.synthetic import NUTS_CHECK, RECOVERY, sample_sequences, synthetic_stack

B, T, LAM = 8, 24, 0.5
TRUE_KEEP = [0, 2, 4]  # importance >= 0.5; the others are (near-)identities


@pytest.fixture(scope="module")
def net():
    importance, targets = RECOVERY
    hf = synthetic_stack(importance, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    return g, torch.tensor(importance), sample_sequences(hf, B, T, seed=1)


def _summed_nll(g, ids, layers: torch.Tensor) -> float:
    with torch.no_grad(), g.gates(layers=layers):
        logits = g(input_ids=ids).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def test_synthetic_network_importances_and_norms_disagree(net):
    """The construction does what it says: dropping a layer costs NLL in the order of w, and the
    weight norms order the layers the other way round."""
    g, w, ids = net
    L = len(w)
    full = _summed_nll(g, ids, torch.ones(L))
    drop = torch.tensor([_summed_nll(g, ids, 1 - F.one_hot(torch.tensor(l), L).float()) - full for l in range(L)])
    assert stats.spearmanr(drop, w).statistic == pytest.approx(1.0)
    assert abs(float(drop[1])) < 1e-3  # w = 0: an exact identity block
    assert float(drop[TRUE_KEEP].min()) > 10 * LAM * B * (T - 1) / L  # far above the price of one layer
    assert float(drop[[1, 3, 5]].max()) < LAM * B * (T - 1) / L  # below it
    assert stats.kendalltau(g.unit_norms()["layers"], w).statistic == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def svi_fit(net):
    """Training-like SVI: horseshoe prior, lambda drawn per step, straight-through Bernoulli masks;
    weights, thresholds and levels frozen, so the guide alone has to carry the ranking."""
    g, _, ids = net
    model = PPNModel(g, PriorConfig(), PushConfig(amplitude=False), num_sequences=B, tokens_per_sequence=T)
    model.set_generator(torch.Generator().manual_seed(0))
    guide = fit_svi(model, (ids,), {}, steps=400, lr=0.05, seed=0, num_particles=1)
    return model, layer_score_draws(model, guide=guide, num_samples=1000)


def test_svi_ranks_layers_in_true_order(svi_fit, net):
    """Kendall tau of posterior-mean scores vs importance >= 0.7 (at most 2 of 15 pairs swapped:
    the three near-identity layers differ by < 5 nats on this batch); the norm anchor alone scores -1.
    Observed: 1.0."""
    model, scores = svi_fit
    _, w, _ = net
    tau = stats.kendalltau(scores.mean(0), w).statistic
    assert tau >= 0.7, (scores.mean(0), tau)
    assert stats.kendalltau(model.prior.z_layers, w).statistic == pytest.approx(-1.0)


def test_posterior_mass_on_the_right_keepset(svi_fit):
    """Joint posterior draws (not marginals): the size-1/2 keep-set (top 3 scores) is {0, 2, 4} in
    >= 90 % of draws, and the keep-set at the price LAM (units with a_l > tau_l(LAM)) is exactly
    {0, 2, 4} in >= 75 %. Observed: about 99.8 % and 89 %."""
    model, scores = svi_fit
    top3 = scores.argsort(1, descending=True)[:, :3].sort(1).values
    assert (top3 == torch.tensor(TRUE_KEEP)).all(1).float().mean() >= 0.9
    tau = model.push.thresholds(LAM)["layers"].detach()
    truth = torch.zeros(scores.shape[1], dtype=torch.bool)
    truth[TRUE_KEEP] = True
    assert ((scores > tau) == truth).all(1).float().mean() >= 0.75


@pytest.mark.slow
def test_svi_agrees_with_nuts():
    """Frozen 4-layer network, layer gates only, normal prior, expected masks, LAM fixed, one batch.

    Two NUTS chains (100 warmup + 100 draws each) vs mean-field SVI (600 steps). Tolerances:
    rank correlation of the means >= 0.8 (four layers: one adjacent swap allowed); |mean gap| <= 0.6
    on the logit scale (the NUTS means' own Monte-Carlo error is sd / sqrt(ESS) ~ 1.5 / sqrt(50) ~ 0.2,
    and mean-field moves the means of a correlated posterior a little); R-hat <= 1.1 and bulk ESS >= 20
    for each identified quantity (scores, global scale, contrasts of the offsets; see below);
    divergences <= 5 % of draws. Posterior sds: SVI/NUTS ratio per layer in [0.5, 1.5].
    Why that band: mean-field under-disperses a correlated posterior (tolerated down to half the
    NUTS width); on the wide side, the centred offsets (prior.centre) leave one direction of the
    e's that moves no score, which a factorized q cannot decouple from the contrasts: for a Gaussian
    posterior it widens every contrast's sd by sqrt(L / (L - 1)) = 1.15 at L = 4 (1.02 at L = 30),
    and the NUTS sd has a Monte-Carlo error of about sd / sqrt(2 ESS) ~ 10 % at ESS ~ 50, so
    1.15 * 1.25 ~ 1.45. A guide 2x too narrow or too wide fails. Observed: 0.71-0.92 before the
    identifiability correction, 0.99-1.39 after (the band was set after that observation, with the
    reason above).
    """
    importance, targets = NUTS_CHECK
    hf = synthetic_stack(importance, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    ids = sample_sequences(hf, 4, 16, seed=1)
    res = nuts_check(g, ids, lam=LAM, prior=PriorConfig(kind="normal", global_scale=1.0),
                     num_warmup=100, num_samples=100, chains=2, svi_steps=600, seed=0)
    cmp = res["scores"]
    print({k: cmp[k] for k in ("nuts_mean", "nuts_sd", "svi_mean", "svi_sd", "sd_ratio", "spearman", "max_abs_diff")})
    assert cmp["spearman"] >= 0.8
    assert cmp["max_abs_diff"] <= 0.6
    # Convergence on what the data identify: the scores, the global scale, and the contrasts of the
    # raw offsets (e_l - mean e). The mean of e moves no score (prior.centre), so NUTS explores it on
    # the prior alone and slowly; its R-hat (1.03-1.11 over the four offsets on one machine at 100
    # draws, <= 1.1 on earlier ones: float reordering changes the trajectories) says nothing about
    # the posterior compared here.
    sites = {k: v for k, v in res["sites"].items() if k != "e_layers"}
    post = res["idata"].posterior
    contrasts = (post["e_layers"] - post["e_layers"].mean("layer")).to_dataset(name="e_layers contrasts")
    sites.update(convergence(az.InferenceData(posterior=contrasts)))
    assert set(sites) == {"global_scale", "score_layers", "e_layers contrasts"}, sites
    for site, s in sites.items():
        assert s["rhat"] <= 1.1 and s["ess_bulk"] >= 20, (site, s)
    assert sum(res["divergences"]) <= 0.05 * 2 * 100
    assert all(0.5 <= r <= 1.5 for r in cmp["sd_ratio"]), cmp["sd_ratio"]
    # NUTS itself separates the essential layers (w >= 0.5) from the (near-)identities; their order
    # within the essential pair is not identified: once rho ~ 1 more score buys no likelihood.
    means = torch.tensor(cmp["nuts_mean"])
    assert float(means[[0, 2]].min()) > float(means[[1, 3]].max())


@pytest.mark.slow
def test_recovery_in_the_production_regime_over_seeds():
    """Production regime: thresholds (the shared curve) learned jointly with the guide, likelihood
    scaled to num_sequences = 8 x batch, sampled masks, lambda drawn per step, horseshoe prior, norm
    anchor (which ranks these layers exactly backwards). Three seeds, each with its own data and SVI
    noise. Statistic: Kendall tau of posterior-mean scores vs the true importances. Tolerance: the
    mean over seeds minus 2 standard errors (sd / sqrt(3)) must be >= 0.5, i.e. well above the
    anchor's -1 (the power check: the prior mean alone fails it) and above chance 0. Observed:
    Kendall 1.00, 1.00, 0.73 (SE 0.09); 140 s for the three seeds on one loaded core."""
    importance, targets = RECOVERY
    hf = synthetic_stack(importance, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    w = torch.tensor(importance)
    taus = []
    for seed in range(3):
        ids = sample_sequences(hf, B, T, seed=10 + seed)
        model = PPNModel(g, PriorConfig(), PushConfig(amplitude=False), num_sequences=8 * B, tokens_per_sequence=T)
        model.set_generator(torch.Generator().manual_seed(seed))
        guide = fit_svi(model, (ids,), {}, steps=400, lr=0.05, seed=seed, num_particles=1, lr_push=0.02)
        scores = layer_score_draws(model, guide=guide, num_samples=500)
        taus.append(float(stats.kendalltau(scores.mean(0), w).statistic))
    taus_t = torch.tensor(taus)
    se = float(taus_t.std()) / len(taus) ** 0.5
    print({"kendall": taus, "se": se})
    assert float(taus_t.mean()) - 2 * se >= 0.5, taus
    anchor_tau = float(stats.kendalltau(model.prior.z_layers, w).statistic)
    assert anchor_tau - 2 * se < 0.5  # power: the anchor alone would fail the same bound
