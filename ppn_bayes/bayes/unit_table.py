"""Targets and the unit table: what a requested size means, and what every gated unit costs.

**Target.** A size is asked for in one currency: a fraction of decoder parameters (``size``), a
decoder parameter count (``params``), a number of layers (``layers``) or a FLOPs-per-token budget
(``flops``: a fraction when <= 1, else FLOPs per token). Embeddings and the LM head are never pruned
and are not part of the budget.

**Unit table.** :class:`UnitTable` lists every gated unit in one flat, canonical order (layers, then
heads, then groups, row-major) with its exact incremental cost in each currency, measured with
:meth:`UnitInventory.kept_cost` itself so the two never disagree: a layer's own cost when it enters,
a head's q/o cost with its GQA KV head's share charged once, with the group's first query head; a
channel group's own channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.errors import SizeError

KIND_ORDER = ("layers", "heads", "groups")


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A requested size: ``kind`` as the user gave it, the ``currency`` it is measured in, the
    absolute ``budget`` in that currency and the ``total`` (whole decoder) in it."""

    kind: str  # size | params | layers | flops
    value: float
    currency: str  # params | flops | layers
    budget: float
    total: float

    @property
    def fraction(self) -> float:
        return self.budget / self.total


def parse_target(inventory: UnitInventory, size: float | None = None, params: float | None = None,
                 layers: int | None = None, flops: float | None = None) -> Target:
    """Validate exactly one target and convert it to an absolute budget (one-line SizeError otherwise)."""
    given = {k: v for k, v in (("size", size), ("params", params), ("layers", layers), ("flops", flops))
             if v is not None}
    if len(given) != 1:
        raise SizeError(f"give exactly one target (size, params, layers or flops), got {sorted(given) or 'none'}")
    kind, value = next(iter(given.items()))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SizeError(f"{kind} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise SizeError(f"{kind} {value:g} is not a finite number; ask for a size such as --size 0.5")
    if value <= 0:
        raise SizeError(f"{kind} must be > 0, got {value:g}; ask for a positive size such as --size 0.5")
    if kind == "size":
        if value > 1:
            raise SizeError(f"size {value:g} is a fraction of the decoder's parameters and must be in (0, 1]; "
                            "use --params for a parameter count")
        total = inventory.total_cost("params")
        return Target(kind, value, "params", value * total, total)
    if kind == "params":
        total = inventory.total_cost("params")
        if value > total:
            raise SizeError(f"params {value:.0f} exceeds the decoder's {total:.0f} parameters "
                            "(embeddings are not pruned); ask for at most that")
        return Target(kind, value, "params", value, total)
    if kind == "flops":
        total = inventory.total_cost("flops")
        budget = value * total if value <= 1 else value
        if budget > total:
            raise SizeError(f"flops {value:g} exceeds the decoder's {total:.0f} FLOPs per token; ask for at most "
                            "that, or a fraction in (0, 1]")
        return Target(kind, value, "flops", budget, total)
    if "layers" not in inventory.kinds:
        raise SizeError("this run does not gate whole layers, so a layer count cannot be met; "
                        "ask for --size, --params or --flops")
    L = inventory.num_layers
    if value != int(value) or not 1 <= value <= L:
        raise SizeError(f"layers must be a whole number between 1 and {L}, got {value:g}")
    return Target(kind, value, "layers", float(int(value)), float(L))


# -------------------------------------------------------------------------------------- unit table


@dataclass
class UnitTable:
    """Every gated unit in one flat, canonical order (layers, then heads, then groups, row-major)
    with its exact incremental costs; converts between flat ``[..., N]`` and per-kind tensors."""

    inventory: UnitInventory
    kinds: tuple[str, ...]
    kind_id: torch.Tensor  # [N] index into KIND_ORDER
    layer: torch.Tensor  # [N]
    index: torch.Tensor  # [N] layer index, head index or group index
    kv_id: torch.Tensor  # [N] global KV-head id of a head, -1 otherwise
    base_cost: dict[str, torch.Tensor]  # currency -> [N] cost without the KV share
    kv_cost: dict[str, float]  # currency -> K/V cost charged with a KV head's first query head
    fixed_cost: dict[str, float]  # currency -> cost of what is never gated (ungated layers and their units)

    @classmethod
    def build(cls, inventory: UnitInventory) -> UnitTable:
        inv, L = inventory, inventory.num_layers
        H, G = inv.num_heads, inv.num_groups
        kinds = tuple(k for k in KIND_ORDER if k in inv.kinds)
        widths = {"layers": 1, "heads": H, "groups": G}
        kid, lay, idx = [], [], []
        for k in kinds:
            w = widths[k]
            kid.append(torch.full((L * w,), KIND_ORDER.index(k)))
            lay.append(torch.arange(L).repeat_interleave(w))
            idx.append(torch.arange(L) if k == "layers" else torch.arange(w).repeat(L))
        kind_id, layer, index = torch.cat(kid), torch.cat(lay), torch.cat(idx)
        is_head = kind_id == 1
        kv_id = torch.where(is_head, layer * inv.dims.num_kv_heads + index // inv.dims.kv_group, -1)
        base, kv = {}, {}
        for cur in ("params", "flops"):
            base[cur], kv[cur] = cls._costs(inv, kind_id, index, cur)
        base["layers"] = (kind_id == 0).to(torch.float64)
        kv["layers"] = 0.0
        fixed = {cur: inv.kept_cost(KeepSet(), cur) for cur in ("params", "flops")}
        fixed["layers"] = 0.0
        return cls(inv, kinds, kind_id, layer, index, kv_id, base, kv, fixed)

    @staticmethod
    def _costs(inv: UnitInventory, kind_id: torch.Tensor, index: torch.Tensor, cur: str
               ) -> tuple[torch.Tensor, float]:
        """Exact incremental costs, measured with :meth:`UnitInventory.kept_cost` itself (so the two
        can never disagree): a layer's own cost, a head's own q/o cost (+ the KV share on its group's
        first head), a group's channels."""
        c = inv.kept_cost
        layer_own = c(KeepSet(layers=[0]), cur)
        cost = torch.zeros(kind_id.shape[0], dtype=torch.float64)
        cost[kind_id == 0] = layer_own
        kv = 0.0
        if "heads" in inv.kinds:
            first = c(KeepSet(layers=[0], heads=[(0, 0)]), cur) - layer_own
            if inv.dims.kv_group > 1:
                own = c(KeepSet(layers=[0], heads=[(0, 0), (0, 1)]), cur) - layer_own - first
            else:
                own = first
            kv = first - own
            cost[kind_id == 1] = own
        if "groups" in inv.kinds:
            G = inv.num_groups
            by_group = torch.empty(G, dtype=torch.float64)
            for g in _distinct_groups(inv):  # group 0 stands for every full-width group
                value = c(KeepSet(layers=[0], groups=[(0, g)]), cur) - layer_own
                by_group[g:] = value
            cost[kind_id == 2] = by_group[index[kind_id == 2]]
        return cost, float(kv)

    @property
    def size(self) -> int:
        return int(self.kind_id.shape[0])

    def flatten(self, per_kind: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{kind: [..., L(, W)]}`` -> ``[..., N]`` in the canonical order."""
        L = self.inventory.num_layers
        parts = []
        for k in self.kinds:
            v = per_kind[k]
            lead = v.shape[: v.ndim - (1 if k == "layers" else 2)]
            parts.append(v.reshape(*lead, -1) if k != "layers" else v.reshape(*lead, L))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., N]`` -> ``{kind: [..., L(, W)]}``."""
        inv = self.inventory
        widths = {"layers": 1, "heads": inv.num_heads, "groups": inv.num_groups}
        out, start = {}, 0
        for k in self.kinds:
            n = inv.num_layers * widths[k]
            v = flat[..., start:start + n]
            out[k] = v if k == "layers" else v.reshape(*flat.shape[:-1], inv.num_layers, widths[k])
            start += n
        return out

    def keepset(self, keep: torch.Tensor) -> KeepSet:
        """A ``[N]`` boolean row -> the canonical :class:`KeepSet` (ungated kinds filled in)."""
        sel = keep.nonzero().flatten()
        k, l, i = self.kind_id[sel].tolist(), self.layer[sel].tolist(), self.index[sel].tolist()
        ks = KeepSet(layers=[li for kk, li in zip(k, l) if kk == 0],
                     heads=[(li, ii) for kk, li, ii in zip(k, l, i) if kk == 1],
                     groups=[(li, ii) for kk, li, ii in zip(k, l, i) if kk == 2])
        return self.inventory.complete(ks)

    def unit_name(self, u: int) -> str:
        k, l, i = int(self.kind_id[u]), int(self.layer[u]), int(self.index[u])
        return f"layer {l}" if k == 0 else (f"head {l}.{i}" if k == 1 else f"group {l}.{i}")


def _distinct_groups(inv: UnitInventory) -> list[int]:
    """Group 0 and, when the last group is narrower, the last one (all others equal group 0)."""
    G = inv.num_groups
    sizes = inv.group_sizes()
    return [0] if G == 1 or int(sizes[-1]) == int(sizes[0]) else [0, G - 1]
