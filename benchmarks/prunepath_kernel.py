"""PrunePath's batch-1 decode kernels vs the dense MLP: prints time ratios per kept fraction.

    python benchmarks/prunepath_kernel.py [--hidden 576] [--intermediate 1536] [--experts 16] [--reps 2000]
                                          [--device cpu|cuda] [--dtype float32|bfloat16]

Uses a random SwiGLU MLP of the given shape (SmolLM2-135M's by default) MoEfied into ``--experts``
experts; for each number of kept experts it times ``gather_mlp`` on one token against the dense MLP
(three ``nn.Linear``) and prints dense_time / gather_time, for kept experts that are contiguous and
scattered. On CUDA with ``triton`` installed it also times the Triton kernel (``triton_mlp``, the path
``PPN_PRUNEPATH_KERNEL=triton`` forces) and prints its largest deviation from the gather path. No
wall-clock assertion anywhere: ratios only.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ppn_bayes.baselines.prunepath import (
    MoEMLP,
    Router,
    balanced_kmeans,
    gather_mlp,
    mlp_parts,
    triton_kernel,
)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def best_time(fn, reps: int, cuda: bool = False) -> float:
    best = float("inf")
    fn()  # warm-up (compiles a Triton kernel on its first call)
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    mlp = SwiGLU(args.hidden, args.intermediate).eval()
    parts = mlp_parts(mlp)
    feats = torch.cat([parts["gate"], parts["up"]], dim=1)
    moe = MoEMLP(parts, balanced_kmeans(feats, args.experts, iters=3), Router(args.hidden, args.experts, 8))
    mlp, moe = mlp.to(device, dtype), moe.to(device, dtype)
    x = torch.randn(1, args.hidden, device=device, dtype=dtype)
    kernel, why = triton_kernel() if cuda else (None, "not on CUDA")
    dense = best_time(lambda: mlp(x), args.reps, cuda)
    where = torch.cuda.get_device_name(device) if cuda else f"cpu threads={torch.get_num_threads()}"
    print(f"{where} {args.dtype} MLP {args.hidden}x{args.intermediate}, {args.experts} experts; "
          f"dense {dense * 1e6:.1f} us/token")
    cols = "kept_fraction  gather_contiguous  gather_scattered"
    print(cols + ("  triton_contiguous  triton_scattered  triton_max_abs_diff" if kernel else
                  f"   (no Triton column: {why})"))
    print("  (ratios are dense_time / kernel_time; >1 is faster)")
    for kept in range(1, args.experts + 1, max(1, args.experts // 8)):
        contiguous = torch.zeros(args.experts, dtype=torch.bool, device=device)
        contiguous[:kept] = True
        scattered = torch.zeros(args.experts, dtype=torch.bool, device=device)
        scattered[torch.randperm(args.experts)[:kept]] = True
        t_c = best_time(lambda k=contiguous: gather_mlp(moe, x, k), args.reps, cuda)
        t_s = best_time(lambda k=scattered: gather_mlp(moe, x, k), args.reps, cuda)
        line = f"{kept / args.experts:13.3f}  {dense / t_c:17.2f}  {dense / t_s:16.2f}"
        if kernel:
            k_c = best_time(lambda k=contiguous: kernel.triton_mlp(moe, x, k), args.reps, cuda)
            k_s = best_time(lambda k=scattered: kernel.triton_mlp(moe, x, k), args.reps, cuda)
            diff = float((kernel.triton_mlp(moe, x, scattered).float() - gather_mlp(moe, x, scattered).float())
                         .abs().max())
            line += f"  {dense / k_c:17.2f}  {dense / k_s:16.2f}  {diff:19.2e}"
        print(line)


if __name__ == "__main__":
    main()
