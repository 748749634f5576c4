"""The SmolLM2-135M comparison table and plot (README + RESULTS.md), in one command.

    python benchmarks/compare_smollm2.py                 # run the stages whose JSON is missing, merge
    python benchmarks/compare_smollm2.py --refresh ppn-lora,healed   # re-run some stages
    python benchmarks/compare_smollm2.py --merge-only    # only rebuild the table, plot and README block

Every stage is one ``ppn compare`` invocation on the *same* calibration and test blocks (8 x 128 train
tokens drawn with seed 0; the first 16 x 128 tokens of the test split), and writes its JSON to
``benchmarks/compare/<stage>.json`` so that the merge is cheap and every figure has its command:

* ``peers``      GISP, ShortGPT, PrunePath, Wanda, SparseGPT, random, as published (no retraining).
* ``ppn-frozen`` our Bayesian PPN, the demo recipe (frozen weights, layer gates, 60 joint + 60 guide-only steps).
* ``paper-frozen`` PPN as published (``paper`` preset: heads + single neurons, no latent offsets,
  linear thresholds) with the demo's data and training budget.
* ``ppn-lora``   our PPN trained jointly with LoRA adapters (``inference/smollm2-full.yaml``).
* ``paper-lora`` PPN as published, trained jointly with LoRA adapters on the same data and budget
  (``inference/smollm2-paper.yaml``).
* ``healed``     ShortGPT and GISP fine-tuned after pruning with the *same token budget* as the joint
  PPN run, per size (the peers need one healing run per size; PPN one run for all sizes).

Runs are kept under ``runs/compare/`` (ignored by git); a killed joint run resumes. The merged
``benchmarks/compare_smollm2.{json,md,png}`` label each row with its training regime, and
``benchmarks/readme_results.py`` is called last to rewrite the README's results block.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGE_DIR = HERE / "compare"
RUNS = ROOT / "runs" / "compare"
SIZES = "0.9,0.75,0.6,0.5,0.4"
HEAL_SIZES = "0.75,0.5"
COMMON = ["--model", "smollm2-135m", "--calib-blocks", "8", "--test-blocks", "16", "--block-size", "128"]
STAGES = ("peers", "ppn-frozen", "paper-frozen", "ppn-lora", "paper-lora", "healed")
LABELS = {  # (stage, method) -> row label in the merged table
    ("ppn-frozen", "ppn"): "ppn, frozen (demo: layers, 60 + 60 guide steps)",
    ("paper-frozen", "ppn-paper"): "ppn-paper, frozen (60 steps)",
    ("ppn-lora", "ppn"): "ppn, joint LoRA (smollm2-full)",
    ("paper-lora", "ppn-paper"): "ppn-paper, joint LoRA (smollm2-paper)",
}


def _ppn(*args: str) -> None:
    cmd = [sys.executable, "-m", "ppn_bayes.cli", *args]
    print("+ ppn " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _compare(stage: str, *args: str) -> None:
    out = RUNS / f"{stage}-out"
    _ppn("compare", *COMMON, *args, "--out", str(out))
    data = json.loads((out / "compare.json").read_text())
    data["command"] = "ppn compare " + " ".join([*COMMON, *args])
    _write_json(STAGE_DIR / f"{stage}.json", data)


def _write_json(path: Path, data: dict) -> None:
    from ppn_bayes.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _joint_run(name: str = "ppn-lora", recipe: str = "inference/smollm2-full.yaml") -> Path:
    """A joint run (fitted here if missing; resumed if a previous attempt was killed)."""
    run = RUNS / name
    if not (run / "manifest.json").is_file() or not _finished(run):
        args = ["fit", recipe, "--out", str(run)]
        _ppn(*args, *(["--resume"] if (run / "checkpoint").exists() else []))
    return run


def _finished(run: Path) -> bool:
    from ppn_bayes.training.rundir import MANIFEST, read_json

    return read_json(run / MANIFEST).get("status") == "finished"


def trained_tokens(run: Path) -> int:
    """Tokens the joint run trained on: steps x batch x accumulation x block size (the healing budget)."""
    from ppn_bayes.config import load_recipe
    from ppn_bayes.training.rundir import CONFIG

    r = load_recipe(run / CONFIG)
    return r.train.steps * r.train.batch_size * r.train.grad_accum * r.data.block_size


def run_stage(stage: str) -> None:
    if stage == "peers":
        _compare(stage, "--sizes", SIZES, "--seeds", "3", "--decode-tokens", "8")
    elif stage == "ppn-frozen":
        run = RUNS / "ppn-frozen"
        if not (run / "manifest.json").is_file():
            _ppn("fit", "inference/smollm2-demo.yaml", "--out", str(run))
        _compare(stage, "--sizes", SIZES, "--methods", "ppn", "--run", str(run), "--decode-tokens", "8")
    elif stage == "paper-frozen":  # `ppn compare` fits the paper preset with the demo recipe's budget
        _compare(stage, "--sizes", SIZES, "--methods", "ppn-paper", "--decode-tokens", "8")
    elif stage == "ppn-lora":
        run = _joint_run()
        _compare(stage, "--sizes", SIZES, "--methods", "ppn", "--run", str(run), "--decode-tokens", "8")
    elif stage == "paper-lora":
        run = _joint_run("paper-lora", "inference/smollm2-paper.yaml")
        _compare(stage, "--sizes", SIZES, "--methods", "ppn-paper", "--paper-run", str(run), "--decode-tokens", "8")
    elif stage == "healed":
        tokens = trained_tokens(_joint_run())
        _compare(stage, "--sizes", HEAL_SIZES, "--methods", "shortgpt,gisp", "--heal-tokens", str(tokens),
                 "--decode-tokens", "0")
    else:
        raise SystemExit(f"unknown stage {stage!r}; choose from {','.join(STAGES)}")


def label(stage: str, row: dict) -> str:
    if (stage, row["method"]) in LABELS:
        return LABELS[(stage, row["method"])]
    if row.get("healed_tokens"):
        return f"{row['method']}, healed ({row['healed_tokens'] / 1000:.0f}k tokens per size)"
    return row["method"]


def read_stages(stage_dir: Path, stages) -> tuple[dict | None, dict[str, str], list[tuple[str, dict]]]:
    """``(dense, commands, [(stage, data), ...])`` of the stage JSONs present under ``stage_dir``; every
    stage must have evaluated the same test blocks (one dense row), else the merge stops."""
    dense, commands, found = None, {}, []
    for stage in stages:
        path = stage_dir / f"{stage}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        dense = dense or data["dense"]
        if abs(data["dense"]["perplexity"] - dense["perplexity"]) > 1e-3 * dense["perplexity"]:
            raise SystemExit(f"{path}: dense perplexity {data['dense']['perplexity']:.3f} differs from "
                             f"{dense['perplexity']:.3f}: the stages did not use the same test blocks")
        commands[stage] = data.get("command", "")
        found.append((stage, data))
    return dense, commands, found


def merge() -> dict:
    """All stages' rows, relabelled, with one dense row (every stage evaluates the same test blocks)."""
    rows, costs = [], {}
    dense, commands, stages = read_stages(STAGE_DIR, STAGES)
    for stage, data in stages:
        for r in data["results"]:
            name = label(stage, r)
            rows.append({**r, "method": name, "stage": stage})
            cost = data.get("costs", {}).get(r["method"])
            if cost is not None:
                costs[name] = cost
    if dense is None:
        raise SystemExit("no stage JSON under benchmarks/compare/; run without --merge-only first")
    return {"dense": dense, "results": rows, "costs": costs, "config": {"commands": commands}}


def write_merged(result: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from ppn_bayes.compare.outputs import markdown_table, plot

    _write_json(HERE / "compare_smollm2.json", result)
    from ppn_bayes.files import atomic_write_bytes

    md = HERE / "compare_smollm2.md"
    atomic_write_bytes(md, markdown_table(result).encode())
    plot(result, HERE / "compare_smollm2.png")
    print(f"wrote {HERE / 'compare_smollm2.json'}, {md}, {HERE / 'compare_smollm2.png'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refresh", default="", help=f"comma-separated stages to re-run ({','.join(STAGES)}, or all)")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to include (default: all)")
    p.add_argument("--merge-only", action="store_true", help="only merge the stage JSONs and regenerate the README")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    refresh = set(STAGES) if args.refresh == "all" else {s for s in args.refresh.split(",") if s}
    for s in stages + sorted(refresh):
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; choose from {','.join(STAGES)}")
    if not args.merge_only:
        for stage in stages:
            if stage in refresh or not (STAGE_DIR / f"{stage}.json").is_file():
                run_stage(stage)
    write_merged(merge())
    subprocess.run([sys.executable, str(HERE / "readme_results.py")], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
