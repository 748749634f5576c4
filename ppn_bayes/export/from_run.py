"""Where an export's keep-set and trained tensors come from: a run directory, or a keep-set file.

:func:`resize_run` does all of :func:`~ppn_bayes.export.resize.resize` for a run directory: it solves
the keep-set at a size, takes the push's amplitudes at that keep-set's ``lambda*``
(:func:`run_amplitudes`) and the run's trained weights or adapters (:func:`run_weights`).
:func:`resize_keepset_file` exports a keep-set saved as JSON, without a run (no trained weights, no
amplitudes), against the unit inventory of the base checkpoint (:func:`inventory_for`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.backbone.gated import gate
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.bayes.keepsets import keepset
from ppn_bayes.errors import ConfigError
from ppn_bayes.export.plan import meta_model
from ppn_bayes.export.resize import check_output, resize
from ppn_bayes.hub.safetensors_files import check_checkpoint
from ppn_bayes.hub.zoo import resolve_model
from ppn_bayes.schema import parse_json, read_text
from ppn_bayes.training.rundir import ADAPTER, WEIGHTS, check_adapter_header, load_run_tensors, open_run


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
    ``scale = alpha / rank`` from the run's recipe, as :meth:`ppn_bayes.training.rundir.RunDir.load_model` merges them.
    """

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
        run: a run directory or :class:`~ppn_bayes.training.rundir.RunDir` (a :class:`~ppn_bayes.run.Run` is one).
        out: output directory (complete or absent, as for :func:`resize`).
        size, params, layers, flops: exactly one target, as for :func:`~ppn_bayes.bayes.keepsets.keepset`.
        quantile, num_draws, seed: how the keep-set is solved from the posterior.
        base: the base checkpoint, when it is no longer where the run recorded it (checked against
            the run's manifest hashes all the same).

    Returns :func:`resize`'s report plus the keep-set facts (``run``, ``requested``,
    ``requested_size``, ``achieved_size``, ``lambda``, ``quantile``, ...); they are also in
    ``ppn-resize.json``.
    """

    run = open_run(run)
    out = Path(out)
    base_path = run.base_path() if base is None else resolve_model(base)
    inputs = [("run directory", run.path), ("base model", base_path)]
    check_output(out, overwrite, inputs)
    run.check_base(base_path)
    result = keepset(run.posterior, size=size, params=params, layers=layers, flops=flops, quantile=quantile,
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
