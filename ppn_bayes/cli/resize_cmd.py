"""``ppn resize RUN --size 0.5 --out DIR``: export a run's network at one size as a smaller checkpoint.

Also ``ppn resize --model M --keepset FILE.json --group-size G --out DIR`` for a keep-set without a run
(the base weights, cut; no trained weights or amplitudes). The work is
:func:`ppn_bayes.export.from_run.resize_run` / :func:`~ppn_bayes.export.from_run.resize_keepset_file`.
"""

from __future__ import annotations

import argparse

from ppn_bayes.cli.keepset_cmd import add_target_args
from ppn_bayes.cli.options import add_json, add_posterior_options, comma_list, json_text
from ppn_bayes.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "resize", help="export a smaller checkpoint: a run at a size, or a keep-set file",
        description="Write the sub-network of a run at one target size (keep-set, amplitude corrections at "
                    "lambda*, trained weights or LoRA folded in) as an ordinary checkpoint directory, reading "
                    "only the kept tensors of the base model. Without a run: --model M --keepset FILE.json.")
    p.add_argument("run", nargs="?", help="run directory written by `ppn fit`")
    add_target_args(p, required=False)
    p.add_argument("--out", required=True, help="output directory (written whole, or not at all)")
    add_posterior_options(p)
    p.add_argument("--model", help="base model (alias, directory or Hub id): required with --keepset; with a run, "
                   "where its base model now is (checked against the run's hashes)")
    p.add_argument("--keepset", help="keep-set JSON (KeepSet, `ppn keepset --json` output or a ppn-resize.json); "
                   "needs --model and --group-size, takes no run")
    p.add_argument("--group-size", type=int, help="MLP channels per group the keep-set file counts in")
    p.add_argument("--kinds", default="layers,heads,groups", help="gated unit kinds of the keep-set file "
                   "(default layers,heads,groups)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the base's tokenizer files")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    add_json(p, "the export's report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.export.from_run import resize_keepset_file, resize_run

    target = {k: getattr(args, k) for k in ("size", "params", "layers", "flops")}
    given = [k for k, v in target.items() if v is not None]
    if args.keepset:
        if args.run or given:
            raise ConfigError("--keepset exports a keep-set file without a run; drop the run directory and "
                              f"--{(given or ['size'])[0]}, or drop --keepset")
        if not args.model or args.group_size is None:
            raise ConfigError("--keepset needs --model (the base checkpoint) and --group-size (as the keep-set "
                              "was made with)")
        kinds = tuple(comma_list(args.kinds, str, "--kinds", "layers,heads,groups"))
        report = resize_keepset_file(args.model, args.keepset, args.out, group_size=args.group_size, kinds=kinds,
                                     overwrite=args.force, tokenizer=not args.no_tokenizer)
    else:
        if not args.run:
            raise ConfigError("give a run directory and a size (ppn resize RUN --size 0.5 --out DIR), or "
                              "--model M --keepset FILE.json --group-size G")
        if not given:
            raise ConfigError("give one target: --size S, --params N, --layers N or --flops F")
        report = resize_run(args.run, args.out, **target, quantile=args.quantile, num_draws=args.draws,
                            seed=args.seed, overwrite=args.force, tokenizer=not args.no_tokenizer, base=args.model)
    if args.json:
        print(json_text(report))
    else:
        print(text(report))
    return 0


def text(report: dict) -> str:
    """A few lines: where the export is, what it keeps, how to load it."""
    head = (f"wrote {report['out']} ({report['form']}, {report['num_layers']} layers, "
            f"{report['params_written']:,} parameters)")
    lines = [head]
    if "run" in report:
        req = report["requested"]
        lines.append(f"run {report['run']}: {req['kind']} {req['value']:g} -> achieved size "
                     f"{report['achieved_size']:.4g} at lambda {report['lambda']:.4g} "
                     f"(quantile {report['quantile']:g}; weights {report['trained_weights']}, "
                     f"amplitudes {'folded' if report['amplitudes'] else 'none'})")
    else:
        lines.append(f"decoder size {report['size_params']:.4g} of the base's parameters")
    lines.append(f"load with {report['loader']}")
    return "\n".join(lines)
