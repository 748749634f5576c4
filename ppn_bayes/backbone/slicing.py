"""Cutting per-layer tensors down to the kept heads and channels.

One source of truth for the resize step (which applies it to tensors read lazily from safetensors),
for the in-memory sliced models of the equivalence tests, and for per-unit weight norms.

Grouped-query attention: a layer keeps a key/value head while any query head sharing it is kept.
Standard ``transformers`` attention repeats each KV head for a *fixed* number of consecutive query
heads, so a cut is *uniform* when every kept KV head keeps the same number of query heads; then
K/V are cut to the kept KV heads. Otherwise (:func:`kv_plan` says ``uniform=False``) each kept query
head gets its own copy of its KV head (``kv_group = 1``): exact, at the price of duplicated K/V rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppn_bayes.backbone.family import SliceRule
from ppn_bayes.backbone.units import Dims, head_channel_indices


@dataclass(frozen=True)
class LayerCut:
    """What one kept layer keeps: query heads, the KV heads they read, and MLP channels."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]  # one entry per KV head in the cut model (may repeat when not uniform)
    kv_group: int  # query heads per KV head in the cut model
    channels: tuple[int, ...]


def kv_plan(q_heads: list[int], dims: Dims) -> tuple[list[int], int, bool]:
    """KV heads to keep for the given query heads: ``(kv_heads, kv_group, uniform)``."""
    q_heads = sorted(q_heads)
    if not q_heads:
        return [], 1, True
    kv_of = [h // dims.kv_group for h in q_heads]
    kept_kv = sorted(set(kv_of))
    counts = {k: kv_of.count(k) for k in kept_kv}
    if len(set(counts.values())) == 1:
        return kept_kv, counts[kept_kv[0]], True
    return kv_of, 1, False


def layer_cut(q_heads: list[int], channels: list[int], dims: Dims) -> LayerCut:
    kv, group, _ = kv_plan(q_heads, dims)
    return LayerCut(tuple(sorted(q_heads)), tuple(kv), group, tuple(sorted(channels)))


def rule_indices(rule: SliceRule, cut: LayerCut, dims: Dims, axis_len: int) -> torch.Tensor:
    """Indices along ``rule.axis`` that survive the cut."""
    if rule.unit == "q":
        base = head_channel_indices(cut.q_heads, dims.head_dim)
    elif rule.unit == "kv":
        base = head_channel_indices(cut.kv_heads, dims.head_dim)
    else:
        base = torch.tensor(cut.channels, dtype=torch.long)
    if rule.segments == 1:
        return base
    width = axis_len // rule.segments
    return torch.cat([base + s * width for s in range(rule.segments)])


def cut_tensor(tensor: torch.Tensor, rule: SliceRule, cut: LayerCut, dims: Dims) -> torch.Tensor:
    """The kept part of one tensor (a new tensor; the input is not modified)."""
    idx = rule_indices(rule, cut, dims, tensor.shape[rule.axis]).to(tensor.device)
    return tensor.index_select(rule.axis, idx)


def unit_sq_norms(tensor: torch.Tensor, rule: SliceRule, dims: Dims) -> torch.Tensor:
    """Squared Frobenius norm of each unit's slice of ``tensor``: ``[H]`` for q/kv rules, ``[d_ff]`` for ch.

    K/V norms are shared by the ``kv_group`` query heads reading them and are split evenly among them.
    """
    t = tensor.detach().float()
    other = [a for a in range(t.dim()) if a != rule.axis]
    sq = (t**2).sum(dim=other) if other else t**2  # [axis_len]
    if rule.segments > 1:
        sq = sq.view(rule.segments, -1).sum(0)
    if rule.unit == "ch":
        return sq
    per_head = sq.view(-1, dims.head_dim).sum(1)
    if rule.unit == "kv":
        per_head = per_head.repeat_interleave(dims.kv_group) / dims.kv_group
    return per_head
