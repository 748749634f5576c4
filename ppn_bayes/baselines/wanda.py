"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024, "A Simple and Effective Pruning Approach for LLMs").

Score of weight ``W_ij`` (output row ``i``, input column ``j``) is its magnitude times the L2 norm of
its input feature over the calibration tokens:

    S_ij = |W_ij| * ||X_j||_2,   ||X_j||_2 = sqrt(sum_t x_tj^2)

Weights are compared *per output row* (each row loses the same number of weights, its lowest
scores), and the survivors are not updated. Semi-structured ``2:4``: in every group of four
consecutive input columns of a row, the two lowest scores are zeroed.

Follows the paper, including its sequential calibration (each layer sees the outputs of the already
pruned layers before it; :mod:`.layerwise`). Departs: the target is a fraction of *decoder
parameters* (norms and biases included, which are never pruned), so the per-row sparsity of the
linear weights is set slightly above ``1 - size`` to meet it (:func:`linear_sparsity_for`); a row
prunes ``ceil(p * in)`` weights so the achieved size never exceeds the requested one.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.projections import weight_out_in
from ppn_bayes.baselines import (
    UnstructuredResult,
    check_blocks,
    decoder_param_fraction,
    linear_sparsity_for,
    timed,
)
from ppn_bayes.baselines.layerwise import sequential_prune
from ppn_bayes.errors import ConfigError


class ColumnNorms:
    """Running ``sum_t x_tj^2`` of a matrix product's input (float64: many tokens add up), kept on the
    inputs' device (no host copy per batch)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        sq = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq + sq

    @property
    def norms(self) -> torch.Tensor:
        return torch.zeros(self.in_features, dtype=torch.float64) if self.sq is None else self.sq.sqrt()


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for a weight ``[out, in]`` and input column norms ``[in]``."""
    return weight.abs() * col_norms.to(weight.device, weight.dtype).unsqueeze(0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask pruning the ``ceil(sparsity * in)`` lowest scores of every row."""
    k = math.ceil(sparsity * scores.shape[1] - 1e-9)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask zeroing the ``n`` lowest of every ``m`` consecutive scores of a row (N:M sparsity)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"{n}:{m} sparsity needs input widths divisible by {m}; this layer has {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(out_f, in_f)


def wanda_mask(weight: torch.Tensor, col_norms: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    scores = wanda_scores(weight, col_norms)
    return n_m_mask(scores) if pattern == "2:4" else row_mask(scores, sparsity)


def wanda(model: nn.Module | GatedLM, blocks: torch.Tensor, size: float = 0.5, pattern: str = "unstructured",
          batch_size: int = 4) -> UnstructuredResult:
    """A pruned copy of ``model``; ``size`` is the decoder-parameter fraction kept (ignored for 2:4)."""
    if pattern not in ("unstructured", "2:4"):
        raise ConfigError(f"unknown sparsity pattern {pattern!r}; choose unstructured or 2:4")
    blocks = check_blocks(blocks)
    base = model.model if isinstance(model, GatedLM) else model
    with timed() as t:
        pruned = copy.deepcopy(base)
        sparsity = 0.5 if pattern == "2:4" else linear_sparsity_for(pruned, size)

        def prune(mod: nn.Module, stats: ColumnNorms) -> None:
            w = weight_out_in(mod)
            w.mul_(wanda_mask(w, stats.norms, sparsity, pattern).to(w.dtype))

        def make(mod: nn.Module) -> ColumnNorms:
            return ColumnNorms(weight_out_in(mod).shape[1])

        sequential_prune(pruned, blocks, make, prune, batch_size)
    return UnstructuredResult("wanda", pattern, pruned, decoder_param_fraction(pruned), t.seconds,
                              info={"linear_sparsity": sparsity})
