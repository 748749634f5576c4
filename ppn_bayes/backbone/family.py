"""What a model family must tell ppn-bayes, and the registry of supported families.

A family adapter is a small, explicit description of where the gateable pieces of one architecture
live inside a ``transformers`` model. It never copies weights: it only names modules and parameters.

Four module handles per layer carry all the gates (see :mod:`ppn_bayes.backbone.gated`):

* ``heads_input(layer)``: the attention output projection; its *input* is ``[..., H * head_dim]``,
  so multiplying head ``h``'s slice by 0 removes exactly that head's contribution.
* ``channels_input(layer)``: the MLP down projection; its input is ``[..., d_ff]``.
* ``attn_branch(layer)`` / ``mlp_branch(layer)``: the module whose *output* is the residual branch
  added back to the stream (the output projection in pre-norm blocks, the post-norm in OLMo-2).
  Multiplying it by the layer gate makes gate 0 an exact skip, biases included.

``slice_rules`` say how each per-layer tensor is cut when heads/channels are removed, so that the
resize step and the equivalence tests share one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ppn_bayes.backbone.units import Dims


@dataclass(frozen=True)
class SliceRule:
    """How to cut one per-layer tensor.

    ``name`` is relative to the layer prefix (e.g. ``self_attn.q_proj.weight``); ``axis`` is the axis
    cut; ``unit`` is ``"q"`` (query heads, ``head_dim`` wide each), ``"kv"`` (key/value heads) or
    ``"ch"`` (MLP channels). ``segments`` > 1 describes fused tensors (GPT-2's ``c_attn`` holds q, k, v
    side by side along ``axis``: each segment is cut the same way).
    """

    name: str
    axis: int
    unit: Literal["q", "kv", "ch"]
    segments: int = 1


class Family:
    """Base adapter; subclasses fill in the names for one architecture."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    supports_heads: bool = True

    def dims(self, config) -> Dims:  # pragma: no cover - abstract
        raise NotImplementedError

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns the layer list (``model.model`` for Llama, ``model.transformer`` for GPT-2)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        raise NotImplementedError

    def layer_prefix(self, i: int) -> str:
        """State-dict prefix of layer ``i`` in the *CausalLM* model (e.g. ``model.layers.3.``)."""
        raise NotImplementedError

    def heads_input(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def channels_input(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def attn_branch(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def mlp_branch(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def slice_rules(self, config) -> list[SliceRule]:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a layer (replaced by a zero branch when a cut keeps no head)."""
        raise NotImplementedError

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        raise NotImplementedError

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        raise NotImplementedError

    def update_counts(self, layer: nn.Module, num_heads: int, kv_group: int, head_dim: int) -> None:
        """Fix the attention module's head bookkeeping after its weights were cut."""
        raise NotImplementedError

    def layer_idx_holders(self, layer: nn.Module) -> list[nn.Module]:
        """Modules with a ``layer_idx`` attribute (KV-cache slot) to renumber when layers are dropped."""
        return [m for m in layer.modules() if hasattr(m, "layer_idx")]

    def config_describes_heads(self, num_heads: int, dims: Dims) -> bool:
        """Whether the architecture's config can state ``num_heads`` query heads per layer (with
        ``dims.head_dim`` each): Llama-family configs carry ``head_dim`` but refuse a hidden size that
        the head count does not divide."""
        return dims.hidden % num_heads == 0

    def uniform_config(self, cfg: dict, num_heads: int, num_kv_heads: int, head_dim: int, channels: int) -> dict:
        """The base ``config.json`` dict edited to uniform per-layer sizes (the layer count is set apart)."""
        return {**cfg, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
                "head_dim": head_dim,  # no longer hidden / heads once heads are cut
                "intermediate_size": channels}

    def embedding_params(self, model: nn.Module) -> int:
        """Parameters outside the decoder stack (embeddings, final norm, untied LM head)."""
        layer_ids = {id(p) for p in self.layers(model).parameters()}
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) in layer_ids or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total
