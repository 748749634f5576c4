"""The gated backbone: gates = 1 is the model, gate 0 is deletion/slicing, costs are exact."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import FAMILIES, VOCAB, tiny_model

from ppn_bayes.backbone import ALL_KINDS, GatedLM, KeepSet, gate, supported_model_types
from ppn_bayes.backbone.materialize import materialize
from ppn_bayes.errors import ConfigError, ModelError

# Exact equality is expected where only multiplications by 1.0 happen; comparisons against a
# structurally different (sliced / layer-deleted) model change the summation order inside matmuls,
# so they use float32 round-off tolerances.
ATOL = 2e-5


def kinds_for(family: str) -> tuple[str, ...]:
    return ("layers", "groups") if family == "olmo2" else ALL_KINDS


def ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_gates_of_one_reproduce_model_exactly(family):
    model = tiny_model(family)
    x = ids()
    ref = model(x).logits
    g = gate(model, group_size=8, kinds=kinds_for(family))
    assert torch.equal(g(x).logits, ref)  # no gates set
    inv = g.inventory
    with g.gates(layers=torch.ones(inv.num_layers), heads=torch.ones(inv.num_layers, inv.num_heads),
                 groups=torch.ones(inv.num_layers, inv.num_groups)):
        assert torch.equal(g(x).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_param_count_is_exact(family):
    model = tiny_model(family)
    g = gate(model, group_size=8, kinds=kinds_for(family))
    stack = sum(p.numel() for p in g.family.layers(model).parameters())
    assert g.inventory.total_cost("params") == stack
    total = sum(p.numel() for p in model.parameters())
    assert g.inventory.embedding_params + stack == total
    costs = g.inventory.unit_costs("params")
    assert float(sum(c.sum() for c in costs.values())) == pytest.approx(stack)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_gate_zero_equals_deleting_the_layer(family):
    model = tiny_model(family)
    x = ids()
    g = gate(model, kinds=("layers",))
    mask = torch.tensor([1.0, 0.0, 1.0])
    with g.gates(layers=mask):
        gated = g(x).logits
    layers = g.family.layers(model)
    deleted = tiny_model(family)
    g.family.set_layers(deleted, torch.nn.ModuleList([layers[0], layers[2]]))
    for new_idx, layer in enumerate(g.family.layers(deleted)):
        for m in g.family.layer_idx_holders(layer):
            m.layer_idx = new_idx
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(deleted.config, attr):
            setattr(deleted.config, attr, 2)
    if getattr(deleted.config, "layer_types", None):
        deleted.config.layer_types = deleted.config.layer_types[:2]
    torch.testing.assert_close(deleted(x).logits, gated, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["uniform_gqa", "ragged_gqa"])
def test_head_and_group_gates_zero_equal_slicing(family, pattern):
    model = tiny_model(family)
    x = ids()
    g = gate(model, group_size=8, kinds=kinds_for(family))
    inv = g.inventory
    if pattern == "uniform_gqa":
        heads = {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5], 2: [3, 4, 5]}  # whole KV groups
    else:
        heads = {0: [0, 4], 1: [1, 2, 5], 2: [5]}  # KV groups kept partially
    if family == "olmo2":
        heads = {l: list(range(6)) for l in range(3)}
    groups = {0: [0, 3, 7], 1: [1, 2], 2: [0, 1, 2, 3, 4, 5, 6, 7]}
    keep = KeepSet(layers=[0, 1, 2], heads=[(l, h) for l in heads for h in heads[l]],
                   groups=[(l, gg) for l in groups for gg in groups[l]])
    with g.keep(keep):
        gated = g(x).logits
    small = materialize(model, keep, inv)
    torch.testing.assert_close(small(x).logits, gated, atol=ATOL, rtol=0)
    # the small model really is smaller, by exactly the inventory's count
    stack = sum(p.numel() for p in g.family.layers(small).parameters())
    assert stack == inv.kept_cost(keep) or pattern == "ragged_gqa"


@pytest.mark.parametrize("family,group_size", [("llama", 16), ("gpt2", 16), ("llama", 24)])
def test_materialize_drops_layers_and_empty_branches(family, group_size):
    """Group size 24 on a 64-wide MLP leaves a short last group (the hooks' non-view path)."""
    model = tiny_model(family)
    x = ids()
    g = gate(model, group_size=group_size)
    keep = KeepSet(layers=[0, 2], heads=[(0, 1), (0, 2)], groups=[(2, 0), (2, g.inventory.num_groups - 1)])
    with g.keep(keep):
        gated = g(x).logits
    small = materialize(model, keep, g.inventory)
    assert len(g.family.layers(small)) == 2
    torch.testing.assert_close(small(x).logits, gated, atol=ATOL, rtol=0)
    assert torch.equal(model(x).logits, tiny_model(family)(x).logits)  # original untouched


def test_keepset_nesting_and_costs():
    g = gate(tiny_model("llama"), group_size=8)
    inv = g.inventory
    keep = KeepSet(layers=[1], heads=[(0, 1), (1, 0), (1, 1)], groups=[(2, 0), (1, 5)])
    done = inv.complete(keep)
    assert done.heads == [(1, 0), (1, 1)] and done.groups == [(1, 5)]
    # both query heads 0 and 1 read KV head 0 (kv_group = 3): K/V charged once
    d, hd = 48, 8
    expected = 2 * d + 2 * (2 * d * hd) + 1 * (2 * d * hd) + 3 * d * 8
    assert inv.kept_cost(keep) == expected
    assert inv.size_of(inv.full_keepset()) == 1.0
    assert KeepSet.from_dict(done.to_dict()) == done


def test_ungated_kinds_are_kept_with_their_layer():
    g = gate(tiny_model("llama"), group_size=8, kinds=("layers",))
    done = g.inventory.complete(KeepSet(layers=[0, 2]))
    assert len(done.heads) == 12 and len(done.groups) == 16
    costs = g.inventory.unit_costs()
    assert costs["heads"].sum() == 0 and costs["groups"].sum() == 0


def test_gates_are_differentiable():
    model = tiny_model("qwen2")
    g = gate(model, group_size=8)
    inv = g.inventory
    heads = torch.full((inv.num_layers, inv.num_heads), 0.5, requires_grad=True)
    layers = torch.full((inv.num_layers,), 0.7, requires_grad=True)
    with g.gates(heads=heads, layers=layers):
        g(ids()).logits.square().mean().backward()
    assert heads.grad is not None and heads.grad.abs().sum() > 0
    assert layers.grad is not None and layers.grad.abs().sum() > 0


def test_unit_norms_match_weights():
    model = tiny_model("llama")
    g = gate(model, group_size=8)
    norms = g.unit_norms()
    attn = model.model.layers[1].self_attn
    q = attn.q_proj.weight[16:24]
    o = attn.o_proj.weight[:, 16:24]
    k = attn.k_proj.weight[0:8]
    v = attn.v_proj.weight[0:8]
    expected = (q.square().sum() + o.square().sum() + (k.square().sum() + v.square().sum()) / 3).sqrt()
    torch.testing.assert_close(norms["heads"][1, 2], expected)
    mlp = model.model.layers[0].mlp
    exp_g = (mlp.gate_proj.weight[8:16].square().sum() + mlp.up_proj.weight[8:16].square().sum()
             + mlp.down_proj.weight[:, 8:16].square().sum()).sqrt()
    torch.testing.assert_close(norms["groups"][0, 1], exp_g)


def test_unsupported_architecture_lists_supported():
    cfg = T.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)
    with pytest.raises(ModelError) as err:
        GatedLM(T.BertForMaskedLM(cfg))
    msg = str(err.value)
    assert "bert" in msg and "llama" in msg and "gpt2" in msg and "\n" not in msg
    assert {"llama", "mistral", "qwen2", "qwen3", "olmo2", "gpt2"} <= set(supported_model_types())


def test_bad_gate_shapes_and_kinds_are_one_line_errors():
    g = gate(tiny_model("llama"), group_size=8)
    with pytest.raises(ConfigError, match="shape"):
        g.set_gates(heads=torch.ones(2, 2))
    with pytest.raises(ConfigError, match="unknown unit kind"):
        gate(tiny_model("llama"), kinds=("layers", "neurons"))
    with pytest.raises(ConfigError, match="head gates"):
        gate(tiny_model("olmo2"))
    with pytest.raises(ConfigError, match="group_size"):
        gate(tiny_model("llama"), group_size=0)


def test_a_user_family_registered_first_keeps_the_built_in_ones():
    """The registry is explicit (ppn_bayes.backbone.families): registering an adapter of one's own
    before anything else asked for a family does not leave Llama, Qwen2, Mistral or GPT-2 out. A fresh
    interpreter, so that no earlier import has filled the registry already."""
    import subprocess
    import sys

    code = """
from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone import families

class Mine(Family):
    name = "mine"
    model_types = ("mine",)

families.register(Mine())
assert {"llama", "qwen2", "mistral", "gpt2", "olmo2", "mine"} <= set(families.supported_model_types())
from transformers import LlamaConfig
assert families.family_for(LlamaConfig()).name == "llama"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-1500:]
