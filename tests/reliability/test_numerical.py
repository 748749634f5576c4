"""Numerical faults: NaN/inf is caught at the step it happens, named by term or parameter group; the
run stops with a NumericalError, keeps its last good checkpoint, is marked failed in the manifest,
and resumes with a lower learning rate."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ppn_bayes.config import recipe_from_dict
from ppn_bayes.errors import NumericalError
from ppn_bayes.run import fit
from ppn_bayes.training import checkpoint_files, rundir

POISON_AT = 3  # 0-based index of the step that goes wrong, i.e. step 4; checkpoints every 2 steps


def recipe(model_dir, corpus, **train):
    t = {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "eval_lambdas": [0.5], **train}
    return recipe_from_dict({"name": "nan", "model": {"name": str(model_dir)}, "units": {"group_size": 16},
                             "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2}, "train": t})


def at_step(k: int, fault):
    def callback(session, step):
        if step == k:
            fault(session)

    return callback


def poison_weight(s) -> None:
    with torch.no_grad():
        s.gated.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def poison_guide(s) -> None:
    with torch.no_grad():
        s.guide.auto.locs.e_layers.fill_(float("nan"))


def nan_gradient(s) -> None:
    loc = s.guide.auto.locs.e_layers
    loc.register_hook(lambda g: torch.full_like(g, float("inf")))


def test_nan_in_the_likelihood_names_tokens_and_the_step_and_resume_recovers(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as err:
        fit(recipe(tiny_llama_dir, corpus), out=out, progress=False, callbacks=[at_step(POISON_AT, poison_weight)])
    msg = str(err.value)
    assert "at step 4" in msg and "tokens=nan" in msg and "kl=" not in msg and "compute=" not in msg
    assert "--resume" in msg and "\n" not in msg
    manifest = rundir.read_json(out / "manifest.json")
    assert manifest["status"] == "failed" and "tokens=nan" in manifest["error"]
    ckpt = checkpoint_files.load_checkpoint(checkpoint_files.find_checkpoint(out))
    assert ckpt["trainer"]["step"] == 2 and manifest["steps_done"] == 2  # the last good checkpoint is kept
    for k, v in ckpt["tensors"].items():
        assert torch.isfinite(v).all(), k
    guide_file = load_file(str(out / "guide.safetensors"))  # the exported posterior is the good one too
    for k, v in guide_file.items():
        assert torch.equal(v, ckpt["tensors"][f"guide.{k}"])
    # Resume (a fresh process would reload the clean base weights; so does fit) with a lower LR.
    run = fit(None, out=out, resume=True, progress=False, overrides=["train.lr_guide=0.005"])
    assert run.status == "finished" and run.manifest["steps_done"] == 6
    steps = run.train_metrics()
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["lr"]["guide"] == pytest.approx(0.005 * steps[-1]["lr"]["push"] / 0.01)  # same schedule
    assert run.recipe.train.lr_guide == 0.005  # the snapshot records the new rate


def test_nan_in_the_guide_names_the_kl_term(tiny_llama_dir, corpus, tmp_path):
    with pytest.raises(NumericalError, match=r"at step 4: .*kl=nan"):
        fit(recipe(tiny_llama_dir, corpus), out=tmp_path / "r", progress=False,
            callbacks=[at_step(POISON_AT, poison_guide)])


def test_non_finite_gradient_names_its_parameter_group(tiny_llama_dir, corpus, tmp_path):
    with pytest.raises(NumericalError, match=r"non-finite gradient at step 4 in parameter group guide=inf"):
        fit(recipe(tiny_llama_dir, corpus), out=tmp_path / "r", progress=False,
            callbacks=[at_step(POISON_AT, nan_gradient)])
    assert rundir.read_json(tmp_path / "r" / "manifest.json")["status"] == "failed"


def test_horseshoe_scales_are_floored():
    from ppn_bayes.bayes.prior import SCALE_FLOOR

    assert SCALE_FLOOR == 1e-6  # documented in docs/training.md, "Numerical guards"
