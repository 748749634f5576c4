"""Peer methods, implemented from their papers, so that `ppn compare` can put them beside PPN.

Three shapes of result, one per kind of peer:

* **Structured, nested** (:mod:`.gisp`, :mod:`.shortgpt`, :mod:`.random`): ``fn(model, calib, sizes)``
  returns a :class:`NestedKeepSets`: one :class:`~ppn_bayes.backbone.KeepSet` per requested size, where
  a size is the fraction of *decoder* parameters kept (``UnitInventory.size_of``). Each method
  produces one removal *order*; the keep-set of size ``s`` is the full model minus the shortest prefix
  of that order whose removal brings the kept cost to ``<= s``. Hence keep-sets are nested across
  sizes (a smaller one is a subset of every larger one) and the achieved size never exceeds the
  requested one (:func:`keepsets_from_order`).
* **Unstructured / semi-structured** (:mod:`.wanda`, :mod:`.sparsegpt`): ``fn(model, calib, size,
  pattern)`` returns an :class:`UnstructuredResult` holding a pruned *copy* of the model (the input is
  never modified); ``pattern`` is ``"unstructured"`` (the linear weights of the decoder are pruned so
  the nonzero decoder parameters are ``<= size`` of the total) or ``"2:4"`` (two of every four
  consecutive weights of each row along the input axis are zero: a fixed 50% of the linear weights).
* **Dynamic** (:mod:`.prunepath`): ``moefy(model, calib)`` returns a copy whose MLPs are mixtures of
  experts with an inference-time threshold ``tau``; the size it reaches is a per-token *mean active
  fraction*, measured, not a static keep-set.

All methods take token blocks ``LongTensor [N, T]`` from :func:`ppn_bayes.data.corpus.calibration_blocks`,
so every peer in a comparison sees the same calibration tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.projections import is_projection
from ppn_bayes.backbone.units import ALL_KINDS, KeepSet, UnitInventory
from ppn_bayes.errors import ConfigError, SizeError

STRUCTURED = ("gisp", "shortgpt", "random")
UNSTRUCTURED = ("wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")

Unit = tuple[str, Any]  # ("layers", l) | ("heads", (l, h)) | ("groups", (l, g))


@dataclass
class NestedKeepSets:
    """Nested keep-sets of one structured method, one per requested size.

    ``order`` is the removal order the keep-sets are prefixes of (JSON-friendly), ``seconds`` the
    wall time of the whole run (all sizes came from this one run), ``info`` method-specific
    diagnostics (e.g. ShortGPT's Block Influence per layer).
    """

    method: str
    inventory: UnitInventory
    keepsets: dict[float, KeepSet]
    order: list[Unit]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def size(self, s: float, currency: str = "params") -> float:
        return self.inventory.size_of(self.keepsets[s], currency)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "keepsets": {str(s): k.to_dict() for s, k in self.keepsets.items()},
            "achieved": {str(s): self.size(s) for s in self.keepsets},
            "seconds": self.seconds,
            "info": self.info,
        }


@dataclass
class UnstructuredResult:
    """A pruned copy of a model (zeros in its decoder's linear weights) and what it keeps."""

    method: str
    pattern: str
    model: nn.Module
    param_fraction: float  # nonzero decoder params / decoder params
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks


def check_sizes(sizes: Iterable[float]) -> list[float]:
    """Sizes as floats, descending and unique; a one-line error if one is not in (0, 1]."""
    out = sorted({float(s) for s in sizes}, reverse=True)
    infinite = [s for s in out if not math.isfinite(s)]
    if infinite:
        raise SizeError(f"size {infinite[0]:g} is not a finite number; a size is the fraction of decoder parameters "
                        "kept, in (0, 1], e.g. 0.5")
    if not out:
        raise SizeError("no sizes given; pass fractions of decoder parameters such as 0.9,0.75,0.5")
    bad = [s for s in out if not 0.0 < s <= 1.0]
    if bad:
        raise SizeError(f"size(s) {bad} out of range; a size is the fraction of decoder parameters kept, in (0, 1]")
    return out


def check_blocks(blocks: torch.Tensor, what: str = "calibration") -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.ndim != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ConfigError(f"{what} blocks must be a LongTensor [N>=1, T>=2], got {shape}; "
                          "make them with ppn_bayes.data.corpus.calibration_blocks")
    return blocks.long()


# ----------------------------------------------------------------------------- gated views


@contextlib.contextmanager
def gated_view(model: nn.Module | GatedLM, group_size: int = 1,
               kinds: Sequence[str] = ALL_KINDS) -> Iterator[GatedLM]:
    """A :class:`GatedLM` over ``model`` that gates at least ``kinds`` (hooks removed on exit if ours).

    A GatedLM passed in is reused when it gates every kind needed and has the asked group size;
    otherwise a fresh view is made over its wrapped model (no weights are copied either way).
    """
    if isinstance(model, GatedLM):
        if set(kinds) <= set(model.inventory.kinds) and model.inventory.group_size == group_size:
            yield model
            return
        model = model.model
    if "heads" in kinds:
        if not family_for(model.config).supports_heads:
            kinds = tuple(k for k in kinds if k != "heads")
    g = GatedLM(model, group_size=group_size, kinds=tuple(kinds))
    try:
        yield g
    finally:
        g.clear_gates()
        g.remove_hooks()


def full_inventory(inv: UnitInventory) -> UnitInventory:
    """The same model's inventory with every kind it can gate: keep-sets in it are fully explicit."""
    return UnitInventory(dims=inv.dims, group_size=inv.group_size, kinds=ALL_KINDS, family=inv.family,
                         embedding_params=inv.embedding_params)


# ----------------------------------------------------------------------------- nesting


class CostTracker:
    """The kept cost of a shrinking keep-set, updated in O(1) per removed unit.

    Recomputing :meth:`UnitInventory.kept_cost` after each of ~10^4 removals would be quadratic; the
    tracker charges exactly what ``kept_cost`` charges (a KV head while any query head sharing it is
    kept; a layer's own norms/biases while the layer is kept) and :func:`keepsets_from_order` checks
    the two agree at every size it reports.
    """

    def __init__(self, inv: UnitInventory, currency: str = "params"):
        self.inv = inv
        mult = 2.0 if currency == "flops" else 1.0
        own, kv = inv.head_params()
        self.head_own, self.kv, self.chan = mult * own, mult * kv, mult * inv.channel_params()
        self.layer_own = inv.layer_own_params()
        self.sizes = inv.group_sizes()
        L, H, G = inv.num_layers, inv.num_heads, inv.num_groups
        self.layers = set(range(L))
        self.heads = {(l, h) for l in range(L) for h in range(H)}
        self.groups = {(l, g) for l in range(L) for g in range(G)}
        self.kv_count = {(l, k): inv.dims.kv_group for l in range(L) for k in range(inv.dims.num_kv_heads)}
        self.total = inv.kept_cost(inv.full_keepset(), currency)  # type: ignore[arg-type]
        self.cost = self.total

    def remove(self, unit: Unit) -> None:
        kind, u = unit
        if kind == "layers":
            if u not in self.layers:
                return
            for h in range(self.inv.num_heads):
                self.remove(("heads", (u, h)))
            for g in range(self.inv.num_groups):
                self.remove(("groups", (u, g)))
            self.layers.discard(u)
            self.cost -= self.layer_own
        elif kind == "heads":
            if u not in self.heads:
                return
            self.heads.discard(u)
            key = (u[0], self.inv.kv_head_of(u[1]))
            self.kv_count[key] -= 1
            self.cost -= self.head_own + (self.kv if self.kv_count[key] == 0 else 0.0)
        elif kind == "groups":
            if u not in self.groups:
                return
            self.groups.discard(u)
            self.cost -= self.chan * float(self.sizes[u[1]])
        else:
            raise ValueError(kind)

    @property
    def fraction(self) -> float:
        return self.cost / self.total

    def keepset(self) -> KeepSet:
        return KeepSet(layers=sorted(self.layers), heads=sorted(self.heads), groups=sorted(self.groups))


def keepsets_from_order(inv: UnitInventory, order: Sequence[Unit], sizes: Iterable[float],
                        currency: str = "params") -> dict[float, KeepSet]:
    """Nested keep-sets: for each size, drop the shortest prefix of ``order`` that reaches it.

    Raises :class:`SizeError` if removing every unit of ``order`` still leaves more than a size.
    """
    inv = full_inventory(inv)
    tracker = CostTracker(inv, currency)
    out: dict[float, KeepSet] = {}
    pos = 0
    for s in check_sizes(sizes):
        while tracker.fraction > s + 1e-12 and pos < len(order):
            tracker.remove(order[pos])
            pos += 1
        if tracker.fraction > s + 1e-12:
            raise SizeError(f"size {s} is below the smallest this method can reach ({tracker.fraction:.3f} of "
                            "decoder parameters); ask for a larger size")
        keep = tracker.keepset()
        exact = inv.size_of(keep, currency)  # type: ignore[arg-type]
        assert abs(exact - tracker.fraction) < 1e-9, (exact, tracker.fraction)
        out[s] = keep
    return out


def is_nested(keepsets: dict[float, KeepSet]) -> bool:
    """True when every smaller keep-set is a subset of every larger one."""
    ordered = [keepsets[s] for s in sorted(keepsets, reverse=True)]
    for big, small in itertools.pairwise(ordered):
        for kind in ("layers", "heads", "groups"):
            if not set(map(_key, getattr(small, kind))) <= set(map(_key, getattr(big, kind))):
                return False
    return True


def _key(u: Any) -> Any:
    return tuple(u) if isinstance(u, (list, tuple)) else u


# ----------------------------------------------------------------------------- unstructured helpers


def decoder_linear_weights(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(layer, name, module)`` of every matrix-product module in the decoder layers, in order.

    ``nn.Linear`` and GPT-2's ``Conv1D`` (weight ``[in, out]``); see
    :func:`ppn_bayes.backbone.projections.weight_out_in`.
    """
    family = family_for(model.config)
    out = []
    for l, layer in enumerate(family.layers(model)):
        for name, mod in layer.named_modules():
            if is_projection(mod):
                out.append((l, name, mod))
    return out


def decoder_param_fraction(model: nn.Module) -> float:
    """Nonzero decoder-layer parameters / all decoder-layer parameters (norms and biases included)."""
    layers = family_for(model.config).layers(model)
    total = sum(p.numel() for p in layers.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in layers.parameters())
    return nonzero / total


def linear_sparsity_for(model: nn.Module, size: float) -> float:
    """Sparsity of the decoder's linear weights so that nonzero decoder params are ``<= size``.

    Norms and biases are never pruned by Wanda/SparseGPT, so the linear weights must carry a little
    more than ``1 - size`` sparsity for the *decoder* fraction to meet ``size`` exactly.
    """
    layers = family_for(model.config).layers(model)
    total = sum(p.numel() for p in layers.parameters())
    linear = sum(mod.weight.numel() for _, _, mod in decoder_linear_weights(model))
    keep_linear = size * total - (total - linear)
    if keep_linear < 0:
        raise SizeError(f"size {size} is below the non-prunable part of the decoder ({1 - linear / total:.4f}); "
                        "ask for a larger size")
    return min(1.0, max(0.0, 1.0 - keep_linear / linear))


def timed() -> Timer:
    return Timer()


class Timer:
    """``with timed() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:  # noqa: PYI034 - py310 target has no typing.Self
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


__all__ = [
    "PATTERNS",
    "STRUCTURED",
    "UNSTRUCTURED",
    "CostTracker",
    "NestedKeepSets",
    "UnstructuredResult",
    "check_blocks",
    "check_sizes",
    "decoder_linear_weights",
    "decoder_param_fraction",
    "full_inventory",
    "gated_view",
    "is_nested",
    "keepsets_from_order",
    "linear_sparsity_for",
    "timed",
]
