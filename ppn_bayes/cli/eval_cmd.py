"""``ppn eval``: held-out perplexity of a base model on a corpus split.

Structure, so that later sources (a run's sub-network at a size, lm-eval tasks) slot in: the parser
is built by :func:`add_arguments`; :func:`run` picks a *target* (today: a base model) and a
*metric* (today: perplexity), each a small function returning a dict; :func:`emit` prints any
result dict as one JSON object (``--json``) or as one human line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

HELP = "perplexity of a model on held-out token blocks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="bundled alias (see `ppn models list`), local directory or Hugging Face id "
                             "(default: smollm2-135m)")
    parser.add_argument("--data", default="bundled",
                        help="corpus: bundled (Austen), kjv, a local file/directory, or a HF dataset name")
    parser.add_argument("--split", default="test", help="corpus split (default: test)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (default: 256)")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hub checkpoint to run its own Python code (off by default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a line")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    from ppn_bayes.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ConfigError(f"--max-blocks {args.max_blocks} must be at least 1")


def eval_base_model(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of the dense base model named by ``--model``."""
    from ppn_bayes.data import check_corpus, token_blocks
    from ppn_bayes.device import resolve_device
    from ppn_bayes.evaluate import perplexity
    from ppn_bayes.zoo import load_model

    device = resolve_device(args.device)  # before loading, so a missing GPU or corpus fails fast
    check_corpus(args.data, args.split)
    model, tokenizer = load_model(args.model, device=device, trust_remote_code=args.trust_remote_code)
    blocks = token_blocks(tokenizer, args.split, args.block_size, args.data, max_blocks=args.max_blocks,
                          max_context=getattr(model.config, "max_position_embeddings", None))
    start = time.perf_counter()
    result = perplexity(model, blocks, batch_size=args.batch_size, device=device,
                        autocast_dtype=None, progress=not args.json)
    result.update(model=args.model, data=args.data, split=args.split, block_size=args.block_size,
                  device=str(device), seconds=round(time.perf_counter() - start, 2))
    return result


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f}/token) on {result['tokens']:,} "
          f"tokens in {result['blocks']} blocks of {result['block_size']} | model {result['model']} | "
          f"data {result['data']}:{result['split']} | {result['device']} {result['seconds']} s")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    emit(eval_base_model(args), args.json)
    return 0
