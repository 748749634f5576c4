"""Dataset loader that ``persuasion_cloze.yaml`` names with ``custom_dataset: !function loader.load``.

Why not ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``: lm-eval hands
``data_files`` to ``datasets.load_dataset`` unchanged, so a relative path is resolved against the
*current directory* and the task would only work when run from this folder. Resolving the file next
to this module works from anywhere, needs no network and writes no ``datasets`` cache.

Self-contained on purpose (lm-eval imports this file by path): standard library and ``datasets`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).resolve().parent / "persuasion_cloze.jsonl"


def read_items(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    """The task's items: ``{"id", "context", "choices", "label", "chapter"}`` dicts, in file order."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load(**_: Any):
    """A ``DatasetDict`` with one ``test`` split (lm-eval passes task metadata as keywords; ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items())})
