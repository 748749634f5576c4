"""Noise, data order and learning rates as pure functions of ``(seed, step)``.

Before every micro-batch the training loop re-seeds the torch RNG (guide samples) and the model's
lambda/mask generator from :func:`step_seed`, and takes the batch's sequences from
:func:`batch_indices` (a seeded permutation per epoch). Hence a resumed run replays exactly what an
uninterrupted one does, and data-parallel ranks reproduce a single process. The learning-rate
multipliers (:func:`group_multiplier`) are functions of the step too: warmup then constant or cosine
over the joint ``steps``, and the guide's own schedule in the guide-only phase that follows.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for optimizer step ``step`` (numpy's SeedSequence hashing); ``stream``
    separates independent uses (0: the step's noise, 1: the data order)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def batch_indices(seed: int, step: int, micro: int, grad_accum: int, batch_size: int, num_sequences: int
                  ) -> torch.Tensor:
    """The training-set indices of micro-batch ``micro`` of step ``step``: positions run through one
    seeded permutation per epoch, so every sequence is seen once per epoch and the order is replayable."""
    start = (step * grad_accum + micro) * batch_size
    pos = torch.arange(start, start + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in pos.div(num_sequences, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(step_seed(seed, epoch, stream=1)))
        sel = pos.div(num_sequences, rounding_mode="floor") == epoch
        out[sel] = perm[pos[sel] % num_sequences]
    return out


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def total_steps(t) -> int:
    """Optimizer steps of a run: the joint ``steps`` and then the guide-only ``guide_steps``."""
    return t.steps + t.guide_steps


def in_settle(t, step: int) -> bool:
    """Is optimizer step ``step`` (0-based) in the settle phase: the last ``settle_steps`` joint steps?"""
    return t.settle_steps > 0 and t.steps - t.settle_steps <= step < t.steps


def group_multiplier(t, step: int, group: str) -> float:
    """Learning-rate multiplier of parameter group ``group`` at optimizer step ``step``: the recipe's
    schedule over ``steps`` for every group; in the guide-only phase (``step >= steps``) the guide's
    own schedule over ``guide_steps`` (no warmup; ``guide_schedule``, default ``schedule``) at
    ``guide_lr / lr_guide`` (default 1) and 0 for every other group (frozen exactly: AdamW's update
    and its decay are both proportional to lr), except the push in the phase's first
    ``min(guide_push_steps, guide_steps)`` steps, which goes on at ``lr_push`` on the phase's schedule
    over them. In the settle phase (the last ``settle_steps`` joint steps, ``training/settle.py``) the
    guide and the push are frozen, the weights go on."""
    if step < t.steps:
        if group in ("guide", "push") and in_settle(t, step):
            return 0.0
        return lr_multiplier(step, t.steps, t.warmup_steps, t.schedule)
    push_steps = min(t.guide_push_steps, t.guide_steps)  # a shortened phase (--set train.guide_steps=2) keeps it
    if group == "push" and step - t.steps < push_steps:
        return lr_multiplier(step - t.steps, push_steps, 0, t.guide_schedule or t.schedule)
    if group != "guide":
        return 0.0
    scale = 1.0 if t.guide_lr is None else t.guide_lr / t.lr_guide
    return scale * lr_multiplier(step - t.steps, t.guide_steps, 0, t.guide_schedule or t.schedule)


def guide_lr_spent(t, steps: int) -> float:
    """Sum of the guide's learning rate over the first ``steps`` optimizer steps (guides.guide_convergence)."""
    return float(sum(t.lr_guide * group_multiplier(t, i, "guide") for i in range(steps)))
