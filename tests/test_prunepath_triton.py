"""PrunePath's Triton decoding kernel equals the gather path and the dense MLP (float32).

``triton`` is optional (``pip install 'ppn-bayes[triton]'``): without it the kernel tests skip with a
reason. Without CUDA they run in Triton's interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1``
before ``triton`` is first imported: this module sets it at collection when triton is not imported yet
(nothing else in the suite uses Triton). With CUDA the compiled kernel runs, in float32 and bfloat16.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from ppn_bayes.baselines import prunepath
from ppn_bayes.baselines.prunepath import (
    KERNEL_ENV,
    MoEMLP,
    Router,
    balanced_kmeans,
    decode_mlp,
    gather_mlp,
    mlp_parts,
    resolve_kernel,
)
from ppn_bayes.errors import ConfigError

CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON and not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if CUDA else "cpu"
# float32 with float32 accumulation: only the summation order differs from gather_mlp / the dense MLP
# (outputs are O(1): inputs ~N(0, 1), default nn.Linear init).
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(scope="module")
def kernel():
    """The kernel module, or a skip saying why it cannot run here."""
    pytest.importorskip("triton", reason="triton is not installed (optional: pip install 'ppn-bayes[triton]')")
    from ppn_bayes.baselines import prunepath_triton

    if not CUDA and not prunepath_triton.INTERPRETED:
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set (interpreter off)")
    return prunepath_triton


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int, bias: bool, act: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=bias), act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Plain(nn.Module):
    """A GPT-2-shaped (non-gated) MLP, with ``nn.Linear`` instead of ``Conv1D``."""

    def __init__(self, d: int, f: int, bias: bool, act: nn.Module):
        super().__init__()
        self.c_fc, self.c_proj, self.act = nn.Linear(d, f, bias=bias), nn.Linear(f, d, bias=bias), act

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def _moe(mlp: nn.Module, n_experts: int) -> MoEMLP:
    parts = mlp_parts(mlp)
    feats = parts["up"] if parts["gate"] is None else torch.cat([parts["gate"], parts["up"]], dim=1)
    return MoEMLP(parts, balanced_kmeans(feats, n_experts, iters=3), Router(1, 1, 1))


def _random_mlp(style: str, d: int, f: int, bias: bool, act: nn.Module) -> nn.Module:
    torch.manual_seed(d + f)
    mlp = (SwiGLU if style == "swiglu" else Plain)(d, f, bias, act).eval()
    if bias:  # nonzero biases everywhere
        with torch.no_grad():
            for name, p in mlp.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    return mlp


def _selections(E: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(E)
    one = torch.zeros(E, dtype=torch.bool)
    one[E // 2] = True
    last = torch.zeros(E, dtype=torch.bool)
    last[-1] = True
    run = torch.zeros(E, dtype=torch.bool)
    run[1:E // 2 + 1] = True
    scattered = torch.zeros(E, dtype=torch.bool)
    scattered[torch.randperm(E, generator=gen)[:E // 2 + 1]] = True
    return {"all": torch.ones(E, dtype=torch.bool), "one": one, "last": last, "run": run, "scattered": scattered}


def _dense_masked(m: MoEMLP, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The masked dense product (MoEMLP's many-token path) for one token."""
    h = m.hidden(x) * keep.to(x.dtype)[None, :, None]
    y = h.reshape(1, -1) @ m.w_out.reshape(m.E * m.k, -1)
    return y if m.b_out is None else y + m.b_out


CASES = [  # (style, d, f, experts, bias, activation): odd sizes exercise the masks, big ones the loops
    ("swiglu", 40, 96, 8, False, nn.SiLU()),
    ("swiglu", 200, 384, 6, True, nn.SiLU()),  # d > BLOCK_D, k = 64 > BLOCK_R
    ("swiglu", 24, 48, 4, True, nn.GELU(approximate="tanh")),
    ("plain", 40, 96, 8, True, nn.GELU()),
    ("plain", 136, 320, 5, True, nn.GELU(approximate="tanh")),
    ("plain", 40, 64, 4, False, nn.ReLU()),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-E{c[3]}-{type(c[5]).__name__}")
def test_triton_kernel_equals_gather_and_dense(kernel, case):
    style, d, f, E, bias, act = case
    mlp = _random_mlp(style, d, f, bias, act).to(DEVICE)
    m = _moe(mlp, E)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        for name, keep in _selections(E).items():
            keep = keep.to(DEVICE)
            got = kernel.triton_mlp(m, x, keep)
            assert got.shape == (1, d) and got.dtype == x.dtype
            assert torch.allclose(got, gather_mlp(m, x, keep), atol=ATOL, rtol=RTOL), name
            assert torch.allclose(got, _dense_masked(m, x, keep), atol=ATOL, rtol=RTOL), name
        assert torch.allclose(kernel.triton_mlp(m, x, torch.ones(E, dtype=torch.bool, device=DEVICE)), mlp(x),
                              atol=ATOL, rtol=RTOL)
        none = kernel.triton_mlp(m, x, torch.zeros(E, dtype=torch.bool, device=DEVICE))
        assert torch.allclose(none, gather_mlp(m, x, torch.zeros(E, dtype=torch.bool, device=DEVICE)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_kernel_on_real_mlps(kernel, family):
    """transformers' own MLPs: SiLUActivation (Llama) and GPT-2's Conv1D with NewGELUActivation."""
    model = tiny_model(family, intermediate_size=96).to(DEVICE)
    mlp = model.model.layers[1].mlp if family == "llama" else model.transformer.h[1].mlp
    m = _moe(mlp, 8)
    assert kernel.activation_code(m.act) is not None
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        for name, keep in _selections(8).items():
            keep = keep.to(DEVICE)
            assert torch.allclose(kernel.triton_mlp(m, x, keep), gather_mlp(m, x, keep), atol=ATOL, rtol=RTOL), name
        assert torch.allclose(kernel.triton_mlp(m, x, torch.ones(8, dtype=torch.bool, device=DEVICE)), mlp(x),
                              atol=ATOL, rtol=RTOL)


def test_forced_triton_path_in_forward(kernel, monkeypatch):
    """A batch-1 forward with the kernel forced (attribute, argument, env var) equals the gather path."""
    m = _moe(_random_mlp("swiglu", 40, 96, True, nn.SiLU()), 8).to(DEVICE)
    m.router = Router(40, 8, 16).to(DEVICE)
    m.tau = 0.6
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        keep = m.routing(x)[0]
        assert 0 < int(keep.sum()) < 8
        m.kernel = "gather"
        ref = m(x)
        m.kernel = "triton"
        assert torch.allclose(m(x), ref, atol=ATOL, rtol=RTOL)
        m.kernel = None
        monkeypatch.setenv(KERNEL_ENV, "triton")
        assert resolve_kernel(m, x) == "triton"
        assert torch.allclose(m(x), ref, atol=ATOL, rtol=RTOL)
        assert torch.allclose(decode_mlp(m, x, keep, kernel="triton"), ref, atol=ATOL, rtol=RTOL)
        assert resolve_kernel(m, x, "gather") == "gather"  # the argument beats the env var


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the compiled kernel and its bfloat16 path")
def test_triton_kernel_cuda_auto_and_bfloat16(kernel):
    m = _moe(_random_mlp("swiglu", 256, 768, False, nn.SiLU()), 16).cuda()
    x = torch.randn(1, 256, device="cuda")
    keep = _selections(16)["scattered"].cuda()
    assert resolve_kernel(m, x) == "triton"  # auto on CUDA
    with torch.no_grad():
        assert torch.allclose(kernel.triton_mlp(m, x, keep), gather_mlp(m, x, keep), atol=ATOL, rtol=RTOL)
        xb = x.to(torch.bfloat16)
        got = kernel.triton_mlp(m.to(torch.bfloat16), xb, keep)  # nn.Module.to converts m in place
        assert got.dtype == torch.bfloat16
        # bf16 weights, float32 accumulation vs the dense masked product in float32 of the same bf16 weights
        ref = _dense_masked(m.float(), xb.float(), keep)
        assert torch.allclose(got.float(), ref, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------- dispatch (no triton needed)


def test_auto_on_cpu_is_gather_without_importing_triton(monkeypatch):
    m = _moe(_random_mlp("plain", 16, 32, True, nn.GELU()), 4)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(prunepath, "_TRITON", [])
    assert resolve_kernel(m, torch.zeros(1, 16)) == "gather"
    assert prunepath._TRITON == []  # the lazy import was not even tried
    monkeypatch.setenv(KERNEL_ENV, "GATHER")
    assert resolve_kernel(m, torch.zeros(1, 16)) == "gather"


def test_bad_or_impossible_kernel_choice_is_a_config_error(monkeypatch):
    m = _moe(_random_mlp("plain", 16, 32, True, nn.GELU()), 4)
    x = torch.zeros(1, 16)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_kernel(m, x, "cutlass")
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ConfigError, match="PPN_PRUNEPATH_KERNEL"):
        resolve_kernel(m, x)
    monkeypatch.delenv(KERNEL_ENV)
    monkeypatch.setattr(prunepath, "_TRITON", [None, "ModuleNotFoundError: No module named 'triton'"])
    with pytest.raises(ConfigError, match="does not import"):
        resolve_kernel(m, x, "triton")
    assert resolve_kernel(m, x, "auto") == "gather"
    with torch.no_grad():  # the forward still works: auto falls back to the gather path
        m.router, m.tau = Router(16, 4, 8), 0.5
        assert torch.allclose(m(x), gather_mlp(m, x, m.routing(x)[0]))
