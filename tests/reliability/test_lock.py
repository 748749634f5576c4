"""One writer per output (issue 14): ``ppn fit``, ``resize``, ``report`` (and ``compare``, ``demo``) hold
an advisory lock on what they write; a second writer gets one ``error:`` line naming the holder's PID
and command, at once, before any work, and changes nothing. The holder is always a real second
process (the lock is ``fcntl.flock``, which a process never conflicts with itself on).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppn_bayes.cli import main
from ppn_bayes.files import lock_holder, lock_path
from tests.reliability import test_bad_input as _bad
from tests.reliability import test_overlap as _overlap

# Helpers and fixtures of the bad-input and overlap tests, reused (found under their names here).
fails, snapshot, work, own_run = _bad.fails, _bad.snapshot, _bad.work, _overlap.own_run

HOLDER = """
import sys
from ppn_bayes.files import writer_lock
sys.argv = ["ppn", "fit", "--out", sys.argv[1]]  # what the lock records: the holder's command line
with writer_lock(sys.argv[3], "ppn fit"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def held(target: Path):
    """A real second process holding ``target``'s writer lock for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)


def test_second_writer_is_refused_naming_the_holder(own_run, work, capsys):
    export = work / "export"
    with held(own_run) as proc:
        assert lock_holder(own_run) == f"pid {proc.pid} (ppn fit --out {own_run})"
        needles = ("being written by", f"pid {proc.pid}", "ppn fit --out", "wait for it")
        fails(capsys, ["fit", "--resume", "--out", own_run, "--no-progress"], *needles, watch=[own_run])
        fails(capsys, ["report", own_run, "--draws", "8"], *needles, watch=[own_run])
    with held(export) as proc:
        fails(capsys, ["resize", own_run, "--size", "0.5", "--draws", "8", "--out", export], f"pid {proc.pid}",
              watch=[own_run])
    assert lock_holder(own_run) is None and not lock_path(own_run).exists()  # released and removed
    assert main(["report", str(own_run), "--draws", "8"]) == 0  # free again


def test_a_lock_left_by_a_killed_process_does_not_block(own_run, work, capsys):
    """kill -9 leaves the lock file behind; the kernel dropped the lock itself, so the next writer
    takes it (and removes the file when done)."""
    with held(own_run) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert lock_path(own_run).exists() and lock_holder(own_run) is None
    assert main(["report", str(own_run), "--draws", "8"]) == 0
    assert not lock_path(own_run).exists()


def test_a_symlink_to_a_locked_output_is_the_same_output(own_run, tmp_path, work, capsys):
    link = tmp_path / "alias"
    link.symlink_to(own_run, target_is_directory=True)
    with held(link) as proc:
        fails(capsys, ["report", own_run, "--draws", "8"], f"pid {proc.pid}", watch=[own_run])
    with held(own_run) as proc:
        fails(capsys, ["fit", "--resume", "--out", link, "--no-progress"], f"pid {proc.pid}", watch=[own_run])


def test_every_rank_learns_that_rank_0_was_refused(own_run, monkeypatch):
    """Under torchrun only rank 0 takes the lock; a refusal reaches every rank through one broadcast
    (instead of rank 0 raising while the others wait in the next collective)."""
    import torch.distributed as dist

    from ppn_bayes.errors import OutputError
    from ppn_bayes.training.loop import _run_lock

    sent: list = []

    def broadcast(box, src):  # rank 0 sends its box; the other ranks receive rank 0's
        assert src == 0
        if sent:
            box[0] = sent[-1]
        else:
            sent.append(box[0])

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    with held(own_run) as proc:
        with pytest.raises(OutputError, match=f"pid {proc.pid}"), _run_lock(own_run, rank=0, world=2):
            pass
        assert sent and f"pid {proc.pid}" in sent[0]
        # rank 1 never touches the lock file: it raises what rank 0 sent
        with pytest.raises(OutputError, match=f"pid {proc.pid}"), _run_lock(own_run, rank=1, world=2):
            pass
    sent[:] = [None]  # rank 0 got the lock: rank 1 goes on, without touching the lock file
    with _run_lock(own_run, rank=1, world=2):
        assert lock_holder(own_run) is None and not lock_path(own_run).exists()


def test_lock_for_an_output_in_missing_directories_leaves_nothing(tmp_path):
    """The lock file needs a parent; directories made for it are removed again on release."""
    from ppn_bayes.files import writer_lock

    target = tmp_path / "a" / "b" / "run"
    with writer_lock(target, "ppn fit"):
        assert lock_holder(target).startswith(f"pid {os.getpid()} (ppn fit, from ")  # a program, not the CLI
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- two real fits


@pytest.mark.slow
def test_two_fits_into_one_directory_do_not_interleave(tiny_llama_dir, tmp_path):
    """The issue's example: two ``ppn fit --out X`` at once. The second one stops at once (exit 2,
    one line naming the first one's PID) and the first one's run is exactly an ordinary run.

    The first fit is paused (SIGSTOP) once it holds the lock and resumed (SIGCONT) after the second
    one has been refused: "at once" is then true by construction, however slowly a loaded machine
    starts the second interpreter (a free-running first fit of 60 frozen steps could finish before
    it, which made the test flaky under load). A stopped process keeps its flock."""
    from ppn_bayes.data.corpus import load_corpus

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    steps = 60
    recipe.write_text(json.dumps({"name": "two", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
                                  "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
                                  "train": {"steps": steps, "batch_size": 2, "checkpoint_every": 20,
                                            "weights": "frozen", "eval_lambdas": [0.5], "device": "cpu"}}))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ppn_bayes.cli", "fit", str(recipe), "--out", str(out), "--no-progress"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 600  # a hang guard only: a loaded machine imports torch slowly
    while lock_holder(out) is None:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600, check=False)
        still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=900)
    assert first.returncode == 0, err1[-2000:]
    assert still_running, "the first fit ended while paused: it was not stopped"
    assert second.returncode == 2 and second.stdout == ""
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {first.pid}" in lines[0], second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps_done"] == steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, steps + 1))
    assert not lock_path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "tiny.txt"]
