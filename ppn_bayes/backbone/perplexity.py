"""Held-out perplexity on token blocks: the metric training, analysis and evaluation share.

Perplexity is ``exp`` of the mean negative log-likelihood per *predicted token*: every position of a
block but the first is predicted from the ones before it.  The loss is summed over tokens in float64
and divided once at the end, so the number does not depend on the batch size (a mean of batch means
would weight a short last batch wrongly).

The model may be any callable that maps ``input_ids [B, T]`` to an object with ``.logits [B, T, V]``
(a ``transformers`` causal LM, or a gated view of one) or to the logits tensor itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ppn_bayes.device import autocast_context


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise TypeError(f"model output has no [batch, seq, vocab] logits (got {type(output).__name__})")
    return logits


def block_nll(model: Callable[..., Any], input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each block: a float64 tensor ``[B]``."""
    logits = _logits(model(input_ids))[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).double().sum(dim=1)


def perplexity(
    model: Callable[..., Any],
    blocks: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on ``blocks [N, T]``: ``{"perplexity", "nll", "tokens", "blocks"}``.

    ``device`` defaults to the model's; ``autocast_dtype`` (e.g. ``torch.bfloat16``) enables autocast
    on CUDA only.  A module is put in eval mode for the pass and restored afterwards, so calling this
    mid-training does not leave dropout switched off.
    """
    if blocks.ndim != 2 or blocks.shape[1] < 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [N, T>=2] tensor, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    total = 0.0
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
    try:
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            for start in starts:
                batch = blocks[start:start + batch_size].to(device, non_blocking=True)
                total += float(block_nll(model, batch).sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    nll = total / tokens
    ppl = math.exp(nll) if nll < 700 else float("inf")
    return {"perplexity": ppl, "nll": nll, "tokens": int(tokens), "blocks": int(blocks.shape[0])}
