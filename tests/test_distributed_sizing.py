"""The multi-GPU path sized for big models, tested without a GPU.

- Device selection per rank (:func:`ppn_bayes.training.distributed.local_device`, and ``init_distributed``
  with CUDA faked by monkeypatching ``torch.cuda``): one visible GPU per rank, all GPUs visible, and
  more ranks than GPUs.
- The process group's timeout (``PPN_DIST_TIMEOUT_S``): parsed, validated, passed to
  ``init_process_group``.
- Gathering to the host: a fake ``full_tensor`` that allocates a fresh "whole" tensor per call and
  counts (by weakref) how many are alive at each call shows that one whole tensor exists at a time,
  and that ranks other than 0 keep nothing.
- Two gloo processes under torchrun with FSDP: the checkpoints equal the single-process ones, resume,
  and the same weakref count on the real ``DTensor.full_tensor`` shows the same in a real run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ppn_bayes.errors import ConfigError
from ppn_bayes.training import checkpoint, distributed
from ppn_bayes.training.distributed import (
    DIST_TIMEOUT_S,
    dist_timeout,
    gather_to_host,
    init_distributed,
    local_device,
)

# ------------------------------------------------------------------------------ device selection


@pytest.mark.parametrize("local_rank, count, expected", [
    (0, 1, 0), (3, 1, 0),  # one visible GPU per rank (CUDA_VISIBLE_DEVICES set per process): always cuda:0
    (0, 4, 0), (3, 4, 3), (1, 2, 1),  # torchrun's default: every rank sees every GPU of its node
])
def test_local_device(local_rank, count, expected):
    assert local_device(local_rank, count) == expected


@pytest.mark.parametrize("local_rank, count", [(2, 2), (7, 4)])
def test_local_device_more_ranks_than_gpus_is_one_line(local_rank, count):
    with pytest.raises(ConfigError, match=f"LOCAL_RANK {local_rank} but this process sees only {count} CUDA") as err:
        local_device(local_rank, count)
    assert "\n" not in str(err.value) and f"--nproc_per_node {count}" in str(err.value)


def test_local_device_without_gpus_is_one_line():
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        local_device(0, 0)


class FakeGroup:
    """Stands in for ``torch.distributed``'s process group setup: records what init_distributed asks for."""

    def __init__(self, monkeypatch, rank: int, world: int):
        self.init_kwargs: dict | None = None
        self.devices: list[torch.device] = []
        monkeypatch.setattr(distributed.dist, "is_initialized", lambda: self.init_kwargs is not None)
        monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: setattr(self, "init_kwargs", kw))
        monkeypatch.setattr(distributed.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(distributed.dist, "get_world_size", lambda: world)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.devices.append(torch.device(d)))


def _fake_cuda(monkeypatch, count: int, local_rank: int, world: int = 2) -> FakeGroup:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.delenv("PPN_DIST_TIMEOUT_S", raising=False)
    return FakeGroup(monkeypatch, rank=local_rank, world=world)


@pytest.mark.parametrize("count, local_rank, expected", [(1, 1, 0), (2, 1, 1)])
def test_init_distributed_picks_the_rank_gpu_and_the_timeout(monkeypatch, count, local_rank, expected):
    group = _fake_cuda(monkeypatch, count, local_rank)
    rank, world, device, started = init_distributed("cuda")
    assert (rank, world, started) == (local_rank, 2, True)
    assert device == torch.device("cuda", expected)  # what DDP's device_ids and FSDP's mesh then use
    assert group.devices == [device]  # made current before the process group and the device mesh exist
    assert group.init_kwargs == {"backend": "nccl", "timeout": timedelta(seconds=DIST_TIMEOUT_S)}


def test_init_distributed_more_ranks_than_gpus_fails_before_the_group(monkeypatch):
    group = _fake_cuda(monkeypatch, count=2, local_rank=2, world=3)
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but this process sees only 2"):
        init_distributed("auto")
    assert group.init_kwargs is None and group.devices == []


# ------------------------------------------------------------------------------------- timeout


def test_timeout_default_covers_a_long_checkpoint_write(monkeypatch):
    monkeypatch.delenv("PPN_DIST_TIMEOUT_S", raising=False)
    assert dist_timeout() == timedelta(seconds=DIST_TIMEOUT_S) >= timedelta(minutes=60)
    monkeypatch.setenv("PPN_DIST_TIMEOUT_S", "  ")  # set but blank: as unset
    assert dist_timeout() == timedelta(seconds=DIST_TIMEOUT_S)


@pytest.mark.parametrize("raw, seconds", [("7200", 7200), ("90.5", 90.5), (" 1e4 ", 10_000)])
def test_timeout_from_env(monkeypatch, raw, seconds):
    monkeypatch.setenv("PPN_DIST_TIMEOUT_S", raw)
    assert dist_timeout() == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan", "inf", "10min"])
def test_bad_timeout_is_one_line(monkeypatch, raw):
    monkeypatch.setenv("PPN_DIST_TIMEOUT_S", raw)
    with pytest.raises(ConfigError, match="PPN_DIST_TIMEOUT_S=.* is not a positive number of seconds") as err:
        dist_timeout()
    assert "\n" not in str(err.value)


def test_timeout_env_reaches_the_process_group_and_bad_values_stop_first(monkeypatch):
    group = _fake_cuda(monkeypatch, count=1, local_rank=0)
    monkeypatch.setenv("PPN_DIST_TIMEOUT_S", "5400")
    init_distributed("cpu")
    assert group.init_kwargs == {"backend": "gloo", "timeout": timedelta(seconds=5400)}
    group = _fake_cuda(monkeypatch, count=1, local_rank=0)
    monkeypatch.setenv("PPN_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError):
        init_distributed("cpu")
    assert group.init_kwargs is None


# ------------------------------------------------------------------------- gathering to the host


class CountingGather:
    """A fake ``full_tensor``: each call allocates a fresh whole tensor, as an all-gather does, and
    records how many whole tensors (this one included) are alive at that moment."""

    def __init__(self):
        self.live: list[weakref.ref] = []
        self.calls = 0
        self.peak = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        whole = t.detach().clone()
        alive = sum(ref() is not None for ref in self.live)
        self.live.append(weakref.ref(whole))
        self.calls += 1
        self.peak = max(self.peak, alive + 1)
        return whole


@pytest.fixture
def gather(monkeypatch) -> CountingGather:
    fake = CountingGather()
    monkeypatch.setattr(distributed, "full_tensor", fake)
    monkeypatch.setattr(checkpoint, "full_tensor", fake, raising=False)  # where older code called it from
    return fake


def _fake_session(rank: int, lora=None) -> SimpleNamespace:
    """What optimizer_state/state_tensors read of a Session, as if FSDP-sharded over 2 ranks, after one AdamW step."""
    torch.manual_seed(0)
    guide, push = nn.Linear(3, 2), nn.Linear(2, 2)
    weights = {f"model.layers.{i}.mlp.down_proj.weight": nn.Parameter(torch.randn(4, 3)) for i in range(3)}
    opt = torch.optim.AdamW([{"params": [*guide.parameters(), *push.parameters()], "name": "guide"},
                             {"params": list(weights.values()), "name": "weights"}], lr=0.01)
    params = [*guide.parameters(), *push.parameters(), *weights.values()]
    sum(p.square().sum() for p in params).backward()
    opt.step()
    recipe = SimpleNamespace(train=SimpleNamespace(distributed="fsdp"))
    return SimpleNamespace(rank=rank, main=rank == 0, world=2, recipe=recipe, optimizer=opt, guide=guide,
                           ppn=push, lora=lora, named_weights=weights, average=None)  # no averaging window


def test_gather_to_host_holds_one_whole_tensor_at_a_time(gather):
    source = {f"t{i}": torch.full((5,), float(i)) for i in range(4)}
    kept = dict(gather_to_host(source.items(), keep=True))
    assert gather.calls == 4 and gather.peak == 1
    assert list(kept) == list(source) and all(torch.equal(kept[k], source[k]) for k in source)
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in kept.values())
    source["t1"].add_(100.0)  # copies, not views of live (CPU) state
    assert kept["t1"][0] == 1.0
    gather.calls = 0
    assert dict(gather_to_host(source.items(), keep=False)) == {}
    assert gather.calls == 4  # every rank still takes part in each gather


@pytest.mark.parametrize("rank", [0, 1])
def test_optimizer_state_gathers_one_tensor_at_a_time_to_rank_0(gather, rank):
    s = _fake_session(rank)
    reference = s.optimizer.state_dict()
    n_tensors = sum(torch.is_tensor(v) for st in reference["state"].values() for v in st.values())
    state = checkpoint.optimizer_state(s)
    assert gather.calls == n_tensors == 3 * 7  # step, exp_avg, exp_avg_sq of 7 parameters: all gathered
    assert gather.peak == 1  # never two whole state tensors at once on a device
    if rank:
        assert state == {}  # the other ranks keep nothing
        return
    assert state["param_groups"] == reference["param_groups"]
    assert sorted(state["state"]) == sorted(reference["state"])
    for i, st in reference["state"].items():
        assert list(state["state"][i]) == list(st)
        for k, v in st.items():
            assert state["state"][i][k].device.type == "cpu" and torch.equal(state["state"][i][k], v)


@pytest.mark.parametrize("rank", [0, 1])
def test_state_tensors_gather_weights_to_rank_0_only(gather, rank):
    s = _fake_session(rank)
    tensors = checkpoint.state_tensors(s)
    weights = checkpoint.trained_weights(s)
    assert gather.peak == 1
    if rank:
        assert tensors == {} and weights == {}
        return
    expected = {*(f"guide.{k}" for k in s.guide.state_dict()), *(f"model.{k}" for k in s.ppn.state_dict()),
                *(f"weights.{k}" for k in s.named_weights)}
    assert set(tensors) == expected and set(weights) == set(s.named_weights)
    for k, p in s.named_weights.items():
        assert torch.equal(tensors[f"weights.{k}"], p.detach()) and torch.equal(weights[k], p.detach())


# ------------------------------------------------------------------- two gloo processes under torchrun

STEPS, LR = 2, {"guide": 0.05, "model": 0.05, "weights": 0.01}

# Runs `ppn fit` with the real DTensor.full_tensor wrapped to count live whole tensors (weakrefs) and
# optimizer_state/state_tensors wrapped to count what each rank keeps; one JSON file per rank.
RUNNER = r'''
import json, os, sys, weakref

import torch

import ppn_bayes.training.checkpoint as ckpt
import ppn_bayes.training.distributed as pd
from ppn_bayes.cli import main

record = {"gathered": 0, "peak_live": 0, "kept": []}
live = []
real_full = pd.full_tensor

def counting_full(t):
    if not pd.is_dtensor(t):
        return real_full(t)
    record["peak_live"] = max(record["peak_live"], 1 + sum(r() is not None for r in live))
    whole = real_full(t)
    live.append(weakref.ref(whole))
    record["gathered"] += 1
    return whole

def counting(name, fn):
    def wrapped(s):
        out = fn(s)
        values = [v for st in out.get("state", {}).values() for v in st.values()] if name == "optimizer_state" \
            else list(out.values())
        record["kept"].append([name, sum(torch.is_tensor(v) for v in values)])
        return out
    return wrapped

pd.full_tensor = counting_full
ckpt.full_tensor = counting_full  # where older code called it from
for name in ("optimizer_state", "state_tensors"):
    setattr(ckpt, name, counting(name, getattr(ckpt, name)))
try:
    code = main(sys.argv[1:])
finally:
    path = os.path.join(os.environ["SIZING_DIR"], "rank%s.json" % os.environ.get("RANK", "0"))
    with open(path, "w") as f:
        json.dump(record, f)
sys.exit(code)
'''


def _lr(key: str) -> float:
    return LR[key.split(".")[0]]


def _assert_same_checkpoint(single: Path, multi: Path, steps: int) -> None:
    """FSDP's checkpoint against the single process's: same keys and shapes exactly; values within
    float32 reordering error.

    Parameters (``state.safetensors``): AdamW moves an element by at most about ``lr`` per step
    whatever the gradient, so a real divergence (a shard not gathered or not updated, a wrong rank's
    rows) is off by O(lr * steps); reordered float32 sums of the gradients move weights by ~1e-4 of
    that (docstring of tests/test_distributed.py). atol 1e-2 * lr * steps sits between the two.
    AdamW's moments are linear and quadratic in the gradients, whose reordering error is ~1e-6 of the
    tensor's scale; a missing shard or a wrong average is O(1) of it: atol 1e-3 * max|moment|.
    """
    from safetensors.torch import load_file

    a, b = load_file(str(single / "state.safetensors")), load_file(str(multi / "state.safetensors"))
    assert set(a) == set(b) and any(k.startswith("weights.") for k in a)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-2 * _lr(k) * steps, msg=k)
    oa = torch.load(single / "optimizer.pt", weights_only=True)
    ob = torch.load(multi / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    assert sorted(oa["state"]) == sorted(ob["state"]) and oa["state"]
    for i, sa in oa["state"].items():
        sb = ob["state"][i]
        assert sorted(sa) == sorted(sb), i
        for k, va in sa.items():
            vb = sb[k]
            assert type(vb) is torch.Tensor and vb.shape == va.shape and vb.dtype == va.dtype, (i, k)
            if k == "step":
                assert torch.equal(vb, va)
            else:
                torch.testing.assert_close(vb, va, rtol=0, atol=1e-3 * float(va.abs().max()), msg=f"{i}.{k}")


@pytest.mark.slow
def test_fsdp_checkpoint_gathered_to_rank_0_one_tensor_at_a_time(tiny_llama_dir, tmp_path):
    import yaml

    from ppn_bayes.data.corpus import load_corpus

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to this Python")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:8_000], encoding="utf-8")
    recipe = {"name": "sizing", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
              "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
              "train": {"steps": STEPS, "batch_size": 4, "weights": "full", "distributed": "fsdp",
                        "schedule": "constant", "checkpoint_every": 1, "eval_lambdas": [0.5],
                        "lr_guide": LR["guide"], "lr_push": LR["model"], "lr_weights": LR["weights"], "device": "cpu"}}
    path = tmp_path / "sizing.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPN_DIST_TIMEOUT_S": "600"}
    fit = ["fit", "--no-progress"]
    single, multi = tmp_path / "single", tmp_path / "multi"

    def two(*args: str, record: Path) -> list[dict]:
        record.mkdir()
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(runner), *fit, *args],
                              env={**env, "SIZING_DIR": str(record)}, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]

    subprocess.run([sys.executable, "-m", "ppn_bayes.cli", *fit, str(path), "--out", str(single)], env=env,
                   check=True, capture_output=True)
    ranks = two(str(path), "--out", str(multi), record=tmp_path / "record-fit")
    assert json.loads((multi / "checkpoint" / "trainer.json").read_text())["world_size"] == 2
    _assert_same_checkpoint(single / "checkpoint", multi / "checkpoint", STEPS)

    from safetensors.torch import load_file

    n_state = len(load_file(str(multi / "checkpoint" / "state.safetensors")))
    opt = torch.load(multi / "checkpoint" / "optimizer.pt", weights_only=True)
    n_opt = sum(torch.is_tensor(v) for st in opt["state"].values() for v in st.values())
    saves = [["state_tensors", n_state], ["optimizer_state", n_opt]] * STEPS  # checkpoint_every: 1
    assert ranks[0]["kept"] == saves  # rank 0 keeps the whole state, the one it writes
    assert ranks[1]["kept"] == [[name, 0] for name, _ in saves]  # rank 1 keeps nothing it gathered
    # Both ranks took part in the same gathers (the sharded weights and their two AdamW moments at each save) and
    # never held two whole tensors at once.
    assert ranks[0]["gathered"] == ranks[1]["gathered"] > 0
    assert ranks[0]["peak_live"] == ranks[1]["peak_live"] == 1

    # resume under FSDP for one more step: ends where the single process resumed the same way does
    subprocess.run([sys.executable, "-m", "ppn_bayes.cli", *fit, "--resume", "--out", str(single),
                    "--set", f"train.steps={STEPS + 1}"], env=env, check=True, capture_output=True)
    ranks = two("--resume", "--out", str(multi), "--set", f"train.steps={STEPS + 1}", record=tmp_path / "record-resume")
    assert json.loads((multi / "manifest.json").read_text())["steps_done"] == STEPS + 1
    assert ranks[1]["kept"] == [["state_tensors", 0], ["optimizer_state", 0]]
    _assert_same_checkpoint(single / "checkpoint", multi / "checkpoint", STEPS + 1)
