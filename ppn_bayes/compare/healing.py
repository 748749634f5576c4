"""Healing: fine-tuning a pruned model on held-out train tokens, keeping its sparsity.

Peers run as their papers describe, without retraining; ``heal_tokens > 0`` fine-tunes every pruned
model on the same number of held-out *train* tokens (disjoint from the calibration blocks), by the
data loss (next-token NLL) or by distillation from the dense model (forward KL).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.bayes.model import sequence_kl
from ppn_bayes.errors import ConfigError

HEAL_LOSSES = ("data", "distill")
HEAL_LR = 5e-5  # AdamW's rate for every healed row unless --heal-lr says otherwise


def check_heal_loss(loss: str) -> str:
    if loss not in HEAL_LOSSES:
        raise ConfigError(f"unknown heal loss {loss!r}; choose from {','.join(HEAL_LOSSES)} (data: next-token NLL, "
                          "distill: forward KL from the dense model)")
    return loss


def check_heal_lr(lr: float) -> float:
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--heal-lr must be a finite number > 0, got {lr} (default {HEAL_LR:g})")
    return float(lr)


def heal(model: nn.Module, blocks: torch.Tensor, lr: float = HEAL_LR, batch_size: int = 4, loss: str = "data",
         teacher: nn.Module | None = None) -> nn.Module:
    """Fine-tune the decoder layers on ``blocks`` (one pass), keeping every zero weight zero.

    Zeros are the pruned weights of Wanda/SparseGPT; re-applying the mask after each step keeps
    the sparsity (structured models are already cut, so they have none to keep).

    ``loss``: ``data`` (the mean next-token NLL) or ``distill`` (the mean per-token forward KL from
    ``teacher``'s next-token distribution, the teacher under ``torch.no_grad``: what Minitron heals
    with, and what PPN's in-place distillation trains its sub-networks with; see docs/method.md).
    """
    check_heal_loss(loss)
    check_heal_lr(lr)
    if loss == "distill" and teacher is None:
        raise ConfigError("heal(loss='distill') needs the dense model as teacher=")

    layers = family_for(model.config).layers(model)
    params = [p for p in layers.parameters() if p.dtype.is_floating_point]
    masks = [(p != 0) for p in params]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    try:
        for s in range(0, blocks.shape[0], batch_size):
            batch = blocks[s:s + batch_size].to(device)
            if loss == "data":
                value = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
                logits = model(input_ids=batch, use_cache=False).logits
                value = sequence_kl(logits, target, None).sum() / (batch.shape[0] * (batch.shape[1] - 1))
            opt.zero_grad()
            value.backward()
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    p.mul_(m)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
    return model
