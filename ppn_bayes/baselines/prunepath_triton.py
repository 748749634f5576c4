"""PrunePath's Triton decoding kernel: one token's routed MLP over the kept experts only.

Imported lazily by :mod:`ppn_bayes.baselines.prunepath` (``triton`` is an optional dependency,
``pip install ppn-bayes[triton]``); importing this module raises ``ImportError`` without it.

Two kernels over the expert-major weights of a :class:`~ppn_bayes.baselines.prunepath.MoEMLP`
(``w_up`` / ``w_gate`` ``[E, k, d]``, ``w_out`` ``[E, k, d_out]``), given the kept expert ids:

1. ``_hidden``: grid ``(n_kept, ceil(k / BLOCK_R))``; each program computes ``BLOCK_R`` neurons of one
   kept expert, the up (and, for SwiGLU, gate) GEMV rows fused with the bias and activation
   (``act(gate) * up``, or ``act(up)`` for a non-gated GPT-2 MLP), into a compact ``[n_kept, k]``
   float32 buffer.
2. ``_down``: grid ``(n_kept, ceil(d_out / BLOCK_N))``; each program multiplies one kept expert's hidden
   vector by its ``[k, BLOCK_N]`` slice of ``w_out`` into a ``[n_kept, d_out]`` float32 partial; the
   partials are summed (fixed order: deterministic, no atomics) and ``b_out`` added.

Only the kept experts' weight rows are read. Accumulation is float32 whatever the weight dtype; the
result is cast to the input's dtype. Activations: SiLU (Llama family), exact GELU, tanh-approximated GELU
(GPT-2's ``gelu_new``) and ReLU; :func:`activation_code` returns ``None`` for anything else and the
caller falls back to the gather path.

On CUDA tensors the kernels are compiled. With ``TRITON_INTERPRET=1`` set before ``triton`` is first
imported, they run in Triton's interpreter instead, on CPU tensors too (slow: for tests only).
"""

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2, 3

_ACT_BY_NAME = {
    "SiLU": ACT_SILU, "SiLUActivation": ACT_SILU,
    "GELUActivation": ACT_GELU,  # exact (erf) GELU, either of its implementations
    "NewGELUActivation": ACT_GELU_TANH, "GELUTanh": ACT_GELU_TANH, "PytorchGELUTanh": ACT_GELU_TANH,
    "FastGELUActivation": ACT_GELU_TANH,
    "ReLU": ACT_RELU,
}


def activation_code(act) -> int | None:
    """The kernel's code for an MLP activation module/function, or ``None`` when it has none."""
    if isinstance(act, nn.GELU):
        return ACT_GELU_TANH if act.approximate == "tanh" else ACT_GELU
    if act is F.silu:
        return ACT_SILU
    if act is F.gelu:
        return ACT_GELU
    if act is F.relu:
        return ACT_RELU
    return _ACT_BY_NAME.get(type(act).__name__)


# No `from __future__ import annotations` in this module: Triton reads the `tl.constexpr` annotations.


@triton.jit
def _hidden_kernel(x_ptr, idx_ptr, w_up_ptr, b_up_ptr, w_gate_ptr, b_gate_ptr, h_ptr,
                   D, K, s_ue, s_uk, s_bue, s_ge, s_gk, s_bge,
                   HAS_GATE: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_B_GATE: tl.constexpr,
                   ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0)  # slot among the kept experts
    e = tl.load(idx_ptr + j).to(tl.int64)  # expert id
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < K
    acc_u = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        m2 = rmask[:, None] & cmask[None, :]
        wu = tl.load(w_up_ptr + e * s_ue + rows[:, None] * s_uk + cols[None, :], mask=m2, other=0.0)
        acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        if HAS_GATE:
            wg = tl.load(w_gate_ptr + e * s_ge + rows[:, None] * s_gk + cols[None, :], mask=m2, other=0.0)
            acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
    if HAS_B_UP:
        acc_u += tl.load(b_up_ptr + e * s_bue + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        z = acc_g
        if HAS_B_GATE:
            z += tl.load(b_gate_ptr + e * s_bge + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        z = acc_u
    if ACT == 0:  # SiLU
        a = z * tl.sigmoid(z)
    elif ACT == 1:  # exact GELU
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU: 0.5 z (1 + tanh(u)) == z * sigmoid(2u), 2 sqrt(2 / pi) = 1.5957...
        a = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:  # ReLU
        a = tl.maximum(z, 0.0)
    if HAS_GATE:
        h = a * acc_u
    else:
        h = a
    tl.store(h_ptr + j * K + rows, h, mask=rmask)


@triton.jit
def _down_kernel(h_ptr, idx_ptr, w_out_ptr, part_ptr, K, N, s_oe, s_ok,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    j = tl.program_id(0)
    e = tl.load(idx_ptr + j).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, K, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < K
        hv = tl.load(h_ptr + j * K + rows, mask=rmask, other=0.0)
        w = tl.load(w_out_ptr + e * s_oe + rows[:, None] * s_ok + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * hv[:, None], axis=0)
    tl.store(part_ptr + j * N + cols, acc, mask=cmask)


# Triton picks compiled or interpreted once, when it is imported (its own `tl.zeros` & co. are jit
# functions decorated then): TRITON_INTERPRET=1 must be set before the first `import triton`.
INTERPRETED = type(_hidden_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_mlp(m, x: torch.Tensor, keep: torch.Tensor, *, block_r: int = 32, block_d: int = 128,
               block_n: int = 128) -> torch.Tensor:
    """The MLP of one token ``x [1, d]`` over the kept experts (``keep [E]`` bool), as :func:`gather_mlp`.

    Compiled kernels need CUDA tensors; CPU tensors run only when Triton was imported in interpreter mode
    (:data:`INTERPRETED`). Raises ``ValueError`` for an activation the kernel does not have, or for CPU
    tensors without the interpreter.
    """
    code = activation_code(m.act)
    if code is None:
        raise ValueError(f"the Triton kernel has no activation {type(m.act).__name__}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the compiled Triton kernel needs CUDA tensors, not {x.device.type}; for the interpreter "
                         "set TRITON_INTERPRET=1 before triton is first imported")
    d, k = x.shape[-1], m.k
    n_out = m.w_out.shape[-1]
    idx = torch.nonzero(keep.reshape(-1)).flatten().to(device=x.device, dtype=torch.int32)
    n_kept = int(idx.numel())
    if n_kept == 0:
        y = torch.zeros(1, n_out, dtype=x.dtype, device=x.device)
        return y if m.b_out is None else y + m.b_out
    xv = x.reshape(-1).contiguous()
    w_up = _last_dim_contiguous(m.w_up)
    w_gate = None if m.w_gate is None else _last_dim_contiguous(m.w_gate)
    w_out = _last_dim_contiguous(m.w_out)
    b_up = None if m.b_up is None else _last_dim_contiguous(m.b_up)
    b_gate = None if m.b_gate is None else _last_dim_contiguous(m.b_gate)
    h = torch.empty(n_kept, k, dtype=torch.float32, device=x.device)
    part = torch.empty(n_kept, n_out, dtype=torch.float32, device=x.device)
    br, bd, bn = _pow2(k, block_r), _pow2(d, block_d), _pow2(n_out, block_n)
    dummy = w_up  # never read: the matching HAS_* flag is False
    _hidden_kernel[(n_kept, triton.cdiv(k, br))](
        xv, idx, w_up, dummy if b_up is None else b_up, dummy if w_gate is None else w_gate,
        dummy if b_gate is None else b_gate, h,
        d, k, w_up.stride(0), w_up.stride(1), 0 if b_up is None else b_up.stride(0),
        0 if w_gate is None else w_gate.stride(0), 0 if w_gate is None else w_gate.stride(1),
        0 if b_gate is None else b_gate.stride(0),
        HAS_GATE=w_gate is not None, HAS_B_UP=b_up is not None, HAS_B_GATE=b_gate is not None,
        ACT=code, BLOCK_R=br, BLOCK_D=bd)
    _down_kernel[(n_kept, triton.cdiv(n_out, bn))](
        h, idx, w_out, part, k, n_out, w_out.stride(0), w_out.stride(1), BLOCK_R=br, BLOCK_N=bn)
    y = part.sum(0, keepdim=True)
    if m.b_out is not None:
        y = y + m.b_out.float()
    return y.to(x.dtype)

