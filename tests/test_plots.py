"""Plots: each writes a readable PNG and an SVG (non-empty, valid headers) from plain data."""

from __future__ import annotations

import re

import pytest

from ppn_bayes.analysis import plots
from ppn_bayes.bayes.keepsets import KeepsetSolver
from tests.posterior_fixtures import make_run_dir


def _check(paths):
    png, svg = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert b"<svg" in svg.read_bytes()[:2000]


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    return KeepsetSolver(make_run_dir(tmp_path_factory.mktemp("run")), num_draws=32)


def test_traces(tmp_path):
    metrics = [{"type": "train", "step": i, "elbo": 10.0 - i, "token_loss": 3 - 0.1 * i} for i in range(10)]
    metrics.append({"type": "eval", "step": 9, "token_loss": 2.5})
    _check(plots.plot_traces(metrics, tmp_path / "traces"))
    _check(plots.plot_traces([], tmp_path / "empty"))  # says "no data" rather than failing


def test_forest_and_heatmaps(tmp_path, solver):
    _check(plots.plot_layer_forest(solver.scores["layers"], tmp_path / "forest",
                                   solver.posterior.thresholds(0.5)["layers"], 0.5))
    _check(plots.plot_unit_heatmaps(solver.scores["heads"], tmp_path / "heads"))


def test_puppet(tmp_path, solver):
    results = [solver.solve(size=s) for s in (0.3, 0.6, 0.9)]
    _check(plots.plot_puppet(results, tmp_path / "puppet"))
    with pytest.raises(ValueError):
        plots.plot_puppet([], tmp_path / "none")


def test_perplexity_vs_size(tmp_path):
    pts = [{"size": s, "ppl": 20 / s, "ppl_lo": 18 / s, "ppl_hi": 23 / s} for s in (0.25, 0.5, 0.75)]
    _check(plots.plot_perplexity_vs_size(pts, tmp_path / "ppl", baselines={"wanda": [(0.5, 50.0), (0.75, 30.0)]},
                                         dense=20.0))


def test_curves_are_drawn_in_the_colour_blind_safe_palette(tmp_path):
    """The curves' strokes in the SVG are Okabe-Ito colours (lines, not just a constant defined)."""
    metrics = [{"type": "train", "step": i, "elbo": 10.0 - i, "token_loss": 3 - 0.1 * i} for i in range(10)]
    _, svg = plots.plot_traces(metrics, tmp_path / "traces")
    strokes = set(re.findall(r"stroke: ?(#[0-9a-fA-F]{6})", svg.read_text()))
    palette = {c.lower() for c in plots.OKABE_ITO}
    drawn = {c.lower() for c in strokes} & palette
    assert drawn, f"no Okabe-Ito colour among the strokes {sorted(strokes)}"
    assert not {c.lower() for c in strokes} - palette - {"#000000", "#ffffff", "#cccccc", "#b0b0b0", "#262626"}


def test_reliability(tmp_path):
    from ppn_bayes.analysis.calibration_checks import reliability_curve

    curve = reliability_curve([0.0, 0.2, 0.8, 1.0, 0.55], [0, 1, 1, 1, 0])
    _check(plots.plot_reliability({"a": curve, "empty": []}, tmp_path / "rel", "title"))  # an empty series is skipped
