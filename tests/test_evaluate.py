"""Perplexity, the device helpers and the `ppn eval` / `ppn models` commands."""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.cli import main
from ppn_bayes.device import autocast_context, resolve_device
from ppn_bayes.errors import ConfigError


def by_hand(model, blocks: torch.Tensor) -> float:
    """exp(mean NLL) with one forward per block and an explicit loop over positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logp = torch.log_softmax(model(block[None]).logits[0].double(), dim=-1)
            for t in range(1, block.numel()):
                total -= float(logp[t - 1, block[t]])
                count += 1
    return math.exp(total / count)


def test_perplexity_equals_exp_mean_nll_by_hand():
    model = make_tiny_llama(50, seed=1)
    blocks = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, blocks, batch_size=2)
    assert result["tokens"] == 5 * 8 and result["blocks"] == 5
    assert result["perplexity"] == pytest.approx(by_hand(model, blocks), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)


def test_perplexity_does_not_depend_on_batch_size():
    model = make_tiny_llama(50, seed=2)
    blocks = torch.randint(0, 50, (7, 12), generator=torch.Generator().manual_seed(1))
    values = [perplexity(model, blocks, batch_size=b)["nll"] for b in (1, 3, 7, 100)]
    assert max(values) - min(values) < 1e-5


def test_uniform_logits_give_vocab_size():
    """Any callable works; a model that knows nothing has perplexity = vocabulary size."""
    vocab = 37

    def uniform(input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    blocks = torch.randint(0, vocab, (3, 10))
    assert perplexity(uniform, blocks)["perplexity"] == pytest.approx(vocab, rel=1e-6)
    # A bare tensor of logits is accepted too.
    assert perplexity(lambda x: torch.zeros(*x.shape, vocab), blocks)["perplexity"] == pytest.approx(vocab)


def test_perplexity_restores_training_mode_and_runs_in_inference_mode():
    model = make_tiny_llama(50).train()
    seen = {}

    def hook(module, args, output):
        seen["inference"] = torch.is_inference_mode_enabled()
        seen["training"] = module.training

    model.register_forward_hook(hook)
    perplexity(model, torch.randint(0, 50, (2, 6)))
    assert seen == {"inference": True, "training": False} and model.training


def test_perplexity_rejects_bad_blocks():
    model = make_tiny_llama(50)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(4, 1, dtype=torch.long))


# ------------------------------------------------------------------------------------------ device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            resolve_device("cuda")
        assert "no CUDA device" in str(err.value) and "\n" not in str(err.value)


def test_autocast_is_a_noop_on_cpu():
    assert isinstance(autocast_context("cpu", torch.bfloat16), contextlib.nullcontext)
    assert isinstance(autocast_context("cuda", None), contextlib.nullcontext)


# ------------------------------------------------------------------------------------------ CLI


def test_ppn_eval_json_on_local_model(tiny_llama_dir, capsys):
    rc = main(["eval", "--model", str(tiny_llama_dir), "--data", "kjv", "--split", "validation",
               "--block-size", "64", "--max-blocks", "5", "--batch-size", "2", "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(tiny_llama_dir) and out["tokens"] == 5 * 63 and out["blocks"] == 5
    assert 1 < out["perplexity"] < 1e4


def test_ppn_eval_human_line(tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", "kjv", "--block-size", "32",
                 "--max-blocks", "2"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/nonexistent/model/dir"], "does not exist"),
    (["--model", "{tmp}"], "config.json"),
    (["--model", "{tiny}", "--data", "/no/such/corpus.txt"], "does not exist"),
    (["--model", "{tiny}", "--block-size", "4096"], "context"),
    (["--model", "{tiny}", "--batch-size", "0"], "--batch-size"),
    (["--model", "{tiny}", "--device", "quantum"], "unknown device"),
])
def test_ppn_eval_errors_are_one_line(argv, needle, tiny_llama_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, tiny=tiny_llama_dir) for a in argv]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_ppn_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "PyPI" in out and "gpt2" in out


def test_ppn_models_fetch_unknown_alias(capsys):
    assert main(["models", "fetch", "not-a-model"]) == 2
    assert "known aliases" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_perplexity_is_sane(smollm2_path, capsys):
    rc = main(["eval", "--model", "smollm2-135m", "--max-blocks", "4", "--block-size", "128", "--json",
               "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "smollm2-135m" and out["tokens"] == 4 * 127
    assert 5 < out["perplexity"] < 200  # a real model: tens, not thousands
