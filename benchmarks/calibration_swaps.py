"""Swap check of issue 12: does the posterior know which of two boundary units is worth more?

    # on a finished run (the demo: `ppn fit inference/smollm2-demo.yaml --out runs/demo`)
    OMP_NUM_THREADS=1 python benchmarks/calibration_swaps.py runs/demo --out benchmarks/calibration_swaps
    # more swaps: --sizes 0.3,0.4,0.5,0.6,0.7 --per-side 6 ; held-out blocks: --blocks 16 --split validation
    # smoke test: fits one tiny random Llama run into OUT/runs/refit-0, then the check (seconds)
    python benchmarks/calibration_swaps.py --tiny --out /tmp/swaps

**Swaps.** At each size, the reported keep-set ``K`` (median rule, :class:`ppn_bayes.bayes.keepsets.KeepsetSolver`).
Its boundary: of every gated kind, the ``--per-side`` kept units with the lowest priority (the last
in) and the same number of dropped units with the highest priority (the first out). A swap
``u -> v`` replaces kept ``u`` by dropped ``v`` of the same kind: ``K' = K - {u} + {v}``. It must be
*cost-matched*: the exact cost (:meth:`UnitInventory.kept_cost`, a GQA KV head charged once) of
``K'`` within 1 % of one unit's cost of ``K``'s, and ``K'`` must keep the same layers (a head or
group swap never empties a layer nor enters an absent one). Layers are swapped only when they are the
only gated kind (a layer with gated heads and groups brings or takes them along, and its cost with
them). Swaps that fail these rules are skipped and counted.

**The forecast.** In posterior draw ``k`` each unit has an exit price ``e_u^k``: the price at which
the push drops it, ``tau^{-1}(a_u^k)`` (``exit_order.exit_coordinates``; the keep-set rule keeps the
units with the highest exit prices that fit). For layers it is the nested price the keep-set rule
uses; for heads and groups the unit's *own* price, its layer ignored: a swap happens inside kept
layers, so a draw in which the layer would leave first (and the two nested prices tie at the
layer's) still says which of the two units is worth more. The posterior says the swap helps, i.e.
``v`` is worth more at the margin than ``u``, with probability

    P(swap lowers held-out loss) = (1/K) sum_k ( 1[e_v^k > e_u^k] + 1/2 1[e_v^k = e_u^k] ).

With the shared threshold curve of ``preset: ours`` this is ``P(a_v - a_u > 0)`` (the threshold is
the same for both and cancels); with per-layer curves it compares the margins
``a - tau_l(lambda)`` at every price at once, which is what the exit price encodes.

**The outcome**: ``1[NLL(K') < NLL(K)]``, the mean next-token NLL of both keep-sets (hard masks with
the push's amplitude corrections at lambda*, :func:`ppn_bayes.analysis.uncertainty.keepset_nll`) on the
run's first ``--blocks`` validation blocks (default: the recipe's ``data.val_blocks``).

Scored with :mod:`ppn_bayes.analysis.calibration_checks`: Brier score against the uninformed forecast 1/2,
ECE and the reliability curve (10 bins); issue 12's goal is the curve within 0.1 of the diagonal in
every bin with at least 10 swaps (``max_gap_10``). Written to ``OUT/calibration_swaps.json`` (every
swap with its forecast, NLLs and outcome) and ``OUT/calibration_swaps.png`` (+ ``.svg``).
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

from benchmarks.calibration_refits import keep_row, parse_sizes, refit, tiny_setup
from ppn_bayes.analysis import calibration_checks as cc
from ppn_bayes.bayes.exit_order import exit_coordinates
from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.bayes.unit_table import KIND_ORDER
from ppn_bayes.files import atomic_write_bytes

SIZES = (0.3, 0.4, 0.5, 0.6, 0.7)
COST_TOL = 0.01  # of one unit's cost: GQA KV shares and a narrower last channel group break a match


def swap_probability(exits: torch.Tensor, u: int, v: int) -> float:
    """``P(e_v > e_u)`` over the draws ``exits [K, N]``, ties counted half (module docstring)."""
    ev, eu = exits[:, v], exits[:, u]
    return float(((ev > eu).double() + 0.5 * (ev == eu).double()).mean())


def candidate_swaps(solver: KeepsetSolver, res, per_side: int) -> tuple[list[dict[str, Any]], int]:
    """Cost-matched swaps at one keep-set (module docstring), and how many candidates were skipped."""
    table, inv = solver.table, solver.inventory
    cur = res.target.currency
    row = keep_row(table, res.keep)
    prio = table.flatten(res.priority)
    base_cost = inv.kept_cost(res.keep, cur) if cur != "layers" else float(len(res.keep.layers))
    kinds = ["layers"] if table.kinds == ("layers",) else [k for k in ("heads", "groups") if k in table.kinds]
    own = exit_coordinates(solver.posterior, table, solver.scores, nested=False)  # [K, N]
    swaps, skipped = [], 0
    for kind in kinds:
        kid = KIND_ORDER.index(kind)
        mine = table.kind_id == kid
        kept = (mine & row).nonzero().flatten()
        dropped = (mine & ~row).nonzero().flatten()
        if "layers" in table.kinds and kind != "layers":  # an incoming head/group needs its layer kept
            kept_layers = set(res.keep.layers)
            dropped = dropped[torch.tensor([int(table.layer[v]) in kept_layers for v in dropped], dtype=torch.bool)] \
                if dropped.numel() else dropped
        outs = kept[torch.argsort(prio[kept])][:per_side].tolist()
        ins = dropped[torch.argsort(prio[dropped], descending=True)][:per_side].tolist()
        unit_cost = float(table.base_cost[cur][kept[0]]) if kept.numel() else 0.0
        for u in outs:
            for v in ins:
                new = row.clone()
                new[u], new[v] = False, True
                keep = table.keepset(new)
                cost = inv.kept_cost(keep, cur) if cur != "layers" else float(len(keep.layers))
                others = (table.layer == table.layer[u]) & (table.kind_id > 0) & new  # u's layer keeps a unit
                emptied = kind != "layers" and "layers" in table.kinds and not bool(others.any())
                if abs(cost - base_cost) > COST_TOL * unit_cost or emptied or (
                        kind != "layers" and keep.layers != res.keep.layers):
                    skipped += 1
                    continue
                swaps.append({"kind": kind, "out": table.unit_name(u), "in": table.unit_name(v), "u": u, "v": v,
                              "keep": keep, "cost_change": cost - base_cost,
                              "p": swap_probability(solver.exits if kind == "layers" else own, u, v)})
    return swaps, skipped


def check_run(run_dir: Path, sizes=SIZES, per_side: int = 4, blocks: int | None = None, split: str = "validation",
              draws: int = 256, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Every swap at every size of one run, its forecast and its observed held-out change; the scores."""
    from ppn_bayes.analysis.uncertainty import keepset_nll, run_test_blocks
    from ppn_bayes.run import load_run

    run = load_run(run_dir)
    solver = KeepsetSolver(run.posterior, draws, seed)
    gated = run.load_model(device)
    ids = run_test_blocks(run, blocks or run.recipe.data.val_blocks, split=split)
    records, summary = [], []
    for s in sizes:
        res = solver.solve(size=s)
        swaps, skipped = candidate_swaps(solver, res, per_side)
        before = keepset_nll(gated, solver.posterior, res.keep, res.lam, ids)
        for sw in swaps:
            after = keepset_nll(gated, solver.posterior, sw.pop("keep"), res.lam, ids)
            records.append({"size": s, **sw, "nll_before": before, "nll_after": after, "delta": after - before,
                            "lowered": after < before})
        summary.append({"size": s, "lambda": res.lam, "nll": before, "swaps": len(swaps), "skipped": skipped})
    out: dict[str, Any] = {"run": str(run_dir), "split": split, "blocks": int(ids.shape[0]), "draws": draws,
                           "seed": seed, "per_side": per_side, "sizes": summary, "swaps": records}
    if records:
        p = [r["p"] for r in records]
        y = [float(r["lowered"]) for r in records]
        out["scores"] = cc.score_forecasts(p, y, base=0.5)
        out["scores"]["max_gap_10"] = cc.max_bin_gap(out["scores"]["curve"], 10)
        out["scores"]["lowered_rate"] = sum(y) / len(y)
    return out


def table_text(res: dict[str, Any]) -> str:
    lines = [f"{'size':>5} {'lambda*':>8} {'NLL':>7} {'swaps':>5} {'skipped':>7} {'P mean':>6} {'lowered':>7}"]
    for s in res["sizes"]:
        mine = [r for r in res["swaps"] if r["size"] == s["size"]]
        pm = sum(r["p"] for r in mine) / len(mine) if mine else float("nan")
        lo = sum(r["lowered"] for r in mine) / len(mine) if mine else float("nan")
        lines.append(f"{s['size']:>5} {s['lambda']:8.3g} {s['nll']:7.4f} {s['swaps']:>5} {s['skipped']:>7} "
                     f"{pm:6.2f} {lo:7.2f}")
    if "scores" in res:
        sc = res["scores"]
        gap = "n/a (no bin with >= 10 swaps)" if sc["max_gap_10"] is None else f"{sc['max_gap_10']:.3f}"
        lines.append(f"{sc['n']} swaps: Brier {sc['brier']:.3f} (uninformed 1/2: {sc['brier_uninformed']:.3f}, skill "
                     f"{sc['brier_skill']:.2f}), ECE {sc['ece']:.3f}, largest gap in a bin of >= 10: {gap}; "
                     f"confident {sc['confident']}, contradicted {sc['contradicted']:.2f}")
    return "\n".join(lines)


def write(res: dict[str, Any], out: Path, name: str = "calibration_swaps") -> tuple[Path, Path | None]:
    from ppn_bayes.analysis.plots import plot_reliability

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_bytes(path, json.dumps(res, indent=1).encode())
    if "scores" not in res:
        return path, None
    sc = res["scores"]
    png = plot_reliability({"swaps": sc["curve"]}, out / name,
                           f"Swaps: P(swap lowers held-out loss) vs observed\n({sc['n']} swaps; ECE {sc['ece']:.3f}, "
                           f"Brier {sc['brier']:.3f})", xlabel="posterior P(incoming unit worth more)",
                           ylabel="share of swaps that lowered held-out NLL")[0]
    return path, png


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, help="a finished run directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--per-side", type=int, default=4, help="boundary units per side and kind (default 4)")
    ap.add_argument("--blocks", type=int, default=None, help="held-out blocks (default: the recipe's data.val_blocks)")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="smoke test: fit a tiny random Llama run first (seconds)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.run = refit(a.out, 0, None, [], 0, tiny_setup(a.out))
    if a.run is None:
        ap.error("give a run directory, or --tiny")
    t0 = time.time()
    res = check_run(a.run, parse_sizes(a.sizes), a.per_side, a.blocks, a.split,
                    a.draws, device=a.device)
    res["seconds"] = time.time() - t0
    path, png = write(res, a.out)
    print(table_text(res))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return res


if __name__ == "__main__":
    main()
