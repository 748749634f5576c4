"""Self-speculative greedy decoding on SmolLM2-135M: acceptance and speedup per draft size and length.

    OMP_NUM_THREADS=2 python benchmarks/speculative.py [--model smollm2-135m]

Drafts are highest-norm layer subsets of the same weights (no run needed; a fitted run's keep-sets
would be better drafts). Dense baseline: greedy decoding with a KV cache, one token per forward.
"""

from __future__ import annotations

import argparse

from ppn_bayes.evaluation.bench import keepsets_for
from ppn_bayes.evaluation.speculative import benchmark_speculative, format_result
from ppn_bayes.export.switch import SubnetSwitch
from ppn_bayes.hub.zoo import load_model

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="0.25,0.5,0.75")
    ap.add_argument("--draft-lengths", default="2,4,6")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu")
    keepsets, inv = keepsets_for(model, [float(s) for s in args.sizes.split(",")])
    ids = tok(PROMPT, return_tensors="pt").input_ids
    sw = SubnetSwitch(model, inv)
    res = benchmark_speculative(sw, ids, keepsets, [int(k) for k in args.draft_lengths.split(",")],
                                args.max_new_tokens, repeats=1)
    print(format_result(res))


if __name__ == "__main__":
    main()
