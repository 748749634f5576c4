"""The notebooks run top to bottom (nbclient) on a tiny model, corpus and step count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NEEDED = ("fit", "load_run", "keepset", "resize", "load_resized", "perplexity", "token_blocks", "load_recipe",
          "PPNModel")


def test_the_notebooks_public_api_exists():
    """What the notebooks call is public API: a name missing here is an API regression, a failure."""
    import ppn_bayes as ppn

    missing = [name for name in NEEDED if not hasattr(ppn, name)]
    assert not missing, f"ppn.{', ppn.'.join(missing)} missing from the public API the notebooks use"


def _execute(name: str, tmp_path: Path, tiny_llama_dir, monkeypatch) -> list:
    """Run notebook ``name`` on the tiny setup (runs under ``tmp_path/runs``); its error outputs."""
    import nbformat
    from nbclient import NotebookClient

    from ppn_bayes.data.corpus import load_corpus

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    monkeypatch.setenv("PPN_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("PPN_NOTEBOOK_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("PPN_NOTEBOOK_CORPUS", str(corpus))
    monkeypatch.setenv("PPN_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
                   allow_errors=True).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_posterior_diagnostics.ipynb"])
def test_notebook_runs(name, tmp_path, tiny_llama_dir, monkeypatch):
    errors = _execute(name, tmp_path, tiny_llama_dir, monkeypatch)
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_posterior_diagnostics.ipynb"])
def test_notebook_reruns(name, tmp_path, tiny_llama_dir, monkeypatch):
    """Running a notebook again over its own earlier output (what a user does after a restart) works:
    its fits resume their finished runs instead of stopping on 'already holds a run'."""
    assert not _execute(name, tmp_path, tiny_llama_dir, monkeypatch)
    errors = _execute(name, tmp_path, tiny_llama_dir, monkeypatch)
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]
