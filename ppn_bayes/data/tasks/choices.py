"""Choice examples for objectives that need them (GISP's margin loss in ``ppn compare``).

**Calibration never touches what is evaluated.** The shipped task ``ppn_persuasion_cloze`` has one
split, ``test``, and ``ppn eval --tasks`` scores all 100 of its items; any subset of that file would
be scored too. So calibration items are *not* taken from ``persuasion_cloze.jsonl``: they are cut
from the bundled corpus's *train* novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park,
Emma) by the very rules that built the shipped task (:func:`ppn_bayes.data.tasks.build.build_items`: a
passage of two or three sentences, the true next sentence and three length- and dialogue-matched
distractors from other chapters of the same novel), under their own seed
(:data:`CALIBRATION_SEED`). Same task, same format, a different book from the evaluation's
(Persuasion, the test novel), so disjoint by construction; the train split is also where every other
peer's calibration blocks come from. Deterministic: ``n`` items are spread evenly over the four
novels (the first ``n % 4`` novels get one more), each novel's items evenly over its chapters.

The train novels spell chapter headings several ways (``CHAPTER 1``, ``CHAPTER I``, ``Chapter 1``);
:func:`numbered_chapters` rewrites them to the ``Chapter N`` form the builder expects (a running
count, so Emma's per-volume numbering does not repeat).

A user's own examples come from a JSONL file (:func:`read_choices_file`), one object per line with
``context`` (text), ``choices`` (two or more texts) and ``label`` (index of the correct one), the
shipped task's format; every problem is a one-line :class:`~ppn_bayes.errors.DataError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppn_bayes.data.corpus import CHAPTER_HEADING, load_corpus
from ppn_bayes.data.tasks.build import build_items
from ppn_bayes.data.tasks.loader import DATA_FILE, read_items
from ppn_bayes.errors import ConfigError, DataError


@dataclass
class ChoiceExample:
    """One multiple-choice example in token ids: ``context``, candidate ``choices``, correct ``label``."""

    context: list[int]
    choices: list[list[int]]
    label: int

CALIBRATION_SEED = "ppn-gisp-calibration-v1"
CALIBRATION_DATA = "bundled"
CALIBRATION_SPLIT = "train"  # never the test split, which the shipped task is cut from
DEFAULT_CHOICES = 16  # ~5.6k tokens with SmolLM2's tokenizer, near the default 16x256 calibration blocks


def numbered_chapters(text: str) -> str:
    """``text`` with every chapter heading paragraph rewritten to ``Chapter N`` (N counts from 1)."""
    out, n = [], 0
    for para in text.split("\n\n"):
        if CHAPTER_HEADING.match(" ".join(para.split())):
            n += 1
            para = f"Chapter {n}"
        out.append(para)
    return "\n\n".join(out)


def calibration_items(n: int = DEFAULT_CHOICES, seed: str = CALIBRATION_SEED) -> list[dict[str, Any]]:
    """``n`` cloze items (the shipped task's format) from the bundled *train* novels; see the module docstring."""

    if n < 1:
        raise ConfigError(f"--gisp-choices {n} must be at least 1")
    novels = load_corpus(CALIBRATION_DATA, CALIBRATION_SPLIT)
    items: list[dict[str, Any]] = []
    for k, text in enumerate(novels):
        count = n // len(novels) + (k < n % len(novels))
        if count == 0:
            continue
        try:
            built = build_items(numbered_chapters(text), num_items=count, seed=f"{seed}-{k}")
        except ValueError as err:
            raise ConfigError(f"--gisp-choices {n} is more than the train novels give ({err}); ask for fewer") from None
        items += [{**item, "novel": k} for item in built]
    for i, item in enumerate(items):
        item["id"] = i
    return items


def check_item(item: Any, where: str) -> dict[str, Any]:
    """``item`` if it is a valid choice example, else a one-line DataError naming ``where`` and the fix."""
    fix = 'each line must be {"context": "...", "choices": ["...", "...", ...], "label": INDEX}'
    if not isinstance(item, dict):
        raise DataError(f"{where} is not a JSON object; {fix}")
    missing = [k for k in ("context", "choices", "label") if k not in item]
    if missing:
        raise DataError(f"{where} lacks {', '.join(repr(k) for k in missing)}; {fix}")
    ctx, choices, label = item["context"], item["choices"], item["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise DataError(f"{where}: 'context' must be non-empty text; {fix}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty texts; {fix}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: 'label' {label!r} must be an integer index into 'choices' "
                        f"(0 to {len(choices) - 1}); {fix}")
    return item


def read_choices_file(path: str | Path) -> list[dict[str, Any]]:
    """Choice examples from a JSONL file (one object per line; blank lines skipped), validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--gisp-choices-file {path}: no such file; pass a JSONL file of choice examples "
                        '(one {"context", "choices", "label"} object per line)')
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--gisp-choices-file {path} cannot be read as UTF-8 text ({type(err).__name__}); "
                        "pass a UTF-8 JSONL file") from None
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--gisp-choices-file {path} line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                            "write one JSON object per line") from None
        items.append(check_item(obj, where))
    if not items:
        raise DataError(f"--gisp-choices-file {path} holds no examples; add one JSON object per line")
    return items


def overlap_with_task(items: Sequence[dict[str, Any]], task_file: str | Path | None = None) -> int:
    """How many ``items`` have a context that is also one of the shipped evaluation task's."""

    contexts = {" ".join(it["context"].split()) for it in read_items(Path(task_file or DATA_FILE))}
    return sum(" ".join(it["context"].split()) in contexts for it in items)


def to_examples(items: Sequence[dict[str, Any]], tokenizer: Any, max_length: int | None = None) -> list:
    """Token-id :class:`ChoiceExample` s, tokenized as lm-eval scores them.

    As lm-eval's ``multiple_choice`` with ``target_delimiter: " "``: a candidate's tokens are those
    of ``context + " " + choice`` after the context's own tokens, no special tokens. ``max_length``
    (the model's context): contexts are cut from the left so that the longest candidate fits.
    """
    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for it in items:
        ctx = enc(it["context"])
        conts = []
        for c in it["choices"]:
            whole = enc(f"{it['context']} {c}")
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else enc(f" {c}")
            conts.append(cont or enc(c))
        if max_length is not None:
            keep = max_length - max(map(len, conts))
            if keep < 1:
                raise DataError(f"a choice of {it['context'][:40]!r}... is longer than the model's context "
                                f"({max_length} tokens); shorten it")
            ctx = ctx[-keep:]
        out.append(ChoiceExample(context=ctx, choices=conts, label=int(it["label"])))
    return out
