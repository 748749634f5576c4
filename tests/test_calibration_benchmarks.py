"""The calibration benchmarks of issue 12 (benchmarks/calibration_refits.py, calibration_swaps.py,
quantile_hedge.py): their statistics on constructed inputs with hand-computed answers, a power check,
and one end-to-end smoke run on tiny random-Llama refits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def refits():
    return _load("calibration_refits")


def test_refit_forecasts_by_hand(refits):
    pi = torch.tensor([[1, 1, 0, 0], [1, 0.5, 0.5, 0], [1, 0, 1, 0]], dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    out = refits.refit_forecasts(pi, keep, torch.full((3, 4), 0.5, dtype=torch.float64))
    # leave-one-out frequencies: run 0 against [1, 0, 1, 0] (gap 2), run 1 against [1, .5, .5, 0] (0),
    # run 2 against [1, .5, .5, 0] (1): 3 / 12
    assert out["mean_abs_gap"] == pytest.approx(0.25)
    # six ordered pairs: squared errors 2 + 2 + .5 + .5 + 2 + 0 over 24 forecasts; uninformed 1/2 -> 0.25
    assert out["n"] == 24 and out["brier"] == pytest.approx(7 / 24) and out["brier_uninformed"] == pytest.approx(0.25)
    assert out["brier_skill"] == pytest.approx(1 - (7 / 24) / 0.25)
    # confident forecasts: 8 (run 0) + 4 (run 1) + 8 (run 2); contradicted 2 + 2 (run 0) + 2 (run 2 vs run 0)
    assert out["confident"] == 20 and out["contradicted"] == pytest.approx(0.3)
    assert out["jaccard"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert out["disputed"] == 2 and out["kept_by_all"] == 1


def test_refit_check_has_power(refits):
    """Refits that keep unit u with probability q_u: a run reporting pi = q_u passes issue 12's goal
    (ECE <= 0.1, positive skill); a run reporting its own keep-set as certain (pi in {0, 1}, the
    too-narrow posterior of issue 12) fails it. 300 units x 6 refits = 9000 pair forecasts."""
    g = torch.Generator().manual_seed(0)
    q = torch.rand(300, generator=g, dtype=torch.float64)
    keep = torch.bernoulli(q.expand(6, -1), generator=g).bool()
    base = keep.double().mean(1, keepdim=True).expand(6, 300)
    good = refits.refit_forecasts(q.expand(6, -1), keep, base)
    assert good["ece"] < 0.05 and good["brier_skill"] > 0.1
    bad = refits.refit_forecasts(keep.double(), keep, base)
    assert bad["ece"] > 0.1 and bad["brier_skill"] < 0 and bad["contradicted"] > 0.2


def test_refit_keys_vary_what_they_say(refits):
    """--vary: both keys move together by default; `seed` keeps the original split (bootstrap off) and
    `data` keeps the train seed, so a campaign can tell optimizer noise from the data's share."""
    assert refits.refit_keys(2, 10) == ["train.seed=12", "data.bootstrap_seed=12"]
    assert refits.refit_keys(2, 10, "seed") == ["train.seed=12", "data.bootstrap_seed=null"]
    assert refits.refit_keys(2, 10, "data") == ["train.seed=10", "data.bootstrap_seed=12"]
    from ppn_bayes.config import load_recipe

    rec = load_recipe(refits.DEMO, refits.refit_keys(1, 0, "seed"))
    assert rec.train.seed == 1 and rec.data.bootstrap_seed is None
    with pytest.raises(ValueError, match="vary must be one of"):
        refits.refit_keys(0, 0, "chapters")


def test_swap_probability_by_hand():
    swaps = _load("calibration_swaps")
    exits = torch.tensor([[0.1, 0.2], [0.3, 0.3], [0.5, 0.4]], dtype=torch.float64)
    assert swaps.swap_probability(exits, 0, 1) == pytest.approx((1 + 0.5 + 0) / 3)  # a tie counts half
    assert swaps.swap_probability(exits, 1, 0) == pytest.approx((0 + 0.5 + 1) / 3)


@pytest.mark.slow
def test_benchmarks_end_to_end_on_tiny_refits(refits, tmp_path):
    """Two tiny refits (bootstrap + seed), then all three benchmarks on them: files, shapes, invariants."""
    tiny = refits.tiny_setup(tmp_path)
    runs = [refits.refit(tmp_path, r, None, [], 0, tiny) for r in range(2)]
    from ppn_bayes.run import load_run

    stamp = (runs[0] / "manifest.json").read_text()
    assert refits.refit(tmp_path, 0, None, [], 0, tiny) == runs[0]  # a finished refit is reused, not refitted
    assert (runs[0] / "manifest.json").read_text() == stamp
    recipes = [load_run(r).recipe.data for r in runs]
    assert [d.bootstrap_seed for d in recipes] == [0, 1] and recipes[0].bootstrap_unit == "chapters"
    (tmp_path / "not-yet").mkdir()  # a refit still starting in the background: skipped, not fatal
    res = refits.main(["--runs", *map(str, runs), str(tmp_path / "not-yet"), "--out", str(tmp_path / "refits"),
                       "--sizes", "0.5", "--draws", "32"])
    assert res["runs"] == [str(r) for r in runs]
    r5 = res["sizes"]["0.5"]
    assert r5["runs"] == 2 and r5["n"] == 2 * r5["units"] and 0 <= r5["jaccard"] <= 1
    assert (tmp_path / "refits" / "calibration_refits.png").is_file()
    assert json.loads((tmp_path / "refits" / "calibration_refits.json").read_text())["sizes"]["0.5"]["n"] == r5["n"]

    swaps = _load("calibration_swaps").check_run(runs[0], sizes=(0.5,), per_side=2, blocks=2, draws=32)
    assert swaps["swaps"], "no cost-matched swap found"
    for sw in swaps["swaps"]:
        assert sw["kind"] in ("heads", "groups") and abs(sw["cost_change"]) < 1.0 and 0 <= sw["p"] <= 1
        assert sw["lowered"] == (sw["nll_after"] < sw["nll_before"])
    assert swaps["scores"]["n"] == len(swaps["swaps"])

    hedge = _load("quantile_hedge")
    out = hedge.main([*map(str, runs), "--out", str(tmp_path / "hedge"), "--sizes", "0.5", "--samples", "2",
                      "--blocks", "2", "--draws", "32"])
    row = out["summary"]["0.5"]
    assert row["0.5"]["over_refits"]["n"] == 2 and row["0.1"]["over_refits"]["q05"] <= row["0.1"]["over_refits"]["q95"]
    assert (tmp_path / "hedge" / "quantile_hedge.json").is_file()
