"""A training session's state in and out: the resumable checkpoint and the run's exports.

:func:`save` writes (rank 0, after every rank has helped gather the FSDP shards to rank 0's host
memory, one tensor at a time) the posterior files, the trained weights
(``weights.safetensors`` or ``adapter.safetensors``) and the checkpoint (tensors, RNG states,
optimizer state, trainer counters; written next to the current one and swapped in, see
:func:`ppn_bayes.training.checkpoint_files.save_checkpoint`). :func:`restore` loads a checkpoint back into a session on
every rank. The file formats are :mod:`ppn_bayes.run`'s; this module maps a session onto them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from ppn_bayes.bayes.posterior import save_posterior
from ppn_bayes.config import dump_recipe
from ppn_bayes.errors import RunError
from ppn_bayes.schema import check_shapes
from ppn_bayes.training import checkpoint_files, rundir
from ppn_bayes.training.averaging import average_shapes
from ppn_bayes.training.averaging import restore as restore_average
from ppn_bayes.training.distributed import barrier, gather_to_host, is_sharded, shard_like

if TYPE_CHECKING:
    from ppn_bayes.training.session import Session


def trained_weights(s: Session) -> dict[str, torch.Tensor]:
    """What ``weights.safetensors``/``adapter.safetensors`` hold (base names; adapters' A and B), as CPU
    copies on rank 0 and ``{}`` on the other ranks. Under FSDP every rank must call this: full-mode
    weights are gathered from their shards one tensor at a time (:func:`~ppn_bayes.training.distributed.gather_to_host`)."""
    weights = s.lora.state() if s.lora is not None else s.named_weights
    return dict(gather_to_host(weights.items(), keep=s.main))


def state_tensors(s: Session) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: ``guide.*``, ``model.*`` (the push and prior, not the base model) and
    ``lora.*`` or ``weights.*`` (and ``average.*``, the guide-average window's sums); whole tensors on the
    CPU whatever the wrapping, on rank 0 (``{}`` on the other ranks, which under FSDP must call this too:
    they take part in gathering the shards)."""
    out = dict(gather_to_host(((f"guide.{k}", v) for k, v in s.guide.state_dict().items()), keep=s.main))
    out.update(gather_to_host(((f"model.{k}", v) for k, v in s.ppn.state_dict().items()
                               if not k.startswith("gated.")), keep=s.main))
    prefix = "lora." if s.lora is not None else "weights."
    out.update({prefix + k: v for k, v in trained_weights(s).items()})
    if s.average is not None and s.main:  # the guide-average window's running sums (replicated, not sharded)
        out.update({k: v.detach().cpu() for k, v in s.average.items()})
    return out


def state_shapes(s: Session) -> dict[str, tuple[int, ...]]:
    """Names and shapes of :func:`state_tensors` without gathering or copying anything (what a
    checkpoint's ``state.safetensors`` must hold for this session)."""
    out = {f"guide.{k}": tuple(v.shape) for k, v in s.guide.state_dict().items()}
    out.update({f"model.{k}": tuple(v.shape) for k, v in s.ppn.state_dict().items() if not k.startswith("gated.")})
    if s.lora is not None:
        out.update({f"lora.{k}": tuple(v.shape) for k, v in s.lora.state().items()})
    else:
        # (a DTensor shard reports the global shape, as the checkpoint holds whole tensors)
        out.update({f"weights.{k}": tuple(p.shape) for k, p in s.named_weights.items()})
    return out | average_shapes(s)


def restore(s: Session, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into the session; returns the step it was taken at. The optimizer's
    hyperparameters come back as saved (:func:`ppn_bayes.training.loop.fit` then applies the recipe's).
    Checkpoints hold whole tensors, so one written by any number of processes, DDP or FSDP, loads
    into any other."""
    fix = checkpoint_files.checkpoint_fix(s.run_dir / rundir.CHECKPOINT)
    try:
        # the averaging window's sums are checked by restore_average (a run may turn averaging on when resumed)
        check_shapes({k: tuple(v.shape) for k, v in ckpt["tensors"].items() if not k.startswith("average.")},
                     {k: v for k, v in state_shapes(s).items() if not k.startswith("average.")},
                     f"{s.run_dir / rundir.CHECKPOINT}/state.safetensors", fix)
    except RunError as err:
        if "thresholds_spline" not in str(err):
            raise
        raise RunError(f"the checkpoint in {s.run_dir} holds one threshold curve per layer: runs written before "
                       "shared threshold curves (push.thresholds) cannot be resumed; start a new run (the old "
                       "run's posterior files still load for keepset and report)") from None
    _restore_tensors(s, ckpt["tensors"])
    restore_average(s, ckpt["tensors"], int(ckpt["trainer"]["step"]))
    try:
        s.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError):
        raise RunError(f"{s.run_dir / rundir.CHECKPOINT}/optimizer.pt does not fit this run's parameters; "
                       f"{fix}") from None
    if is_sharded(s):  # optimizer state of FSDP-sharded parameters: whole tensors -> this rank's shards
        for group in s.optimizer.param_groups:
            for p in group["params"]:
                state = s.optimizer.state.get(p, {})
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        state[k] = shard_like(p, v)
    rng = ckpt["rng"]
    lost = [k for k in checkpoint_files.RNG_STATES if k not in rng]
    if lost:
        raise RunError(f"{s.run_dir / rundir.CHECKPOINT}/rng.safetensors lacks the random state {lost[0]}; {fix}")
    torch.set_rng_state(rng["torch_cpu"])
    s.generator.set_state(rng["model_generator"])
    s.seconds = float(ckpt["trainer"].get("seconds", 0.0))
    return int(ckpt["trainer"]["step"])


@torch.no_grad()
def _restore_tensors(s: Session, tensors: dict[str, torch.Tensor]) -> None:

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    if part("guide."):
        s.guide.load_state_dict(part("guide."))
    s.ppn.load_state_dict({**s.ppn.state_dict(), **part("model.")})
    if s.lora is not None:
        s.lora.load_state(part("lora."))
    for name, value in part("weights.").items():
        s.named_weights[name].copy_(shard_like(s.named_weights[name], value))


def optimizer_state(s: Session) -> dict:
    """The optimizer's state dict with whole tensors, on rank 0; ``{}`` on the other ranks.

    Under FSDP every rank must call this: the state of sharded parameters (AdamW's two moments, each
    as big as its parameter) is gathered one tensor at a time, in the same order on every rank, and
    copied to the CPU on rank 0 only (:func:`~ppn_bayes.training.distributed.gather_to_host`), so no GPU ever
    holds more than one whole state tensor and only rank 0's host memory holds the whole state. The
    saved dict is the same whatever the wrapping: whole tensors that any world size can resume.
    """
    if not is_sharded(s):  # whole tensors already; torch.save copies them to the file from wherever they are
        return s.optimizer.state_dict() if s.main else {}
    state = s.optimizer.state_dict()
    whole: dict[int, dict[str, Any]] = {}
    for i in sorted(state["state"]):  # same order on every rank: each sharded tensor is gathered by a collective
        st = state["state"][i]
        tensors = dict(gather_to_host(((k, v) for k, v in st.items() if torch.is_tensor(v)), keep=s.main))
        if s.main:
            whole[i] = {k: tensors.get(k, v) for k, v in st.items()}
    return {"state": whole, "param_groups": state["param_groups"]} if s.main else {}


def save(s: Session, step: int) -> None:
    """Exports (posterior, weights/adapter) and the resumable checkpoint; rank 0 writes.

    Every rank first helps gather the FSDP shards (:func:`state_tensors`, :func:`optimizer_state`:
    only rank 0 keeps them). Then rank 0 writes while the others wait in the closing barrier, which is
    the longest wait of a run (minutes for a multi-GB checkpoint): the process group's timeout,
    :data:`~ppn_bayes.training.distributed.DIST_TIMEOUT_S` (``PPN_DIST_TIMEOUT_S``), is sized to cover it.
    """

    r = s.recipe
    tensors = state_tensors(s)
    prefix = "lora." if s.lora is not None else "weights."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # gathered once, for both files
    opt = optimizer_state(s)
    if s.main:
        save_posterior(s.run_dir, s.ppn.prior, s.ppn.push, s.guide, r.prior, r.push, r.guide, r.train.tempering)
        meta = s.lora.metadata() if s.lora is not None else None
        rundir.save_weights(s.run_dir, r.train.weights, weights, meta)
        rng = {"torch_cpu": torch.get_rng_state(), "model_generator": s.generator.get_state()}
        trainer = {"step": step, "seconds": s.seconds, "world_size": s.world,
                   "recipe_sha256": hashlib.sha256(dump_recipe(r).encode()).hexdigest()}
        checkpoint_files.save_checkpoint(s.run_dir, tensors, rng, opt, trainer)
        rundir.update_manifest(s.run_dir, steps_done=step, checkpoint_step=step)
    barrier(s)
