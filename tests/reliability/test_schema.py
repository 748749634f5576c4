"""Every file the tool reads back is validated on load (issue 14, mechanism 1).

Each case damages one file of a copy of ``tiny_run`` (or writes a hostile keep-set file) the way a
user, a bad copy or an attacker would, runs the real CLI, and asserts what ``fails`` asserts: exit
status 2, exactly one ``error:`` line naming the file and the field, no traceback, and nothing changed
in the run directory, the inputs or the working directory.
"""

# ruff: noqa: F811 - the fixtures of test_bad_input are imported by name, and pytest passes them as arguments
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import SMALL_EVAL, fails, inputs, text_corpus, work, write  # noqa: F401 - fixtures reused

from ppn_bayes.cli import main


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A fresh copy of the module's tiny run, for one test to damage."""
    path = tmp_path / "run"
    shutil.copytree(tiny_run, path)
    return path


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _set(*keys_value):
    *keys, value = keys_value

    def fn(data):
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return fn


# ------------------------------------------------------------------------------------ posterior.json


@pytest.mark.parametrize("edit,needles", [
    (_set("push", "rate", float("nan")), ["posterior.json", "push.rate", "finite"]),
    (_set("push", "temperature", -1.0), ["posterior.json", "push.temperature", "> 0"]),
    (_set("inventory", "dims", "num_layers", "2"), ["posterior.json", "inventory.dims.num_layers", "integer"]),
    (_set("inventory", "group_size", True), ["posterior.json", "inventory.group_size", "integer"]),
    (_set("inventory", "kinds", ["layers", "necks"]), ["posterior.json", "inventory.kinds[1]", "one of"]),
    (_set("guide", "kind", "full_rank"), ["posterior.json", "guide.kind"]),
    (_set("prior", "bogus", 1), ["posterior.json", "unknown key prior.bogus"]),
    (_set("tempering", float("inf")), ["posterior.json", "tempering", "finite"]),
    (lambda d: d.pop("push"), ["posterior.json", "push", "missing"]),
])
def test_posterior_json_fields(edit, needles, run, work, capsys):
    edit_json(run / "posterior.json", edit)
    fails(capsys, ["keepset", run, "--size", "0.5"], *needles, watch=[run])


@pytest.mark.parametrize("raw,needles", [
    ("caf\xe9".encode("latin-1"), ["posterior.json", "not UTF-8"]),
    (b"[" * 100_000, ["posterior.json"]),  # nested past the parser's recursion limit
    (b'"just a string"', ["posterior.json", "expected an object"]),
])
def test_posterior_json_bytes(raw, needles, run, work, capsys):
    (run / "posterior.json").write_bytes(raw)
    fails(capsys, ["keepset", run, "--size", "0.5"], *needles, watch=[run])


# ------------------------------------------------------------------------------------ tensor files


def _grow_first(tensors):
    name = min(k for k in tensors if tensors[k].ndim)
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])


@pytest.mark.parametrize("file,edit,needles", [
    ("guide.safetensors", _grow_first, ["guide.safetensors", "wrong shape"]),
    ("guide.safetensors", lambda t: t.update(extra=torch.zeros(2)), ["guide.safetensors", "unexpected", "extra"]),
    ("push.safetensors", lambda t: t.pop("prior.level"), ["push.safetensors", "missing", "prior.level"]),
    ("push.safetensors", lambda t: t.pop(min(k for k in t if k.startswith("push."))),
     ["push.safetensors", "missing"]),
    ("units.safetensors", lambda t: t.update(norm_heads=torch.zeros(3, 3)), ["units.safetensors", "norm_heads"]),
    ("units.safetensors", lambda t: t["norm_layers"].fill_(float("nan")), ["units.safetensors", "nan"]),
    ("guide.safetensors", lambda t: next(iter(t.values())).fill_(float("inf")), ["guide.safetensors", "inf"]),
])
def test_posterior_tensors(file, edit, needles, run, work, capsys):
    edit_tensors(run / file, edit)
    fails(capsys, ["keepset", run, "--size", "0.5"], *needles, watch=[run])


@pytest.fixture(scope="module")
def other_run(tiny_llama_dir, text_corpus, tmp_path_factory) -> Path:
    """A run of the same base with another unit inventory (group size 32, not 16)."""
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.run import fit

    return fit(recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 32},
                                 "data": {"corpus": str(text_corpus), "block_size": 32, "val_blocks": 1},
                                 "train": {"steps": 1, "batch_size": 2, "eval_lambdas": [0.5]}}),
               out=tmp_path_factory.mktemp("other") / "run", progress=False).path


def test_guide_from_another_run(run, other_run, work, capsys):
    shutil.copy(other_run / "guide.safetensors", run / "guide.safetensors")
    msg = fails(capsys, ["keepset", run, "--size", "0.5"], "guide.safetensors", "wrong shape", watch=[run])
    assert "size mismatch" not in msg


def test_whole_posterior_from_another_run(run, other_run, work, capsys):
    """All four posterior files copied from another run: each well-formed, together not this run's."""
    from ppn_bayes.bayes.posterior import FILES

    for name in FILES:
        shutil.copy(other_run / name, run / name)
    fails(capsys, ["eval", "--run", run, "--size", "0.5", *SMALL_EVAL], "posterior.json", "does not belong to this run",
          "units.group_size", watch=[run])
    fails(capsys, ["report", run, "--sizes", "0.5", "--draws", "8", "--out", work / "rep"], "does not belong",
          watch=[run])


# ------------------------------------------------------------------------------------ manifest, metrics


@pytest.mark.parametrize("edit,needles", [
    (_set("status", 5), ["manifest.json", "status", "expected a string"]),
    (_set("status", "done"), ["manifest.json", "status", "one of"]),
    (_set("steps_done", "2"), ["manifest.json", "steps_done", "integer"]),
    (_set("base", []), ["manifest.json", "base", "expected an object"]),
    (_set("base", "path", 7), ["manifest.json", "base.path", "string"]),
    (_set("weights", "full"), ["manifest.json", "weights", "train.weights"]),
    (lambda d: d.pop("status"), ["manifest.json", "status", "missing"]),
])
def test_manifest_fields(edit, needles, run, work, capsys):
    edit_json(run / "manifest.json", edit)
    fails(capsys, ["eval", "--run", run, "--size", "0.5", *SMALL_EVAL], *needles, watch=[run])


@pytest.mark.parametrize("line,needles", [
    ('{"type": "train", "step": "3", "elbo": 1.0}', ["metrics.jsonl line", "step", "integer"]),
    ('{"type": "train", "step": true}', ["metrics.jsonl line", "step", "integer"]),
    ('{"type": "train", "step": 3, "elbo": "low"}', ["metrics.jsonl line", "elbo", "number"]),
    ('{"type": "gossip", "step": 3}', ["metrics.jsonl line", "type", "one of"]),
    ('[1, 2, 3]', ["metrics.jsonl line", "expected an object"]),
    ('{"type": "train", "step"', ["metrics.jsonl line", "not valid JSON"]),
])
def test_metrics_lines(line, needles, run, work, capsys):
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    out = work / "report"
    fails(capsys, ["report", run, "--sizes", "0.5", "--draws", "8", "--out", out], *needles, watch=[run])
    assert not out.exists()  # checked as a whole before anything is written


def test_metrics_not_utf8(run, work, capsys):
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"type": "train", "step": 3, "note": "\xff"}\n')
    fails(capsys, ["report", run, "--sizes", "0.5", "--draws", "8", "--out", work / "report"], "metrics.jsonl",
          "not UTF-8", watch=[run])


def test_damaged_run_is_rejected_before_resize_writes(run, work, capsys):
    edit_json(run / "manifest.json", _set("steps_done", -4))
    fails(capsys, ["resize", run, "--size", "0.5", "--out", work / "small"], "manifest.json", "steps_done", ">= 0",
          watch=[run])


def test_config_yaml_damaged(run, work, capsys):
    (run / "config.yaml").write_text("train:\n  steps: many\n", encoding="utf-8")
    fails(capsys, ["eval", "--run", run, "--size", "0.5", *SMALL_EVAL], "config.yaml", "train.steps", watch=[run])


def test_non_utf8_run_path_is_blamed_on_the_path(tiny_run, tmp_path, work, capsys):
    """A run directory whose name has a stray Latin-1 byte: the error names the path, not a file in it."""
    parent = os.fsencode(tmp_path) + b"/caf\xe9-run"
    try:
        shutil.copytree(tiny_run, os.fsdecode(parent))
    except OSError:  # pragma: no cover - a file system that insists on UTF-8 names
        pytest.skip("this file system refuses non-UTF-8 names")
    msg = fails(capsys, ["keepset", os.fsdecode(parent), "--size", "0.5"], "not valid UTF-8", "rename")
    assert "units.safetensors" not in msg and "posterior.json" not in msg


# ------------------------------------------------------------------------------------ checkpoint (resume)


class _Evil:
    """Unpickling this would run ``touch MARKER``: what a planted optimizer.pt would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _resume(run: Path) -> list:
    return ["fit", "--resume", "--out", run, "--no-progress", "--set", "train.steps=3"]


@pytest.mark.parametrize("damage,needles", [
    ("trainer_type", ["trainer.json", "step", "integer"]),
    ("trainer_negative", ["trainer.json", "step", ">= 0"]),
    ("trainer_utf8", ["trainer.json", "not UTF-8"]),
    ("rng_names", ["rng.safetensors", "random state"]),
    ("state_missing", ["state.safetensors", "missing"]),
    ("state_shape", ["state.safetensors", "wrong shape"]),
    ("optimizer_truncated", ["optimizer.pt", "damaged"]),
    ("optimizer_shape", ["optimizer.pt", "param_groups"]),
])
def test_damaged_checkpoint_changes_nothing(damage, needles, run, work, capsys):
    ckpt = run / "checkpoint"
    if damage.startswith("trainer"):
        if damage == "trainer_utf8":
            (ckpt / "trainer.json").write_bytes(b'{"step": "\xff"}')
        else:
            edit_json(ckpt / "trainer.json", _set("step", "2" if damage == "trainer_type" else -1))
    elif damage == "rng_names":
        save_file({"numpy": torch.zeros(4, dtype=torch.uint8)}, str(ckpt / "rng.safetensors"))
    elif damage == "state_missing":
        edit_tensors(ckpt / "state.safetensors", lambda t: t.pop(min(t)))
    elif damage == "state_shape":
        edit_tensors(ckpt / "state.safetensors", _grow_first)
    elif damage == "optimizer_truncated":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    else:
        torch.save({"state": {}, "param_groups": "all of them"}, ckpt / "optimizer.pt")
    fails(capsys, _resume(run), *needles, watch=[run])


def test_malicious_optimizer_is_refused_never_unpickled(run, tmp_path, work, capsys):
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), run / "checkpoint" / "optimizer.pt")
    msg = fails(capsys, _resume(run), "optimizer.pt", "damaged or untrusted", "delete", watch=[run])
    assert "weights_only" not in msg and "weights-only" not in msg  # never advise a less safe load
    assert not marker.exists()


# ------------------------------------------------------------------------------------ keep-set files


@pytest.mark.parametrize("content,needles", [
    ('{"layers": [1.7, true]}', ["keep.json", "layers[0]", "integer", "1.7"]),
    ('{"layers": [true]}', ["keep.json", "layers[0]", "integer", "True"]),
    ('{"layers": [0], "heads": [[0]]}', ["keep.json", "heads[0]", "2 items"]),
    ('{"layers": [0], "groups": [[0, "1"]]}', ["keep.json", "groups[0][1]", "integer"]),
    ('{"layers": [-1]}', ["keep.json", "layers[0]", ">= 0"]),
    ('{"layers": "0,1"}', ["keep.json", "layers", "expected a list"]),
    ('[0, 1]', ["keep.json", "expected an object"]),
    ('{"heads": [[0, 1]]}', ["keep.json", "layers", "missing"]),
])
def test_keepset_file_is_strict(content, needles, tiny_llama_dir, inputs, work, capsys):
    keep = write(inputs / "keep.json", content)
    fails(capsys, ["resize", "--model", tiny_llama_dir, "--keepset", keep, "--group-size", "16", "--out",
                   work / "small"], *needles, watch=[inputs, tiny_llama_dir])


def test_keepset_file_not_utf8(tiny_llama_dir, inputs, work, capsys):
    keep = inputs / "latin.json"
    keep.write_bytes('{"layers": [0], "note": "caf\xe9"}'.encode("latin-1"))
    fails(capsys, ["resize", "--model", tiny_llama_dir, "--keepset", keep, "--group-size", "16", "--out",
                   work / "small"], "latin.json", "not UTF-8", watch=[inputs])


def test_keepset_from_dict_rejects_what_int_would_accept():
    """The Python API too: ``int(1.7) == 1`` and ``int(True) == 1`` must not make a keep-set."""
    from ppn_bayes.backbone.units import KeepSet
    from ppn_bayes.errors import ConfigError

    assert KeepSet.from_dict({"layers": [1, 0], "heads": [[0, 1]]}).layers == [1, 0]
    for bad in ({"layers": [1.7]}, {"layers": [True]}, {"layers": [0], "heads": [[0, 1, 2]]}):
        with pytest.raises(ConfigError):
            KeepSet.from_dict(bad)


def test_intact_run_still_passes(run, capsys):
    """The validators accept what ppn fit writes (the schemas are not stricter than the writers)."""
    from ppn_bayes.run import load_run

    load_run(run)
    assert main(["keepset", str(run), "--size", "0.5", "--json"]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------------------------ trained weights


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, text_corpus, tmp_path_factory) -> Path:
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.run import fit

    recipe = recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
                               "data": {"corpus": str(text_corpus), "block_size": 32, "val_blocks": 1},
                               "train": {"steps": 1, "batch_size": 2, "weights": "lora", "lora_rank": 2,
                                         "eval_lambdas": [0.5]}})
    return fit(recipe, out=tmp_path_factory.mktemp("lora") / "run", progress=False).path


@pytest.mark.parametrize("damage,needles", [
    ("rank", ["adapter.safetensors", "not a LoRA factor of rank 2"]),
    ("unpaired", ["adapter.safetensors", "lacks adapter pairs"]),
    ("nan", ["adapter.safetensors", "NaN or inf"]),
    ("missing", ["adapter.safetensors is missing"]),
])
@pytest.mark.parametrize("command", ["eval", "resize"])
def test_damaged_adapter(damage, needles, command, lora_run, tmp_path, work, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    path = run / "adapter.safetensors"
    if damage == "missing":
        path.unlink()
    elif damage == "rank":
        edit_tensors(path, lambda t: t.update({min(k for k in t if k.endswith(".A")): torch.zeros(3, 32)}))
    elif damage == "unpaired":
        edit_tensors(path, lambda t: t.pop(min(k for k in t if k.endswith(".B"))))
    else:
        edit_tensors(path, lambda t: t[min(t)].fill_(float("nan")))
    argv = (["eval", "--run", run, "--size", "0.5", *SMALL_EVAL] if command == "eval"
            else ["resize", run, "--size", "0.5", "--out", work / "small"])
    fails(capsys, argv, *needles, watch=[run])


# ------------------------------------------------------------------------------------ resized exports


@pytest.fixture(scope="module")
def shaped_export(tiny_llama_dir, tmp_path_factory) -> Path:
    """A ``ppn resize`` export whose layers keep different head counts (the ``ppn_layer_shapes`` form)."""
    root = tmp_path_factory.mktemp("export")
    keep = root / "keep.json"
    keep.write_text('{"layers": [0, 1], "heads": [[0, 0], [1, 0], [1, 1]], "groups": [[0, 0], [1, 0]]}')
    assert main(["resize", "--model", str(tiny_llama_dir), "--keepset", str(keep), "--group-size", "16",
                 "--out", str(root / "small"), "--json"]) == 0
    assert "ppn_layer_shapes" in json.loads((root / "small" / "config.json").read_text())
    return root / "small"


@pytest.mark.parametrize("file,edit,needles", [
    ("ppn-resize.json", _set("report", "size_params", "half"), ["ppn-resize.json", "report.size_params", "number"]),
    ("ppn-resize.json", _set("keepset", "layers", 2), ["ppn-resize.json", "keepset.layers", "list"]),
    ("config.json", lambda d: d["ppn_layer_shapes"][0].update(channels="x"),
     ["ppn_layer_shapes", "[0].channels", "integer"]),
    ("config.json", lambda d: d["ppn_layer_shapes"].pop(), ["ppn_layer_shapes", "list of 2 items"]),
])
def test_damaged_export(file, edit, needles, shaped_export, tmp_path, work, capsys):
    model = shutil.copytree(shaped_export, tmp_path / "small")
    edit_json(model / file, edit)
    fails(capsys, ["eval", "--model", model, *SMALL_EVAL], *needles, watch=[model])


def test_export_tensor_of_the_wrong_shape(shaped_export, tmp_path, work, capsys):
    model = shutil.copytree(shaped_export, tmp_path / "small")
    edit_tensors(model / "model.safetensors", _grow_first)
    fails(capsys, ["eval", "--model", model, *SMALL_EVAL], "model.safetensors", "wrong shape", watch=[model])
