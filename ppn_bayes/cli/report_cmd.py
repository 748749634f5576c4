"""``ppn report RUN``: the Markdown report, plots, keepsets.json and the arviz NetCDF, into the run dir."""

from __future__ import annotations

import argparse
import sys

from ppn_bayes.cli.options import add_device, add_posterior_options, comma_list


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
    p.add_argument("--band", type=int, default=0, metavar="K",
                   help="add each keep-set's held-out loss with a 5-95 %% band over K sampled sub-networks "
                        "(loads the model; default 0 = off)")
    p.add_argument("--band-blocks", type=int, default=4, help="validation blocks for --band (default 4)")
    add_device(p, "for --band")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.analysis.report import check_band, fit_warning, write_report

    check_band(args.band, args.band_blocks, args.draws)
    warning = fit_warning(args.run)
    if warning:
        print(warning, file=sys.stderr)

    path = write_report(args.run, sizes=comma_list(args.sizes, float, "--sizes", "0.25,0.5,0.75"), num_draws=args.draws,
                        quantile=args.quantile, seed=args.seed, out=args.out, overwrite=args.force,
                        band_samples=args.band, band_blocks=args.band_blocks, device=args.device)
    print(f"wrote {path}")
    return 0
