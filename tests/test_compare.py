"""``ppn compare`` on a tiny model: every non-PPN method, two sizes, the JSON schema, nesting and budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.baselines import is_nested
from ppn_bayes.cli import main
from ppn_bayes.compare import PEERS, compare, markdown_table, write_outputs
from ppn_bayes.errors import ConfigError, RunError

SIZES = [0.8, 0.55]
COMMON = {"method", "size", "perplexity", "nll", "param_fraction", "flops_fraction", "cost_seconds",
          "one_run_for_all_sizes", "healed_tokens"}


@pytest.fixture(scope="module")
def result():
    model = tiny_model("llama", intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, VOCAB, (6, 24), generator=g)
    test = torch.randint(0, VOCAB, (3, 24), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = compare(model, calib, test, SIZES, PEERS, seeds=(0, 1), prunepath_experts=8, decode_tokens=2,
                  heal_blocks=calib[:2])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model never modified
    return out


def test_rows_cover_every_method_and_size(result):
    seen = {(r["method"], r["size"]) for r in result["results"]}
    for m in ("gisp", "shortgpt", "prunepath", "wanda", "sparsegpt", "random"):
        for s in SIZES:
            assert (m, s) in seen
    assert ("wanda-2:4", 0.5) in seen and ("sparsegpt-2:4", 0.5) in seen
    assert result["dense"]["method"] == "dense" and result["dense"]["param_fraction"] == 1.0


def test_json_schema_and_budgets(result):
    for r in result["results"]:
        assert COMMON <= set(r), r["method"]
        assert r["perplexity"] > 1.0 and r["perplexity"] == pytest.approx(torch.tensor(r["nll"]).exp().item())
        assert 0.0 < r["flops_fraction"] <= 1.0 + 1e-9
        if r["method"] in ("gisp", "shortgpt", "random", "wanda", "sparsegpt"):
            assert r["param_fraction"] <= r["size"] + 1e-12  # never above the request
        if r["method"] in ("gisp", "shortgpt", "random"):
            assert "decode_speedup" in r and r["one_run_for_all_sizes"]
        if r["method"] == "prunepath":
            assert 0.0 < r["active_fraction"] <= 1.0 and 0.0 < r["tau"] <= 1.0
        if r["method"] == "random":
            assert len(r["perplexities"]) == 2 and r["perplexity"] == pytest.approx(sum(r["perplexities"]) / 2)
        if r["method"] != "prunepath":
            assert r["healed_tokens"] == 2 * 24
    json.dumps(result)  # serializable as it stands
    assert set(result["costs"]) >= {"gisp", "shortgpt", "prunepath", "wanda", "sparsegpt", "random"}


def test_keepsets_nest_across_sizes(result):
    for method in ("gisp", "shortgpt", "random"):
        ks = {float(s): KeepSet.from_dict(k) for s, k in result["keepsets"][method].items()}
        assert set(ks) == set(SIZES)
        assert is_nested(ks)


def test_outputs_written(result, tmp_path):
    paths = write_outputs(result, tmp_path / "cmp")
    data = json.loads(Path(paths["json"]).read_text())
    assert "keepsets" not in data and len(data["results"]) == len(result["results"])
    assert json.loads(Path(paths["keepsets"]).read_text())["gisp"]
    table = Path(paths["markdown"]).read_text()
    assert table == markdown_table(result) and table.count("\n") == len(result["results"]) + 3
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppn_rows_need_a_run():
    model = tiny_model("llama")
    b = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        import ppn_bayes.run  # noqa: F401
        expected = RunError
    except ImportError:
        expected = ConfigError
    with pytest.raises(expected, match="ppn"):
        compare(model, b, b, [0.5], ["ppn"], decode_tokens=0)
    with pytest.raises(ConfigError, match="unknown method"):
        compare(model, b, b, [0.5], ["magic"], decode_tokens=0)


def test_ppn_rows_from_a_run(tiny_run, tiny_llama_dir, tiny_tokenizer):
    from ppn_bayes.zoo import load_model

    model, _ = load_model(tiny_llama_dir)
    b = torch.randint(0, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    sizes = [0.8, 0.5]
    out = compare(model, b, b, sizes, ["ppn", "shortgpt"], run_dir=str(tiny_run), decode_tokens=2,
                  model_path=tiny_llama_dir)
    rows = [r for r in out["results"] if r["method"] == "ppn"]
    assert [r["size"] for r in rows] == sizes
    assert all(COMMON <= set(r) and r["param_fraction"] <= r["size"] + 1e-12 for r in rows)
    assert all(r["weights"] == "frozen" and r["lambda"] >= 0 for r in rows)
    ks = {float(s): KeepSet.from_dict(k) for s, k in out["keepsets"]["ppn"].items()}
    assert is_nested(ks)
    # The PPN perplexity is the gated network's with the same masks (and amplitudes at lambda*).
    from ppn_bayes.evaluate import perplexity
    from ppn_bayes.run import load_run

    run = load_run(tiny_run)
    gated = run.load_model()
    keep = ks[0.5]
    with gated.gates(**run.posterior.push.gates(run.inventory.masks(keep), rows[1]["lambda"])):
        assert perplexity(gated, b)["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-6)


def test_ppn_run_of_another_model_is_refused(tiny_run, tmp_path):
    from conftest import make_tiny_llama

    other = tmp_path / "other"
    make_tiny_llama(96, seed=5, hidden_size=48, intermediate_size=96).save_pretrained(other)
    model = tiny_model("llama")
    b = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RunError, match="trained on"):
        compare(model, b, b, [0.5], ["ppn"], run_dir=str(tiny_run), decode_tokens=0, model_path=other)


def test_cli_json(tiny_llama_dir, tmp_path, capsys):
    code = main(["compare", "--model", str(tiny_llama_dir), "--sizes", "0.7", "--methods", "shortgpt,wanda,random",
                 "--calib-blocks", "2", "--test-blocks", "2", "--block-size", "16", "--seeds", "2",
                 "--decode-tokens", "0", "--out", str(tmp_path / "o"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in out["results"]}
    assert methods == {"shortgpt", "wanda", "wanda-2:4", "random"}
    assert (tmp_path / "o" / "compare.png").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--sizes", "0.5,abc"], "--sizes"),
    (["--sizes", "1.5"], "out of range"),
    (["--methods", "gisp,nope"], "unknown method"),
    (["--calib-blocks", "0"], "--calib-blocks"),
])
def test_cli_errors_are_one_line(argv, needle, tiny_llama_dir, tmp_path, capsys):
    code = main(["compare", "--model", str(tiny_llama_dir), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1
