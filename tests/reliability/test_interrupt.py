"""Interruptions: ``kill -9`` a real ``ppn fit`` subprocess at a random moment, then ``--resume``.

The resumed run must end with the same guide, push and adapter parameters as an uninterrupted run
with the same seeds: the data order and every random draw are functions of (seed, step), and the
checkpoint holds the optimizer state, so replay is exact. The tolerance (atol 1e-6 on O(1) values)
only allows for float32 reassociation; in practice the files are bitwise equal. And no file present
after the kill is half-written: each one loads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppn_bayes.config import load_recipe

pytestmark = pytest.mark.slow  # three short subprocess runs (~30-60 s on 2 shared cores)

STEPS = 10


@pytest.fixture(scope="module")
def recipe_file(tiny_llama_dir, tmp_path_factory) -> Path:
    from ppn_bayes.data.corpus import load_corpus

    root = tmp_path_factory.mktemp("interrupt")
    corpus = root / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    recipe = {"name": "kill", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
              "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
              "train": {"steps": STEPS, "batch_size": 2, "weights": "lora", "checkpoint_every": 2,
                        "eval_lambdas": [0.5], "lr_guide": 0.05, "lr_push": 0.05, "lr_weights": 0.01}}
    path = root / "kill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ppn(*args: str) -> list[str]:
    return [sys.executable, "-m", "ppn_bayes.cli", "fit", *args, "--no-progress"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def check_every_file_loads(run_dir: Path) -> None:
    """Every file under its final name parses (temp names are `.<name>.<random>` and `checkpoint.tmp-*`)."""
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_dir() or rel.parts[0].startswith("checkpoint.tmp-") or path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".yaml":
            load_recipe(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        else:
            raise AssertionError(f"unexpected file {rel}")


def train_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"type": "train"' in line for line in path.read_text().splitlines())


def test_kill_9_then_resume_matches_an_uninterrupted_run(recipe_file, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(ppn(str(recipe_file), "--out", str(reference)), env=env(), check=True, capture_output=True)

    rng = random.Random(1234)
    killed = tmp_path / "killed"
    target = rng.randint(2, STEPS - 3)  # kill somewhere after this many steps, at a random instant
    proc = subprocess.Popen(ppn(str(recipe_file), "--out", str(killed)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while train_lines(killed) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run finished before it could be killed; raise STEPS"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["steps_done"] < STEPS
    check_every_file_loads(killed)

    done = subprocess.run(ppn("--resume", "--out", str(killed)), env=env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((killed / "manifest.json").read_text())["status"] == "finished"
    assert not list(killed.glob("checkpoint.tmp-*")) and not (killed / "checkpoint.old").exists()
    for name in ("guide.safetensors", "push.safetensors", "adapter.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if '"type": "train"' in x]
    assert steps == list(range(1, STEPS + 1))  # replayed steps replace the lost ones, no duplicates
