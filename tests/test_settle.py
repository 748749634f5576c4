"""The settle phase (``train.settle_steps``, ppn_bayes/training/settle.py): the last joint steps of a
sandwich run train the sandwich sizes' exported keep-sets, the guide and the push frozen.

Checked: the settled keep-sets are the ones ``ppn keepset`` reads from the finished run; each pruned
pass of a settle step gets its keep-set's fixed masks (no random price); the guide and the push do
not move in the phase while the weights do (and without the phase the guide does move: the power
check of "frozen"); a resume inside the phase replays the uninterrupted run bit for bit; bad
settings fail in one line. Comparisons are bitwise (``torch.equal``), as for the other resume tests.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_distill import assert_resume_replays, tiny_recipe

from ppn_bayes.bayes.keepsets import keepsets
from ppn_bayes.errors import ConfigError
from ppn_bayes.run import fit

SETTLE = {"weights": "lora", "sandwich": True, "sandwich_min_size": 0.4, "sandwich_sizes": [0.7],
          "sandwich_random": 1, "distill_weight": 1.0, "steps": 4, "settle_steps": 2}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _snapshots(r, out):
    """Fit ``r`` into ``out``; the guide, push and adapter states before each step, and the session."""
    snaps: dict[int, dict] = {}
    seen = {}

    def grab(s, step):
        seen["s"] = s
        snaps[step] = {"guide": _state(s.guide), "push": _state(s.ppn.push),
                       "weights": [p.detach().clone() for p in s.groups.get("weights", [])]}

    run = fit(r, out=out, progress=False, callbacks=[grab])
    return run, snaps, seen["s"]


def test_settle_trains_the_exported_keepsets_with_guide_and_push_frozen(tiny_llama_dir, corpus, tmp_path):
    r = tiny_recipe(tiny_llama_dir, corpus, **SETTLE)
    run, snaps, s = _snapshots(r, tmp_path / "settle")
    records = run.train_metrics()
    assert [bool(x.get("settle")) for x in records] == [False, False, True, True]
    assert [len(x["prices"]) for x in records] == [4, 4, 3, 3]  # dense, 0.4, 0.7 (+ one random price before)
    lams = [lam for lam, _, _ in s.settle]
    assert records[2]["prices"] == records[3]["prices"] == [0.0, *lams]
    # the guide and the push are the same from the phase's first step on; the adapters went on training
    for part in ("guide", "push"):
        assert all(torch.equal(snaps[2][part][k], snaps[3][part][k]) for k in snaps[2][part]), part
    final_guide = load_file(str(run.path / "guide.safetensors"))
    assert final_guide.keys() and all(torch.equal(final_guide[k], snaps[2]["guide"][k].cpu()) for k in final_guide)
    assert snaps[2]["weights"] and any(not torch.equal(a, b) for a, b in zip(snaps[2]["weights"], snaps[3]["weights"]))
    # the settled keep-sets are what `ppn keepset` exports from the finished run (same solver settings)
    exported = keepsets(run.path, [0.4, 0.7])
    assert [res.keep for _, _, res in s.settle] == [e.keep for e in exported]
    assert [lam for lam, _, _ in s.settle] == pytest.approx([e.lam for e in exported], rel=1e-9)
    # the sizes differ, so the phase trained two distinct sub-networks
    assert s.settle[0][2].keep != s.settle[1][2].keep


def test_without_settle_the_guide_moves_in_those_steps(tiny_llama_dir, corpus, tmp_path):
    """The power check of 'frozen' above: the same recipe without the phase moves the guide in steps 3-4."""
    r = tiny_recipe(tiny_llama_dir, corpus, **{**SETTLE, "settle_steps": 0})
    _, snaps, _ = _snapshots(r, tmp_path / "plain")
    assert any(not torch.equal(snaps[2]["guide"][k], snaps[3]["guide"][k]) for k in snaps[2]["guide"])


def test_settle_passes_get_the_keepsets_masks(tiny_llama_dir, corpus, tmp_path):
    from ppn_bayes.training.build import build
    from ppn_bayes.training.loop import train_step

    r = tiny_recipe(tiny_llama_dir, corpus, **{**SETTLE, "settle_steps": 3})
    s = build(r, tmp_path / "r")
    seen, forward = [], s.ppn.forward

    def spy(*a, **k):
        seen.append((k.get("lam"), k.get("keep_masks")))
        return forward(*a, **k)

    s.ppn.forward = spy
    record = train_step(s, 1)  # the phase's first step: the keep-sets are solved here
    assert record["settle"] and len(seen) == 3 and seen[0] == (0.0, None)
    for (lam, masks), (lam_k, masks_k, res) in zip(seen[1:], s.settle):
        assert lam == lam_k > 0 and masks is masks_k
        assert set(res.keep.layers) == {i for i, m in enumerate(masks["layers"].tolist()) if m == 1.0}
    # nothing is drawn in the phase: the next step trains the same masks, at the same sizes
    settled = s.settle
    again = train_step(s, 2)
    assert s.settle is settled and [m for _, m in seen[4:]] == [m for _, m, _ in settled]
    assert [p["sampled_size"] for p in again["sandwich"]] == [p["sampled_size"] for p in record["sandwich"]]


@pytest.mark.slow
def test_a_resume_inside_the_settle_phase_replays_the_uninterrupted_run(tiny_llama_dir, corpus, tmp_path):
    r = tiny_recipe(tiny_llama_dir, corpus, **{**SETTLE, "steps": 3})
    assert_resume_replays(r, tmp_path)  # phase = steps 1-2 (0-based); resuming at 2 re-solves its keep-sets


@pytest.mark.parametrize("train, match", [
    ({"settle_steps": 4}, r"must be in \[0, train.steps\)"),
    ({"settle_steps": -1}, r"must be in \[0, train.steps\)"),
    ({"sandwich": False, "sandwich_sizes": []}, "set train.sandwich: true"),
    ({"weights": "frozen"}, "weights: lora|full"),
    ({"guide_steps": 5}, "guide_steps: 0"),
])
def test_bad_settle_settings_fail_in_one_line(tiny_llama_dir, corpus, train, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_recipe(tiny_llama_dir, corpus, **{**SETTLE, **train})
    assert "\n" not in str(err.value) and str(err.value).startswith("train.settle_steps")
