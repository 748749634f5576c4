"""Risk aversion of issue 12 (item 5): does ``--quantile 0.1`` trade expected loss for a narrower band?

    # one run, or the refits of benchmarks/calibration_refits.py (the band over refits needs >= 2)
    OMP_NUM_THREADS=1 python benchmarks/quantile_hedge.py benchmarks/calibration_refits/runs/refit-* \\
        --out benchmarks/quantile_hedge
    # options: --sizes 0.25,0.5,0.75 --quantiles 0.5,0.1 --samples 8 --blocks 8 --split validation
    # smoke test: fits two tiny random Llama runs into OUT/runs/ first (seconds)
    python benchmarks/quantile_hedge.py --tiny --out /tmp/hedge

Per run, size and quantile ``q``: the keep-set ``K_q`` (units ranked by the ``q``-quantile of their exit
price, :class:`ppn_bayes.bayes.keepsets.KeepsetSolver`) and its held-out NLL (hard masks with amplitude
corrections at lambda*, :func:`ppn_bayes.analysis.uncertainty.keepset_nll`, on the run's first ``--blocks``
blocks of ``--split``). Two spreads:

* **over sub-network draws** (within a run): the held-out NLL of ``--samples`` sub-networks drawn from
  the posterior at the same size (each draw's own keep-set, :meth:`KeepsetResult.sampled_keepsets`):
  mean and 5-95 % band, the posterior predictive of "the loss at this size". The draws do not
  depend on ``q`` (the quantile only chooses the reported set), so the band is shared, and each
  ``K_q`` is placed in it: ``rank`` = share of sampled sub-networks with a lower NLL than ``K_q``;
* **over refits** (runs given): mean, sd and 5-95 % band of ``NLL(K_q)`` across the runs: the spread a
  user meets by fitting again. Hedging works when the ``q = 0.1`` band is narrower than the median's
  at a small cost in mean. ``runs_differing``: runs whose ``K_q`` is not the first quantile's set.

Written to ``OUT/quantile_hedge.json``; a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.calibration_refits import keep_row, parse_sizes, refit, tiny_setup
from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.files import atomic_write_bytes

SIZES = (0.25, 0.5, 0.75)
QUANTILES = (0.5, 0.1)


def band(values: list[float]) -> dict[str, float]:
    """Mean, sd and the 5 / 50 / 95 % quantiles (linear interpolation) of a list of NLLs."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"n": len(values), "mean": float(t.mean()), "sd": float(t.std()) if len(values) > 1 else float("nan"),
            "q05": q[0], "q50": q[1], "q95": q[2], "width": q[2] - q[0]}


def measure_run(run_dir: Path, sizes=SIZES, quantiles=QUANTILES, samples: int = 8, blocks: int | None = None,
                split: str = "validation", draws: int = 256, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    from ppn_bayes.analysis.uncertainty import keepset_nll, run_test_blocks
    from ppn_bayes.run import load_run

    run = load_run(run_dir)
    solver = KeepsetSolver(run.posterior, max(draws, samples), seed)
    gated = run.load_model(device)
    ids = run_test_blocks(run, blocks or run.recipe.data.val_blocks, split=split)
    out: dict[str, Any] = {"run": str(run_dir), "blocks": int(ids.shape[0]), "split": split, "sizes": {}}
    for s in sizes:
        per: dict[str, Any] = {}
        sampled = None
        for q in quantiles:
            res = solver.solve(size=s, quantile=q)
            if sampled is None:  # the draws' own keep-sets: the same for every quantile
                sampled = [keepset_nll(gated, solver.posterior, k, res.lam, ids) for k in res.sampled_keepsets(samples)]
            nll = keepset_nll(gated, solver.posterior, res.keep, res.lam, ids)
            per[str(q)] = {"nll": nll, "ppl": math.exp(nll), "lambda": res.lam, "p_equal": res.p_equal,
                           "achieved_size": res.achieved_size, "rank": sum(v < nll for v in sampled) / len(sampled),
                           "keep": keep_row(solver.table, res.keep).nonzero().flatten().tolist()}
        out["sizes"][str(s)] = {"sampled": band(sampled), "sampled_nll": sampled, "quantiles": per}
    return out


def summarize(runs: list[dict[str, Any]], sizes, quantiles) -> dict[str, Any]:
    """Per size and quantile: NLL of ``K_q`` over the refits and the mean within-run sampled band."""
    out = {}
    for s in sizes:
        row = {}
        for q in quantiles:
            vals = [r["sizes"][str(s)]["quantiles"][str(q)]["nll"] for r in runs]
            first = str(quantiles[0])
            row[str(q)] = {"over_refits": band(vals),
                           "rank_mean": sum(r["sizes"][str(s)]["quantiles"][str(q)]["rank"] for r in runs) / len(runs),
                           "runs_differing": sum(r["sizes"][str(s)]["quantiles"][str(q)]["keep"]
                                                 != r["sizes"][str(s)]["quantiles"][first]["keep"] for r in runs)}
        sb = [r["sizes"][str(s)]["sampled"] for r in runs]
        row["sampled_mean"] = {k: sum(b[k] for b in sb) / len(sb) for k in ("mean", "q05", "q95", "width")}
        out[str(s)] = row
    return out


def table_text(res: dict[str, Any]) -> str:
    lines = [(f"{'size':>5} {'q':>4} {'runs':>4} {'NLL mean':>9} {'5 %':>8} {'95 %':>8} {'sd':>7}  "
              f"{'draws: mean [5, 95 %]':>28} {'rank':>5} {'differs':>7}")]
    for s, row in res["summary"].items():
        sm = row["sampled_mean"]
        for q in res["quantiles"]:
            b, rank = row[str(q)]["over_refits"], row[str(q)]["rank_mean"]
            lines.append(f"{s:>5} {q:>4} {b['n']:>4} {b['mean']:9.4f} {b['q05']:8.4f} {b['q95']:8.4f} {b['sd']:7.4f}  "
                         f"{sm['mean']:9.4f} [{sm['q05']:.4f}, {sm['q95']:.4f}] {rank:5.2f} {row[str(q)]['runs_differing']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="finished run directories (one, or refits)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--quantiles", default=",".join(map(str, QUANTILES)))
    ap.add_argument("--samples", type=int, default=8, help="sampled sub-networks per run and size (default 8)")
    ap.add_argument("--blocks", type=int, default=None, help="held-out blocks (default: the recipe's data.val_blocks)")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="smoke test: fit two tiny random Llama runs first (seconds)")
    a = ap.parse_args(argv)
    if a.tiny:
        tiny = tiny_setup(a.out)
        a.runs = [refit(a.out, r, None, [], 0, tiny) for r in range(2)]
    if not a.runs:
        ap.error("give one or more run directories, or --tiny")
    sizes = parse_sizes(a.sizes)
    quantiles = tuple(float(q) for q in a.quantiles.split(",") if q.strip())
    t0 = time.time()
    runs = [measure_run(d, sizes, quantiles, a.samples, a.blocks, a.split, a.draws, device=a.device) for d in a.runs]
    res = {"quantiles": list(quantiles), "samples": a.samples, "runs": runs,
           "summary": summarize(runs, sizes, quantiles), "seconds": time.time() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "quantile_hedge.json"
    atomic_write_bytes(path, json.dumps(res, indent=1).encode())
    print(table_text(res))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
