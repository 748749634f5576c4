"""The score anchor ``r_u``: the prior mean of every unit's score, from the weights or from the data.

The score prior (:mod:`ppn_bayes.bayes.prior`) centres each unit's score on ``z_u = log r_u - mean log r``
(per kind); the latent offsets then move it. What ``r_u`` is matters as soon as the data cannot move
the offsets far (a short run, a frozen guide), and it decides the order outright where they are 0.

* ``norm`` (the paper's anchor, kept for ``preset: paper``): the Frobenius norm of the unit's weights
  (:meth:`GatedLM.unit_norms`). On a pretrained model it is a poor importance: ranking SmolLM2-135M's
  layers by weight norm and removing 7 of 30 gives perplexity ~146,000 on *Persuasion*, where Block
  Influence gives 86 (dense 35.8; issue 11).
* ``data`` (empirical Bayes, the default of ``preset: ours``): one calibration pass over a few
  training blocks of the dense model.

  - layers: Block Influence ``BI_l = 1 - E_t cos(x_t^(l), x_t^(l+1))`` (ShortGPT's criterion, Men et
    al. 2024; :func:`ppn_bayes.baselines.shortgpt.block_influence`): how far the block turns the
    residual stream;
  - heads and channel groups: first-order Taylor importance ``sum_{w in u} |dL/dw * w|`` of the mean
    next-token NLL (GISP's criterion; :func:`ppn_bayes.baselines.gisp.taylor_importance`), the
    estimated loss change of removing the unit, in the same "bigger = keep" sense.

  Both are positive, so their logs centre per kind like the norms did; nothing downstream changes.
  Why these two: Block Influence is the best cheap layer criterion we measured on SmolLM2
  (benchmarks/RESULTS.md, "Peers"), and needs no backward pass; Taylor importance is GISP's
  structure score and costs one backward pass per batch. Both are computed once, before training,
  on ``units.anchor_blocks`` training blocks: the anchor is fixed data (a prior mean), not a parameter.

Data flow: this module imports the backbone and the baselines and returns tensors; the prior
receives those tensors and imports nothing of this (nor of training). :func:`anchor_pruning` is the
anchor used alone as a pruning method (no training, offsets 0): the ``anchor`` row of ``ppn compare``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.baselines import (
    NestedKeepSets,
    check_blocks,
    full_inventory,
    gated_view,
    keepsets_from_order,
    timed,
)
from ppn_bayes.baselines.gisp import loss_closures, taylor_importance
from ppn_bayes.baselines.shortgpt import block_influence
from ppn_bayes.bayes.prior import centred_log_norms
from ppn_bayes.errors import ConfigError

ANCHORS = ("norm", "data")
FLOOR = 1e-12  # a unit with exactly zero importance gets log(1e-12): last, but finite


@torch.no_grad()
def _layer_anchor(g: GatedLM, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    return block_influence(g, blocks, batch_size).float().cpu().clamp_min(FLOOR)


def _taylor_anchor(g: GatedLM, blocks: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    terms = loss_closures("perplexity", blocks, None, batch_size, 1.0)(g)  # GISP's own loss closures
    with g.gates():  # the dense model, whatever gates a caller has open
        out = taylor_importance(g, terms)
    return {k: v.float().cpu().clamp_min(FLOOR) for k, v in out.items()}


def score_anchors(gated: GatedLM, kind: str = "norm", blocks: torch.Tensor | None = None,
                  batch_size: int = 4, kinds: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``r_u`` for every gated kind: ``{"layers": [L], "heads": [L, H], "groups": [L, G]}`` (positive).

    ``kind``: ``norm`` (weight norms) or ``data`` (Block Influence / Taylor importance on ``blocks``,
    a LongTensor ``[N, T]`` of training blocks); ``kinds`` defaults to the kinds ``gated`` gates.
    """
    kinds = tuple(gated.inventory.kinds if kinds is None else kinds)
    if kind == "norm":
        return {k: v.detach() for k, v in gated.unit_norms().items() if k in kinds}
    if kind != "data":
        raise ConfigError(f"units.score_anchor: unknown anchor {kind!r}; choose norm or data")
    if blocks is None:
        raise ConfigError("the data score anchor needs calibration blocks; pass training blocks (units.anchor_blocks)")
    blocks = check_blocks(blocks, "anchor calibration")
    out: dict[str, torch.Tensor] = {}
    was_training = gated.model.training
    gated.model.eval()  # no dropout in the calibration pass
    try:
        if "layers" in kinds:
            out["layers"] = _layer_anchor(gated, blocks, batch_size)
        if "heads" in kinds or "groups" in kinds:
            taylor = _taylor_anchor(gated, blocks, batch_size)
            out.update({k: taylor[k] for k in ("heads", "groups") if k in kinds})
    finally:
        gated.model.train(was_training)
    return out


def anchor_order(anchors: dict[str, torch.Tensor]) -> list[tuple[str, object]]:
    """Removal order (first to go first) of the anchor alone: the score prior's centre ``z_u`` with
    every offset 0 and one threshold for all kinds, nested like the push (a child leaves no later
    than its layer: key ``min(z_child, z_layer)``; on ties the layer goes first, taking its children)."""
    z = centred_log_norms(anchors)
    keyed: list[tuple[float, int, tuple, tuple[str, object]]] = []
    lay = z.get("layers")
    if lay is not None:
        keyed += [(float(lay[l]), 0, (l,), ("layers", l)) for l in range(lay.shape[0])]
    for rank, kind in ((1, "heads"), (2, "groups")):
        if kind not in z:
            continue
        v = z[kind]
        if lay is not None:
            v = torch.minimum(v, lay.unsqueeze(-1))
        keyed += [(float(v[l, j]), rank, (l, j), (kind, (l, j))) for l in range(v.shape[0]) for j in range(v.shape[1])]
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [u for *_, u in keyed]


def anchor_pruning(model: nn.Module | GatedLM, blocks: torch.Tensor, sizes: Sequence[float],
                   kinds: Sequence[str] = ("layers", "heads", "groups"), group_size: int = 64,
                   batch_size: int = 4) -> NestedKeepSets:
    """The data anchor alone as a pruning method: nested keep-sets from :func:`anchor_order`."""
    with timed() as t, gated_view(model, group_size, kinds=tuple(kinds)) as g:
        missing = [k for k in kinds if k not in g.inventory.kinds]
        if missing:
            raise ConfigError(f"{g.family.name} cannot gate {missing} exactly; drop them from the anchor's kinds")
        anchors = score_anchors(g, "data", blocks, batch_size, kinds=tuple(kinds))
        order = anchor_order(anchors)
        inv = full_inventory(g.inventory)
        keepsets = keepsets_from_order(inv, order, sizes)
    return NestedKeepSets("anchor", inv, keepsets, order, t.seconds,
                          info={"kinds": list(kinds), "group_size": group_size,
                                **({"block_influence": anchors["layers"].tolist()} if "layers" in anchors else {})})
