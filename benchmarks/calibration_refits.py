"""Refit check of issue 12: do a run's inclusion probabilities forecast what another fit keeps?

    # R fits of the demo recipe (each ~2-3 min on quiet CPU cores), then the analysis:
    OMP_NUM_THREADS=1 python benchmarks/calibration_refits.py --refits 5 --out benchmarks/calibration_refits
    # other recipes / keys: --recipe inference/smollm2-full.yaml --set train.tempering=0.01
    # in the background, then re-analyse whenever (finished refits are reused, a broken one resumed):
    nohup python benchmarks/calibration_refits.py --refits 10 --out OUT > OUT.log 2>&1 &
    python benchmarks/calibration_refits.py --runs OUT/runs/refit-* --out OUT   # unfinished ones are skipped
    # smoke test: a tiny random Llama on a tiny corpus (seconds; what tests/ runs)
    python benchmarks/calibration_refits.py --tiny --refits 3 --out /tmp/refits

**Refits.** Refit ``r`` (``r = 0 .. R-1``) is the recipe with ``train.seed = seed + r`` and
``data.bootstrap_seed = seed + r``: its train split is a bootstrap resample of the chapters (or
documents, ``--set data.bootstrap_unit=documents``), drawn with replacement before blocks are packed
(``ppn_bayes/data/corpus.py``), so the refits differ as the data and the optimizer could have. Each is an
ordinary run directory ``OUT/runs/refit-r``. ``--vary seed`` keeps the split and varies ``train.seed``
alone (optimizer noise: initial draws, prices, masks, block order); ``--vary data`` keeps
``train.seed = seed`` and varies the bootstrap alone (what a posterior given the data should forecast);
comparing the two tells how much of the refits' disagreement is the data's.

**The check**, at every size (default 0.25, 0.5, 0.75) and for every gated unit ``u``: run ``r``
reports an inclusion probability ``pi_r(u)`` (the share of its posterior draws whose own keep-set,
same rule and budget, keeps ``u``: :class:`ppn_bayes.bayes.keepsets.KeepsetSolver`) and a keep-set ``K_r``.
``pi_r(u)`` is read as a forecast of whether *another* refit keeps ``u``: every ordered pair
``r != r'`` gives the forecast ``pi_r(u)`` and the outcome ``1[u in K_r']``. Scored
(:mod:`ppn_bayes.analysis.calibration_checks`):

* ``mean_abs_gap``: mean over ``r, u`` of ``|pi_r(u) - f_-r(u)|``, ``f_-r`` the keep frequency over
  the other refits (leave-one-out, so a run does not forecast itself);
* Brier score of the pair forecasts against the uninformed forecast (every unit at run ``r``'s kept
  fraction of units of its kind), Brier skill, ECE (10 equal-width bins), the reliability curve, and
  the share of confident forecasts (pi < 0.05 or > 0.95) contradicted;
* ``jaccard``: mean pairwise Jaccard overlap of the refits' keep-sets; ``disputed``: units kept by
  some refits and dropped by others; ``p_equal``: each run's P(draw = keep-set).

Issue 12's goal at the demo's scale: positive Brier skill and ECE <= 0.1. Written to
``OUT/calibration_refits.json`` and ``OUT/calibration_refits.png`` (+ ``.svg``: the reliability curve
per size), and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppn_bayes.analysis import calibration_checks as cc
from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.bayes.posterior import Posterior
from ppn_bayes.bayes.unit_table import KIND_ORDER, UnitTable
from ppn_bayes.files import atomic_write_bytes

DEMO = ROOT / "inference" / "smollm2-demo.yaml"
SIZES = (0.25, 0.5, 0.75)


# ------------------------------------------------------------------------------------------- tiny setup


def tiny_setup(root: Path) -> dict[str, Any]:
    """A tiny random 4-layer Llama (GQA 4/2 heads) and a tiny chaptered corpus under ``root``, and a
    recipe mapping that fits it in seconds (layers, heads and channel groups of 16 gated). Shared with
    ``calibration_swaps.py`` and ``quantile_hedge.py``; built once per ``root``."""
    from ppn_bayes.data.corpus import chapters, load_corpus, train_bpe_tokenizer

    root = Path(root)
    base, corpus = root / "tiny-base", root / "tiny-corpus"
    if not (base / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        novel = load_corpus("bundled", "validation")[0]
        chs = chapters(novel)
        corpus.mkdir(parents=True, exist_ok=True)
        for split, part in (("train", chs[:12]), ("validation", chs[12:14]), ("test", chs[14:16])):
            text = "\n\n".join(c[:1500] for c in part)
            (corpus / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        tok = train_bpe_tokenizer(novel[:60_000], vocab_size=320)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        tmp = root / ".tiny-base.tmp"
        LlamaForCausalLM(cfg).eval().save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(base)
    return {"name": "tiny-refit", "model": {"name": str(base)}, "units": {"group_size": 16, "anchor_blocks": 2},
            "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 4},
            "train": {"steps": 2, "guide_steps": 1, "batch_size": 2, "checkpoint_every": 5, "log_every": 1,
                      "weights": "frozen", "eval_lambdas": [0.5], "device": "cpu"}}


def parse_sizes(text: str) -> tuple[float, ...]:
    """``--sizes 0.25,0.5``: fractions in (0, 1], checked before anything is fitted (one-line exit)."""
    try:
        sizes = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"error: --sizes takes comma-separated fractions such as 0.25,0.5,0.75, got {text!r}") from None
    if not sizes or not all(0 < s <= 1 for s in sizes):
        raise SystemExit(f"error: --sizes {text!r}: give fractions in (0, 1] such as 0.25,0.5,0.75")
    return sizes


# ---------------------------------------------------------------------------------------------- refits


VARY = ("both", "seed", "data")


def refit_keys(r: int, seed: int = 0, vary: str = "both") -> list[str]:
    """The overrides that make refit ``r``: ``train.seed`` and ``data.bootstrap_seed`` both ``seed + r``
    (``both``), or one of them moving while the other stays (``seed``: the original split; ``data``:
    ``train.seed = seed``)."""
    if vary not in VARY:
        raise ValueError(f"vary must be one of {VARY}, got {vary!r}")
    train_seed = seed if vary == "data" else seed + r
    boot = "null" if vary == "seed" else str(seed + r)
    return [f"train.seed={train_seed}", f"data.bootstrap_seed={boot}"]


def refit(out: Path, r: int, recipe: str | Path | None, overrides: list[str], seed: int = 0,
          tiny: dict | None = None, vary: str = "both") -> Path:
    """Fit refit ``r`` into ``out/runs/refit-r`` (module docstring); a finished one is reused, an
    unfinished one resumed."""
    from ppn_bayes.config import apply_overrides, load_recipe, recipe_from_dict
    from ppn_bayes.run import fit
    from ppn_bayes.training.rundir import MANIFEST, read_json

    run_dir = out / "runs" / f"refit-{r}"
    if (run_dir / MANIFEST).is_file() and read_json(run_dir / MANIFEST).get("status") == "finished":
        return run_dir
    mine = [*overrides, *refit_keys(r, seed, vary)]
    rec = recipe_from_dict(apply_overrides(tiny, mine)) if tiny is not None else load_recipe(recipe or DEMO, mine)
    resume = (run_dir / MANIFEST).is_file()
    fit(rec, out=run_dir, resume=resume, progress=False)
    return run_dir


def finished(run_dirs: list[Path]) -> list[Path]:
    """The finished runs among ``run_dirs``; the others (a campaign still running in the background, a
    failed refit) are named on stderr and left out, so a campaign can be re-analysed at any time."""
    from ppn_bayes.training.rundir import MANIFEST, read_json

    out = []
    for d in run_dirs:
        status = read_json(d / MANIFEST).get("status") if (d / MANIFEST).is_file() else "no manifest.json"
        if status == "finished":
            out.append(d)
        else:
            print(f"skipping {d}: {status}", file=sys.stderr)
    return out


# -------------------------------------------------------------------------------------------- analysis


def keep_row(table: UnitTable, keep) -> torch.Tensor:
    """A :class:`KeepSet` as a ``[N]`` boolean row in the table's canonical order."""
    members = {("layers", (l,)) for l in keep.layers} | {("heads", tuple(h)) for h in keep.heads} | {
        ("groups", tuple(g)) for g in keep.groups}
    row = torch.zeros(table.size, dtype=torch.bool)
    for u in range(table.size):
        kind = KIND_ORDER[int(table.kind_id[u])]
        key = (int(table.layer[u]),) if kind == "layers" else (int(table.layer[u]), int(table.index[u]))
        row[u] = (kind, key) in members
    return row


def kind_fraction(table: UnitTable, row: torch.Tensor) -> torch.Tensor:
    """``[N]``: every unit at the kept fraction of the units of its kind (the uninformed forecast)."""
    out = torch.empty(table.size, dtype=torch.float64)
    for k in table.kind_id.unique():
        m = table.kind_id == k
        out[m] = row[m].double().mean()
    return out


def pair_forecasts(pi: torch.Tensor, keep: torch.Tensor, base: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forecasts, outcomes and uninformed forecasts of every ordered pair of runs ``r != r'``:
    ``pi_r(u)`` against ``1[u in K_r']``, and ``base_r(u)``; each ``[R (R - 1) N]``."""
    R = pi.shape[0]
    if R < 2:
        raise ValueError("the refit check needs at least two runs")
    pairs = [(r, s) for r in range(R) for s in range(R) if r != s]
    return (torch.cat([pi[r] for r, _ in pairs]), torch.cat([keep[s].double() for _, s in pairs]),
            torch.cat([base[r] for r, _ in pairs]))


def refit_forecasts(pi: torch.Tensor, keep: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    """The check at one size from ``pi``, ``keep`` (``[R, N]``: each run's inclusion probabilities and
    keep-set) and ``base`` (``[R, N]`` uninformed forecasts): every statistic of the module docstring."""
    R = pi.shape[0]
    p, y, b = pair_forecasts(pi, keep, base)
    k = keep.double()
    loo = (k.sum(0, keepdim=True) - k) / (R - 1)  # [R, N] keep frequency over the other refits
    freq = k.mean(0)
    return {"runs": R, "units": int(pi.shape[1]), "mean_abs_gap": float((pi - loo).abs().mean()),
            **cc.score_forecasts(p, y, b), "jaccard": cc.mean_pairwise_jaccard(list(keep)),
            "disputed": int(((freq > 0) & (freq < 1)).sum()), "kept_by_all": int((freq == 1).sum()),
            "keep_frequency": freq.tolist()}


def analyse(run_dirs: list[Path], sizes=SIZES, draws: int = 256, seed: int = 0, quantile: float = 0.5
            ) -> dict[str, Any]:
    """The refit check over finished run directories (every one must gate the same units)."""
    if len(run_dirs) < 2:
        raise SystemExit("error: the refit check needs at least two runs; pass more --runs or a larger --refits")
    per: dict[float, dict[str, list]] = {s: {"pi": [], "keep": [], "base": [], "p_equal": []} for s in sizes}
    table0 = None
    for d in run_dirs:
        solver = KeepsetSolver(Posterior.from_dir(d), draws, seed)
        table = solver.table
        if table0 is None:
            table0 = table
        elif table.size != table0.size or table.kinds != table0.kinds:
            raise SystemExit(f"error: {d} gates other units ({table.size} {table.kinds}) than {run_dirs[0]} "
                             f"({table0.size} {table0.kinds}); refits must share the recipe's units")
        for s in sizes:
            res = solver.solve(size=s, quantile=quantile)
            row = keep_row(table, res.keep)
            per[s]["pi"].append(table.flatten(res.inclusion).double())
            per[s]["keep"].append(row)
            per[s]["base"].append(kind_fraction(table, row))
            per[s]["p_equal"].append(res.p_equal)
    out: dict[str, Any] = {"runs": [str(d) for d in run_dirs], "draws": draws, "seed": seed, "quantile": quantile,
                           "units": [table0.unit_name(u) for u in range(table0.size)], "sizes": {}}
    pooled = []
    for s in sizes:
        pi, keep, base = (torch.stack(per[s][k]) for k in ("pi", "keep", "base"))
        res = refit_forecasts(pi, keep, base)
        res["p_equal"] = per[s]["p_equal"]
        out["sizes"][str(s)] = res
        pooled.append(pair_forecasts(pi, keep, base))
    out["all_sizes"] = cc.score_forecasts(*(torch.cat(parts) for parts in zip(*pooled)))
    out["goal"] = {"brier_skill_positive": out["all_sizes"]["brier_skill"] > 0,
                   "ece_at_most_0.1": out["all_sizes"]["ece"] <= 0.1}
    return out


def table_text(res: dict[str, Any]) -> str:
    head = (f"{'size':>5} {'runs':>4} {'|pi-f|':>7} {'Brier':>6} {'uninf.':>6} {'skill':>6} {'ECE':>5} "
            f"{'conf.':>5} {'contr.':>6} {'Jacc.':>5} {'disp.':>5}  P(draw = keep-set)")
    lines = [head]
    rows = [*res["sizes"].items(), ("all", res["all_sizes"])]
    for s, r in rows:
        pe = " ".join(f"{p:.2f}" for p in r.get("p_equal", []))
        lines.append(f"{s:>5} {r.get('runs', ''):>4} {r.get('mean_abs_gap', float('nan')):7.3f} {r['brier']:6.3f} "
                     f"{r['brier_uninformed']:6.3f} {r['brier_skill']:6.2f} {r['ece']:5.3f} {r['confident']:5d} "
                     f"{r['contradicted']:6.2f} {r.get('jaccard', float('nan')):5.2f} {r.get('disputed', ''):>5}  {pe}")
    return "\n".join(lines)


def write(res: dict[str, Any], out: Path, name: str = "calibration_refits") -> tuple[Path, Path]:
    from ppn_bayes.analysis.plots import plot_reliability

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_bytes(path, json.dumps(res, indent=1).encode())
    curves = {f"size {s}": r["curve"] for s, r in res["sizes"].items()}
    png = plot_reliability(curves, out / name, f"Refits: pi of one run vs keep of another\n"
                           f"({len(res['runs'])} runs; ECE {res['all_sizes']['ece']:.3f}, "
                           f"Brier skill {res['all_sizes']['brier_skill']:.2f})",
                           xlabel="inclusion probability pi reported by a run",
                           ylabel="share of other refits keeping the unit")[0]
    return path, png


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(DEMO), help="recipe to refit (default the demo)")
    ap.add_argument("--refits", type=int, default=5, help="number of refits R (default 5)")
    ap.add_argument("--runs", nargs="+", type=Path, default=None,
                    help="analyse these finished run directories instead of fitting")
    ap.add_argument("--out", type=Path, required=True, help="output directory (refits go to OUT/runs/)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--draws", type=int, default=256, help="joint posterior draws per run (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="first train.seed / data.bootstrap_seed (default 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every refit (repeatable)")
    ap.add_argument("--vary", choices=VARY, default="both",
                    help="what differs between refits: seed and bootstrap (default), the seed alone, or the data alone")
    ap.add_argument("--tiny", action="store_true", help="smoke test on a tiny random Llama (seconds)")
    a = ap.parse_args(argv)
    sizes = parse_sizes(a.sizes)
    if not a.runs and a.refits < 2:
        raise SystemExit(f"error: --refits {a.refits}: the refit check needs at least two refits; use e.g. --refits 5")
    t0 = time.time()
    if a.runs:
        runs = finished(a.runs)
    else:
        tiny = tiny_setup(a.out) if a.tiny else None
        runs = []
        for r in range(a.refits):
            t = time.time()
            runs.append(refit(a.out, r, a.recipe, a.overrides, a.seed, tiny, a.vary))
            print(f"refit {r}: {runs[-1]} ({time.time() - t:.0f} s)", file=sys.stderr)
    res = analyse(runs, sizes, a.draws)
    res["recipe"] = "tiny" if a.tiny else (None if a.runs else a.recipe)
    res["overrides"] = a.overrides
    res["vary"] = None if a.runs else a.vary
    res["seconds"] = time.time() - t0
    path, png = write(res, a.out)
    print(table_text(res))
    print(f"wrote {path} and {png}")
    return res


if __name__ == "__main__":
    main()
