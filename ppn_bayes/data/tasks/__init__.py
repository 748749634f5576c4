"""Local lm-eval tasks shipped with ppn-bayes, so zero-shot evaluation works offline.

``ppn_persuasion_cloze`` (``persuasion_cloze.yaml`` over ``persuasion_cloze.jsonl``): 100 four-way
next-sentence items cut from the bundled corpus's *test* novel (Persuasion), which no PPN run trains
on. :mod:`ppn_bayes.data.tasks.build` rebuilds the JSONL byte for byte; ``docs/evaluation.md`` says how.

Point lm-eval at this directory (``TASKS_DIR``) with ``TaskManager(include_path=...)`` or
``lm_eval --include_path``; the YAML loads its data through :mod:`ppn_bayes.data.tasks.loader`, which
resolves the JSONL next to itself, so the task works from any working directory.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASK = "ppn_persuasion_cloze"
DATA_FILE = TASKS_DIR / "persuasion_cloze.jsonl"
