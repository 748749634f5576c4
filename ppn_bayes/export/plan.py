"""The plan of an export: a layer's module layout, each kept layer's cut, and the output form.

:func:`layer_layout` reads the names of the modules a resize needs off a model built on the meta
device (:func:`meta_model`: no memory, no init); :func:`layer_cuts` turns a keep-set into one
:class:`~ppn_bayes.backbone.slicing.LayerCut` per kept layer. Two output forms (see ``docs/resize.md``
for which engines serve which), chosen by :func:`output_form`:

* **standard**: every kept layer has the same head/KV-head/channel counts (always true for layer-only
  keep-sets). ``config.json`` is an ordinary config with the new counts (:func:`standard_config`);
  plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
* **ppn_layer_shapes**: per-layer counts differ. ``config.json`` keeps the base's per-layer sizes and
  adds ``ppn_layer_shapes`` (for each new layer: the base query heads kept, the channel count);
  :func:`ppn_bayes.export.load.load_resized` builds the model on the meta device, cuts every layer to
  shape with :func:`ppn_bayes.backbone.materialize.cut_layer`, and loads the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone.projections import is_conv1d
from ppn_bayes.backbone.slicing import LayerCut, layer_cut
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.errors import ModelError

SHAPES_KEY = "ppn_layer_shapes"


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


def layer_cuts(keep: KeepSet, inventory: UnitInventory) -> list[tuple[int, LayerCut]]:
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
    cfg = with_layers(cfg, [l for l, _ in cuts])
    if not cuts:
        return cfg
    cut = cuts[0][1]
    return family.uniform_config(cfg, len(cut.q_heads), len(cut.kv_heads), inventory.dims.head_dim, len(cut.channels))


def with_layers(cfg: dict, kept: list[int]) -> dict:
    cfg = dict(cfg)
    for key in ("num_hidden_layers", "n_layer"):
        if key in cfg:
            cfg[key] = len(kept)
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][l] for l in kept]
    return cfg


def decoder_regex(family: Family, names: list[str]) -> tuple[re.Pattern, str]:
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
