"""``ppn demo`` and the bundled recipes it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppn_bayes.cli import main
from ppn_bayes.config import load_recipe
from ppn_bayes.errors import ConfigError
from ppn_bayes.shipped import bundled_recipe

REPO = Path(__file__).resolve().parents[1]


def test_recipes_have_one_copy():
    """inference/ is the only copy of the recipes (the wheel maps it into the package)."""
    assert not (REPO / "ppn_bayes" / "recipes").exists()
    assert bundled_recipe("smollm2-demo") == REPO / "inference" / "smollm2-demo.yaml"


def test_bundled_recipe_by_name():
    assert bundled_recipe("smollm2-demo").name == "smollm2-demo.yaml"
    assert load_recipe("smollm2-demo").name == "smollm2-demo"
    with pytest.raises(ConfigError, match="bundled recipes: .*smollm2-demo"):
        bundled_recipe("nope")


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--resize", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "(0, 1]" in err


@pytest.mark.slow
def test_demo_end_to_end_on_smollm2(smollm2_path, tmp_path, capsys):
    """The whole path on the real bundled model, with a 3-step fit (and a 2-step guide-only phase) so
    that it stays short."""
    code = main(["demo", "--out", str(tmp_path / "demo"), "--set", "train.steps=3", "--set", "train.guide_steps=2",
                 "--set", "data.val_blocks=2",
                 "--eval-blocks", "2", "--new-tokens", "4", "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["model"] for r in out["rows"]]
    assert names == ["dense", "ppn 0.5"]
    dense, small = out["rows"]
    assert small["size_params"] <= 0.5 + 1e-9
    assert 1.0 < dense["perplexity"] < 200  # a real model: tens, not thousands
    assert len(out["keepsets"]) == 3 and all(k["achieved_params"] <= k["requested"] + 1e-9 for k in out["keepsets"])
    # every size is measured, and the export is the same network as the gated run at its size
    # (float32 forward passes that differ only in summation order: 1e-3 relative covers it, while a
    # wrong layer kept or an amplitude correction left out moves perplexity by far more)
    at_half = next(k for k in out["keepsets"] if k["requested"] == 0.5)
    assert at_half["perplexity"] == pytest.approx(small["perplexity"], rel=1e-3)
    assert all(k["ppl_ratio"] == pytest.approx(k["perplexity"] / dense["perplexity"]) for k in out["keepsets"])
    assert out["usable_sizes"] == [k["requested"] for k in out["keepsets"] if k["ppl_ratio"] <= out["usable_ratio"]]
    # a 3 + 2-step fit logs too few guide records to judge, and the demo says so instead of "converged"
    assert out["posterior_fit"].startswith("not judged: too few guide records")
    for path in out["artefacts"].values():
        assert Path(path).exists(), path


def test_the_demo_headline_names_the_usable_sizes():
    """Constructed measurements: the headline lists exactly the sizes within USABLE_RATIO of dense."""
    from ppn_bayes.demo import USABLE_RATIO, DemoResult, format_demo

    def entry(size, ratio):
        return {"requested": size, "achieved_params": size, "achieved_flops": size, "lambda": 1.0,
                "lambda_saturated": False, "p_equal": 1.0, "boundary": 0, "layers": 1, "heads": 0, "groups": 0,
                "perplexity": 50.0 * ratio, "ppl_ratio": ratio}

    res = DemoResult(run_dir=Path("run"), keepsets=[entry(0.9, 1.04), entry(0.75, USABLE_RATIO), entry(0.5, 1.6)])
    assert res.usable_sizes == [0.9, 0.75]
    assert "usable (perplexity within 1.10x dense): 0.9, 0.75" in format_demo(res)
    none = DemoResult(run_dir=Path("run"), keepsets=[entry(0.5, 1.6)])
    assert none.usable_sizes == [] and "none of these sizes" in format_demo(none)
    warned = DemoResult(run_dir=Path("run"), keepsets=[entry(0.5, 1.6)],
                        posterior_fit="the score posterior has not converged (its scales ...)")
    assert "  posterior: the score posterior has not converged (its scales ...)" in format_demo(warned)
    assert "posterior:" not in format_demo(none)  # nothing measured, nothing said


def test_demo_summary_is_strict_json_even_with_a_nan(tmp_path):
    """demo.json is read by jq and browsers: a NaN perplexity (a diverged size) is written as null.
    Power: json.dumps, which wrote it before, emits a bare NaN that strict parsers refuse."""
    import json
    import math

    from ppn_bayes.demo import DemoResult, write_summary

    res = DemoResult(run_dir=tmp_path / "run", rows=[{"model": "dense", "perplexity": float("nan")}],
                     keepsets=[{"requested": 0.5, "ppl_ratio": float("inf")}])
    text = write_summary(res, tmp_path).read_text()

    def refuse(token):
        raise ValueError(token)

    data = json.loads(text, parse_constant=refuse)
    assert data["rows"][0]["perplexity"] is None and data["keepsets"][0]["ppl_ratio"] is None
    with_nan = json.dumps(res.to_dict())
    assert "NaN" in with_nan and math.isnan(json.loads(with_nan)["rows"][0]["perplexity"])
    with pytest.raises(ValueError, match="NaN"):
        json.loads(with_nan, parse_constant=refuse)
