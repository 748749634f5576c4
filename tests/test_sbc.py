"""Simulation-based calibration (Talts et al. 2018) of the SVI posterior on the synthetic network.

One replication: draw the score latents from the prior, simulate sequences from the network gated by
those scores, fit the guide to the simulated data, and record the rank of each true layer score
among ``M`` posterior draws. If the fitted posterior is calibrated, every rank is uniform on
``0..M``, so the pooled ranks pass a uniformity test; a posterior too narrow piles them at the ends.

The model is the gate-only one of the NUTS check (3 layers, normal prior, ``mask: expected`` at a
fixed price, weights frozen, ``num_sequences`` = the batch): its posterior is a proper density SVI can
match, and a replication costs a few seconds. The compute factor is left out of the fit
(``fit_svi(hide=("compute",))``): it is a data-free tilt of the prior, and the truths are drawn from
the score prior itself. The data really come from the model: sequences are
sampled ancestrally from the network whose layer gates are the expected masks at the drawn scores.

Test: Kolmogorov-Smirnov of the pooled normalized ranks against uniform, p > 0.001 (a false alarm
once in a thousand runs at this fixed seed's chance). Power check: the same fits with every posterior
draw pulled 3x toward its mean (a posterior 3x too narrow) must give p < 0.001. Observed: p = 0.46
and 0.00018 (48 ranks: 16 replications x 3 layers, 49 draws each); 66 s of CPU (3 min wall on the
loaded 2-core machine).
"""

from __future__ import annotations

import pyro
import pytest
import torch
from scipy import stats

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.bayes.nuts_check import fit_svi
from ppn_bayes.config import PriorConfig, PushConfig
from tests.synthetic import synthetic_stack

LAM, M, REPS, B, T = 0.5, 49, 16, 4, 12


@torch.no_grad()
def _simulate(model: PPNModel, scores: dict, seed: int) -> torch.Tensor:
    """``[B, T]`` tokens from the network gated by the expected masks of ``scores`` at ``LAM``."""
    rho = model.push.inclusion(scores, LAM)
    gen = torch.Generator().manual_seed(seed)
    g = model.gated
    ids = torch.randint(0, g.model.config.vocab_size, (B, 1), generator=gen)
    with g.gates(layers=rho["layers"]):
        for _ in range(T - 1):
            probs = torch.softmax(g(input_ids=ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


def _posterior_scores(model: PPNModel, guide, n: int) -> torch.Tensor:
    with torch.no_grad():
        pred = pyro.infer.Predictive(model.prior, guide=guide, num_samples=n, return_sites=["score_layers"])
        return pred()["score_layers"].reshape(n, -1)


@pytest.mark.slow
def test_sbc_ranks_are_uniform_and_a_3x_too_narrow_posterior_fails():
    hf = synthetic_stack([1.0, 0.3, 0.6], [2.4, 2.9, 2.6], seed=0)
    g = gate(hf, kinds=("layers",))
    model = PPNModel(g, PriorConfig(kind="normal", global_scale=1.0), PushConfig(mask="expected", amplitude=False),
                     num_sequences=B, tokens_per_sequence=T)
    ranks, narrow = [], []
    for rep in range(REPS):
        pyro.set_rng_seed(100 + rep)
        with torch.no_grad():
            truth = model.prior()  # a prior draw of every latent, through the scores
        ids = _simulate(model, truth, seed=rep)
        guide = fit_svi(model, (ids,), {"lam": LAM}, steps=250, lr=0.05, seed=rep, num_particles=1, hide=("compute",))
        post = _posterior_scores(model, guide, M)  # [M, L]
        t = truth["layers"].detach()
        ranks.append((post < t).sum(0))
        squeezed = post.mean(0) + (post - post.mean(0)) / 3.0
        narrow.append((squeezed < t).sum(0))
    u = (torch.cat(ranks).double() + 0.5) / (M + 1)
    un = (torch.cat(narrow).double() + 0.5) / (M + 1)
    p_ok, p_narrow = stats.kstest(u.numpy(), "uniform").pvalue, stats.kstest(un.numpy(), "uniform").pvalue
    print({"p": p_ok, "p_narrow": p_narrow, "ranks": torch.cat(ranks).tolist()})
    assert p_ok > 1e-3, (p_ok, torch.cat(ranks).tolist())
    assert p_narrow < 1e-3, p_narrow
