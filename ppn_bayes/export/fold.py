"""Folding a trained run into the written weights: trained tensors, LoRA deltas and amplitudes.

Optional inputs from a trained run are folded into the written weights, in this order:

1. ``weights``: full trained tensors keyed by the base model's parameter names replace the file's;
2. ``lora``: ``{name: {"A": [r, in], "B": [out, r], "scale": s}}`` adds ``s * B @ A`` (``nn.Linear``
   orientation; transposed for GPT-2's ``Conv1D``) to the named weight before it is cut;
3. ``amplitudes``: ``{"attn_scale": [L, hidden], "mlp_scale": [L, hidden]}`` multiply each residual
   branch's output per output dimension. A branch ending in a linear map ``y = W x + b`` gives
   ``s * y = (diag(s) W) x + s * b``: the output rows of ``W`` (columns for ``Conv1D``) and the bias
   are scaled; a branch ending in a norm (OLMo-2's post-norms) scales the norm's weight.
   ``{"heads": [L, H], "groups": [L, G]}`` multiply units' *inputs* to the attention output / MLP
   down projection, as :class:`~ppn_bayes.backbone.gated.GatedLM`'s pre-hooks do:
   ``W (a * x) = (W diag(a)) x``, so a kept head's ``head_dim`` input columns (rows for ``Conv1D``)
   and a kept group's channel columns are scaled, and the bias is not.

:class:`TensorSource` does 1 and 2 for each tensor it reads; :func:`layer_tensors` cuts one layer's
tensors and :func:`fold_amplitudes` does 3 on the cut tensors.
"""

from __future__ import annotations

import torch

from ppn_bayes.backbone.family import SliceRule
from ppn_bayes.backbone.slicing import LayerCut, rule_indices
from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.errors import ConfigError
from ppn_bayes.export.plan import LayerLayout
from ppn_bayes.hub.safetensors_files import LazyCheckpoint


def _lora_delta(entry: dict, target_shape: torch.Size, conv1d: bool) -> torch.Tensor:
    try:
        a, b = entry["A"].float(), entry["B"].float()
    except (KeyError, TypeError, AttributeError):
        raise ConfigError("each LoRA entry must be a dict with tensors 'A' [r, in] and 'B' [out, r] "
                          "(and an optional float 'scale')") from None
    delta = (b @ a) * float(entry.get("scale", 1.0))
    if conv1d:
        delta = delta.T
    if tuple(delta.shape) != tuple(target_shape):
        raise ConfigError(f"LoRA B @ A has shape {tuple(delta.shape)} but the weight is {tuple(target_shape)}; "
                          "pass adapters of the base model the run was trained on")
    return delta


class TensorSource:
    """Where one output tensor's values come from: the file, a trained override, plus LoRA."""

    def __init__(self, ckpt: LazyCheckpoint, weights: dict | None, lora: dict | None, conv1d_of):
        self.ckpt, self.weights, self.lora = ckpt, weights or {}, lora or {}
        self.conv1d_of = conv1d_of
        self.overridden = 0
        self.lora_folded = 0

    def _lora_entry(self, name: str) -> dict | None:
        entry = self.lora.get(name)
        if entry is None and name.endswith(".weight"):
            entry = self.lora.get(name[: -len(".weight")])
        return entry

    def get(self, name: str, axis: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or its entries ``index`` along ``axis``), with override and LoRA applied."""
        entry = self._lora_entry(name)
        if name in self.weights or entry is not None:
            full = self.weights[name] if name in self.weights else self.ckpt.read(name)
            self.overridden += name in self.weights
            dtype = full.dtype
            if entry is not None:
                full = (full.float() + _lora_delta(entry, full.shape, self.conv1d_of(name))).to(dtype)
                self.lora_folded += 1
            return full if axis is None else full.index_select(axis, index)
        if axis is None:
            return self.ckpt.read(name)
        return self.ckpt.read_index(name, axis, index)


def _scale_branch(tensors: dict[str, torch.Tensor], prefix: str, kind: str, scale: torch.Tensor) -> int:
    """Multiply a branch's output by ``scale`` [hidden] inside its weights; returns tensors changed."""
    changed = 0
    for leaf in ("weight", "bias"):
        name = f"{prefix}.{leaf}"
        if name not in tensors:
            continue
        t = tensors[name]
        s = scale.float()
        if leaf == "weight" and kind == "linear":
            s = s[:, None]  # [out, in]: scale rows
        elif leaf == "weight" and kind == "conv1d":
            s = s[None, :]  # [in, out]: scale columns
        tensors[name] = (t.float() * s).to(t.dtype)
        changed += 1
    return changed


AMPLITUDE_KEYS = ("heads", "groups", "attn_scale", "mlp_scale")


def check_amplitudes(amplitudes: dict | None, inventory: UnitInventory) -> dict[str, torch.Tensor]:
    amplitudes = {k: v.detach() for k, v in (amplitudes or {}).items() if v is not None}
    L = inventory.num_layers
    shapes = {"heads": ((L, inventory.num_heads), "per layer, per query head"),
              "groups": ((L, inventory.num_groups), "per layer, per channel group"),
              "attn_scale": ((L, inventory.dims.hidden), "per layer, per hidden dimension"),
              "mlp_scale": ((L, inventory.dims.hidden), "per layer, per hidden dimension")}
    for key, value in amplitudes.items():
        if key not in shapes:
            raise ConfigError(f"unknown amplitude {key!r}; expected some of {', '.join(AMPLITUDE_KEYS)}")
        shape, what = shapes[key]
        if tuple(value.shape) != shape:
            raise ConfigError(f"amplitude {key!r} has shape {tuple(value.shape)}, expected {shape} ({what})")
    return amplitudes


def layer_tensors(src: TensorSource, names: list[str], rules: dict[str, SliceRule], cut: LayerCut,
                   inventory: UnitInventory, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """The kept part of one layer's tensors, keyed by name relative to the layer prefix.

    ``names`` maps relative -> absolute source names. A branch that keeps nothing is written as the
    :class:`~ppn_bayes.backbone.materialize.ZeroBranch` it becomes (its output bias, if any).
    """
    out: dict[str, torch.Tensor] = {}
    no_attn, no_mlp = not cut.q_heads, not cut.channels
    for rel, absname in names.items():
        if no_attn and rel.startswith(layout.attention + "."):
            if rel == f"{layout.heads_input}.bias":
                out[f"{layout.attention}.bias"] = src.get(absname)
            continue
        if no_mlp and rel.startswith(layout.mlp + "."):
            if rel == f"{layout.channels_input}.bias":
                out[f"{layout.mlp}.bias"] = src.get(absname)
            continue
        rule = rules.get(rel)
        if rule is None:
            out[rel] = src.get(absname)
            continue
        axis_len = src.ckpt.shape(absname)[rule.axis] if absname in src.ckpt.where else \
            src.weights[absname].shape[rule.axis]
        idx = rule_indices(rule, cut, inventory.dims, axis_len)
        out[rel] = src.get(absname, rule.axis, idx).contiguous()
    return out


def _fold_unit_amplitudes(tensors: dict[str, torch.Tensor], l: int, cut: LayerCut, layout: LayerLayout,
                          amplitudes: dict[str, torch.Tensor], inventory: UnitInventory) -> int:
    """Fold per-head / per-group multipliers into the input slices of the output / down projection.

    The gated model multiplies the projection's *input* (``W (a * x) + b``), so only the weight's input
    axis is scaled (columns of an ``nn.Linear`` ``[out, in]``, rows of a ``Conv1D`` ``[in, out]``), never
    the bias. The cut weight holds the kept units in cut order (``cut.q_heads`` / ``cut.channels``).
    """
    changed = 0
    hd, gs = inventory.dims.head_dim, inventory.group_size
    for key, module, kept in (("heads", layout.heads_input, cut.q_heads),
                              ("groups", layout.channels_input, cut.channels)):
        name = f"{module}.weight"
        if key not in amplitudes or not kept or name not in tensors:
            continue
        per_unit = amplitudes[key][l].float()
        idx = torch.tensor(kept, dtype=torch.long)
        s = per_unit[idx].repeat_interleave(hd) if key == "heads" else per_unit[idx // gs]
        w = tensors[name]
        s = s[:, None] if module in layout.conv1d else s[None, :]
        tensors[name] = (w.float() * s).to(w.dtype)
        changed += 1
    return changed


def fold_amplitudes(tensors: dict[str, torch.Tensor], l: int, cut: LayerCut, layout: LayerLayout,
                     amplitudes: dict[str, torch.Tensor], inventory: UnitInventory) -> int:
    changed = _fold_unit_amplitudes(tensors, l, cut, layout, amplitudes, inventory)
    for key, branch in (("attn_scale", layout.attn_branch), ("mlp_scale", layout.mlp_branch)):
        if key not in amplitudes:
            continue
        kind = layout.branch_kind[branch]
        prefix = branch
        empty = not cut.q_heads if key == "attn_scale" else not cut.channels
        if empty and kind != "norm":  # the zero branch keeps only the projection's bias
            prefix = layout.attention if key == "attn_scale" else layout.mlp
        changed += _scale_branch(tensors, prefix, kind, amplitudes[key][l])
    return changed
