"""``ppn bench speed``: prefill/decode throughput and memory of dense vs resized models.

Thin: parsing and printing only; the measurement is :func:`ppn_bayes.evaluation.bench.speed_benchmark`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ppn_bayes.cli.options import add_device, add_json, comma_list, json_text

HELP = "speed benchmarks of dense vs resized models"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help=HELP, description=HELP)
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    speed = sub.add_parser("speed", help="prefill and decode throughput and memory, each ratio next to its "
                           "ideal from FLOPs")
    speed.add_argument("--model", default="smollm2-135m", help="alias, local directory or Hub id")
    speed.add_argument("--run", default=None, help="run directory whose keep-sets to use (default: the "
                       "highest-norm layers, a layer-only keep-set that works on any model)")
    speed.add_argument("--sizes", default="1.0,0.75,0.5", help="sizes (fraction of decoder params)")
    speed.add_argument("--batch-sizes", default="1,8", help="batch sizes (default: 1,8)")
    speed.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    speed.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps (default: 64)")
    speed.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    speed.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default: 1)")
    add_device(speed)
    add_json(speed)
    speed.add_argument("--plot", default=None, metavar="PNG", help="also write a plot of measured vs ideal")
    speed.set_defaults(func=run_speed)
    parser.set_defaults(func=lambda args: _no_subcommand(parser))


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    import sys

    parser.print_usage(sys.stderr)
    print("error: ppn bench: no benchmark given; use `ppn bench speed`, see `ppn bench --help`", file=sys.stderr)
    return 2


def run_speed(args: argparse.Namespace) -> int:
    from ppn_bayes.device import resolve_device
    from ppn_bayes.evaluation.bench import format_table, keepsets_for, plot_speed, speed_benchmark
    from ppn_bayes.hub.zoo import load_model

    sizes = comma_list(args.sizes, float, "--sizes")
    batches = comma_list(args.batch_sizes, int, "--batch-sizes", "1,8")
    _validate(sizes, batches, args)  # before the model loads: a typo costs a second, not a load
    if args.plot:
        import os

        from ppn_bayes.evaluation.bench import check_plot_path

        check_plot_path(args.plot, [(what, p) for what, p in (("model", args.model), ("run directory", args.run))
                                    if p is not None and os.path.lexists(os.path.expanduser(p))])
    device = resolve_device(args.device)
    model, _ = load_model(args.model, device=device)
    keepsets, inventory = keepsets_for(model, sizes, args.run)
    result = speed_benchmark(model, keepsets, inventory, batch_sizes=batches, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    result["model"] = args.model
    result["keepsets"] = "run " + str(args.run) if args.run else "highest-norm layers"
    if args.plot:
        result["plot"] = str(plot_speed(result, args.plot))
    print(json_text(result, indent=2) if args.json else format_table(result))
    return 0


def _validate(sizes: list[float], batches: list[int], args: argparse.Namespace) -> None:
    from ppn_bayes.errors import ConfigError, SizeError

    infinite = [s for s in sizes if not math.isfinite(s)]
    if infinite:
        raise SizeError(f"--sizes {infinite[0]:g} is not a finite number; sizes are fractions of decoder parameters "
                        "in (0, 1], e.g. --sizes 1.0,0.75,0.5")
    bad = [s for s in sizes if not 0 < s <= 1]
    if bad:
        raise SizeError(f"--sizes {bad[0]:g} is out of range; sizes are fractions of decoder parameters in (0, 1], "
                        "e.g. --sizes 1.0,0.75,0.5")
    for flag, value, low in (("--batch-sizes", min(batches), 1), ("--prompt-len", args.prompt_len, 1),
                             ("--new-tokens", args.new_tokens, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be at least {low}")
