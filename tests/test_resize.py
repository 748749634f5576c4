"""Lazy resize (file export) and in-memory switching: both compute exactly what the gated model does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, tiny_model

from ppn_bayes.backbone import ALL_KINDS, KeepSet, gate
from ppn_bayes.backbone.materialize import materialize
from ppn_bayes.errors import ConfigError, RunError
from ppn_bayes.export.load import load_resized
from ppn_bayes.export.plan import SHAPES_KEY
from ppn_bayes.export.resize import resize
from ppn_bayes.export.switch import SubnetSwitch, switch
from ppn_bayes.hub.safetensors_files import LazyCheckpoint, runs

# The exported model sums the same products in a different order (fewer columns, fused reads),
# so logits agree to float32 round-off of 3-layer stacks (observed <= 5e-7), not bit for bit.
ATOL = 2e-5
NL = 3  # tiny models have 3 layers of 6 query heads (2 KV heads) and 64 channels (8 groups of 8)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def kinds_for(family: str) -> tuple[str, ...]:
    return ("layers", "groups") if family == "olmo2" else ALL_KINDS


def full_heads(layers=range(NL)) -> list[tuple[int, int]]:
    return [(l, h) for l in layers for h in range(6)]


def full_groups(layers=range(NL)) -> list[tuple[int, int]]:
    return [(l, g) for l in layers for g in range(8)]


PATTERNS = {
    # layer-only: loads with plain AutoModelForCausalLM
    "layers": KeepSet(layers=[0, 2], heads=full_heads(), groups=full_groups()),
    # the same head/KV/channel counts in every kept layer: still a standard config (except GPT-2 heads)
    "uniform": KeepSet(layers=[0, 1], heads=[(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)],
                       groups=[(0, 1), (0, 2), (1, 5), (1, 7)]),
    # GQA groups kept partially (K/V duplication) and different counts per layer
    "ragged": KeepSet(layers=[0, 1, 2], heads=[(0, 0), (0, 4), (1, 1), (1, 2), (1, 5), (2, 5)],
                      groups=[(0, 0), (0, 3), (1, 1), (2, 4), (2, 5), (2, 6)]),
    # a layer with no attention head and a layer with no MLP channel (zero branches)
    "empty": KeepSet(layers=[0, 2], heads=[(2, 1)], groups=[(0, 3)]),
}
EXPECTED_FORM = {"layers": "standard", "uniform": "standard", "ragged": SHAPES_KEY, "empty": SHAPES_KEY}


def pattern(name: str, family: str) -> KeepSet:
    keep = PATTERNS[name]
    if family == "olmo2":  # heads are not gated there: keep every head of the kept layers
        keep = KeepSet(layers=keep.layers, heads=full_heads(keep.layers), groups=keep.groups)
    return keep


def amplitudes(inventory, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random multipliers of every kind the push produces: per head, per group, per branch dimension."""
    g = torch.Generator().manual_seed(seed)
    hidden = inventory.dims.hidden
    return {"heads": 1 + 0.3 * torch.randn(NL, inventory.num_heads, generator=g),
            "groups": 1 + 0.3 * torch.randn(NL, inventory.num_groups, generator=g),
            "attn_scale": 1 + 0.3 * torch.randn(NL, hidden, generator=g),
            "mlp_scale": 1 + 0.3 * torch.randn(NL, hidden, generator=g)}


def masked_gates(inventory, keep: KeepSet, amps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``Push.gates`` hands the gated model: the keep-set's 0/1 masks times the unit amplitudes."""
    gates = {**inventory.masks(keep), **amps}
    masks = inventory.masks(keep)
    gates["heads"], gates["groups"] = masks["heads"] * amps["heads"], masks["groups"] * amps["groups"]
    return gates


@pytest.fixture
def saved(tmp_path):
    def make(family: str, **kw):
        model = tiny_model(family, **kw)
        path = tmp_path / f"base-{family}"
        model.save_pretrained(path, **({"max_shard_size": "20KB"} if kw.pop("_shard", False) else {}))
        return model, path

    return make


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "olmo2"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_export_equals_gated_model_with_amplitudes(family, name, saved, tmp_path):
    model, base = saved(family)
    g = gate(model, group_size=8, kinds=kinds_for(family))
    keep = pattern(name, family)
    amps = amplitudes(g.inventory)
    with g.gates(**masked_gates(g.inventory, keep, amps)):
        expected = g(ids()).logits
    with g.keep(keep), g.gates(attn_scale=amps["attn_scale"], mlp_scale=amps["mlp_scale"]):
        branch_only = g(ids()).logits
    assert (expected - branch_only).abs().max() > 10 * ATOL  # the unit amplitudes matter to the check
    report = resize(base, keep, g.inventory, tmp_path / "out", amplitudes=amps)
    form = EXPECTED_FORM[name]
    if family == "gpt2" and name == "uniform":
        form = SHAPES_KEY  # GPT-2 derives head_dim from n_embd / n_head: cut heads need our loader
    if family == "olmo2" and name in ("ragged",):
        form = SHAPES_KEY  # channel counts still differ per layer
    assert report["form"] == form
    assert report["amplitude_tensors_folded"] > 0
    small = load_resized(tmp_path / "out")
    assert len(g.family.layers(small)) == len(keep.layers)
    torch.testing.assert_close(small(ids()).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unit_amplitudes_alone_scale_projection_inputs_not_biases(family, saved, tmp_path):
    """Heads/groups only: one weight per kept layer and unit kind changes, and never a bias."""
    model, base = saved(family)
    g = gate(model, group_size=8)
    keep = PATTERNS["empty"]  # layer 0 keeps no head, layer 2 no channel: nothing to scale there
    amps = {k: v for k, v in amplitudes(g.inventory, seed=11).items() if k in ("heads", "groups")}
    with g.gates(**masked_gates(g.inventory, keep, amps)):
        expected = g(ids()).logits
    report = resize(base, keep, g.inventory, tmp_path / "out", amplitudes=amps)
    assert report["amplitude_tensors_folded"] == 2  # layer 2's output projection, layer 0's down projection
    plain = resize(base, keep, g.inventory, tmp_path / "plain")
    assert plain["amplitude_tensors_folded"] == 0
    folded, unscaled = load_file(str(tmp_path / "out" / "model.safetensors")), \
        load_file(str(tmp_path / "plain" / "model.safetensors"))
    changed = sorted(k for k in folded if not torch.equal(folded[k], unscaled[k]))
    assert len(changed) == 2 and all(k.endswith(".weight") for k in changed)
    torch.testing.assert_close(load_resized(tmp_path / "out")(ids()).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="unknown amplitude 'head'"):
        resize(base, keep, g.inventory, tmp_path / "x", amplitudes={"head": amps["heads"]})
    with pytest.raises(ConfigError, match=r"per layer, per channel group"):
        resize(base, keep, g.inventory, tmp_path / "x", amplitudes={"groups": amps["heads"]})


def test_layer_only_export_loads_with_plain_transformers_in_a_fresh_process(saved, tmp_path):
    model, base = saved("llama", tie_word_embeddings=True)
    g = gate(model, kinds=("layers",))
    keep = KeepSet(layers=[0, 2])
    with g.keep(keep):
        expected = g(ids()).logits
    report = resize(base, keep, g.inventory, tmp_path / "out")
    assert report["form"] == "standard" and report["loader"] == "AutoModelForCausalLM.from_pretrained"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # noqa: SIM118 - a safe_open handle  # tied embeddings stay tied: not written twice
    save_file({"ids": ids()}, str(tmp_path / "ids.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        x = load_file({str(tmp_path / 'ids.safetensors')!r})["ids"]
        with torch.no_grad():
            save_file({{"logits": m(x).logits.contiguous()}}, {str(tmp_path / 'logits.safetensors')!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, timeout=120)
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_only_kept_tensors_are_read(saved, tmp_path, monkeypatch):
    model, base = saved("llama")
    g = gate(model, group_size=8)
    keep = PATTERNS["ragged"]
    keep = KeepSet(layers=[1], heads=keep.heads, groups=keep.groups)
    touched: list[str] = []
    for meth in ("read", "read_index"):
        orig = getattr(LazyCheckpoint, meth)

        def spy(self, name, *a, _orig=orig):
            touched.append(name)
            return _orig(self, name, *a)

        monkeypatch.setattr(LazyCheckpoint, meth, spy)
    report = resize(base, keep, g.inventory, tmp_path / "out")
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in touched)
    # every byte read is written (nothing read and thrown away), and far less than the file
    assert report["bytes_read"] == report["bytes_written"]
    assert report["bytes_read"] < (base / "model.safetensors").stat().st_size * 0.7


def test_sharded_checkpoint_through_its_index(saved, tmp_path):
    model, base = saved("qwen2", _shard=True)
    assert (base / "model.safetensors.index.json").is_file()
    g = gate(model, group_size=8)
    keep = PATTERNS["ragged"]
    with g.keep(keep):
        expected = g(ids()).logits
    resize(base, keep, g.inventory, tmp_path / "out")
    torch.testing.assert_close(load_resized(tmp_path / "out")(ids()).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trained_weights_and_lora_are_folded(family, saved, tmp_path):
    """Synthetic run outputs: one tensor replaced, LoRA on a q/k/v projection (Conv1D transposed for GPT-2)."""
    model, base = saved(family)
    g = gate(model, group_size=8)
    gen = torch.Generator().manual_seed(7)
    if family == "gpt2":
        over, target = "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight"
        out_dim, in_dim = 3 * 48, 48
    else:
        over, target = "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
        out_dim, in_dim = 48, 48
    params = dict(model.named_parameters())
    weights = {over: params[over].detach() + 0.05 * torch.randn(params[over].shape, generator=gen)}
    lora = {target: {"A": 0.1 * torch.randn(4, in_dim, generator=gen),
                     "B": 0.1 * torch.randn(out_dim, 4, generator=gen), "scale": 2.0}}
    delta = 2.0 * lora[target]["B"] @ lora[target]["A"]
    with torch.no_grad():  # the trained model the run describes
        params[over].copy_(weights[over])
        params[target].add_(delta.T if family == "gpt2" else delta)
    keep = PATTERNS["ragged"]
    with g.keep(keep):
        expected = g(ids()).logits
    report = resize(base, keep, g.inventory, tmp_path / "out", weights=weights, lora=lora)
    assert report["weights_overridden"] == 1 and report["lora_folded"] == 1
    torch.testing.assert_close(load_resized(tmp_path / "out")(ids()).logits, expected, atol=ATOL, rtol=0)


def test_manifest_tokenizer_and_config(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    g = gate(model, group_size=16)
    keep = KeepSet(layers=[1], heads=[(1, 0), (1, 1)], groups=[(1, 0), (1, 2)])
    report = resize(tiny_llama_dir, keep, g.inventory, tmp_path / "out")
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) \
        == (1, 2, 1, 32)
    assert report["form"] == "standard"
    manifest = json.loads((tmp_path / "out" / "ppn-resize.json").read_text())
    assert KeepSet.from_dict(manifest["keepset"]) == g.inventory.complete(keep)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == model.config.vocab_size or len(tok) <= model.config.vocab_size
    assert report["size_params"] == pytest.approx(g.inventory.size_of(keep))


def test_user_errors_are_one_line(saved, tmp_path, monkeypatch):
    model, base = saved("llama")
    g = gate(model, group_size=8)
    keep = PATTERNS["layers"]
    resize(base, keep, g.inventory, tmp_path / "out")
    with pytest.raises(ConfigError, match="already exists"):
        resize(base, keep, g.inventory, tmp_path / "out")
    resize(base, KeepSet(layers=[1]), g.inventory, tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1
    other = gate(tiny_model("llama", hidden_size=24), group_size=8).inventory
    with pytest.raises(RunError, match="different model"):
        resize(base, keep, other, tmp_path / "x")
    with pytest.raises(ConfigError, match="no layer"):
        resize(base, KeepSet(), g.inventory, tmp_path / "x")
    with pytest.raises(ConfigError, match="shape"):
        resize(base, keep, g.inventory, tmp_path / "x", amplitudes={"attn_scale": torch.ones(2, 2)})
    # a failed write leaves neither the output nor a temporary directory behind
    import ppn_bayes.export.resize

    def full_disk(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ppn_bayes.export.resize, "save_streaming", full_disk)
    with pytest.raises(OSError):
        resize(base, keep, g.inventory, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base-llama", "out"])


def test_runs_are_maximal_contiguous_ranges():
    assert runs(torch.tensor([0, 1, 2, 5, 6, 6, 7, 3])) == [(0, 3), (5, 7), (6, 8), (3, 4)]
    assert runs(torch.tensor([], dtype=torch.long)) == []


# ------------------------------------------------------------------------------------ in-memory switch


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_switch_equals_gated_and_materialized_and_restores(family):
    model = tiny_model(family)
    g = gate(model, group_size=8)
    keep = KeepSet(layers=[0, 2], heads=[(0, 0), (0, 4), (2, 1), (2, 2)], groups=[(0, 1), (2, 0), (2, 7)])
    x = ids()
    dense = model(x).logits
    with g.keep(keep):
        expected = g(x).logits
    layers_before = g.family.layers(model)
    idx_before = [m.layer_idx for m in g.family.layers(model)[2].modules() if hasattr(m, "layer_idx")]
    sw = SubnetSwitch(g)
    with sw.use(keep) as small:
        assert small is model and len(g.family.layers(model)) == 2  # the same object, fewer layers
        got = small(x).logits
        assert all(m.layer_idx == 1 for m in g.family.layers(model)[1].modules() if hasattr(m, "layer_idx"))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, materialize(model, keep, g.inventory)(x).logits, atol=ATOL, rtol=0)
    assert g.family.layers(model) is layers_before
    assert [m.layer_idx for m in layers_before[2].modules() if hasattr(m, "layer_idx")] == idx_before
    assert torch.equal(model(x).logits, dense)


def test_switch_shares_weights_and_restores_on_error():
    model = tiny_model("llama")
    n_params = sum(p.numel() for p in model.parameters())
    with switch(model, KeepSet(layers=[1]), gate(tiny_model("llama"), kinds=("layers",)).inventory) as small:
        assert sum(p.numel() for p in small.parameters()) < n_params
        assert small.config.num_hidden_layers == 1
        ptr = small.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert ptr == model.model.layers[1].self_attn.q_proj.weight.data_ptr()  # no copy
    sw = SubnetSwitch(model)
    with pytest.raises(RuntimeError, match="boom"), sw.use(KeepSet(layers=[0], heads=full_heads(),
                                                                    groups=[(0, 0)])):
        raise RuntimeError("boom")
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert sw.gated.current_gates()["groups"] is None
    with sw.use(KeepSet(layers=[0], heads=full_heads(), groups=full_groups())), \
            pytest.raises(ConfigError, match="already active"), sw.use(KeepSet(layers=[1])):
        pass
    sw.close()
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_switch_generates_with_kv_cache_like_the_materialized_model():
    model = tiny_model("qwen2")
    sw = SubnetSwitch(model)
    inv = sw.inventory
    keep = inv.complete(KeepSet(layers=[0, 2], heads=full_heads(), groups=[(l, g) for l in range(NL)
                                                                                for g in range(64)]))
    small = materialize(model, keep, inv)
    x = ids()[:1]
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = small.generate(x, **kw)
    with sw.use(keep) as view:
        got = view.generate(x, **kw)
    assert torch.equal(got, expected)


def test_output_form_rules():
    """Standard only when one transformers config can describe every kept layer."""
    from ppn_bayes.backbone.slicing import layer_cut
    from ppn_bayes.export.plan import output_form

    g = gate(tiny_model("llama"), group_size=8)
    inv, fam, dims = g.inventory, g.family, g.inventory.dims
    cut = lambda heads, ch=8: layer_cut(heads, list(range(ch)), dims)
    assert output_form([(0, cut([0, 1, 2])), (1, cut([3, 4, 5]))], inv, fam) == "standard"
    assert output_form([(0, cut([0, 1, 2])), (1, cut([3, 4]))], inv, fam) == SHAPES_KEY  # counts differ
    assert output_form([(0, cut([0, 1, 2, 3, 4]))], inv, fam) == SHAPES_KEY  # 48 % 5 heads != 0
    assert output_form([(0, cut([0, 1], ch=0))], inv, fam) == SHAPES_KEY  # no MLP left
    gg = gate(tiny_model("gpt2"), group_size=8)
    assert output_form([(0, layer_cut(list(range(6)), [0, 1], gg.inventory.dims))], gg.inventory, gg.family) \
        == "standard"
    assert output_form([(0, layer_cut([0, 1], [0, 1], gg.inventory.dims))], gg.inventory, gg.family) == SHAPES_KEY


def test_run_names_match_a_bare_gpt2_checkpoint(saved, tmp_path):
    """GPT-2's hub files name the bare model (``h.0.attn...``); runs store the model's names
    (``transformer.h.0.attn...``). Overrides and adapters still land on the right tensors."""
    model, base = saved("gpt2")
    state = load_file(str(base / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in state)
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    g = gate(model, group_size=8)
    gen = torch.Generator().manual_seed(3)
    over, target = "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn"
    params = dict(model.named_parameters())
    weights = {over: params[over].detach() + 0.05 * torch.randn(params[over].shape, generator=gen)}
    lora = {target: {"A": 0.1 * torch.randn(4, 48, generator=gen), "B": 0.1 * torch.randn(144, 4, generator=gen),
                     "scale": 2.0}}
    with torch.no_grad():
        params[over].copy_(weights[over])
        params[f"{target}.weight"].add_((2.0 * lora[target]["B"] @ lora[target]["A"]).T)
    keep = PATTERNS["ragged"]  # keeps layers 0 and 1
    with g.keep(keep):
        expected = g(ids()).logits
    report = resize(base, keep, g.inventory, tmp_path / "out", weights=weights, lora=lora)
    assert report["weights_overridden"] == 1 and report["lora_folded"] == 1
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("transformer.") for k in written)  # no stray extra tensor
    torch.testing.assert_close(load_resized(tmp_path / "out")(ids()).logits, expected, atol=ATOL, rtol=0)
