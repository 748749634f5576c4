"""Building one training process's session from a recipe.

:func:`build` loads the base model and data, gates the model, anchors the prior, builds the Pyro model,
the guide, the adapters or trainable decoder weights, the distillation teacher, and the optimizer with
its parameter groups: ``guide`` (lr_guide), ``push`` (splines, amplitudes, score levels; lr_push),
``weights`` (LoRA adapters or the decoder's matrices; lr_weights and weight decay) and
``weights_nodecay`` (the decoder's norms and biases). Only ``weights`` decays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.anchor import score_anchors
from ppn_bayes.bayes.guides import guide_marginals, make_guide
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.config import Recipe
from ppn_bayes.data.corpus import token_blocks
from ppn_bayes.device import autocast_context
from ppn_bayes.errors import ConfigError
from ppn_bayes.hub.zoo import load_model, resolve_model
from ppn_bayes.training import averaging
from ppn_bayes.training.distributed import wrap_objective
from ppn_bayes.training.lora import LoRA
from ppn_bayes.training.session import Objective, Session


def _checkpointing_context(gated) -> Callable:
    """``context_fn`` for non-reentrant activation checkpointing: the recomputation in the backward pass
    runs after :meth:`GatedLM.gates` has been exited, so it must see the gates of the forward pass again."""

    def context_fn():
        snapshot = gated.current_gates()
        return contextlib.nullcontext(), gated.gates(**snapshot)

    return context_fn


def _setup_weights(recipe: Recipe, gated, seed: int):
    """Freeze the base model, then make trainable what the weights mode says; returns
    ``(lora, {export name: param})``."""

    model = gated.model
    model.requires_grad_(False)
    mode = recipe.train.weights
    if mode == "lora":
        return LoRA(gated, rank=recipe.train.lora_rank, alpha=recipe.train.lora_alpha, seed=seed), {}
    if mode == "full":
        for layer in gated.family.layers(model):
            layer.requires_grad_(True)
    return None, _decoder_weights(gated) if mode == "full" else {}


def _teacher(recipe: Recipe, gated, lora, base_path: Path, device: torch.device, world: int) -> Callable | None:
    """The distillation teacher's logits function for :class:`~ppn_bayes.bayes.model.PPNModel` (``None``:
    the gated network itself with every gate on, which is ``teacher: self``).

    ``teacher: base`` is the base model as loaded: with frozen weights that *is* the dense network
    (``None``); with LoRA, the dense network with the adapters switched off for the teacher's pass
    (no extra memory); with ``weights: full`` the trained decoder no longer holds the base, so a
    second, frozen copy of the base model is loaded (one more copy of the weights in memory, no
    gradients or optimizer state: about 1/4 of what full training already holds). Under FSDP that
    copy would be whole on every rank: refused.
    """
    t = recipe.train
    if t.distill_weight == 0 or t.teacher == "self" or t.weights == "frozen":
        return None

    amp = torch.bfloat16 if t.bf16 else None
    if t.weights == "lora":
        def lora_off(input_ids, attention_mask=None):
            with lora.disabled(), gated.gates(**dict.fromkeys(gated.current_gates())), \
                    autocast_context(input_ids.device, amp):
                return gated(input_ids=input_ids, attention_mask=attention_mask).logits

        return lora_off
    if world > 1 and t.distributed == "fsdp":
        raise ConfigError("train.teacher=base with train.weights=full would hold a whole frozen copy of the base "
                          "model on every FSDP rank; use train.teacher=self, or train.weights=lora")

    frozen, _ = load_model(base_path, dtype=getattr(torch, recipe.model.dtype), device=device,
                           trust_remote_code=recipe.model.trust_remote_code)
    frozen.eval().requires_grad_(False)

    def base(input_ids, attention_mask=None):
        with autocast_context(input_ids.device, amp):
            return frozen(input_ids=input_ids, attention_mask=attention_mask).logits

    return base


def _decoder_weights(gated) -> dict[str, nn.Parameter]:
    """``{export name: param}`` of every decoder-layer tensor (what ``weights: full`` trains)."""
    return {gated.family.layer_prefix(i) + name: p
            for i, layer in enumerate(gated.family.layers(gated.model)) for name, p in layer.named_parameters()}


def _param_groups(recipe: Recipe, ppn, guide, lora, named_weights) -> dict[str, list[nn.Parameter]]:
    push = [p for n, p in ppn.named_parameters() if not n.startswith("gated.") and p.requires_grad]
    if lora is not None:
        weights, nodecay = list(lora.parameters()), []
    else:
        weights = [p for p in named_weights.values() if p.ndim >= 2]
        nodecay = [p for p in named_weights.values() if p.ndim < 2]
    groups = {"guide": list(guide.parameters()), "push": push, "weights": weights, "weights_nodecay": nodecay}
    return {k: v for k, v in groups.items() if v}


def group_hparams(recipe: Recipe, name: str) -> dict[str, Any]:
    t = recipe.train
    lr = {"guide": t.lr_guide, "push": t.lr_push}.get(name, t.lr_weights)
    return {"base_lr": lr, "lr": lr, "weight_decay": t.weight_decay if name == "weights" else 0.0,
            "betas": tuple(t.betas)}


def build(recipe: Recipe, run_dir: Path, rank: int = 0, world: int = 1, device: torch.device | None = None
          ) -> Session:
    """Load the base model and data and build model, guide, adapters, optimizer (one process's share)."""

    t = recipe.train
    device = device or torch.device("cpu")
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size {t.batch_size} is the global batch and must be divisible by the "
                          f"{world} processes; use a multiple of {world}")
    base_path = resolve_model(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    model, tokenizer = load_model(base_path, dtype=getattr(torch, recipe.model.dtype), device=device,
                                  trust_remote_code=recipe.model.trust_remote_code)
    ctx = getattr(model.config, "max_position_embeddings", None)
    d = recipe.data
    train_blocks = token_blocks(tokenizer, "train", d.block_size, d.corpus, max_blocks=d.train_blocks, max_context=ctx,
                                bootstrap_seed=d.bootstrap_seed, bootstrap_unit=d.bootstrap_unit)
    val_blocks = token_blocks(tokenizer, "validation", d.block_size, d.corpus, max_blocks=d.val_blocks, max_context=ctx)
    if train_blocks.shape[0] < t.batch_size:
        raise ConfigError(f"train.batch_size {t.batch_size} exceeds the {train_blocks.shape[0]} training blocks; "
                          "lower it or use more data")
    gated = gate(model, group_size=recipe.units.group_size, kinds=tuple(recipe.units.kinds))
    u = recipe.units
    anchors = score_anchors(gated, u.score_anchor, train_blocks[:u.anchor_blocks], batch_size=t.batch_size)
    torch.manual_seed(t.seed)  # the guide's init_to_median draws from the prior
    ppn = PPNModel(gated, recipe.prior, recipe.push, num_sequences=train_blocks.shape[0],
                   tokens_per_sequence=d.block_size, norms=anchors, tempering=t.tempering,
                   autocast_dtype=torch.bfloat16 if t.bf16 else None, distill_weight=t.distill_weight).to(device)
    guide = make_guide(ppn.prior, recipe.guide).to(device)
    lora, named = _setup_weights(recipe, gated, t.seed)
    ppn.teacher = _teacher(recipe, gated, lora, base_path, device, world)
    gated.model.train()  # activation checkpointing in transformers only runs in train mode
    if t.grad_checkpointing:
        gated.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": _checkpointing_context(gated)})
    generator = torch.Generator()
    ppn.set_generator(generator)
    objective = Objective(ppn, guide, lora)
    wrapped: nn.Module = objective
    if world > 1:
        wrapped = wrap_objective(objective, recipe, device, gated)
        if named:  # FSDP replaces the layers' parameters by shards
            named = _decoder_weights(gated)
    groups = _param_groups(recipe, ppn, guide, lora, named)
    init = guide_marginals(guide)
    optimizer = torch.optim.AdamW([{"params": ps, "name": n, **group_hparams(recipe, n)} for n, ps in groups.items()],
                                  lr=t.lr_guide, betas=tuple(t.betas), eps=1e-8)
    s = Session(recipe=recipe, run_dir=Path(run_dir), device=device, rank=rank, world=world, base_path=base_path,
                gated=gated, ppn=ppn, guide=guide, lora=lora, objective=objective, wrapped=wrapped,
                train_blocks=train_blocks, val_blocks=val_blocks, groups=groups, named_weights=named,
                optimizer=optimizer, generator=generator, guide_init=init)
    s.average = averaging.start(s)
    return s
