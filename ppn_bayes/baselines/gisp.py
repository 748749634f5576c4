"""GISP: Global Iterative Structured Pruning ("From Local to Global: Revisiting Structured Pruning
Paradigms for Large Language Models"; only the abstract and a review are available to us).

Units are attention heads and MLP channel groups. Importance is first-order Taylor, from the loss
of a chosen objective on calibration data, summed over each structure's weights:

    I_u = sum_{w in u} | dL/dw * w |

where ``u``'s weights are its q rows, o columns and a ``1/kv_group`` share of its KV head's k/v rows
(a KV head only goes with all its query heads), or a channel's gate/up rows and down column.
Gradients are accumulated over all calibration blocks before the absolute value (the Taylor estimate
of the loss change of the whole calibration set). *Block-wise normalization*: within each block
(layer ``l``, kind) the scores of the still-kept units are divided by their mean,
``Ihat_u = I_u / mean_{v in block} I_v``, so that heads and channels, and early and late layers,
compete on relative importance; the normalized scores are ranked globally. *Iterative*: the model
is pruned in steps of ``step`` (fraction of decoder parameters); before each step the importance
is recomputed on the masked model (removed units gated to 0 through :class:`GatedLM`), and the
lowest-ranked units are removed until the step's target is reached. The sequence of removals is one
order, so the keep-sets at all requested sizes are nested (prune once, deploy many).

Objectives: ``"perplexity"``: mean next-token NLL of the calibration blocks. ``"margin"`` (choice
tasks): for examples with a context, candidate continuations and a correct index, score each
candidate by its summed log-probability ``s_j``, margin ``m = s_y - max_{j != y} s_j``, and loss
``softplus(gamma - m)`` (a smooth hinge: near-zero for confidently right examples, linear in the
margin for wrong ones; smooth so that a small calibration set that is all right still gives a
gradient).

Departs from the paper where the abstract does not say: the exact normalization (mean within a
layer-kind block) and the step size are our choices; no layer-level units (GISP prunes heads and
channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.baselines import (
    CostTracker,
    NestedKeepSets,
    check_blocks,
    check_sizes,
    full_inventory,
    gated_view,
    keepsets_from_order,
    timed,
)
from ppn_bayes.data.tasks.choices import ChoiceExample
from ppn_bayes.errors import ConfigError

# ----------------------------------------------------------------------------- objectives


def perplexity_loss(g: GatedLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of blocks."""
    logits = g(input_ids=batch, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def choice_scores(g: GatedLM, ex: ChoiceExample) -> torch.Tensor:
    """Summed log-probability of each candidate continuation given the context, ``[C]``."""
    seqs = [ex.context + c for c in ex.choices]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    tgt_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, ex.choices)):
        ids[i, :len(s)] = torch.tensor(s)
        tgt_mask[i, len(ex.context):len(s)] = True
    device = next(g.parameters()).device
    ids, tgt_mask = ids.to(device), tgt_mask.to(device)
    logp = torch.log_softmax(g(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * tgt_mask[:, 1:]).sum(1)


def margin_loss(g: GatedLM, examples: Sequence[ChoiceExample], gamma: float = 1.0) -> torch.Tensor:
    """Mean ``softplus(gamma - (s_y - max_{j != y} s_j))`` over examples (see module docstring)."""
    losses = []
    for ex in examples:
        if len(ex.choices) < 2 or not 0 <= ex.label < len(ex.choices) or not ex.context:
            raise ConfigError("a choice example needs a non-empty context, at least two choices and a label "
                              "indexing one of them")
        s = choice_scores(g, ex)
        others = torch.cat([s[:ex.label], s[ex.label + 1:]])
        losses.append(F.softplus(gamma - (s[ex.label] - others.max())))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- importance


def _weight_params(g: GatedLM) -> list[tuple[int, object, nn.Parameter]]:
    rules = g.family.slice_rules(g.config)
    out = []
    for l, layer in enumerate(g.family.layers(g.model)):
        params = dict(layer.named_parameters())
        out += [(l, rule, params[rule.name]) for rule in rules if rule.name in params]
    return out


def taylor_importance(g: GatedLM, loss_terms: list[tuple[Callable[[], torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """``{"heads": [L, H], "groups": [L, G]}`` of ``sum |grad * w|`` under the current gates.

    ``loss_terms`` are ``(closure, weight)``: the gradient is that of ``sum_k weight_k * closure_k()``,
    accumulated one term at a time so memory is one batch's activations.
    """
    inv = g.inventory
    wp = _weight_params(g)
    saved = {id(p): p.requires_grad for p in g.parameters()}
    for p in g.parameters():
        p.requires_grad_(False)
    for _, _, p in wp:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            for closure, weight in loss_terms:
                (closure() * weight).backward()
        device = wp[0][2].device if wp else torch.device("cpu")  # accumulated where the gradients are
        heads = torch.zeros(inv.num_layers, inv.num_heads, dtype=torch.float64, device=device)
        chans = torch.zeros(inv.num_layers, inv.dims.intermediate, dtype=torch.float64, device=device)
        hd, kvg = inv.dims.head_dim, inv.dims.kv_group
        for l, rule, p in wp:
            if p.grad is None:
                continue
            a = (p.grad.double() * p.detach().double()).abs()
            other = [d for d in range(a.dim()) if d != rule.axis]
            per = a.sum(dim=other) if other else a
            if rule.segments > 1:
                per = per.view(rule.segments, -1).sum(0)
            if rule.unit == "ch":
                chans[l] += per.to(device)
            else:
                ph = per.view(-1, hd).sum(1).to(device)
                heads[l] += ph.repeat_interleave(kvg) / kvg if rule.unit == "kv" else ph
    finally:
        for p in g.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
    owner = torch.repeat_interleave(torch.arange(inv.num_groups), inv.group_sizes()).to(chans.device)
    groups = torch.zeros(inv.num_layers, inv.num_groups, dtype=torch.float64, device=chans.device).index_add_(
        1, owner, chans)
    return {"heads": heads, "groups": groups}


def normalized_ranking(scores: dict[str, torch.Tensor], tracker: CostTracker) -> list[tuple[str, tuple[int, int]]]:
    """Still-kept units, ascending by block-wise mean-normalized importance (ties: deterministic)."""
    ranked = []
    for kind, alive in (("heads", tracker.heads), ("groups", tracker.groups)):
        s = scores[kind]
        for l in range(s.shape[0]):
            units = [(l, j) for j in range(s.shape[1]) if (l, j) in alive]
            if not units:
                continue
            vals = torch.stack([s[u] for u in units])
            mean = float(vals.mean())
            norm = vals / mean if mean > 0 else torch.zeros_like(vals)
            ranked += [(float(v), kind, u) for v, u in zip(norm, units)]
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return [(kind, u) for _, kind, u in ranked]


# ----------------------------------------------------------------------------- the method


def check_step(step: float) -> float:
    """GISP's step: a finite fraction of decoder parameters per iteration, in (0, 1]."""
    if not (math.isfinite(step) and 0.0 < step <= 1.0):
        raise ConfigError(f"GISP step {step:g} must be in (0, 1]: the fraction of decoder parameters removed per "
                          "iteration, e.g. --gisp-step 0.1")
    return step


def gisp(model: nn.Module | GatedLM, blocks: torch.Tensor, sizes: Sequence[float], objective: str = "perplexity",
         choices: Sequence[ChoiceExample] | None = None, step: float = 0.1, group_size: int = 1,
         batch_size: int = 4, gamma: float = 1.0) -> NestedKeepSets:
    """Nested keep-sets by global iterative Taylor pruning (see the module docstring)."""
    sizes = check_sizes(sizes)
    check_step(step)
    terms_of = loss_closures(objective, blocks, choices, batch_size, gamma)
    with timed() as t, gated_view(model, group_size, kinds=("layers", "heads", "groups")) as g:
        if "heads" not in g.inventory.kinds:
            raise ConfigError(f"GISP prunes attention heads, which {g.family.name} cannot cut exactly; "
                              "use shortgpt or the PPN layer/group gates for this model")
        inv = full_inventory(g.inventory)
        tracker = CostTracker(inv)
        targets = sorted({*sizes, *(1.0 - k * step for k in range(1, int(1.0 / step) + 1)
                                    if 1.0 - k * step > min(sizes))}, reverse=True)
        order: list = []
        history = []
        for target in targets:
            masks = inv.masks(tracker.keepset())
            with g.gates(heads=masks["heads"], groups=masks["groups"]):
                scores = taylor_importance(g, terms_of(g))
            for unit in normalized_ranking(scores, tracker):
                if tracker.fraction <= target + 1e-12:
                    break
                tracker.remove(unit)
                order.append(unit)
            history.append({"target": target, "achieved": tracker.fraction, "removed": len(order)})
        keepsets = keepsets_from_order(inv, order, sizes)
    return NestedKeepSets("gisp", inv, keepsets, order, t.seconds,
                          info={"objective": objective, "step": step, "schedule": history})


def loss_closures(objective: str, blocks: torch.Tensor | None, choices: Sequence[ChoiceExample] | None,
                  batch_size: int, gamma: float) -> Callable[[GatedLM], list]:
    """A function from the gated model to its weighted loss closures for one importance pass."""
    if objective == "perplexity":
        blocks = check_blocks(blocks)  # type: ignore[arg-type]
        n = blocks.shape[0]

        def terms(g: GatedLM) -> list:
            device = next(g.parameters()).device
            out = []
            for s in range(0, n, batch_size):
                b = blocks[s:s + batch_size].to(device)
                out.append((lambda b=b: perplexity_loss(g, b), b.shape[0] / n))
            return out

        return terms
    if objective == "margin":
        if not choices:
            raise ConfigError("GISP's margin objective needs choice examples (choices=[ChoiceExample, ...])")
        ex = list(choices)
        n = len(ex)

        def terms(g: GatedLM) -> list:
            return [(lambda c=ex[s:s + batch_size]: margin_loss(g, c, gamma), len(ex[s:s + batch_size]) / n)
                    for s in range(0, n, batch_size)]

        return terms
    raise ConfigError(f"unknown GISP objective {objective!r}; choose perplexity or margin")
