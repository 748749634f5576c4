"""``nn.Linear`` and transformers' ``Conv1D`` told apart once (ppn_bayes.backbone.projections): the
``[out, in]`` weight reproduces each module's own forward pass, whichever way it stores it."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppn_bayes.backbone.projections import is_conv1d, is_projection, weight_out_in


def test_weight_out_in_reproduces_the_forward_pass_of_both_kinds():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    for module in (nn.Linear(5, 7), Conv1D(7, 5)):  # Conv1D(nf=out, nx=in)
        nn.init.normal_(module.bias)
        w = weight_out_in(module)
        assert w.shape == (7, 5)
        torch.testing.assert_close(x @ w.T + module.bias, module(x))  # float32 matmul: default tolerance
    # the power check: reading a Conv1D's stored weight as if it were nn.Linear's fails
    conv = Conv1D(5, 5)
    assert not torch.allclose(x @ conv.weight.data.T + conv.bias, conv(x))


def test_kinds():
    assert is_conv1d(Conv1D(4, 3)) and not is_conv1d(nn.Linear(3, 4))
    assert is_projection(Conv1D(4, 3)) and is_projection(nn.Linear(3, 4))
    assert not is_projection(nn.LayerNorm(4)) and not is_projection(nn.Embedding(4, 3))
