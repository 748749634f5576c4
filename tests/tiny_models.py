"""Tiny random configs of real architectures, shared by the tests (seconds to build on a CPU)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96


def tiny_config(family: str, **overrides):
    """A 3-layer config of ``family`` with GQA where the family has it."""
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if family == "llama":
        cfg = T.LlamaConfig(**{**common, **overrides})
    elif family == "mistral":
        cfg = T.MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif family == "qwen2":
        cfg = T.Qwen2Config(**{**common, **overrides})
    elif family == "qwen3":
        cfg = T.Qwen3Config(**{**common, "head_dim": 8, **overrides})
    elif family == "olmo2":
        cfg = T.Olmo2Config(**{**common, **overrides})
    elif family == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=6, n_positions=128,
                           **overrides)
    else:
        raise ValueError(family)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="eager")
    # Random biases (transformers initializes them to zero, which would hide bias-cutting bugs).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gpt2"]
