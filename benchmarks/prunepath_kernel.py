"""PrunePath's CPU gather kernel vs the dense MLP at batch-1 decode: prints time ratios per kept fraction.

    python benchmarks/prunepath_kernel.py [--hidden 576] [--intermediate 1536] [--experts 16] [--reps 2000]

Uses a random SwiGLU MLP of the given shape (SmolLM2-135M's by default) MoEfied into ``--experts``
experts; for each number of kept experts it times ``gather_mlp`` on one token against the dense MLP
(three ``nn.Linear``) and prints dense_time / gather_time. No wall-clock assertion anywhere: ratios only.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ppn_bayes.baselines.prunepath import MoEMLP, Router, balanced_kmeans, gather_mlp, mlp_parts


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.manual_seed(0)
    mlp = SwiGLU(args.hidden, args.intermediate).eval()
    parts = mlp_parts(mlp)
    feats = torch.cat([parts["gate"], parts["up"]], dim=1)
    moe = MoEMLP(parts, balanced_kmeans(feats, args.experts, iters=3), Router(args.hidden, args.experts, 8))
    x = torch.randn(1, args.hidden)
    dense = best_time(lambda: mlp(x), args.reps)
    print(f"threads={torch.get_num_threads()} MLP {args.hidden}x{args.intermediate}, {args.experts} experts")
    print("kept_fraction  contiguous_ratio  scattered_ratio   (dense_time / gather_time; >1 is faster)")
    for kept in range(1, args.experts + 1, max(1, args.experts // 8)):
        contiguous = torch.zeros(args.experts, dtype=torch.bool)
        contiguous[:kept] = True
        scattered = torch.zeros(args.experts, dtype=torch.bool)
        scattered[torch.randperm(args.experts)[:kept]] = True
        t_c = best_time(lambda k=contiguous: gather_mlp(moe, x, k), args.reps)
        t_s = best_time(lambda k=scattered: gather_mlp(moe, x, k), args.reps)
        print(f"{kept / args.experts:13.3f}  {dense / t_c:16.2f}  {dense / t_s:15.2f}")


if __name__ == "__main__":
    main()
