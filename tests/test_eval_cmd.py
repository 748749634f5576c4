"""``ppn eval`` on every target: a dense model, both forms of resized export, a run at a size and
dense, plus zero-shot tasks, and the one-line errors of each wrong use.

Cross-checks, not just "it ran": a run at lambda = 0 with frozen weights *is* the base model (same
perplexity as ``--model``); a run at a size equals the gated network with that keep-set's masks and
amplitudes; an export loads to the perplexity of the hard-masked base model.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ppn_bayes.cli import main

PPL = ["--data", "kjv", "--split", "validation", "--block-size", "32", "--max-blocks", "3", "--batch-size", "3",
       "--device", "cpu", "--json"]


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _masked_ppl(model_dir, keep, inventory) -> float:
    """Perplexity (same blocks as PPL) of the base model with the keep-set's hard masks."""
    from ppn_bayes.backbone import gate
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.data.corpus import token_blocks
    from ppn_bayes.hub.zoo import load_model

    model, tok = load_model(model_dir)
    gated = gate(model, group_size=inventory.group_size, kinds=tuple(inventory.kinds))
    blocks = token_blocks(tok, "validation", 32, "kjv", max_blocks=3)
    with gated.keep(keep):
        return perplexity(gated, blocks, batch_size=3)["perplexity"]


# ------------------------------------------------------------------------------------------ targets


def test_run_dense_is_the_base_model_and_a_size_is_the_gated_subnetwork(tiny_run, tiny_llama_dir, capsys):
    from ppn_bayes.analysis.uncertainty import gates_for
    from ppn_bayes.run import load_run

    base = _eval(capsys, "--model", str(tiny_llama_dir), *PPL)
    dense = _eval(capsys, "--run", str(tiny_run), "--dense", *PPL)
    assert dense["target"] == "run" and dense["dense"] and dense["size"] == 1.0
    assert dense["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)  # frozen weights, lambda 0

    half = _eval(capsys, "--run", str(tiny_run), "--size", "0.5", "--quantile", "0.3", *PPL)
    assert half["size"] == 0.5 and 0 < half["achieved_size"] <= 0.5 and half["quantile"] == 0.3
    keep = half["keep"]
    assert keep["of_layers"] == 2 and keep["of_heads"] == 8 and keep["of_groups"] == 8
    assert keep["layers"] == len(keep["layer_ids"]) >= 1
    assert half["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-3)

    run = load_run(tiny_run)
    result = run.keepset(size=0.5, quantile=0.3)
    gated = run.load_model()
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.data.corpus import token_blocks

    blocks = token_blocks(run.load_tokenizer(), "validation", 32, "kjv", max_blocks=3)
    with gated.gates(**gates_for(run.posterior, result.keep, result.lam)):
        want = perplexity(gated, blocks, batch_size=3)["perplexity"]
    assert half["perplexity"] == pytest.approx(want, rel=1e-5)
    assert half["lambda"] == pytest.approx(result.lam)


def test_run_human_output_names_the_size_and_keep(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), "--size", "0.5", *PPL[:-1]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "size 0.5 (achieved" in out and "layers" in out


@pytest.mark.parametrize("keep_dict,form", [
    ({"layers": [1], "heads": [], "groups": []}, "standard"),  # layer-only: plain transformers
    ({"layers": [0, 1], "heads": [[0, 0], [0, 1], [1, 2]], "groups": [[0, 0], [1, 1], [1, 3]]}, "ppn_layer_shapes"),
])
def test_resized_export_of_either_form_evaluates_like_the_masked_model(keep_dict, form, tiny_llama_dir, tmp_path,
                                                                       capsys):
    from ppn_bayes.backbone import gate
    from ppn_bayes.backbone.units import KeepSet
    from ppn_bayes.export.resize import resize
    from ppn_bayes.hub.zoo import load_model

    inv = gate(load_model(tiny_llama_dir)[0], group_size=16).inventory
    keep = KeepSet.from_dict(keep_dict)
    if form == "standard":
        inv = gate(load_model(tiny_llama_dir)[0], group_size=16, kinds=("layers",)).inventory
    report = resize(tiny_llama_dir, keep, inv, tmp_path / "small")
    assert report["form"] == form
    out = _eval(capsys, "--model", str(tmp_path / "small"), *PPL)
    assert out["target"] == "resized" and out["form"] == form
    assert out["size"] == pytest.approx(inv.size_of(keep))
    assert out["keep"]["layers"] == len(keep.layers)
    assert out["perplexity"] == pytest.approx(_masked_ppl(tiny_llama_dir, keep, inv), rel=1e-4)


@pytest.fixture(scope="module")
def long_context_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny random Llama whose context holds a whole task item (~400 tiny-tokenizer tokens)."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-long")
    make_tiny_llama(len(tiny_tokenizer), max_position_embeddings=1024).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_tasks_on_a_model_default_to_the_local_task(long_context_dir, capsys):
    pytest.importorskip("lm_eval")
    from ppn_bayes.data.tasks import LOCAL_TASK

    out = _eval(capsys, "--model", str(long_context_dir), "--tasks", "--limit", "4", "--no-perplexity",
                "--batch-size", "4", "--device", "cpu", "--json")
    assert "perplexity" not in out and out["limit"] == 4
    scores = out["tasks"][LOCAL_TASK]
    assert scores["samples"] == 4 and 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0


def test_tasks_and_perplexity_human_output(long_context_dir, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", "--model", str(long_context_dir), "--tasks", "ppn_persuasion_cloze", "--limit", "2",
                 "--data", "kjv", "--block-size", "32", "--max-blocks", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("perplexity ") and lines[1].startswith("ppn_persuasion_cloze: acc ")


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv,needle", [
    (["--run", "{run}"], "--run needs --size"),
    (["--run", "{run}", "--size", "1.5"], "must be in (0, 1]"),
    (["--run", "{run}", "--size", "0"], "must be > 0"),
    (["--run", "{run}", "--size", "0.0001"], "below the smallest model"),
    (["--run", "{run}", "--size", "0.5", "--quantile", "1.5"], "quantile"),
    (["--run", "{run}", "--size", "0.5", "--dense"], "exclude each other"),
    (["--run", "{missing}", "--size", "0.5"], "does not exist"),
    (["--run", "{run}", "--model", "{tiny}", "--size", "0.5"], "either --model or --run"),
    (["--model", "{tiny}", "--size", "0.5"], "add --run"),
    (["--model", "{tiny}", "--dense"], "add --run"),
    (["--model", "{tiny}", "--limit", "3"], "--tasks"),
    (["--model", "{tiny}", "--no-perplexity"], "nothing to evaluate"),
])
def test_errors_are_one_line(argv, needle, tiny_run, tiny_llama_dir, tmp_path, capsys):
    argv = [a.format(run=tiny_run, tiny=tiny_llama_dir, missing=tmp_path / "nope") for a in argv]
    assert main(["eval", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_unknown_task_is_one_line(tiny_llama_dir, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from ppn_bayes.evaluation import lmeval

    real = lmeval.task_manager
    monkeypatch.setattr(lmeval, "task_manager", lambda paths, defaults: real(paths, False))  # skip 20 s index
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "no_such_task", "--no-perplexity",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown lm-eval task 'no_such_task'") and "\n" not in err


def test_missing_lm_eval_fails_before_loading_the_model(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--model", "/no/model/here", "--tasks", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ppn-bayes[eval]'" in err and "\n" not in err


def test_eval_target_api(tiny_run):
    from ppn_bayes.evaluation.targets import load_run_target

    target = load_run_target(tiny_run, size=0.5)
    assert target.gated is not None and target.model is target.gated.model
    assert any(v is not None for v in target.gated.current_gates().values())
    ids = torch.randint(0, 100, (1, 8))
    assert target.model(ids).logits.shape[:2] == (1, 8)


def test_emit_lines_for_each_target(capsys):
    from ppn_bayes.cli.eval_cmd import emit

    tasks = {"t": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.05, "samples": 4}}
    emit({"target": "resized", "model": "out/x", "size": 0.5, "form": "standard", "tasks": tasks}, False)
    emit({"target": "run", "run": "r", "dense": True, "size": 1.0, "achieved_size": 1.0, "tasks": {}}, False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["resized out/x (size 0.500, standard)", "t: acc 0.500 ± 0.100, acc_norm 0.250 ± 0.050 on 4 items",
                     "run r dense (lambda 0)"]
