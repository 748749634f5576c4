"""The unit inventory of a decoder-only transformer and the cost of every unit.

A *unit* is a removable piece of the decoder (see ``docs/method.md``):

* a **layer** ``l``: the whole residual block (attention + MLP). A pre-norm block whose residual
  branches are multiplied by 0 is an exact skip.
* an **attention head** ``(l, h)``: one *query* head. Under grouped-query attention (GQA) the key/value
  head shared by ``H / KV`` query heads is removed only when all of them are removed.
* an **MLP channel group** ``(l, g)``: ``group_size`` consecutive intermediate channels (rows of the
  up/gate projections, columns of the down projection); ``group_size = 1`` gives single neurons.

Units nest: heads and groups exist only while their layer is kept.

Costs are counted exactly from the architecture, in two currencies: parameters and FLOPs per token.
FLOPs per token of a matrix product are ``2 * in * out`` (a multiply and an add), so a SwiGLU MLP costs
``6 d d_ff`` and an attention block with full-size K/V costs ``8 d^2`` (the paper's weights). Under GQA
the K/V cost of a group is shared by its query heads; :meth:`UnitInventory.kept_cost` charges it
exactly (once per KV group with at least one kept query head), while the per-unit linear costs used
inside the Pyro model split it evenly among the group's query heads (the two agree whenever whole
groups are kept or dropped). Embeddings, the final norm and the LM head are never pruned and are
reported apart (``embedding_params``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from ppn_bayes.errors import ConfigError, SizeError
from ppn_bayes.schema import Int, List, Obj, validate

UnitKind = Literal["layers", "heads", "groups"]
ALL_KINDS: tuple[UnitKind, ...] = ("layers", "heads", "groups")


@dataclass(frozen=True)
class Dims:
    """Architecture facts every family reduces to."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    mlp_matrices: int  # 3 for gated (SwiGLU) MLPs, 2 for plain ones (GPT-2)
    attn_bias: bool = False  # q/k/v biases (Qwen2, GPT-2)
    o_bias: bool = False  # output projection bias (GPT-2)
    mlp_bias: bool = False  # biases of the MLP input projections
    mlp_out_bias: bool = False  # bias of the MLP output projection
    layer_extra_params: int = 0  # norms etc.: present iff the layer is kept

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass
class KeepSet:
    """Which units survive. The JSON form is ``{"layers": [...], "heads": [[l, h], ...], "groups": [[l, g], ...]}``.

    Heads and groups of dropped layers are ignored (nesting); an empty ``heads`` list for a kept layer
    means "no attention at all in that layer" only if the inventory gates heads; when heads are not
    gated every head of a kept layer is kept (see :meth:`UnitInventory.complete`).
    """

    layers: list[int] = field(default_factory=list)
    heads: list[tuple[int, int]] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "layers": sorted(int(x) for x in self.layers),
            "heads": sorted([int(a), int(b)] for a, b in self.heads),
            "groups": sorted([int(a), int(b)] for a, b in self.groups),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "keep-set") -> KeepSet:
        """The JSON form back, strictly: indices must be JSON integers (``1.7`` or ``true`` is an error,
        never read as layer 1), pairs must be pairs; a one-line ConfigError names ``where`` and the field."""

        pair = List(Int(0), length=2)
        validate(d, Obj(required={"layers": List(Int(0))}, optional={"heads": List(pair), "groups": List(pair)}),
                 where, 'expected {"layers": [l, ...], "heads": [[l, h], ...], "groups": [[l, g], ...]} with '
                 "non-negative integer indices (write one with `ppn keepset RUN --json`)", ConfigError)
        return cls(
            layers=[int(x) for x in d.get("layers", [])],
            heads=[(int(a), int(b)) for a, b in d.get("heads", [])],
            groups=[(int(a), int(b)) for a, b in d.get("groups", [])],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def heads_of(self, layer: int) -> list[int]:
        return sorted(h for l, h in self.heads if l == layer)

    def groups_of(self, layer: int) -> list[int]:
        return sorted(g for l, g in self.groups if l == layer)


@dataclass
class UnitInventory:
    """Every gateable unit of one model, with its parameter and FLOP cost.

    ``kinds`` says which unit kinds are gated (any combination of ``layers``, ``heads``, ``groups``);
    ungated kinds are always kept while their layer is.
    """

    dims: Dims
    group_size: int = 1
    kinds: tuple[str, ...] = ALL_KINDS
    family: str = ""
    embedding_params: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad:
            raise ConfigError(f"unknown unit kind(s) {bad}; choose from {list(ALL_KINDS)}")
        self.kinds = tuple(k for k in ALL_KINDS if k in self.kinds)
        if self.group_size < 1 or self.group_size > self.dims.intermediate:
            raise ConfigError(
                f"group_size {self.group_size} must be between 1 and the MLP width {self.dims.intermediate}"
            )

    # ----------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    @property
    def num_heads(self) -> int:
        return self.dims.num_heads

    @property
    def num_groups(self) -> int:
        return math.ceil(self.dims.intermediate / self.group_size)

    def group_sizes(self) -> torch.Tensor:
        """Channels in each group ([G]); the last group may be smaller when d_ff % group_size != 0."""
        sizes = torch.full((self.num_groups,), self.group_size, dtype=torch.long)
        sizes[-1] = self.dims.intermediate - self.group_size * (self.num_groups - 1)
        return sizes

    def group_channels(self, g: int) -> range:
        return range(g * self.group_size, min((g + 1) * self.group_size, self.dims.intermediate))

    def kv_head_of(self, h: int) -> int:
        return h // self.dims.kv_group

    # ----------------------------------------------------------------- costs
    def head_params(self) -> tuple[float, float]:
        """(params of one query head's own q + o slices, K/V params of one KV head)."""
        d, hd = self.dims.hidden, self.dims.head_dim
        own = 2 * d * hd + (hd if self.dims.attn_bias else 0)
        kv = 2 * d * hd + (2 * hd if self.dims.attn_bias else 0)
        return float(own), float(kv)

    def channel_params(self) -> float:
        d = self.dims.hidden
        return float(self.dims.mlp_matrices * d + (self.dims.mlp_matrices - 1 if self.dims.mlp_bias else 0))

    def layer_own_params(self) -> float:
        d = self.dims.hidden
        return float(
            self.dims.layer_extra_params + (d if self.dims.o_bias else 0) + (d if self.dims.mlp_out_bias else 0)
        )

    def unit_costs(self, currency: Literal["params", "flops"] = "params") -> dict[str, torch.Tensor]:
        """Linear per-unit costs: ``{"layers": [L], "heads": [L, H], "groups": [L, G]}``.

        When heads are not gated their cost is folded into the layer's, likewise groups: the sum of
        the costs of all units always equals :meth:`total_cost`. K/V costs are split evenly among the
        query heads that share them (exact when whole GQA groups go together).
        FLOPs per token are ``2 * params`` of the matrix products (biases and norms cost ~0 FLOPs and
        are counted as one FLOP per parameter).
        """
        L, H, G = self.num_layers, self.num_heads, self.num_groups
        own, kv = self.head_params()
        head_p = own + kv / self.dims.kv_group
        chan_p = self.channel_params()
        mult = 2.0 if currency == "flops" else 1.0
        heads = torch.full((L, H), head_p * mult, dtype=torch.float64)
        groups = (self.group_sizes().to(torch.float64) * chan_p * mult).expand(L, G).clone()
        layers = torch.full((L,), self.layer_own_params(), dtype=torch.float64)  # norms/biases: 1 FLOP/param
        if "heads" not in self.kinds:
            layers = layers + heads.sum(1)
            heads = torch.zeros_like(heads)
        if "groups" not in self.kinds:
            layers = layers + groups.sum(1)
            groups = torch.zeros_like(groups)
        return {"layers": layers, "heads": heads, "groups": groups}

    def total_cost(self, currency: Literal["params", "flops"] = "params") -> float:
        """Cost of the whole decoder stack (every layer, head and group kept)."""
        return self.kept_cost(self.full_keepset(), currency)

    def kept_cost(self, keep: KeepSet, currency: Literal["params", "flops"] = "params") -> float:
        """Exact cost of a keep-set, charging each KV head once if any of its query heads is kept."""
        keep = self.complete(keep)
        own, kv = self.head_params()
        chan_p = self.channel_params()
        mult = 2.0 if currency == "flops" else 1.0
        sizes = self.group_sizes()
        total = 0.0
        for l in keep.layers:
            heads = keep.heads_of(l)
            kv_heads = {self.kv_head_of(h) for h in heads}
            total += self.layer_own_params()
            total += mult * (own * len(heads) + kv * len(kv_heads))
            total += mult * chan_p * float(sum(int(sizes[g]) for g in keep.groups_of(l)))
        return total

    def size_of(self, keep: KeepSet, currency: Literal["params", "flops"] = "params") -> float:
        """Fraction of the decoder kept (0..1)."""
        return self.kept_cost(keep, currency) / self.total_cost(currency)

    # ------------------------------------------------------------ keep-sets
    def full_keepset(self) -> KeepSet:
        L, H, G = self.num_layers, self.num_heads, self.num_groups
        return KeepSet(
            layers=list(range(L)),
            heads=[(l, h) for l in range(L) for h in range(H)],
            groups=[(l, g) for l in range(L) for g in range(G)],
        )

    def complete(self, keep: KeepSet) -> KeepSet:
        """Apply nesting and fill in ungated kinds: the canonical form of a keep-set.

        Heads/groups of dropped layers are removed; if heads (groups) are not gated, every head
        (group) of each kept layer is kept. Out-of-range indices raise a one-line error.
        """

        L, H, G = self.num_layers, self.num_heads, self.num_groups
        layers = sorted({int(l) for l in keep.layers}) if "layers" in self.kinds else list(range(L))
        for l in layers:
            if not 0 <= l < L:
                raise SizeError(f"keep-set names layer {l}, but the model has layers 0..{L - 1}")
        kept = set(layers)
        for l, h in keep.heads:
            if not (0 <= l < L and 0 <= h < H):
                raise SizeError(f"keep-set names head ({l}, {h}) outside {L} layers x {H} heads")
        for l, g in keep.groups:
            if not (0 <= l < L and 0 <= g < G):
                raise SizeError(f"keep-set names group ({l}, {g}) outside {L} layers x {G} groups")
        if "heads" in self.kinds:
            heads = sorted({(int(l), int(h)) for l, h in keep.heads if l in kept})
        else:
            heads = [(l, h) for l in layers for h in range(H)]
        if "groups" in self.kinds:
            groups = sorted({(int(l), int(g)) for l, g in keep.groups if l in kept})
        else:
            groups = [(l, g) for l in layers for g in range(G)]
        return KeepSet(layers=layers, heads=heads, groups=groups)

    def masks(self, keep: KeepSet, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Hard 0/1 gate tensors ``{"layers": [L], "heads": [L, H], "groups": [L, G]}`` for a keep-set."""
        keep = self.complete(keep)
        L, H, G = self.num_layers, self.num_heads, self.num_groups
        layers = torch.zeros(L, dtype=dtype)
        heads = torch.zeros(L, H, dtype=dtype)
        groups = torch.zeros(L, G, dtype=dtype)
        if keep.layers:
            layers[keep.layers] = 1
        for l, h in keep.heads:
            heads[l, h] = 1
        for l, g in keep.groups:
            groups[l, g] = 1
        return {"layers": layers, "heads": heads, "groups": groups}

    def keepset_from_masks(self, masks: dict[str, torch.Tensor]) -> KeepSet:
        """Inverse of :meth:`masks` (entries > 0.5 are kept)."""
        L, H, G = self.num_layers, self.num_heads, self.num_groups
        lm = masks.get("layers", torch.ones(L))
        hm = masks.get("heads", torch.ones(L, H))
        gm = masks.get("groups", torch.ones(L, G))
        layers = [l for l in range(L) if float(lm[l]) > 0.5]
        return self.complete(
            KeepSet(
                layers=layers,
                heads=[(l, h) for l in layers for h in range(H) if float(hm[l, h]) > 0.5],
                groups=[(l, g) for l in layers for g in range(G) if float(gm[l, g]) > 0.5],
            )
        )

    # ------------------------------------------------------------- describe
    def describe(self) -> dict:
        return {
            "family": self.family,
            "dims": asdict(self.dims),
            "group_size": self.group_size,
            "kinds": list(self.kinds),
            "num_units": {"layers": self.num_layers, "heads": self.num_layers * self.num_heads,
                          "groups": self.num_layers * self.num_groups},
            "decoder_params": self.total_cost("params"),
            "decoder_flops_per_token": self.total_cost("flops"),
            "embedding_params": self.embedding_params,
        }

    def to_dict(self) -> dict:
        return {"dims": asdict(self.dims), "group_size": self.group_size, "kinds": list(self.kinds),
                "family": self.family, "embedding_params": self.embedding_params}

    @classmethod
    def from_dict(cls, d: dict) -> UnitInventory:
        return cls(dims=Dims(**d["dims"]), group_size=int(d["group_size"]), kinds=tuple(d["kinds"]),
                   family=d.get("family", ""), embedding_params=int(d.get("embedding_params", 0)))


def head_channel_indices(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """Flat indices of the given heads' ``head_dim`` slices along a ``[H * head_dim]`` axis."""
    idx = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
