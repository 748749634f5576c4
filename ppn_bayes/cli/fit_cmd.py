"""``ppn fit``: train a push puppet network from a recipe (a thin shell over :func:`ppn_bayes.training.loop.fit`).

    ppn fit inference/smollm2-demo.yaml --out runs/demo
    ppn fit inference/smollm2-demo.yaml --out runs/demo --set train.steps=20 --set train.lr_guide=0.01
    ppn fit --resume --out runs/demo                       # continue a killed run from its checkpoint
    torchrun --standalone --nproc_per_node 2 -m ppn_bayes.cli fit RECIPE --out DIR   # data-parallel
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ppn_bayes.cli.options import add_json, json_text

HELP = "train a push puppet network (SVI over gate scores, jointly with the weights) from a recipe"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("fit", help=HELP, description=HELP)
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe YAML (e.g. inference/smollm2-demo.yaml); optional with --resume")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (fresh start if it has none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=20 (repeatable; values are YAML)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(parser, "a summary of the finished run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.training.loop import fit

    result = fit(args.recipe, out=args.out, resume=args.resume, progress=not args.no_progress,
                 overrides=args.overrides)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    evals = result.eval_metrics()
    summary = {"run": str(result.path), "status": result.status, "steps": result.manifest.get("steps_done"),
               "final_eval": evals[-1] if evals else None}
    if args.json:
        print(json_text(summary, indent=2))
    else:
        line = f"run {summary['run']}: {summary['status']} after {summary['steps']} steps"
        if evals:
            e = evals[-1]
            parts = [f"dense loss {e['dense']:.4f}"] + [f"lambda {x['lambda']:g}: loss {x['loss']:.4f} at size "
                                                         f"{x['size']:.2f}" for x in e["lambdas"]]
            line += "; held-out " + ", ".join(parts)
        print(line)
    return 0
