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
from ppn_bayes.compare.comparison import compare
from ppn_bayes.compare.options import PEERS
from ppn_bayes.compare.outputs import markdown_table, write_outputs
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


def test_costs_count_every_size_s_healing_once_per_size(result):
    """Healing runs per size, so a one-run method's cost is its run plus each size's heal."""
    rows = {m: [r for r in result["results"] if r["method"] == m] for m in ("gisp", "shortgpt", "wanda")}
    for m, rs in rows.items():
        assert all(r["heal_seconds"] > 0.0 for r in rs), m
        heals = sum(r["heal_seconds"] for r in rs)
        run = rs[0]["cost_seconds"] if rs[0]["one_run_for_all_sizes"] else sum(r["cost_seconds"] for r in rs)
        assert result["costs"][m] == pytest.approx(run + heals, rel=1e-9), m


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
    with pytest.raises(RunError, match="ppn"):
        compare(model, b, b, [0.5], ["ppn"], decode_tokens=0)
    with pytest.raises(ConfigError, match="unknown method"):
        compare(model, b, b, [0.5], ["magic"], decode_tokens=0)


def test_ppn_rows_from_a_run(tiny_run, tiny_llama_dir, tiny_tokenizer):
    from ppn_bayes.hub.zoo import load_model

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
    from ppn_bayes.backbone.perplexity import perplexity
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
    (["--transfer-data", "bundled"], "another domain"),
    (["--transfer-data", "/nonexistent/corpus.txt"], "corpus.txt"),
])
def test_cli_errors_are_one_line(argv, needle, tiny_llama_dir, tmp_path, capsys):
    code = main(["compare", "--model", str(tiny_llama_dir), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_transfer_blocks_are_measured_for_every_row(tiny_llama_dir, tmp_path, capsys):
    """``--transfer-data kjv``: every row is also measured on the other domain's test blocks, and the
    value is the perplexity of that row's model there (the dense row recomputed independently)."""
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.data.corpus import token_blocks
    from ppn_bayes.hub.zoo import load_model

    code = main(["compare", "--model", str(tiny_llama_dir), "--sizes", "0.7", "--methods", "shortgpt",
                 "--calib-blocks", "2", "--test-blocks", "2", "--block-size", "16", "--decode-tokens", "0",
                 "--transfer-data", "kjv", "--out", str(tmp_path / "o"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["transfer_data"] == "kjv"
    assert all("transfer_perplexity" in r for r in [out["dense"], *out["results"]])
    model, tok = load_model(str(tiny_llama_dir))
    kjv = token_blocks(tok, "test", 16, "kjv", max_blocks=2)
    assert out["dense"]["transfer_perplexity"] == pytest.approx(perplexity(model, kjv)["perplexity"], rel=1e-5)
    # another domain really: the Austen test blocks give another number
    assert out["dense"]["transfer_perplexity"] != pytest.approx(out["dense"]["perplexity"], rel=1e-3)
    table = (tmp_path / "o" / "compare.md").read_text()
    assert "transfer ppl (x dense)" in table and "(x1.00)" in table


# ----------------------------------------------------------------------------- GISP's margin objective

MARGIN_ARGV = ["--sizes", "0.7", "--methods", "gisp", "--gisp-objective", "margin", "--gisp-step", "0.3",
               "--calib-blocks", "2", "--test-blocks", "2", "--block-size", "16", "--decode-tokens", "0"]


def test_cli_gisp_margin_reaches_gisp(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import ppn_bayes.baselines.gisp as gisp_mod
    import ppn_bayes.compare.comparison as comparison_mod
    from ppn_bayes.data.tasks.choices import ChoiceExample

    seen = {}
    real = gisp_mod.gisp

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(comparison_mod, "gisp", spy)  # where compare() calls it
    code = main(["compare", "--model", str(tiny_llama_dir), *MARGIN_ARGV, "--gisp-choices", "3",
                 "--out", str(tmp_path / "o"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert seen["objective"] == "margin" and len(seen["choices"]) == 3
    assert all(isinstance(c, ChoiceExample) and len(c.context) + max(map(len, c.choices)) <= 128
               for c in seen["choices"])  # contexts cut to the model's 128 positions
    rows = out["results"]
    assert [(r["method"], r["objective"]) for r in rows] == [("gisp-margin", "margin")]
    assert rows[0]["param_fraction"] <= 0.7 + 1e-12 and set(out["costs"]) == {"gisp-margin"}
    cfg = out["config"]
    assert cfg["gisp_objective"] == "margin" and cfg["gisp_choices"] == 3 and cfg["gisp_choices_in_eval_task"] == 0
    assert "train" in cfg["gisp_choices_source"]
    table = (tmp_path / "o" / "compare.md").read_text()
    assert "| gisp-margin | 0.70 |" in table
    assert "gisp-margin" in json.loads((tmp_path / "o" / "keepsets.json").read_text())


def test_gisp_rows_record_the_objective(result):
    assert {r["objective"] for r in result["results"] if r["method"] == "gisp"} == {"perplexity"}
    assert result["config"]["gisp_objective"] == "perplexity" and result["config"]["gisp_choices"] == 0


def test_calibration_choices_are_disjoint_from_the_evaluated_task():
    """The shipped task has one split (test, all scored by `ppn eval --tasks`); calibration items come from
    the train novels, so none of their texts is in the task file or in the test novel at all."""
    from ppn_bayes.data.corpus import load_corpus
    from ppn_bayes.data.tasks.choices import calibration_items
    from ppn_bayes.data.tasks.loader import load, read_items

    items = calibration_items(12)
    assert len(items) == 12 and {it["novel"] for it in items} == {0, 1, 2, 3}
    assert items == calibration_items(12)  # deterministic
    assert all(len(it["choices"]) == 4 and 0 <= it["label"] < 4 for it in items)
    task = read_items()
    task_texts = {t for it in task for t in (it["context"], *it["choices"])}
    assert not task_texts & {t for it in items for t in (it["context"], *it["choices"])}
    test_novel = " ".join(" ".join(load_corpus("bundled", "test")).split())
    train = " ".join(" ".join(load_corpus("bundled", "train")).split())
    assert all(it["context"] in train and it["context"] not in test_novel for it in items)
    # the evaluation scores the task's only split, and that is every item of the file
    assert list(load().keys()) == ["test"] and len(load()["test"]) == len(task)


def test_compare_margin_needs_choices():
    model = tiny_model("llama")
    b = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="choice examples"):
        compare(model, b, b, [0.5], ["gisp"], decode_tokens=0, gisp_objective="margin")
    with pytest.raises(ConfigError, match="unknown GISP objective"):
        compare(model, b, b, [0.5], ["gisp"], decode_tokens=0, gisp_objective="accuracy")


@pytest.mark.parametrize("content, argv, needle", [
    (None, [], "no such file"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0}\n{oops\n', [], "line 2 is not valid JSON"),
    ('{"context": "a", "label": 0}\n', [], "lacks 'choices'"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}\n', [], "'label' 2"),
    ('["a"]\n', [], "not a JSON object"),
    ("\n", [], "holds no examples"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0}\n', ["--gisp-objective", "perplexity"], "apply to"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0}\n', ["--methods", "shortgpt"], "add gisp"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0}\n', ["--gisp-choices", "0"], "--gisp-choices 0"),
])
def test_cli_bad_choices_file_is_one_line(content, argv, needle, tmp_path, capsys):
    path = tmp_path / "choices.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    # a model that does not exist: the choices must fail before any model is loaded
    code = main(["compare", "--model", str(tmp_path / "no-model"), *MARGIN_ARGV, "--gisp-choices-file", str(path),
                 "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_choices_file_is_used(tiny_llama_dir, tmp_path, capsys):
    from ppn_bayes.data.tasks.loader import read_items

    path = tmp_path / "mine.jsonl"
    lines = [json.dumps({"context": f"The {w} was", "choices": [" red.", " blue.", " green."], "label": i % 3})
             for i, w in enumerate(["sky", "sea", "grass"])]
    lines.append(json.dumps({k: read_items()[0][k] for k in ("context", "choices", "label")}))  # an eval item
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["compare", "--model", str(tiny_llama_dir), *MARGIN_ARGV, "--gisp-choices-file", str(path),
                 "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    cfg = json.loads(captured.out)["config"]
    assert cfg["gisp_choices"] == 4 and cfg["gisp_choices_source"] == str(path)
    assert cfg["gisp_choices_in_eval_task"] == 1 and "warning: 1 of" in captured.err


def test_a_dense_model_that_cannot_decode_says_why_and_a_pruned_one_raises():
    """The speedup column is blank only when the dense model itself cannot decode, with the reason in
    the config; a pruned model failing where the dense one decodes is a bug and is not swallowed."""
    from ppn_bayes.compare.bench import Bench

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache=False, **kw):
            if use_cache:
                raise NotImplementedError("this architecture has no KV cache")
            return self.inner(input_ids=input_ids, use_cache=False)

    model = tiny_model("llama")
    test = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    bench = Bench(NoCache(model), test, None, decode_tokens=2, batch_size=2)
    assert not bench.can_decode and bench.speedup(model) is None
    assert bench.decode_error == "NotImplementedError: this architecture has no KV cache"
    ok = Bench(model, test, None, decode_tokens=2, batch_size=2)
    assert ok.can_decode and ok.decode_error is None
    with pytest.raises(NotImplementedError):
        ok.speedup(NoCache(model))


def test_compare_takes_a_typed_options_object_and_refuses_unknown_options():
    """``compare(..., options)`` and the same fields as keywords are one thing; a misspelt option is a
    one-line error naming the known ones, not a silently ignored keyword."""
    from ppn_bayes.compare.options import CompareOptions

    model = tiny_model("llama")
    b = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    by_object = compare(model, b, b, [0.5], ["shortgpt"], CompareOptions(decode_tokens=0, group_size=4))
    by_keywords = compare(model, b, b, [0.5], ["shortgpt"], decode_tokens=0, group_size=4)
    assert [r["perplexity"] for r in by_object["results"]] == [r["perplexity"] for r in by_keywords["results"]]
    assert by_object["config"]["group_size"] == 4
    with pytest.raises(ConfigError, match="unknown compare option.*decode_token\\b.*known: anchor_kinds") as err:
        compare(model, b, b, [0.5], ["shortgpt"], decode_token=0)
    assert "\n" not in str(err.value)
