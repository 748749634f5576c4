"""Bad input, clear errors (issue 7, item 1): every wrong input a user can give the ``ppn`` CLI ends
in exit status 2 and ONE stderr line ``error: <problem>; <fix>``, no traceback, and nothing written.

Each case runs the real CLI in-process (``ppn_bayes.cli.main``) from inside a fresh working directory,
with every output path pointing into it, and compares a snapshot of that tree (paths, sizes, mtimes)
before and after: no run directory, no ``compare-out/``, no temporary or partial file may appear.
A few cases also run ``python -m ppn_bayes.cli`` in a real subprocess to check the exit status and
the raw stderr as a user sees it.
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

from ppn_bayes.cli import main

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
SMALL_EVAL = ["--block-size", "32", "--max-blocks", "2", "--batch-size", "2", "--device", "cpu"]


# ------------------------------------------------------------------------------------------ fixtures
# Bad inputs, each built once per session from the tiny Llama (seconds in all). They live here, not in
# a tests/reliability/conftest.py: a second module named ``conftest`` would shadow tests/conftest.py
# for the test files that do ``from conftest import make_tiny_llama``.


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A single-file corpus long enough for a few blocks of 32 tokens."""
    from ppn_bayes.data.corpus import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with the same tokenizer but another shape (wider MLP): a different base model."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("other-base")
    make_tiny_llama(len(tiny_tokenizer), seed=1, intermediate_size=96).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def foreign_run(tiny_run, other_base_dir, tmp_path_factory) -> Path:
    """A copy of ``tiny_run`` whose recorded base path now holds another model: its manifest hashes
    no longer match what is on disk there (a moved run, or a base directory overwritten since)."""
    path = tmp_path_factory.mktemp("foreign") / "run"
    shutil.copytree(tiny_run, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["base"]["path"] = str(other_base_dir)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A complete, loadable checkpoint of an unsupported family (``model_type: bert``)."""
    import torch
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, is_decoder=True)
    path = tmp_path_factory.mktemp("bert")
    BertLMHeadModel(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def truncated_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its ``model.safetensors`` cut in half (an interrupted download)."""
    path = _copy_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("trunc") / "model")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def no_weights_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama without any safetensors file (config and tokenizer only)."""
    path = _copy_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("noweights") / "model")
    (path / "model.safetensors").unlink()
    return path


@pytest.fixture(scope="session")
def vocab_mismatch_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose embedding has fewer rows (200) than its tokenizer has tokens (320)."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("vocab")
    make_tiny_llama(200).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    assert len(tiny_tokenizer) > 200
    return path


# ------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (hidden ones too) with its kind, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (default outputs such as ``runs/<name>`` would land here)."""
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def fails(capsys, argv: list[str], *needles: str, watch: list[Path] = ()) -> str:
    """Run ``ppn ARGV``; assert exit 2, one ``error:`` line naming every needle, and no change under
    ``watch`` (the working directory is always watched). Returns the message."""
    roots = [Path.cwd(), *watch]
    before = [snapshot(r) for r in roots]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    for root, snap in zip(roots, before):
        assert snapshot(root) == snap, f"{root} changed: {sorted(set(snapshot(root)) ^ set(snap))}"
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def recipe_text(model: Path | str, corpus: Path | str, data: str = "", train: str = "") -> str:
    return (f"name: bad\nmodel:\n  name: {model}\nunits:\n  group_size: 16\n"
            f"data:\n  corpus: {corpus}\n  block_size: 32\n  val_blocks: 2\n{data}"
            f"train:\n  steps: 2\n  batch_size: 2\n  eval_lambdas: [0.5]\n  device: cpu\n{train}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Recipes and corpora live here, outside the watched working directory."""
    return tmp_path_factory.mktemp("inputs")


def fit_fails(capsys, inputs: Path, text: str, *needles: str, extra: tuple = ()) -> str:
    recipe = write(inputs / "bad.yaml", text)
    msg = fails(capsys, ["fit", recipe, "--out", Path.cwd() / "run", "--no-progress", *extra], *needles,
                watch=[inputs])
    assert not (Path.cwd() / "run").exists()
    return msg


# ------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv,needles", [
    (["keepset", "RUN", "--size", "0,5"], ["ppn keepset", "--size", "invalid float value", "--help"]),
    (["keepset", "RUN"], ["ppn keepset", "--size", "required"]),
    (["fitt", "x.yaml"], ["invalid choice: 'fitt'", "ppn --help"]),
    (["eval", "--block-size", "many"], ["ppn eval", "--block-size", "invalid int value"]),
    (["bench", "speed", "--sizes"], ["ppn bench speed", "--sizes", "expected one argument"]),
])
def test_usage_errors_are_one_line(argv, needles, work, capsys):
    """argparse's own errors (bad flag values, missing arguments) follow the same one-line rule."""
    before = snapshot(work)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("text,needles", [
    ("train:\n  stpes: 5\n", ["unknown key train.stpes", "valid keys", "did you mean train.steps?"]),
    ("trian:\n  steps: 5\n", ["unknown key trian", "valid keys", "did you mean train?"]),
    ("train:\n  lr_guide: fast\n", ["train.lr_guide", "expected a number", "'fast'"]),
    ("train:\n  steps: 2.5\n", ["train.steps", "expected an integer"]),
    ("train:\n  steps: 0\n", ["train.steps", ">= 1"]),
    ("train:\n  weights: partial\n", ["train.weights", "one of"]),
    ("train: 5\n", ["train", "expected a mapping"]),
    ("preset: mine\n", ["preset", "'ours'"]),
    ("model:\n  dtype: int8\n", ["model.dtype", "'float32'"]),
    ("train:\n  eval_lambdas: [0, 1]\n", ["train.eval_lambdas", "> 0"]),
    ("model:\n  name: [unclosed\n", ["not valid YAML", "line"]),
    ("train:\n\tsteps: 5\n", ["not valid YAML"]),
    ("- model\n- train\n", ["must be a mapping", "list"]),
    ("just some words\n", ["must be a mapping", "str"]),
    ("x: !!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]),
])
def test_recipe_errors(text, needles, inputs, work, capsys):
    fit_fails(capsys, inputs, text, *needles)


def test_recipe_not_utf8(inputs, work, capsys):
    recipe = inputs / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    fails(capsys, ["fit", recipe, "--out", work / "run"], "not UTF-8", watch=[inputs])


def test_missing_recipe(work, capsys):
    fails(capsys, ["fit", work / "nope.yaml", "--out", work / "run"], "not found", "YAML")


def test_no_recipe_and_no_run(work, capsys):
    fails(capsys, ["fit", "--out", work / "run"], "no recipe given", "--resume")


@pytest.mark.parametrize("override,needles", [
    ("train.stpes=3", ["unknown key train.stpes"]),
    ("train.steps=many", ["train.steps", "expected an integer"]),
    ("train.steps=-1", ["train.steps", ">= 1"]),
    ("steps", ["not KEY=VALUE", "--set train.steps=20"]),
    ("=3", ["not KEY=VALUE"]),
    ("train..steps=3", ["not KEY=VALUE"]),
    ("train.steps.max=3", ["steps is not a section"]),
    ("train=3", ["train", "expected a mapping"]),
    ("train.betas=[0.9", ["not valid YAML", "quote"]),
    ("train.device=tpu", ["train.device", "cpu"]),
])
def test_set_override_errors(override, needles, tiny_llama_dir, text_corpus, inputs, work, capsys):
    fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, text_corpus), *needles, extra=("--set", override))


def test_existing_run_is_never_overwritten(tiny_run, tiny_llama_dir, text_corpus, inputs, work, capsys):
    recipe = write(inputs / "again.yaml", recipe_text(tiny_llama_dir, text_corpus))
    fails(capsys, ["fit", recipe, "--out", tiny_run, "--no-progress"], "already holds a run", "--resume",
          watch=[tiny_run])


def test_out_is_a_file(tiny_llama_dir, text_corpus, inputs, work, capsys):
    recipe = write(inputs / "ok.yaml", recipe_text(tiny_llama_dir, text_corpus))
    write(work / "taken", "not a directory")
    fails(capsys, ["fit", recipe, "--out", work / "taken", "--no-progress"], "is a file", "directory")


def test_resume_with_another_model_changes_nothing(tiny_run, other_base_dir, text_corpus, inputs, work, capsys):
    recipe = write(inputs / "other.yaml", recipe_text(other_base_dir, text_corpus))
    fails(capsys, ["fit", recipe, "--out", tiny_run, "--resume", "--no-progress"], "cannot resume",
          "model.name", watch=[tiny_run])


def test_batch_larger_than_the_data(tiny_llama_dir, text_corpus, inputs, work, capsys):
    text = recipe_text(tiny_llama_dir, text_corpus).replace("batch_size: 2", "batch_size: 4096")
    fit_fails(capsys, inputs, text, "train.batch_size 4096", "lower it")


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("flags,needles", [
    (["--size", "0"], ["> 0"]),
    (["--size", "-0.5"], ["> 0"]),
    (["--size", "1.5"], ["(0, 1]"]),
    (["--size", "0.0001"], ["below the smallest model"]),
    (["--params", "1"], ["below the smallest model"]),
    (["--flops", "0"], ["flops"]),
    (["--layers", "0"], ["layers"]),
    (["--layers", "99"], ["layers"]),
    (["--size", "0.5", "--quantile", "1.5"], ["quantile"]),
    (["--size", "0.5", "--draws", "0"], ["draws"]),
])
def test_keepset_size_out_of_range(flags, needles, tiny_run, work, capsys):
    fails(capsys, ["keepset", tiny_run, *flags], *needles, watch=[tiny_run])


def test_keepset_missing_run(work, capsys):
    fails(capsys, ["keepset", work / "no-run", "--size", "0.5"], "no-run", "ppn fit")


def test_keepset_not_a_run(tiny_llama_dir, work, capsys):
    fails(capsys, ["keepset", tiny_llama_dir, "--size", "0.5"], "posterior.json", "ppn fit")


@pytest.mark.parametrize("size,needle", [("2", "(0, 1]"), ("0", "> 0"), ("1e-6", "below the smallest model")])
def test_eval_run_size_out_of_range(size, needle, tiny_run, work, capsys):
    fails(capsys, ["eval", "--run", tiny_run, "--size", size, *SMALL_EVAL], needle, watch=[tiny_run])


@pytest.mark.parametrize("sizes,needle", [("abc", "--sizes"), ("0", "--sizes 0 is out of range"),
                                          ("1.5", "(0, 1]"), ("0.5,-1", "--sizes -1")])
def test_bench_bad_sizes(sizes, needle, work, capsys):
    """Checked before the model loads (the model named here does not even exist)."""
    fails(capsys, ["bench", "speed", "--model", work / "no-model", "--device", "cpu", "--sizes", sizes], needle)


@pytest.mark.parametrize("flag", ["--batch-sizes", "--prompt-len", "--new-tokens", "--repeats"])
def test_bench_bad_counts(flag, work, capsys):
    fails(capsys, ["bench", "speed", "--model", work / "no-model", "--device", "cpu", flag, "0"], flag, "at least 1")


@pytest.mark.parametrize("sizes,needle", [("0.5,1.5", "(0, 1]"), ("0.5,x", "sizes"), ("1e-6", "below the smallest")])
def test_report_bad_sizes(sizes, needle, tiny_run, work, capsys):
    fails(capsys, ["report", tiny_run, "--sizes", sizes, "--draws", "8", "--out", work / "report"], needle,
          watch=[tiny_run])
    fails(capsys, ["report", tiny_run, "--sizes", sizes, "--draws", "8"], needle, watch=[tiny_run])  # out: the run


def test_uncertainty_size_out_of_range(tiny_run, work, capsys):
    fails(capsys, ["uncertainty", tiny_run, "--size", "1.5"], "(0, 1]", watch=[tiny_run])


def test_resize_keeps_an_existing_out(tiny_run, work, capsys):
    _needs_resize_cli()
    out = work / "small"
    out.mkdir()
    write(out / "mine.txt", "do not touch")
    fails(capsys, ["resize", tiny_run, "--size", "0.5", "--out", out], "already exists", "--force",
          watch=[tiny_run])


def test_resize_bad_keepset_file(tiny_llama_dir, inputs, work, capsys):
    _needs_resize_cli()
    bad = write(inputs / "keep.json", "{not json")
    fails(capsys, ["resize", "--model", tiny_llama_dir, "--keepset", bad, "--group-size", "16", "--out",
                   work / "small"], "keep.json", watch=[inputs, tiny_llama_dir])


# ----------------------------------------------------------------------------- unknown model families


def test_fit_unknown_family(bert_dir, text_corpus, inputs, work, capsys):
    fit_fails(capsys, inputs, recipe_text(bert_dir, text_corpus), "unsupported architecture 'bert'", "llama")


def test_bench_unknown_family(bert_dir, work, capsys):
    fails(capsys, ["bench", "speed", "--model", bert_dir, "--device", "cpu", "--sizes", "1.0,0.5",
                   "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                   "--plot", work / "speed.png"], "unsupported architecture 'bert'", "llama", watch=[bert_dir])


def test_compare_unknown_family(bert_dir, work, capsys):
    fails(capsys, ["compare", "--model", bert_dir, "--device", "cpu", "--data", "kjv", "--sizes", "0.5",
                   "--methods", "random", "--block-size", "32", "--calib-blocks", "2", "--test-blocks", "2",
                   "--decode-tokens", "0", "--out", work / "cmp"], "unsupported architecture 'bert'", "llama",
          watch=[bert_dir])


def test_unknown_alias_or_missing_dir(work, capsys):
    fails(capsys, ["eval", "--model", "./no/such/model", *SMALL_EVAL], "does not exist", "alias")


# ----------------------------------------------------------------------- missing or truncated weights


@pytest.mark.parametrize("which,needles", [
    ("truncated", ["truncated or corrupt", "fetch again"]),
    ("no_weights", ["no safetensors weights", "safetensors"]),
])
def test_eval_bad_weights(which, needles, truncated_dir, no_weights_dir, work, capsys):
    model = {"truncated": truncated_dir, "no_weights": no_weights_dir}[which]
    fails(capsys, ["eval", "--model", model, *SMALL_EVAL], *needles, watch=[model])


def test_fit_truncated_weights(truncated_dir, text_corpus, inputs, work, capsys):
    fit_fails(capsys, inputs, recipe_text(truncated_dir, text_corpus), "truncated or corrupt", "fetch again")


def test_pickle_weights_are_refused(tiny_llama_dir, tmp_path, work, capsys):
    """A checkpoint with only ``pytorch_model.bin`` (pickle) is refused, not unpickled."""
    model = tmp_path / "pickle-model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    fails(capsys, ["eval", "--model", model, *SMALL_EVAL], "safetensors", watch=[model])


@pytest.mark.parametrize("damage,needle", [
    ("manifest", "not valid JSON"),
    ("posterior", "posterior"),
    ("guide", "guide.safetensors"),
])
def test_damaged_run(damage, needle, tiny_run, tmp_path, work, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    if damage == "manifest":
        write(run / "manifest.json", '{"status": "fini')
        argv = ["eval", "--run", run, "--size", "0.5", *SMALL_EVAL]
    elif damage == "posterior":
        write(run / "posterior.json", "[1, 2")
        argv = ["keepset", run, "--size", "0.5"]
    else:
        data = (run / "guide.safetensors").read_bytes()
        (run / "guide.safetensors").write_bytes(data[: len(data) // 2])
        argv = ["keepset", run, "--size", "0.5"]
    fails(capsys, argv, needle, watch=[run])


@pytest.mark.parametrize("config,needle", [("{not json", "cannot load model"), ('{"hidden_size": 8}', "cannot load")])
def test_broken_config_json(config, needle, tiny_llama_dir, tmp_path, work, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    write(model / "config.json", config)
    fails(capsys, ["eval", "--model", model, *SMALL_EVAL], needle, watch=[model])


# ---------------------------------------------------------------------------- run from another base


def test_check_base_names_both_models(foreign_run, other_base_dir, tiny_llama_dir):
    from ppn_bayes.errors import RunError
    from ppn_bayes.run import Run

    run = Run(foreign_run)
    run.check_base(tiny_llama_dir)  # its real base passes
    with pytest.raises(RunError) as info:
        run.check_base(other_base_dir)
    msg = str(info.value)
    assert "\n" not in msg and "hash differs" in msg and "pass the run's own base model" in msg


def _needs_resize_cli():
    from ppn_bayes.cli import COMMANDS

    if "resize" not in COMMANDS:
        pytest.skip("`ppn resize` is not registered yet (Run.check_base is tested above)")


@pytest.mark.parametrize("with_model", [True, False])
def test_resize_from_another_base(with_model, foreign_run, other_base_dir, work, capsys):
    """``--model OTHER``, or no --model while the recorded base path now holds another model."""
    _needs_resize_cli()
    model = ["--model", other_base_dir] if with_model else []
    fails(capsys, ["resize", foreign_run, "--size", "0.5", *model, "--out", work / "small"], "hash differs",
          watch=[foreign_run, other_base_dir])


@pytest.mark.parametrize("flags,needle", [
    (["--size", "0"], "> 0"), (["--size", "1.5"], "(0, 1]"), (["--size", "1e-6"], "below the smallest model"),
])
def test_resize_size_out_of_range(flags, needle, tiny_run, work, capsys):
    _needs_resize_cli()
    fails(capsys, ["resize", tiny_run, *flags, "--out", work / "small"], needle, watch=[tiny_run])


def test_keepset_reads_only_the_posterior(foreign_run, capsys):
    """``ppn keepset`` solves from the posterior alone, so no base check applies (and none is needed)."""
    assert main(["keepset", str(foreign_run), "--size", "0.5", "--json"]) == 0
    capsys.readouterr()


def test_keepset_eval_from_another_base(foreign_run, work, capsys):
    fails(capsys, ["keepset", foreign_run, "--size", "0.5", "--eval", "--blocks", "1", "--samples", "1"],
          "hash differs", "base model", watch=[foreign_run])


def test_eval_run_from_another_base(foreign_run, work, capsys):
    fails(capsys, ["eval", "--run", foreign_run, "--size", "0.5", *SMALL_EVAL], "hash differs",
          watch=[foreign_run])


# ---------------------------------------------------------------------------------- vocab mismatch


def test_eval_vocab_mismatch(vocab_mismatch_dir, work, capsys):
    fails(capsys, ["eval", "--model", vocab_mismatch_dir, *SMALL_EVAL], "320 tokens", "vocab_size is 200",
          watch=[vocab_mismatch_dir])


def test_fit_vocab_mismatch(vocab_mismatch_dir, text_corpus, inputs, work, capsys):
    fit_fails(capsys, inputs, recipe_text(vocab_mismatch_dir, text_corpus), "vocab_size is 200")


# ----------------------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("content,needles", [
    ("", ["empty"]),
    ("   \n\n  \t\n", ["empty"]),
    ("Too short.", ["fewer than one block of 32", "smaller block size"]),
])
def test_eval_bad_corpus(content, needles, tiny_llama_dir, inputs, work, capsys):
    corpus = write(inputs / "tiny.txt", content)
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", corpus, *SMALL_EVAL], *needles, watch=[inputs])


@pytest.mark.parametrize("content,needles", [
    ("", ["empty"]),
    ("Too short.", ["fewer than one block of 32"]),
])
def test_fit_bad_corpus(content, needles, tiny_llama_dir, inputs, work, capsys):
    corpus = write(inputs / "corpus.txt", content)
    fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, corpus), *needles)


def test_missing_corpus(tiny_llama_dir, inputs, work, capsys):
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", inputs / "none.txt", *SMALL_EVAL], "does not exist")
    fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, inputs / "none.txt"), "does not exist")


def test_corpus_without_text_field(tiny_llama_dir, inputs, work, capsys):
    corpus = write(inputs / "docs.jsonl", '{"body": "hello there"}\n')
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", corpus, *SMALL_EVAL], "no 'text' field")


# -------------------------------------------------------------------------------------- block size


def test_eval_block_longer_than_context(tiny_llama_dir, work, capsys):
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", "kjv", "--block-size", "100000", "--device", "cpu"],
          "exceeds the model's context of 128", "--block-size 128")


def test_fit_block_longer_than_context(tiny_llama_dir, text_corpus, inputs, work, capsys):
    text = recipe_text(tiny_llama_dir, text_corpus).replace("block_size: 32", "block_size: 100000")
    fit_fails(capsys, inputs, text, "exceeds the model's context of 128")


# ----------------------------------------------------------------------------------------- devices


@NO_GPU
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_eval_gpu_where_none(device, tiny_llama_dir, work, capsys):
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", "kjv", "--block-size", "32", "--device", device],
          "no CUDA device", "--device cpu")


@NO_GPU
def test_fit_gpu_where_none(tiny_llama_dir, text_corpus, inputs, work, capsys):
    text = recipe_text(tiny_llama_dir, text_corpus).replace("device: cpu", "device: cuda")
    fit_fails(capsys, inputs, text, "no CUDA device", "cpu")
    fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, text_corpus), "no CUDA device",
              extra=("--set", "train.device=cuda"))


@NO_GPU
def test_other_commands_gpu_where_none(tiny_run, tiny_llama_dir, work, capsys):
    fails(capsys, ["keepset", tiny_run, "--size", "0.5", "--eval", "--device", "cuda"], "no CUDA device",
          watch=[tiny_run])
    fails(capsys, ["bench", "speed", "--model", tiny_llama_dir, "--device", "cuda"], "no CUDA device")
    fails(capsys, ["compare", "--model", tiny_llama_dir, "--device", "cuda", "--out", work / "cmp"],
          "no CUDA device")


def test_unknown_device(tiny_llama_dir, work, capsys):
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--device", "tpu"], "unknown device 'tpu'", "cpu")


# ---------------------------------------------------------------------------- real subprocesses


def _ppn(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ppn_bayes.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_subprocess_errors_are_one_line_exit_2(tiny_llama_dir, bert_dir, text_corpus, inputs, tmp_path):
    """As a user sees it: exit status 2, stdout empty, stderr exactly one ``error:`` line (no warning,
    progress bar or log line from the libraries underneath, even when a model was loaded first)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    typo = write(inputs / "typo.yaml", "train:\n  stpes: 5\n")
    bert = write(inputs / "bert.yaml", recipe_text(bert_dir, text_corpus))
    short = write(inputs / "short.txt", "Too short.")
    cases = [
        (["fit", typo, "--out", cwd / "run"], "unknown key train.stpes"),
        (["fit", bert, "--out", cwd / "run"], "unsupported architecture 'bert'"),
        (["eval", "--model", tiny_llama_dir, "--data", short, *SMALL_EVAL], "fewer than one block"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "--model", tiny_llama_dir, "--device", "cuda"], "no CUDA device"))
    for argv, needle in cases:
        proc = _ppn(*argv, cwd=cwd)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        assert proc.stdout == "", proc.stdout
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and needle in proc.stderr, \
            proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []
