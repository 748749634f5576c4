"""``ppn eval``: perplexity and zero-shot lm-eval tasks of a model, a resized export, or a run at a size.

Structure: the parser is built by :func:`add_arguments`; :func:`run` picks a *target*
(:func:`load_target`: ``--model`` dense or resized, or ``--run`` with ``--size``/``--dense``) and
*metrics* (perplexity on held-out blocks, ``--tasks`` through lm-eval), each a small function
returning a dict; :func:`emit` prints the merged result as one JSON object (``--json``) or as lines.
The work itself is in :mod:`ppn_bayes.evaluation.targets` and :mod:`ppn_bayes.evaluation.lmeval`.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from ppn_bayes.cli.options import add_device, add_json, add_posterior_options, json_text, quantile_of

HELP = "perplexity and zero-shot tasks of a model, a resized export or a run at a size"
DEFAULT_MODEL = "smollm2-135m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppn_bayes.data.tasks import LOCAL_TASK

    what = parser.add_argument_group("what to evaluate (one of)")
    what.add_argument("--model", default=None,
                      help="bundled alias (see `ppn models list`), local directory (a `ppn resize` export "
                           f"included) or Hugging Face id (default: {DEFAULT_MODEL})")
    what.add_argument("--run", default=None, help="run directory written by `ppn fit`; needs --size or --dense")
    what.add_argument("--size", type=float, default=None,
                      help="with --run: fraction of decoder parameters to keep, in (0, 1]")
    add_posterior_options(what, draws=False, seed=False, quantile_unset=True)
    what.add_argument("--dense", action="store_true", help="with --run: the run's whole network (lambda = 0)")
    add_posterior_options(what, quantile=False, seed=False)
    parser.add_argument("--data", default="bundled",
                        help="corpus: bundled (Austen), kjv, a local file/directory, or a HF dataset name")
    parser.add_argument("--split", default="test", help="corpus split (default: test)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (default: 256)")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="blocks (or lm-eval requests) per forward pass (default: 8)")
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                        help="measure perplexity (default: on; --no-perplexity with --tasks for tasks only)")
    parser.add_argument("--tasks", nargs="?", const=LOCAL_TASK, default=None, metavar="NAME[,NAME]",
                        help=f"zero-shot lm-eval tasks (needs `pip install 'ppn-bayes[eval]'`); bare --tasks "
                             f"runs the shipped offline task {LOCAL_TASK}")
    parser.add_argument("--limit", type=float, default=None,
                        help="with --tasks: items per task (a count, or a fraction below 1), for quick checks")
    parser.add_argument("--include-path", action="append", default=None, metavar="DIR",
                        help="with --tasks: a folder of your own lm-eval task YAMLs (repeatable)")
    add_device(parser)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hub checkpoint to run its own Python code (off by default)")
    add_json(parser)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, as a one-line error before anything is loaded."""
    from ppn_bayes.errors import ConfigError

    if args.run is not None and args.model is not None:
        raise ConfigError("pass either --model or --run, not both")
    if args.run is None:
        for flag, value in (("--size", args.size), ("--quantile", args.quantile), ("--dense", args.dense or None)):
            if value is not None:
                raise ConfigError(f"{flag} applies to a run; add --run RUN_DIR (or drop {flag})")
    elif args.size is None and not args.dense:
        raise ConfigError("--run needs --size S (a fraction of decoder parameters in (0, 1]) or --dense")
    elif args.size is not None and args.dense:
        raise ConfigError("--size and --dense exclude each other; --dense is the run's whole network")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ConfigError(f"--max-blocks {args.max_blocks} must be at least 1")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise ConfigError(f"--limit {args.limit:g} must be a finite count of items or a fraction in (0, 1), "
                          "e.g. --limit 100 or --limit 0.1")
    if args.tasks is None and (args.limit is not None or args.include_path):
        raise ConfigError("--limit and --include-path apply to --tasks; add --tasks NAME")
    if not args.perplexity and args.tasks is None:
        raise ConfigError("nothing to evaluate: --no-perplexity needs --tasks NAME")


def load_target(args: argparse.Namespace, device: Any):
    """The :class:`~ppn_bayes.evaluation.targets.EvalTarget` named by ``--model`` or ``--run``."""
    from ppn_bayes.evaluation.targets import load_model_target, load_run_target

    if args.run is not None:
        quantile = quantile_of(args)
        return load_run_target(args.run, size=args.size, quantile=quantile, dense=args.dense, device=device,
                               num_draws=args.draws)
    return load_model_target(args.model or DEFAULT_MODEL, device=device, trust_remote_code=args.trust_remote_code)


def eval_perplexity(target: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Perplexity of the target on ``--data``/``--split`` blocks."""
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.data.corpus import token_blocks

    blocks = token_blocks(target.tokenizer, args.split, args.block_size, args.data, max_blocks=args.max_blocks,
                          max_context=target.max_context)
    start = time.perf_counter()
    result = perplexity(target.model, blocks, batch_size=args.batch_size, device=device,
                        autocast_dtype=None, progress=not args.json)
    result.update(data=args.data, split=args.split, block_size=args.block_size,
                  seconds=round(time.perf_counter() - start, 2))
    return result


def eval_tasks(target: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Zero-shot lm-eval scores of the target: ``{"tasks": {...}, "limit", "lm_eval_version"}``."""
    from ppn_bayes.evaluation.lmeval import evaluate_tasks

    limit = args.limit
    if limit is not None and limit >= 1 and limit == int(limit):
        limit = int(limit)
    start = time.perf_counter()
    out = evaluate_tasks(target.model, target.tokenizer, args.tasks, limit=limit, batch_size=args.batch_size,
                         include_path=args.include_path)
    out["tasks_seconds"] = round(time.perf_counter() - start, 2)
    return out


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load the target once and run every requested metric on it; one merged result dict."""
    from ppn_bayes.data.corpus import check_corpus
    from ppn_bayes.device import resolve_device

    _validate(args)
    device = resolve_device(args.device)  # before loading, so a missing GPU, corpus or lm-eval fails fast
    if args.perplexity:
        check_corpus(args.data, args.split)
    if args.tasks is not None:
        from ppn_bayes.evaluation.lmeval import parse_tasks, require_lm_eval

        require_lm_eval()
        args.tasks = ",".join(parse_tasks(args.tasks))
    target = load_target(args, device)
    result: dict[str, Any] = {**target.info, "device": str(device)}
    if args.perplexity:
        result.update(eval_perplexity(target, args, device))
    if args.tasks is not None:
        result.update(eval_tasks(target, args))
    return result


def _describe(result: dict[str, Any]) -> str:
    if result.get("target") == "run":
        what = f"run {result['run']} " + ("dense (lambda 0)" if result.get("dense") else
                                          f"size {result['size']:g} (achieved {result['achieved_size']:.3f})")
        keep = result.get("keep")
        if keep:
            what += (f" | kept {keep['layers']}/{keep['of_layers']} layers, {keep['heads']}/{keep['of_heads']} heads, "
                     f"{keep['groups']}/{keep['of_groups']} channel groups")
        return what
    if result.get("target") == "resized" and result.get("size") is not None:
        return f"resized {result['model']} (size {result['size']:.3f}, {result.get('form')})"
    return f"model {result['model']}"


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json_text(result, sort_keys=True))
        return
    if "perplexity" in result:
        print(f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f}/token) on {result['tokens']:,} "
              f"tokens in {result['blocks']} blocks of {result['block_size']} | {_describe(result)} | data "
              f"{result['data']}:{result['split']} | {result['device']} {result['seconds']} s")
    else:
        print(_describe(result))
    for name, scores in result.get("tasks", {}).items():
        parts = [f"{m} {scores[m]:.3f} ± {scores.get(m + '_stderr', float('nan')):.3f}"
                 for m in ("acc", "acc_norm", "exact_match") if m in scores]
        print(f"{name}: {', '.join(parts) or 'no accuracy metric'} on {scores.get('samples', 0)} items")


def run(args: argparse.Namespace) -> int:
    emit(evaluate(args), args.json)
    return 0
