"""``resize_run`` / ``ppn resize``: a run's export at a size is the network the run serves at that size.

The reference is :func:`ppn_bayes.evaluation.targets.load_run_target` (the base model with the run's trained
weights or merged LoRA, gated by the keep-set's masks times the push's amplitudes at lambda*). A
2-step run barely moves its amplitude scales, adapters and weights away from their initial values
(where they change nothing), so the fixture then sets them to random values in the run's own files:
the check then fails if any of the four amplitude kinds, the adapters or the weights are not folded.

Tolerance: the export and the gated model compute the same float32 products in a different order
(merged vs folded LoRA, pre-scaled vs hooked amplitudes), so logits agree to round-off of O(1)
values through 2 layers; atol 2e-5 (observed <= 1.5e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppn_bayes.cli import main
from ppn_bayes.errors import ConfigError, ModelError, RunError, SizeError
from ppn_bayes.export.from_run import resize_run
from ppn_bayes.export.load import load_resized
from ppn_bayes.export.resize import MANIFEST

ATOL = 2e-5
VOCAB = 320


def _perturb(path: Path, keys, scale: float, seed: int) -> None:
    """Add noise to some tensors of a run's safetensors file (rewritten in place, metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for k in list(tensors):
        if keys(k):
            tensors[k] = tensors[k] + scale * torch.randn(tensors[k].shape, generator=g).to(tensors[k].dtype)
    save_file(tensors, str(path), metadata=metadata)


def _fit(model_dir: Path, root: Path, weights: str) -> Path:
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.data.corpus import load_corpus
    from ppn_bayes.run import fit

    corpus = root / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    recipe = recipe_from_dict({
        "name": f"tiny-{weights}", "model": {"name": str(model_dir)}, "units": {"group_size": 16},
        "push": {"amplitude": True},
        "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "weights": weights, "eval_lambdas": [0.5]}})
    run = fit(recipe, out=root / "run", progress=False).path
    _perturb(run / "push.safetensors", lambda k: k.split(".")[-1] in ("s_heads", "s_groups", "s_attn", "s_mlp"),
             0.5, seed=1)
    if weights == "lora":
        _perturb(run / "adapter.safetensors", lambda k: k.endswith(".B"), 0.05, seed=2)
    else:
        _perturb(run / "weights.safetensors", lambda k: True, 0.02, seed=3)
    return run


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, tmp_path_factory) -> Path:
    return _fit(tiny_llama_dir, tmp_path_factory.mktemp("lora-run"), "lora")


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, tmp_path_factory) -> Path:
    return _fit(tiny_llama_dir, tmp_path_factory.mktemp("full-run"), "full")


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("which", ["lora", "full"])
def test_export_equals_the_runs_gated_network_at_the_size(which, lora_run, full_run, tmp_path):
    from ppn_bayes.evaluation.targets import load_run_target
    from ppn_bayes.run import load_run

    run = load_run(lora_run if which == "lora" else full_run)
    result = run.keepset(size=0.5)
    assert result.lam > 0  # amplitudes are applied at this size, so the check covers them
    amps = run.posterior.push.amplitudes(result.lam)
    assert all((v - 1).abs().max() > 0.05 for v in amps.values())  # every kind really rescales

    report = resize_run(run, tmp_path / "out", size=0.5)
    assert report["amplitudes"] == ["attn_scale", "groups", "heads", "mlp_scale"]
    assert report["trained_weights"] == which
    assert (report["lora_folded"] > 0) == (which == "lora") and (report["weights_overridden"] > 0) == (which == "full")
    target = load_run_target(run, size=0.5)
    with torch.no_grad():
        expected = target.model(ids()).logits
        got = load_resized(tmp_path / "out")(ids()).logits
        base = load_resized(run.base_path())(ids()).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 100 * ATOL  # not trivially the base model


def test_cli_json_fields_and_manifest(lora_run, tmp_path, capsys):
    from ppn_bayes.run import load_run

    out = tmp_path / "half"
    assert main(["resize", str(lora_run), "--size", "0.5", "--quantile", "0.4", "--draws", "64",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = load_run(lora_run).keepset(size=0.5, quantile=0.4, num_draws=64)
    assert report["run"] == str(lora_run) and report["out"] == str(out)
    assert report["requested"] == {"kind": "size", "value": 0.5, "currency": "params"}
    assert report["requested_size"] == 0.5
    assert report["achieved_size"] == pytest.approx(result.achieved_size) and 0 < report["achieved_size"] <= 0.5
    assert report["lambda"] == pytest.approx(result.lam) and report["quantile"] == 0.4 and report["draws"] == 64
    assert report["form"] in ("standard", "ppn_layer_shapes") and report["loader"]
    assert report["size_params"] == pytest.approx(report["achieved_size"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["report"] == report
    assert manifest["keepset"] == load_run(lora_run).inventory.complete(result.keep).to_dict()
    assert (out / "tokenizer.json").is_file()
    # human output names the size, lambda and loader
    assert main(["resize", str(lora_run), "--size", "0.5", "--out", str(out), "--force"]) == 0
    text = capsys.readouterr().out
    assert "achieved size" in text and "lambda" in text and "load with" in text


def test_keepset_file_without_a_run(lora_run, tiny_llama_dir, tmp_path, capsys):
    """The `ppn keepset --json` output (or a bare KeepSet dict) of the run, exported from the base model."""
    from ppn_bayes.backbone import gate
    from ppn_bayes.hub.zoo import load_model

    assert main(["keepset", str(lora_run), "--size", "0.5", "--json"]) == 0
    (tmp_path / "ks.json").write_text(capsys.readouterr().out)
    keep_dict = json.loads((tmp_path / "ks.json").read_text())["keep"]
    (tmp_path / "bare.json").write_text(json.dumps(keep_dict))
    for name in ("ks.json", "bare.json"):
        out = tmp_path / f"out-{name}"
        assert main(["resize", "--model", str(tiny_llama_dir), "--keepset", str(tmp_path / name),
                     "--group-size", "16", "--kinds", "layers,heads,groups", "--out", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["keepset_file"] == str(tmp_path / name) and report["amplitude_tensors_folded"] == 0
    from ppn_bayes.backbone.units import KeepSet

    model, _ = load_model(tiny_llama_dir)
    g = gate(model, group_size=16)
    with torch.no_grad(), g.keep(KeepSet.from_dict(keep_dict)):
        expected = g(ids()).logits
    torch.testing.assert_close(load_resized(tmp_path / "out-bare.json")(ids()).logits, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ errors


def _fails(capsys, argv, needle: str, out: Path) -> None:
    """Exit 2, one line naming the problem, and nothing new next to ``out``."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = _listing(parent)
    capsys.readouterr()  # drop what setup printed (transformers' progress bars)
    assert main(["resize", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert _listing(parent) == before  # no output, no temporary sibling


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_run_from_another_base_model_is_refused(lora_run, tiny_llama_dir, tmp_path, capsys):
    from tests.conftest import make_tiny_llama

    other = tmp_path / "other-base"
    make_tiny_llama(VOCAB, seed=0, intermediate_size=96).save_pretrained(other)
    _fails(capsys, [str(lora_run), "--size", "0.5", "--model", str(other)], "hash differs", tmp_path / "o" / "x")
    # a run whose manifest records another model's hashes
    moved = tmp_path / "run-copy"
    shutil.copytree(lora_run, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["base"]["weights_sha256"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(manifest))
    _fails(capsys, [str(moved), "--size", "0.5"], "pass the run's own base model", tmp_path / "o" / "x")
    with pytest.raises(RunError, match="weights hash differs"):
        resize_run(moved, tmp_path / "o" / "x", size=0.5)


@pytest.mark.parametrize(("size", "needle"), [("1.5", "must be in (0, 1]"), ("0.0001", "below the smallest")])
def test_size_out_of_range(size, needle, lora_run, tmp_path, capsys):
    _fails(capsys, [str(lora_run), "--size", size], needle, tmp_path / "o" / "x")
    with pytest.raises(SizeError):
        resize_run(lora_run, tmp_path / "o" / "x", size=float(size))


def test_existing_output_needs_force(lora_run, tmp_path, capsys):
    out = tmp_path / "o" / "x"
    out.mkdir(parents=True)
    (out / "keep-me.txt").write_text("mine")
    _fails(capsys, [str(lora_run), "--size", "0.5"], "already exists", out)
    assert _listing(out) == ["keep-me.txt"]
    with pytest.raises(ConfigError, match="pass --force"):
        resize_run(lora_run, out, size=0.5)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_base_weights(damage, lora_run, tiny_llama_dir, tmp_path, capsys):
    base = _copy_model(tiny_llama_dir, tmp_path / "base")
    weights = base / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        needle = "no safetensors weights"
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        needle = "truncated or corrupt"
    _fails(capsys, [str(lora_run), "--size", "0.5", "--model", str(base)], needle, tmp_path / "o" / "x")
    with pytest.raises(ModelError, match=needle):
        resize_run(lora_run, tmp_path / "o" / "x", size=0.5, base=base)
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"layers": [0]}))
    _fails(capsys, ["--model", str(base), "--keepset", str(keep), "--group-size", "16"], needle, tmp_path / "o" / "x")


def test_cli_usage_errors(lora_run, tiny_llama_dir, tmp_path, capsys):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"layers": [0, 5]}))
    out = tmp_path / "o" / "x"
    _fails(capsys, [], "give a run directory", out)
    _fails(capsys, [str(lora_run)], "give one target", out)
    _fails(capsys, [str(lora_run), "--size", "0.5", "--keepset", str(keep)], "without a run", out)
    _fails(capsys, ["--keepset", str(keep), "--model", str(tiny_llama_dir)], "--group-size", out)
    _fails(capsys, ["--keepset", str(keep), "--model", str(tiny_llama_dir), "--group-size", "16"], "layer 5", out)
    _fails(capsys, ["--keepset", str(tmp_path / "nope.json"), "--model", str(tiny_llama_dir), "--group-size", "16"],
           "does not exist", out)


# ------------------------------------------------------------------------------------ plain transformers


def test_layer_only_export_loads_and_generates_with_plain_transformers(full_run, tmp_path, capsys):
    from ppn_bayes.run import load_run

    out = tmp_path / "layers1"
    assert main(["resize", str(full_run), "--layers", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["form"] == "standard" and report["loader"] == "AutoModelForCausalLM.from_pretrained"
    assert report["num_layers"] == 1 and report["requested"]["kind"] == "layers"
    run = load_run(full_run)
    result = run.keepset(layers=1)
    gated = run.load_model()
    with torch.no_grad():
        gated.set_gates(**run.posterior.push.gates(run.inventory.masks(result.keep), result.lam))
        expected = gated(ids()).logits
    save_file({"ids": ids()}, str(tmp_path / "ids.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        x = load_file({str(tmp_path / 'ids.safetensors')!r})["ids"]
        prompt = tok("It is a truth", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = m(x).logits.contiguous()
            gen = m.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert m.config.num_hidden_layers == 1 and gen.shape[1] == prompt.shape[1] + 8
        save_file({{"logits": logits, "gen": gen.contiguous()}}, {str(tmp_path / 'got.safetensors')!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(tmp_path / "got.safetensors"))
    torch.testing.assert_close(got["logits"], expected, atol=ATOL, rtol=0)
