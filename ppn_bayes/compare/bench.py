"""The shared state of one comparison (:class:`Bench`): the test and healing blocks, the dense
reference, perplexity and decode timing.

Every row is evaluated on the same held-out test blocks with the same
:func:`ppn_bayes.backbone.perplexity.perplexity`; decode speedups are against the dense model, timed
alternately with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.baselines import timed
from ppn_bayes.compare.healing import HEAL_LR, check_heal_loss, check_heal_lr, heal
from ppn_bayes.evaluation.bench import time_generation


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int, trials: int = 3) -> float:
    """Best-of-``trials`` seconds for ``new_tokens`` greedy batch-1 decode steps with a KV cache (the
    speed bench's timer, synchronized on CUDA)."""
    return min(time_generation(model, prompt, new_tokens)["decode_s"] for _ in range(trials))


class Bench:
    """Shared state of one comparison: data, the dense reference, decode timing."""

    def __init__(self, model: nn.Module, test: torch.Tensor, heal_blocks: torch.Tensor | None,
                 decode_tokens: int, batch_size: int, trials: int = 5, heal_loss: str = "data",
                 transfer: torch.Tensor | None = None, heal_lr: float = HEAL_LR):
        self.model, self.test, self.heal_blocks, self.transfer = model, test, heal_blocks, transfer
        self.heal_loss, self.heal_lr = check_heal_loss(heal_loss), check_heal_lr(heal_lr)
        self.decode_tokens, self.batch_size, self.trials = decode_tokens, batch_size, trials
        self.prompt = test[:1, : min(32, test.shape[1])]
        # Whether the dense model decodes with a KV cache at all: an architecture whose cache this
        # transformers cannot drive still gets perplexities, and ``decode_error`` says why it has no
        # speedups. Only the dense model's failure is tolerated: a pruned model that fails where its
        # dense model decodes is a bug, and raises.
        self.decode_error: str | None = None
        if decode_tokens > 0:
            try:
                self._decode(model)
            except (TypeError, ValueError, AttributeError, NotImplementedError) as err:
                self.decode_error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        self.can_decode = decode_tokens > 0 and self.decode_error is None
        self.keepsets: dict[str, dict[str, dict]] = {}  # method -> size -> KeepSet JSON (first seed)

    def _decode(self, model: nn.Module) -> float:
        return decode_seconds(model, self.prompt.to(next(model.parameters()).device), self.decode_tokens, 1)

    def speedup(self, model: nn.Module) -> float | None:
        """Dense decode time / ``model``'s, each the best of ``trials`` runs taken *alternately*.

        Alternating the two inside one loop exposes both to the same background load (shared CPUs),
        so the ratio is far steadier than one measured against a dense time taken minutes earlier.
        """
        if not self.can_decode:
            return None
        dense = mine = float("inf")
        for _ in range(self.trials):
            dense, mine = min(dense, self._decode(self.model)), min(mine, self._decode(model))
        return dense / mine

    def ppl(self, model: nn.Module) -> dict[str, float]:
        """Perplexity on the test blocks, and on the transfer blocks (another domain) when given."""
        r = perplexity(model, self.test, batch_size=self.batch_size)
        out = {"perplexity": r["perplexity"], "nll": r["nll"]}
        if self.transfer is not None:
            t = perplexity(model, self.transfer, batch_size=self.batch_size)
            out.update(transfer_perplexity=t["perplexity"], transfer_nll=t["nll"])
        return out

    @property
    def healing(self) -> bool:
        return self.heal_blocks is not None and self.heal_blocks.shape[0] > 0

    def maybe_heal(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """Heal ``model`` when healing is on; ``(model, {"healed_tokens", "heal_seconds"[, "heal_loss"]})``.

        Healing runs once per size, so its time is part of what producing that size costs. With
        ``heal_loss="distill"`` the teacher is the dense model of this comparison."""
        if not self.healing:
            return model, {"healed_tokens": 0, "heal_seconds": 0.0}
        with timed() as t:
            model = heal(model, self.heal_blocks, lr=self.heal_lr, loss=self.heal_loss, teacher=self.model)
        return model, {"healed_tokens": int(self.heal_blocks.numel()), "heal_seconds": t.seconds,
                       "heal_loss": self.heal_loss, "heal_lr": self.heal_lr}
