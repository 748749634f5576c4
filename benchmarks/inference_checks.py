"""Figures for benchmarks/RESULTS.md "## Inference checks": recovery, SVI vs NUTS, PSIS k-hat.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/inference_checks.py [--quick]``.
Writes ``benchmarks/inference_checks.json`` and prints the numbers. CPU only; tiny synthetic
networks (tests/synthetic.py): the figures check the inference, not a model's quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.bayes.nuts_check import fit_svi, layer_score_draws, nuts_check
from ppn_bayes.bayes.psis import psis_khat
from ppn_bayes.config import PriorConfig, PushConfig
from ppn_bayes.files import atomic_write_bytes
from tests.synthetic import NUTS_CHECK, RECOVERY, sample_sequences, synthetic_stack


def recovery(steps: int) -> dict:
    w, targets = RECOVERY
    hf = synthetic_stack(w, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    ids, held = sample_sequences(hf, 8, 24, seed=1), sample_sequences(hf, 8, 24, seed=2)
    out = {}
    for kind in ("horseshoe", "normal"):
        model = PPNModel(g, PriorConfig(kind=kind), PushConfig(amplitude=False), num_sequences=8, tokens_per_sequence=24)
        model.set_generator(torch.Generator().manual_seed(0))
        t0 = time.time()
        guide = fit_svi(model, (ids,), {}, steps=steps, lr=0.05, seed=0, num_particles=1)
        secs = time.time() - t0
        sc = layer_score_draws(model, guide=guide, num_samples=2000)
        top3 = sc.argsort(1, descending=True)[:, :3].sort(1).values
        tau = model.push.thresholds(0.5)["layers"].detach()
        truth = torch.tensor([True, False, True, False, True, False])
        out[kind] = {
            "svi_seconds": round(secs, 1), "steps": steps,
            "score_mean": [round(v, 3) for v in sc.mean(0).tolist()],
            "score_sd": [round(v, 3) for v in sc.std(0).tolist()],
            "kendall_vs_importance": float(stats.kendalltau(sc.mean(0), w).statistic),
            "kendall_norms_vs_importance": float(stats.kendalltau(model.prior.z_layers, w).statistic),
            "p_top3_is_true": float((top3 == torch.tensor([0, 2, 4])).all(1).float().mean()),
            "p_keepset_at_lam_0.5_is_true": float(((sc > tau) == truth).all(1).float().mean()),
            "psis_heldout_lam_0.5": {k: v for k, v in psis_khat(model, guide, held, lam=0.5, num_particles=500).items()},
        }
    return out


def nuts_vs_svi(warmup: int, samples: int, chains: int) -> dict:
    w, targets = NUTS_CHECK
    hf = synthetic_stack(w, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    ids = sample_sequences(hf, 4, 16, seed=1)
    out = {}
    for kind in ("normal", "horseshoe"):
        t0 = time.time()
        res = nuts_check(g, ids, lam=0.5, prior=PriorConfig(kind=kind, global_scale=1.0), num_warmup=warmup,
                         num_samples=samples, chains=chains, svi_steps=600, seed=0)
        cmp = res["scores"]
        out[kind] = {"seconds": round(time.time() - t0, 1), "sites": res["sites"], "divergences": res["divergences"],
                     **{k: cmp[k] for k in ("nuts_mean", "nuts_sd", "svi_mean", "svi_sd", "spearman", "kendall",
                                            "max_abs_diff", "max_diff_in_nuts_sd", "sd_ratio")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer NUTS draws (a smoke run)")
    ap.add_argument("--only", choices=["recovery", "nuts"], help="run one of the two parts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = 50 if args.quick else 200
    path = ROOT / "benchmarks" / "inference_checks.json"
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    parts = {"recovery": lambda: recovery(400), "nuts_vs_svi": lambda: nuts_vs_svi(n, n, 2)}
    for name, run in parts.items():
        if args.only and not name.startswith(args.only):
            continue
        result[name] = run()
        atomic_write_bytes(path, json.dumps(result, indent=2, default=float).encode())  # after each part
        print(json.dumps({name: result[name]}, indent=2, default=float), flush=True)


if __name__ == "__main__":
    main()
