"""Speed and memory of dense vs resized models, each ratio next to its ideal from FLOPs.

For every size and batch size we time two phases with a KV cache, as generation runs them:

* **prefill**: one forward over a ``[B, P]`` prompt that keeps only the last position's logits
  (``logits_to_keep=1``, as ``generate`` does); throughput ``B * P / t``;
* **decode**: ``N`` greedy steps of one token each; throughput ``B * N / t``.

Each measurement is the median of ``repeats`` runs after ``warmup`` runs, with dense and resized
models interleaved within each repeat so that drift of a shared machine hits both alike. CUDA is
synchronized around every timed region and its peak memory read with ``max_memory_allocated``.

**The ideal ratio** is the speedup a perfectly efficient engine would get: dense FLOPs / resized
FLOPs for the same work, with FLOPs counted as

* decoder weight matmuls: :meth:`UnitInventory.kept_cost` ``(keep, "flops")`` per token (``2 * params``
  of every kept matrix; K/V charged once per kept KV head; norms/biases one FLOP per parameter);
* attention scores and weighted values: ``4 * head_dim * c`` per kept query head per token at context
  length ``c`` (``Q K^T`` and ``A V``), summed over the actual context lengths of the phase;
* the LM head: ``2 * hidden * vocab`` per *predicted* token (once per sequence in prefill, every step in
  decode); the embedding lookup is free (a gather).

Not counted: softmax, activations, norms' arithmetic, rotary embeddings, sampling, and all framework
overhead. The memory ideal is the ratio of parameter counts (embeddings + LM head + kept decoder).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.materialize import materialize
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.bayes.keepsets import keepset
from ppn_bayes.device import synchronize
from ppn_bayes.errors import ConfigError, OutputError, SizeError
from ppn_bayes.evaluation.speculative import cache_kwarg, output_cache
from ppn_bayes.files import atomic_write_bytes, check_no_overlap, check_writable
from ppn_bayes.training.rundir import open_run

# ------------------------------------------------------------------------------------ keep-sets


def layer_keepset_by_norm(model: nn.Module, size: float) -> tuple[KeepSet, UnitInventory]:
    """The ``round(size * L)`` layers with the largest weight norm (a layer-only keep-set, >= 1 layer).

    Needs no run, so ``ppn bench speed`` works on any supported model; it is a speed probe, not a
    quality claim (every layer costs the same, so its size in params is exactly ``k / L``).
    """
    if not 0 < size <= 1:
        raise SizeError(f"size {size} must be in (0, 1]")
    gated = GatedLM(model, kinds=("layers",))
    try:
        norms = gated.unit_norms()["layers"]
        inv = gated.inventory
    finally:
        gated.remove_hooks()
    k = max(1, round(size * inv.num_layers))
    top = sorted(torch.argsort(norms, descending=True)[:k].tolist())
    return inv.complete(KeepSet(layers=top)), inv


def run_keepsets(run: str | os.PathLike, sizes: list[float], quantile: float = 0.5
                 ) -> tuple[dict[float, KeepSet], UnitInventory]:
    """Keep-sets of a fitted run (:func:`ppn_bayes.bayes.keepsets.keepset` at each size)."""
    loaded = open_run(run)
    return {s: keepset(loaded.posterior, size=s, quantile=quantile).keep for s in sizes}, loaded.inventory


# ------------------------------------------------------------------------------------ FLOPs


def _attention_flops(inventory: UnitInventory, keep: KeepSet, contexts: range) -> float:
    heads = len(inventory.complete(keep).heads)
    return 4.0 * inventory.dims.head_dim * heads * float(sum(contexts))


def phase_flops(inventory: UnitInventory, keep: KeepSet, vocab: int, prompt_len: int, new_tokens: int
                ) -> dict[str, float]:
    """FLOPs of one sequence's prefill and decode phases for ``keep`` (see the module docstring)."""
    weights = inventory.kept_cost(keep, "flops")
    head = 2.0 * inventory.dims.hidden * vocab
    P, N = prompt_len, new_tokens
    return {
        "prefill": P * weights + _attention_flops(inventory, keep, range(1, P + 1)) + head,
        "decode": N * (weights + head) + _attention_flops(inventory, keep, range(P + 1, P + N + 1)),
    }


def ideal_ratios(inventory: UnitInventory, keep: KeepSet, vocab: int, prompt_len: int, new_tokens: int
                 ) -> dict[str, float]:
    """Ideal speedups (dense FLOPs / kept FLOPs) per phase and the ideal parameter ratio."""
    dense = phase_flops(inventory, inventory.full_keepset(), vocab, prompt_len, new_tokens)
    kept = phase_flops(inventory, keep, vocab, prompt_len, new_tokens)
    emb = inventory.embedding_params
    return {
        "prefill": dense["prefill"] / kept["prefill"],
        "decode": dense["decode"] / kept["decode"],
        "params": (emb + inventory.kept_cost(keep)) / (emb + inventory.total_cost()),
    }


# ------------------------------------------------------------------------------------ timing


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():  # shared Parameter objects come once; tied copies share a data pointer
        ptr = p.data_ptr()
        if ptr == 0 or ptr not in seen:  # 0: no storage (the meta device), never tied
            seen.add(ptr)
            total += p.numel() * p.element_size()
    return total


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def time_generation(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """One prefill and ``new_tokens`` greedy decode steps with a KV cache: seconds of each, cache bytes."""

    device = prompt.device
    kw = cache_kwarg(model)
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    cache = output_cache(out)
    for _ in range(new_tokens):
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        cache = output_cache(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "kv_cache_bytes": _cache_bytes(cache)}


@dataclass
class Candidate:
    """One model under test: the dense model (size 1.0) or a resized one."""

    size: float
    keep: KeepSet
    model: nn.Module


def _measure_batch(cands: list[Candidate], batch: int, prompt_len: int, new_tokens: int, vocab: int,
                   device: torch.device, repeats: int, warmup: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    samples: dict[int, list[dict]] = {i: [] for i in range(len(cands))}
    peaks: dict[int, int | None] = {}
    for rep in range(warmup + repeats):
        for i, c in enumerate(cands):
            if device.type == "cuda":
                # Every candidate is resident at once, so the allocator's peak is mostly the others'
                # weights: count what this run adds over what was allocated before it, plus this
                # model's own weights (the peak of a process that holds this model alone).
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            r = time_generation(c.model, prompt, new_tokens)
            if device.type == "cuda":
                extra = int(torch.cuda.max_memory_allocated(device)) - resident
                peaks[i] = max(peaks.get(i) or 0, extra + param_bytes(c.model))
            if rep >= warmup:
                samples[i].append(r)
    rows = []
    for i, c in enumerate(cands):
        pre = statistics.median(s["prefill_s"] for s in samples[i])
        dec = statistics.median(s["decode_s"] for s in samples[i])
        rows.append({
            "size": c.size, "batch": batch, "layers": len(c.keep.layers),
            "prefill_s": pre, "decode_s": dec,
            "prefill_tokens_per_s": batch * prompt_len / pre, "decode_tokens_per_s": batch * new_tokens / dec,
            "param_bytes": param_bytes(c.model), "kv_cache_bytes": samples[i][-1]["kv_cache_bytes"],
            "peak_bytes": peaks.get(i),
        })
    return rows


def speed_benchmark(
    model: nn.Module,
    keepsets: dict[float, KeepSet],
    inventory: UnitInventory,
    *,
    batch_sizes: list[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time dense vs resized (materialized) models; returns rows with measured and ideal ratios.

    ``keepsets`` maps a size label to a keep-set (a size of 1.0 or a full keep-set is the dense model
    itself). The resized models are built in memory with
    :func:`~ppn_bayes.backbone.materialize.materialize` (the same tensors :func:`ppn_bayes.export.resize.resize`
    writes), so their speed is what a standard ``transformers`` load of the export would give.
    """

    if min(batch_sizes) < 1 or prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("batch sizes, prompt length, new tokens and repeats must be >= 1 (warmup >= 0)")
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config().vocab_size)
    full = inventory.full_keepset()
    cands = [Candidate(1.0, full, model)]
    for size, keep in sorted(keepsets.items(), reverse=True):
        keep = inventory.complete(keep)
        if keep != full:
            cands.append(Candidate(float(size), keep, materialize(model, keep, inventory).eval()))
    rows = []
    for b in batch_sizes:
        measured = _measure_batch(cands, b, prompt_len, new_tokens, vocab, device, repeats, warmup, seed)
        dense = measured[0]
        for c, r in zip(cands, measured):
            ideal = ideal_ratios(inventory, c.keep, vocab, prompt_len, new_tokens)
            r.update({
                "size_params": inventory.size_of(c.keep, "params"),
                "size_flops": inventory.size_of(c.keep, "flops"),
                "prefill_speedup": r["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
                "decode_speedup": r["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                "prefill_ideal": ideal["prefill"], "decode_ideal": ideal["decode"],
                "memory_ratio": r["param_bytes"] / dense["param_bytes"], "memory_ideal": ideal["params"],
                "peak_ratio": (r["peak_bytes"] / dense["peak_bytes"]) if r["peak_bytes"] else None,
            })
            rows.append(r)
    return {
        "device": device_name(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
        "ideal_includes": "decoder weight matmuls (inventory kept_cost flops) + attention scores "
                          "(4*head_dim*context per kept head per token) + LM head (2*hidden*vocab per predicted "
                          "token); excludes softmax, activations, norms, rotary and framework overhead",
        "rows": rows,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(device)}"
    return f"CPU, {torch.get_num_threads()} threads"


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: each measured ratio next to its ideal."""
    lines = [(f"device: {result['device']}  dtype: {result['dtype']}  prompt {result['prompt_len']} tokens, "
              f"{result['new_tokens']} new tokens, median of {result['repeats']}"),
             (f"{'size':>5} {'batch':>5} {'layers':>6} | {'prefill tok/s':>13} {'speedup':>7} {'ideal':>6} | "
              f"{'decode tok/s':>12} {'speedup':>7} {'ideal':>6} | {'memory':>6} {'ideal':>6}")]
    for r in result["rows"]:
        lines.append(
            f"{r['size']:>5.2f} {r['batch']:>5d} {r['layers']:>6d} | {r['prefill_tokens_per_s']:>13.1f} "
            f"{r['prefill_speedup']:>6.2f}x {r['prefill_ideal']:>5.2f}x | {r['decode_tokens_per_s']:>12.1f} "
            f"{r['decode_speedup']:>6.2f}x {r['decode_ideal']:>5.2f}x | {r['memory_ratio']:>6.2f} "
            f"{r['memory_ideal']:>6.2f}")
    lines.append("ideal = dense FLOPs / resized FLOPs: " + result["ideal_includes"])
    lines.append("memory = parameter bytes of the resized model / dense (ideal: parameter counts)")
    return "\n".join(lines)


def plot_speed(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Measured vs ideal speedup against size, one line per phase and batch size (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for b in sorted({r["batch"] for r in result["rows"]}):
            rows = sorted((r for r in result["rows"] if r["batch"] == b), key=lambda r: r["size_params"])
            xs = [r["size_params"] for r in rows]
            ax.plot(xs, [r[f"{phase}_speedup"] for r in rows], "o-", label=f"measured, batch {b}")
            ax.plot(xs, [r[f"{phase}_ideal"] for r in rows], "--", color="gray",
                    label="ideal (FLOPs)" if b == min(r["batch"] for r in result["rows"]) else None)
        ax.set_title(f"{phase} ({result['device']})")
        ax.set_xlabel("kept decoder parameters (fraction)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over dense")
    axes[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def check_plot_path(path: str | os.PathLike, inputs: list[tuple[str, Any]]) -> None:
    """Before the model loads: ``--plot`` names a writable file that is none of the inputs nor inside one."""

    check_writable(path, "--plot")
    if Path(path).is_dir():
        raise OutputError(f"--plot {path} is a directory; pass a file name such as speed.png")
    check_no_overlap(path, inputs, flag="--plot")


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a result atomically (:func:`ppn_bayes.files.atomic_write_bytes`)."""
    atomic_write_bytes(Path(path), json.dumps(result, indent=2).encode())


def keepsets_for(model: nn.Module, sizes: list[float], run: str | os.PathLike | None = None,
                 quantile: float = 0.5) -> tuple[dict[float, KeepSet], UnitInventory]:
    """Keep-sets per size: from a run when given, else layer keep-sets by weight norm."""
    if run is not None:
        return run_keepsets(run, sizes, quantile)
    out, inv = {}, None
    for s in sizes:
        out[s], inv = layer_keepset_by_norm(model, s)
    return out, inv
