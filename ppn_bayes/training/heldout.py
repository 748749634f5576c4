"""Held-out evaluation during training: the validation loss of the dense network and of the hard
sub-network at each of ``train.eval_lambdas``, logged to ``metrics.jsonl`` as ``eval`` records.

:func:`heldout` works on the live objects (also usable outside a run); :func:`evaluate` is the
training loop's call (rank 0 evaluates and logs; under FSDP every rank evaluates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pyro import poutine

from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.training import rundir
from ppn_bayes.training.distributed import barrier, is_sharded

if TYPE_CHECKING:
    from ppn_bayes.training.session import Session


@torch.no_grad()
def median_scores(ppn, guide) -> dict[str, torch.Tensor]:
    """Unit scores at the guide's median (deterministic: what the held-out evaluation prunes by)."""
    med = guide.median()
    tr = poutine.trace(poutine.condition(ppn.prior, data=med)).get_trace()
    return {k: tr.nodes[f"score_{k}"]["value"] for k in ppn.inventory.kinds}


@torch.no_grad()
def heldout(gated, ppn, guide, blocks: torch.Tensor, lambdas: list[float], batch_size: int = 8,
            autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Held-out NLL per token of the dense network and of the hard sub-network at each price.

    At price ``lambda`` a unit is kept when its own inclusion probability at the median scores is
    above 1/2 (nesting applied), with the amplitude corrections of that price; ``size`` is the kept
    fraction of decoder FLOPs (exact, GQA-aware).
    """

    out: dict[str, Any] = {"dense": perplexity(gated, blocks, batch_size, autocast_dtype=autocast_dtype)["nll"],
                           "lambdas": []}
    scores = median_scores(ppn, guide)
    for lam in lambdas:
        own = ppn.push.unnest(ppn.push.inclusion(scores, lam))
        masks = {k: (v > 0.5).to(v.dtype) for k, v in own.items()}
        keep = ppn.inventory.keepset_from_masks({k: v.cpu() for k, v in ppn.push.nest(masks).items()})
        size = ppn.inventory.size_of(keep, "flops")
        with gated.gates(**ppn.push.gates(masks, lam)):
            nll = perplexity(gated, blocks, batch_size, autocast_dtype=autocast_dtype)["nll"]
        out["lambdas"].append({"lambda": float(lam), "loss": nll, "size": size})
    return out


def evaluate(s: Session, step: int) -> dict | None:
    """The ``eval`` record of step ``step`` (rank 0 computes and logs it; ``None`` on other ranks).
    Under FSDP every rank runs the evaluation (the sharded layers gather their weights collectively)
    and rank 0 logs it."""
    record = None
    if s.main or is_sharded(s):
        t = s.recipe.train
        amp = torch.bfloat16 if t.bf16 else None
        res = heldout(s.gated, s.ppn, s.guide, s.val_blocks.to(s.device), t.eval_lambdas, t.eval_batch_size, amp)
        s.gated.model.train()
        if s.main:
            record = {"type": "eval", "step": step, **res, "seconds": s.seconds}
            rundir.append_metrics(s.run_dir, record)
    barrier(s)
    return record
