"""Self-speculative decoding: a sub-network of the same weights drafts, the full model verifies.

Each round the draft (the size-``s`` sub-network, switched in place by
:class:`~ppn_bayes.export.switch.SubnetSwitch`: shared weights, no extra memory) proposes ``k``
tokens one at a time from its own KV cache; the verifier (the full model) scores all ``k`` in one
forward over its KV cache, which gives the ``k + 1`` next-token distributions
``p_1 .. p_{k+1}`` at once. Tokens are accepted left to right:

* greedy: draft token ``d_i`` is accepted iff ``d_i = argmax p_i``; at the first mismatch the
  verifier's ``argmax p_i`` is emitted instead. Every emitted token is the verifier's greedy choice
  given the tokens before it, so the output *is* the verifier's greedy output (up to float round-off
  deciding an exact tie, since the verifier scores ``k + 1`` positions in one batched forward).
* sampling (Leviathan et al. 2023; Chen et al. 2023): accept ``d_i ~ q_i`` with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; on the first rejection emit a sample of
  ``norm(max(0, p_i - q_i))`` and stop. Then ``P(emit x) = q(x) min(1, p/q) + (1 - sum_y min(p, q))
  * max(0, p - q) / sum max(0, p - q) = min(p, q) + max(0, p - q) = p(x)``: the output distribution is
  exactly the verifier's.

If all ``k`` are accepted, one more token comes from ``p_{k+1}`` for free. Rejected tokens are rolled
back by cropping both KV caches (``Cache.crop``), so no position is recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.errors import ConfigError
from ppn_bayes.export.switch import SubnetSwitch


@dataclass
class SpecStats:
    """Counts of one speculative generation."""

    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # verifier forwards
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the verifier accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verifier forward (dense decoding: 1)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round}


# ------------------------------------------------------------------------------------ the rule


def verify_draft(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, *, greedy: bool,
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept a prefix of the drafts and pick the next token: ``(n_accepted, next_token)``.

    ``p`` is ``[k + 1, V]`` (verifier distributions after each draft prefix), ``q`` ``[k, V]`` (the
    draft's distributions the drafts were drawn from), ``drafts`` ``[k]``. Greedy ignores ``q``.

    Random draws happen on the CPU with ``generator`` (a CPU generator, as ``torch.Generator()``
    makes): the distributions come over once per round (the loop reads them on the host anyway), so
    a seed gives the same tokens whatever device the models run on.
    """
    k = drafts.shape[0]
    if not greedy:
        p, q = p.float().cpu(), q.float().cpu()
    for i in range(k):
        d = int(drafts[i])
        if greedy:
            if int(p[i].argmax()) != d:
                return i, int(p[i].argmax())
            continue
        ratio = float(p[i, d]) / max(float(q[i, d]), 1e-30)
        if float(torch.rand((), generator=generator)) >= min(1.0, ratio):
            residual = (p[i] - q[i]).clamp_min(0)
            total = float(residual.sum())
            dist = residual / total if total > 0 else p[i]
            return i, int(torch.multinomial(dist, 1, generator=generator))
    last = p[k]
    nxt = int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))
    return k, nxt


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _pick(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    """Greedy: argmax where ``probs`` are; sampled: drawn on the CPU with a CPU ``generator`` (see
    :func:`verify_draft`)."""
    return int(probs.argmax()) if greedy else int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def _crop(cache: Any, length: int) -> None:
    """Roll a KV cache back to ``length`` tokens (``crop(-n)`` removes ``n``; works in transformers 4 and 5)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def cache_kwarg(model: nn.Module) -> str:
    """The KV-cache argument's name: ``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _advance(model: nn.Module, cache: Any, seq: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Feed the tokens of ``seq`` the cache has not seen; logits ``[n_fed, V]`` and the cache."""
    seen = 0 if cache is None else cache.get_seq_length()
    out = model(input_ids=seq[:, seen:], use_cache=True, **{cache_kwarg(model): cache})
    return out.logits[0], output_cache(out)


# ------------------------------------------------------------------------------------ generation


def _check(input_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ConfigError(f"speculative decoding takes one non-empty prompt [1, T], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")


def _eos_cut(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


@torch.inference_mode()
def speculative_generate(
    switch: SubnetSwitch,
    draft: KeepSet,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft_length: int = 4,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    amplitudes: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Generate up to ``max_new_tokens`` after ``input_ids [1, T]``; returns ``(ids [1, T + n], stats)``.

    The verifier is ``switch.model`` with no gates; the draft is the sub-network ``draft`` (with its
    amplitude corrections, if given) of the same weights.
    """
    _check(input_ids, max_new_tokens, temperature)
    if draft_length < 1:
        raise ConfigError(f"draft_length must be >= 1, got {draft_length}")
    model, greedy = switch.model, not do_sample
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    seq = input_ids
    vcache = dcache = None
    stats = SpecStats()
    start = time.perf_counter()
    while stats.new_tokens < max_new_tokens:
        k = min(draft_length, max_new_tokens - stats.new_tokens - 1)
        drafts, qs = [], []
        cur = seq
        if k > 0:
            with switch.use(draft, amplitudes):
                for _ in range(k):
                    logits, dcache = _advance(model, dcache, cur)
                    q = _probs(logits[-1], temperature)
                    tok = _pick(q, greedy, generator)
                    drafts.append(tok)
                    qs.append(q)
                    cur = torch.cat([cur, cur.new_tensor([[tok]])], dim=1)
        logits, vcache = _advance(model, vcache, cur)
        p = _probs(logits[-(k + 1):], temperature)
        q = torch.stack(qs) if qs else p[:0]
        n_acc, nxt = verify_draft(p, q, torch.tensor(drafts, dtype=torch.long), greedy=greedy, generator=generator)
        new, stop = _eos_cut(drafts[:n_acc] + [nxt], eos)
        new = new[: max_new_tokens - stats.new_tokens]
        seq = torch.cat([seq, seq.new_tensor([new])], dim=1)
        stats.drafted += k
        stats.accepted += n_acc
        stats.rounds += 1
        stats.new_tokens += len(new)
        _crop(vcache, seq.shape[1] - 1)
        if dcache is not None:
            _crop(dcache, min(dcache.get_seq_length(), seq.shape[1] - 1))
        if stop:
            break
    stats.seconds = time.perf_counter() - start
    return seq, stats


@torch.inference_mode()
def autoregressive_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
) -> tuple[torch.Tensor, float]:
    """The reference: one token per forward with a KV cache; returns ``(ids [1, T + n], seconds)``."""
    _check(input_ids, max_new_tokens, temperature)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    seq, cache = input_ids, None
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        logits, cache = _advance(model, cache, seq)
        tok = _pick(_probs(logits[-1], temperature), not do_sample, generator)
        seq = torch.cat([seq, seq.new_tensor([[tok]])], dim=1)
        if tok in eos:
            break
    return seq, time.perf_counter() - start


# ------------------------------------------------------------------------------------ measurement


@dataclass
class SpecResult:
    """Speed of every (draft size, draft length) pair against dense decoding with a KV cache."""

    prompt_tokens: int
    new_tokens: int
    dense_seconds: float
    dense_tokens_per_s: float
    trials: list[dict] = field(default_factory=list)
    best: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def benchmark_speculative(
    switch: SubnetSwitch,
    input_ids: torch.Tensor,
    drafts: dict[float, KeepSet],
    draft_lengths: list[int],
    max_new_tokens: int = 64,
    *,
    repeats: int = 1,
    amplitudes: dict[float, dict] | None = None,
) -> SpecResult:
    """Greedy speculative decoding for every draft size and length vs dense greedy decoding.

    Each trial reports acceptance rate, tokens per verifier forward, wall time (median of
    ``repeats``), speedup over dense decoding, and whether its output equals dense greedy output
    token for token. ``best`` is the fastest trial whose output is identical.
    """
    if not drafts or not draft_lengths:
        raise ConfigError("give at least one draft size and one draft length")
    model = switch.model
    autoregressive_generate(model, input_ids, 2)  # warm-up (allocator, kernels)
    dense_runs = [autoregressive_generate(model, input_ids, max_new_tokens) for _ in range(repeats)]
    reference = dense_runs[0][0]
    dense_s = _median([s for _, s in dense_runs])
    n_new = reference.shape[1] - input_ids.shape[1]
    result = SpecResult(prompt_tokens=int(input_ids.shape[1]), new_tokens=int(n_new), dense_seconds=dense_s,
                        dense_tokens_per_s=n_new / dense_s)
    for size, keep in sorted(drafts.items()):
        amps = (amplitudes or {}).get(size)
        for k in draft_lengths:
            runs = [speculative_generate(switch, keep, input_ids, max_new_tokens, k, amplitudes=amps)
                    for _ in range(repeats)]
            out, stats = runs[0]
            secs = _median([st.seconds for _, st in runs])
            result.trials.append({
                "size": float(size), "draft_length": int(k), "draft_layers": len(keep.layers),
                "acceptance_rate": stats.acceptance_rate, "tokens_per_round": stats.tokens_per_round,
                "seconds": secs, "tokens_per_s": stats.new_tokens / secs, "speedup": dense_s / secs,
                "identical": bool(torch.equal(out, reference)),
            })
    ok = [t for t in result.trials if t["identical"]]
    result.best = max(ok, key=lambda t: t["speedup"]) if ok else None
    return result


def format_result(result: SpecResult) -> str:
    """A plain-text table of :func:`benchmark_speculative`'s trials, best marked with ``*``."""
    lines = [(f"dense greedy decoding: {result.new_tokens} tokens in {result.dense_seconds:.3f}s "
              f"({result.dense_tokens_per_s:.1f} tok/s)"),
             (f"{'size':>6} {'layers':>6} {'k':>3} {'accept':>7} {'tok/round':>9} {'tok/s':>8} {'speedup':>8} "
              f"{'same':>5}")]
    for t in result.trials:
        mark = "*" if t is result.best else " "
        lines.append(f"{t['size']:>6.2f} {t['draft_layers']:>6d} {t['draft_length']:>3d} {t['acceptance_rate']:>7.2f} "
                     f"{t['tokens_per_round']:>9.2f} {t['tokens_per_s']:>8.1f} {t['speedup']:>7.2f}x "
                     f"{'yes' if t['identical'] else 'NO':>5}{mark}")
    if result.best:
        b = result.best
        lines.append(f"best: size {b['size']:.2f}, draft length {b['draft_length']}: {b['speedup']:.2f}x")
        if b["speedup"] < 1:
            lines.append("no draft beats dense decoding here: its acceptance is too low (decode densely, or "
                         "draft with keep-sets of a run that trained its weights for longer: drafts must stay "
                         "within a few percent of dense perplexity)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ transformers


def shared_draft_model(switch: SubnetSwitch, draft: KeepSet,
                       amplitudes: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A draft for ``transformers``' assisted generation that shares every weight with ``switch.model``.

    ``model.generate(ids, assistant_model=shared_draft_model(sw, keep))`` works: the returned object
    is a shallow copy of the model (same submodules, same parameters, its own hooks and generation
    config) whose forward enters :meth:`SubnetSwitch.use` on the way in and leaves it on the way out,
    so while it runs the shared decoder holds only the kept layers (renumbered for its own cache).
    Greedy assisted generation with it equals plain greedy generation (tested). transformers drives
    the acceptance rule then; use :func:`speculative_generate` for this module's rule and statistics.
    """
    model = switch.model
    shallow = copy.copy(model)
    for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(model, name):
            setattr(shallow, name, collections.OrderedDict())
    if getattr(model, "generation_config", None) is not None:
        shallow.generation_config = copy.deepcopy(model.generation_config)
    active: list[contextlib.AbstractContextManager] = []

    def enter(module, args, kwargs):
        ctx = switch.use(draft, amplitudes)
        ctx.__enter__()
        active.append(ctx)

    def leave(module, args, kwargs, output):
        if active:
            active.pop().__exit__(None, None, None)

    shallow.register_forward_pre_hook(enter, with_kwargs=True)
    shallow.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return shallow
