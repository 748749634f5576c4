"""``ppn report``: report.md answers what goes first and what is uncertain; JSON, plots, NetCDF written."""

from __future__ import annotations

import json

import pytest

from ppn_bayes.cli import main
from tests.posterior_fixtures import make_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = make_run_dir(tmp_path_factory.mktemp("run"))
    lines = [json.dumps({"type": "train", "step": i, "elbo": 50.0 - i, "token_loss": 4.0 - 0.01 * i}) for i in range(20)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_report_files_and_content(run_dir, capsys):
    assert main(["report", str(run_dir), "--sizes", "0.3,0.6", "--draws", "32"]) == 0
    md = (run_dir / "report.md").read_text()
    for heading in ("## What goes first", "## Keep-sets by size", "## Uncertain decisions", "## Diagnostics"):
        assert heading in md
    assert "**Layers, first to go" in md and "**Heads going first:**" in md
    assert "| 0.300 |" in md and "| 0.600 |" in md
    data = json.loads((run_dir / "keepsets.json").read_text())
    assert [k["requested_size"] for k in data["keepsets"]] == [0.3, 0.6]
    assert all(k["achieved_size"] <= k["requested_size"] for k in data["keepsets"])
    for name in ("traces", "layer_forest", "head_heatmaps", "puppet"):
        assert (run_dir / "plots" / f"{name}.png").is_file() and (run_dir / "plots" / f"{name}.svg").is_file()
        assert f"plots/{name}.png" in md
    assert (run_dir / "posterior.nc").is_file() and "score_layers" in md
    assert not list(run_dir.glob(".*.*"))  # no temporary files left behind


def test_report_bad_sizes(run_dir, capsys):
    assert main(["report", str(run_dir), "--sizes", "0.5,abc"]) == 2
    assert main(["report", str(run_dir), "--sizes", "0.5,1.5", "--draws", "8"]) == 2
    assert "error:" in capsys.readouterr().err


def test_report_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------- calibration label and held-out band (issue 12)


def test_calibration_line_reads_the_manifest():
    from ppn_bayes.analysis.report import calibration_line

    ok, line = calibration_line({"tempering": 1.0})
    assert not ok and line.startswith("not calibrated: beta = 1 per token assumed") and "ppn calibrate RUN" in line
    assert "set by hand" in calibration_line({"tempering": 0.01})[1]
    rec = {"method": "information matching", "beta": 0.0123, "unit": "chapters", "n_units": 214,
           "trained_with_beta": 1.0, "posterior": "rederived", "details": {}}
    ok, line = calibration_line({"calibration": rec})
    assert ok and line.startswith("calibrated: beta = 0.0123") and "214 chapters" in line and "re-derived" in line
    assert "guide-only" not in line  # a record without re-derivation details says nothing about them
    ok, line = calibration_line({"calibration": {**rec, "details": {"steps": 60, "schedule": "constant", "average": {
        "steps": 45, "widening": 1.71}}}})
    assert ok and "(60 guide-only steps at a constant rate, the last 45 averaged and their sds widened 1.71x" in line
    ok, line = calibration_line({"calibration": {**rec, "details": {"steps": 60, "schedule": "cosine", "average": None}}})
    assert ok and "(60 guide-only steps, cosine rate, last iterate)" in line
    from ppn_bayes.analysis.calibration import GIVEN

    ok, line = calibration_line({"calibration": {**rec, "method": GIVEN}})  # a value by hand is no calibration
    assert not ok and line.startswith("not calibrated: beta = 0.0123 given by hand") and "re-derived at it" in line
    ok, line = calibration_line({"calibration": {**rec, "posterior": "not rederived"}})
    assert not ok and line.startswith("not calibrated: beta = 0.0123") and "not re-derived" in line
    assert "\n" not in line


@pytest.mark.slow  # a tiny fit (the fixture) and two reports: ~20 s on loaded cores
def test_report_labels_pi_and_adds_the_band(tiny_run):
    from ppn_bayes.analysis.report import write_report
    from ppn_bayes.training.rundir import update_manifest

    md = write_report(tiny_run, sizes=(0.5,), num_draws=16, band_samples=3, band_blocks=2).read_text()
    assert "**not calibrated** — beta = 1 per token assumed" in md and "These π are **not calibrated**" in md
    assert "## Held-out loss" in md and "first 2 validation blocks" in md and "over 3 sub-networks" in md
    ks = json.loads((tiny_run / "keepsets.json").read_text())["keepsets"][0]["eval"]
    assert ks["split"] == "validation" and ks["samples"] == 3 and ks["nll_q05"] <= ks["nll_q50"] <= ks["nll_q95"]
    assert (tiny_run / "plots" / "perplexity_vs_size.png").is_file()
    update_manifest(tiny_run, calibration={"method": "information matching", "beta": 0.05, "unit": "chapters",
                                           "n_units": 3, "trained_with_beta": 1.0, "posterior": "rederived",
                                           "details": {}})
    md = write_report(tiny_run, sizes=(0.5,), num_draws=16).read_text()
    assert "**calibrated** — beta = 0.05" in md and "These π are **calibrated**" in md
    assert "_Not computed (it loads the model)" in md  # no band asked for


def test_report_band_refuses_bad_options(run_dir, capsys):
    assert main(["report", str(run_dir), "--band", "-1"]) == 2
    assert main(["report", str(run_dir), "--band", "300", "--draws", "16"]) == 2
    assert main(["report", str(run_dir), "--band", "2", "--draws", "16"]) == 2  # a posterior without a run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error:") for e in err)
    assert "--band must be" in err[0] and "--draws 300" in err[1] and "no run" in err[2]
