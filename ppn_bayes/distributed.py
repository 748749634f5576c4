"""Data-parallel training under ``torchrun``: the process group, the DDP/FSDP wrapper, and the
collectives the training loop needs (barrier, mean of logged values over ranks, gradient averaging
and norms under FSDP, whole tensors from FSDP shards).

Every rank builds the same model, guide and optimizer (:func:`ppn_bayes.train.build`); the wrapper
averages the gradients of each rank's shard of the global batch. Single-process runs go through the
same functions, which are then no-ops.
"""

from __future__ import annotations

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
    """DDP (default) or FSDP (``train.distributed: fsdp``: the base model sharded, for big models)."""
    if recipe.train.distributed == "fsdp":
        return shard_base_model(objective, device, gated)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Unused parameters are normal: the push's splines get no gradient on dense (lambda = 0) steps.
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
