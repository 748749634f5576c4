"""Keep-sets: targets, lambda*, exact costs, nesting, budget, quantile property, inclusion by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.bayes.exit_order import exit_coordinates, fill, quantile_rows
from ppn_bayes.bayes.keepsets import KeepsetSolver, keepset, keepsets
from ppn_bayes.bayes.lambda_star import x_to_lambda
from ppn_bayes.bayes.unit_table import UnitTable, parse_target
from ppn_bayes.errors import ConfigError, SizeError
from tests.posterior_fixtures import StubPosterior, make_run_dir, small_inventory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def solver(run_dir):
    return KeepsetSolver(run_dir, num_draws=64, seed=0)


def test_table_costs_match_kept_cost_exactly():
    """The fill's incremental costs (KV charged with the first query head) must equal kept_cost for
    any prefix; random orders over a GQA inventory with a narrow last group."""
    inv = small_inventory(L=3, H=6, KV=2, ff=36, group_size=8)
    table = UnitTable.build(inv)
    gen = torch.Generator().manual_seed(0)
    for cur in ("params", "flops"):
        for _ in range(20):
            keys = torch.rand(1, table.size, generator=gen, dtype=torch.float64)
            budget = float(torch.rand((), generator=gen)) * inv.total_cost(cur)
            f = fill(table, keys, budget, cur)
            keep = table.keepset(f.keep[0])
            assert inv.kept_cost(keep, cur) <= budget
            # the next unit in the order would not have fit: the prefix is the longest one
            order = torch.sort(keys[0], descending=True, stable=True).indices
            n = int((f.keep[0] | _raw_prefix(table, keys, budget, cur)).sum())
            if n < table.size:
                longer = torch.zeros(table.size, dtype=torch.bool)
                longer[order[:n + 1]] = True
                assert inv.kept_cost(table.keepset(longer), cur) > budget


def _raw_prefix(table, keys, budget, cur):
    """Prefix before empty-layer pruning, recomputed with kept_cost (the reference)."""
    order = torch.sort(keys[0], descending=True, stable=True).indices
    best = torch.zeros(table.size, dtype=torch.bool)
    for n in range(1, table.size + 1):
        m = torch.zeros(table.size, dtype=torch.bool)
        m[order[:n]] = True
        if table.inventory.kept_cost(table.keepset(m), cur) > budget:
            break
        best = m
    return best


def test_exit_coordinates_invert_thresholds(run_dir):
    """tau_l(x_u) = a_u inside the spline's range (grid interpolation error ~1e-6 logits)."""
    from ppn_bayes.bayes.posterior import Posterior

    post = Posterior.from_dir(run_dir)
    table = UnitTable.build(post.inventory)
    tau1 = post.thresholds(x_to_lambda(0.3))["layers"].double()
    scores = {k: v.double() for k, v in post.draws(4, seed=1).items() if k in table.kinds}
    scores["layers"] = tau1.expand(4, -1).clone()  # layer scores exactly at tau(0.3)
    e = exit_coordinates(post, table, scores)
    assert torch.allclose(e[:, :post.inventory.num_layers], torch.full((4, 3), 0.3, dtype=torch.float64), atol=1e-4)


def test_inclusion_by_hand():
    """Three layers, layers only, equal costs and identical thresholds: each draw keeps its own
    top-scoring layer at size 1/3, so pi_l = share of draws in which layer l scores highest."""
    inv = small_inventory(L=3, kinds=("layers",))
    draws = {"layers": torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.5, 2.0, 0.0], [2.5, 1.0, 2.0]])}
    post = StubPosterior(inv, draws)
    r = keepset(post, layers=1, num_draws=4)
    assert r.keep.layers == [0]  # median exit price is highest for layer 0
    assert torch.allclose(r.inclusion["layers"], torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    assert r.p_equal == pytest.approx(0.75)
    # rho: the push's Bernoulli probability at lambda*, averaged over the draws, by hand
    tau = post.thresholds(r.lam)["layers"].double()
    rho = torch.sigmoid((draws["layers"].double() - tau) / post.push.config.temperature).mean(0)
    assert torch.allclose(r.rho["layers"], rho, atol=1e-6)
    # size 1/3 in params is the same keep-set (equal layers)
    assert keepset(post, size=1 / 3 + 1e-9, num_draws=4).keep.layers == [0]


def test_boundary_lists_uncertain_units():
    inv = small_inventory(L=3, kinds=("layers",))
    draws = {"layers": torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.5, 2.0, 0.0], [2.5, 1.0, 2.0]])}
    r = keepset(StubPosterior(inv, draws), layers=1, num_draws=4)
    assert {b["unit"] for b in r.boundary} == {"layer 0", "layer 1"}


def test_gqa_kv_head_charged_once():
    """Heads only, 2 query heads per KV head: a budget of two heads of one KV group fits exactly,
    two heads of different groups do not (each pays its own K/V)."""
    inv = small_inventory(L=1, H=4, KV=2, kinds=("heads",))
    two_same = inv.kept_cost(KeepSet(layers=[0], heads=[(0, 0), (0, 1)]))
    # draws rank heads 0 > 2 > 1 > 3: the first two belong to different KV groups
    post = StubPosterior(inv, {"heads": torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])})
    r = keepset(post, params=two_same, num_draws=1)
    assert r.keep.heads == [(0, 0)]  # head 2 would need its own KV head: over budget
    assert r.achieved_params <= two_same


def test_targets_and_errors(solver):
    inv = solver.inventory
    with pytest.raises(SizeError, match="exactly one"):
        solver.solve()
    with pytest.raises(SizeError, match="exactly one"):
        parse_target(inv, size=0.5, layers=2)
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(SizeError):
            solver.solve(size=bad)
    with pytest.raises(SizeError, match="exceeds"):
        solver.solve(params=inv.total_cost("params") + 1)
    with pytest.raises(SizeError, match="whole number"):
        solver.solve(layers=4)
    with pytest.raises(SizeError, match="smallest model"):
        solver.solve(size=1e-4)
    with pytest.raises(ConfigError, match="quantile"):
        solver.solve(size=0.5, quantile=1.0)
    msg = str(pytest.raises(SizeError, solver.solve, size=1e-4).value)
    assert "\n" not in msg and "--size" in msg
    assert parse_target(inv, flops=0.5).budget == pytest.approx(0.5 * inv.total_cost("flops"))
    assert parse_target(inv, flops=1000).budget == 1000.0


def test_layers_not_gated_refused():
    inv = small_inventory(kinds=("heads", "groups"))
    with pytest.raises(SizeError, match="does not gate whole layers"):
        parse_target(inv, layers=1)


def test_budget_nesting_and_report(solver):
    inv = solver.inventory
    sizes = [0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0]
    results = [solver.solve(size=s) for s in sizes]
    prev = None
    for s, r in zip(sizes, results):
        assert inv.kept_cost(r.keep, "params") <= s * inv.total_cost("params")
        assert r.achieved_size <= r.requested_size
        assert r.achieved_size == pytest.approx(inv.size_of(r.keep, "params"))
        cur = _units(r.keep)
        if prev is not None:
            assert prev <= cur
        prev = cur
    assert results[-1].keep.to_dict() == inv.full_keepset().to_dict()
    # flops and layers targets obey their own budgets too
    r = solver.solve(flops=0.5)
    assert r.achieved_flops <= 0.5 * inv.total_cost("flops")
    assert len(solver.solve(layers=2).keep.layers) == 2


def test_lambda_meets_expected_size(solver):
    """lambda* makes the expected kept size equal the target (bisection, 50 halvings) and grows as
    the size shrinks."""
    lams = []
    for s in (0.3, 0.5, 0.7):
        r = solver.solve(size=s)
        if not r.lambda_saturated and r.lam > 0:
            assert r.expected_size_at_lambda == pytest.approx(s, abs=1e-5)
        lams.append(r.lam)
    assert lams[0] >= lams[1] >= lams[2]


def test_quantile_property(solver):
    """Lowering the quantile never drops a unit that stays in, at the cut price of the higher-
    quantile keep-set, in at least 1 - q_low of the draws (docs/keepsets.md)."""
    table = solver.table
    for size in (0.3, 0.6):
        hi = solver.solve(size=size, quantile=0.5)
        lo = solver.solve(size=size, quantile=0.1)
        keys_lo = solver.priority(0.1)
        assert torch.all(keys_lo <= solver.priority(0.5))
        sure = (keys_lo > hi.cut_key).unsqueeze(0)
        from ppn_bayes.bayes.exit_order import drop_empty_layers

        sure_units = _units(table.keepset(drop_empty_layers(table, sure)[0]))
        assert sure_units <= _units(lo.keep)


def test_json_shape_and_keepsets_helper(run_dir, solver):
    r = solver.solve(size=0.5)
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("keep", "requested_size", "achieved_size", "inclusion", "lambda", "boundary", "p_equal",
                "rho", "score_ci", "gate_ci", "achieved_flops"):
        assert key in d
    assert KeepSet.from_dict(d["keep"]).to_dict() == r.keep.to_dict()
    assert len(d["inclusion"]["heads"]) == 3 and len(d["inclusion"]["heads"][0]) == 6
    rs = keepsets(run_dir, [0.3, 0.6], num_draws=64)
    assert rs[1].keep.to_dict() == r.keep.to_dict() or _units(rs[0].keep) <= _units(rs[1].keep)
    assert all(0.0 <= p <= 1.0 for row in d["inclusion"]["heads"] for p in row)


def test_sampled_keepsets_fit_budget(solver):
    r = solver.solve(size=0.5)
    ks = r.sampled_keepsets(8)
    assert len(ks) == 8
    for k in ks:
        assert solver.inventory.kept_cost(k) <= 0.5 * solver.inventory.total_cost()


def test_cli_keepset_json(run_dir, capsys):
    from ppn_bayes.cli import main

    assert main(["keepset", str(run_dir), "--size", "0.5", "--draws", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["requested_size"] == 0.5 and d["achieved_size"] <= 0.5
    assert main(["keepset", str(run_dir), "--size", "0.5", "--draws", "32"]) == 0
    assert "achieved" in capsys.readouterr().out
    assert main(["keepset", str(run_dir), "--size", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _units(keep: KeepSet) -> set:
    return ({("l", l) for l in keep.layers} | {("h", *h) for h in keep.heads} | {("g", *g) for g in keep.groups})


def test_math_sanity():
    assert x_to_lambda(0.5) == 1.0 and math.isclose(x_to_lambda(0.75), 3.0)


def test_quantile_rows_matches_torch_and_is_monotone_to_the_ulp():
    """torch.quantile's interpolation rule; and two quantiles 4e-18 apart never swap order (a
    Hypothesis case once found ``a (1 - w) + b w`` rounding the wrong way)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 200, dtype=torch.float64, generator=gen)
    for q in (0.02, 0.1, 0.5, 0.98):
        torch.testing.assert_close(quantile_rows(x, q), torch.quantile(x, q, dim=0), rtol=0, atol=1e-12)
    assert torch.all(quantile_rows(x, 0.02) <= quantile_rows(x, 0.020000000000000004))
    inf = float("inf")
    y = torch.tensor([[1.0, inf], [inf, inf]], dtype=torch.float64)  # units that never exit
    assert torch.equal(quantile_rows(y, 0.5), torch.tensor([inf, inf], dtype=torch.float64))


def test_exit_coordinates_unnested_are_each_units_own(solver):
    """``nested=False`` gives every unit its own exit price; nesting is then the minimum with its layer's."""
    from ppn_bayes.bayes.exit_order import exit_coordinates

    own = exit_coordinates(solver.posterior, solver.table, solver.scores, nested=False)
    t = solver.table
    layer_of = own[:, (t.kind_id == 0).nonzero().flatten()][:, t.layer]  # [K, N] the layer's exit price
    child = t.kind_id > 0
    assert torch.equal(solver.exits[:, ~child], own[:, ~child])
    assert torch.equal(solver.exits[:, child], torch.minimum(own[:, child], layer_of[:, child]))
    assert bool((own[:, child] > layer_of[:, child]).any())  # the fixture has units nesting actually clips
