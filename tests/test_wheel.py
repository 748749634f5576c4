"""A non-editable install works from another directory: the wheel carries what ``ppn`` needs.

The wheel is built from a copy of this checkout's sources (``setuptools.build_meta``, no build
isolation: offline; a copy, so the checkout gets no ``build/`` folder) and unpacked into a temporary ``site`` folder, which is exactly what ``pip install .`` puts in
site-packages for a pure-Python wheel. Every ``ppn`` command then runs in a subprocess whose working
directory is elsewhere and whose ``sys.path`` starts with that folder, so nothing can come from the
checkout: the test asserts the imported package is the unpacked one. The commands walk the user's
path on a tiny local model: the shipped recipes and cards, fit, keepset, report, resize and eval.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the sdist holds: the files the build reads
SOURCES = ("pyproject.toml", "setup.py", "README.md", "ppn_bayes", "inference", "models")
pytestmark = pytest.mark.slow  # builds a wheel and starts several interpreters (~30 s)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built wheel, unpacked as pip would install it."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    build = ("import sys, os; os.chdir(sys.argv[1]); from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[2]))")
    name = subprocess.run([sys.executable, "-c", build, str(source), str(dist)], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(dist / name) as wheel:
        wheel.extractall(target)
    return target


# Runs each command line (a JSON list of argv lists) through ``ppn``'s ``main`` in one interpreter, from
# the unpacked wheel; stops at the first failure and says which.
DRIVER = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import ppn_bayes
assert ppn_bayes.__file__.startswith(sys.argv[1]), ppn_bayes.__file__
from ppn_bayes.cli import main
for argv in json.loads(sys.argv[2]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    print(json.dumps({"argv": argv, "code": code, "stdout": out.getvalue()}))
    if code != 0:
        sys.exit(1)
"""


def ppn(site: Path, cwd: Path, *commands: list[str]) -> list[dict]:
    """Run ``ppn`` command lines from the unpacked wheel in ``cwd``; their codes and outputs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", DRIVER, str(site), json.dumps(list(commands))], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (results[-1]["argv"] if results else None, done.stderr[-2000:])
    return results


def test_the_wheel_carries_the_recipes_cards_and_corpora(site):
    package = site / "ppn_bayes"
    recipes = {p.name for p in (package / "recipes").glob("*.yaml")}
    assert recipes == {p.name for p in (REPO / "inference").glob("*.yaml")} and "smollm2-demo.yaml" in recipes
    assert {p.name for p in (package / "cards").glob("*.yaml")} == {p.name for p in (REPO / "models").glob("*.yaml")}
    assert (package / "data" / "austen" / "train.jsonl.gz").is_file()
    assert (package / "data" / "tasks" / "persuasion_cloze.jsonl").is_file()


def test_ppn_runs_from_an_installed_wheel_in_another_directory(site, tiny_llama_dir, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    corpus = work / "tiny.txt"
    corpus.write_text((REPO / "README.md").read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    # the bundled demo recipe, by name, pointed at the tiny model: nothing downloads
    overrides = [f"model.name={tiny_llama_dir}", f"data.corpus={corpus}", "data.block_size=32", "data.val_blocks=2",
                 "train.steps=2", "train.guide_steps=0", "train.checkpoint_every=2", "units.score_anchor=norm"]
    listed, _, keep, _, _, _ = ppn(
        site, work,
        ["models", "list"],
        ["fit", "smollm2-demo", "--out", "run", "--no-progress", *[a for o in overrides for a in ("--set", o)]],
        ["keepset", "run", "--size", "0.5", "--json"],
        ["report", "run", "--sizes", "0.5"],
        ["resize", "run", "--size", "0.5", "--out", "small"],
        ["eval", "--model", "small", "--data", str(corpus), "--max-blocks", "2", "--block-size", "32",
         "--device", "cpu"])
    assert "smollm2-135m" in listed["stdout"]
    assert (work / "run" / "posterior.json").is_file() and json.loads(keep["stdout"])
    assert (work / "small" / "config.json").is_file()
