"""GPT-2: ``model.transformer.h[i].{attn,mlp}`` with fused ``c_attn`` and ``Conv1D`` projections.

``Conv1D`` stores weights as ``[in, out]`` (the transpose of ``nn.Linear``), so the cut axes below are
the opposite of Llama's. ``c_attn`` holds q, k and v side by side along its output axis (three
segments). GPT-2 has no GQA (``num_kv_heads == num_heads``) and biases everywhere; the output
projections' biases belong to the layer and go with the layer gate.
"""

from __future__ import annotations

from torch import nn

from ppn_bayes.backbone.family import Family, SliceRule
from ppn_bayes.backbone.units import Dims


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)

    def config_describes_heads(self, num_heads: int, dims: Dims) -> bool:
        return num_heads == dims.num_heads  # GPT-2 derives head_dim from n_embd / n_head

    def uniform_config(self, cfg: dict, num_heads: int, num_kv_heads: int, head_dim: int, channels: int) -> dict:
        return {**cfg, "n_inner": channels}  # heads: all kept (config_describes_heads)

    def dims(self, config) -> Dims:
        d = config.n_embd
        inner = config.n_inner or 4 * d
        return Dims(
            num_layers=config.n_layer,
            num_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=d // config.n_head,
            hidden=d,
            intermediate=inner,
            mlp_matrices=2,
            attn_bias=True,
            o_bias=True,
            mlp_bias=True,
            mlp_out_bias=True,
            layer_extra_params=4 * d,  # ln_1, ln_2 (weight + bias each)
        )

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        model.transformer.h = layers

    def layer_prefix(self, i: int) -> str:
        return f"transformer.h.{i}."

    def heads_input(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def channels_input(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def attn_branch(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def mlp_branch(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        layer.attn = module

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def update_counts(self, layer: nn.Module, num_heads: int, kv_group: int, head_dim: int) -> None:
        layer.attn.num_heads = num_heads
        layer.attn.split_size = num_heads * head_dim

    def slice_rules(self, config) -> list[SliceRule]:
        return [
            SliceRule("attn.c_attn.weight", 1, "q", segments=3),
            SliceRule("attn.c_attn.bias", 0, "q", segments=3),
            SliceRule("attn.c_proj.weight", 0, "q"),
            SliceRule("mlp.c_fc.weight", 1, "ch"),
            SliceRule("mlp.c_fc.bias", 0, "ch"),
            SliceRule("mlp.c_proj.weight", 0, "ch"),
        ]

