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
