"""Numbers are finite and in range at validation time, and messages stay one short line (issue 14,
mechanism 5).

Every case goes through the real CLI and asserts what ``fails`` asserts (exit 2, one ``error:`` line,
no traceback, nothing written). Recipe values are checked before the model loads (the recipes here
name a model that does not even exist, so a check that came later would fail differently); a fix
never repeats the bad value. Hostile YAML (an alias bomb, a self-referencing alias, huge values) gives
a short error quickly instead of printing the expanded structure.
"""

# ruff: noqa: F811 - the fixtures of test_bad_input are imported by name, and pytest passes them as arguments
from __future__ import annotations

import time

import pytest
from test_bad_input import fails, fit_fails, inputs, recipe_text, text_corpus, work, write  # noqa: F401

NO_MODEL = "./no/such/model"  # checks that pass reach the model and fail with "does not exist"


@pytest.mark.parametrize("override,needles", [
    ("push.rate=.inf", ["push.rate", "finite", "use e.g. 0.3"]),
    ("push.rate=.nan", ["push.rate", "finite"]),
    ("train.lr_guide=.inf", ["train.lr_guide", "finite", "use e.g. 0.02"]),
    ("train.lr_weights=-.inf", ["train.lr_weights", "finite"]),
    ("prior.global_scale=.nan", ["prior.global_scale", "finite"]),
    ("push.init_half_price=.inf", ["push.init_half_price", "finite"]),
    ("train.betas=[.nan, 0.9]", ["train.betas", "finite"]),
    ("train.eval_lambdas=[0.5, .inf]", ["train.eval_lambdas", "finite"]),
    ("train.clip_grad=.inf", ["train.clip_grad", "finite"]),
    ("train.seed=-1", ["train.seed", "0 to 4294967295"]),
    ("train.seed=4294967296", ["train.seed", "0 to 4294967295"]),
    ("train.seed=true", ["train.seed", "expected an integer"]),
])
def test_recipe_numbers_checked_before_the_model_loads(override, needles, text_corpus, inputs, work, capsys):
    msg = fit_fails(capsys, inputs, recipe_text(NO_MODEL, text_corpus), *needles, extra=("--set", override))
    fix = msg.split(";", 1)[1] if ";" in msg else ""
    assert "inf" not in fix and "nan" not in fix, msg  # the fix names a usable value, not the bad one


def test_negative_seed_leaves_no_half_written_run(tiny_llama_dir, text_corpus, inputs, work, capsys):
    """With a real model: rejected at validation, so no run directory blocks a plain rerun."""
    fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, text_corpus), "train.seed", extra=("--set", "train.seed=-5"))


@pytest.mark.parametrize("flags,needles", [
    (["--size", "inf"], ["size inf", "not a finite number"]),
    (["--size", "nan"], ["size nan", "not a finite number"]),
    (["--params", "inf"], ["params inf", "not a finite number"]),
    (["--flops", "nan"], ["flops nan", "not a finite number"]),
    (["--size", "0.5", "--seed", "-1"], ["--seed", "0 to 4294967295"]),
    (["--size", "0.5", "--seed", "99999999999999999999"], ["--seed", "0 to 4294967295"]),
    (["--size", "0.5", "--quantile", "nan"], ["quantile"]),
    (["--size", "0.5", "--draws", "1000000000000"], ["draws must be between 1 and 100,000"]),  # was out of memory
    (["--size", "0.5", "--draws", "0"], ["draws must be between 1 and 100,000"]),
])
def test_keepset_numbers(flags, needles, tiny_run, work, capsys):
    fails(capsys, ["keepset", tiny_run, *flags], *needles, watch=[tiny_run])


@pytest.mark.parametrize("argv,needles", [
    (["uncertainty", "RUN", "--size", "0.5", "--seed", "-3", "--k", "2"], ["--seed"]),
    (["report", "RUN", "--sizes", "0.5,inf", "--draws", "8"], ["not a finite number"]),
    (["report", "RUN", "--sizes", "0.5", "--draws", "8", "--seed", "-1"], ["--seed"]),
    (["report", "RUN", "--sizes", "0.5", "--draws", "123456789"], ["draws must be between"]),
    (["resize", "RUN", "--size", "inf", "--out", "WORK/small"], ["not a finite number"]),
    (["resize", "RUN", "--size", "0.5", "--seed", "-2", "--out", "WORK/small"], ["--seed"]),
    (["eval", "--run", "RUN", "--size", "nan", "--device", "cpu"], ["not a finite number"]),
])
def test_run_commands_numbers(argv, needles, tiny_run, work, capsys):
    argv = [str(tiny_run) if a == "RUN" else a.replace("WORK", str(work)) for a in argv]
    fails(capsys, argv, *needles, watch=[tiny_run])


@pytest.mark.parametrize("argv,needles", [
    (["compare", "--gisp-step", "0"], ["GISP step 0", "(0, 1]"]),
    (["compare", "--gisp-step", "-0.1"], ["GISP step", "(0, 1]"]),
    (["compare", "--gisp-step", "inf"], ["GISP step inf"]),
    (["compare", "--gisp-step", "nan"], ["GISP step nan"]),
    (["compare", "--seed", "-1"], ["--seed"]),
    (["compare", "--sizes", "0.5,inf"], ["not a finite number"]),
    (["bench", "speed", "--sizes", "1.0,inf"], ["--sizes inf", "not a finite number"]),
])
def test_peer_commands_checked_before_the_model_loads(argv, needles, work, capsys):
    """The model named here does not exist: each error must come from the flag check, which runs first."""
    fails(capsys, [*argv, "--model", work / "no-model", "--device", "cpu"], *needles)


@pytest.mark.parametrize("limit", ["inf", "nan", "0", "-3"])
def test_eval_limit(limit, work, capsys):
    fails(capsys, ["eval", "--model", work / "no-model", "--tasks", "--limit", limit, "--device", "cpu"], "--limit",
          "finite count")


@pytest.mark.parametrize("data", ["single_file", "bundled"])
def test_unknown_split_is_an_error_for_every_corpus(data, tiny_llama_dir, text_corpus, work, capsys):
    """A single-file corpus serves every split, but a misspelt split must not silently read it."""
    corpus = text_corpus if data == "single_file" else "bundled"
    fails(capsys, ["eval", "--model", tiny_llama_dir, "--data", corpus, "--split", "nonsense", "--block-size", "32",
                   "--max-blocks", "2", "--device", "cpu"], "unknown split 'nonsense'", "train, validation, test")


# ----------------------------------------------------------------------------- hostile YAML, long values

BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9)}]\n" for p, a in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB


@pytest.mark.parametrize("text,needles", [
    (BOMB + "train:\n  betas: *i\n", ["expands to more than", "aliases"]),
    (BOMB, ["expands to more than"]),  # the bomb alone, under unknown keys
    ("a: &a [*a]\ntrain:\n  betas: *a\n", ["alias that refers to itself"]),
    ("train:\n  steps: [" + ", ".join(["[1, 2, 3]"] * 500) + "]\n", ["train.steps", "expected an integer"]),
    ("train:\n  " + "x" * 100_000 + ": 1\n", ["not valid YAML"]),  # YAML's own 1024-character key limit
    ("train:\n  lr_guide: '" + "9" * 100_000 + "'\n", ["train.lr_guide", "expected a number"]),  # no regex blow-up
    ("train:\n  lr_guide: '" + "9" * 50 + "x'\n", ["train.lr_guide", "expected a number"]),
    ("train:\n  betas: " + "[" * 20_000 + "]" * 20_000 + "\n", ["nested too deeply"]),
    ("train:\n  eval_lambdas: [" + ", ".join(["0"] * 5000) + "]\n", ["train.eval_lambdas", "> 0"]),
    ("train:\n  device: '" + "tpu" * 30_000 + "'\n", ["train.device", "cpu"]),
], ids=["bomb-in-betas", "bomb-alone", "self-alias", "deep-list", "long-key", "long-digits", "digits-x", "deep",
        "many-zeros", "long-device"])
def test_hostile_yaml_gives_a_short_error_quickly(text, needles, text_corpus, inputs, work, capsys):
    start = time.perf_counter()
    msg = fit_fails(capsys, inputs, text, *needles)
    assert time.perf_counter() - start < 10
    assert len(msg) < 400, len(msg)


def test_alias_bomb_in_an_override(tiny_llama_dir, text_corpus, inputs, work, capsys):
    """``--set`` values are YAML too: a flow-style bomb (each level nine aliases of the previous one)."""
    levels = ["&l0 [" + ", ".join(["0.5"] * 9) + "]"]
    levels += [f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
    start = time.perf_counter()
    msg = fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, text_corpus), "override", "expands to more than",
                    extra=("--set", f"train.eval_lambdas=[{', '.join(levels)}]"))
    assert time.perf_counter() - start < 10 and len(msg) < 400


def test_long_override_key_is_cut(tiny_llama_dir, text_corpus, inputs, work, capsys):
    msg = fit_fails(capsys, inputs, recipe_text(tiny_llama_dir, text_corpus), "unknown key train.xxx",
                    extra=("--set", "train." + "x" * 100_000 + "=1"))
    assert len(msg) < 600  # the key cut to 40 characters; the rest is train's valid-keys list (~45 keys)


def test_safe_yaml_counts_shared_nodes_once_per_use():
    """The measure is the *expanded* size, computed on the node graph in linear time."""
    from ppn_bayes.config import MAX_YAML_NODES, safe_yaml
    from ppn_bayes.errors import ConfigError

    assert safe_yaml("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
    assert safe_yaml("", "t") is None
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=str(MAX_YAML_NODES)):
        safe_yaml(BOMB, "t")
    assert time.perf_counter() - start < 1


def test_short_is_bounded():
    from ppn_bayes.schema import short

    nested: list = [1]
    for _ in range(500):
        nested = [nested] * 1000  # 1000**500 leaves if printed in full
    assert len(short(nested)) <= 60 and "\n" not in short("a\nb\n" * 10_000)


def test_as_a_user_sees_it(text_corpus, inputs, tmp_path):
    """A real subprocess: the alias bomb and an infinite rate give one short stderr line, exit 2, fast."""
    from test_bad_input import _ppn

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    bomb = write(inputs / "bomb.yaml", BOMB + "train:\n  betas: *i\n")
    plain = write(inputs / "plain.yaml", recipe_text(NO_MODEL, text_corpus))
    for argv, needle in ((["fit", bomb, "--out", cwd / "run"], "expands to more than"),
                         (["fit", plain, "--out", cwd / "run", "--set", "push.rate=.inf"], "push.rate")):
        start = time.perf_counter()
        proc = _ppn(*argv, cwd=cwd)
        assert time.perf_counter() - start < 60
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[:500]
        assert proc.stderr.startswith("error: ") and needle in proc.stderr and len(proc.stderr) < 400
    assert list(cwd.iterdir()) == []
