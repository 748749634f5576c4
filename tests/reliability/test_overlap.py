"""Outputs never overlap inputs (issue 14): no command, ``--force`` or not, writes an output that is,
contains or replaces something inside one of its inputs, or writes into a directory that holds files
it did not write. Through the real CLI, as in ``test_bad_input.py``: exit status 2, one ``error:``
line naming the problem, no traceback, and every input unchanged (the same snapshot helper).

The destructive cases run on ``own_run``, a copy of the tiny run *and* of its base model (the copy's
manifest points at the copied base), so a regression destroys a copy, not a shared fixture.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ppn_bayes.cli import main
from tests.reliability import test_bad_input as _bad

# Helpers and fixtures of the bad-input tests, reused (a fixture is found under its name in this module).
fails, recipe_text, snapshot, write = _bad.fails, _bad.recipe_text, _bad.snapshot, _bad.write
inputs, text_corpus, work = _bad.inputs, _bad.text_corpus, _bad.work

RESIZE = ["--size", "0.5", "--draws", "8"]


@pytest.fixture(scope="module")
def own_run(tiny_run, tiny_llama_dir, tmp_path_factory) -> Path:
    """``root/run`` trained on ``root/base`` (copies of the tiny run and its base model)."""
    root = tmp_path_factory.mktemp("own")
    shutil.copytree(tiny_llama_dir, root / "base")
    shutil.copytree(tiny_run, root / "run")
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    manifest["base"]["path"] = str(root / "base")
    (root / "run" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / "run"


@pytest.fixture(scope="module")
def keepset_file(own_run, tmp_path_factory) -> Path:
    from ppn_bayes.bayes.keepsets import keepset

    path = tmp_path_factory.mktemp("ks") / "keep.json"
    path.write_text(json.dumps(keepset(own_run, size=0.5, num_draws=8).keep.to_dict()))
    return path


def base_of(run: Path) -> Path:
    return run.parent / "base"


# ------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("where,needle", [
    ("run", "is the run directory itself"),
    ("base", "is the base model itself"),
    ("parent", "contains the run directory"),
    ("checkpoint", "lies inside the run directory"),
    ("run-link", "is the run directory itself"),
    ("base-link", "is the base model itself"),
])
def test_resize_never_replaces_its_inputs_even_with_force(where, needle, own_run, tmp_path, work, capsys):
    """The issue's examples (``--out RUN --force`` deleted the run; ``--out BASE`` orphaned it) and
    their relatives: the run's parent, a directory inside the run, symlinks to the run and to the base."""
    targets = {"run": own_run, "base": base_of(own_run), "parent": own_run.parent,
               "checkpoint": own_run / "checkpoint"}
    if where.endswith("-link"):
        link = tmp_path / "link"
        link.symlink_to(targets[where.removesuffix("-link")], target_is_directory=True)
        targets[where] = link
    fails(capsys, ["resize", own_run, *RESIZE, "--out", targets[where], "--force"], needle, "--out",
          watch=[own_run.parent])


def test_resize_with_model_flag_never_replaces_that_model(own_run, work, capsys):
    fails(capsys, ["resize", own_run, *RESIZE, "--model", base_of(own_run), "--out", base_of(own_run), "--force"],
          "is the base model itself", watch=[own_run.parent])


def test_resize_keepset_file_inside_the_output(own_run, keepset_file, work, capsys):
    """``--out`` holding the keep-set file it reads: replacing the directory would delete the input."""
    out = work / "export"
    out.mkdir()
    shutil.copy(keepset_file, out / "keep.json")
    fails(capsys, ["resize", "--model", base_of(own_run), "--keepset", out / "keep.json", "--group-size", "16",
                   "--out", out, "--force"], "contains the keep-set file", watch=[own_run.parent])
    fails(capsys, ["resize", "--model", base_of(own_run), "--keepset", keepset_file, "--group-size", "16",
                   "--out", keepset_file, "--force"], "is the keep-set file itself", watch=[keepset_file.parent])


def test_resize_force_replaces_only_an_earlier_export(own_run, work, capsys):
    """``--force`` over a user's directory (no ``ppn-resize.json``) or over an export a user has put a
    file into is refused; over a plain earlier export it works (the control)."""
    mine = work / "mine"
    mine.mkdir()
    write(mine / "thesis.tex", "years of work")
    fails(capsys, ["resize", own_run, *RESIZE, "--out", mine, "--force"], "did not write", "thesis.tex",
          watch=[own_run.parent])
    shutil.rmtree(mine)

    export = work / "export"
    assert main(["resize", str(own_run), *RESIZE, "--out", str(export), "--json"]) == 0
    capsys.readouterr()
    write(export / "notes.txt", "mine")
    fails(capsys, ["resize", own_run, *RESIZE, "--out", export, "--force"], "did not write", "notes.txt",
          watch=[own_run.parent])
    (export / "notes.txt").unlink()
    fake = work / "fake"
    fake.mkdir()
    write(fake / "config.json", "{}")  # export file names, but not an export
    fails(capsys, ["resize", own_run, *RESIZE, "--out", fake, "--force"], "not an export", watch=[own_run.parent])
    shutil.rmtree(fake)
    assert main(["resize", str(own_run), *RESIZE, "--out", str(export), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(export)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary or lock file left


# --------------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("resume", [False, True])
def test_fit_never_writes_into_a_directory_of_someone_elses_files(resume, tiny_llama_dir, text_corpus, inputs,
                                                                  work, capsys):
    """The issue's example: a user's ``config.yaml`` and ``metrics.jsonl`` without a manifest. With
    ``--resume`` the foreign ``config.yaml`` must not even be read as the run's recipe."""
    recipe = write(inputs / "ok.yaml", recipe_text(tiny_llama_dir, text_corpus))
    mine = work / "mine"
    mine.mkdir()
    write(mine / "config.yaml", "my: own config\n")
    write(mine / "metrics.jsonl", '{"my": "measurements"}\n')
    argv = ["fit", recipe, "--out", mine, "--no-progress", *(["--resume"] if resume else [])]
    fails(capsys, argv, "did not write", "config.yaml", "--out")
    fails(capsys, ["fit", "--out", mine, "--resume", "--no-progress"], "did not write")


@pytest.mark.parametrize("which,needle", [("model", "is the base model itself"),
                                          ("inputs", "did not write")])
def test_fit_out_is_an_input(which, needle, tiny_llama_dir, text_corpus, inputs, work, capsys):
    """``--out`` naming the base model, or the directory that holds the recipe and corpus."""
    model = work / "model"
    shutil.copytree(tiny_llama_dir, model)
    recipe = write(inputs / "ok.yaml", recipe_text(model, text_corpus))
    out = model if which == "model" else inputs
    fails(capsys, ["fit", recipe, "--out", out, "--no-progress"], needle, watch=[inputs])


# ------------------------------------------------------------------------------------------ report


@pytest.mark.parametrize("force", [False, True])
def test_report_never_goes_into_another_run(force, own_run, tiny_run, work, capsys):
    """The issue's example (``ppn report RUN --out OTHER_RUN`` overwrote the other run's report): refused,
    and ``--force`` does not lift it."""
    flags = ["--force"] if force else []
    fails(capsys, ["report", own_run, "--draws", "8", "--out", tiny_run, *flags], "is another run",
          watch=[tiny_run, own_run])
    fails(capsys, ["report", own_run, "--draws", "8", "--out", tiny_run / "new" / "report", *flags],
          "lies inside another run", watch=[tiny_run, own_run])


def test_report_out_holding_other_files_or_an_earlier_report(own_run, work, capsys):
    mine = work / "mine"
    mine.mkdir()
    write(mine / "keepsets.json", "{}")  # a report's file name, next to a user's file
    write(mine / "paper.md", "draft")
    fails(capsys, ["report", own_run, "--draws", "8", "--out", mine, "--force"], "did not write", "paper.md",
          watch=[own_run])
    out = work / "report"
    assert main(["report", str(own_run), "--draws", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    fails(capsys, ["report", own_run, "--draws", "8", "--out", out], "already holds a report", "--force",
          watch=[own_run])
    assert main(["report", str(own_run), "--draws", "8", "--out", str(out), "--force"]) == 0  # the control
    assert (out / "report.md").is_file()
    fails(capsys, ["report", own_run, "--draws", "8", "--out", own_run / "checkpoint"], "lies inside the run",
          watch=[own_run])


# ------------------------------------------------------------------------------- compare, bench, demo


def test_compare_out_is_an_input(own_run, text_corpus, work, capsys):
    """Checked before the model loads: the run, the model, a directory holding the corpus."""
    base = base_of(own_run)
    common = ["compare", "--model", base, "--methods", "random", "--sizes", "0.5", "--device", "cpu"]
    fails(capsys, [*common, "--out", base], "is the model itself", watch=[own_run.parent])
    fails(capsys, ["compare", "--model", base, "--run", own_run, "--methods", "ppn", "--sizes", "0.5",
                   "--device", "cpu", "--out", own_run], "is the run directory itself", watch=[own_run.parent])
    fails(capsys, [*common, "--data", text_corpus, "--out", text_corpus.parent], "did not write",
          watch=[own_run.parent, text_corpus.parent])


def test_compare_never_refits_over_an_earlier_fitted_run(own_run, work, capsys):
    """Without ``--run`` the ppn rows fit a run into ``--out``; one an earlier comparison fitted there is
    pointed out before the model loads (it used to fail after the peers had been measured)."""
    earlier = work / "cmp" / "ppn-run"
    earlier.mkdir(parents=True)
    write(earlier / "manifest.json", "{}")
    fails(capsys, ["compare", "--model", own_run.parent / "base", "--methods", "ppn,random", "--sizes", "0.5",
                   "--device", "cpu", "--out", work / "cmp"], "already holds the ppn run", f"--run {earlier}")


def test_bench_plot_is_an_input_or_a_directory(own_run, work, capsys):
    base = base_of(own_run)
    fails(capsys, ["bench", "speed", "--model", base, "--device", "cpu", "--plot", base / "config.json"],
          "lies inside the model", watch=[own_run.parent])
    fails(capsys, ["bench", "speed", "--model", base, "--device", "cpu", "--plot", work], "is a directory")


def test_demo_out_holding_other_files(work, capsys):
    """Checked before SmolLM2 is fetched or anything is trained."""
    write(work / "results.csv", "a,b\n")
    fails(capsys, ["demo", "--out", work], "did not write", "results.csv")


# -------------------------------------------------------------------------------------- the helper


def test_check_no_overlap_rules(tmp_path):
    """The rule itself, on plain paths: what a whole-replacing output and a writing-into one may touch."""
    from ppn_bayes.errors import OutputError
    from ppn_bayes.files import check_no_overlap

    (tmp_path / "in" / "sub").mkdir(parents=True)
    run = tmp_path / "in"
    check_no_overlap(tmp_path / "elsewhere", [("run", run)])
    check_no_overlap(run / "new", [("run", run)])  # a new entry inside an input replaces nothing
    check_no_overlap(tmp_path, [("run", run / "sub")], writes=("report.md", "plots"))  # writes beside it
    for out, writes in ((run, None), (tmp_path, None), (run / "sub", None), (run / "sub", ("x",))):
        with pytest.raises(OutputError):
            check_no_overlap(out, [("run", run)], writes=writes)
    with pytest.raises(OutputError, match="contains"):
        check_no_overlap(tmp_path, [("corpus", tmp_path / "plots" / "c.txt")], writes=("report.md", "plots"))
    check_no_overlap(tmp_path / "x", [("nothing", None)])
    assert snapshot(tmp_path).keys() == {"in", os.path.join("in", "sub")}
