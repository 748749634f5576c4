"""The Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM (a Llama) and OLMo-2.

All share the ``transformers`` layout ``model.model.layers[i].{self_attn,mlp}`` with separate
``q/k/v/o_proj`` and a gated (SwiGLU) MLP ``gate_proj``/``up_proj``/``down_proj``.
Differences that matter for gating:

* Qwen2 has q/k/v biases (cut with their rows); Llama/Mistral may have ``attention_bias``/``mlp_bias``.
* Qwen3 normalizes q and k per head (``head_dim``-wide norms): slicing heads is still exact.
* OLMo-2 normalizes q and k over *all* heads at once, so removing a head changes the others'
  normalization: head gates are not an exact slice there and are refused. OLMo-2 is also post-norm:
  its residual branches end in ``post_attention_layernorm`` / ``post_feedforward_layernorm``, which is
  where the layer gate goes.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ppn_bayes.backbone.family import Family, SliceRule
from ppn_bayes.backbone.units import Dims


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def dims(self, config) -> Dims:
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attn_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        d = config.hidden_size
        extra = 2 * d  # input_layernorm + post_attention_layernorm
        if config.model_type == "qwen3":
            extra += 2 * hd  # q_norm, k_norm (per head_dim, shared by heads)
        return Dims(
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=kv,
            head_dim=hd,
            hidden=d,
            intermediate=config.intermediate_size,
            mlp_matrices=3,
            attn_bias=attn_bias,
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=mlp_bias,
            mlp_out_bias=mlp_bias,
            layer_extra_params=extra,
        )

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        model.model.layers = layers

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def heads_input(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj

    def channels_input(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    def attn_branch(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj

    def mlp_branch(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        layer.self_attn = module

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def update_counts(self, layer: nn.Module, num_heads: int, kv_group: int, head_dim: int) -> None:
        layer.self_attn.num_key_value_groups = kv_group

    def slice_rules(self, config) -> list[SliceRule]:
        dims = self.dims(config)
        rules = [
            SliceRule("self_attn.q_proj.weight", 0, "q"),
            SliceRule("self_attn.k_proj.weight", 0, "kv"),
            SliceRule("self_attn.v_proj.weight", 0, "kv"),
            SliceRule("self_attn.o_proj.weight", 1, "q"),
            SliceRule("mlp.gate_proj.weight", 0, "ch"),
            SliceRule("mlp.up_proj.weight", 0, "ch"),
            SliceRule("mlp.down_proj.weight", 1, "ch"),
        ]
        if dims.attn_bias:
            rules += [
                SliceRule("self_attn.q_proj.bias", 0, "q"),
                SliceRule("self_attn.k_proj.bias", 0, "kv"),
                SliceRule("self_attn.v_proj.bias", 0, "kv"),
            ]
        if dims.mlp_bias:
            rules += [SliceRule("mlp.gate_proj.bias", 0, "ch"), SliceRule("mlp.up_proj.bias", 0, "ch")]
        return rules


class Olmo2Family(LlamaFamily):
    name = "olmo2"
    model_types = ("olmo2",)
    supports_heads = False

    def dims(self, config) -> Dims:
        d = super().dims(config)
        qk_norms = (d.num_heads + d.num_kv_heads) * d.head_dim  # full-width q_norm, k_norm
        return dataclasses.replace(d, layer_extra_params=d.layer_extra_params + qk_norms)

    def attn_branch(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp_branch(self, layer: nn.Module) -> nn.Module:
        return layer.post_feedforward_layernorm

