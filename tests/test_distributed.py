"""Data-parallel ``ppn fit`` under ``torchrun`` (2 CPU processes, gloo) reproduces a single process.

Each rank gets its half of the global batch (the plate keeps the full data set size) and the same
draws of lambda, masks and latents (functions of seed and step), so the averaged gradient is the
single-process gradient up to float32 summation order: the guide, push and adapter parameters after
N steps agree within atol 1e-5 (parameters are O(1); one step moves them by <= lr).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two subprocess runs, one of them two processes (~30-60 s)

STEPS = 4


def test_torchrun_two_processes_match_one(tiny_llama_dir, tmp_path):
    from ppn_bayes.data import load_corpus

    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed next to this Python")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    recipe = {"name": "ddp", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
              "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
              "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "weights": "lora", "checkpoint_every": 2,
                        "eval_lambdas": [0.5], "lr_guide": 0.05, "lr_push": 0.05, "lr_weights": 0.01,
                        "device": "cpu"}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["-m", "ppn_bayes.cli", "fit", str(path), "--no-progress", "--out"]
    subprocess.run([sys.executable, *common, str(single)], env=env, check=True, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *common, str(multi)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    for name in ("guide.safetensors", "push.safetensors", "adapter.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(multi / name))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{name}:{k}")
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(one, two):
        if r1["type"] == "train":  # the logged ELBO is the all-reduced mean over ranks
            assert r2["elbo"] == pytest.approx(r1["elbo"], abs=1e-5) and r2["lambda"] == r1["lambda"]
