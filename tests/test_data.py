"""Corpora, document splits, block packing, the block cache and calibration samples."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ppn_bayes.data import corpus as data
from ppn_bayes.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpora"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def bundled_rows(corpus: str, split: str) -> list[dict]:
    path = data.BUNDLED_DIR / corpus / f"{split}.jsonl.gz"
    return [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]


# ------------------------------------------------------------------------------------------ bundle


def test_bundle_is_small_and_has_provenance():
    files = list(data.BUNDLED_DIR.rglob("*.jsonl.gz"))
    assert sum(f.stat().st_size for f in files) < 4_000_000
    assert "public domain" in (data.BUNDLED_DIR / "PROVENANCE.md").read_text()


@pytest.mark.parametrize("corpus,expected", [
    ("austen", {"train": ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma"],
                "validation": ["Northanger Abbey"], "test": ["Persuasion"]}),
    ("kjv", {"train": ["Genesis", "Exodus"], "validation": ["Ruth"], "test": ["Mark"]}),
])
def test_splits_are_disjoint_by_document(corpus, expected):
    texts = {}
    for split, titles in expected.items():
        rows = bundled_rows(corpus, split)
        assert [r["title"] for r in rows] == titles
        assert all(set(r) == {"text", "title", "source"} and len(r["text"]) > 10_000 for r in rows)
        texts[split] = {r["text"] for r in rows}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    # No paragraph of the test novel appears in the training novels.
    train_paras = {p for t in texts["train"] for p in t.split("\n\n") if len(p) > 200}
    assert not any(p in train_paras for t in texts["test"] for p in t.split("\n\n") if len(p) > 200)


@pytest.mark.skipif(not (SHARED / "austen.txt.gz").is_file(), reason="shared/corpora not present")
def test_bundle_rebuilds_byte_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("make_bundle", data.BUNDLED_DIR / "make_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(str(SHARED), tmp_path)
    for f in data.BUNDLED_DIR.rglob("*.jsonl.gz"):
        assert (tmp_path / f.relative_to(data.BUNDLED_DIR)).read_bytes() == f.read_bytes(), f


def test_load_corpus_bundled_default_is_austen_test():
    docs = data.load_corpus()
    assert len(docs) == 1 and docs[0].startswith("Persuasion")
    assert data.load_corpus("kjv", "test")[0].startswith("Mark 1")


# ------------------------------------------------------------------------------------------ local corpora


def test_local_directory_and_single_file(tmp_path):
    (tmp_path / "train.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert data.load_corpus(str(tmp_path), "train") == ["alpha beta gamma " * 50]
    assert data.load_corpus(str(tmp_path), "test") == ["one doc", "two"]
    # A single file is the whole corpus for whichever split is asked.
    assert data.load_corpus(str(tmp_path / "test.jsonl"), "validation") == ["one doc", "two"]


def test_corpus_errors_are_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_corpus(str(tmp_path / "missing.txt"))
    assert "does not exist" in one_line(err)
    with pytest.raises(DataError) as err:
        data.load_corpus(str(tmp_path), "test")
    assert "no file for split" in one_line(err)
    with pytest.raises(DataError) as err:
        data.load_corpus("bundled", "dev")
    assert "unknown split" in one_line(err)
    (tmp_path / "test.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        data.load_corpus(str(tmp_path), "test")
    assert "'text'" in one_line(err)
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError) as err:
        data.load_corpus(str(tmp_path), "test")
    assert "empty" in one_line(err)


# ------------------------------------------------------------------------------------------ packing


def test_pack_blocks_inserts_eos_and_drops_tail():
    blocks = data.pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    overlapping = data.pack_blocks([[1, 2, 3, 4, 5, 6]], eos_id=0, block_size=4, stride=2)
    assert overlapping.tolist() == [[1, 2, 3, 4], [3, 4, 5, 6]]
    assert data.pack_blocks([[1]], 0, 4).shape == (0, 4)


def test_token_blocks_tile_the_split_without_overlap(tiny_tokenizer, tmp_path):
    blocks = data.token_blocks(tiny_tokenizer, "test", 64, "kjv", cache_dir=tmp_path)
    assert blocks.dtype == torch.long and blocks.shape[1] == 64
    ids = tiny_tokenizer(data.load_corpus("kjv", "test")[0], add_special_tokens=False)["input_ids"]
    assert blocks.shape[0] == len(ids) // 64
    assert blocks.flatten().tolist() == ids[: blocks.numel()]


def test_no_test_block_in_train(tiny_tokenizer, tmp_path):
    test = data.token_blocks(tiny_tokenizer, "test", 32, "kjv", cache_dir=tmp_path)
    train = data.token_blocks(tiny_tokenizer, "train", 32, "kjv", cache_dir=tmp_path)
    train_rows = {tuple(r) for r in train.tolist()}
    assert not any(tuple(r) in train_rows for r in test.tolist())


def test_cache_hit_returns_identical_tensor(tiny_tokenizer, tmp_path, monkeypatch):
    first = data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss: the corpus was read again")

    monkeypatch.setattr(data, "load_corpus", boom)
    again = data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", cache_dir=tmp_path)
    assert torch.equal(first, again)
    assert torch.equal(data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", max_blocks=3,
                                         cache_dir=tmp_path), first[:3])


def test_cache_key_separates_block_size_and_tokenizer(tiny_tokenizer, tmp_path):
    data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", cache_dir=tmp_path)
    data.token_blocks(tiny_tokenizer, "validation", 40, "kjv", cache_dir=tmp_path)
    data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", stride=24, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["Ruth"])
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tiny_tokenizer)


def test_corrupt_cache_entry_is_rebuilt(tiny_tokenizer, tmp_path):
    first = data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"garbage")
    assert torch.equal(data.token_blocks(tiny_tokenizer, "validation", 48, "kjv", cache_dir=tmp_path), first)


def test_block_errors_are_one_line(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError) as err:
        data.token_blocks(tiny_tokenizer, "test", 512, "kjv", max_context=256, cache_dir=tmp_path)
    assert "exceeds the model's context" in one_line(err)
    with pytest.raises(DataError) as err:
        data.token_blocks(tiny_tokenizer, "test", 1, "kjv", cache_dir=tmp_path)
    assert "too small" in one_line(err)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError) as err:
        data.token_blocks(tiny_tokenizer, "test", 256, str(tmp_path / "short.txt"), cache_dir=tmp_path)
    assert "fewer than one block" in one_line(err)


# ------------------------------------------------------------------------------------------ calibration


def test_calibration_blocks_deterministic_nested_subset(tiny_tokenizer, tmp_path):
    train = data.token_blocks(tiny_tokenizer, "train", 64, "kjv", cache_dir=tmp_path)
    a = data.calibration_blocks(tiny_tokenizer, 16, 64, seed=3, data="kjv", cache_dir=tmp_path)
    b = data.calibration_blocks(tiny_tokenizer, 16, 64, seed=3, data="kjv", cache_dir=tmp_path)
    c = data.calibration_blocks(tiny_tokenizer, 16, 64, seed=4, data="kjv", cache_dir=tmp_path)
    big = data.calibration_blocks(tiny_tokenizer, 40, 64, seed=3, data="kjv", cache_dir=tmp_path)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(big[:16], a)
    rows = {tuple(r) for r in train.tolist()}
    assert all(tuple(r) in rows for r in a.tolist()) and len({tuple(r) for r in a.tolist()}) == 16
    with pytest.raises(DataError) as err:
        data.calibration_blocks(tiny_tokenizer, train.shape[0] + 1, 64, data="kjv", cache_dir=tmp_path)
    assert "calibration blocks" in one_line(err)


@pytest.mark.slow
def test_smollm2_bundled_block_counts(smollm2_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    counts = [data.token_blocks(tok, s, 256, cache_dir=tmp_path).shape[0] for s in data.SPLITS]
    assert counts == [2808, 383, 411]  # as documented in PROVENANCE.md


# ------------------------------------------------------------------------------ bootstrap resampling


def test_chapters_split_before_headings():
    text = "TITLE\n\nby Someone\n\nCHAPTER 1\n\nOne.\n\nMore one.\n\nChapter II\n\nTwo.\n\nCHAPTER 3.\n\nThree."
    assert data.chapters(text) == ["TITLE\n\nby Someone\n\nCHAPTER 1\n\nOne.\n\nMore one.", "Chapter II\n\nTwo.",
                                   "CHAPTER 3.\n\nThree."]  # front matter goes with the first chapter
    assert data.chapters("no headings here\n\nat all") == ["no headings here\n\nat all"]
    assert data.chapters("CHAPTER 1\n\nonly one") == ["CHAPTER 1\n\nonly one"]
    assert [len(data.chapters(d)) for d in data.load_corpus("bundled", "train")] == [50, 61, 48, 55]


def test_bootstrap_units_draw_with_replacement():
    docs = [f"CHAPTER {i}\n\ntext {i}" if i else "x" for i in range(5)] + ["A\n\nCHAPTER 1\n\na\n\nCHAPTER 2\n\nb"]
    units = [u for d in docs for u in data.chapters(d)]
    draw = data.bootstrap_units(docs, seed=3)
    assert len(draw) == len(units) == 7 and set(draw) <= set(units)
    assert len(set(draw)) < len(draw)  # with replacement: at seed 3 some unit is drawn twice
    assert draw == data.bootstrap_units(docs, seed=3) and draw != data.bootstrap_units(docs, seed=4)
    assert len(data.bootstrap_units(docs, seed=3, unit="documents")) == 6
    with pytest.raises(DataError, match="bootstrap unit"):
        data.bootstrap_units(docs, 0, unit="pages")


def test_token_blocks_bootstrap(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    novel = "\n\n".join(f"CHAPTER {i}\n\n" + f"Words of chapter {i} go on. " * 12 for i in range(1, 9))
    (corpus / "train.jsonl").write_text(json.dumps({"text": novel}) + "\n")
    (corpus / "validation.jsonl").write_text(json.dumps({"text": novel[:2000]}) + "\n")
    cache = tmp_path / "cache"
    plain = data.token_blocks(tiny_tokenizer, "train", 32, str(corpus), cache_dir=cache)
    # Off is bit-identical to the call without the keys, and uses the same cache entry.
    assert torch.equal(plain, data.token_blocks(tiny_tokenizer, "train", 32, str(corpus), cache_dir=cache,
                                                bootstrap_seed=None))
    assert len(list(cache.glob("*.safetensors"))) == 1
    boot = data.token_blocks(tiny_tokenizer, "train", 32, str(corpus), cache_dir=cache, bootstrap_seed=1)
    assert len(list(cache.glob("*.safetensors"))) == 2  # its own cache entry
    assert not torch.equal(boot[:5], plain[:5]) and abs(boot.shape[0] - plain.shape[0]) <= 0.5 * plain.shape[0]
    assert torch.equal(boot, data.token_blocks(tiny_tokenizer, "train", 32, str(corpus), cache_dir=cache,
                                               bootstrap_seed=1, use_cache=False))  # deterministic, cache or not
    with pytest.raises(DataError, match="train split only"):
        data.token_blocks(tiny_tokenizer, "validation", 32, str(corpus), cache_dir=cache, bootstrap_seed=1)
