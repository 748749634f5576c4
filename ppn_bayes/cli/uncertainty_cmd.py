"""``ppn uncertainty RUN --size 0.5 --k 8``: token-level epistemic uncertainty of sampled sub-networks."""

from __future__ import annotations

import argparse

from ppn_bayes.cli.options import add_device, add_json, add_posterior_options, json_text


def register(subparsers) -> None:
    from ppn_bayes.cli.keepset_cmd import add_target_args

    p = subparsers.add_parser("uncertainty", help="posterior predictive over sampled sub-networks (MI, AUROC, ECE)",
                              description="Average K sampled sub-networks at a size on held-out blocks: mutual "
                                          "information, variation ratio, AUROC for flagging errors, calibration.")
    p.add_argument("run", help="run directory written by `ppn fit`")
    add_target_args(p)
    p.add_argument("--k", type=int, default=8, help="sampled sub-networks (default 8)")
    p.add_argument("--blocks", type=int, default=4, help="held-out test blocks (default 4)")
    add_posterior_options(p, draws=False)
    add_device(p)
    add_json(p, "the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.analysis.uncertainty import run_uncertainty
    from ppn_bayes.errors import ConfigError

    if args.k < 2:
        raise ConfigError(f"--k must be >= 2 sub-networks to measure disagreement, got {args.k}")
    target = {k: getattr(args, k) for k in ("size", "params", "layers", "flops")}
    rep = run_uncertainty(args.run, **target, k=args.k, blocks=args.blocks, quantile=args.quantile,
                          seed=args.seed, device=args.device)
    if args.json:
        print(json_text(rep.to_dict()))
        return 0
    print(f"size {rep.size:.3g}: {rep.k} sub-networks, {rep.tokens} held-out tokens")
    print(f"  mutual information  mean {rep.mi_mean:.4f} nats   variation ratio mean {rep.variation_ratio_mean:.3f}")
    print(f"  AUROC flagging errors: MI {rep.auroc_mi:.3f}, variation ratio {rep.auroc_variation_ratio:.3f}, "
          f"averaged entropy {rep.auroc_total_entropy:.3f}; single-network entropy {rep.auroc_single_entropy:.3f}")
    print(f"  averaged: NLL {rep.nll_averaged:.4f}, error {rep.error_rate_averaged:.3f}, ECE {rep.ece_averaged:.4f}")
    print(f"  single:   NLL {rep.nll_single:.4f}, error {rep.error_rate_single:.3f}, ECE {rep.ece_single:.4f}")
    return 0
