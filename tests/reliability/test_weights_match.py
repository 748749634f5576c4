"""Weights match their config, and pickles are never loaded (issue 14, mechanism 4).

Model directories whose safetensors do not describe the model their ``config.json`` does must be an
error before any number is printed: on the loading path (``ppn eval``/``fit``: transformers' own
loading report is the evidence) and on the lazy path (``ppn resize`` reads safetensors headers and
slices, never building the model: the headers are compared with a meta-device model of the config).
A folder with a pickle (``pytorch_model.bin``) is never unpickled, whatever else it holds: the
pickles here would create a marker file if they were.
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
from test_bad_input import SMALL_EVAL, fails, inputs, recipe_text, text_corpus, work, write  # noqa: F401

from ppn_bayes.cli import main


class _Evil:
    """A pickle that runs ``touch MARKER`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "unpickled"


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def bad_models(tiny_llama_dir, tmp_path_factory, marker) -> dict[str, Path]:
    """Each a copy of the tiny Llama with its weights and config made to disagree in one way."""
    root = tmp_path_factory.mktemp("mismatch")
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    out = {}

    def copy(name: str) -> Path:
        out[name] = shutil.copytree(tiny_llama_dir, root / name)
        return out[name]

    save_file({"foo": torch.zeros(3)}, str(copy("one_unrelated_tensor") / "model.safetensors"))
    save_file({**weights, "model.rogue.weight": torch.zeros(2)}, str(copy("extra_tensor") / "model.safetensors"))
    _edit_config(copy("fewer_layers"), num_hidden_layers=1)
    _edit_config(copy("more_layers"), num_hidden_layers=3)
    _edit_config(copy("wider_mlp"), intermediate_size=96)
    p = copy("gpt2_config")
    (p / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 320, "n_embd": 32, "n_layer": 2,
                                               "n_head": 4, "n_positions": 128, "architectures": ["GPT2LMHeadModel"]}))
    p = copy("dropped_tensor")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.down_proj.weight"},
              str(p / "model.safetensors"))
    # Pickles next to something that looks like safetensors weights: never unpickled.
    p = copy("pickle_and_small_safetensors")
    (p / "model.safetensors").unlink()
    torch.save(_Evil(marker), p / "pytorch_model.bin")
    save_file({"x": torch.zeros(1)}, str(p / "extra.safetensors"))
    p = copy("pickle_and_one_tensor")
    torch.save(_Evil(marker), p / "pytorch_model.bin")
    save_file({"model.norm.weight": weights["model.norm.weight"]}, str(p / "model.safetensors"))
    return out


LOADING_CASES = [
    ("one_unrelated_tensor", ["missing", "unexpected (e.g. foo)"]),
    ("extra_tensor", ["unexpected (e.g. model.rogue.weight)"]),
    ("fewer_layers", ["unexpected (e.g. model.layers.1."]),
    ("more_layers", ["missing (e.g. model.layers.2."]),
    ("wider_mlp", ["6 of the wrong shape", "down_proj.weight: [32, 64], expected [32, 96]"]),
    ("gpt2_config", ["missing (e.g. transformer.", "unexpected (e.g. model."]),
    ("dropped_tensor", ["1 missing (e.g. model.layers.1.mlp.down_proj.weight)"]),
]


@pytest.mark.parametrize("name,needles", LOADING_CASES)
def test_eval_refuses_weights_that_do_not_match_the_config(name, needles, bad_models, work, capsys):
    model = bad_models[name]
    msg = fails(capsys, ["eval", "--model", model, *SMALL_EVAL], "config.json", "fetch the model again", *needles,
                watch=[model])
    assert "perplexity" not in msg


@pytest.mark.parametrize("name,needles", [c for c in LOADING_CASES if c[0] != "gpt2_config"])
def test_resize_checks_headers_against_the_config(name, needles, bad_models, inputs, work, capsys):
    """The lazy path: no model is built, the safetensors headers are compared with the config's model."""
    model = bad_models[name]
    keep = write(inputs / "keep.json", '{"layers": [0], "heads": [[0, 0]], "groups": [[0, 0]]}')
    fails(capsys, ["resize", "--model", model, "--keepset", keep, "--group-size", "16", "--out", work / "small"],
          "config.json", *needles, watch=[model, inputs])


def test_resize_gpt2_config_over_llama_weights(bad_models, inputs, work, capsys):
    model = bad_models["gpt2_config"]
    keep = write(inputs / "keep.json", '{"layers": [0], "heads": [[0, 0]], "groups": [[0, 0]]}')
    fails(capsys, ["resize", "--model", model, "--keepset", keep, "--group-size", "16", "--out", work / "small"],
          "config.json", watch=[model, inputs])


def test_fit_refuses_mismatched_weights(bad_models, text_corpus, inputs, work, capsys):
    recipe = write(inputs / "r.yaml", recipe_text(bad_models["fewer_layers"], text_corpus))
    fails(capsys, ["fit", recipe, "--out", work / "run", "--no-progress"], "config.json", "unexpected",
          watch=[inputs])


@pytest.mark.parametrize("name,needles", [
    ("pickle_and_small_safetensors", ["no safetensors weights", "pytorch_model.bin is a pickle"]),
    ("pickle_and_one_tensor", ["missing"]),
])
@pytest.mark.parametrize("command", ["eval", "resize"])
def test_pickles_are_never_loaded(name, needles, command, bad_models, marker, inputs, work, capsys):
    model = bad_models[name]
    if command == "eval":
        argv = ["eval", "--model", model, *SMALL_EVAL]
    else:
        keep = write(inputs / "keep.json", '{"layers": [0]}')
        argv = ["resize", "--model", model, "--keepset", keep, "--group-size", "16", "--out", work / "small"]
    fails(capsys, argv, *needles, watch=[model])
    assert not marker.exists()


def test_matching_checkpoints_still_load(tiny_llama_dir, tmp_path):
    """No false alarms: tied (GPT-2) and untied (Llama) checkpoints written by save_pretrained pass both
    checks, and the resize check accepts GPT-2's bare-model tensor names."""
    from transformers import AutoConfig

    from ppn_bayes.export.resize import check_weights_match
    from ppn_bayes.hub.safetensors_files import LazyCheckpoint
    from ppn_bayes.hub.zoo import check_loading_report, load_model
    from tests.tiny_models import tiny_model

    for family in ("gpt2", "llama"):
        path = tmp_path / family
        tiny_model(family).save_pretrained(path)
        check_weights_match(path, AutoConfig.from_pretrained(path), LazyCheckpoint(path))
        tensors = load_file(str(path / "model.safetensors"))
        bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        if family == "gpt2":  # the Hub's GPT-2 files name the bare model: h.0.attn..., wte.weight
            save_file(bare, str(path / "model.safetensors"))
            check_weights_match(path, AutoConfig.from_pretrained(path), LazyCheckpoint(path))
    model, _ = load_model(tiny_llama_dir)
    check_loading_report(tiny_llama_dir, model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []})


def test_loading_report_names_every_kind():
    """The one formatter behind both paths: counts, first example of each kind, the fix."""
    from ppn_bayes.errors import ModelError
    from ppn_bayes.hub.zoo import check_loading_report

    with pytest.raises(ModelError) as info:
        check_loading_report(Path("m"), torch.nn.Linear(1, 1), {
            "missing_keys": ["b", "a"], "unexpected_keys": ["z"],
            "mismatched_keys": [("w", torch.Size([2, 3]), torch.Size([3, 2]))]})
    msg = str(info.value)
    assert "\n" not in msg
    assert "2 missing (e.g. a)" in msg and "1 unexpected (e.g. z)" in msg and "w: [2, 3], expected [3, 2]" in msg


def test_eval_of_a_good_model_still_prints_a_perplexity(tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", "kjv", *SMALL_EVAL, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] > 1


def test_non_utf8_model_path(tiny_llama_dir, tmp_path, work, capsys):
    target = os.fsdecode(os.fsencode(tmp_path) + b"/mod\xe8le")
    try:
        shutil.copytree(tiny_llama_dir, target)
    except OSError:  # pragma: no cover - a file system that insists on UTF-8 names
        pytest.skip("this file system refuses non-UTF-8 names")
    msg = fails(capsys, ["eval", "--model", target, *SMALL_EVAL], "not valid UTF-8", "rename")
    assert "model.safetensors" not in msg


def test_as_a_user_sees_it(bad_models, marker, inputs, tmp_path):
    """Real subprocesses: exit 2, stdout empty, exactly one stderr line (transformers' own loading
    report and progress bars are not printed: the report is checked, not shown)."""
    from test_bad_input import _ppn

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    keep = write(inputs / "keep.json", '{"layers": [0]}')
    cases = [
        (["eval", "--model", bad_models["gpt2_config"], *SMALL_EVAL], "tensor mismatch"),
        (["eval", "--model", bad_models["pickle_and_one_tensor"], *SMALL_EVAL], "missing"),
        (["resize", "--model", bad_models["more_layers"], "--keepset", keep, "--group-size", "16", "--out",
          cwd / "small"], "tensor mismatch"),
    ]
    for argv, needle in cases:
        proc = _ppn(*argv, cwd=cwd)
        assert proc.returncode == 2 and proc.stdout == "", (argv, proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and needle in proc.stderr, \
            proc.stderr
    assert list(cwd.iterdir()) == [] and not marker.exists()
