"""A local model for the GPU script: the bundled SmolLM2-135M when it is cached, else a stand-in.

The device machine reaches no package registry, and the bundled model (540 MB as float32
safetensors) is larger than what a device call may carry, so ``benchmarks/gpu/run.sh`` builds a
**stand-in**: a Llama with SmolLM2-135M's exact shape (30 layers, hidden 576, 9 query / 3 KV heads,
MLP 1536, vocabulary 49152) and random weights, with a small byte-level BPE tokenizer trained on the
bundled corpus. Speed, memory and "does it run on CUDA" figures are the real model's (they depend
on shapes only); perplexities are not, and the script labels them as the stand-in's.

    python benchmarks/gpu/stand_in_model.py OUT_DIR [--tiny]

prints the model directory to use: the cached SmolLM2 if present, else OUT_DIR with the stand-in
(``--tiny``: a 2-layer toy of the same family, for the CPU smoke run of the script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy (the script's CPU smoke run)")
    args = ap.parse_args()
    from ppn_bayes.hub.zoo import ppn_home

    cached = ppn_home() / "models" / "smollm2-135m"
    if not args.tiny and (cached / "config.json").is_file():
        print(cached)
        return 0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppn_bayes.data.corpus import load_corpus, train_bpe_tokenizer

    if (args.out / "config.json").is_file():
        print(args.out)
        return 0
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512) if args.tiny else
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152))
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, **shape)
    model = LlamaForCausalLM(config)
    tok = train_bpe_tokenizer(load_corpus("bundled", "train")[0][:200_000], vocab_size=512)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
