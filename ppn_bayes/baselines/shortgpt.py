"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect"): remove whole layers ranked by Block Influence.

Block Influence of layer ``l`` is one minus the cosine similarity of its input and output hidden
states, averaged over calibration tokens:

    BI_l = 1 - E_t [ <x_t^(l), x_t^(l+1)> / (||x_t^(l)|| ||x_t^(l+1)||) ]

A layer that barely turns the residual stream (BI near 0) is redundant; ShortGPT deletes the
lowest-BI layers in one shot, without retraining.

Follows the paper: BI on the dense model, one-shot ranking, whole-layer removal. Departs: sizes are
fractions of decoder *parameters* (the paper names a layer count); the number of removed layers is the
smallest that reaches the size (achieved size ``<= `` requested). Input/output states are read with
hooks on the decoder layers themselves, not from ``output_hidden_states``, whose last entry has the
final norm applied in ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.baselines import (
    NestedKeepSets,
    check_blocks,
    full_inventory,
    gated_view,
    keepsets_from_order,
    timed,
)


def _hidden(x) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def block_influence(model: nn.Module | GatedLM, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """BI of every decoder layer, ``[L]`` float64 on the model's device, averaged over all tokens of
    ``blocks``."""
    blocks = check_blocks(blocks)
    base = model.model if isinstance(model, GatedLM) else model
    layers = family_for(base.config).layers(base)
    device = next(base.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)  # where the hidden states are
    count = 0
    handles = []

    def hook_for(l: int):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = _hidden(out)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)
            sums[l] += cos.double().sum().to(sums.device)

        return hook

    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for(l), with_kwargs=True))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size].to(device)
            base(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return 1.0 - sums / count


def shortgpt(model: nn.Module | GatedLM, blocks: torch.Tensor, sizes: Sequence[float],
             group_size: int = 1, batch_size: int = 4) -> NestedKeepSets:
    """Nested keep-sets that drop the lowest-BI layers first (ties: later layer first)."""
    with timed() as t:
        bi = block_influence(model, blocks, batch_size)
        with gated_view(model, group_size, kinds=("layers",)) as g:
            inv = full_inventory(g.inventory)
        # Sort ascending by BI; stable sort on reversed index breaks ties toward deeper layers.
        idx = list(range(len(bi)))
        order = sorted(idx, key=lambda l: (float(bi[l]), -l))
        removal = [("layers", l) for l in order]
        keepsets = keepsets_from_order(inv, removal, sizes)
    return NestedKeepSets("shortgpt", inv, keepsets, removal, t.seconds,
                          info={"block_influence": [float(b) for b in bi]})
