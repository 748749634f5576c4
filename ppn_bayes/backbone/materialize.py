"""Build the smaller model of a keep-set in memory, as a real (faster) ``transformers`` model.

This is the in-memory twin of the lazy, file-based export in :mod:`ppn_bayes.export.resize`: both cut
tensors with :mod:`ppn_bayes.backbone.slicing`. It deep-copies only what it keeps, drops whole layers
from the layer list (renumbering their KV-cache slots), cuts heads and channels out of the kept
layers' weights, and replaces an attention or MLP that keeps nothing by a zero branch. The result
computes exactly what the gated model computes with the same hard keep-set (tested), but with the
FLOPs of the kept units only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone.projections import is_conv1d
from ppn_bayes.backbone.slicing import cut_tensor, layer_cut
from ppn_bayes.backbone.units import Dims, KeepSet, UnitInventory


class ZeroBranch(nn.Module):
    """A residual branch that kept no unit: it contributes only its output projection's bias (if any)."""

    def __init__(self, returns_tuple: bool, bias: torch.Tensor | None = None):
        super().__init__()
        self.returns_tuple = returns_tuple
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return (out, None) if self.returns_tuple else out


def _replace_param(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    w = getattr(owner, "weight", None)
    if isinstance(owner, nn.Linear) and w is not None:
        owner.out_features, owner.in_features = w.shape
    elif is_conv1d(owner) and w is not None:  # weight [in, out]
        owner.nf = w.shape[1]


def cut_layer(layer: nn.Module, family: Family, config, dims: Dims, heads: list[int], channels: list[int]) -> None:
    """Cut one layer's weights in place down to the given query heads and MLP channels."""
    cut = layer_cut(heads, channels, dims)
    params = dict(layer.named_parameters())
    for rule in family.slice_rules(config):
        if rule.name in params:
            _replace_param(layer, rule.name, cut_tensor(params[rule.name].data, rule, cut, dims))
    if heads:
        family.update_counts(layer, len(heads), cut.kv_group, dims.head_dim)
    else:
        family.set_attention(layer, ZeroBranch(True, getattr(family.heads_input(layer), "bias", None)))
    if not channels:
        family.set_mlp(layer, ZeroBranch(False, getattr(family.channels_input(layer), "bias", None)))


@torch.no_grad()
def materialize(model: nn.Module, keep: KeepSet, inventory: UnitInventory) -> nn.Module:
    """A new model holding only the kept units of ``model`` (``model`` itself is not modified).

    ``inventory`` fixes the group size and gated kinds that ``keep`` refers to. The returned model's
    ``config.num_hidden_layers`` (or ``n_layer``) is the kept layer count; per-layer head and channel
    counts live in the weights' shapes (see :mod:`ppn_bayes.export.plan` for how they are saved).
    """
    family = family_for(model.config)
    keep = inventory.complete(keep)
    dims = inventory.dims
    layers = family.layers(model)
    # Copy the model without its layers, then copy only the kept layers.
    family.set_layers(model, nn.ModuleList())
    try:
        small = copy.deepcopy(model)
    finally:
        family.set_layers(model, layers)
    kept = nn.ModuleList()
    for new_idx, l in enumerate(keep.layers):
        layer = copy.deepcopy(layers[l])
        channels = [c for g in keep.groups_of(l) for c in inventory.group_channels(g)]
        cut_layer(layer, family, model.config, dims, keep.heads_of(l), channels)
        for m in family.layer_idx_holders(layer):
            m.layer_idx = new_idx
        kept.append(layer)
    family.set_layers(small, kept)
    _set_num_layers(small.config, keep.layers)
    return small


def _set_num_layers(config, kept_layers: list[int]) -> None:
    """Point the config at the kept layers (count, and per-layer types such as sliding windows)."""
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, len(kept_layers))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[l] for l in kept_layers]
