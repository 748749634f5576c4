"""Figures for benchmarks/RESULTS.md "Identifiable scores" (issue 11), from finished run directories.

    OMP_NUM_THREADS=1 python benchmarks/identifiability.py RUN_DIR [RUN_DIR ...] [--json OUT]

Per run (reads only the run's small posterior files and metrics, never the model):

* ``score_sd``: sd across layers of the posterior-mean layer scores;
* ``offset_sd``: sd across layers of the posterior-mean latent part (score - anchor - level);
* ``anchor_sd``: sd across layers of the centred log anchor ``z_l`` (fixed data, not fitted);
* ``tau1_sd``: sd across layers of the layer thresholds at lambda = 1, the point-estimated part
  that depends on the layer (0 with shared curves);
* ``post_sd``: mean posterior sd of a layer score; ``guide_scale``: the guide's scales of the layer
  latents (min / mean / max) against ``guide.init_scale``;
* ``spearman_stay``: Spearman correlation between posterior-mean layer score and how long each
  layer stays as the size shrinks (the number of sizes 0.05, 0.10, ..., 0.95 whose keep-set keeps it);
* ``p_equal``: P(a posterior draw gives the reported keep-set) at sizes 0.25, 0.5, 0.75.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.bayes.posterior import Posterior


def _guide_scales(post: Posterior, site: str = "e_layers") -> list[float] | None:
    """The guide's sds of one site (mean-field), or of every latent (low-rank)."""
    from ppn_bayes.bayes.guides import guide_marginals

    auto = getattr(post.guide, "auto", None)
    if auto is None:
        return None
    scales = getattr(auto, "scales", None)
    if scales is not None:
        return getattr(scales, site).detach().flatten().tolist()
    return guide_marginals(post.guide)[1].tolist()


def measure(run_dir: Path, draws: int = 512) -> dict:
    post = Posterior.from_dir(run_dir)
    inv = post.inventory
    solver = KeepsetSolver(post, draws, seed=0)
    sc = solver.scores["layers"]  # [K, L]
    mean = sc.mean(0)
    z = post.prior.z_layers.double()
    level = float(post.prior.level.detach()[post.prior.kinds.index("layers")])
    sizes = [round(0.05 * i, 2) for i in range(1, 20)]
    stay = torch.zeros(inv.num_layers)
    p_equal = {}
    for s in sizes:
        r = solver.solve(size=s)
        for l in r.keep.layers:
            stay[l] += 1
        if s in (0.25, 0.5, 0.75):
            p_equal[str(s)] = r.p_equal
    tau1 = post.thresholds(1.0)["layers"].double()
    scales = _guide_scales(post)
    meta = json.loads((Path(run_dir) / "posterior.json").read_text())
    out = {
        "run": str(run_dir),
        "thresholds": "shared" if post.push.shared else "per_layer",
        "centre": bool(post.prior.config.centre),
        "score_sd": float(mean.std()), "score_range": [float(mean.min()), float(mean.max())],
        "offset_sd": float((mean - z - level).std()),
        "anchor_sd": float(z.std()),
        "tau1_sd": float(tau1.std()),
        "post_sd": float(sc.std(0).mean()),
        "guide_init_scale": meta["guide"].get("init_scale"),
        "guide_scale": None if scales is None else [min(scales), sum(scales) / len(scales), max(scales)],
        "spearman_stay": float(stats.spearmanr(mean.numpy(), stay.numpy()).statistic),
        "p_equal": p_equal,
    }
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        guide = [r["guide"] for r in recs if "guide" in r]
        if guide:
            out["guide_log_first_last"] = [guide[0], guide[-1]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = [measure(Path(r)) for r in args.runs]
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
