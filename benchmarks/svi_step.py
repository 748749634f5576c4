"""SVI step cost vs a plain training step, on the same batch and weights mode.

    python benchmarks/svi_step.py [--model smollm2-135m] [--mode lora] [--block 128] [--batch 2] [--steps 6]

A *plain* step is what fine-tuning the same trainable weights costs: next-token loss of the dense
model, backward, gradient clipping, AdamW step. An *SVI* step is :func:`ppn_bayes.training.loop.train_step`:
guide sample, lambda and mask draws, the gated forward, the ELBO terms with their NaN checks, backward,
per-group gradient norms, clipping, AdamW over guide + push + weights. Steps of the two kinds are
interleaved (plain, SVI, plain, ...) so that a machine shared with other work slows both alike.
Two SVI variants are timed: natural lambda draws (1/3 dense steps) and every step pruned (p_dense = 0).

Peak memory: a sampling thread reads the process's resident set (CPU) every 2 ms during each step
and records the peak above the level before the step; on CUDA ``torch.cuda.max_memory_allocated``.
Prints one JSON object with the medians and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time

import torch
import torch.nn.functional as F


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry, during the ``with`` block."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self._stop = rss_bytes(), threading.Event()
        self._top = self.base

        def sample():
            while not self._stop.is_set():
                self._top = max(self._top, rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, rss_bytes()) - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each kind (after 1 warm-up each)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.device import autocast_context
    from ppn_bayes.training.build import build
    from ppn_bayes.training.loop import train_step

    recipe = recipe_from_dict({"model": {"name": args.model}, "units": {"group_size": args.group_size},
                               "data": {"block_size": args.block, "val_blocks": 1},
                               "train": {"batch_size": args.batch, "weights": args.mode, "device": args.device,
                                         "steps": 1000}})
    device = torch.device(args.device)
    s = build(recipe, tempfile.mkdtemp(prefix="svi-bench-"), device=device)
    weights = s.groups["weights"] + s.groups.get("weights_nodecay", [])
    plain_opt = torch.optim.AdamW(weights, lr=recipe.train.lr_weights, betas=(0.9, 0.95))
    amp = torch.bfloat16 if recipe.train.bf16 else None

    def plain(step: int) -> None:
        ids = s.train_blocks[step * args.batch:(step + 1) * args.batch].to(device)
        with autocast_context(device, amp):
            logits = s.gated(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, recipe.train.clip_grad)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    natural = s.ppn.push.config
    pruned = dataclasses.replace(natural, p_dense=0.0)

    def svi(config):
        def run(step: int) -> None:
            s.ppn.push.config = config
            train_step(s, step)
        return run

    kinds = {"plain": plain, "svi": svi(natural), "svi_pruned": svi(pruned)}
    times = {k: [] for k in kinds}
    peaks = {k: [] for k in kinds}
    for i in range(args.steps + 1):
        for name, fn in kinds.items():
            with PeakMemory(device) as mem:
                tic = time.perf_counter()
                fn(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - tic
            if i > 0:  # the first round is warm-up
                times[name].append(elapsed)
                peaks[name].append(mem.peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: max(v) for k, v in peaks.items()}
    out = {"model": args.model, "mode": args.mode, "block": args.block, "batch": args.batch, "steps": args.steps,
           "device": str(device), "threads": torch.get_num_threads(),
           "seconds_median": med, "peak_mib": {k: v / 2**20 for k, v in mem.items()},
           "time_ratio_svi": med["svi"] / med["plain"], "time_ratio_svi_pruned": med["svi_pruned"] / med["plain"],
           "memory_ratio_svi": mem["svi"] / max(1, mem["plain"]),
           "memory_ratio_svi_pruned": mem["svi_pruned"] / max(1, mem["plain"])}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
