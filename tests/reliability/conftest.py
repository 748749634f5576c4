"""Bad inputs for the reliability tests: broken checkpoints, short corpora, a fitted run and its twin
from another base model. Each is built once per session from the tiny Llama (seconds in all)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A single-file corpus long enough for a few blocks of 32 tokens."""
    from ppn_bayes.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def fitted_run(tiny_llama_dir, text_corpus, tmp_path_factory) -> Path:
    """A 2-step frozen-weights run on the tiny Llama (the real ``ppn fit`` path)."""
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.train import fit

    root = tmp_path_factory.mktemp("relrun")
    recipe = recipe_from_dict({"name": "tiny", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
                               "data": {"corpus": str(text_corpus), "block_size": 32, "val_blocks": 2},
                               "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "weights": "frozen",
                                         "eval_lambdas": [0.5]}})
    return fit(recipe, out=root / "run", progress=False).path


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with the same tokenizer but another shape (wider MLP): a different base model."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("other-base")
    make_tiny_llama(len(tiny_tokenizer), seed=1, intermediate_size=96).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def foreign_run(fitted_run, other_base_dir, tmp_path_factory) -> Path:
    """A copy of ``fitted_run`` whose recorded base path now holds another model: its manifest hashes
    no longer match what is on disk there (a moved run, or a base directory overwritten since)."""
    path = tmp_path_factory.mktemp("foreign") / "run"
    shutil.copytree(fitted_run, path)
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
