"""``ppn demo``: the main job on the bundled default, end to end (see :mod:`ppn_bayes.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from ppn_bayes.cli.options import add_json, comma_list, json_text

HELP = "fit the bundled SmolLM2-135M, report, resize to 0.5 and compare it with dense"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--out", default="runs/demo", help="where the run, report and resized model go (default: runs/demo)")
    p.add_argument("--sizes", default="0.75,0.5,0.25", help="keep-set sizes to report (default: 0.75,0.5,0.25)")
    p.add_argument("--resize", type=float, default=0.5, help="size of the exported model (default: 0.5)")
    p.add_argument("--eval-blocks", type=int, default=16, help="256-token test blocks for perplexity (default: 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded for the speed check (default: 32)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key of the demo fit, e.g. --set train.steps=20")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p, "the summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.demo import format_demo, run_demo
    from ppn_bayes.errors import ConfigError

    if args.eval_blocks < 1 or args.new_tokens < 1:
        raise ConfigError("--eval-blocks and --new-tokens must be at least 1")
    res = run_demo(args.out, sizes=tuple(comma_list(args.sizes, float, "--sizes")), resize_size=args.resize, eval_blocks=args.eval_blocks,
                   new_tokens=args.new_tokens, overrides=args.overrides, progress=not args.no_progress)
    print(json_text(res.to_dict()) if args.json else format_demo(res))
    return 0
