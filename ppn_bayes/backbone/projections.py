"""Matrix-product modules of a decoder: ``nn.Linear`` and transformers' ``Conv1D``, told apart once.

GPT-2 (and its relatives) use ``transformers.pytorch_utils.Conv1D``, which computes ``x @ W + b``
with ``W`` stored ``[in, out]``, the transpose of ``nn.Linear``'s ``[out, in]``. Everything that
cuts, scales, adapts or prunes a projection asks here which kind it holds and reads the weight in the
``[out, in]`` orientation through :func:`weight_out_in`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (weight ``[in, out]``)."""
    return isinstance(module, Conv1D)


def is_projection(module: nn.Module) -> bool:
    """Whether ``module`` is a matrix product: an ``nn.Linear`` or a ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as ``[out, in]`` (a view of the stored tensor; no copy)."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data
