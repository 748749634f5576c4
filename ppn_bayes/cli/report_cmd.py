"""``ppn report RUN``: the Markdown report, plots, keepsets.json and the arviz NetCDF, into the run dir."""

from __future__ import annotations

import argparse
import sys

from ppn_bayes.cli.options import add_posterior_options, comma_list


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report.md, plots, keepsets.json and the arviz NetCDF",
                              description="Summarize a run: which layers and heads go first, which decisions "
                                          "are uncertain, keep-sets across sizes, diagnostics and plots.")
    p.add_argument("run", help="run directory written by `ppn fit`")
    p.add_argument("--sizes", default="0.25,0.5,0.75",
                   help="comma-separated parameter fractions (default 0.25,0.5,0.75)")
    add_posterior_options(p)
    p.add_argument("--out", default=None, help="output directory (default: the run directory); never another run")
    p.add_argument("--force", action="store_true", help="replace an earlier report in --out (the run's own report "
                   "is always replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.report import fit_warning, write_report

    warning = fit_warning(args.run)
    if warning:
        print(warning, file=sys.stderr)

    path = write_report(args.run, sizes=comma_list(args.sizes, float, "--sizes", "0.25,0.5,0.75"), num_draws=args.draws, quantile=args.quantile, seed=args.seed,
                        out=args.out, overwrite=args.force)
    print(f"wrote {path}")
    return 0
