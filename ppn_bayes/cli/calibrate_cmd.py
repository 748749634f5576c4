"""``ppn calibrate RUN``: estimate the Gibbs posterior's learning rate beta over independent units of
text (chapters) and re-derive the score posterior at it, without retraining (ppn_bayes.analysis.calibration)."""

from __future__ import annotations

import argparse

from ppn_bayes.cli.options import add_device, add_json, json_text
from ppn_bayes.config import CalibrationConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate beta (information matching over chapters), re-derive "
                              "the posterior", description="Estimate the learning rate beta of the score posterior "
                              "by information matching with per-chapter gradients, refit the guide at it "
                              "(weights frozen) and record both in the run's manifest.json. The original "
                              "posterior stays in RUN/posterior.uncalibrated/.")
    p.add_argument("run", help="run directory written by `ppn fit`")
    c = CalibrationConfig()  # the defaults a recipe without a calibration section gets
    # the choices are ppn_bayes.data.corpus.UNITS, spelt out so that building the parser does not import torch (tested)
    p.add_argument("--unit", choices=("chapters", "documents"),
                   help=f"independent unit (default: the recipe's calibration.unit, {c.unit})")
    p.add_argument("--units", type=int, help=f"units to sample (calibration.units, default {c.units})")
    p.add_argument("--blocks-per-unit", type=int,
                   help=f"blocks per sampled unit (calibration.blocks_per_unit, default {c.blocks_per_unit})")
    p.add_argument("--price-draws", type=int,
                   help=f"common (lambda, mask) draws per block (calibration.draws, default {c.draws})")
    p.add_argument("--steps", type=int, help=f"guide-only SVI steps at the new beta (calibration.steps, default {c.steps})")
    p.add_argument("--no-rederive", action="store_true", help="record beta only; keep the posterior as it is")
    p.add_argument("--beta", type=float, help="use this beta instead of estimating one (e.g. the trained 1.0, "
                   "to see what the extra guide-only steps alone change)")
    p.add_argument("--seed", type=int, help=f"seed of the chapters and draws sampled (calibration.seed, default {c.seed})")
    add_device(p)
    add_json(p, "the manifest record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.analysis.calibration import calibrate_run
    from ppn_bayes.device import resolve_device

    keys = {"unit": args.unit, "units": args.units, "blocks_per_unit": args.blocks_per_unit, "draws": args.price_draws,
            "steps": 0 if args.no_rederive else args.steps, "seed": args.seed}
    record = calibrate_run(args.run, {k: v for k, v in keys.items() if v is not None}, device=str(resolve_device(args.device)),
                           progress=not args.json, beta=args.beta)
    if args.json:
        print(json_text(record))
        return 0
    d = record["details"]
    if "se" in d:
        print(f"beta = {record['beta']:.4g} (se {d['se']:.2g}, 90% {_interval(d)}) by {record['method']}")
        print(f"  {record['unit']}: {d['sampled_units']} of {record['n_units']} sampled, {d['blocks_per_unit']} "
              f"blocks each, {d['draws']} draws; {d['dims']} of {d['dims_total']} score directions "
              f"({d['curvature_captured']:.0%} of the curvature); between-unit share of I {d['between_share']:.0%}")
    else:
        print(f"beta = {record['beta']:.4g}, {record['method']}")
    print(f"  trained with beta = {record['trained_with_beta']:g}; posterior {record['posterior']}"
          + (f" ({d['steps']} guide-only steps; guide sds x{d['guide_scale_ratio']:.2f})" if "steps" in d else ""))
    for kind, before in d["score_sd_before"].items():
        after = d.get("score_sd_after", {}).get(kind)
        print(f"  mean posterior sd of {kind} scores: {before:.4f}" + (f" -> {after:.4f}" if after is not None else ""))
    return 0


def _interval(d: dict) -> str:
    iv = d.get("interval_90")
    return "n/a" if not iv else f"{iv[0]:.3g}-{iv[1]:.3g}"
