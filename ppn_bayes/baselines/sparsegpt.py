"""SparseGPT (Frantar & Alistarh, ICML 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot").

For one matrix product with weight ``W [out, in]`` and calibration inputs ``X [n, in]``, prune while
keeping ``||W X^T - W' X^T||`` small. The layer-wise Hessian of that squared error is

    H = (2 / n) X^T X + damp * I,   damp = percdamp * mean(diag(X^T X) * 2 / n)

Columns are processed left to right (Optimal Brain Surgeon, one column at a time): the pruned
weights of column ``j`` leave an error ``e = (w_j - q_j) / [H^-1]_jj``, which is compensated on the
not-yet-processed columns by ``W[:, j:] -= e [H^-1]_{j, j:}``. The rows of ``H^-1`` needed after
removing columns ``< j`` are exactly the rows of the upper Cholesky factor of ``H^-1``, so one
factorization serves the whole sweep. Columns are handled in blocks (default 128): the mask of a
block is chosen once from ``w^2 / [chol(H^-1)]_jj^2`` over the block (adaptive mask selection), the
compensation inside the block is done column by column and the rest of the matrix is updated once
per block (the "lazy batch" update). ``2:4``: at every 4th column the 2 lowest of the next 4 scores
of each row are pruned.

Follows the reference implementation's algorithm and its sequential layer-by-layer calibration
(:mod:`.layerwise`). Departs: the target is a fraction of *decoder* parameters (see :mod:`.wanda`);
a Cholesky failure retries with 10x damping instead of aborting.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.projections import weight_out_in
from ppn_bayes.baselines import (
    UnstructuredResult,
    check_blocks,
    decoder_param_fraction,
    linear_sparsity_for,
    timed,
)
from ppn_bayes.baselines.layerwise import sequential_prune
from ppn_bayes.errors import ConfigError


class Hessian:
    """Running ``(2 / n) X^T X`` of a matrix product's input.

    Accumulated in float32 as in the reference implementation (the inverse is taken in float64), on
    the device of the inputs (created at the first :meth:`add`), where the weights it prunes are.
    q/k/v (and gate/up) read the same input tensor one after another, so the last Gram matrix is
    cached by tensor identity (the cache holds the tensor itself, so its memory cannot be reused by
    another tensor while it is cached) and shared instead of recomputed.
    """

    _last: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.H: torch.Tensor | None = None
        self.n = 0

    @classmethod
    def gram(cls, x: torch.Tensor) -> torch.Tensor:
        if cls._last is not None and cls._last[0] is x and cls._last[1] == x._version:
            return cls._last[2]
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        g = flat.t() @ flat
        cls._last = (x, x._version, g)
        return g

    def add(self, x: torch.Tensor) -> None:
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        m = x.reshape(-1, x.shape[-1]).shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += self.gram(x) * (2.0 / self.n)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising the damping until it factors."""
    damp = percdamp * float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10.0, 1e-8)
    raise ConfigError("the calibration Hessian is singular even with heavy damping; use more calibration blocks")


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The pruned, error-compensated weight (a new ``[out, in]`` tensor, same dtype as ``W``).

    ``H`` is ``(2/n) X^T X`` without damping (see :class:`Hessian`).
    """
    dtype = W.dtype
    W = W.detach().float().clone(memory_format=torch.contiguous_format)
    H = H.to(W.device, torch.float64, copy=True)
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, percdamp).float()
    cols = W.shape[1]
    prune_n, prune_m = (2, 4) if pattern == "2:4" else (0, 0)
    if prune_m and cols % prune_m:
        raise ConfigError(f"2:4 sparsity needs input widths divisible by 4; this layer has {cols}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if prune_n == 0:
            tmp = W1**2 / d1.unsqueeze(0) ** 2
            k = min(tmp.numel(), math.ceil(tmp.numel() * sparsity - 1e-9))  # never under-prune
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                idx = torch.topk(tmp.flatten(), k, largest=False).indices
                mask1.view(-1)[idx] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n and i % prune_m == 0:
                tmp = W1[:, i:i + prune_m] ** 2 / d1[i:i + prune_m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(dtype)


def sparsegpt(model: nn.Module | GatedLM, blocks: torch.Tensor, size: float = 0.5, pattern: str = "unstructured",
              blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 4) -> UnstructuredResult:
    """A pruned copy of ``model``; ``size`` is the decoder-parameter fraction kept (ignored for 2:4)."""
    if pattern not in ("unstructured", "2:4"):
        raise ConfigError(f"unknown sparsity pattern {pattern!r}; choose unstructured or 2:4")
    if blocksize < 1:
        raise ConfigError(f"SparseGPT block size {blocksize} must be at least 1 column")
    blocks = check_blocks(blocks)
    base = model.model if isinstance(model, GatedLM) else model
    with timed() as t:
        pruned = copy.deepcopy(base)
        sparsity = 0.5 if pattern == "2:4" else linear_sparsity_for(pruned, size)

        def prune(mod: nn.Module, stats: Hessian) -> None:
            w = weight_out_in(mod)
            H = stats.H if stats.H is not None else torch.zeros(w.shape[1], w.shape[1], device=w.device)
            w.copy_(sparsegpt_prune(w, H, sparsity, pattern, blocksize, percdamp))

        def make(mod: nn.Module) -> Hessian:
            return Hessian(weight_out_in(mod).shape[1])

        try:
            sequential_prune(pruned, blocks, make, prune, batch_size)
        finally:
            Hessian._last = None  # drop the cached activation
    return UnstructuredResult("sparsegpt", pattern, pruned, decoder_param_fraction(pruned), t.seconds,
                              info={"linear_sparsity": sparsity, "blocksize": blocksize, "percdamp": percdamp})
