"""Decode/prefill speed of SmolLM2-135M dense vs layer-resized (highest-norm layers), with ideal ratios.

    OMP_NUM_THREADS=2 python benchmarks/speed.py [--model smollm2-135m] [--json out.json]

A thin script over :func:`ppn_bayes.evaluation.bench.speed_benchmark`; ``ppn bench speed`` does the same.
"""

from __future__ import annotations

import argparse
import json

import torch

from ppn_bayes.evaluation.bench import format_table, keepsets_for, speed_benchmark
from ppn_bayes.hub.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="0.75,0.5,0.25")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_model(args.model, device="cpu")
    keepsets, inv = keepsets_for(model, [float(s) for s in args.sizes.split(",")])
    result = speed_benchmark(model, keepsets, inv, batch_sizes=[1, 4], prompt_len=64, new_tokens=32,
                             repeats=3, warmup=1)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
