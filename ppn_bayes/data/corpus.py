"""Corpora -> documents -> fixed-length token blocks, split by document, cached on disk.

Every number ppn-bayes reports (perplexity, the likelihood in training, calibration for baselines)
is computed on blocks from here, so the rules live in one place:

* **Splits are by document** (a whole novel or book), never by shuffling lines, so test text is
  truly unseen.  The bundled ``austen`` corpus trains on *Sense and Sensibility*, *Pride and
  Prejudice*, *Mansfield Park* and *Emma*, validates on *Northanger Abbey* and tests on
  *Persuasion*; ``kjv`` (a second domain) trains on Genesis + Exodus, validates on Ruth, tests on Mark.
* **Packing**: a split's documents are tokenized without special tokens, joined with the EOS token
  between them, and cut into non-overlapping blocks of ``block_size`` tokens (the tail that does not
  fill a block is dropped).  A block never spans two splits because each split is packed alone.
* **Bootstrap** (``data.bootstrap_seed``, for the refit check of issue 12): the train split's
  documents are cut into *units* (``data.bootstrap_unit``: chapters, split before every chapter
  heading paragraph such as ``CHAPTER 1``, ``Chapter I``, front matter going with the first chapter,
  a document without headings being one unit; or whole documents) and as many units as there are
  are drawn with replacement (``torch.randint`` from the seed) and packed in the drawn order, EOS
  between units. Chapters, not tokens or blocks, are resampled because they are the independent
  units of a novel: neighbouring blocks of one chapter share its characters and scene. Off (``None``,
  the default), nothing changes: the same blocks, bit for bit, and the same cache entry.
* **Caching**: packed blocks are stored under ``$PPN_HOME/cache/blocks/`` keyed by the tokenizer's
  identity, the corpus files' hashes, the split, the block size and the stride, so a hit can never
  return blocks of another tokenizer or an edited corpus.

A corpus (``data``) is ``"bundled"`` (= ``austen``), ``"kjv"``, a local directory holding
``train``/``validation``/``test`` files (``.jsonl[.gz]`` with a ``text`` field, or ``.txt[.gz]``, one
document per file), a single local file (then it is the whole corpus, whatever split is asked), or a
Hugging Face dataset name ``org/name[:config]`` for users with a network.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.errors import DataError
from ppn_bayes.files import atomic_write_with, sha256_file
from ppn_bayes.hub.zoo import ppn_home
from ppn_bayes.schema import short

BUNDLED_DIR = Path(__file__).resolve().parent
BUNDLED = {"bundled": "austen", "austen": "austen", "kjv": "kjv"}
SPLITS = ("train", "validation", "test")
_EXTS = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".txt.gz", ".txt")
#: The independent units of text a corpus is cut into (bootstrap resampling, ``ppn calibrate``).
UNITS = ("chapters", "documents")
#: A chapter heading on a line (or paragraph) of its own: ``CHAPTER 1``, ``Chapter XII``, ``CHAPTER IV.``
#: (the bundled Austen novels use all three). Text before a document's first heading joins its first
#: chapter; a document without headings is one chapter.
CHAPTER_HEADING = re.compile(r"^[ \t]*chapter[ \t]+(?:[0-9]+|[ivxlcdm]+)\.?[ \t]*$", re.IGNORECASE | re.MULTILINE)
_FORMAT = 1  # bump when the packing rule changes, to invalidate old cache entries


# --------------------------------------------------------------------------------------------- corpora


def _split_files(data: str, split: str) -> list[Path] | None:
    """Local files holding ``split`` of corpus ``data``; None when ``data`` is not local. The split
    name is checked first, whatever the corpus (a single file serves every split, but not a typo)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {short(split)}; choose one of {', '.join(SPLITS)}")
    if data in BUNDLED:
        root = BUNDLED_DIR / BUNDLED[data]
    else:
        root = Path(data).expanduser()
        if not root.exists():
            if data.startswith((".", "/", "~")) or data.endswith(_EXTS):
                raise DataError(f"corpus path {data} does not exist; pass an existing file or directory, "
                                "'bundled', or a Hugging Face dataset name")
            return None
        if root.is_file():
            return [root]
    files = [root / f"{split}{ext}" for ext in _EXTS if (root / f"{split}{ext}").is_file()]
    if not files:
        raise DataError(f"corpus directory {root} has no file for split {split!r}; expected one of "
                        f"{', '.join(split + e for e in _EXTS)}")
    return files


def _load_local(files: list[Path]) -> list[str]:
    import datasets

    quiet_before = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # small local files: a bar per load is noise on stderr
    is_text = files[0].name.endswith((".txt", ".txt.gz"))
    kind = "text" if is_text else "json"
    kwargs: dict[str, Any] = {"sample_by": "document"} if is_text else {}
    try:
        ds = datasets.load_dataset(kind, data_files={"x": [str(f) for f in files]}, split="x",
                                   cache_dir=str(ppn_home() / "cache" / "datasets"), **kwargs)
    except Exception as err:  # noqa: BLE001 - parser errors are many; the user needs one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read corpus file(s) {', '.join(map(str, files))} ({reason[:160]}); "
                        "use JSONL with a 'text' field per document, or plain text") from None
    finally:
        if not quiet_before:
            datasets.enable_progress_bars()
    return _texts(ds, ", ".join(map(str, files)))


def _load_hub(data: str, split: str) -> list[str]:
    import datasets

    name, _, config = data.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # noqa: BLE001
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load corpus {data!r} split {split!r} ({type(err).__name__}: {reason[:160]}); "
                        "use 'bundled', a local file or directory, or check the dataset name and network") from None
    return _texts(ds, f"{data}:{split}")


def _texts(ds: Any, where: str) -> list[str]:
    if "text" not in ds.column_names:
        raise DataError(f"corpus {where} has no 'text' field (fields: {', '.join(ds.column_names)}); "
                        "each document needs its text under 'text'")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def check_corpus(name_or_path: str = "bundled", split: str = "test") -> None:
    """Fail fast (before a model is loaded) on a missing local corpus or an unknown split."""
    _split_files(str(name_or_path), split)


def load_corpus(name_or_path: str = "bundled", split: str = "test") -> list[str]:
    """The documents (non-empty strings) of one split of a corpus.

    ``datasets`` leaves a ``*.lock`` file per dataset it tried to build in its cache (and the
    directories holding them); for a corpus that is rejected (unreadable, no ``text`` field, empty)
    they would pile up, one set per attempt, so the ones this call created are removed again.
    """
    data = str(name_or_path)
    files = _split_files(data, split)
    cache = ppn_home() / "cache" / "datasets"
    before = _tree(cache) if files is not None else set()
    try:
        docs = _load_local(files) if files is not None else _load_hub(data, split)
        if not docs:
            raise DataError(f"split {split!r} of corpus {data!r} is empty; give it at least one non-empty document")
    except DataError:
        if files is not None:
            _remove_new_locks(cache, before)
        raise
    return docs


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def _remove_new_locks(root: Path, before: set[Path]) -> None:
    """Remove the empty lock files (and then empty directories) that appeared under ``root`` since
    ``before``, skipping any lock another process holds now."""
    import contextlib
    import fcntl

    new = _tree(root) - before
    for path in sorted(p for p in new if p.name.endswith(".lock") and p.is_file()):
        with contextlib.suppress(OSError):
            if path.stat().st_size:
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError) if held
                path.unlink()
            finally:
                os.close(fd)
    for path in sorted((p for p in new if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty


def chapters(text: str) -> list[str]:
    """The chapters of one document: it is split before every :data:`CHAPTER_HEADING` paragraph
    (paragraphs are separated by a blank line); text before the first heading (title, front matter)
    goes with the first chapter, and a document without headings is one chapter."""
    paras = text.split("\n\n")
    starts = [i for i, para in enumerate(paras) if CHAPTER_HEADING.match(" ".join(para.split()))]
    if len(starts) < 2:
        return [text]
    cuts = [0, *starts[1:], len(paras)]
    return ["\n\n".join(paras[a:b]) for a, b in itertools.pairwise(cuts)]


def bootstrap_units(docs: list[str], seed: int, unit: str = "chapters") -> list[str]:
    """A bootstrap resample of ``docs``' units (chapters or documents): as many as there are, drawn
    with replacement from ``seed``, in the drawn order (module docstring)."""
    return [text for text, _ in bootstrap_draw(docs, seed, unit)]


def bootstrap_draw(docs: list[str], seed: int, unit: str = "chapters") -> list[tuple[str, tuple[int, int]]]:
    """:func:`bootstrap_units` with where each drawn unit came from: ``(text, (document, chapter))``
    (chapter 0 when the unit is a whole document), so a unit drawn twice is known to be one unit."""
    if unit not in UNITS:
        raise DataError(f"unknown bootstrap unit {short(unit)}; choose one of {', '.join(UNITS)}")
    units = [(c, (d, k)) for d, doc in enumerate(docs)
             for k, c in enumerate(chapters(doc) if unit == "chapters" else [doc])]
    idx = torch.randint(len(units), (len(units),), generator=torch.Generator().manual_seed(int(seed)))
    return [units[i] for i in idx.tolist()]


# --------------------------------------------------------------------------------------------- identity


def train_bpe_tokenizer(text: str, vocab_size: int = 320, eos_token: str = "<eos>") -> Any:
    """A byte-level BPE trained on ``text``, as a ``transformers`` fast tokenizer with an EOS token.

    For tiny from-scratch models (tests, benchmarks that pretrain a small base): fast, offline and
    deterministic, where a pretrained tokenizer would need the Hub. Uses ``tokenizers``' own trainer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how text becomes ids (vocab, merges, normalizer, EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, str(tokenizer.eos_token_id), payload):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _corpus_fingerprint(data: str, split: str) -> str:
    """Local corpora are keyed by their files' contents; a hub dataset by its name and split."""
    files = _split_files(data, split)
    if files is None:
        return f"hub:{data}:{split}"
    return "files:" + ",".join(sha256_file(f) for f in files)


# --------------------------------------------------------------------------------------------- blocks


def pack_blocks(docs: list[list[int]], eos_id: int, block_size: int, stride: int | None = None) -> torch.Tensor:
    """Join token lists with ``eos_id`` between them and cut ``[N, block_size]`` blocks.

    With ``stride == block_size`` (the default) blocks do not overlap; a smaller stride gives
    overlapping windows (useful for calibration, not for perplexity, where tokens would count twice).
    """
    stride = block_size if stride is None else stride
    flat: list[int] = []
    for k, ids in enumerate(docs):
        if k:
            flat.append(eos_id)
        flat.extend(ids)
    ids_t = torch.tensor(flat, dtype=torch.long)
    if ids_t.numel() < block_size:
        return torch.empty(0, block_size, dtype=torch.long)
    return ids_t.unfold(0, block_size, stride).contiguous()


def _validate(block_size: int, stride: int | None, max_blocks: int | None, max_context: int | None) -> None:
    if block_size < 2:
        raise DataError(f"block size {block_size} is too small; use at least 2 tokens (one to predict)")
    if max_context is not None and block_size > max_context:
        raise DataError(f"block size {block_size} exceeds the model's context of {max_context} tokens; "
                        f"use --block-size {max_context} or less")
    if stride is not None and stride < 1:
        raise DataError(f"stride {stride} must be a positive number of tokens")
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"max_blocks {max_blocks} must be at least 1")


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / f"{name}.safetensors"


def _read_cache(path: Path, block_size: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    try:
        blocks = load_file(str(path))["blocks"]
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
        return None
    return blocks if blocks.ndim == 2 and blocks.shape[1] == block_size else None


def _write_cache(path: Path, blocks: torch.Tensor, key: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # shared like the model cache: atomic_write_with gives it the umask's mode, not mkstemp's 0600
    atomic_write_with(path, lambda tmp: save_file({"blocks": blocks}, tmp,
                                                  metadata={"key": json.dumps(key, sort_keys=True)}), suffix=".tmp")


def token_blocks(
    tokenizer: Any,
    split: str = "test",
    block_size: int = 256,
    data: str = "bundled",
    max_blocks: int | None = None,
    stride: int | None = None,
    *,
    max_context: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    bootstrap_seed: int | None = None,
    bootstrap_unit: str = "chapters",
) -> torch.Tensor:
    """A ``LongTensor [N, block_size]`` of one split, packed as described in the module docstring.

    ``bootstrap_seed`` (train split only): pack a bootstrap resample of the split's units
    (``bootstrap_unit``: chapters or documents) instead of the split itself; ``None`` (the default)
    leaves everything as it was.

    ``max_blocks`` keeps the first N blocks (the cache always holds the full split, so asking for
    more later costs nothing).  ``max_context`` is the model's ``max_position_embeddings``; a block
    longer than that is an error rather than a silently wrong evaluation.
    """
    _validate(block_size, stride, max_blocks, max_context)
    data = str(data)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    if bootstrap_seed is not None:
        if split != "train":
            raise DataError(f"a bootstrap resample is drawn of the train split only, not {split!r}; "
                            "held-out splits stay as they are")
        if bootstrap_unit not in UNITS:
            raise DataError(f"unknown bootstrap unit {short(bootstrap_unit)}; choose one of {', '.join(UNITS)}")
    corpus_id = _corpus_fingerprint(data, split)
    key = {"format": _FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "corpus": corpus_id,
           "split": split, "block_size": block_size, "stride": stride or block_size}
    if bootstrap_seed is not None:  # only then: the default key (and cache entry) is today's
        key["bootstrap"] = [int(bootstrap_seed), bootstrap_unit]
    path = _cache_path(Path(cache_dir) if cache_dir else ppn_home() / "cache" / "blocks", key)
    blocks = _read_cache(path, block_size) if use_cache and path.is_file() else None
    if blocks is None:
        docs = load_corpus(data, split)
        if bootstrap_seed is not None:
            docs = bootstrap_units(docs, bootstrap_seed, bootstrap_unit)
        ids = [tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"] for d in docs]
        blocks = pack_blocks(ids, eos, block_size, stride)
        if blocks.shape[0] == 0:
            total = sum(map(len, ids)) + len(ids) - 1
            raise DataError(f"split {split!r} of corpus {data!r} has {total} tokens, fewer than one block of "
                            f"{block_size}; use a smaller block size or a larger corpus")
        if use_cache:
            _write_cache(path, blocks, key)
    return blocks[:max_blocks] if max_blocks is not None else blocks


def calibration_blocks(
    tokenizer: Any,
    n: int,
    block_size: int = 256,
    seed: int = 0,
    data: str = "bundled",
    *,
    max_context: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """``n`` blocks drawn without replacement from the *train* split, deterministically from ``seed``.

    The draw is a prefix of one seeded permutation, so the calibration set for ``n`` is contained in
    the one for any larger ``n`` with the same seed: results stay comparable across sample sizes.
    """
    blocks = token_blocks(tokenizer, "train", block_size, data, max_context=max_context, cache_dir=cache_dir)
    if not 1 <= n <= blocks.shape[0]:
        raise DataError(f"asked for {n} calibration blocks but the train split of {data!r} has "
                        f"{blocks.shape[0]} blocks of {block_size}; use between 1 and {blocks.shape[0]}")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order[:n]]


# ------------------------------------------------------------------------------------ independent units



def block_units(tokenizer: Any, split: str = "train", block_size: int = 256, data: str = "bundled",
                unit: str = "chapters", max_blocks: int | None = None, *, max_context: int | None = None,
                cache_dir: str | os.PathLike[str] | None = None, bootstrap_seed: int | None = None,
                bootstrap_unit: str = "chapters") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The blocks of :func:`token_blocks` and, for each, the independent unit of text it belongs to.

    Returns ``(blocks [N, block_size], unit_of_block [N], unit_names)``. Units are ``documents`` or
    ``chapters`` (:data:`CHAPTER_HEADING`; a document without headings is one chapter). A block that
    straddles a boundary belongs to the unit of its middle token. The tokens are those of
    :func:`token_blocks` exactly (the same packing of the same ids; checked), so a unit id indexes the
    training blocks a run saw. Needs a fast tokenizer (its offset mapping places the headings).

    ``bootstrap_seed``/``bootstrap_unit``: the blocks of a run trained on a bootstrap resample
    (:func:`token_blocks`' keys), each assigned to the unit of the *original* split it was copied from,
    so that a chapter drawn twice is one unit of data, not two.
    """
    if unit not in UNITS:
        raise DataError(f"unknown unit {short(unit)}; choose one of {', '.join(UNITS)}")
    blocks = token_blocks(tokenizer, split, block_size, data, max_blocks=max_blocks, max_context=max_context,
                          cache_dir=cache_dir, bootstrap_seed=bootstrap_seed, bootstrap_unit=bootstrap_unit)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("grouping blocks by chapter needs a fast tokenizer (offset mapping); "
                        "use the model's tokenizer.json, or unit: documents with a fast tokenizer")
    docs = load_corpus(data, split)
    # each packed text and the (document, first chapter) of the original split it is
    drawn = (bootstrap_draw(docs, bootstrap_seed, bootstrap_unit) if bootstrap_seed is not None
             else [(text, (d, 0)) for d, text in enumerate(docs)])
    starts: list[int] = []  # flat token position where each unit starts
    keys: list[tuple[int, int]] = []  # its unit in the original split: (document, chapter)
    flat_ids: list[int] = []
    for d, (text, (doc, first)) in enumerate(drawn):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if d:
            flat_ids.append(tokenizer.eos_token_id)
        base = len(flat_ids)
        flat_ids.extend(enc["input_ids"])
        heads = [m.start() for m in CHAPTER_HEADING.finditer(text)] if unit == "chapters" else []
        char_starts = torch.tensor([s for s, _ in enc["offset_mapping"]] or [0])
        cuts = [0] + [int(torch.searchsorted(char_starts, c)) for c in heads[1:]]
        for k, cut in enumerate(cuts):
            starts.append(base + cut)
            keys.append((doc, first + k) if unit == "chapters" else (doc, 0))
    packed = pack_blocks([flat_ids], tokenizer.eos_token_id, block_size)[: blocks.shape[0]]
    if packed.shape != blocks.shape or not torch.equal(packed, blocks):
        raise DataError(f"the blocks of corpus {data!r} changed between packing and grouping them by {unit}; "
                        "clear the block cache ($PPN_HOME/cache/blocks) and retry")
    middle = torch.arange(blocks.shape[0]) * block_size + block_size // 2
    segment = (torch.searchsorted(torch.tensor(starts), middle, right=True) - 1).clamp_min(0)
    distinct = sorted(set(keys))
    index = {k: i for i, k in enumerate(distinct)}
    ids = torch.tensor([index[k] for k in keys])
    names = [f"doc {d}" + (f" chapter {k + 1}" if unit == "chapters" else "") for d, k in distinct]
    return blocks, ids[segment], names
