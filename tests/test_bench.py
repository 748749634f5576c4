"""Speed benchmark: behaviour only (fields, keep-sets, ideal ratios computed right); never timings."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from ppn_bayes.backbone import KeepSet, gate
from ppn_bayes.errors import ConfigError, SizeError
from ppn_bayes.evaluation.bench import (
    ideal_ratios,
    keepsets_for,
    layer_keepset_by_norm,
    plot_speed,
    speed_benchmark,
)


def _matmul_flops_per_layer(model) -> float:
    """2 * weight entries of every nn.Linear in one layer: counted from the modules, not the inventory."""
    layer = model.model.layers[0]
    return 2.0 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))


def test_ideal_ratios_match_a_hand_count():
    model = tiny_model("llama")
    inv = gate(model, kinds=("layers",)).inventory
    keep = inv.complete(KeepSet(layers=[1]))
    P, N, d, V, H, hd, L = 10, 5, 48, VOCAB, 6, 8, 3
    w = _matmul_flops_per_layer(model) + 2 * d  # + the two norms' weights at one FLOP per parameter
    head = 2 * d * V
    attn = lambda ctxs, layers: 4 * hd * H * layers * sum(ctxs)
    dense_pre = P * w * L + attn(range(1, P + 1), L) + head
    kept_pre = P * w * 1 + attn(range(1, P + 1), 1) + head
    dense_dec = N * (w * L + head) + attn(range(P + 1, P + N + 1), L)
    kept_dec = N * (w * 1 + head) + attn(range(P + 1, P + N + 1), 1)
    ideal = ideal_ratios(inv, keep, V, P, N)
    assert ideal["prefill"] == pytest.approx(dense_pre / kept_pre, rel=1e-12)
    assert ideal["decode"] == pytest.approx(dense_dec / kept_dec, rel=1e-12)
    n_all = sum(p.numel() for p in model.parameters())
    n_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert ideal["params"] == pytest.approx((n_all - 2 * n_layer) / n_all, rel=1e-12)
    full = ideal_ratios(inv, inv.full_keepset(), V, P, N)
    assert full == {"prefill": 1.0, "decode": 1.0, "params": 1.0}


def test_norm_keepset_keeps_the_largest_layers():
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        for p in model.model.layers[2].parameters():
            p.mul_(5)
    keep, inv = layer_keepset_by_norm(model, 0.25)
    assert keep.layers == [2] and inv.kinds == ("layers",)
    assert layer_keepset_by_norm(model, 0.5)[0].layers[0:] and 2 in layer_keepset_by_norm(model, 0.5)[0].layers
    assert len(layer_keepset_by_norm(model, 0.01)[0].layers) == 1  # at least one layer
    assert not any(m._forward_pre_hooks for m in model.modules())  # its temporary hooks are gone
    with pytest.raises(SizeError, match="size"):
        layer_keepset_by_norm(model, 1.5)


def test_speed_benchmark_result_fields(tmp_path):
    model = tiny_model("llama")
    keepsets, inv = keepsets_for(model, [1.0, 0.67, 0.34])
    res = speed_benchmark(model, keepsets, inv, batch_sizes=[1, 2], prompt_len=6, new_tokens=3, repeats=1,
                          warmup=0)
    rows = res["rows"]
    assert [(r["batch"], r["layers"]) for r in rows] == [(1, 3), (1, 2), (1, 1), (2, 3), (2, 2), (2, 1)]
    for r in rows:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_speedup", "decode_speedup",
                    "prefill_ideal", "decode_ideal", "memory_ratio", "memory_ideal", "kv_cache_bytes"):
            assert r[key] > 0, key
        assert r["memory_ratio"] == pytest.approx(r["memory_ideal"])  # resized models hold exactly the kept params
        assert r["kv_cache_bytes"] == r["batch"] * r["layers"] * 2 * 2 * 8 * (6 + 3) * 4  # K and V, 2 KV heads x 8, P + N positions, fp32
    dense = [r for r in rows if r["layers"] == 3]
    assert all(r["prefill_speedup"] == 1.0 and r["decode_ideal"] == 1.0 for r in dense)
    assert "LM head" in res["ideal_includes"] and res["device"].startswith("CPU")
    json.dumps(res)
    png = plot_speed(res, tmp_path / "speed.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_parse_list_errors():
    from ppn_bayes.cli.options import comma_list as parse_list

    assert parse_list("1.0, 0.5", float, "--sizes") == [1.0, 0.5]
    with pytest.raises(ConfigError, match="--sizes"):
        parse_list("1.0,x", float, "--sizes")
    with pytest.raises(ConfigError, match="empty"):
        parse_list("", int, "--batch-sizes")


def test_cli_bench_speed_json_and_plot(tiny_llama_dir, tmp_path, capsys):
    from ppn_bayes.cli import main

    rc = main(["bench", "speed", "--model", str(tiny_llama_dir), "--sizes", "1.0,0.5", "--batch-sizes", "1",
               "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
               "--json", "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and out["keepsets"] == "highest-norm layers" and (tmp_path / "p.png").is_file()
    assert main(["bench", "speed", "--model", str(tiny_llama_dir), "--sizes", "2.0"]) == 2
    assert "error:" in capsys.readouterr().err
