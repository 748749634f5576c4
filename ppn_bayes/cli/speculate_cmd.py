"""``ppn speculate``: self-speculative decoding with sub-network drafts; picks the fastest setting.

Thin: parsing and printing only; see :mod:`ppn_bayes.evaluation.speculative`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ppn_bayes.cli.options import add_device, add_json, comma_list, json_text

HELP = "self-speculative decoding: sub-network drafts verified by the full model"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("speculate", help=HELP, description=HELP)
    parser.add_argument("--model", default="smollm2-135m", help="alias, local directory or Hub id")
    parser.add_argument("--run", default=None, help="run directory whose keep-sets draft (default: the "
                        "highest-norm layers)")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--sizes", default="0.25,0.5,0.75", help="draft sizes (fraction of decoder params)")
    parser.add_argument("--draft-lengths", default="2,4,6", help="tokens drafted per round")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats; the median is reported")
    add_device(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppn_bayes.device import resolve_device
    from ppn_bayes.errors import ConfigError
    from ppn_bayes.evaluation.bench import keepsets_for
    from ppn_bayes.evaluation.speculative import benchmark_speculative, format_result
    from ppn_bayes.export.switch import SubnetSwitch
    from ppn_bayes.hub.zoo import load_model

    sizes = comma_list(args.sizes, float, "--sizes")
    lengths = comma_list(args.draft_lengths, int, "--draft-lengths", "2,4")
    if min(lengths) < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise ConfigError("--draft-lengths, --max-new-tokens and --repeats must be >= 1")
    device = resolve_device(args.device)
    amplitudes: dict[float, dict | None] = {}
    if args.run:  # verifier = the run's trained network; drafts = its keep-sets with their amplitudes
        from ppn_bayes.run import load_run

        run_ = load_run(args.run)
        results = {s: run_.keepset(size=s) for s in sizes}
        keepsets, inventory = {s: r.keep for s, r in results.items()}, run_.inventory
        amplitudes = {s: run_.posterior.push.amplitudes(r.lam) if r.lam > 0 else None for s, r in results.items()}
        model, tokenizer = run_.load_model(str(device)), run_.load_tokenizer()
    else:
        model, tokenizer = load_model(args.model, device=device)
        keepsets, inventory = keepsets_for(model, sizes, None)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty after tokenization; give some text")
    sw = SubnetSwitch(model, inventory)
    try:
        result = benchmark_speculative(sw, ids, keepsets, lengths, args.max_new_tokens, repeats=args.repeats,
                                       amplitudes=amplitudes)
    finally:
        sw.close()
    out = result.to_dict()
    out["model"] = args.run or args.model
    if result.best:
        best_keep = keepsets[result.best["size"]]
        from ppn_bayes.evaluation.speculative import speculative_generate

        sw = SubnetSwitch(model, inventory)
        try:
            text_ids, _ = speculative_generate(sw, best_keep, ids, args.max_new_tokens, result.best["draft_length"],
                                               amplitudes=amplitudes.get(result.best["size"]))
        finally:
            sw.close()
        out["text"] = tokenizer.decode(text_ids[0, ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        print(json_text(out, indent=2))
    else:
        print(format_result(result))
        if "text" in out:
            print("output: " + out["text"].replace("\n", " "))
    return 0
