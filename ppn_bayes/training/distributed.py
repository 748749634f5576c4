"""Data-parallel training under ``torchrun``: the process group, the DDP/FSDP wrapper, and the
collectives the training loop needs (barrier, mean of logged values over ranks, gradient averaging
and norms under FSDP, whole tensors from FSDP shards).

Every rank builds the same model, guide and optimizer (:func:`ppn_bayes.training.build.build`); the wrapper
averages the gradients of each rank's shard of the global batch. Single-process runs go through the
same functions, which are then no-ops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ppn_bayes.config import Recipe
from ppn_bayes.device import resolve_device
from ppn_bayes.errors import ConfigError

if TYPE_CHECKING:
    from ppn_bayes.training.session import Objective, Session


DIST_TIMEOUT_S = 3600.0
"""Seconds any collective may wait (the process group's timeout), unless ``PPN_DIST_TIMEOUT_S`` says otherwise.

The longest wait in a run is the barrier at the end of every checkpoint (:func:`ppn_bayes.training.checkpoint.save`):
rank 0 alone writes the exports and the checkpoint (several GB for a multi-billion-parameter model with
its AdamW state, fsynced) while the other ranks wait. NCCL's default (10 minutes) can run out during a
write to a slow network file system and kill a healthy run; an hour covers a write of tens of GB at the
slowest disks a training cluster has. The price: a rank that really hangs is noticed after this long.
"""


def dist_timeout() -> timedelta:
    """The process group's timeout: ``PPN_DIST_TIMEOUT_S`` (seconds, > 0) if set, else :data:`DIST_TIMEOUT_S`."""
    raw = os.environ.get("PPN_DIST_TIMEOUT_S", "").strip()
    if not raw:
        return timedelta(seconds=DIST_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"PPN_DIST_TIMEOUT_S={raw!r} is not a positive number of seconds; set it to e.g. 7200 "
                          f"(or unset it for the default of {DIST_TIMEOUT_S:g})")
    return timedelta(seconds=seconds)


def local_device(local_rank: int, device_count: int) -> int:
    """The CUDA device index of the process with ``LOCAL_RANK`` ``local_rank`` when it sees ``device_count`` GPUs.

    torchrun lets every process see every GPU of its node, and local rank i takes GPU i. Some launchers
    (SLURM's ``--gpus-per-task``, Kubernetes device plugins) instead set ``CUDA_VISIBLE_DEVICES`` per
    process, so that each one sees a single GPU, ``cuda:0``, whatever its local rank: then the only
    GPU it sees is its own. A local rank beyond the visible GPUs of a multi-GPU view is a launch
    mistake (more processes per node than GPUs), said in one line rather than as a CUDA error.
    """
    if device_count < 1:
        raise ConfigError("CUDA was requested under torchrun but this process sees no CUDA device; check "
                          "CUDA_VISIBLE_DEVICES or use train.device: cpu")
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise ConfigError(f"LOCAL_RANK {local_rank} but this process sees only {device_count} CUDA devices; start at "
                          f"most {device_count} processes per node (torchrun --nproc_per_node {device_count}) or "
                          "give each process one GPU (CUDA_VISIBLE_DEVICES per rank)")
    return local_rank


def init_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group) from torchrun's environment.

    On CUDA each rank takes :func:`local_device` (its own GPU, also when it sees only that one) and
    makes it current before the process group and FSDP's device mesh exist (both use the current
    device); the group waits up to :func:`dist_timeout` in any collective.
    """

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = dist_timeout()  # a bad PPN_DIST_TIMEOUT_S fails before any GPU or process group is touched
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_device(local, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        started = True
    return dist.get_rank(), dist.get_world_size(), device, started


def wrap_objective(objective: Objective, recipe: Recipe, device: torch.device, gated) -> nn.Module:
    """DDP (default) or FSDP (``train.distributed: fsdp``: the base model sharded, for big models)."""
    if recipe.train.distributed == "fsdp":
        return shard_base_model(objective, device, gated)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Unused parameters are normal: the push's splines get no gradient on dense (lambda = 0) steps.
    # device.index is init_distributed's choice (local_device), not LOCAL_RANK: they differ with one GPU per rank.
    return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True, broadcast_buffers=False)


def shard_base_model(objective: Objective, device: torch.device, gated) -> nn.Module:
    """FSDP2 (``fully_shard``): one unit per decoder layer plus one for the rest of the base model
    (embeddings, final norm, LM head); returns ``objective`` itself, changed in place.

    Only the base model is sharded, because only it is big. Its parameters become ``DTensor`` shards
    (gathered by the units' own hooks around each forward, so the model runs anywhere: the loss, the
    held-out evaluation) and the gradients of the trainable ones (``weights: full``) are reduce-scattered.
    The guide, the push and LoRA adapters stay whole on every rank (replicated, as under DDP):
    :func:`average_replicated_grads` averages their gradients before the optimizer step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in gated.family.layers(gated.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(gated.model, mesh=mesh)
    # Gather once now: FSDP allocates each unit's whole-parameter buffers on first use and reuses them, and
    # buffers first made under torch.inference_mode (the held-out evaluation) could not be written later.
    for module in [*gated.family.layers(gated.model), gated.model]:
        module.unshard()
        module.reshard()
    with torch.no_grad():  # every rank built them from the same seed; make sure, as DDP does
        for p in replicated_params(objective.parameters()):
            dist.broadcast(p.data, src=0)
    return objective


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def replicated_params(params) -> list[nn.Parameter]:
    """The parameters that are whole tensors (not FSDP shards)."""
    return [p for p in params if not is_dtensor(p)]


def is_sharded(s: Session) -> bool:
    """Whether this session's base model is FSDP-sharded (``train.distributed: fsdp`` under torchrun)."""
    return s.world > 1 and s.recipe.train.distributed == "fsdp"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank must call it, in the same order);
    any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


K = TypeVar("K")


def gather_to_host(items: Iterable[tuple[K, torch.Tensor]], keep: bool) -> Iterator[tuple[K, torch.Tensor]]:
    """``(key, whole tensor copied to the CPU)`` for each ``(key, tensor)``, one tensor at a time; nothing
    when ``keep`` is false. Under FSDP every rank must run it over the same items in the same order
    (each shard is gathered by a collective); only the rank that keeps (rank 0, the writer) yields.

    Why one at a time: a whole optimizer state or model is as big as the model (twice it for AdamW's
    moments), so gathering all of it before copying any would need that much free memory on every
    GPU. Here each whole tensor exists on the device only until it is copied to the host (rank 0) or
    dropped (the others): peak device memory is one whole tensor, and only rank 0's host memory holds
    the gathered state. The copy is a new tensor also on the CPU, where it must not alias live state.
    """
    for key, value in items:
        whole = full_tensor(value.detach())
        host = whole.to("cpu", copy=True).contiguous() if keep else None
        del whole  # before the next gather, and before the caller gets to hold on to anything
        if host is not None:
            yield key, host


def shard_like(dst: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every rank holds) as a shard laid out like ``dst`` when ``dst`` is an
    FSDP shard (no communication); otherwise ``value`` itself."""
    if not is_dtensor(dst):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements,
                             src_data_rank=None)


def average_replicated_grads(s: Session) -> None:
    """Under FSDP: the mean over ranks of the replicated parameters' gradients (what DDP does for
    them), as one flat all-reduce; missing gradients count as zero, as in the step's guard."""
    params = replicated_params(p for ps in s.groups.values() for p in ps)
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= s.world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def grad_norm(params: list[nn.Parameter]) -> float:
    """The 2-norm of the parameters' gradients, FSDP shards included (the shards' sums of squares are
    added over ranks: a collective when any gradient is a shard)."""
    whole = torch.zeros((), dtype=torch.float32, device=params[0].grad.device)
    shards = whole.clone()
    for p in params:
        if is_dtensor(p.grad):
            shards += p.grad.to_local().detach().float().pow(2).sum()
        else:
            whole += p.grad.detach().float().pow(2).sum()
    if any(is_dtensor(p.grad) for p in params):
        dist.all_reduce(shards)
    return float((whole + shards).sqrt())


def barrier(s: Session) -> None:
    if s.world > 1:
        dist.barrier()


def reduce_mean(s: Session, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each logged value (the values themselves in a single process)."""
    if s.world <= 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=s.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / s.world).tolist()))
