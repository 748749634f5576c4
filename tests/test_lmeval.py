"""The lm-eval bridge and the shipped local task: offline, on in-memory (gated / materialised) models.

A model that has *read the novel* (an n-gram table of Persuasion, wrapped as a causal LM) must score
far above chance on the cloze task, and a random tiny Llama must land in [0, 1]: together they show
that the task's answers are right, that lm-eval scores our model object (not something it loaded by
name), and that the task runs with the network switched off.
"""

from __future__ import annotations

import json
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from ppn_bayes.data.tasks import DATA_FILE, LOCAL_TASK, TASKS_DIR
from ppn_bayes.data.tasks.build import LENGTH_TOLERANCE, build_items, render, split_sentences
from ppn_bayes.errors import ConfigError
from ppn_bayes.evaluation.lmeval import evaluate_tasks, hf_model, parse_tasks, summarize


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def persuasion() -> str:
    from ppn_bayes.data.corpus import load_corpus

    (text,) = load_corpus("bundled", "test")
    return text


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    """A random 2-layer Llama whose context holds a whole item (~400 tokens of the tiny tokenizer)."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(len(tiny_tokenizer), max_position_embeddings=1024), tiny_tokenizer


# ------------------------------------------------------------------------------------- the task data


def test_shipped_jsonl_is_exactly_what_the_builder_makes(persuasion):
    assert DATA_FILE.read_bytes() == render(build_items(persuasion))


def test_items_are_well_formed_and_the_answer_is_the_novels_next_sentence(persuasion):
    items = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(items) == 100 and [it["id"] for it in items] == list(range(100))
    flat = " ".join(persuasion.split())
    labels = []
    for it in items:
        choices, label = it["choices"], it["label"]
        assert len(choices) == 4 == len(set(choices)) and 0 <= label < 4
        truth = choices[label]
        assert f"{it['context']} {truth}" in flat  # the passage really continues with the answer
        for c in choices:
            assert c in flat and abs(len(c) - len(truth)) <= LENGTH_TOLERANCE * len(truth)
            assert f"{it['context']} {c}" not in flat or c == truth
        labels.append(label)
    assert all(10 <= labels.count(k) <= 40 for k in range(4))  # answer positions are spread


def test_sentence_splitter_keeps_quotes_and_titles():
    text = 'He spoke. "Not at all," said Mrs. Clay. "Quite!" Then Dr. Shirley left.'
    assert split_sentences(text) == ['He spoke.', '"Not at all," said Mrs. Clay.', '"Quite!"',
                                     'Then Dr. Shirley left.']


def test_package_data_ships_the_task():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["ppn_bayes.data.tasks"]
    shipped = {p.name for g in globs for p in TASKS_DIR.glob(g)}
    assert {"persuasion_cloze.yaml", "persuasion_cloze.jsonl"} <= shipped


# ------------------------------------------------------------------------------------------- scoring


def test_local_task_runs_offline_on_a_tiny_model(tiny, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task must not depend on the working directory
    model, tok = tiny
    out = evaluate_tasks(model, tok, limit=8, batch_size=4, builtin=False)
    scores = out["tasks"][LOCAL_TASK]
    assert scores["samples"] == 8 and out["limit"] == 8
    for m in ("acc", "acc_norm"):
        assert 0.0 <= scores[m] <= 1.0 and scores[f"{m}_stderr"] >= 0.0
    assert not model.training


class NovelNGram(torch.nn.Module):
    """A causal LM that has memorised a token stream: interpolated n-gram probabilities.

    ``p(w | h) = 0.99 * sum_k lambda_k p_k(w | last k tokens of h) + 0.01 * unigram(w)`` over the
    orders whose context occurs in the stream (weights renormalised). A context is hashed modulo the
    prime ``2^31 - 1`` (a handful of collisions among the novel's ~10^5 contexts), and the counts are
    sorted ``hash * V + next`` keys searched with ``searchsorted``: a few megabytes for a novel.
    """

    ORDERS = ((10, 0.6), (5, 0.25), (2, 0.15))
    PRIME = 2**31 - 1

    def __init__(self, ids: list[int], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives lm-eval a device
        self.config = SimpleNamespace(max_position_embeddings=2048, model_type="ngram", vocab_size=vocab)
        a = np.asarray(ids, dtype=np.int64)
        unigram = np.bincount(a, minlength=vocab).astype(np.float64) + 1.0
        self.floor = unigram / unigram.sum()
        self.tables = {}
        for k, _ in self.ORDERS:
            h = self._hashes(a[:-1], k)  # context ending at t predicts a[t + 1]
            keys, counts = np.unique(h * vocab + a[k:], return_counts=True)
            self.tables[k] = (keys, counts.astype(np.float64))

    def _hashes(self, seq: np.ndarray, k: int) -> np.ndarray:
        """Hash of every window ``seq[t-k+1 : t+1]`` (``t >= k - 1``)."""
        h = np.zeros(len(seq) - k + 1, dtype=np.int64)
        for j in range(k):
            h = (h * self.vocab + seq[j:len(seq) - k + 1 + j]) % self.PRIME
        return h

    def tie_weights(self):
        return None

    @property
    def device(self):
        return self.anchor.device

    def _sequence(self, seq: np.ndarray) -> np.ndarray:
        T = len(seq)
        mix, weight = np.zeros((T, self.vocab)), np.zeros((T, 1))
        for k, w in self.ORDERS:
            if T < k:
                continue
            keys, counts = self.tables[k]
            h = self._hashes(seq, k) * self.vocab
            lo, hi = np.searchsorted(keys, h), np.searchsorted(keys, h + self.vocab)
            for i in np.nonzero(hi > lo)[0]:
                t, c = i + k - 1, counts[lo[i]:hi[i]]
                mix[t, keys[lo[i]:hi[i]] % self.vocab] += w * c / c.sum()
                weight[t] += w
        mix = np.where(weight > 0, mix / np.maximum(weight, 1e-12), self.floor)
        return np.log(0.99 * mix + 0.01 * self.floor)

    def forward(self, input_ids, **_):
        rows = [self._sequence(np.asarray(seq, dtype=np.int64)) for seq in input_ids.tolist()]
        return SimpleNamespace(logits=torch.tensor(np.stack(rows), dtype=torch.float32))


def test_a_model_that_has_read_the_novel_scores_far_above_chance(persuasion, tiny_tokenizer, offline):
    ids = tiny_tokenizer(" ".join(persuasion.split("\n\n")))["input_ids"]
    oracle = NovelNGram(ids, len(tiny_tokenizer))
    out = evaluate_tasks(oracle, tiny_tokenizer, limit=40, batch_size=8, builtin=False)
    assert out["tasks"][LOCAL_TASK]["acc"] >= 0.9  # chance 0.25; 0.97 on all 100 items


def test_gated_model_is_scored_as_gated(tiny, offline):
    """lm-eval sees the keep-set: a gated model's per-item log-likelihoods equal the materialised
    sub-network's and differ from the dense model's."""
    from ppn_bayes.backbone import gate
    from ppn_bayes.backbone.materialize import materialize
    from ppn_bayes.backbone.units import KeepSet

    model, tok = tiny
    gated = gate(model, group_size=16)
    inv = gated.inventory
    keep = KeepSet(layers=[1], heads=[(1, 0), (1, 3)], groups=[(1, 0), (1, 2)])
    assert hf_model(gated) is model

    def lls(m):
        out = evaluate_tasks(m, tok, limit=3, batch_size=4, builtin=False, per_item=True)
        return torch.tensor([r["loglikelihoods"] for r in out["items"][LOCAL_TASK]])

    dense = lls(model)
    small = lls(materialize(model, keep, inv))
    with gated.keep(keep):
        masked = lls(gated)
    assert dense.shape == masked.shape == (3, 4)
    torch.testing.assert_close(masked, small, atol=1e-3, rtol=1e-4)
    assert (masked - dense).abs().max() > 1e-2
    gated.remove_hooks()


# -------------------------------------------------------------------------------------------- errors


def test_unknown_task_is_a_one_line_error(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="unknown lm-eval task 'no_such_task'") as err:
        evaluate_tasks(model, tok, tasks="no_such_task", builtin=False)
    assert "\n" not in str(err.value)


def test_missing_lm_eval_is_a_one_line_error_with_the_install_command(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ppn-bayes\[eval\]'") as err:
        evaluate_tasks(*tiny)
    assert "\n" not in str(err.value)


def test_missing_include_path_and_bad_limit(tiny):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_tasks(*tiny, include_path="/no/such/tasks", builtin=False)
    with pytest.raises(ConfigError, match="--limit"):
        evaluate_tasks(*tiny, limit=0)


def test_parse_tasks_and_summarize():
    assert parse_tasks(None) == [LOCAL_TASK] and parse_tasks(" , ") == [LOCAL_TASK]
    assert parse_tasks("a, b,a") == ["a", "b"] and parse_tasks(["x"]) == ["x"]
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75, "junk,none": "N/A"}}
    assert summarize(raw, ["t"], {"t": {"original": 100, "effective": 8}}) == {
        "t": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75, "samples": 8}}


@pytest.mark.slow
def test_smollm2_beats_chance_on_the_local_task(smollm2_path, offline):
    from ppn_bayes.hub.zoo import load_model

    model, tok = load_model(smollm2_path)
    scores = evaluate_tasks(model, tok, batch_size=8, builtin=False)["tasks"][LOCAL_TASK]
    assert scores["samples"] == 100
    # chance 0.25; measured acc 0.43, acc_norm 0.48 (+- 0.05), see docs/evaluation.md
    assert scores["acc"] >= 0.35 and scores["acc_norm"] >= 0.38
