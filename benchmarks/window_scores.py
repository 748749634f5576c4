"""Is the averaging window stationary *in the decision quantities*? (benchmarks/RESULTS.md, issue 11 item 3)

    OMP_NUM_THREADS=1 python benchmarks/window_scores.py RUN_DIR [RUN_DIR ...] [--draws 512] [--json OUT]

A run that averages its last N guide iterates (``train.guide_average_steps``) checks the window on
the guide's raw parameters: the unconstrained means and log-sds of every latent site
(``ppn_bayes.bayes.diagnostics.window_stationarity``). Some of those latents sit on a ridge the
gates cannot see (the horseshoe's global and local scales trade off against the offsets), so a
drifting raw window need not mean the keep-sets drift. This script asks the question on the scores
the keep-sets are made of: it rebuilds q at every iterate of the window from the checkpoint's trace
(``average.loc_trace``, ``average.log_sd_trace``), draws ``--draws`` posterior layer scores from each
with common random numbers (the same seed, so two iterates differ only by their parameters), and
runs the same check on the per-layer score means and log-sds, against the sds of the posterior the
run exports. Also per latent site, the raw window's worst R-hat.

Reads the run's small posterior files and checkpoint only (mean-field guides; never the model).
Written by hand: no library rebuilds an autoguide from a stored trace of its parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppn_bayes.bayes.diagnostics import window_stationarity
from ppn_bayes.bayes.guides import guide_marginals, set_marginal_sds
from ppn_bayes.bayes.posterior import Posterior
from ppn_bayes.training.checkpoint_files import find_checkpoint, load_checkpoint


def _sites(auto) -> list[tuple[str, int]]:
    """(site name, size) in guide_marginals' flat order."""
    return [(n, getattr(auto.locs, n).numel()) for n, _ in auto.prototype_trace.iter_stochastic_nodes()]


@torch.no_grad()
def _set_locs(auto, loc: torch.Tensor) -> None:
    start = 0
    for name, n in _sites(auto):
        p = getattr(auto.locs, name)
        p.copy_(loc[start:start + n].reshape(p.shape).to(p.dtype))
        start += n


def _layer_scores(post: Posterior, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = post.draws(draws, seed=seed)["layers"].double()
    return d.mean(0), d.std(0)


def window_in_scores(run_dir: Path, draws: int = 512, seed: int = 0) -> dict:
    post = Posterior.from_dir(run_dir)
    auto = getattr(post.guide, "auto", None)
    if auto is None or not hasattr(auto, "locs"):
        raise SystemExit(f"{run_dir}: only mean-field guides are rebuilt here")
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no checkpoint (the window's trace lives there)")
    t = load_checkpoint(ckpt)["tensors"]
    if "average.loc_trace" not in t:
        raise SystemExit(f"{run_dir}: the run did not average its guide (train.guide_average_steps)")
    rows = min(int(t["average.count"][0]), t["average.loc_trace"].shape[0])
    loc_tr, lsd_tr = t["average.loc_trace"][:rows], t["average.log_sd_trace"][:rows]
    exported_sd = guide_marginals(post.guide)[1]
    _, sd_exported = _layer_scores(post, draws, seed)
    raw = window_stationarity(loc_tr, lsd_tr, exported_sd.double())
    per_site, start = {}, 0
    for name, n in _sites(auto):
        sl = slice(start, start + n)
        r = window_stationarity(loc_tr[:, sl], lsd_tr[:, sl], exported_sd.double()[sl])
        per_site[name] = None if r is None else {k: r[k] for k in ("rhat", "drift", "mcse_rel")}
        start += n
    means, sds = [], []
    for i in range(rows):
        _set_locs(auto, loc_tr[i].float())
        set_marginal_sds(post.guide, lsd_tr[i].exp().float())
        m, s = _layer_scores(post, draws, seed)
        means.append(m)
        sds.append(s)
    mean_tr, sd_tr = torch.stack(means), torch.stack(sds)
    scores = window_stationarity(mean_tr, sd_tr.clamp_min(1e-30).log(), sd_exported)
    return {"run": str(run_dir), "iterates": rows, "draws": draws, "raw": raw, "per_site": per_site,
            "scores": scores, "score_mean_spread": float(mean_tr[-1].std()),
            "score_sd_exported_mean": float(sd_exported.mean()), "score_sd_iterate_mean": float(sd_tr.mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--draws", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = [window_in_scores(r, a.draws, a.seed) for r in a.runs]
    for o in out:
        raw, sc = o["raw"] or {}, o["scores"] or {}
        print(f"{o['run']}: {o['iterates']} iterates | raw R-hat {raw.get('rhat', float('nan')):.2f}, drift "
              f"{raw.get('drift', float('nan')):.2f} sd, MCSE {raw.get('mcse_rel', float('nan')):.2f} sd | scores "
              f"R-hat {sc.get('rhat', float('nan')):.2f}, drift {sc.get('drift', float('nan')):.2f} sd, MCSE "
              f"{sc.get('mcse_rel', float('nan')):.2f} sd | score-mean spread {o['score_mean_spread']:.3f}, "
              f"mean score sd {o['score_sd_exported_mean']:.3f}")
        for name, r in o["per_site"].items():
            if r is not None:
                print(f"    {name}: R-hat {r['rhat']:.2f}, drift {r['drift']:.2f} sd, MCSE {r['mcse_rel']:.2f} sd")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
