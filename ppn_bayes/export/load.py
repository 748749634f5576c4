"""Loading a resized checkpoint of either output form (:mod:`ppn_bayes.export.plan`).

The standard form is an ordinary checkpoint (``AutoModelForCausalLM.from_pretrained``). The
``ppn_layer_shapes`` form is built on the meta device, every layer cut to its saved shape with
:func:`ppn_bayes.backbone.materialize.cut_layer`, and then given the saved weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.materialize import cut_layer
from ppn_bayes.errors import ModelError
from ppn_bayes.export.plan import SHAPES_KEY, meta_model
from ppn_bayes.hub.safetensors_files import check_checkpoint
from ppn_bayes.hub.zoo import check_loading_report
from ppn_bayes.schema import Int, List, Map, Obj, load_json, load_tensors, tensor_mismatch, validate


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
    fix = "re-export it with ppn resize"
    raw = load_json(path / "config.json", Map(), fix, ModelError)
    if SHAPES_KEY not in raw:
        check_checkpoint(path)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
        check_loading_report(path, model, info)
        return model.to(device).eval()
    return _load_shaped(path, raw, dtype, torch.device(device))


def _load_shaped(path: Path, raw: dict, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    from transformers import AutoConfig

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
