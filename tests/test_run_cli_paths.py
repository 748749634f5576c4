"""``--run`` paths of ``ppn speculate`` and ``ppn bench speed`` on a real (tiny) fitted run."""

from __future__ import annotations

import json

from ppn_bayes.cli import main


def test_speculate_with_a_run_uses_its_keepsets_and_matches_dense_greedy(tiny_run, capsys):
    code = main(["speculate", "--run", str(tiny_run), "--prompt", "It was the best of times",
                 "--sizes", "0.5", "--draft-lengths", "2", "--max-new-tokens", "6", "--device", "cpu", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(tiny_run)
    (trial,) = out["trials"]
    assert trial["identical"] is True  # greedy drafting never changes the verifier's output
    assert 0.0 <= trial["acceptance_rate"] <= 1.0 and "text" in out


def test_bench_speed_with_a_run(tiny_run, capsys):
    code = main(["bench", "speed", "--run", str(tiny_run), "--sizes", "1.0,0.5", "--batch-sizes", "1",
                 "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--model", str(json.loads((tiny_run / "manifest.json").read_text())["base"]["path"]), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keepsets"].startswith("run ")
    assert {round(r["size"], 2) for r in out["rows"]} >= {0.5}
