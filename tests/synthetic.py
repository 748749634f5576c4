"""A real tiny Llama whose layers have known, different importances, and norms that point the other way.

Layer ``l``'s residual branches are scaled by its *importance* ``w_l``: ``o_proj`` and ``down_proj`` are
multiplied by ``w_l / a_l`` while ``v_proj`` and ``up_proj`` are multiplied by ``a_l``. The branch output
is linear in ``v`` then ``o`` (and in ``up`` then ``down`` for SwiGLU), so it is exactly ``w_l`` times
the unscaled one whatever ``a_l`` is; ``w_l = 0`` makes the block an exact identity. ``a_l`` only sets
the layer's weight norm: with per-matrix squared norm ~ ``a^2 + (w / a)^2`` (unit-variance rows),
``a_l^2 = (t_l + sqrt(t_l^2 - 4 w_l^2)) / 2`` gives that sum the value ``t_l``. Choosing ``t`` to
*decrease* with ``w`` makes the norm anchor (the paper's score) rank the layers in exactly the wrong
order, so a correct ranking has to come from the likelihood through the latent offsets.

The data are sampled from the full network itself (ancestral sampling), so the full network is the
true model and dropping a layer costs likelihood in proportion to what it contributes.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def synthetic_stack(importance: list[float], norm_targets: list[float], seed: int = 0, hidden: int = 32,
                    vocab: int = 64, sharpen: float = 2.0) -> LlamaForCausalLM:
    """Frozen tiny Llama with layer importances ``importance`` and squared-norm targets ``norm_targets``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=len(importance), num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.mul_(sharpen / model.lm_head.weight.std())  # peaked next-token laws
        for layer, w, t in zip(model.model.layers, importance, norm_targets):
            a = math.sqrt((t + math.sqrt(max(t * t - 4 * w * w, 0.0))) / 2)
            at, mlp = layer.self_attn, layer.mlp
            for lin in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.weight.normal_(0.0, lin.weight.shape[1] ** -0.5)
            at.v_proj.weight.mul_(a)
            mlp.up_proj.weight.mul_(a)
            at.o_proj.weight.mul_(w / a)
            mlp.down_proj.weight.mul_(w / a)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def sample_sequences(model, num: int, length: int, seed: int) -> torch.Tensor:
    """``[num, length]`` token ids drawn from ``model`` itself (first token uniform)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (num, 1), generator=gen)
    for _ in range(length - 1):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


# The two networks the tests and benchmarks/inference_checks.py use (importance, squared-norm target).
RECOVERY = ([1.2, 0.0, 0.8, 0.1, 0.5, 0.03], [2.4, 4.9, 2.9, 3.9, 3.4, 4.4])
NUTS_CHECK = ([1.0, 0.0, 0.5, 0.1], [2.4, 3.9, 2.9, 3.4])
