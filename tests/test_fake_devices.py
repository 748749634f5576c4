"""The CUDA paths, checked on a machine without a GPU.

No line of the CUDA paths runs in CI, so the bugs a first GPU run would meet are caught here with
two stand-ins for a GPU:

* **The meta device.** A model moved to ``meta`` has shapes and no data; any op that mixes one of its
  tensors with a CPU tensor (``index_add_``/``+=`` into a CPU accumulator, a CPU Hessian against device
  weights) raises, exactly where it would raise with a CUDA model. Code that reads values on the host
  (``float(t)``) cannot run there, so the meta tests stop where the data starts to matter.
* **Fake CUDA tensors** (``FakeTensorMode``): on CPU-only torch they carry ``device='cuda'``, follow
  CUDA's autocast rules (``torch.set_autocast_enabled("cuda", True)``), and raise on CPU/CUDA mixing,
  in-place ops into CPU tensors included. Modules are turned into fake CUDA modules parameter by
  parameter (:func:`fake_cuda_module`), since ``.to("cuda")`` fails without CUDA.

Under CUDA's bf16 autocast, the guide, the prior and the push must stay float32: the low-rank guide's
capacitance matrix goes to ``cholesky``, which has no bf16 CUDA kernel (FakeTensorMode would not
notice, so the tests assert that no op of theirs produces a bf16 tensor), and the thresholds must be
the float32 ones that evaluation and export use.
"""

from __future__ import annotations

import contextlib

import pyro
import pytest
import torch
from conftest import make_tiny_llama
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.guides import make_guide
from ppn_bayes.bayes.prior import ScorePrior
from ppn_bayes.bayes.push import Push
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig, recipe_from_dict

META = torch.device("meta")


# ------------------------------------------------------------------------------------------ helpers


def fake_cuda_module(module: torch.nn.Module, mode) -> torch.nn.Module:
    """``module`` with every parameter and buffer replaced by a fake CUDA tensor of its shape and dtype."""
    convert = mode.fake_tensor_converter

    def fake(t: torch.Tensor) -> torch.Tensor:
        return convert.from_meta_and_device(mode, t.detach().to("meta"), torch.device("cuda", 0))

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b)
    return module


class DtypeLog(TorchDispatchMode):
    """Records the dtype of every floating-point tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.setdefault(str(func), set()).add(t.dtype)
        return out

    def low_precision(self) -> list[str]:
        return sorted(f for f, ds in self.dtypes.items() if ds & {torch.bfloat16, torch.float16})


class GeneratorDevices(TorchFunctionMode):
    """Raises when a random op draws with a generator of another device type than its output's (a CPU
    ``torch.Generator()`` used for CUDA draws fails on CUDA; neither meta nor fake tensors check it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type != gen.device.type:
                    raise AssertionError(f"{getattr(func, '__name__', func)} drew {t.device.type} values with a "
                                         f"{gen.device.type} generator")
        return out


@contextlib.contextmanager
def cuda_bf16_autocast():
    """CUDA autocast switched on as ``torch.autocast("cuda", torch.bfloat16)`` does (usable without CUDA)."""
    saved = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", saved[0])
        torch.set_autocast_dtype("cuda", saved[1])


@pytest.fixture
def tiny_gated():
    return gate(make_tiny_llama(64), group_size=16)


def _core(gated, guide_kind: str):
    """Prior, push and guide of the tiny model, built on the CPU as ``train.build`` does."""
    norms = gated.unit_norms()
    prior = ScorePrior(gated.inventory, norms, PriorConfig())
    push = Push(gated.inventory, PushConfig())
    torch.manual_seed(0)
    guide = make_guide(prior, GuideConfig(kind=guide_kind, rank=2))
    return prior, push, guide


# ---------------------------------------------------------------------- the meta device: build path


def test_unit_norms_on_the_weights_device(tiny_gated):
    """The score anchors are computed where the weights are (they were accumulated into CPU tensors)."""
    cpu = tiny_gated.unit_norms()
    tiny_gated.model.to(META)
    norms = tiny_gated.unit_norms()
    assert {k: (v.device, tuple(v.shape)) for k, v in norms.items()} == \
        {k: (META, tuple(v.shape)) for k, v in cpu.items()}


def test_build_and_one_objective_pass_on_meta(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """``train.build`` with the model on a non-CPU device, then the ELBO's forward pass: every tensor the
    session makes is on that device (a CPU tensor mixed in raises on meta as it would on CUDA)."""
    from ppn_bayes.hub import zoo
    from ppn_bayes.training import build as build_mod
    from ppn_bayes.training.build import build

    load = zoo.load_model

    def load_on_meta(path, dtype=torch.float32, device="cpu", trust_remote_code=False):
        model, tok = load(path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
        return model.to(META), tok

    monkeypatch.setattr(build_mod, "load_model", load_on_meta)  # build's own reference (imported at its top)
    for weights, guide in (("lora", "mean_field"), ("full", "low_rank")):
        recipe = recipe_from_dict({
            # the data score anchor needs real activations (a meta tensor has no values): norms here
            "name": "meta", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16, "score_anchor": "norm"},
            "guide": {"kind": guide, "rank": 2},
            "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
            "train": {"steps": 2, "batch_size": 2, "weights": weights}})
        with pyro.validation_enabled(False):  # argument checks read values (.item()), as in the training loop
            s = build(recipe, tmp_path / weights, device=META)
        on = {str(t.device) for t in [*s.objective.parameters(), *s.objective.buffers()]}
        assert on == {"meta"}, on
        ids = s.train_blocks[:2].to(META)
        for lam in (0.0, 0.7):  # a dense step and a pruned one (masks, amplitudes, the compute factor)
            with pyro.validation_enabled(False), _fixed_lambda(s.ppn, lam), GeneratorDevices():
                terms = s.objective(ids, torch.arange(2, device=META))
            assert {k: v.device for k, v in terms.items()} == dict.fromkeys(terms, META)
            terms["loss"].backward()
        assert all(p.grad is None or p.grad.device == META for p in s.objective.parameters())


@contextlib.contextmanager
def _fixed_lambda(ppn, lam: float):
    """The model's price draw replaced by ``lam`` (draws read a host RNG, which is fine on any device)."""
    import ppn_bayes.bayes.model as model_mod

    saved = model_mod.draw_lambda
    model_mod.draw_lambda = lambda config, generator=None: lam
    try:
        yield
    finally:
        model_mod.draw_lambda = saved


# -------------------------------------------------------------------------- the meta device: peers


def test_peer_statistics_on_meta(tiny_gated, monkeypatch):
    """ShortGPT's Block Influence, SparseGPT's Hessian, Wanda's column norms and GISP's Taylor scores
    are accumulated on the model's device (ShortGPT added CUDA scalars into a CPU tensor, SparseGPT
    kept its Hessian on the CPU against device weights)."""
    import transformers.masking_utils as masking

    from ppn_bayes.baselines.gisp import taylor_importance
    from ppn_bayes.baselines.shortgpt import block_influence
    from ppn_bayes.baselines.sparsegpt import Hessian, sparsegpt_prune
    from ppn_bayes.baselines.wanda import ColumnNorms, wanda_mask

    # transformers looks for packed sequences in the position ids of a cache-less forward (a host read);
    # on meta there is nothing to read, and these blocks are not packed
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    model = tiny_gated.model.to(META)
    blocks = torch.randint(0, 64, (2, 16))
    bi = block_influence(model, blocks, batch_size=2)
    assert bi.device == META and bi.shape == (2,)
    w = model.model.layers[0].mlp.down_proj.weight
    x = torch.empty(2, 16, w.shape[1], device=META)
    h, c = Hessian(w.shape[1]), ColumnNorms(w.shape[1])
    h.add(x)
    c.add(x)
    assert h.H.device == META and c.norms.device == META
    assert wanda_mask(w, c.norms, 0.5, "unstructured").device == META
    with pytest.raises(RuntimeError, match="meta"):  # the sweep reads Cholesky's status on the host
        sparsegpt_prune(w, h.H, 0.5)
    ids = blocks.to(META)
    scores = taylor_importance(tiny_gated, [(lambda: tiny_gated(input_ids=ids, labels=ids).loss, 1.0)])
    assert {k: v.device for k, v in scores.items()} == {"heads": META, "groups": META}


def test_speed_bench_on_meta(tiny_gated):
    """The speed bench's models, prompts and timed generation stay on the model's device."""
    from ppn_bayes.backbone.materialize import materialize
    from ppn_bayes.evaluation.bench import param_bytes, time_generation

    inv = tiny_gated.inventory
    keep = inv.full_keepset()
    keep = type(keep)(layers=[0], heads=keep.heads, groups=keep.groups)
    small = materialize(tiny_gated.model, inv.complete(keep), inv).eval()
    model = tiny_gated.remove_hooks().to(META)
    small.to(META)
    prompt = torch.zeros(1, 8, dtype=torch.long, device=META)
    for m in (model, small):
        r = time_generation(m, prompt, 3)
        assert r["decode_s"] >= 0 and r["kv_cache_bytes"] > 0
    assert param_bytes(small) < param_bytes(model)  # meta tensors have no storage to tell ties apart


# --------------------------------------------------------------------- fake CUDA tensors, autocast


@pytest.mark.parametrize("guide_kind", ["mean_field", "low_rank"])
def test_guide_prior_push_stay_float32_under_bf16_autocast(tiny_gated, guide_kind):
    """No op of the guide, the prior or the push produces a bf16 tensor with bf16 autocast on (CPU and
    CUDA autocast both switched on). Real CPU tensors here: softplus (the guide's scales, the splines'
    increments) on a fake CUDA tensor aborts a CPU-only torch build, so fake CUDA serves the checks
    below that need no such op. CPU autocast would upcast ``cholesky`` where CUDA's does not, hence the
    spy on every op's output dtype instead of waiting for an error."""
    prior, push, guide = _core(tiny_gated, guide_kind)
    log = DtypeLog()
    with cuda_bf16_autocast(), torch.autocast("cpu", dtype=torch.bfloat16), log:
        z = guide()
        scores = pyro.poutine.condition(prior, data=z)()
        rho = push.inclusion(scores, 0.7)
        gates = push.gates(push.sample_masks(rho, torch.Generator().manual_seed(0)), 0.7)
        size = push.expected_size(rho)
        tau = push.thresholds(0.7)
        median = guide.median()
    tensors = [*z.values(), *scores.values(), *rho.values(), *gates.values(), size, *tau.values(), *median.values()]
    assert {t.dtype for t in tensors} == {torch.float32}
    assert log.low_precision() == [], log.low_precision()
    if guide_kind == "low_rank":
        assert any("cholesky" in f for f in log.dtypes), "the low-rank guide factorizes its capacitance"


def test_dtype_log_sees_bf16_where_autocast_is_left_on(tiny_gated):
    """Power check of the test above: the same spy sees bf16 where autocast is left on: under fake CUDA
    autocast, the low-rank capacitance pattern (a matmul into ``cholesky``) runs in bf16, which CUDA
    cannot factorize; on the CPU, the guide with its fp32 guard unwrapped runs its matmuls in bf16."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(4, 4, device="cuda")
        log = DtypeLog()
        with cuda_bf16_autocast(), log:
            torch.linalg.cholesky(a @ a.T)
    assert any("cholesky" in f for f in log.low_precision()), log.dtypes
    _, _, guide = _core(tiny_gated, "low_rank")
    log = DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        type(guide).forward.__wrapped__(guide)
    assert log.low_precision(), log.dtypes


def test_generator_device_check_catches_a_cpu_generator_on_another_device():
    """Power check of :class:`GeneratorDevices` (torch itself does not check it on meta)."""
    torch.rand(3, generator=torch.Generator(), device=META)  # passes silently without the check
    with GeneratorDevices(), pytest.raises(AssertionError, match="meta values with a cpu generator"):
        torch.rand(3, generator=torch.Generator(), device=META)
    with GeneratorDevices():
        torch.rand(3, generator=torch.Generator())  # the push's mask draws: CPU generator, CPU values


def test_fake_cuda_catches_cpu_accumulators():
    """Power check of the fake device: the old unit-norm accumulation (into CPU tensors) raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        sq = torch.empty(8, device="cuda")
        with pytest.raises(RuntimeError):
            torch.zeros(2, 4)[0].index_add_(0, torch.arange(8) // 2, sq)
        with pytest.raises(RuntimeError):
            acc = torch.zeros(4)
            acc += sq[:4]


def test_statistical_core_is_declared_full_precision():
    """Structural: every public method of the guide, prior and push runs with autocast off."""
    from ppn_bayes.bayes.guides import ScoreGuide
    from ppn_bayes.bayes.push import MonotoneSpline

    required = {ScoreGuide: ("forward", "median"), ScorePrior: ("forward", "initial_scores"),
                MonotoneSpline: ("forward",),
                Push: ("thresholds", "inclusion", "nest", "unnest", "expected_size", "sample_masks",
                       "amplitudes", "gates", "calibrate_thresholds")}
    for cls, names in required.items():
        for name in names:
            fn = getattr(cls, name)
            while not getattr(fn, "__full_precision__", False) and hasattr(fn, "__wrapped__"):
                fn = fn.__wrapped__
            assert getattr(fn, "__full_precision__", False), f"{cls.__name__}.{name} is not @fp32"


# ------------------------------------------------------------------ a bf16 run, CPU autocast


def test_bf16_autocast_fit_sees_the_float32_thresholds(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """A tiny fit with the LM under bf16 autocast (CPU autocast standing in for CUDA's): the thresholds,
    inclusion probabilities and guide draws inside the step are exactly the float32 ones, while the
    LM's logits are bf16 (so autocast was on where it should be)."""
    import ppn_bayes.bayes.model as model_mod
    from ppn_bayes.training.build import build
    from ppn_bayes.training.loop import train_step

    monkeypatch.setattr(model_mod, "autocast_context",
                        lambda device, dtype: torch.autocast("cpu", dtype=torch.bfloat16) if dtype
                        else contextlib.nullcontext())
    recipe = recipe_from_dict({
        "name": "bf16", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
        "guide": {"kind": "low_rank", "rank": 2}, "push": {"p_dense": 0.0},
        "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
        "train": {"steps": 2, "batch_size": 2, "weights": "lora", "bf16": True}})
    s = build(recipe, tmp_path / "run")
    seen: dict = {"tau": []}
    thresholds, lm_forward = s.ppn.push.thresholds, s.gated.forward

    def spy_thresholds(lam):
        used = thresholds(lam)  # what the step computes, under the step's autocast state
        with torch.autocast("cpu", enabled=False):
            exact = thresholds(lam)  # float32, same parameters, autocast certainly off
        seen["tau"].append((used, exact))
        return used

    def spy_lm(*args, **kwargs):
        out = lm_forward(*args, **kwargs)
        seen["logits_dtype"] = out.logits.dtype
        return out

    monkeypatch.setattr(s.ppn.push, "thresholds", spy_thresholds)
    monkeypatch.setattr(s.gated, "forward", spy_lm)
    for step in range(2):
        record = train_step(s, step)
        assert torch.isfinite(torch.tensor([record["elbo"], record["grad_norm"]])).all()
    assert seen["logits_dtype"] == torch.bfloat16  # autocast was on for the LM
    assert len(seen["tau"]) >= 2
    for used, exact in seen["tau"]:
        for k in exact:
            assert used[k].dtype == torch.float32
            torch.testing.assert_close(used[k], exact[k], rtol=0, atol=0)
    assert all(v.dtype == torch.float32 for v in s.guide.state_dict().values())


def test_bf16_threshold_arithmetic_would_be_caught():
    """Power check: the spline product as it was (float32 basis @ control points) under CPU bf16
    autocast is ~1e-2 off the float32 value, far above the bit-for-bit comparison above."""
    from ppn_bayes.bayes.push import bspline_basis

    torch.manual_seed(0)
    cp = torch.cumsum(torch.rand(4, 10) * 0.7, -1) - 2.0
    x = torch.tensor([0.41])
    exact = bspline_basis(x, 10).float() @ cp.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bspline_basis(x, 10).float() @ cp.T
    assert (low.float() - exact).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- timing


def test_decode_timers_synchronize_the_device(tiny_gated, monkeypatch):
    """``ppn compare``'s decode time and the speed bench share one timer, which waits for the device
    before reading the clock (CUDA kernels run asynchronously)."""
    import ppn_bayes.evaluation.bench as bench_mod
    from ppn_bayes.compare.bench import decode_seconds

    calls = []
    monkeypatch.setattr(bench_mod, "synchronize", lambda device: calls.append(torch.device(device)))
    prompt = torch.zeros(1, 4, dtype=torch.long)
    assert decode_seconds(tiny_gated.remove_hooks(), prompt, 3, trials=2) >= 0
    assert calls == [torch.device("cpu")] * 6  # before prefill, after prefill, after decode; per trial
