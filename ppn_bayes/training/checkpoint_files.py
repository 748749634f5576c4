"""The checkpoint directory of a run: written crash-safe, found, cleaned up, read back.

A checkpoint is a *directory* of files that must agree with each other (``state.safetensors``: guide,
push, prior and trained weights; ``optimizer.pt``; ``rng.safetensors``; ``trainer.json``), so it is
written whole into ``checkpoint.tmp-<pid>/`` (each file fsynced), then ``checkpoint/`` is renamed to
``checkpoint.old/``, the new one renamed to ``checkpoint/``, and only then is the old one deleted. At every
instant one complete checkpoint exists (``checkpoint/``, or between the two renames
``checkpoint.old/``); :func:`find_checkpoint` knows both. :mod:`ppn_bayes.training.checkpoint` maps a
training session onto these files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ppn_bayes.errors import RunError
from ppn_bayes.schema import (
    AnyValue,
    Int,
    List,
    Map,
    Num,
    Obj,
    check_path,
    load_json,
    load_tensors,
    tensor_header,
    validate,
)
from ppn_bayes.training.rundir import CHECKPOINT, CHECKPOINT_OLD, CKPT_FILES, RUN_FILES, TRAINER_SCHEMA


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], rng: dict[str, torch.Tensor],
                    optimizer_state: dict, trainer: dict) -> None:
    """Write a complete checkpoint next to the current one, then swap it in (see module docstring)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f"{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n", encoding="utf-8")
        for name in CKPT_FILES:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
    except BaseException:  # a full disk: the previous checkpoint stays, the half-written one goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    current, old = run_dir / CHECKPOINT, run_dir / CHECKPOINT_OLD
    if current.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(tmp, current)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run: ``checkpoint/``, else ``checkpoint.old/`` (a swap was cut short)."""
    for name in (CHECKPOINT, CHECKPOINT_OLD):
        path = Path(run_dir) / name
        if path.is_dir() and all((path / f).is_file() for f in CKPT_FILES):
            return path
    return None


def clean_stale(run_dir: Path) -> None:
    """Remove half-written checkpoint directories and temporary files left by a killed run."""
    run_dir = Path(run_dir)
    for path in run_dir.glob(f"{CHECKPOINT}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    if (run_dir / CHECKPOINT).is_dir() and find_checkpoint(run_dir) == run_dir / CHECKPOINT:
        shutil.rmtree(run_dir / CHECKPOINT_OLD, ignore_errors=True)
    for path in run_dir.iterdir():  # atomic_write_bytes / atomic_save_tensors temp names: ".<name>.<random>"
        if path.is_file() and any(path.name.startswith(f".{k}.") for k in RUN_FILES):
            path.unlink(missing_ok=True)


RNG_STATES = ("torch_cpu", "model_generator")  # 1-d uint8 random states (torch.get_rng_state's form)


def checkpoint_fix(path: Path) -> str:
    return f"delete {path} to restart the run from scratch, or restore it from a copy"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``{"tensors", "rng", "optimizer", "trainer"}`` of a checkpoint directory, each file validated
    (``trainer.json`` against its schema, the RNG states by name and dtype, every tensor finite, the
    optimizer state read weights-only and shaped like an optimizer state); one-line errors.
    The tensors' names and shapes are checked against the session by :func:`ppn_bayes.training.checkpoint.restore`."""
    path = Path(path)
    fix = checkpoint_fix(path)
    trainer = load_json(path / "trainer.json", TRAINER_SCHEMA, fix)
    rng_file = path / "rng.safetensors"
    header = tensor_header(rng_file, fix)
    for name, (shape, dtype) in header.items():
        if name not in RNG_STATES or dtype != "U8" or len(shape) != 1:
            raise RunError(f"{rng_file}: tensor {name} is not one of the 1-d uint8 random states "
                           f"{', '.join(RNG_STATES)}; {fix}")
    rng = load_tensors(rng_file, fix)
    tensors = load_tensors(path / "state.safetensors", fix)
    optimizer = _load_optimizer(path / "optimizer.pt", fix)
    return {"tensors": tensors, "rng": rng, "optimizer": optimizer, "trainer": trainer}


def _load_optimizer(path: Path, fix: str) -> dict:
    """The optimizer state, unpickled weights-only (tensors, numbers, strings, containers: never code).

    A file that needs anything else was not written by ppn-bayes: it is refused as damaged or untrusted,
    and the message never suggests loading it with fewer restrictions.
    """
    check_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path} is missing; {fix}") from None
    except Exception:  # noqa: BLE001 - refused globals (UnpicklingError), truncation, bad magic: all the same here
        raise RunError(f"{path} is damaged or untrusted (not an optimizer state of plain tensors and numbers, "
                       f"so it is not loaded); {fix}") from None
    return validate(state, OPTIMIZER_SCHEMA, str(path), fix)


OPTIMIZER_SCHEMA = Obj(required={"state": Map(Map(AnyValue())), "param_groups": List(Obj(required={
    "params": List(Int(0)), "lr": Num(0), "weight_decay": Num(0)}))})
