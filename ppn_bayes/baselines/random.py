"""A random keep-set of the same size: the floor every real method must beat.

The removal order is a uniformly random permutation of all attention heads and MLP channel groups
(the units GISP chooses among), drawn from ``torch.Generator().manual_seed(seed)``; keep-sets are its
prefixes, so they are nested and never exceed the size, exactly like the informed methods. The
comparison runs several seeds and reports the mean (and spread) of their perplexities, because one
random draw can be lucky or unlucky.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.baselines import NestedKeepSets, full_inventory, gated_view, keepsets_from_order, timed


def random_keepsets(model: nn.Module | GatedLM, sizes: Sequence[float], seed: int = 0,
                    group_size: int = 1, kinds: Sequence[str] = ("heads", "groups")) -> NestedKeepSets:
    """Nested random keep-sets of ``sizes`` (fractions of decoder params) for one ``seed``."""
    with timed() as t:
        with gated_view(model, group_size, kinds=tuple(kinds)) as g:
            inv = full_inventory(g.inventory)
            kinds = g.inventory.kinds
        units: list = []
        if "layers" in kinds:
            units += [("layers", l) for l in range(inv.num_layers)]
        if "heads" in kinds:
            units += [("heads", (l, h)) for l in range(inv.num_layers) for h in range(inv.num_heads)]
        if "groups" in kinds:
            units += [("groups", (l, k)) for l in range(inv.num_layers) for k in range(inv.num_groups)]
        perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
        order = [units[i] for i in perm]
        keepsets = keepsets_from_order(inv, order, sizes)
    return NestedKeepSets("random", inv, keepsets, order, t.seconds, info={"seed": seed})
