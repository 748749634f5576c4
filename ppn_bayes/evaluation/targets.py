"""What ``ppn eval`` evaluates (:class:`EvalTarget`): a dense model, a resized export, or a run's
network at a size. Perplexity on any of them is :func:`ppn_bayes.backbone.perplexity.perplexity`;
zero-shot tasks go through :func:`ppn_bayes.evaluation.lmeval.evaluate_tasks`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.bayes.keepsets import keepset
from ppn_bayes.errors import ConfigError, ModelError
from ppn_bayes.export.load import load_resized
from ppn_bayes.export.plan import SHAPES_KEY
from ppn_bayes.export.resize import MANIFEST
from ppn_bayes.hub.zoo import load_model, resolve_model
from ppn_bayes.schema import AnyValue, List, Num, Obj, Opt, Str, load_json
from ppn_bayes.training.rundir import open_run

# ------------------------------------------------------------------------------------ eval targets
#
# What `ppn eval` (and a notebook) evaluates: a dense model, a resized export, or a run's network at
# a size. Each loader returns an EvalTarget whose ``model`` is a plain ``transformers`` causal LM with
# any gates already in effect, so perplexity and the lm-eval bridge treat all three alike.


@dataclass
class EvalTarget:
    """A model ready to evaluate, its tokenizer, and what it is (``info``: printed with the scores).

    ``gated`` is the :class:`~ppn_bayes.backbone.gated.GatedLM` of a run target: its hooks on
    ``model`` apply the keep-set's masks and amplitudes, and it is kept here so they stay alive.
    """

    model: Any
    tokenizer: Any
    info: dict[str, Any]
    gated: Any = None

    @property
    def max_context(self) -> int | None:
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None


def keep_summary(inventory: Any, keep: Any) -> dict[str, Any]:
    """Counts of kept units next to the totals, and the kept layer indices: a keep-set at a glance."""
    full = inventory.complete(keep)
    L, H, G = inventory.num_layers, inventory.num_heads, inventory.num_groups
    return {"layers": len(full.layers), "of_layers": L, "heads": len(full.heads), "of_heads": L * H,
            "groups": len(full.groups), "of_groups": L * G, "layer_ids": sorted(int(x) for x in full.layers)}


#: What :func:`_resize_facts` reads of a ``ppn-resize.json`` (checked: it is printed with the scores).
RESIZE_FACTS = Obj(optional={
    "report": Obj(optional={"form": Str(), "size_params": Opt(Num(0, 1))}),
    "keepset": Opt(Obj(optional={k: List(AnyValue()) for k in ("layers", "heads", "groups")}))})


def _resize_facts(path: Path) -> dict[str, Any]:
    """What a ``ppn resize`` export says about itself (``ppn-resize.json``), or ``{}`` for other dirs."""

    manifest = path / MANIFEST
    if not manifest.is_file():
        return {}
    data = load_json(manifest, RESIZE_FACTS, "re-export the model with ppn resize (or delete that file)", ModelError)
    report = data.get("report", {})
    keep = data.get("keepset") or {}
    facts: dict[str, Any] = {"form": report.get("form")}
    if report.get("size_params") is not None:
        facts["size"] = facts["achieved_size"] = float(report["size_params"])
    if keep:
        facts["keep"] = {"layers": len(keep.get("layers", [])), "heads": len(keep.get("heads", [])),
                         "groups": len(keep.get("groups", [])), "layer_ids": keep.get("layers", [])}
    return facts


def load_model_target(name: str, device: str | torch.device = "cpu", trust_remote_code: bool = False
                      ) -> EvalTarget:
    """A dense model (alias, directory or Hub id) or a resized export directory.

    An export whose per-layer head/channel counts differ (``ppn_layer_shapes`` in its config) cannot
    be built by ``AutoModelForCausalLM`` and goes through :func:`ppn_bayes.export.load.load_resized`;
    every other directory, exports of the standard form included, loads as an ordinary checkpoint.
    """

    path = resolve_model(name, trust_remote_code=trust_remote_code)
    facts = _resize_facts(path)
    if _has_layer_shapes(path):
        model, tokenizer = _load_shaped_export(path, device)
    else:
        model, tokenizer = load_model(path, device=device, trust_remote_code=trust_remote_code)
    kind = "resized" if facts or _has_layer_shapes(path) else "model"
    return EvalTarget(model, tokenizer, {"target": kind, "model": str(name), **facts})


def _has_layer_shapes(path: Path) -> bool:

    config = path / "config.json"
    try:
        return config.is_file() and SHAPES_KEY in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False  # the ordinary loader reports a broken config in one line


def _load_shaped_export(path: Path, device: str | torch.device) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    model = load_resized(path, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path} has no usable tokenizer ({str(err).splitlines()[0][:120]}); "
                         "re-export it with ppn resize (it copies the base tokenizer)") from None
    return model, tokenizer


def load_run_target(run: Any, size: float | None = None, quantile: float = 0.5, dense: bool = False,
                    device: str | torch.device = "cpu", num_draws: int = 256, seed: int = 0) -> EvalTarget:
    """A run's trained network at ``size`` (the hard keep-set), or whole at lambda = 0 (``dense``).

    The sub-network is the one PPN serves and :func:`ppn_bayes.export.resize.resize` exports: the keep-set's
    0/1 masks times the push's amplitude corrections at the keep-set's ``lambda*``. The keep-set is
    solved from the posterior *before* the model is loaded, so an impossible size fails in a second.
    """

    if dense == (size is not None):
        raise ConfigError("give a run either a size (--size S, a fraction in (0, 1]) or --dense, not "
                          f"{'both' if dense else 'neither'}")
    run = open_run(run)
    info: dict[str, Any] = {"target": "run", "run": str(run.path), "base": run.manifest.get("base", {}).get("name")}
    result = None
    if not dense:
        result = keepset(run.posterior, size=size, quantile=quantile, num_draws=num_draws, seed=seed)
        info.update(size=float(size), achieved_size=float(result.achieved_size), quantile=float(quantile),
                    keep=keep_summary(run.inventory, result.keep), **{"lambda": float(result.lam)})
    else:
        info.update(size=1.0, achieved_size=1.0, dense=True, **{"lambda": 0.0})
    gated = run.load_model(str(device))
    lam = 0.0 if result is None else result.lam
    masks = None if result is None else run.inventory.masks(result.keep)
    with torch.no_grad():
        gated.set_gates(**run.posterior.push.gates(masks, lam))
    return EvalTarget(gated.model, run.load_tokenizer(), info, gated=gated)
