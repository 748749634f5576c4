"""Is the guide fitted? The guide records a run logs, the flattening criterion (with power checks),
the warning `ppn keepset`/`ppn report` print, and the guide-only phase (weights and push frozen)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ppn_bayes.analysis.report import fit_verdict, fit_warning
from ppn_bayes.bayes.guides import (
    convergence_warning,
    guide_convergence,
    guide_marginals,
    kl_estimate,
    make_guide,
)
from ppn_bayes.errors import ConfigError
from ppn_bayes.run import fit
from ppn_bayes.training.schedule import group_multiplier, guide_lr_spent
from tests.test_train import tiny_recipe


def _records(values, lr=0.1):
    """Guide records at steps 0, 10, ... with ``lr`` per step and the three tracked quantities = values."""
    return [{"type": "guide", "step": 10 * i, "lr_sum": 10 * i * lr, "kl": v, "log_scale_mean": -3.0, "loc_move": 0.0,
             "scale_move": 0.0, "scale_ratio": 1.0} for i, v in enumerate(values)]


def test_convergence_reads_a_travelling_fit_as_not_flattened():
    """Power check: a quantity moving at a constant rate is 100 % of its average rate (not flattened);
    one that moved and then stopped (an exponential approach, last step 1 % of the total) is flattened."""
    moving = guide_convergence(_records([0, 1, 2, 3, 4]))
    assert not moving["flattened"] and moving["relative_rate"]["kl"] == pytest.approx(1.0)
    settled = guide_convergence(_records([0, 0.9, 0.99, 0.999, 0.9999]))
    assert settled["flattened"] and settled["relative_rate"]["kl"] < 0.01
    assert guide_convergence(_records([0, 1])) is None  # too few records to judge
    assert convergence_warning(settled) is None
    warning = convergence_warning(moving)
    assert warning.startswith("warning:") and "\n" not in warning and "train.guide_steps" in warning


def test_a_schedule_that_stops_the_optimizer_is_not_convergence():
    """Per unit of learning rate: the same displacement per unit lr while lr decays to 1 % (a cosine
    tail) still reads 100 % of the average rate, whereas raw displacement would look flat."""
    recs = _records([0, 1, 2, 3, 3.01])
    recs[-1]["lr_sum"] = recs[-2]["lr_sum"] + 0.01 * 1.0  # the last interval spent 1 % of the usual lr
    conv = guide_convergence(recs)
    assert not conv["flattened"] and conv["relative_rate"]["kl"] == pytest.approx(1.0)


def test_kl_estimate_matches_pyros_elbo_and_uses_common_random_numbers():
    """Independent reference: Pyro's Trace_ELBO loss of the guide against the score prior alone (no
    data) is KL(q || p) too; 600 one-particle losses give its mean and per-draw sd. Tolerance 4 SE of
    the 64-draw estimate. The estimate is deterministic (same random numbers every call) and leaves
    the caller's RNG as it was."""
    import pyro

    from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
    from tests.test_identifiability import _model

    model = _model(PriorConfig(kind="normal"), PushConfig())
    guide = make_guide(model.prior, GuideConfig(init_scale=0.3))
    state = torch.get_rng_state()
    a, b = kl_estimate(guide, model.prior), kl_estimate(guide, model.prior)
    assert a == b and torch.equal(state, torch.get_rng_state())
    pyro.set_rng_seed(1)
    elbo = pyro.infer.Trace_ELBO()
    with torch.no_grad():
        ref = torch.tensor([elbo.loss(model.prior, guide.auto) for _ in range(600)], dtype=torch.float64)
    se = float(ref.std()) / 8.0  # sd of one draw / sqrt(64)
    assert abs(a - float(ref.mean())) < 4 * se + 4 * float(ref.std()) / 600**0.5, (a, float(ref.mean()), se)
    loc, sd = guide_marginals(guide)
    assert loc.numel() == sd.numel() == sum(p.numel() for n, p in guide.named_parameters() if ".locs." in n)
    assert torch.allclose(sd, torch.full_like(sd, 0.3), rtol=1e-4)


def test_low_rank_marginals_are_those_of_pyros_posterior():
    """guide_marginals of a low-rank guide equals the sqrt of the diagonal of the covariance of the
    distribution Pyro samples from (get_posterior), also after the factor has moved; at init the sds
    are ~init_scale. Power: the old formula sqrt(scale^2 + |W_i|^2) reads ~1 at init_scale 0.05."""
    from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
    from tests.test_identifiability import _model

    model = _model(PriorConfig(kind="normal"), PushConfig())
    guide = make_guide(model.prior, GuideConfig(kind="low_rank", rank=2, init_scale=0.05))
    auto = guide.auto
    guide_marginals(guide)  # builds the prototype
    with torch.no_grad():
        auto.cov_factor.mul_(3.0)
        auto.scale = auto.scale * torch.linspace(0.5, 2.0, auto.scale.numel())
    ref = auto.get_posterior().covariance_matrix.diagonal().sqrt()
    torch.testing.assert_close(guide_marginals(guide)[1], ref.float(), rtol=1e-5, atol=1e-7)
    fresh = make_guide(model.prior, GuideConfig(kind="low_rank", rank=2, init_scale=0.05))
    sd0 = guide_marginals(fresh)[1]
    assert 0.02 < float(sd0.mean()) < 0.1, sd0
    old = (fresh.auto.scale**2 + fresh.auto.cov_factor.pow(2).sum(-1)).sqrt().detach()
    assert float(old.mean()) > 0.3  # the formula this replaces: dominated by the unscaled factor


def test_fit_logs_guide_records_and_the_guide_only_phase_freezes_weights_and_push(tiny_llama_dir, corpus, tmp_path):
    """3 joint steps then 3 guide-only steps (LoRA weights): guide records at 0 and after every step
    with the guide's lr spent so far; in the guide-only phase the push and the LoRA adapters stay
    bit for bit while the guide moves; the report has the fitted section and the warning function
    answers with one line or None."""
    r = tiny_recipe(tiny_llama_dir, corpus, steps=3, guide_steps=3, weights="lora", checkpoint_every=3)
    t = r.train
    assert group_multiplier(t, 4, "push") == 0.0 and group_multiplier(t, 4, "guide") > 0
    run = fit(r, out=tmp_path / "run", progress=False)
    assert run.manifest["steps_done"] == 6
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    guide = [x for x in recs if x["type"] == "guide"]
    assert [x["step"] for x in guide] == [0, 1, 2, 3, 4, 5, 6]
    assert [x["phase"] for x in guide][-3:] == ["guide"] * 3
    for x in guide:
        assert x["lr_sum"] == pytest.approx(guide_lr_spent(t, x["step"]))
    assert guide[0]["loc_move"] == 0.0 and guide[0]["scale_ratio"] == pytest.approx(1.0)
    # a second run that stops after the joint phase: the same push and adapters as the full run
    r3 = tiny_recipe(tiny_llama_dir, corpus, steps=3, weights="lora", checkpoint_every=3)
    fit(r3, out=tmp_path / "run3", progress=False)
    p6, p3 = load_file(str(tmp_path / "run" / "push.safetensors")), load_file(str(tmp_path / "run3" / "push.safetensors"))
    for k in p3:
        assert torch.equal(p6[k], p3[k]), k
    g6, g3 = load_file(str(tmp_path / "run" / "guide.safetensors")), load_file(str(tmp_path / "run3" / "guide.safetensors"))
    assert any(not torch.equal(g6[k], g3[k]) for k in g3)
    a6, a3 = load_file(str(tmp_path / "run" / "adapter.safetensors")), load_file(str(tmp_path / "run3" / "adapter.safetensors"))
    assert a3
    for k in a3:
        assert torch.equal(a6[k], a3[k]), k
    w = fit_warning(tmp_path / "run")
    assert w is None or ("\n" not in w and w.startswith("warning:"))
    v = fit_verdict(tmp_path / "run")  # the demo's line: the warning's words, or "converged"
    assert v == (w.removeprefix("warning: ") if w else v) and (w or v.startswith("converged"))


def test_guide_push_steps_train_the_push_and_still_freeze_the_adapters(tiny_llama_dir, corpus, tmp_path):
    """train.guide_push_steps: in the guide-only phase's first N steps the push goes on (its splines and
    corrections differ from a run stopped after the joint phase), then stops; the LoRA adapters stay
    bit for bit; the multipliers say so (push on the phase's schedule over N steps, then 0; weights 0).
    Power: the same check with the push frozen is the test above, where the push files are equal."""
    r = tiny_recipe(tiny_llama_dir, corpus, steps=3, guide_steps=3, weights="lora", checkpoint_every=3,
                    guide_push_steps=2)
    t = r.train
    assert [group_multiplier(t, i, "push") for i in (3, 4, 5)] == [1.0, 1.0, 0.0]
    assert group_multiplier(t, 4, "weights") == 0.0
    with pytest.raises(ConfigError, match="train.guide_push_steps"):
        tiny_recipe(tiny_llama_dir, corpus, steps=3, guide_steps=3, guide_push_steps=-1)
    longer = tiny_recipe(tiny_llama_dir, corpus, steps=3, guide_steps=3, guide_push_steps=60).train  # the demo's
    assert [group_multiplier(longer, i, "push") for i in (3, 4, 5)] == [1.0, 1.0, 1.0]  # 60 on a 3-step phase: all 3
    fit(r, out=tmp_path / "run", progress=False)
    fit(tiny_recipe(tiny_llama_dir, corpus, steps=3, weights="lora", checkpoint_every=3), out=tmp_path / "run3",
        progress=False)
    p6, p3 = load_file(str(tmp_path / "run" / "push.safetensors")), load_file(str(tmp_path / "run3" / "push.safetensors"))
    assert any(not torch.equal(p6[k], p3[k]) for k in p3)
    a6, a3 = load_file(str(tmp_path / "run" / "adapter.safetensors")), load_file(str(tmp_path / "run3" / "adapter.safetensors"))
    for k in a3:
        assert torch.equal(a6[k], a3[k]), k


def test_guide_phase_has_its_own_lr_and_schedule():
    """train.guide_lr / train.guide_schedule set the guide's rate in the guide-only phase only: the joint
    phase keeps lr_guide on the recipe's schedule, the phase runs at guide_lr (constant: every step),
    the other groups stay at 0, and lr_sum counts what was spent. Defaults reproduce the old phase."""
    import dataclasses

    from ppn_bayes.config import TrainConfig

    base = TrainConfig(steps=10, guide_steps=10, lr_guide=0.05, schedule="cosine", warmup_steps=2)
    t = dataclasses.replace(base, guide_lr=0.2, guide_schedule="constant")
    for i in range(10):
        assert group_multiplier(t, i, "guide") == group_multiplier(base, i, "guide")
    assert [group_multiplier(t, i, "guide") for i in range(10, 20)] == [4.0] * 10
    assert group_multiplier(t, 15, "push") == 0.0
    assert guide_lr_spent(t, 20) == pytest.approx(guide_lr_spent(base, 10) + 10 * 0.2)
    assert group_multiplier(base, 10, "guide") == pytest.approx(1.0) and group_multiplier(base, 19, "guide") < 0.05


def test_scales_are_judged_by_their_rms_log_move_not_their_mean():
    """Half the sds shrinking while the other half grow leaves the mean log-sd almost still, so its
    net change is ~0 and any jitter read as a large share of it; scale_move (rms of the log ratios)
    sees the move. Here the sds travel out and stop (scale_move 0, 1, 1.5, 1.75, 1.76: flattened) while
    the mean log-sd jitters by 1e-3 around -3 (which would read 100 % and more). Power: the same
    scale_move still travelling (0, 1, 2, 3, 4) is not flattened. Runs that predate scale_move are
    judged on log_scale_mean as before."""
    recs = _records([0, 0, 0, 0, 0])
    for r, move, jitter in zip(recs, [0, 1, 1.5, 1.75, 1.76], [0, 1e-3, 2e-3, 1e-3, 3e-3]):
        r["scale_move"], r["log_scale_mean"] = move, -3.0 + jitter
    conv = guide_convergence(recs)
    assert conv["flattened"] and set(conv["relative_rate"]) == {"kl", "scale_move", "loc_move"}
    for r, move in zip(recs, [0, 1, 2, 3, 4]):
        r["scale_move"] = move
    assert not guide_convergence(recs)["flattened"] and guide_convergence(recs)["worst"] == "scale_move"
    old = [{k: v for k, v in r.items() if k != "scale_move"} for r in recs]
    assert set(guide_convergence(old)["relative_rate"]) == {"kl", "log_scale_mean", "loc_move"}
    assert not guide_convergence(old)["flattened"]  # the jittering mean log-sd, read as before
