"""Rebuild the bundled corpora from the public-domain sources (see PROVENANCE.md).

    python ppn_bayes/data/make_bundle.py ../shared/corpora

Writes ``<corpus>/<split>.jsonl.gz`` beside this file: one JSON object per document (``text``,
``title``, ``source``).  Deterministic: the gzip header carries no timestamp or file name, so a
rebuild is byte-identical and the block cache keyed by file hashes stays valid.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Austen: the six novels in the order they appear in austen.txt.gz; each starts at a line that is
# exactly its title.  Split by novel so that test text is never seen in training.
AUSTEN = [
    ("Sense and Sensibility", "train"),
    ("Pride and Prejudice", "train"),
    ("Mansfield Park", "train"),
    ("Emma", "train"),
    ("Northanger Abbey", "validation"),
    ("Persuasion", "test"),
]
AUSTEN_SOURCE = "Debian r-cran-janeaustenr (text public domain)"

# KJV: a small second domain, split by book.
KJV = [("Genesis", "train"), ("Exodus", "train"), ("Ruth", "validation"), ("Mark", "test")]
KJV_SOURCE = "Debian bible-kjv-text (public domain)"


def reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines into one line per paragraph; paragraphs separated by a blank line.

    The sources wrap at ~72-80 columns.  A language model never saw those line breaks inside
    sentences, so keeping them would measure the wrapping rather than the model.
    """
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"[ \t]+", " ", " ".join(current)))
            current = []
    return "\n\n".join(paragraphs)


def split_austen(text: str) -> list[dict]:
    lines = text.splitlines()
    starts = []
    for title, _ in AUSTEN:
        pos = next((i for i, ln in enumerate(lines) if ln.strip().lower() == title.lower()
                    and (not starts or i > starts[-1])), None)
        if pos is None:
            raise SystemExit(f"title {title!r} not found in austen.txt.gz")
        starts.append(pos)
    docs = []
    for k, (title, split) in enumerate(AUSTEN):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        docs.append({"text": reflow(lines[starts[k]:end]), "title": title, "source": AUSTEN_SOURCE,
                     "split": split})
    return docs


def split_kjv(text: str) -> list[dict]:
    """KJV books: chapter headings kept, verse numbers dropped, one verse per line."""
    books: dict[str, list[str]] = {}
    book = None
    for line in text.splitlines():
        m = re.fullmatch(r"((?:[123] )?[A-Z][A-Za-z ]*?) (\d+)", line.strip())
        if m and not line.startswith(" "):
            book = m.group(1)
            books.setdefault(book, []).append(f"\n{line.strip()}\n")
            continue
        if book is None or not line.strip():
            continue
        v = re.match(r"\s+\d+ (.*)", line)
        if v:
            books[book].append(v.group(1).strip())
        else:
            books[book][-1] += " " + line.strip()
    docs = []
    for title, split in KJV:
        body = "\n".join(books[title]).strip()
        docs.append({"text": re.sub(r"\n{3,}", "\n\n", body), "title": title, "source": KJV_SOURCE,
                     "split": split})
    return docs


def write(corpus: str, docs: list[dict], root: Path = HERE) -> None:
    out = root / corpus
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = [{k: d[k] for k in ("text", "title", "source")} for d in docs if d["split"] == split]
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            for row in rows:
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        (out / f"{split}.jsonl.gz").write_bytes(buf.getvalue())
        print(f"{corpus}/{split}: {len(rows)} documents, {len(buf.getvalue()) / 1e6:.2f} MB")


def main(src: str, root: Path = HERE) -> None:
    src_dir = Path(src)
    with gzip.open(src_dir / "austen.txt.gz", "rt", encoding="utf-8") as fh:
        write("austen", split_austen(fh.read()), root)
    with gzip.open(src_dir / "kjv.txt.gz", "rt", encoding="utf-8") as fh:
        write("kjv", split_kjv(fh.read()), root)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora")
