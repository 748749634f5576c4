"""Build ``persuasion_cloze.jsonl``: a four-way next-sentence task from the bundled *test* novel.

    python -m ppn_bayes.data.tasks.build            # rewrites ppn_bayes/data/tasks/persuasion_cloze.jsonl
    python -m ppn_bayes.data.tasks.build --check    # exit 1 unless the shipped file is what this builds

Why this task: zero-shot evaluation must run offline and on text no PPN run trains on. The bundled
corpus's test split (Persuasion) is held out from every recipe, so a cloze task cut from it measures
what pruning did to the model's grasp of running narrative, not memorised training text.

Each item is a passage (two or three consecutive sentences of one paragraph) and four candidate
next sentences: the true one and three *distractors*, real sentences of the same novel taken from
other chapters, so style, vocabulary and names match. Surface cues are removed on purpose so that only
understanding of the passage helps: distractors are within 20 % of the true sentence's length (the
raw log-likelihood ``acc`` would otherwise prefer short answers) and match it in whether they hold
dialogue (a double quote). Chance is 25 %.

Deterministic: sentence splitting is a fixed regular expression, items are evenly spaced over the
novel, and each item's distractors and answer position come from ``random.Random`` seeded with a
string (SHA-512-derived, stable across Python versions and hash seeds).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ppn_bayes.data.corpus import load_corpus
from ppn_bayes.data.tasks import DATA_FILE
from ppn_bayes.files import atomic_write_bytes

NUM_ITEMS = 100
NUM_CHOICES = 4
SEED = "ppn-persuasion-cloze-v1"
TARGET_CHARS = (40, 220)  # true next sentences of a readable length
CONTEXT_CHARS = (80, 700)
LENGTH_TOLERANCE = 0.2

_SPLIT = re.compile(r"(?<=[.!?])([\"']?)\s+(?=[\"'A-Z])")
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Dr|St|Capt|Col|Esq)\.[\"']?$")
_CHAPTER = re.compile(r"^Chapter \d+$")


@dataclass(frozen=True)
class Sentence:
    text: str
    chapter: int
    paragraph: int
    index: int  # position within its paragraph


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph; a closing quote stays with its sentence, ``Mrs.`` does not end one."""
    pieces: list[str] = []
    parts = _SPLIT.split(paragraph)
    # re.split with one group alternates text and the captured closing quote
    for i in range(0, len(parts), 2):
        text = parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")
        if pieces and _ABBREV.search(pieces[-1]):
            pieces[-1] = f"{pieces[-1]} {text}"
        else:
            pieces.append(text)
    return [p.strip() for p in pieces if p.strip()]


def sentences(text: str) -> list[list[Sentence]]:
    """Paragraphs (as lists of sentences) of the chapters, front matter and headings dropped."""
    out: list[list[Sentence]] = []
    chapter = 0
    for raw in text.split("\n\n"):
        para = " ".join(raw.split())
        if _CHAPTER.match(para):
            chapter = int(para.split()[1])
            continue
        if chapter == 0 or not para:
            continue
        p = len(out)
        out.append([Sentence(s, chapter, p, j) for j, s in enumerate(split_sentences(para))])
    return out


def _within(n: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= n <= bounds[1]


def candidates(paragraphs: list[list[Sentence]]) -> list[tuple[list[Sentence], Sentence]]:
    """One (context, true next sentence) pair per usable paragraph: the first sentence with at least
    two before it whose lengths fit; the context is at most the three sentences before it."""
    out = []
    for para in paragraphs:
        for j in range(2, len(para)):
            context = para[max(0, j - 3):j]
            if _within(len(para[j].text), TARGET_CHARS) and _within(len(" ".join(s.text for s in context)),
                                                                     CONTEXT_CHARS):
                out.append((context, para[j]))
                break
    return out


def _dialogue(text: str) -> bool:
    return '"' in text


def distractors(target: Sentence, pool: list[Sentence], rng: random.Random, k: int) -> list[Sentence]:
    """``k`` sentences from other chapters, of similar length and the same dialogue-ness as ``target``."""
    n = len(target.text)
    fits = [s for s in pool if s.chapter != target.chapter and s.text != target.text
            and abs(len(s.text) - n) <= LENGTH_TOLERANCE * n and _dialogue(s.text) == _dialogue(target.text)]
    if len(fits) < k:
        raise ValueError(f"only {len(fits)} distractors fit {target.text[:40]!r}")
    return rng.sample(fits, k)


def build_items(text: str, num_items: int = NUM_ITEMS, num_choices: int = NUM_CHOICES, seed: str = SEED
                ) -> list[dict]:
    """The task's items from the novel's text (see the module docstring for every rule)."""
    paragraphs = sentences(text)
    cands = candidates(paragraphs)
    if len(cands) < num_items:
        raise ValueError(f"only {len(cands)} usable paragraphs for {num_items} items")
    picks = [cands[(i * len(cands)) // num_items] for i in range(num_items)]  # evenly over the novel
    pool = [s for para in paragraphs for s in para if _within(len(s.text), TARGET_CHARS)]
    items = []
    for i, (context, target) in enumerate(picks):
        rng = random.Random(f"{seed}-{i}")
        choices = [target] + distractors(target, pool, rng, num_choices - 1)
        rng.shuffle(choices)
        items.append({
            "id": i,
            "context": " ".join(s.text for s in context),
            "choices": [s.text for s in choices],
            "label": choices.index(target),
            "chapter": target.chapter,
        })
    return items


def render(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_FILE, help=f"output JSONL (default: {DATA_FILE})")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    (text,) = load_corpus("bundled", "test")
    data = render(build_items(text))
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from what build.py makes'}")
        return 0 if same else 1
    atomic_write_bytes(args.out, data)
    print(f"wrote {args.out} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
