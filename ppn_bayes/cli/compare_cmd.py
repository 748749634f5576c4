"""``ppn compare``: PPN and its peers on the same model, calibration and test data (one table).

Thin: parses flags, loads the model and the blocks, calls :func:`ppn_bayes.compare.comparison.compare` and
writes/prints what it returns. See ``docs/compare.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ppn_bayes.cli.options import add_device, add_json, comma_list, json_text

HELP = "compare PPN with GISP, ShortGPT, PrunePath, Wanda, SparseGPT and random pruning"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compare", help=HELP, description=HELP)
    p.add_argument("--model", default="smollm2-135m", help="alias, local directory or HF id (default: smollm2-135m)")
    p.add_argument("--data", default="bundled", help="corpus for calibration (train split) and test (default: bundled)")
    p.add_argument("--sizes", default="0.9,0.75,0.6,0.5,0.4",
                   help="fractions of decoder parameters to keep (default: 0.9,0.75,0.6,0.5,0.4)")
    p.add_argument("--methods", default=None,
                   help="comma-separated, from ppn,ppn-paper,ppn-healed,anchor,gisp,shortgpt,prunepath,wanda,sparsegpt,"
                        "random (default: the six peers, plus ppn when --run and ppn-paper when --paper-run is given; "
                        "ppn-healed: the --run's sub-networks healed per size, needs --heal-tokens)")
    p.add_argument("--run", default=None,
                   help="finished PPN run for the ppn rows (without it, ppn fits inference/smollm2-demo.yaml)")
    p.add_argument("--paper-run", default=None,
                   help="finished paper-preset run for the ppn-paper rows (without it, one is fitted: the demo "
                        "recipe's data and budget with the paper preset)")
    p.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks from the train split (default 16)")
    p.add_argument("--test-blocks", type=int, default=16, help="held-out test blocks (default 16)")
    p.add_argument("--transfer-data", default=None, metavar="CORPUS",
                   help="also measure every row on the test split of another corpus (e.g. kjv), which neither "
                        "calibration nor training saw: a transfer column, as a ratio to dense on the same blocks")
    p.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--heal-tokens", type=int, default=0,
                   help="fine-tune every peer on this many train tokens, disjoint from calibration (default 0)")
    p.add_argument("--heal-loss", default="data", metavar="{data,distill}",
                   help="what healing minimizes: data (next-token NLL) or distill (forward KL from the dense "
                        "model's logits, teacher without gradient); rows record it (default: data)")
    p.add_argument("--heal-lr", type=float, default=None, metavar="LR",
                   help="healing's AdamW learning rate, the same for every healed row (default 5e-5)")
    p.add_argument("--seeds", type=int, default=3, help="random keep-sets: number of seeds averaged (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--group-size", type=int, default=1, help="MLP channels per unit for gisp/random (default 1)")
    p.add_argument("--gisp-step", type=float, default=0.1, help="GISP: params fraction removed per iteration")
    p.add_argument("--gisp-objective", choices=("perplexity", "margin"), default="perplexity",
                   help="GISP's importance loss: perplexity (next-token NLL of the calibration blocks; rows "
                        "'gisp') or margin (the choice-task margin loss; rows 'gisp-margin') (default: perplexity)")
    p.add_argument("--gisp-choices", type=int, default=None, metavar="N",
                   help="margin objective: N cloze items cut from the bundled *train* novels by the shipped "
                        "ppn_persuasion_cloze task's rules, disjoint from its evaluated test items (default 16); "
                        "with --gisp-choices-file, its first N examples (default: all)")
    p.add_argument("--gisp-choices-file", default=None, metavar="FILE",
                   help='margin objective: your own JSONL of choice examples, one {"context": "...", '
                        '"choices": ["...", ...], "label": INDEX} per line')
    p.add_argument("--experts", type=int, default=16, help="PrunePath: experts per MLP (default 16)")
    p.add_argument("--anchor-kinds", default="layers,heads,groups",
                   help="anchor (the PPN prior's data score anchor alone, no training): the unit kinds it "
                        "ranks (default: layers,heads,groups; channel groups of --group-size)")
    p.add_argument("--decode-tokens", type=int, default=16,
                   help="batch-1 decode steps timed for the speedup column; 0 skips timing (default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass in evaluation (default 8)")
    add_device(p)
    p.add_argument("--out", default="compare-out", help="directory for compare.json/.md/.png (default compare-out)")
    add_json(p, "the results ({\"results\": [...]})")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    from ppn_bayes.errors import ConfigError

    for flag in ("calib_blocks", "test_blocks", "seeds", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    for flag in ("heal_tokens", "decode_tokens"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be 0 or more")
    if args.gisp_objective != "margin" and (args.gisp_choices is not None or args.gisp_choices_file):
        raise ConfigError("--gisp-choices and --gisp-choices-file apply to the margin objective; "
                          "add --gisp-objective margin")
    from ppn_bayes.baselines.gisp import check_step
    from ppn_bayes.compare.healing import check_heal_loss, check_heal_lr
    from ppn_bayes.config import check_seed

    check_heal_loss(args.heal_loss)
    if args.heal_lr is not None:
        if args.heal_tokens == 0:
            raise ConfigError("--heal-lr applies to healing; add --heal-tokens N")
        check_heal_lr(args.heal_lr)
    if args.heal_loss != "data" and args.heal_tokens == 0:
        raise ConfigError(f"--heal-loss {args.heal_loss} applies to healing; add --heal-tokens N")
    if args.methods and "ppn-healed" in args.methods.split(",") and args.heal_tokens == 0:
        raise ConfigError("method ppn-healed heals each size; add --heal-tokens N (e.g. the run's training tokens)")

    check_step(args.gisp_step)  # before the model loads
    check_seed(args.seed)
    if args.transfer_data is not None:
        from ppn_bayes.data.corpus import check_corpus

        if args.transfer_data == args.data:
            raise ConfigError(f"--transfer-data {args.transfer_data} is the --data corpus itself; name another "
                              "domain, e.g. --transfer-data kjv")
        check_corpus(args.transfer_data, "test")
    if args.gisp_choices is not None and args.gisp_choices < 1:
        raise ConfigError(f"--gisp-choices {args.gisp_choices} must be at least 1")


def _choice_items(args: argparse.Namespace, methods: list[str]) -> tuple[list[dict] | None, dict[str, Any]]:
    """The margin objective's choice items (text) and what the config records about them; checked before
    the model loads, so a bad file fails in a second."""
    from ppn_bayes.errors import ConfigError

    if args.gisp_objective != "margin":
        return None, {}
    if "gisp" not in methods:
        raise ConfigError("--gisp-objective margin applies to GISP; add gisp to --methods")
    from ppn_bayes.data.tasks import choices as ch

    if args.gisp_choices_file:
        items = ch.read_choices_file(args.gisp_choices_file)[: args.gisp_choices]
        source = str(args.gisp_choices_file)
    else:
        items = ch.calibration_items(args.gisp_choices or ch.DEFAULT_CHOICES)
        source = f"{ch.CALIBRATION_DATA}:{ch.CALIBRATION_SPLIT} cloze items ({ch.CALIBRATION_SEED})"
    overlap = ch.overlap_with_task(items)
    if overlap:
        import sys

        print(f"warning: {overlap} of the --gisp-choices-file examples are items of the evaluation task "
              "ppn_persuasion_cloze; its zero-shot scores would then be on calibration data", file=sys.stderr)
    return items, {"gisp_choices_source": source, "gisp_choices_in_eval_task": overlap}


def _methods(args: argparse.Namespace) -> list[str]:
    from ppn_bayes.compare.options import PEERS, check_methods

    if args.methods:
        return check_methods(args.methods.split(","))
    return (["ppn"] if args.run else []) + (["ppn-paper"] if args.paper_run else []) + list(PEERS)


def _inputs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """What ``--out`` must not overlap: every input given as a path."""
    import os

    given = [("model", args.model), ("run directory", args.run), ("paper run directory", args.paper_run),
             ("corpus", args.data), ("choices file", args.gisp_choices_file)]
    return [(what, path) for what, path in given if path is not None and os.path.lexists(os.path.expanduser(path))]


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.baselines import check_sizes
    from ppn_bayes.compare.outputs import check_out
    from ppn_bayes.device import resolve_device
    from ppn_bayes.files import writer_lock

    _validate(args)
    sizes = check_sizes(comma_list(args.sizes, float, "--sizes", "0.9,0.75,0.5"))
    methods = _methods(args)
    items, choice_info = _choice_items(args, methods)
    device = resolve_device(args.device)
    wants = {"ppn": {"ppn", "ppn-healed"}, "ppn-paper": {"ppn-paper"}}  # ppn-healed heals the ppn run's sizes
    fits = [m for m, given in (("ppn", args.run), ("ppn-paper", args.paper_run))
            if wants[m] & set(methods) and given is None]
    check_out(args.out, _inputs(args), fits)
    with writer_lock(args.out, "ppn compare"):
        check_out(args.out, _inputs(args), fits)  # again, now that no other writer can change it
        return _run(args, sizes, methods, items, choice_info, device)


def _run(args: argparse.Namespace, sizes: list[float], methods: list[str], items: list[dict] | None,
         choice_info: dict[str, Any], device: Any) -> int:
    from ppn_bayes.compare.comparison import compare
    from ppn_bayes.compare.options import CompareOptions
    from ppn_bayes.compare.outputs import markdown_table, write_outputs
    from ppn_bayes.data.corpus import calibration_blocks, token_blocks
    from ppn_bayes.hub.zoo import load_model, resolve_model

    model, tok = load_model(args.model, device=device)
    ctx = getattr(model.config, "max_position_embeddings", None)
    gisp_choices = None
    if items is not None:
        from ppn_bayes.data.tasks.choices import to_examples

        gisp_choices = to_examples(items, tok, max_length=ctx)
    heal_n = -(-args.heal_tokens // args.block_size) if args.heal_tokens else 0
    drawn = calibration_blocks(tok, args.calib_blocks + heal_n, args.block_size, args.seed, args.data,
                               max_context=ctx)
    calib, heal_blocks = drawn[:args.calib_blocks], (drawn[args.calib_blocks:] if heal_n else None)
    test = token_blocks(tok, "test", args.block_size, args.data, max_blocks=args.test_blocks, max_context=ctx)
    transfer = None if args.transfer_data is None else token_blocks(
        tok, "test", args.block_size, args.transfer_data, max_blocks=args.test_blocks, max_context=ctx)
    options = CompareOptions(
        heal_blocks=heal_blocks, heal_loss=args.heal_loss,
        **({} if args.heal_lr is None else {"heal_lr": args.heal_lr}), run_dir=args.run, paper_run_dir=args.paper_run,
        model_path=resolve_model(args.model) if {"ppn", "ppn-paper", "ppn-healed"} & set(methods) else None,
        fit_dir=args.out, seeds=tuple(range(args.seeds)), group_size=args.group_size, gisp_step=args.gisp_step,
        gisp_objective=args.gisp_objective, gisp_choices=gisp_choices, prunepath_experts=args.experts,
        anchor_kinds=tuple(comma_list(args.anchor_kinds, str, "--anchor-kinds", "layers,heads,groups")),
        decode_tokens=args.decode_tokens, batch_size=args.batch_size, progress=not args.json, transfer=transfer)
    result = compare(model, calib, test, sizes, methods, options)
    result["config"].update(model=args.model, data=args.data, transfer_data=args.transfer_data, seed=args.seed,
                            device=str(device), **choice_info)
    paths = write_outputs(result, args.out)
    if args.json:
        print(json_text({"results": result["results"], "dense": result["dense"], "costs": result["costs"],
                          "tokens": result["tokens"],
                          "config": result["config"], "files": paths}, sort_keys=True))
    else:
        print(markdown_table(result), end="")
        print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0
