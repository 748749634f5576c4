"""The fair fight (issue 13), in one command: one distilled PPN run against peers healed per size.

    python benchmarks/fair_fight.py                      # run the missing stages, merge, print the table
    python benchmarks/fair_fight.py --refresh healed-distill   # re-run some stages
    python benchmarks/fair_fight.py --merge-only         # only rebuild benchmarks/fair_fight_<tag>.{json,md}
    python benchmarks/fair_fight.py --recipe inference/smollm2-full.yaml --tag full   # another PPN run
    python benchmarks/fair_fight.py --recipe inference/smollm2-distill-full.yaml --tag distill-full \
        --healed shortgpt --heal-lr 5e-4      # full weights; the peer healed at the same rate

At 0.75 / 0.5 / 0.4 of decoder parameters on SmolLM2-135M, on the calibration and test blocks of
``benchmarks/compare_smollm2.py`` (8 x 128 train tokens drawn with seed 0; the first 16 x 128 test
tokens), with **one per-size token budget**: the training tokens of the PPN run
(:func:`ppn_bayes.compare.rows.run_tokens`, ``steps x batch x accumulation x block``), given to every
healed row *per size*. Stages (each one ``ppn compare`` call, its JSON under
``benchmarks/fair_fight/<tag>/<stage>.json`` with its command):

* ``ppn``            the one PPN run (``inference/smollm2-distill.yaml``: LoRA, sandwich, in-place
                     distillation), fitted here if missing (resumed if killed); no per-size healing.
* ``healed-data``    ShortGPT, GISP and ``ppn-healed`` (the run's own sub-networks), each healed per
                     size on the budget with the data loss (next-token NLL).
* ``healed-distill`` the same, healed with distillation from the dense model (forward KL), so that
                     no comparison is won by the loss alone.
* ``sparsegpt``      unstructured SparseGPT (no training): the reference of the issue's goal 4.

Every stage also measures its rows on a **transfer domain** that neither calibration, training nor
healing saw: the King James Bible's test split (*Mark*, bundled as ``kjv``, public domain; prose of
another century, register and vocabulary than Austen's novels), the same 16 x 128 tokens for every
row, read as a ratio to dense on those blocks (``ppn compare --transfer-data kjv``).

Every row states the tokens and the wall time its method spent for *all* sizes (a PPN run once plus
any healing per size; a peer's healing per size); the table lists perplexity and the ratio to dense.
Wall times depend on the load of the machine: run it on quiet cores and say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# the same calibration/test blocks and helpers as the README comparison
from compare_smollm2 import COMMON, _finished, _ppn, _write_json, read_stages

from ppn_bayes.compare.healing import HEAL_LR

SIZES = "0.75,0.5,0.4"
TRANSFER = "kjv"  # the transfer domain (module docstring)
RECIPE = "inference/smollm2-distill.yaml"
STAGES = ("ppn", "healed-data", "healed-distill", "sparsegpt")


def fit_run(recipe: str, runs: Path) -> Path:
    run = runs / "ppn-run"
    if not (run / "manifest.json").is_file() or not _finished(run):
        _ppn("fit", recipe, "--out", str(run), *(["--resume"] if (run / "manifest.json").is_file() else []))
    return run


def budget(run: Path) -> int:
    from ppn_bayes.compare.rows import run_tokens
    from ppn_bayes.config import load_recipe
    from ppn_bayes.training.rundir import CONFIG

    return run_tokens(load_recipe(run / CONFIG))


HEALED = "shortgpt,gisp,ppn-healed"  # the healed stages' methods


def stage_args(stage: str, run: Path, tokens: int, healed: str = HEALED, heal_lr: float | None = None) -> list[str]:
    if stage == "ppn":
        return ["--methods", "ppn", "--run", str(run), "--decode-tokens", "8"]
    if stage in ("healed-data", "healed-distill"):
        return ["--methods", healed, "--run", str(run), "--heal-tokens", str(tokens),
                "--heal-loss", stage.split("-")[1], *([] if heal_lr is None else ["--heal-lr", f"{heal_lr:g}"]),
                "--decode-tokens", "0"]
    if stage == "sparsegpt":
        return ["--methods", "sparsegpt", "--decode-tokens", "0"]
    raise SystemExit(f"unknown stage {stage!r}; choose from {','.join(STAGES)}")


def run_stage(stage: str, run: Path, tokens: int, stage_dir: Path, runs: Path, healed: str = HEALED,
              heal_lr: float | None = None) -> None:
    args = ["--sizes", SIZES, "--transfer-data", TRANSFER, *stage_args(stage, run, tokens, healed, heal_lr)]
    out = runs / f"{stage}-out"
    _ppn("compare", *COMMON, *args, "--out", str(out))
    data = json.loads((out / "compare.json").read_text())
    data["command"] = "ppn compare " + " ".join([*COMMON, *args])
    _write_json(stage_dir / f"{stage}.json", data)


def label(stage: str, row: dict) -> str:
    m = row["method"]
    if m == "ppn":
        passes = row.get("passes_per_step", 1)
        how = (f"{row['weights']}, " if row.get("weights") in ("lora", "full") else "") + (
            "sandwich, " if row.get("sandwich") else "") + (
            f"distill w={row['distill_weight']:g}" if row.get("distill_weight") else "data loss")
        return f"ppn, one run ({how}, {passes} passes/step)"
    if row.get("healed_tokens"):
        lr = row.get("heal_lr", HEAL_LR)
        return f"{m}, healed per size ({row.get('heal_loss', 'data')}" + ("" if lr == HEAL_LR else f", lr {lr:g}") + ")"
    return m


def merge(stage_dir: Path) -> dict:
    rows, costs, tokens = [], {}, {}
    dense, commands, stages = read_stages(stage_dir, STAGES)
    for stage, data in stages:
        for r in data["results"]:
            if "2:4" in r["method"]:
                continue  # the fight is at 0.75/0.5/0.4; SparseGPT's 2:4 row is a fixed 0.5 pattern
            name = label(stage, r)
            rows.append({**r, "method": name, "stage": stage})
            if r["method"] in data.get("costs", {}):
                costs[name] = data["costs"][r["method"]]
            tokens[name] = data.get("tokens", {}).get(r["method"], int(r.get("healed_tokens", 0)))
    if dense is None:
        raise SystemExit(f"no stage JSON under {stage_dir}; run without --merge-only first")
    return {"dense": dense, "results": rows, "costs": costs, "tokens": tokens, "config": {"commands": commands}}


def table(result: dict, key: str = "perplexity") -> str:
    """The fight's table; ``key="transfer_perplexity"`` for the transfer domain's."""
    sizes = sorted({r["size"] for r in result["results"]}, reverse=True)
    dense = result["dense"][key]
    where = "bundled test split (Persuasion)" if key == "perplexity" else f"transfer domain ({TRANSFER} test split, Mark)"
    head = ("| method | " + " | ".join(f"ppl @ {s:g} (x dense)" for s in sizes)
            + " | tokens, all sizes | wall s, all sizes |\n| --- |" + " ---: |" * (len(sizes) + 2))
    lines = [f"{where}: dense perplexity {dense:.2f}; sizes = fractions of decoder parameters.", "", head]
    by: dict[str, dict[float, dict]] = {}
    for r in result["results"]:
        by.setdefault(r["method"], {})[r["size"]] = r
    for name, rs in by.items():
        cells = []
        for s in sizes:
            r = rs.get(s)
            cells.append("-" if r is None or key not in r else f"{r[key]:.1f} ({r[key] / dense:.2f})")
        cost = result["costs"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['tokens'].get(name, 0):,} | "
                     + (f"{cost:.0f}" if cost is not None else "-") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=RECIPE, help=f"the one PPN run's recipe (default {RECIPE})")
    p.add_argument("--tag", default="distill", help="names this fight's stage folder and runs (default distill)")
    p.add_argument("--refresh", default="", help=f"comma-separated stages to re-run ({','.join(STAGES)}, or all)")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to include (default: all)")
    p.add_argument("--healed", default=HEALED, help=f"the healed stages' methods (default {HEALED})")
    p.add_argument("--heal-lr", type=float, default=None,
                   help="healing's learning rate for every healed row (default: ppn compare's, 5e-5); match it to "
                        "the recipe's lr_weights when the run trains full weights")
    p.add_argument("--merge-only", action="store_true", help="only merge the stage JSONs into the table")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    refresh = set(STAGES) if args.refresh == "all" else {s for s in args.refresh.split(",") if s}
    for s in stages + sorted(refresh):
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; choose from {','.join(STAGES)}")
    stage_dir, runs = HERE / "fair_fight" / args.tag, ROOT / "runs" / "fair_fight" / args.tag
    if not args.merge_only:
        todo = [s for s in stages if s in refresh or not (stage_dir / f"{s}.json").is_file()]
        if todo:
            run = fit_run(args.recipe, runs)
            tokens = budget(run)
            print(f"per-size token budget: {tokens:,} (the PPN run's training tokens)", flush=True)
            for stage in todo:
                run_stage(stage, run, tokens, stage_dir, runs, args.healed, args.heal_lr)
    result = merge(stage_dir)
    _write_json(HERE / f"fair_fight_{args.tag}.json", result)
    md = table(result)
    if "transfer_perplexity" in result["dense"]:
        md += "\n" + table(result, "transfer_perplexity")
    from ppn_bayes.files import atomic_write_bytes

    atomic_write_bytes(HERE / f"fair_fight_{args.tag}.md", md.encode())
    print(md, end="")


if __name__ == "__main__":
    main()
