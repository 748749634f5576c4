"""Data-parallel ``ppn fit`` under ``torchrun`` (2 CPU processes, gloo) reproduces a single process.

Each rank gets its half of the global batch (the plate keeps the full data set size) and the same
draws of lambda, masks and latents (functions of seed and step), so the averaged gradient is the
single-process gradient up to float32 summation order: the guide, push and adapter parameters after
N steps agree within atol 1e-5 (parameters are O(1); one step moves them by <= lr).

The same holds under FSDP (``train.distributed: fsdp``, FSDP2 ``fully_shard`` on gloo): the base
model's layers are sharded, the trainable ones (``weights: full``) have their gradients
reduce-scattered, guide, push and adapters stay replicated. Observed differences are ~1e-7 for guide
and push and ~6e-6 for full/LoRA weights (float32 summation order of the reduce-scatter and of the
gathered norms; AdamW divides by sqrt(v) so tiny gradient differences move weights by up to ~lr * 1e-4),
so the same atol 1e-5 applies. A run stopped at step 2 and resumed to step 4 under FSDP (and its
step-2 checkpoint resumed by a single process) ends where the uninterrupted single-process run does.
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

pytestmark = pytest.mark.slow  # subprocess runs, some of them two processes (~30-60 s each test)

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


def _torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    if not path.is_file():
        pytest.skip("torchrun is not installed next to this Python")
    return str(path)


def _recipe(tmp_path, tiny_llama_dir, **train) -> Path:
    from ppn_bayes.data import load_corpus

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    recipe = {"name": "dp", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
              "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
              "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 2,
                        "eval_lambdas": [0.5], "lr_guide": 0.05, "lr_push": 0.05, "lr_weights": 0.01,
                        "device": "cpu", **train}}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _assert_same_run(single: Path, other: Path, exports: tuple[str, ...]) -> None:
    for name in ("guide.safetensors", "push.safetensors", *exports, "checkpoint/state.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(other / name))
        assert set(a) == set(b), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{name}:{k}")
    one = {r["step"]: r for r in map(json.loads, (single / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "train"}
    two = {r["step"]: r for r in map(json.loads, (other / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "train"}
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step, r1 in one.items():
        r2 = two[step]
        assert r2["elbo"] == pytest.approx(r1["elbo"], abs=1e-5) and r2["lambda"] == r1["lambda"]
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_torchrun_fsdp_matches_one_process_and_resumes(tiny_llama_dir, tmp_path, weights):
    torchrun = _torchrun()
    # constant LR: a 2-step run resumed to 4 steps then follows the same schedule as a 4-step run
    path = _recipe(tmp_path, tiny_llama_dir, weights=weights, distributed="fsdp", schedule="constant")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi, handover = tmp_path / "single", tmp_path / "multi", tmp_path / "handover"
    fit = ["-m", "ppn_bayes.cli", "fit", "--no-progress"]
    two = [torchrun, "--standalone", "--nproc_per_node", "2"]
    subprocess.run([sys.executable, *fit, str(path), "--out", str(single)], env=env, check=True, capture_output=True)
    done = subprocess.run([*two, *fit, str(path), "--out", str(multi), "--set", "train.steps=2"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    trainer = json.loads((multi / "checkpoint" / "trainer.json").read_text())
    assert trainer["step"] == 2 and trainer["world_size"] == 2
    assert not list(multi.glob("checkpoint.tmp-*")) and not (multi / "checkpoint.old").exists()
    shutil.copytree(multi, handover)
    done = subprocess.run([*two, *fit, "--resume", "--out", str(multi), "--set", f"train.steps={STEPS}"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished" and manifest["steps_done"] == STEPS
    exports = ("weights.safetensors",) if weights == "full" else ("adapter.safetensors",)
    _assert_same_run(single, multi, exports)
    # the FSDP checkpoint holds whole tensors: a single process resumes it too
    subprocess.run([sys.executable, *fit, "--resume", "--out", str(handover), "--set", f"train.steps={STEPS}"],
                   env=env, check=True, capture_output=True)
    _assert_same_run(single, handover, exports)
    evals = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 2, STEPS]  # FSDP evaluates in the loop too (every rank runs it)
