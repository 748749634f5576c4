"""The score anchor (ppn_bayes/bayes/anchor.py): the data anchor against independent references, its use as
the prior mean in a fit, and the anchor alone as a nested pruning method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ppn_bayes.backbone.gated import gate
from ppn_bayes.baselines import is_nested
from ppn_bayes.bayes.anchor import anchor_order, anchor_pruning, score_anchors
from ppn_bayes.errors import ConfigError
from tests.synthetic import RECOVERY, sample_sequences, synthetic_stack
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_model("llama", seed=0).eval()
    blocks = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    return hf, gate(hf, group_size=16), blocks


def test_layer_anchor_is_one_minus_cosine_of_the_hidden_states(tiny):
    """Independent reference: transformers' own hidden states. ``hidden_states[l]`` is layer l's input
    and ``hidden_states[l + 1]`` its output for every layer but the last (whose entry has the final
    norm applied); tolerance 1e-5: float32 cosines averaged over 36 tokens."""
    hf, g, blocks = tiny
    anchors = score_anchors(g, "data", blocks, batch_size=2)
    with torch.no_grad():
        hs = hf(input_ids=blocks, output_hidden_states=True).hidden_states
    L = hf.config.num_hidden_layers
    ref = torch.stack([1 - F.cosine_similarity(hs[l], hs[l + 1], dim=-1).mean() for l in range(L - 1)])
    torch.testing.assert_close(anchors["layers"][:L - 1], ref.float(), atol=1e-5, rtol=0)
    assert anchors["layers"].shape == (L,)


def test_unit_anchor_is_first_order_taylor(tiny):
    """Independent reference for one head and one group: ``sum |dL/dw * w|`` over the unit's slices,
    written out by hand from the full-model gradient (q rows, o columns and half the KV head's k/v
    rows: 6 heads share 2 KV heads; a group's gate/up rows and down columns). Tolerance 1e-4
    relative: float32 gradients summed in a different order."""
    hf, g, blocks = tiny
    a = score_anchors(g, "data", blocks, batch_size=3)
    hf.zero_grad()
    for p in hf.parameters():
        p.requires_grad_(True)
    logits = hf(input_ids=blocks).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, VOCAB).float(), blocks[:, 1:].reshape(-1)).backward()
    lay = hf.model.layers[1]
    at, mlp = lay.self_attn, lay.mlp
    tay = lambda p: (p.grad * p.detach()).abs()
    hd, h = 8, 4  # head_dim 48 / 6; head 4 reads KV head 4 // 3 = 1
    head = (tay(at.q_proj.weight)[h * hd:(h + 1) * hd].sum() + tay(at.q_proj.bias)[h * hd:(h + 1) * hd].sum()
            if at.q_proj.bias is not None else tay(at.q_proj.weight)[h * hd:(h + 1) * hd].sum())
    head = head + tay(at.o_proj.weight)[:, h * hd:(h + 1) * hd].sum()
    kv = slice(1 * hd, 2 * hd)
    for lin in (at.k_proj, at.v_proj):
        head = head + tay(lin.weight)[kv].sum() / 3 + (tay(lin.bias)[kv].sum() / 3 if lin.bias is not None else 0)
    ch = slice(16, 32)  # group 1 of 16 channels
    grp = tay(mlp.gate_proj.weight)[ch].sum() + tay(mlp.up_proj.weight)[ch].sum() + tay(mlp.down_proj.weight)[:, ch].sum()
    for p in hf.parameters():
        p.requires_grad_(False)
        p.grad = None
    torch.testing.assert_close(a["heads"][1, h], head.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(a["groups"][1, 1], grp.float(), rtol=1e-4, atol=0)


def test_data_anchor_ranks_the_synthetic_layers_where_the_norm_anchor_fails():
    """The synthetic network of the recovery tests: weight norms rank its layers exactly backwards
    (Kendall -1 against the known importances); the data anchor alone, no training, ranks them right
    (observed Kendall 1.0; asserted >= 0.7, at most 2 of 15 pairs swapped)."""
    w, targets = RECOVERY
    hf = synthetic_stack(w, targets, seed=0)
    g = gate(hf, kinds=("layers",))
    ids = sample_sequences(hf, 4, 16, seed=1)
    data, norm = score_anchors(g, "data", ids), score_anchors(g, "norm")
    assert stats.kendalltau(norm["layers"], w).statistic == pytest.approx(-1.0)
    assert stats.kendalltau(data["layers"], w).statistic >= 0.7


def test_anchor_order_nests_children_under_their_layer():
    anchors = {"layers": torch.tensor([1.0, 4.0]), "heads": torch.tensor([[2.0, 0.5], [3.0, 8.0]])}
    order = anchor_order(anchors)
    # centred logs: layers -0.69, 0.69; heads -0.10, -1.49, 0.30, 1.29. Keys min(own, layer's):
    # (0,1) -1.49 < layer 0 = (0,0) -0.69 (tie: the layer first) < (1,0) 0.30 < layer 1 = (1,1) 0.69
    assert order == [("heads", (0, 1)), ("layers", 0), ("heads", (0, 0)), ("heads", (1, 0)), ("layers", 1),
                     ("heads", (1, 1))]


def test_anchor_pruning_is_nested_within_budget_and_layers_only_is_shortgpt(tiny):
    """The anchor alone as a method: nested keep-sets whose exact size never exceeds the request; with
    layers alone its order is ShortGPT's (both rank by Block Influence; independent ordering code)."""
    from ppn_bayes.baselines.shortgpt import shortgpt

    hf, _, blocks = tiny
    sizes = [0.9, 0.7, 0.5]
    res = anchor_pruning(hf, blocks, sizes, group_size=16)
    assert is_nested(res.keepsets)
    for s in sizes:
        assert res.size(s) <= s + 1e-9
    lay = anchor_pruning(hf, blocks, [0.7, 0.4], kinds=("layers",))
    ref = shortgpt(hf, blocks, [0.7, 0.4])
    for s in (0.7, 0.4):
        assert sorted(lay.keepsets[s].layers) == sorted(ref.keepsets[s].layers)


def test_unknown_anchor_is_a_one_line_error(tiny):
    _, g, blocks = tiny
    with pytest.raises(ConfigError, match="norm or data"):
        score_anchors(g, "weights", blocks)
    with pytest.raises(ConfigError, match="calibration blocks"):
        score_anchors(g, "data", None)
