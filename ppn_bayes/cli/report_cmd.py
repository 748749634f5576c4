"""``ppn report RUN``: the Markdown report, plots, keepsets.json and the arviz NetCDF, into the run dir."""

from __future__ import annotations

import argparse
import sys


def _sizes(text: str) -> list[float]:
    from ppn_bayes.errors import SizeError

    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SizeError(f"--sizes takes comma-separated fractions such as 0.25,0.5,0.75, got {text!r}") from None
    if not sizes:
        raise SizeError("--sizes is empty; pass comma-separated fractions such as 0.25,0.5,0.75")
    return sizes


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report.md, plots, keepsets.json and the arviz NetCDF",
                              description="Summarize a run: which layers and heads go first, which decisions "
                                          "are uncertain, keep-sets across sizes, diagnostics and plots.")
    p.add_argument("run", help="run directory written by `ppn fit`")
    p.add_argument("--sizes", default="0.25,0.5,0.75",
                   help="comma-separated parameter fractions (default 0.25,0.5,0.75)")
    p.add_argument("--draws", type=int, default=256, help="joint posterior draws (default 256)")
    p.add_argument("--quantile", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: the run directory); never another run")
    p.add_argument("--force", action="store_true", help="replace an earlier report in --out (the run's own report "
                   "is always replaced)")
    p.add_argument("--band", type=int, default=0, metavar="K",
                   help="add each keep-set's held-out loss with a 5-95 %% band over K sampled sub-networks "
                        "(loads the model; default 0 = off)")
    p.add_argument("--band-blocks", type=int, default=4, help="validation blocks for --band (default 4)")
    p.add_argument("--device", default="cpu", help="device for --band (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.report import check_band, fit_warning, write_report

    check_band(args.band, args.band_blocks, args.draws)
    warning = fit_warning(args.run)
    if warning:
        print(warning, file=sys.stderr)

    path = write_report(args.run, sizes=_sizes(args.sizes), num_draws=args.draws, quantile=args.quantile, seed=args.seed,
                        out=args.out, overwrite=args.force, band_samples=args.band, band_blocks=args.band_blocks,
                        device=args.device)
    print(f"wrote {path}")
    return 0
