"""Lazy export of a keep-set to a smaller checkpoint, reading only the kept tensors.

:func:`resize` never loads the base model. It opens the base checkpoint's safetensors file(s) with
``safe_open`` and, for every tensor of a *kept* layer, reads only the rows/columns of the kept query
heads, KV heads and MLP channels (``get_slice`` over contiguous runs, so a run of adjacent heads is
one read: :class:`~ppn_bayes.hub.safetensors_files.LazyCheckpoint`). Dropped layers are never touched,
so the peak memory of a resize is proportional to the kept size, not the base size
(``benchmarks/resize_memory.py`` measures it).

A trained run's weights, adapters and amplitudes are folded into the written tensors
(:mod:`ppn_bayes.export.fold`); the output takes one of two forms (:mod:`ppn_bayes.export.plan`), and
:func:`ppn_bayes.export.load.load_resized` loads either. This module checks the inputs, writes the
output directory (complete or absent: built in a temporary sibling and renamed) and owns its files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.errors import ConfigError, ModelError, OutputError, RunError
from ppn_bayes.export.fold import TensorSource, check_amplitudes, fold_amplitudes, layer_tensors
from ppn_bayes.export.plan import (
    SHAPES_KEY,
    decoder_regex,
    layer_cuts,
    layer_layout,
    meta_model,
    output_form,
    standard_config,
    with_layers,
)
from ppn_bayes.files import check_no_overlap, check_owned, check_writable, writer_lock
from ppn_bayes.hub.safetensors_files import LazyCheckpoint, check_checkpoint, save_streaming
from ppn_bayes.hub.zoo import WEIGHTS_FIX, resolve_model
from ppn_bayes.schema import tensor_mismatch

#: Files copied next to the weights when ``tokenizer=True`` (whatever of them the base has).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
MANIFEST = "ppn-resize.json"
#: Everything an export directory holds: what ``--force`` may replace (a directory with anything else
#: in it, or without ``ppn-resize.json``, is not an export and is never replaced).
EXPORT_FILES = ("model.safetensors", "config.json", MANIFEST, *TOKENIZER_FILES)


def check_weights_match(base: Path, config, ckpt: LazyCheckpoint) -> None:
    """The lazy reader's twin of :func:`ppn_bayes.hub.zoo.check_loading_report`: the checkpoint's tensor
    names and shapes (headers only) against the model ``config`` describes (built on the meta device,
    no memory). Every parameter must be in the file with its shape (tied ones once), and the file may
    hold nothing the model does not know (bare-model names such as GPT-2's ``h.0...`` map to the
    CausalLM's ``transformer.h.0...``, as ``from_pretrained`` maps them)."""
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


# ------------------------------------------------------------------------------------ resize


def _check_inventory(inventory: UnitInventory, family: Family, config) -> None:
    dims = family.dims(config)
    if dims != inventory.dims:
        raise RunError(f"the keep-set's inventory describes a different model ({inventory.dims}) than the base "
                       f"checkpoint ({dims}); resize with the base model the run was trained on")


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
            came from (:func:`~ppn_bayes.export.from_run.resize_run` records the run, size, lambda and
            quantile).
        inputs: further ``(what, path)`` inputs ``out`` must not overlap (the base always counts), e.g.
            the run directory; see :func:`check_output`.

    The export is written under ``out``'s writer lock (:func:`ppn_bayes.files.writer_lock`).
    """
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

    check_checkpoint(base)  # a missing or truncated weights file fails here, in one line, before any read
    config = AutoConfig.from_pretrained(base)
    family = family_for(config)
    ckpt = LazyCheckpoint(base)
    check_weights_match(base, config, ckpt)  # headers against the config, before any tensor is read
    _check_inventory(inventory, family, config)
    keep = inventory.complete(keep)
    if not keep.layers:
        raise ConfigError("the keep-set keeps no layer; a resized model needs at least one")
    amps = check_amplitudes(amplitudes, inventory)
    layout = layer_layout(family, config)
    cuts = layer_cuts(keep, inventory)
    form = output_form(cuts, inventory, family)
    rules = {r.name: r for r in family.slice_rules(config)}
    cfg_dict = json.loads((base / "config.json").read_text())

    tensors: dict[str, torch.Tensor] = {}
    amp_changed = 0
    pattern, dec = decoder_regex(family, ckpt.names())
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
        layer = layer_tensors(src, per_layer.get(l, {}), rules, cut, inventory, layout)
        amp_changed += fold_amplitudes(layer, l, cut, layout, amps, inventory)
        for rel, t in layer.items():
            tensors[f"{dec}.{new_idx}.{rel}"] = t
    bytes_read = ckpt.bytes_read
    overridden, lora_folded = src.overridden, src.lora_folded

    if form == "standard":
        cfg_out = standard_config(cfg_dict, cuts, inventory, family)
    else:
        cfg_out = with_layers(cfg_dict, keep.layers)
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
        else "ppn_bayes.export.load.load_resized",
        **(extra or {}),
    }
    _write_dir(out, base, tensors, cfg_out, {"keepset": keep.to_dict(), "inventory": inventory.to_dict(),
                                             "report": report}, tokenizer, overwrite)
    return report


def check_output(out: Path, overwrite: bool, inputs: list[tuple[str, Any]] = ()) -> None:
    """Before any work: the output can be written, is none of the ``(what, path)`` inputs (nor holds
    or lies in one), and exists only if ``overwrite`` and it is an earlier export (see
    :mod:`ppn_bayes.files`). ``--force`` replaces an export, never an input or someone's directory."""
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
