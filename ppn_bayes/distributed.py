"""Data-parallel training under ``torchrun``: the process group, the DDP/FSDP wrapper, and the
collectives the training loop needs (barrier, mean of logged values over ranks, full parameters).

Every rank builds the same model, guide and optimizer (:func:`ppn_bayes.train.build`); the wrapper
averages the gradients of each rank's shard of the global batch. Single-process runs go through the
same functions, which are then no-ops.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ppn_bayes.config import Recipe

if TYPE_CHECKING:
    from ppn_bayes.train import Objective, Session


def init_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group) from torchrun's environment."""
    from ppn_bayes.device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size(), device, started


def wrap_objective(objective: Objective, recipe: Recipe, device: torch.device, gated) -> nn.Module:
    """DDP (default) or FSDP (``train.distributed: fsdp``: decoder layers sharded, for big models)."""
    if recipe.train.distributed == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_cls = {type(layer) for layer in gated.family.layers(gated.model)}
        return FSDP(objective, auto_wrap_policy=ModuleWrapPolicy(layer_cls), use_orig_params=True,
                    device_id=device if device.type == "cuda" else None, sync_module_states=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Unused parameters are normal: the push's splines get no gradient on dense (lambda = 0) steps.
    return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True, broadcast_buffers=False)


def is_sharded(s: Session) -> bool:
    """Whether this session's parameters are FSDP shards (``train.distributed: fsdp`` under torchrun)."""
    return s.world > 1 and s.recipe.train.distributed == "fsdp"


def full_params(s: Session):
    """FSDP keeps shards; gather full parameters for saving (a no-op context otherwise)."""
    if is_sharded(s):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(s.wrapped, writeback=False)
    return contextlib.nullcontext()


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
