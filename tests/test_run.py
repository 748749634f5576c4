"""The run directory: crash-safe checkpoint swaps, manifest, metrics, resume rules, the Run object."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ppn_bayes.config import recipe_from_dict
from ppn_bayes.errors import RunError
from ppn_bayes.run import fit, load_run
from ppn_bayes.training import checkpoint_files, rundir


def recipe(model_dir, corpus, **train):
    t = {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "eval_lambdas": [0.5], **train}
    return recipe_from_dict({"name": "tiny", "model": {"name": str(model_dir)}, "units": {"group_size": 16},
                             "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2}, "train": t})


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, corpus, tmp_path_factory):
    return fit(recipe(tiny_llama_dir, corpus), out=tmp_path_factory.mktemp("runs") / "r", progress=False)


def _ckpt(run_dir: Path, step: int) -> None:
    checkpoint_files.save_checkpoint(run_dir, {"w": torch.full((3,), float(step))}, {"torch_cpu": torch.get_rng_state()},
                           {"state": {}, "param_groups": []}, {"step": step})


def test_checkpoint_swap_keeps_one_complete_checkpoint(tmp_path):
    _ckpt(tmp_path, 1)
    _ckpt(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # old one removed after the swap
    assert checkpoint_files.load_checkpoint(checkpoint_files.find_checkpoint(tmp_path))["trainer"]["step"] == 2
    # A kill between the two renames leaves only checkpoint.old (complete) and a finished temp dir.
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert checkpoint_files.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    # A half-written temp dir is never taken for a checkpoint, and is cleaned on resume.
    (tmp_path / "checkpoint.tmp-123").mkdir()
    (tmp_path / "checkpoint.tmp-123" / "state.safetensors").write_bytes(b"\x00" * 5)
    assert checkpoint_files.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    checkpoint_files.clean_stale(tmp_path)
    assert not (tmp_path / "checkpoint.tmp-123").exists() and (tmp_path / "checkpoint.old").is_dir()


def test_truncated_checkpoint_file_is_a_one_line_run_error(tmp_path):
    _ckpt(tmp_path, 1)
    path = tmp_path / "checkpoint" / "state.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RunError, match="unreadable"):
        checkpoint_files.load_checkpoint(tmp_path / "checkpoint")


def test_manifest_and_files_of_a_finished_run(finished, tiny_llama_dir):
    m = finished.manifest
    assert m["status"] == "finished" and m["steps_done"] == 2 and m["final_eval"] is True
    assert m["library"]["name"] == "ppn-bayes" and m["library"]["version"]
    assert m["recipe"] == {"name": "tiny", "preset": "ours"} and m["weights"] == "frozen"
    assert m["tempering"] == 1.0 and m["num_tokens"] > 0 and m["inventory"]["decoder_params"] > 0
    from ppn_bayes.hub.zoo import model_identity

    assert m["base"]["weights_sha256"] == model_identity(tiny_llama_dir)["weights_sha256"]
    files = {p.name for p in finished.path.iterdir()}
    assert {"config.yaml", "manifest.json", "metrics.jsonl", "posterior.json", "guide.safetensors",
            "push.safetensors", "units.safetensors", "checkpoint"} <= files
    assert (finished.path / "guide.safetensors").stat().st_size < 64_000  # kilobytes, not weights


def test_run_object(finished):
    run = load_run(finished.path)
    assert run.recipe.name == "tiny" and run.inventory.num_layers == 2
    assert len(run.train_metrics()) == 2 and len(run.eval_metrics()) == 2
    assert set(run.posterior.median_scores()) == {"layers", "heads", "groups"}
    g = run.load_model()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert g(ids).logits.shape == (1, 10, 320)
    assert "finished" in repr(run)


def test_check_base_rejects_another_model(finished, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    other = tmp_path / "other"
    make_tiny_llama(len(tiny_tokenizer), seed=1, intermediate_size=96).save_pretrained(other)
    with pytest.raises(RunError, match="hash differs"):
        finished.check_base(other)
    finished.check_base(finished.base_path())  # its own base passes


def test_load_run_errors_are_one_line(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(RunError, match="manifest.json is missing"):
        load_run(tmp_path / "x")


def test_existing_run_needs_resume_and_model_keys_cannot_change(finished, tiny_llama_dir, corpus):
    with pytest.raises(RunError, match="--resume"):
        fit(recipe(tiny_llama_dir, corpus), out=finished.path, progress=False)
    changed = recipe_from_dict({**recipe(tiny_llama_dir, corpus).to_dict(), "units": {"group_size": 32,
                                                                                    "kinds": ["layers"]}})
    with pytest.raises(RunError, match="units"):
        fit(changed, out=finished.path, resume=True, progress=False)


def test_resume_of_a_finished_run_does_nothing_and_more_steps_continue(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "r"
    fit(recipe(tiny_llama_dir, corpus), out=out, progress=False)
    before = (out / "metrics.jsonl").read_text()
    fit(None, out=out, resume=True, progress=False)
    assert (out / "metrics.jsonl").read_text() == before
    run = fit(None, out=out, resume=True, progress=False, overrides=["train.steps=3"])
    assert [r["step"] for r in run.train_metrics()] == [1, 2, 3] and run.manifest["steps_done"] == 3


def test_metrics_after_the_checkpoint_are_replaced_on_resume(tmp_path):
    for step in (1, 2, 3):
        rundir.append_metrics(tmp_path, {"type": "train", "step": step})
    rundir.truncate_metrics(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_bad_input_writes_nothing(tmp_path, corpus):
    from ppn_bayes.errors import ModelError

    out = tmp_path / "r"
    with pytest.raises(ModelError):
        fit(recipe(tmp_path / "no-such-model", corpus), out=out, progress=False)
    assert not out.exists()
