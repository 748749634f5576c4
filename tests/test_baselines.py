"""Each peer reproduces a known property of its method (tiny random models; seconds each)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.baselines import (
    CostTracker,
    check_sizes,
    decoder_param_fraction,
    full_inventory,
    gated_view,
    is_nested,
    keepsets_from_order,
)
from ppn_bayes.baselines.gisp import choice_scores, gisp, margin_loss, perplexity_loss, taylor_importance
from ppn_bayes.baselines.prunepath import balanced_kmeans, cumulative_mass_mask, gather_mlp, moefy
from ppn_bayes.baselines.random import random_keepsets
from ppn_bayes.baselines.shortgpt import block_influence, shortgpt
from ppn_bayes.baselines.sparsegpt import Hessian, sparsegpt, sparsegpt_prune
from ppn_bayes.baselines.wanda import ColumnNorms, n_m_mask, row_mask, wanda, wanda_scores
from ppn_bayes.data.tasks.choices import ChoiceExample
from ppn_bayes.errors import ConfigError, SizeError


def blocks(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- nesting, budgets


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cost_tracker_matches_inventory_and_keepsets_nest(family):
    """The O(1) tracker charges what kept_cost charges (GQA: a KV head while any query head uses it)."""
    model = tiny_model(family)
    with gated_view(model) as g:
        inv = full_inventory(g.inventory)
    units = ([("heads", (l, h)) for l in range(inv.num_layers) for h in range(inv.num_heads)]
             + [("groups", (l, k)) for l in range(inv.num_layers) for k in range(inv.num_groups)]
             + [("layers", 1)])
    perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(3)).tolist()
    tracker = CostTracker(inv)
    for i in perm[:150]:
        tracker.remove(units[i])
        assert tracker.cost == pytest.approx(inv.kept_cost(tracker.keepset()), rel=1e-12)
    sizes = [0.9, 0.7, 0.5, 0.3]
    ks = keepsets_from_order(inv, [units[i] for i in perm], sizes)
    assert is_nested(ks)
    for s, k in ks.items():
        assert inv.size_of(k) <= s + 1e-12


def test_size_errors_are_one_line():
    with pytest.raises(SizeError, match="out of range"):
        check_sizes([0.5, 1.5])
    model = tiny_model("llama")
    with gated_view(model) as g:
        inv = full_inventory(g.inventory)
    with pytest.raises(SizeError, match="smallest this method can reach"):
        keepsets_from_order(inv, [("layers", 0)], [0.1])


def test_is_nested_detects_a_violation():
    big = KeepSet(layers=[0, 1], heads=[(0, 0)], groups=[])
    small = KeepSet(layers=[0], heads=[(0, 1)], groups=[])
    assert not is_nested({0.9: big, 0.5: small})


# ----------------------------------------------------------------------------- ShortGPT


def test_shortgpt_ranks_an_identity_layer_first():
    """Zeroing a pre-norm layer's output projections makes it the identity: BI = 0, removed first."""
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(model, blocks())
    assert float(bi[2]) == pytest.approx(0.0, abs=1e-6)  # cos(x, x) = 1 up to float32 rounding
    assert all(float(bi[l]) > 1e-3 for l in (0, 1, 3))
    res = shortgpt(model, blocks(), [0.8, 0.5])
    assert res.order[0] == ("layers", 2)
    assert 2 not in res.keepsets[0.8].layers
    assert is_nested(res.keepsets)
    assert all(res.size(s) <= s for s in res.keepsets)


# ----------------------------------------------------------------------------- Wanda


def test_wanda_scores_hand_computed():
    """S_ij = |W_ij| * ||X_j||_2, compared per output row."""
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 0.1, 0.2, 1.0]])
    X = torch.tensor([[3.0, 0.0, 1.0, 2.0], [4.0, 1.0, 0.0, 0.0]])  # column norms 5, 1, 1, 2
    stats = ColumnNorms(4)
    stats.add(X[:1])
    stats.add(X[1:])  # accumulation over batches
    assert torch.allclose(stats.norms, torch.tensor([5.0, 1.0, 1.0, 2.0], dtype=torch.float64))
    S = wanda_scores(W, stats.norms)
    assert torch.allclose(S, torch.tensor([[5.0, 2.0, 3.0, 1.0], [20.0, 0.1, 0.2, 2.0]]))
    # 50% per row: row 0 drops (col 3: 1.0, col 1: 2.0); row 1 drops (col 1: 0.1, col 2: 0.2).
    assert row_mask(S, 0.5).tolist() == [[True, False, True, False], [True, False, False, True]]
    # magnitude alone would drop row 0's columns 3 and 0: the activation norm changes the choice
    assert row_mask(W.abs(), 0.5)[0].tolist() == [False, True, True, False]
    assert n_m_mask(S).tolist() == row_mask(S, 0.5).tolist()  # one group of four: the same choice


def test_wanda_prunes_a_copy_to_the_budget_unstructured_and_2_4():
    model = tiny_model("llama")
    before = state(model)
    res = wanda(model, blocks(), 0.6)
    assert unchanged(model, before)
    assert res.param_fraction <= 0.6
    q = res.model.model.layers[1].self_attn.q_proj.weight
    per_row = (q == 0).sum(1)
    assert int(per_row.min()) == int(per_row.max())  # every row loses the same number of weights
    res24 = wanda(model, blocks(), pattern="2:4")
    for layer in res24.model.model.layers:
        w = layer.mlp.down_proj.weight
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


# ----------------------------------------------------------------------------- SparseGPT


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    """OBS error compensation beats magnitude pruning at the same sparsity on ||W X^T - W' X^T||."""
    d_in, d_out = 64, 24
    X = _correlated_inputs(512, d_in, 0)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1))
    stats = Hessian(d_in)
    for chunk in X.split(100):
        stats.add(chunk)
    exact = (2 * X.double().t() @ X.double() / X.shape[0]).float()
    assert torch.allclose(stats.H, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))  # float32 sums
    Wp = sparsegpt_prune(W, stats.H, 0.5, pattern, blocksize=16)
    if pattern == "2:4":
        mag = n_m_mask(W.abs())
        assert bool(((Wp.reshape(d_out, -1, 4) == 0).sum(-1) >= 2).all())
    else:
        thresh = W.abs().flatten().kthvalue(W.numel() // 2).values
        mag = W.abs() > thresh
        assert int((Wp == 0).sum()) == W.numel() // 2
    err_sgpt = float((X @ (W - Wp).t()).norm())
    err_mag = float((X @ (W - W * mag).t()).norm())
    assert err_sgpt < 0.8 * err_mag  # a clear margin: typically ~0.5x on correlated inputs


def test_sparsegpt_hessian_shares_the_gram_of_one_input():
    """q/k/v read one tensor: its Gram matrix is computed once; another tensor is never mistaken for it."""
    x = torch.randn(2, 5, 8)
    a, b = Hessian(8), Hessian(8)
    a.add(x)
    first = Hessian._last[2]
    b.add(x)
    assert Hessian._last[2] is first and torch.equal(a.H, b.H)
    y = x.clone()
    y[0, 0, 0] += 1.0
    b.add(y)
    assert Hessian._last[2] is not first
    cached = Hessian.gram(x)
    assert Hessian.gram(x) is cached
    x.add_(1.0)  # an in-place change bumps the version: recomputed
    assert Hessian.gram(x) is not cached
    Hessian._last = None


def test_sparsegpt_model_budget_and_input_untouched():
    model = tiny_model("gpt2")  # Conv1D weights [in, out]
    before = state(model)
    res = sparsegpt(model, blocks(), 0.7, blocksize=16)
    assert unchanged(model, before)
    assert res.param_fraction <= 0.7 and res.param_fraction == pytest.approx(decoder_param_fraction(res.model))
    assert res.param_fraction > 0.65  # not over-pruned either


# ----------------------------------------------------------------------------- random


def test_random_keepsets_nested_sized_and_seeded():
    model = tiny_model("qwen2")
    a = random_keepsets(model, [0.9, 0.6, 0.4], seed=1)
    b = random_keepsets(model, [0.9, 0.6, 0.4], seed=1)
    c = random_keepsets(model, [0.9, 0.6, 0.4], seed=2)
    assert is_nested(a.keepsets)
    assert all(a.size(s) <= s for s in a.keepsets)
    assert a.keepsets[0.6].to_dict() == b.keepsets[0.6].to_dict()
    assert a.keepsets[0.6].to_dict() != c.keepsets[0.6].to_dict()


# ----------------------------------------------------------------------------- GISP


def test_gisp_removes_a_dead_channel_first_and_nests():
    """A channel whose output column is zero has |grad * w| = 0 over all its weights: removed first."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0.0
    res = gisp(model, blocks(), [0.8, 0.5], step=0.15)
    assert res.order[0] == ("groups", (1, 5))
    assert is_nested(res.keepsets)
    assert all(res.size(s) <= s for s in res.keepsets)
    assert len(res.info["schedule"]) >= 3  # iterative: importance recomputed between steps


def test_gisp_importance_is_recomputed_on_the_masked_model():
    """Masking units changes the others' Taylor importance (the point of the iterative schedule)."""
    model = tiny_model("llama")
    b = blocks()
    with gated_view(model) as g:
        inv = g.inventory
        terms = [(lambda: perplexity_loss(g, b), 1.0)]
        full = taylor_importance(g, terms)
        m = inv.masks(KeepSet(layers=[0, 1, 2], heads=[(l, h) for l in range(3) for h in range(3)],
                              groups=[(l, k) for l in range(3) for k in range(inv.num_groups)]))
        with g.gates(heads=m["heads"], groups=m["groups"]):
            masked = taylor_importance(g, terms)
    assert float(masked["heads"][:, 3:].abs().max()) < float(full["heads"][:, 3:].min())  # gated heads: ~0 q/o
    assert not torch.allclose(masked["groups"], full["groups"])


def test_gisp_margin_objective():
    """margin loss = softplus(gamma - (s_y - max_{j != y} s_j)), with s the summed log-probs."""
    model = tiny_model("llama")
    ex = [ChoiceExample(context=[1, 2, 3, 4], choices=[[5, 6], [7], [8, 9, 10]], label=2),
          ChoiceExample(context=[11, 12], choices=[[13], [14]], label=0)]
    with gated_view(model) as g, torch.no_grad():
        loss = margin_loss(g, ex, gamma=1.0)
        # by hand, scoring each candidate on its own
        manual = []
        for e in ex:
            s = []
            for c in e.choices:
                ids = torch.tensor([e.context + c])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
                s.append(sum(float(logp[len(e.context) - 1 + i, t]) for i, t in enumerate(c)))
            assert torch.allclose(choice_scores(g, e), torch.tensor(s), atol=1e-4)  # padding must not leak
            others = max(v for j, v in enumerate(s) if j != e.label)
            manual.append(math.log1p(math.exp(1.0 - (s[e.label] - others))))
    assert float(loss) == pytest.approx(sum(manual) / len(manual), abs=1e-4)
    res = gisp(model, None, [0.7], objective="margin", choices=ex, step=0.3)
    assert res.size(0.7) <= 0.7
    with pytest.raises(ConfigError, match="choice examples"):
        gisp(model, None, [0.7], objective="margin")


# ----------------------------------------------------------------------------- PrunePath


def test_balanced_kmeans_partitions_into_equal_clusters():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    clusters = balanced_kmeans(x, 8)
    assert clusters.shape == (8, 8)
    assert sorted(clusters.flatten().tolist()) == list(range(64))
    with pytest.raises(ConfigError, match="divide"):
        balanced_kmeans(x, 7)


def test_cumulative_mass_mask_hand_case():
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert cumulative_mass_mask(p, 0.5).tolist() == [[True, False, False, False], [True, True, False, False]]
    assert cumulative_mass_mask(p, 0.75).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert cumulative_mass_mask(p, 1.0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prunepath_tau_one_is_the_dense_model(family):
    model = tiny_model(family)
    b = blocks()
    before = state(model)
    pp = moefy(model, b, n_experts=8, router_steps=50)
    assert unchanged(model, before)
    pp.set_tau(1.0)
    with torch.no_grad():
        dense = model(input_ids=b).logits
        moe = pp.model(input_ids=b).logits
    # float32, only the summation order of the MLP's inner products differs
    assert torch.allclose(dense, moe, atol=1e-5, rtol=1e-5)
    assert pp.mean_active_fraction() == 1.0


def test_prunepath_gather_kernel_and_active_fraction():
    model = tiny_model("llama", intermediate_size=128)
    b = blocks()
    pp = moefy(model, b, n_experts=8, router_steps=100)
    moe = pp.moe[1]
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    moe.tau = 0.6
    with torch.no_grad():
        batched = moe(x)  # masked dense path
        for i in range(5):
            keep = moe.routing(x[i:i + 1])[0]
            assert 0 < int(keep.sum()) <= 8
            assert torch.allclose(gather_mlp(moe, x[i:i + 1], keep)[0], batched[i], atol=1e-5)
            assert torch.allclose(moe(x[i:i + 1])[0], batched[i], atol=1e-5)  # single token: gather path
    fractions = []
    for tau in (0.95, 0.7, 0.4):
        pp.set_tau(tau)
        pp.reset_stats()
        with torch.no_grad():
            pp.model(input_ids=b)
        fractions.append(pp.mean_active_fraction())
    assert 0 < fractions[2] <= fractions[1] <= fractions[0] < 1  # a monotone knob, reported per token
    tau = pp.tau_for(0.8)
    assert pp.param_fraction(pp.predicted_active(tau)) <= 0.8


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_peers_on_smollm2(smollm2_path):
    """On SmolLM2-135M: Wanda at 90% keeps perplexity within 5% of dense (the paper's low-sparsity
    regime is nearly lossless), and GISP's informed 90% keep-set beats a random one of the same size."""
    from ppn_bayes.backbone.materialize import materialize
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.data.corpus import calibration_blocks, token_blocks
    from ppn_bayes.hub.zoo import load_model

    model, tok = load_model(smollm2_path)
    calib = calibration_blocks(tok, 4, 64, seed=0)
    test = token_blocks(tok, "test", 128, max_blocks=2)
    dense = perplexity(model, test)["perplexity"]
    assert perplexity(wanda(model, calib, 0.9).model, test)["perplexity"] < 1.05 * dense
    g = gisp(model, calib, [0.9], step=0.1, group_size=64)
    r = random_keepsets(model, [0.9], seed=0, group_size=64)
    ppl_g = perplexity(materialize(model, g.keepsets[0.9], g.inventory), test)["perplexity"]
    ppl_r = perplexity(materialize(model, r.keepsets[0.9], r.inventory), test)["perplexity"]
    assert ppl_g < ppl_r
