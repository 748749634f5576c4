"""``ppn keepset RUN --size 0.5``: the keep-set at a target size, with its uncertainty (JSON or text)."""

from __future__ import annotations

import argparse
import sys

from ppn_bayes.cli.options import add_device, add_json, add_posterior_options, json_text


def add_target_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The four ways to ask for a size (shared by ``keepset`` and ``uncertainty``)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--size", type=float, help="fraction of decoder parameters to keep, in (0, 1]")
    g.add_argument("--params", type=float, help="decoder parameters to keep (embeddings are never pruned)")
    g.add_argument("--layers", type=int, help="number of whole layers to keep")
    g.add_argument("--flops", type=float, help="FLOPs per token: a fraction in (0, 1] or an absolute count")


def register(subparsers) -> None:
    p = subparsers.add_parser("keepset", help="keep-set at a target size, with inclusion probabilities",
                              description="Solve lambda* for a target size and print the nested keep-set "
                                          "with per-unit inclusion probabilities (reads only the posterior).")
    p.add_argument("run", help="run directory written by `ppn fit`")
    add_target_args(p)
    add_posterior_options(p)
    p.add_argument("--eval", action="store_true", help="also measure held-out loss of the keep-set and of "
                   "sampled keep-sets (loads the model)")
    p.add_argument("--blocks", type=int, default=4, help="test blocks for --eval (default 4)")
    p.add_argument("--samples", type=int, default=8, help="sampled keep-sets for --eval (default 8)")
    add_device(p, "for --eval")
    add_json(p, "the keep-set (per-unit probabilities included)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.bayes.keepsets import keepset

    target = {k: getattr(args, k) for k in ("size", "params", "layers", "flops")}
    result = keepset(args.run, **target, quantile=args.quantile, num_draws=args.draws, seed=args.seed)
    if args.eval:
        from ppn_bayes.analysis.uncertainty import evaluate_run_keepset

        result.eval = evaluate_run_keepset(args.run, result, blocks=args.blocks, samples=args.samples,
                                           device=args.device)
    from ppn_bayes.analysis.report import fit_warning

    warning = fit_warning(args.run)
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        print(json_text(result.to_dict()))
    else:
        from ppn_bayes.analysis.report import keepset_text

        print(keepset_text(result))
    return 0
