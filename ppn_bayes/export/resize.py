"""Lazy export of a keep-set to a smaller checkpoint, reading only the kept tensors.

:func:`resize` never loads the base model. It opens the base checkpoint's safetensors file(s) with
``safe_open`` and, for every tensor of a *kept* layer, reads only the rows/columns of the kept query
heads, KV heads and MLP channels (``get_slice`` over contiguous runs, so a run of adjacent heads is
one read). Dropped layers are never touched, so the peak memory of a resize is proportional to the
kept size, not the base size (``benchmarks/resize_memory.py`` measures it).

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

:func:`resize_run` does all of this for a run directory: it solves the keep-set at a size, takes
the push's amplitudes at that keep-set's ``lambda*`` and the run's trained weights or adapters.

Two output forms (see ``docs/resize.md`` for which engines serve which):

* **standard**: every kept layer has the same head/KV-head/channel counts (always true for layer-only
  keep-sets). ``config.json`` is an ordinary config with the new counts; plain
  ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
* **ppn_layer_shapes**: per-layer counts differ. ``config.json`` keeps the base's per-layer sizes and
  adds ``ppn_layer_shapes`` (for each new layer: the base query heads kept, the channel count);
  :func:`load_resized` builds the model on the meta device, cuts every layer to shape with
  :func:`ppn_bayes.backbone.materialize.cut_layer`, and loads the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.family import Family, SliceRule
from ppn_bayes.backbone.projections import is_conv1d
from ppn_bayes.backbone.slicing import LayerCut, layer_cut, rule_indices
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.errors import ConfigError, ModelError, RunError

#: Files copied next to the weights when ``tokenizer=True`` (whatever of them the base has).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
SHAPES_KEY = "ppn_layer_shapes"
MANIFEST = "ppn-resize.json"
#: Everything an export directory holds: what ``--force`` may replace (a directory with anything else
#: in it, or without ``ppn-resize.json``, is not an export and is never replaced).
EXPORT_FILES = ("model.safetensors", "config.json", MANIFEST, *TOKENIZER_FILES)


# ------------------------------------------------------------------------------------ checkpoint IO


def weight_map(base: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file: the files :func:`ppn_bayes.hub.zoo.check_checkpoint` accepts (the
    index's shards, else ``model.safetensors``), read by header."""
    from safetensors import safe_open

    from ppn_bayes.hub.zoo import check_checkpoint

    out: dict[str, Path] = {}
    for f in check_checkpoint(base):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                out[name] = f
    return out


def check_weights_match(base: Path, config, ckpt: LazyCheckpoint) -> None:
    """The lazy reader's twin of :func:`ppn_bayes.hub.zoo.check_loading_report`: the checkpoint's tensor
    names and shapes (headers only) against the model ``config`` describes (built on the meta device,
    no memory). Every parameter must be in the file with its shape (tied ones once), and the file may
    hold nothing the model does not know (bare-model names such as GPT-2's ``h.0...`` map to the
    CausalLM's ``transformer.h.0...``, as ``from_pretrained`` maps them)."""
    from ppn_bayes.hub.zoo import WEIGHTS_FIX
    from ppn_bayes.schema import tensor_mismatch

    model = meta_model(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    have = {}
    for name in ckpt.names():
        key = f"{prefix}.{name}" if prefix and name not in state and f"{prefix}.{name}" in state else name
        have[key] = (name, tuple(ckpt.shape(name)))
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    missing = [k for k, _ in model.named_parameters() if k not in have]  # shared (tied) parameters: once
    unexpected = [name for k, (name, _) in have.items() if k not in state and not any(p.search(k) for p in ignore)]
    shaped = [(name, shape, state[k]) for k, (name, shape) in have.items() if k in state and shape != state[k]]
    tensor_mismatch(f"the weights in {base} and its config.json", WEIGHTS_FIX, missing, unexpected, shaped,
                    ModelError)


def runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as ``[start, stop)`` pairs, in order (repeats start a new run).

    Reading a run is one contiguous ``get_slice`` read; heads are ``head_dim`` wide and kept heads are
    often adjacent, so a cut is a handful of reads rather than one per row.
    """
    out: list[tuple[int, int]] = []
    for i in indices.tolist():
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyCheckpoint:
    """Read whole tensors, or index sets along one axis, from safetensors file(s), counting bytes.

    Each read opens its file, reads, and closes it again: ``safe_open`` memory-maps the file, and the
    pages a read touches stay resident (and count in RSS) while the map is open. Reopening costs
    one header parse per tensor (microseconds) and keeps the peak memory of a resize at the kept
    tensors themselves.
    """

    def __init__(self, base: Path):
        self.where = weight_map(base)
        self.bytes_read = 0

    def names(self) -> list[str]:
        return list(self.where)

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[Any]:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as fh:
            yield fh

    def shape(self, name: str) -> list[int]:
        with self._open(name) as fh:
            return list(fh.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        with self._open(name) as fh:
            t = fh.get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_index(self, name: str, axis: int, indices: torch.Tensor) -> torch.Tensor:
        """Only the entries ``indices`` along ``axis`` (contiguous runs read with ``get_slice``)."""
        with self._open(name) as fh:
            sl = fh.get_slice(name)
            shape = list(sl.get_shape())
            parts = []
            for a, b in runs(indices):
                key = tuple(slice(a, b) if d == axis else slice(None) for d in range(len(shape)))
                parts.append(sl[key])
            if not parts:  # nothing kept along this axis (callers skip such tensors; be total anyway)
                shape[axis] = 0
                parts.append(torch.empty(shape, dtype=_DTYPES.get(sl.get_dtype(), torch.float32)))
        self.bytes_read += sum(p.numel() * p.element_size() for p in parts)
        return torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------ module layout


@dataclass
class LayerLayout:
    """Names (relative to a layer prefix) of the modules a resize needs, read off a meta-device model."""

    attention: str
    mlp: str
    heads_input: str
    channels_input: str
    attn_branch: str
    mlp_branch: str
    branch_kind: dict[str, str]  # branch name -> "linear" | "conv1d" | "norm"
    conv1d: set[str]  # module names whose weight is stored [in, out]


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    return "norm"


def meta_model(config) -> nn.Module:
    """The architecture of ``config`` on the meta device: module names and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_layout(family: Family, config) -> LayerLayout:
    model = meta_model(config)
    layer = family.layers(model)[0]
    names = {id(m): n for n, m in layer.named_modules()}
    branches = {"attn": family.attn_branch(layer), "mlp": family.mlp_branch(layer)}
    return LayerLayout(
        attention=names[id(family.attention(layer))],
        mlp=names[id(family.channels_input(layer))].rsplit(".", 1)[0],
        heads_input=names[id(family.heads_input(layer))],
        channels_input=names[id(family.channels_input(layer))],
        attn_branch=names[id(branches["attn"])],
        mlp_branch=names[id(branches["mlp"])],
        branch_kind={names[id(m)]: _kind(m) for m in branches.values()},
        conv1d={n for n, m in layer.named_modules() if _kind(m) == "conv1d"}
        | {n for n, m in model.named_modules() if _kind(m) == "conv1d"},
    )


# ------------------------------------------------------------------------------------ the plan


def _cuts(keep: KeepSet, inventory: UnitInventory) -> list[tuple[int, LayerCut]]:
    dims = inventory.dims
    out = []
    for l in keep.layers:
        channels = [c for g in keep.groups_of(l) for c in inventory.group_channels(g)]
        out.append((l, layer_cut(keep.heads_of(l), channels, dims)))
    return out


def output_form(cuts: list[tuple[int, LayerCut]], inventory: UnitInventory, family: Family) -> str:
    """``"standard"`` when one config can describe every kept layer, else ``"ppn_layer_shapes"``."""
    dims = inventory.dims
    shapes = {(len(c.q_heads), len(c.kv_heads), len(c.channels)) for _, c in cuts}
    if len(shapes) > 1:
        return SHAPES_KEY
    if not shapes:
        return "standard"
    q, _, ch = shapes.pop()
    if q == 0 or ch == 0:
        return SHAPES_KEY  # no config can say "this layer has no attention / no MLP"
    return "standard" if family.config_describes_heads(q, dims) else SHAPES_KEY


def standard_config(cfg: dict, cuts: list[tuple[int, LayerCut]], inventory: UnitInventory,
                    family: Family) -> dict:
    """Edit a base ``config.json`` dict to the kept layer count and (uniform) per-layer sizes."""
    cfg = _with_layers(cfg, [l for l, _ in cuts])
    if not cuts:
        return cfg
    cut = cuts[0][1]
    return family.uniform_config(cfg, len(cut.q_heads), len(cut.kv_heads), inventory.dims.head_dim, len(cut.channels))


def _with_layers(cfg: dict, kept: list[int]) -> dict:
    cfg = dict(cfg)
    for key in ("num_hidden_layers", "n_layer"):
        if key in cfg:
            cfg[key] = len(kept)
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][l] for l in kept]
    return cfg


def _decoder_regex(family: Family, names: list[str]) -> tuple[re.Pattern, str]:
    """Regex matching layer tensors ``<base>.<i>.<rest>`` and the prefix used by this checkpoint.

    Checkpoints of a bare base model (GPT-2's hub files: ``h.0.attn...``) omit the CausalLM prefix
    (``transformer.``); both layouts are accepted and the output keeps the source's naming.
    """
    p0 = family.layer_prefix(0)
    if not p0.endswith("0."):  # pragma: no cover - every family numbers layers last
        raise ModelError(f"cannot parse layer prefix {p0!r} of family {family.name}")
    base = p0[: -len("0.")].rstrip(".")
    candidates = [base]
    while "." in candidates[-1]:
        candidates.append(candidates[-1].split(".", 1)[1])
    for cand in candidates:
        if any(n.startswith(cand + ".") for n in names):
            return re.compile(re.escape(cand) + r"\.(\d+)\.(.+)"), cand
    return re.compile(re.escape(base) + r"\.(\d+)\.(.+)"), base


# ------------------------------------------------------------------------------------ folding


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


# ------------------------------------------------------------------------------------ resize


def _check_inventory(inventory: UnitInventory, family: Family, config) -> None:
    dims = family.dims(config)
    if dims != inventory.dims:
        raise RunError(f"the keep-set's inventory describes a different model ({inventory.dims}) than the base "
                       f"checkpoint ({dims}); resize with the base model the run was trained on")


AMPLITUDE_KEYS = ("heads", "groups", "attn_scale", "mlp_scale")


def _check_amplitudes(amplitudes: dict | None, inventory: UnitInventory) -> dict[str, torch.Tensor]:
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


def _layer_tensors(src: TensorSource, names: list[str], rules: dict[str, SliceRule], cut: LayerCut,
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


def _fold_amplitudes(tensors: dict[str, torch.Tensor], l: int, cut: LayerCut, layout: LayerLayout,
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


def resize(
    base: str | os.PathLike,
    keep: KeepSet,
    inventory: UnitInventory,
    out: str | os.PathLike,
    *,
    amplitudes: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    lora: dict | None = None,
    tokenizer: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    inputs: list[tuple[str, Any]] = (),
) -> dict[str, Any]:
    """Write the keep-set's smaller model to ``out`` reading only kept tensors; returns a report dict.

    Args:
        base: base checkpoint directory (or a ``ppn_bayes.hub.zoo`` alias / Hub id).
        keep: units to keep (completed against ``inventory``: nesting, ungated kinds).
        inventory: the unit inventory the keep-set refers to (group size, gated kinds).
        out: output directory; written into a temporary sibling and renamed, so it is complete or absent.
        amplitudes: optional multipliers to fold in: ``"heads"`` ``[L, H]`` and ``"groups"`` ``[L, G]``
            (unit inputs), ``"attn_scale"``/``"mlp_scale"`` ``[L, hidden]`` (branch outputs).
        weights: optional trained tensors replacing the base's (base parameter names).
        lora: optional ``{name: {"A", "B", "scale"}}`` adapters to fold in (``W + scale * B @ A``).
        tokenizer: copy tokenizer (and generation config) files from the base.
        overwrite: replace an existing ``out``.
        extra: fields merged into the report (and so into ``ppn-resize.json``), e.g. where the keep-set
            came from (:func:`resize_run` records the run, size, lambda and quantile).
        inputs: further ``(what, path)`` inputs ``out`` must not overlap (the base always counts), e.g.
            the run directory; see :func:`check_output`.

    The export is written under ``out``'s writer lock (:func:`ppn_bayes.files.writer_lock`).
    """
    from ppn_bayes.files import writer_lock
    from ppn_bayes.hub.zoo import resolve_model

    base = resolve_model(base)
    out = Path(out)
    inputs = [("base model", base), *inputs]
    check_output(out, overwrite, inputs)
    with writer_lock(out, "ppn resize"):
        check_output(out, overwrite, inputs)  # again, now that no other writer can change it
        return _resize(base, keep, inventory, out, amplitudes=amplitudes, weights=weights, lora=lora,
                       tokenizer=tokenizer, overwrite=overwrite, extra=extra or {})


def _resize(base: Path, keep: KeepSet, inventory: UnitInventory, out: Path, *, amplitudes, weights, lora,
            tokenizer: bool, overwrite: bool, extra: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    from ppn_bayes.hub.zoo import check_checkpoint

    check_checkpoint(base)  # a missing or truncated weights file fails here, in one line, before any read
    config = AutoConfig.from_pretrained(base)
    family = family_for(config)
    ckpt = LazyCheckpoint(base)
    check_weights_match(base, config, ckpt)  # headers against the config, before any tensor is read
    _check_inventory(inventory, family, config)
    keep = inventory.complete(keep)
    if not keep.layers:
        raise ConfigError("the keep-set keeps no layer; a resized model needs at least one")
    amps = _check_amplitudes(amplitudes, inventory)
    layout = layer_layout(family, config)
    cuts = _cuts(keep, inventory)
    form = output_form(cuts, inventory, family)
    rules = {r.name: r for r in family.slice_rules(config)}
    cfg_dict = json.loads((base / "config.json").read_text())

    tensors: dict[str, torch.Tensor] = {}
    amp_changed = 0
    pattern, dec = _decoder_regex(family, ckpt.names())
    weights = _to_checkpoint_names(weights, family, dec)
    lora = _to_checkpoint_names(lora, family, dec)
    names = sorted(set(ckpt.names()) | set(weights or {}))
    per_layer: dict[int, dict[str, str]] = {}
    outside: list[str] = []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = name
        else:
            outside.append(name)

    def conv1d_of(name: str) -> bool:
        m = pattern.fullmatch(name)
        rel = m.group(2) if m else name
        return rel.rsplit(".", 1)[0] in layout.conv1d

    src = TensorSource(ckpt, weights, lora, conv1d_of)
    for name in outside:
        tensors[name] = src.get(name).contiguous()
    for new_idx, (l, cut) in enumerate(cuts):
        layer = _layer_tensors(src, per_layer.get(l, {}), rules, cut, inventory, layout)
        amp_changed += _fold_amplitudes(layer, l, cut, layout, amps, inventory)
        for rel, t in layer.items():
            tensors[f"{dec}.{new_idx}.{rel}"] = t
    bytes_read = ckpt.bytes_read
    overridden, lora_folded = src.overridden, src.lora_folded

    if form == "standard":
        cfg_out = standard_config(cfg_dict, cuts, inventory, family)
    else:
        cfg_out = _with_layers(cfg_dict, keep.layers)
        cfg_out[SHAPES_KEY] = [{"source_layer": l, "heads": list(c.q_heads), "channels": len(c.channels)}
                               for l, c in cuts]
    report = {
        "out": str(out),
        "base": str(base),
        "form": form,
        "source_layers": list(keep.layers),
        "num_layers": len(keep.layers),
        "size_params": inventory.size_of(keep, "params"),
        "size_flops": inventory.size_of(keep, "flops"),
        "decoder_params": inventory.kept_cost(keep, "params"),
        "params_written": int(sum(t.numel() for t in tensors.values())),
        "bytes_read": int(bytes_read),
        "bytes_written": int(sum(t.numel() * t.element_size() for t in tensors.values())),
        "amplitude_tensors_folded": amp_changed,
        "weights_overridden": overridden,
        "lora_folded": lora_folded,
        "loader": "AutoModelForCausalLM.from_pretrained" if form == "standard"
        else "ppn_bayes.export.resize.load_resized",
        **(extra or {}),
    }
    _write_dir(out, base, tensors, cfg_out, {"keepset": keep.to_dict(), "inventory": inventory.to_dict(),
                                             "report": report}, tokenizer, overwrite)
    return report


def check_output(out: Path, overwrite: bool, inputs: list[tuple[str, Any]] = ()) -> None:
    """Before any work: the output can be written, is none of the ``(what, path)`` inputs (nor holds
    or lies in one), and exists only if ``overwrite`` and it is an earlier export (see
    :mod:`ppn_bayes.files`). ``--force`` replaces an export, never an input or someone's directory."""
    from ppn_bayes.errors import OutputError
    from ppn_bayes.files import check_no_overlap, check_owned, check_writable

    check_writable(out)
    check_no_overlap(out, inputs)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"output directory {out} already exists; choose another --out or pass --force")
    check_owned(out, EXPORT_FILES, "ppn resize")
    if not (out / MANIFEST).is_file():
        raise OutputError(f"--out {out} is not an export of ppn resize (no {MANIFEST}); --force only replaces an "
                          "earlier export; choose another --out")


def _to_checkpoint_names(tensors: dict | None, family: Family, dec: str) -> dict | None:
    """Rename keys from the model's parameter names to the checkpoint's, where the two differ.

    Runs store trained tensors and adapters under the *model's* names (``transformer.h.0.attn...``)
    but GPT-2's hub files name the bare base model (``h.0.attn...``); without this the override would
    not match any file tensor and would be written as an extra one.
    """
    model_base = family.layer_prefix(0)[: -len("0.")].rstrip(".")
    if not tensors or model_base == dec or not model_base.endswith(dec):
        return tensors
    strip = model_base[: -len(dec)]
    return {k.removeprefix(strip): v for k, v in tensors.items()}


def _write_dir(out: Path, base: Path, tensors: dict[str, torch.Tensor], cfg: dict, manifest: dict,
               tokenizer: bool, overwrite: bool) -> None:
    """Write everything into a temporary sibling directory, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_streaming(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if tokenizer:
            for fname in TOKENIZER_FILES:
                if (base / fname).is_file():
                    shutil.copy2(base / fname, tmp / fname)
        if out.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)  # the earlier export stays as it was
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_CODES = {v: k for k, v in _DTYPES.items()}


def save_streaming(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor, emptying ``tensors`` as it goes.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, doubling the peak
    memory of an export. The format is simple (8-byte little-endian header length, a JSON header of
    dtype/shape/offsets padded to 8 bytes, then the raw data in header order), so we write the header
    from shapes alone and then each tensor's buffer directly; the result is read back by
    ``safetensors`` itself in every test.
    """
    import struct

    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _CODES:
            raise ModelError(f"cannot write tensor {name} of dtype {t.dtype} to safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors.pop(name).detach().cpu().contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------ from a run / a file


def run_amplitudes(run, lam: float) -> dict[str, torch.Tensor] | None:
    """The push's amplitude multipliers at ``lam``, exactly when the gated network applies them.

    :meth:`ppn_bayes.bayes.push.Push.gates` multiplies them in only for ``lam > 0`` (they are 1 at 0 anyway,
    but a run whose spline is not exactly 0 there would otherwise differ from what it serves).
    """
    push = run.posterior.push
    if float(lam) <= 0:
        return None
    with torch.no_grad():
        amp = push.amplitudes(lam)
    return None if amp is None else {k: v.detach().float().cpu() for k, v in amp.items()}


def run_weights(run) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """``(weights, lora)`` for :func:`resize` from a run: full trained tensors, or its adapters.

    Adapters are stored as ``"<module>.A"`` ``[r, in]`` / ``"<module>.B"`` ``[out, r]``
    (:mod:`ppn_bayes.training.lora`); :func:`resize` takes ``{module: {"A", "B", "scale"}}`` with
    ``scale = alpha / rank`` from the run's recipe, as :meth:`ppn_bayes.run.Run.load_model` merges them.
    """
    from ppn_bayes.training.rundir import ADAPTER, WEIGHTS, check_adapter_header, load_run_tensors

    mode = run.recipe.train.weights
    if mode == "full":
        return load_run_tensors(run.path / WEIGHTS), None
    if mode != "lora":
        return None, None
    check_adapter_header(run.path / ADAPTER, int(run.recipe.train.lora_rank))  # complete A/B pairs of the rank
    tensors = load_run_tensors(run.path / ADAPTER)
    scale = float(run.recipe.train.lora_alpha) / int(run.recipe.train.lora_rank)
    lora: dict[str, dict] = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".")
        lora.setdefault(module, {"scale": scale})[part] = value
    return None, lora


def resize_run(
    run,
    out: str | os.PathLike,
    *,
    size: float | None = None,
    params: float | None = None,
    layers: int | None = None,
    flops: float | None = None,
    quantile: float = 0.5,
    num_draws: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    tokenizer: bool = True,
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Export a run's network at one size: the keep-set, lambda*'s amplitudes and the trained weights.

    This writes what :func:`ppn_bayes.evaluation.targets.load_run_target` serves in memory (the keep-set's
    masks times the push's amplitudes at ``lambda*``, on the run's trained weights), as a smaller
    checkpoint. The cheap checks come first (output directory, base model hashes, the size), so a
    wrong call fails in one line with nothing written.

    Args:
        run: a run directory or :class:`~ppn_bayes.run.Run`.
        out: output directory (complete or absent, as for :func:`resize`).
        size, params, layers, flops: exactly one target, as for :meth:`~ppn_bayes.run.Run.keepset`.
        quantile, num_draws, seed: how the keep-set is solved from the posterior.
        base: the base checkpoint, when it is no longer where the run recorded it (checked against
            the run's manifest hashes all the same).

    Returns :func:`resize`'s report plus the keep-set facts (``run``, ``requested``,
    ``requested_size``, ``achieved_size``, ``lambda``, ``quantile``, ...); they are also in
    ``ppn-resize.json``.
    """
    from ppn_bayes.hub.zoo import resolve_model
    from ppn_bayes.run import load_run

    run = load_run(run)
    out = Path(out)
    base_path = run.base_path() if base is None else resolve_model(base)
    inputs = [("run directory", run.path), ("base model", base_path)]
    check_output(out, overwrite, inputs)
    run.check_base(base_path)
    result = run.keepset(size=size, params=params, layers=layers, flops=flops, quantile=quantile,
                         num_draws=num_draws, seed=seed)
    amplitudes = run_amplitudes(run, result.lam)
    weights, lora = run_weights(run)
    t = result.target
    extra = {
        "run": str(run.path),
        "requested": {"kind": t.kind, "value": t.value, "currency": t.currency},
        "requested_size": float(result.requested_size),
        "achieved_size": float(result.achieved_size),
        "lambda": float(result.lam),
        "quantile": float(result.quantile),
        "draws": int(result.num_draws),
        "seed": int(result.seed),
        "trained_weights": run.recipe.train.weights,
        "amplitudes": sorted(amplitudes) if amplitudes else [],
    }
    return resize(base_path, result.keep, run.inventory, out, amplitudes=amplitudes, weights=weights,
                  lora=lora, tokenizer=tokenizer, overwrite=overwrite, extra=extra, inputs=inputs)


def read_keepset_file(path: str | os.PathLike) -> KeepSet:
    """A keep-set from JSON: ``KeepSet.to_dict()``, ``ppn keepset --json`` output or a ``ppn-resize.json``
    (UTF-8, valid JSON, integer indices: :meth:`KeepSet.from_dict`; one-line ConfigErrors)."""
    from ppn_bayes.schema import parse_json, read_text

    path = Path(path)
    fix = "write one with `ppn keepset RUN --json`"
    if not path.exists():
        raise ConfigError(f"keep-set file {path} does not exist; {fix}")
    data = parse_json(read_text(path, fix, ConfigError), f"keep-set file {path}", fix, ConfigError)
    if isinstance(data, dict) and "layers" not in data:
        data = data.get("keep", data.get("keepset", data))
    return KeepSet.from_dict(data, f"keep-set file {path}")


def inventory_for(base: str | os.PathLike, group_size: int, kinds: tuple[str, ...]) -> UnitInventory:
    """The unit inventory of a checkpoint, read off a meta-device model (no weights loaded)."""
    from transformers import AutoConfig

    from ppn_bayes.backbone.gated import gate
    from ppn_bayes.hub.zoo import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(base))
    return gate(meta_model(config), group_size=int(group_size), kinds=tuple(kinds)).inventory


def _check_keep_indices(keep: KeepSet, inventory: UnitInventory) -> None:
    L, H, G = inventory.num_layers, inventory.num_heads, inventory.num_groups
    bad = ([f"layer {l}" for l in keep.layers if not 0 <= l < L]
           + [f"head {tuple(u)}" for u in keep.heads if not (0 <= u[0] < L and 0 <= u[1] < H)]
           + [f"group {tuple(u)}" for u in keep.groups if not (0 <= u[0] < L and 0 <= u[1] < G)])
    if bad:
        raise ConfigError(f"the keep-set names {bad[0]}, outside the model ({L} layers, {H} heads, {G} groups "
                          "of this --group-size); pass a keep-set of this model and group size")


def resize_keepset_file(base: str | os.PathLike, keepset_file: str | os.PathLike, out: str | os.PathLike, *,
                        group_size: int, kinds: tuple[str, ...] = ("layers", "heads", "groups"),
                        overwrite: bool = False, tokenizer: bool = True) -> dict[str, Any]:
    """:func:`resize` for a keep-set saved as JSON, without a run (no trained weights, no amplitudes)."""
    from ppn_bayes.hub.zoo import check_checkpoint, resolve_model

    out = Path(out)
    base_path = resolve_model(base)
    inputs = [("keep-set file", keepset_file), ("base model", base_path)]
    check_output(out, overwrite, inputs)
    keep = read_keepset_file(keepset_file)
    check_checkpoint(base_path)
    inventory = inventory_for(base_path, group_size, kinds)
    _check_keep_indices(keep, inventory)
    return resize(base_path, keep, inventory, out, tokenizer=tokenizer, overwrite=overwrite,
                  extra={"keepset_file": str(keepset_file)}, inputs=inputs)


# ------------------------------------------------------------------------------------ loading


def load_resized(path: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """Load a resized checkpoint of either form as a ``transformers`` causal LM in eval mode.

    Standard form: ``AutoModelForCausalLM.from_pretrained``. ``ppn_layer_shapes`` form: the model is
    built on the meta device (no memory, no random init), each layer is cut to its saved shape with
    :func:`~ppn_bayes.backbone.materialize.cut_layer` (so the module bookkeeping, such as head counts
    and zero branches, matches the in-memory :func:`~ppn_bayes.backbone.materialize.materialize`), then
    the saved tensors are assigned and non-persistent buffers (rotary frequencies) are recomputed.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; pass a directory written by ppn resize")
    from ppn_bayes.schema import Map, load_json

    fix = "re-export it with ppn resize"
    raw = load_json(path / "config.json", Map(), fix, ModelError)
    if SHAPES_KEY not in raw:
        from ppn_bayes.hub.zoo import check_checkpoint, check_loading_report

        check_checkpoint(path)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
        check_loading_report(path, model, info)
        return model.to(device).eval()
    return _load_shaped(path, raw, dtype, torch.device(device))


def _load_shaped(path: Path, raw: dict, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    from transformers import AutoConfig

    from ppn_bayes.backbone.materialize import cut_layer
    from ppn_bayes.schema import Int, List, Obj, load_tensors, tensor_mismatch, validate

    config = AutoConfig.from_pretrained(path)
    layer = Obj(required={"heads": List(Int(0)), "channels": Int(0)})
    shapes = validate(raw[SHAPES_KEY], List(layer, length=getattr(config, "num_hidden_layers", None)),
                      f"{path}/config.json: {SHAPES_KEY}", "re-export it with ppn resize", ModelError)
    family = family_for(config)
    dims = family.dims(config)
    model = meta_model(config)
    for layer, shape in zip(family.layers(model), shapes):
        cut_layer(layer, family, config, dims, [int(h) for h in shape["heads"]],
                  list(range(int(shape["channels"]))))
    fix = "re-export it with ppn resize"
    state = _model_names(model, load_tensors(path / "model.safetensors", fix, error=ModelError, finite=False))
    tied = _tied_names(model)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    tensor_mismatch(f"{path}/model.safetensors and its {SHAPES_KEY}", fix,
                    [k for k in want if k not in have and k not in tied], [k for k in have if k not in want],
                    [(k, have[k], want[k]) for k in have if k in want and have[k] != want[k]], ModelError)
    state = {k: v.to(device) for k, v in state.items()}
    model.to_empty(device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _init_nonpersistent_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _model_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the CausalLM prefix (``transformer.``) to tensors saved under the bare model's names.

    A resize keeps its source's naming, and GPT-2's hub files name the bare model (``h.0.attn...``);
    ``from_pretrained`` maps those itself, ``load_state_dict`` does not.
    """
    prefix = getattr(model, "base_model_prefix", "")
    names = set(model.state_dict())
    if not prefix:
        return state
    return {f"{prefix}.{k}" if k not in names and f"{prefix}.{k}" in names else k: v for k, v in state.items()}


def _tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) | {"lm_head.weight"}


def _init_nonpersistent_buffers(model: nn.Module) -> None:
    """Recompute buffers that are not saved (rotary ``inv_freq``) with the model's own initializer."""
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None) and not list(module.parameters(recurse=False)):
            with torch.no_grad():
                model._init_weights(module)
