"""Posterior predictive over sub-networks: held-out loss bands, token-level epistemic uncertainty.

At a size, every posterior draw gives its own keep-set (filled by the keep-set rule at the same
budget, :meth:`KeepsetResult.sampled_keepsets`). Running the gated model under K of them gives K
predictive distributions ``p_k(y | x)`` per token. Their average is the posterior predictive, and
their disagreement is *epistemic* uncertainty about which sub-network is right:

* mutual information ``MI = H[mean_k p_k] - mean_k H[p_k]`` (>= 0 by Jensen; 0 iff all agree),
* variation ratio ``1 - (votes for the modal argmax) / K``.

How useful that is gets measured on held-out text: AUROC of MI for flagging the averaged model's own
errors (argmax != next token); AUROC of the averaged prediction's total entropy ``H[mean_k p_k]`` (its
aleatoric part ``mean_k H[p_k]`` plus MI, Depeweg et al. 2018) for the same errors, against the single
sub-network's entropy for its own errors (what a user without the posterior has); and calibration
(ECE, reliability diagram) of the averaged prediction against a single sub-network (the reported
keep-set). AUROC and ECE are computed here, without
sklearn, so the definitions are on the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.bayes.keepsets import keepset
from ppn_bayes.data.corpus import token_blocks
from ppn_bayes.errors import ConfigError
from ppn_bayes.training.rundir import open_run

ECE_BINS = 15


# ------------------------------------------------------------------------------------ token metrics


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last axis of log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


def mixture_logp(logp: torch.Tensor) -> torch.Tensor:
    """``log mean_k p_k`` for ``logp [K, ..., V]``: the posterior predictive."""
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


def mutual_information(logp: torch.Tensor) -> torch.Tensor:
    """``H[mean_k p_k] - mean_k H[p_k]`` per position, clamped at 0 against round-off."""
    return (entropy(mixture_logp(logp)) - entropy(logp).mean(0)).clamp_min(0.0)


def variation_ratio(logp: torch.Tensor) -> torch.Tensor:
    """``1 - max_c #{k : argmax p_k = c} / K`` per position."""
    K, V = logp.shape[0], logp.shape[-1]
    votes = torch.nn.functional.one_hot(logp.argmax(-1), V).sum(0)
    return 1.0 - votes.max(-1).values.double() / K


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U, ties counted half).

    ``nan`` when one class is empty (the AUROC is undefined then).
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    s = scores[order]
    ranks = torch.empty_like(s)
    i, n = 0, s.numel()
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = 0.5 * (i + j) + 1.0
        i = j + 1
    r = torch.empty_like(ranks)
    r[order] = ranks
    u = float(r[labels].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins on [0, 1]: count, mean confidence and accuracy of each (right-closed,
    the first bin also holds 0)."""
    conf, ok = confidence.double().flatten(), correct.double().flatten()
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        c = int(m.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": c,
                    "confidence": float(conf[m].mean()) if c else float("nan"),
                    "accuracy": float(ok[m].mean()) if c else float("nan")})
    return out


def ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / n) |acc_b - conf_b|`` over equal-width bins."""
    n = confidence.numel()
    return sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(confidence, correct, bins)
               if r["count"])


# --------------------------------------------------------------------------------- running the model


def gates_for(posterior, keep: KeepSet, lam: float) -> dict[str, torch.Tensor]:
    """Hard masks of a keep-set times the push's amplitude corrections at ``lam`` (as trained)."""
    masks = posterior.inventory.masks(keep)
    with torch.no_grad():
        return posterior.push.gates(masks, lam)


@torch.no_grad()
def subnetwork_logprobs(gated, posterior, keepsets: list[KeepSet], lam: float, block: torch.Tensor) -> torch.Tensor:
    """``[K, T-1, V]`` next-token log-probabilities of one block ``[T]`` under each keep-set."""
    out = []
    device = next(gated.parameters()).device
    ids = block.unsqueeze(0).to(device)
    for keep in keepsets:
        with gated.gates(**gates_for(posterior, keep, lam)):
            logits = gated(input_ids=ids).logits[0, :-1].double()
        out.append(torch.log_softmax(logits, -1).cpu())
    return torch.stack(out)


@torch.no_grad()
def keepset_nll(gated, posterior, keep: KeepSet, lam: float, blocks: torch.Tensor) -> float:
    """Mean next-token NLL of ``blocks [N, T]`` under one keep-set."""

    with gated.gates(**gates_for(posterior, keep, lam)):
        return float(perplexity(gated, blocks, batch_size=4)["nll"])


def evaluate_keepset(gated, result, blocks: torch.Tensor, samples: int = 8) -> dict[str, Any]:
    """Held-out loss of the reported keep-set and of ``samples`` sampled keep-sets at the same size,
    with a 90 % band over the samples (``nll`` in nats per token; ``ppl = exp(nll)``)."""
    post = _posterior_of(result)
    reported = keepset_nll(gated, post, result.keep, result.lam, blocks)
    sampled = [keepset_nll(gated, post, k, result.lam, blocks) for k in result.sampled_keepsets(samples)]
    t = torch.tensor(sampled, dtype=torch.float64)
    q = [float(torch.quantile(t, p)) for p in (0.05, 0.5, 0.95)]
    return {"blocks": int(blocks.shape[0]), "samples": len(sampled),
            "nll": reported, "ppl": math.exp(reported),
            "sampled_nll": sampled, "nll_mean": float(t.mean()), "nll_q05": q[0], "nll_q50": q[1], "nll_q95": q[2],
            "ppl_q05": math.exp(q[0]), "ppl_q50": math.exp(q[1]), "ppl_q95": math.exp(q[2])}


def _posterior_of(result):
    post = getattr(result, "posterior", None)
    if post is None:
        raise ValueError("this KeepsetResult carries no posterior; build it with keepset()/KeepsetSolver")
    return post


# ----------------------------------------------------------------------------- posterior predictive


@dataclass
class PredictiveReport:
    """Token-level epistemic uncertainty of K sampled sub-networks at one size, on held-out blocks."""

    size: float
    k: int
    tokens: int
    mi_mean: float
    variation_ratio_mean: float
    auroc_mi: float  # MI flags the averaged model's errors
    auroc_variation_ratio: float
    auroc_single_entropy: float  # a non-Bayesian baseline: the single sub-network's own entropy
    auroc_total_entropy: float  # the averaged prediction's entropy H[mean_k p_k] flags its own errors
    error_rate_averaged: float
    error_rate_single: float
    nll_averaged: float
    nll_single: float
    ece_averaged: float
    ece_single: float
    reliability_averaged: list[dict[str, float]] = field(repr=False)
    reliability_single: list[dict[str, float]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@torch.no_grad()
def predictive_uncertainty(gated, result, blocks: torch.Tensor, k: int = 8) -> PredictiveReport:
    """Average ``k`` sampled sub-networks of ``result`` (a :class:`KeepsetResult`) on ``blocks [N, T]``."""
    post = _posterior_of(result)
    sampled = result.sampled_keepsets(k)
    acc: dict[str, list[torch.Tensor]] = {n: [] for n in ("mi", "vr", "err", "conf", "nll", "s_err", "s_conf",
                                                           "s_nll", "s_ent", "ent")}
    for block in blocks:
        logp = subnetwork_logprobs(gated, post, sampled, result.lam, block)  # [K, T-1, V]
        single = subnetwork_logprobs(gated, post, [result.keep], result.lam, block)[0]
        target = block[1:].cpu()
        mix = mixture_logp(logp)
        acc["mi"].append(mutual_information(logp))
        acc["ent"].append(entropy(mix))
        acc["vr"].append(variation_ratio(logp))
        acc["err"].append(mix.argmax(-1) != target)
        acc["conf"].append(mix.exp().max(-1).values)
        acc["nll"].append(-mix.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        acc["s_err"].append(single.argmax(-1) != target)
        acc["s_conf"].append(single.exp().max(-1).values)
        acc["s_nll"].append(-single.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        acc["s_ent"].append(entropy(single))
    a = {n: torch.cat(v) for n, v in acc.items()}
    return PredictiveReport(
        size=result.requested_size, k=len(sampled), tokens=int(a["mi"].numel()),
        mi_mean=float(a["mi"].mean()), variation_ratio_mean=float(a["vr"].mean()),
        auroc_mi=auroc(a["mi"], a["err"]), auroc_variation_ratio=auroc(a["vr"], a["err"]),
        auroc_single_entropy=auroc(a["s_ent"], a["s_err"]), auroc_total_entropy=auroc(a["ent"], a["err"]),
        error_rate_averaged=float(a["err"].double().mean()), error_rate_single=float(a["s_err"].double().mean()),
        nll_averaged=float(a["nll"].mean()), nll_single=float(a["s_nll"].mean()),
        ece_averaged=ece(a["conf"], ~a["err"]), ece_single=ece(a["s_conf"], ~a["s_err"]),
        reliability_averaged=reliability(a["conf"], ~a["err"]), reliability_single=reliability(a["s_conf"], ~a["s_err"]),
    )


# ------------------------------------------------------------------------------------- run helpers


def run_test_blocks(run, blocks: int, tokenizer=None, split: str = "test") -> torch.Tensor:
    """The first ``blocks`` blocks of the run's corpus (``split``: test by default) at its block size."""

    if blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, got {blocks}")
    tok = tokenizer or run.load_tokenizer()
    data = run.recipe.data
    return token_blocks(tok, split, data.block_size, data.corpus, max_blocks=blocks)


def _load(run_or_path):
    return open_run(run_or_path)


def evaluate_run_keepset(run, result, blocks: int = 4, samples: int = 8, device: str = "cpu") -> dict[str, Any]:
    """:func:`evaluate_keepset` on a run's own model and test blocks (for ``ppn keepset --eval``)."""
    run = _load(run)
    gated = run.load_model(device)
    return evaluate_keepset(gated, result, run_test_blocks(run, blocks), samples)


def run_uncertainty(run, size: float | None = None, params: float | None = None, layers: int | None = None,
                    flops: float | None = None, k: int = 8, blocks: int = 4, quantile: float = 0.5,
                    num_draws: int = 256, seed: int = 0, device: str = "cpu") -> PredictiveReport:
    """``ppn uncertainty``: the posterior predictive of a run at one size on its test blocks."""

    run = _load(run)
    result = keepset(run, size, params, layers, flops, quantile=quantile, num_draws=max(num_draws, k), seed=seed)
    gated = run.load_model(device)
    return predictive_uncertainty(gated, result, run_test_blocks(run, blocks), k)
