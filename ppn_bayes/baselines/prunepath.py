"""PrunePath (Gu, Fu, Yuan, 2026, "PrunePath: Towards Highly Structured Sparse Language Models";
only the abstract and a review are available to us), built on MoEfication (Zhang et al., 2022).

1. **MoEfication.** Each MLP's ``d_ff`` neurons are split into ``E`` equal experts by *balanced*
   k-means on their input weight rows (for SwiGLU, ``[w_gate_i ; w_up_i]``, L2-normalized): neurons
   whose input weights point the same way tend to fire together. The MLP is then exactly
   ``y = sum_e W_out,e h_e(x)`` over experts.
2. **Router.** A small MLP per layer (``d -> r -> E``, ReLU) is trained on calibration activations to
   predict each expert's importance, the norm of its output contribution
   ``i_e(x) = ||W_out,e h_e(x)||_2``: its softmax ``p(x)`` is fitted to ``i(x) / sum_e i_e(x)`` by
   cross-entropy (KL to the importance distribution).
3. **Cumulative-mass routing.** Per token, sort experts by ``p_e(x)`` and keep the smallest prefix
   whose mass is ``>= tau``: an adaptive number of experts, and ``tau`` an inference-time knob of one
   checkpoint (``tau = 1`` keeps every expert: the dense MLP, exactly up to float summation order).
4. **Kernel.** For one token (batch-1 decoding) only the kept experts' weights are touched
   (:func:`decode_mlp`): on CPU they are *gathered* as contiguous slices of expert-major storage and
   only those products run (:func:`gather_mlp`), so sparsity gives real speed; on CUDA tensors, with
   the optional ``triton`` installed, a Triton kernel (:mod:`ppn_bayes.baselines.prunepath_triton`:
   fused up/gate GEMV + activation, then the down GEMV, over the kept expert ids) is used instead,
   else the gather path. ``MoEMLP.kernel`` / :meth:`PrunePathModel.set_kernel` or the environment
   variable ``PPN_PRUNEPATH_KERNEL`` (``auto`` | ``gather`` | ``triton``) force a path; ``triton`` on
   CPU tensors runs Triton's interpreter (tests only: slow). For many tokens the masked dense product
   is used (same result, batched).

Departs from the paper: no fine-tuning of the model with routing in the loop (the paper trains with
``tau_train``); only the routers are trained, post hoc, so the peer is "as published without
retraining" like the others (``ppn compare --heal-tokens`` is where a token budget of training would
go); balanced assignment is greedy (nearest pairs first, capacity ``d_ff / E``), not the Hungarian
step of balanced k-means. Sizes are reached by choosing ``tau`` per size on calibration activations
(:meth:`PrunePathModel.tau_for`), and the size reported is the *measured* mean active fraction.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.projections import weight_out_in
from ppn_bayes.baselines import check_blocks, gated_view, timed
from ppn_bayes.errors import ConfigError, SizeError

# ----------------------------------------------------------------------------- clustering


def balanced_kmeans(x: torch.Tensor, n_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster rows of ``x [N, D]`` into ``n_clusters`` clusters of exactly ``N / n_clusters`` rows.

    Returns ``[n_clusters, N / n_clusters]`` row indices. Assignment step: all (row, centroid) pairs by
    increasing distance, each row to the first centroid with room (greedy balanced assignment).
    """
    n = x.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise ConfigError(f"{n_clusters} experts do not divide the MLP width {n}; pick a divisor of {n}")
    cap = n // n_clusters
    x = F.normalize(x.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:n_clusters]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)  # [N, E]
        order = torch.argsort(dist.flatten()).tolist()
        assign.fill_(-1)
        room = [cap] * n_clusters
        left = n
        for flat in order:
            i, e = divmod(flat, n_clusters)
            if assign[i] < 0 and room[e] > 0:
                assign[i] = e
                room[e] -= 1
                left -= 1
                if left == 0:
                    break
        new = torch.stack([x[assign == e].mean(0) for e in range(n_clusters)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return torch.stack([torch.nonzero(assign == e).squeeze(1) for e in range(n_clusters)])


# ----------------------------------------------------------------------------- the MoE MLP


def _linear_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    return weight_out_in(lin), (lin.bias.data if getattr(lin, "bias", None) is not None else None)


def mlp_parts(mlp: nn.Module) -> dict:
    """The matrices of a SwiGLU (Llama family) or plain (GPT-2) MLP, as ``[out, in]`` weights."""
    if hasattr(mlp, "down_proj"):
        up, bu = _linear_parts(mlp.up_proj)
        gate, bg = _linear_parts(mlp.gate_proj)
        down, bd = _linear_parts(mlp.down_proj)
        return {"up": up, "b_up": bu, "gate": gate, "b_gate": bg, "down": down, "b_down": bd, "act": mlp.act_fn}
    if hasattr(mlp, "c_fc"):
        up, bu = _linear_parts(mlp.c_fc)
        down, bd = _linear_parts(mlp.c_proj)
        return {"up": up, "b_up": bu, "gate": None, "b_gate": None, "down": down, "b_down": bd, "act": mlp.act}
    raise ConfigError(f"PrunePath does not know the MLP {type(mlp).__name__}; supported: Llama-style and GPT-2")


class Router(nn.Module):
    """``d -> hidden -> E`` logits (ReLU): predicts the experts' importance distribution."""

    def __init__(self, d: int, n_experts: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def cumulative_mass_mask(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean ``[N, E]``: per row, the smallest set of top-probability experts with mass ``>= tau``.

    An expert is kept when the mass of the experts ranked strictly above it is ``< tau``; ``tau >= 1``
    keeps every expert (no rounding surprises from a cumulative sum that reaches 0.9999999).
    """
    if tau >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = before < tau
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


class MoEMLP(nn.Module):
    """An MLP rewritten as ``E`` experts of ``k`` neurons each, with a router and threshold ``tau``.

    Weights are stored expert-major (``[E, k, d]``) so that a kept expert is a contiguous slice.
    Counters ``active`` / ``tokens`` accumulate the kept neurons per token for the active fraction.
    """

    def __init__(self, parts: dict, experts: torch.Tensor, router: Router, tau: float = 1.0):
        super().__init__()
        E, k = experts.shape
        perm = experts.flatten()
        self.E, self.k = E, k
        self.act = parts["act"]
        self.w_up = nn.Parameter(parts["up"][perm].reshape(E, k, -1).clone(), requires_grad=False)
        self.w_gate = (nn.Parameter(parts["gate"][perm].reshape(E, k, -1).clone(), requires_grad=False)
                       if parts["gate"] is not None else None)
        self.w_out = nn.Parameter(parts["down"][:, perm].t().reshape(E, k, -1).contiguous(), requires_grad=False)
        self.b_up = None if parts["b_up"] is None else nn.Parameter(parts["b_up"][perm].reshape(E, k).clone(),
                                                                      requires_grad=False)
        self.b_gate = None if parts["b_gate"] is None else nn.Parameter(parts["b_gate"][perm].reshape(E, k).clone(),
                                                                          requires_grad=False)
        self.b_out = None if parts["b_down"] is None else nn.Parameter(parts["b_down"].clone(), requires_grad=False)
        self.router = router
        self.tau = float(tau)
        self.register_buffer("experts", experts.clone(), persistent=False)
        self.kernel: str | None = None  # batch-1 path: None defers to PPN_PRUNEPATH_KERNEL, then "auto"
        self.reset_stats()

    def reset_stats(self) -> None:
        self.active: float | torch.Tensor = 0.0  # a device tensor while counting: no host sync per token
        self.tokens = 0

    # -- the per-expert pieces
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """All experts' hidden activations, ``[N, E, k]``."""
        h = torch.einsum("nd,ekd->nek", x, self.w_up)
        if self.b_up is not None:
            h = h + self.b_up
        if self.w_gate is None:
            return self.act(h)
        g = torch.einsum("nd,ekd->nek", x, self.w_gate)
        if self.b_gate is not None:
            g = g + self.b_gate
        return self.act(g) * h

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's output contribution ``[N, E, d]`` (bias excluded)."""
        return torch.einsum("nek,ekd->ned", self.hidden(x), self.w_out)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Kept-expert mask ``[N, E]`` under the current ``tau``."""
        if self.tau >= 1.0:
            return torch.ones(x.shape[0], self.E, dtype=torch.bool, device=x.device)
        return cumulative_mass_mask(torch.softmax(self.router(x).float(), dim=-1), self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        mask = self.routing(flat)
        # Counted on the device (read once, by active_fraction): on the batch-1 decode path the only
        # host sync per layer and token is then the kept experts' index list the gather/Triton path needs.
        self.active = self.active + mask.sum() * self.k
        self.tokens += flat.shape[0]
        if flat.shape[0] == 1 and self.tau < 1.0:
            y = decode_mlp(self, flat, mask[0])
        else:
            h = self.hidden(flat) * mask.unsqueeze(-1).to(flat.dtype)
            y = h.reshape(flat.shape[0], -1) @ self.w_out.reshape(self.E * self.k, -1)
            if self.b_out is not None:
                y = y + self.b_out
        return y.reshape(shape)

    @property
    def active_fraction(self) -> float:
        return float(self.active) / max(1, self.tokens * self.E * self.k)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids -> maximal runs of consecutive ids as ``(start, stop)``."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def gather_mlp(m: MoEMLP, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The MLP of one token ``x [1, d]`` over kept experts only (``keep [E]`` bool).

    Kept experts are contiguous slices of the expert-major weights (consecutive kept experts merge
    into one slice), so nothing is copied and the work is proportional to the kept neurons.
    """
    d = x.shape[-1]
    y = torch.zeros(1, m.w_out.shape[-1], dtype=x.dtype, device=x.device)
    for a, b in _runs(torch.nonzero(keep).flatten().tolist()):
        up = m.w_up[a:b].reshape(-1, d)
        h = x @ up.t()
        if m.b_up is not None:
            h = h + m.b_up[a:b].reshape(-1)
        if m.w_gate is not None:
            g = x @ m.w_gate[a:b].reshape(-1, d).t()
            if m.b_gate is not None:
                g = g + m.b_gate[a:b].reshape(-1)
            h = m.act(g) * h
        else:
            h = m.act(h)
        y = y + h @ m.w_out[a:b].reshape(-1, m.w_out.shape[-1])
    if m.b_out is not None:
        y = y + m.b_out
    return y


KERNEL_ENV = "PPN_PRUNEPATH_KERNEL"
KERNELS = ("auto", "gather", "triton")
_TRITON: list = []  # [module or None, why it is None]: the lazy import, tried once


def triton_kernel():
    """``(module, reason)``: :mod:`prunepath_triton`, or ``None`` and why it cannot be imported."""
    if not _TRITON:
        try:
            from ppn_bayes.baselines import prunepath_triton
            _TRITON.extend([prunepath_triton, ""])
        except Exception as exc:  # noqa: BLE001 -- ImportError without triton; anything a broken install raises
            _TRITON.extend([None, f"{type(exc).__name__}: {exc}"])
    return _TRITON[0], _TRITON[1]


def resolve_kernel(m: MoEMLP, x: torch.Tensor, kernel: str | None = None) -> str:
    """The batch-1 path for ``x``: ``"gather"`` or ``"triton"``.

    ``kernel`` (else ``m.kernel``, else ``$PPN_PRUNEPATH_KERNEL``, else ``"auto"``): ``auto`` takes the
    Triton kernel on CUDA tensors when ``triton`` imports and knows the activation and no gradient is
    needed (the kernel has no backward), else the gather path;
    ``gather`` / ``triton`` force one (``triton`` raises :class:`ConfigError` when it cannot run).
    """
    choice = (kernel or m.kernel or os.environ.get(KERNEL_ENV) or "auto").lower()
    if choice not in KERNELS:
        raise ConfigError(f"PrunePath kernel {choice!r}: choose one of {', '.join(KERNELS)} "
                          f"(argument, MoEMLP.kernel or ${KERNEL_ENV})")
    if choice == "gather":
        return choice
    if choice == "auto" and (not x.is_cuda or (torch.is_grad_enabled() and x.requires_grad)):
        return "gather"  # without importing triton; the kernel has no backward, the gather path does
    mod, why = triton_kernel()
    known = mod is not None and mod.activation_code(m.act) is not None
    if choice == "auto":
        return "triton" if known else "gather"
    if mod is None:
        raise ConfigError(f"PrunePath kernel 'triton' asked for, but triton does not import ({why}); "
                          "pip install 'ppn-bayes[triton]' or use kernel 'gather'")
    if not known:
        raise ConfigError(f"PrunePath's Triton kernel has no activation {type(m.act).__name__}; use 'gather'")
    if not x.is_cuda and not mod.INTERPRETED:
        raise ConfigError("PrunePath kernel 'triton' on CPU tensors runs only in Triton's interpreter: set "
                          "TRITON_INTERPRET=1 before triton is first imported, or use kernel 'gather'")
    return choice


def decode_mlp(m: MoEMLP, x: torch.Tensor, keep: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """One token's MLP over the kept experts, on the path :func:`resolve_kernel` picks."""
    if resolve_kernel(m, x, kernel) == "triton":
        return triton_kernel()[0].triton_mlp(m, x, keep)
    return gather_mlp(m, x, keep)


# ----------------------------------------------------------------------------- building


@dataclass
class PrunePathModel:
    """A MoEfied copy of a model: ``model`` runs with the current ``tau`` of every layer."""

    model: nn.Module
    moe: list[MoEMLP]
    decoder_params: float  # of the original decoder, the denominator of every fraction
    mlp_params: float  # all MLP matrix parameters (what routing can skip)
    router_params: float
    decoder_flops: float
    seconds: float = 0.0
    calib_probs: list[torch.Tensor] = field(default_factory=list, repr=False)  # router probs on calibration

    def set_tau(self, tau: float) -> None:
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"PrunePath tau {tau} must be in (0, 1]: the routing mass kept per token")
        for m in self.moe:
            m.tau = float(tau)

    def set_kernel(self, kernel: str | None) -> None:
        """Force every layer's batch-1 path (``auto`` | ``gather`` | ``triton``; ``None``: the default)."""
        if kernel is not None and kernel.lower() not in KERNELS:
            raise ConfigError(f"PrunePath kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        for m in self.moe:
            m.kernel = kernel

    def reset_stats(self) -> None:
        for m in self.moe:
            m.reset_stats()

    def mean_active_fraction(self) -> float:
        """Mean over layers and tokens of the fraction of MLP neurons that ran (since reset)."""
        return sum(m.active_fraction for m in self.moe) / len(self.moe)

    def param_fraction(self, mlp_active: float) -> float:
        """Decoder parameters touched per token / decoder parameters (routers included)."""
        return (self.decoder_params - self.mlp_params * (1.0 - mlp_active) + self.router_params) / self.decoder_params

    def flops_fraction(self, mlp_active: float) -> float:
        """Decoder FLOPs per token / dense decoder FLOPs (2 per matrix weight; routers included)."""
        skipped = 2.0 * self.mlp_params * (1.0 - mlp_active)
        return (self.decoder_flops - skipped + 2.0 * self.router_params) / self.decoder_flops

    def predicted_active(self, tau: float) -> float:
        """Mean active MLP fraction on the (dense) calibration activations at ``tau``."""
        return sum(float(cumulative_mass_mask(p, tau).float().mean()) for p in self.calib_probs) / len(self.calib_probs)

    def tau_for(self, size: float, iters: int = 30) -> float:
        """The largest ``tau`` whose predicted decoder-parameter fraction is ``<= size`` (bisection)."""
        if self.param_fraction(1.0) <= size:
            return 1.0
        if self.param_fraction(self.predicted_active(1e-9)) > size:
            raise SizeError(f"PrunePath cannot reach size {size}: attention and one expert per layer already use "
                            f"{self.param_fraction(self.predicted_active(1e-9)):.3f} of the decoder; ask for more")
        lo, hi = 1e-9, 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            if self.param_fraction(self.predicted_active(mid)) <= size:
                lo = mid
            else:
                hi = mid
        return lo


@torch.no_grad()
def _mlp_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Every layer's MLP input over the calibration tokens, ``[N_tokens, d]`` per layer (dense model)."""
    family = family_for(model.config)
    layers = family.layers(model)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    mlps = [layer.mlp for layer in layers]
    handles = [m.register_forward_pre_hook(lambda mod, a, l=l: store[l].append(a[0].reshape(-1, a[0].shape[-1])))
               for l, m in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        for s in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[s:s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(xs) for xs in store]


def train_router(moe: MoEMLP, x: torch.Tensor, hidden: int, steps: int, lr: float, seed: int) -> tuple[Router, float]:
    """Fit a router's softmax to the experts' normalized output-norm importance; returns (router, final loss)."""
    with torch.no_grad():
        imp = moe.contributions(x).norm(dim=-1).float()  # [N, E]
        target = imp / imp.sum(-1, keepdim=True).clamp_min(1e-12)
    torch.manual_seed(seed)
    router = Router(x.shape[-1], moe.E, hidden).to(x.device, torch.float32)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    xf = x.float()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = -(target * torch.log_softmax(router(xf), -1)).sum(-1).mean()
        loss.backward()
        opt.step()
    for p in router.parameters():
        p.requires_grad_(False)
    return router.to(x.dtype), float(loss.detach())


def moefy(model: nn.Module | GatedLM, blocks: torch.Tensor, n_experts: int = 16, router_hidden: int = 64,
          router_steps: int = 300, router_lr: float = 3e-3, kmeans_iters: int = 15, seed: int = 0,
          batch_size: int = 4) -> PrunePathModel:
    """MoEfy a copy of ``model`` on calibration ``blocks`` (the input model is not modified)."""
    blocks = check_blocks(blocks)
    base = model.model if isinstance(model, GatedLM) else model
    with timed() as t:
        xs = _mlp_inputs(base, blocks, batch_size)
        small = copy.deepcopy(base)
        family = family_for(small.config)
        with gated_view(base, 1, kinds=("layers",)) as g:
            decoder = g.inventory.total_cost("params")
            decoder_flops = g.inventory.total_cost("flops")
        layers = family.layers(small)
        moes: list[MoEMLP] = []
        probs: list[torch.Tensor] = []
        mlp_params = 0.0
        for l, layer in enumerate(layers):
            parts = mlp_parts(layer.mlp)
            feats = parts["up"] if parts["gate"] is None else torch.cat([parts["gate"], parts["up"]], dim=1)
            experts = balanced_kmeans(feats.detach().cpu(), n_experts, kmeans_iters, seed + l)
            moe = MoEMLP(parts, experts.to(feats.device), Router(1, 1, 1))
            moe.router, _ = train_router(moe, xs[l], router_hidden, router_steps, router_lr, seed + l)
            mlp_params += sum(t_.numel() for t_ in (parts["up"], parts["down"], parts["gate"]) if t_ is not None)
            with torch.no_grad():
                probs.append(torch.softmax(moe.router(xs[l]).float(), -1))
            family.set_mlp(layer, moe)
            moes.append(moe)
        router_params = float(sum(m.router.num_params for m in moes))
    return PrunePathModel(small, moes, decoder, mlp_params, router_params, decoder_flops, t.seconds, probs)


def tau_sweep(pp: PrunePathModel, taus: Sequence[float]) -> list[dict]:
    """Predicted active fraction at each ``tau`` (on calibration activations): the knob's range."""
    return [{"tau": float(t), "mlp_active": pp.predicted_active(t),
             "param_fraction": pp.param_fraction(pp.predicted_active(t))} for t in taus]
