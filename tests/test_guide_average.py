"""train.guide_average_steps: the exported guide and push are the window's average iterate, the
guide's sds widened by the spread of its means (training/averaging.py), checked against a run with
averaging off, which trains identically (averaging only reads the iterates) and whose iterates a
callback records; resume inside the window replays an uninterrupted run; the key is validated."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ppn_bayes.bayes.guides import guide_marginals, make_guide, set_marginal_sds
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
from ppn_bayes.errors import ConfigError
from ppn_bayes.run import fit
from tests.test_train import tiny_recipe

PHASE = {"steps": 2, "guide_steps": 4, "guide_push_steps": 4, "guide_schedule": "constant", "guide_lr": 0.2,
         "checkpoint_every": 1}


@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_set_marginal_sds_round_trips_through_guide_marginals(kind):
    """set_marginal_sds is guide_marginals' inverse for the sds (low rank: through scale * sqrt(1+|W|^2)),
    in place (the optimizer's parameter objects stay), and leaves the means alone."""
    from tests.test_identifiability import _model

    model = _model(PriorConfig(kind="horseshoe"), PushConfig())
    guide = make_guide(model.prior, GuideConfig(kind=kind, rank=2, init_scale=0.05))
    if kind == "low_rank":
        with torch.no_grad():
            guide.auto.cov_factor.mul_(3.0)
    before = {n: p for n, p in guide.named_parameters()}
    loc0, sd0 = guide_marginals(guide)
    want = torch.linspace(0.01, 0.7, sd0.numel())
    set_marginal_sds(guide, want)
    loc1, sd1 = guide_marginals(guide)
    torch.testing.assert_close(sd1, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(loc0, loc1)
    assert all(p is before[n] for n, p in guide.named_parameters())
    with pytest.raises(ValueError, match="latent dimensions"):
        set_marginal_sds(guide, want[:-1])


def test_the_export_is_the_window_average_with_sds_widened_by_the_means_spread(tiny_llama_dir, corpus, tmp_path):
    """Window of the last 3 steps (of 2 joint + 4 guide-only): the exported guide means and push tensors
    are the mean of the iterates after steps 4, 5, 6 of the same run with averaging off, and the sds
    are sqrt(mean sd^2 + var of the means). Power: the means do move over the window, so the widened
    sds differ from the unwidened sqrt(mean sd^2) and the average from the last iterate."""
    iterates: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def record(s, step):  # called before step `step`: the state after `step` steps
        loc, sd = guide_marginals(s.guide)
        push = {f"push.{k}": v.detach().clone() for k, v in s.ppn.push.state_dict().items() if not k.startswith("cost_")}
        push["prior.level"] = s.ppn.prior.level.detach().clone()
        iterates.append((loc.double(), sd.double(), push))

    off = fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE), out=tmp_path / "off", progress=False, callbacks=[record])
    last = guide_marginals(off.posterior.guide)
    last_push = load_file(str(off.path / "push.safetensors"))
    window = iterates[4:6] + [(last[0].double(), last[1].double(), last_push)]  # after steps 4, 5 and 6

    on = fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=3), out=tmp_path / "on", progress=False)
    loc, sd = guide_marginals(on.posterior.guide)
    locs = torch.stack([w[0] for w in window])
    within = torch.stack([w[1] for w in window]).pow(2).mean(0)
    spread = locs.var(0, unbiased=False)
    torch.testing.assert_close(loc.double(), locs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sd.double(), (within + spread).sqrt(), rtol=1e-4, atol=1e-6)
    push = load_file(str(on.path / "push.safetensors"))
    for k, v in push.items():
        torch.testing.assert_close(v.double(), torch.stack([w[2][k].double().to(v.device) for w in window]).mean(0),
                                   rtol=1e-5, atol=1e-6)
    # power: the window moved, so the average is not the last iterate and the widening is not nothing
    assert float(spread.max()) > 1e-8
    assert not torch.allclose(sd.double(), within.sqrt(), rtol=1e-3)
    assert not torch.allclose(loc.double(), last[0].double(), rtol=1e-4)
    recs = [json.loads(x) for x in (on.path / "metrics.jsonl").read_text().splitlines()]
    avg = [r for r in recs if r["type"] == "guide_average"]
    assert len(avg) == 1 and avg[0]["step"] == 6 and avg[0]["steps"] == 3 and avg[0]["widening"] > 1.0
    # the training itself is the same with averaging on: the train records agree
    assert [r["token_loss"] for r in recs if r["type"] == "train"] == [r["token_loss"] for r in off.train_metrics()]


def test_resume_inside_the_window_replays_an_uninterrupted_run(tiny_llama_dir, corpus, tmp_path):
    """Interrupted after step 5 (two iterates summed), resumed from that checkpoint: the exported guide
    and push equal the uninterrupted run's bit for bit (the running sums are in the checkpoint)."""
    r = tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=3)
    whole = fit(r, out=tmp_path / "whole", progress=False)

    def stop(s, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(r, out=tmp_path / "cut", progress=False, callbacks=[stop])
    resumed = fit(None, out=tmp_path / "cut", resume=True, progress=False)
    for name in ("guide.safetensors", "push.safetensors"):
        a, b = load_file(str(whole.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_guide_average_steps_is_validated_and_capped_at_the_phase(tiny_llama_dir, corpus):
    """0 or >= 2; a window longer than the guide-only phase is the phase (the demo's 45 under
    `--set train.guide_steps=2`), and one that leaves a single iterate is off."""
    from ppn_bayes.training.averaging import window_start, window_steps

    for bad in (1, -1):
        with pytest.raises(ConfigError, match="train.guide_average_steps"):
            tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=bad)
    t = tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=45).train
    assert window_steps(t) == 4 and window_start(t) == 2  # the whole 4-step phase after 2 joint steps
    assert window_steps(tiny_recipe(tiny_llama_dir, corpus, **{**PHASE, "guide_steps": 1}, guide_average_steps=45).train) == 0
    assert window_steps(tiny_recipe(tiny_llama_dir, corpus, **{**PHASE, "guide_steps": 0}, guide_average_steps=45).train) == 0


def test_report_says_the_probabilities_include_the_optimizers_spread():
    """The report's fitted section names the window and the widening when the run averaged, and says
    nothing of it when it did not (power: the same records without the guide_average one)."""
    from ppn_bayes.analysis.report import _fit_lines

    recs = [{"type": "guide", "step": 5 * i, "lr_sum": 0.5 * i, "kl": 10.0 - i, "scale_move": 0.1 * i, "loc_move": 0.1 * i,
             "log_scale_mean": -3.0, "scale_ratio": 1.0, "scale_min": 0.04, "scale_mean": 0.05, "scale_max": 0.06}
            for i in range(4)]
    avg = {"type": "guide_average", "step": 15, "steps": 45, "widening": 2.5, "loc_spread_rms": 0.1}
    with_avg, without = "\n".join(_fit_lines([*recs, avg])), "\n".join(_fit_lines(recs))
    assert "average of the last 45 iterates" in with_avg and "2.50x" in with_avg and "optimizer's noise" in with_avg
    assert "iterates" not in without


def test_a_finished_run_resumed_for_more_steps_averages_its_new_window_only(tiny_llama_dir, corpus, tmp_path):
    """A finished 2 + 4 run resumed with guide_steps 8: the old window's sums are dropped and the export
    is the mean of the iterates after steps 8, 9, 10, read from a copy resumed with averaging off (same
    checkpoint, same noise, so the same trajectory) and a callback; turning averaging on when resuming a
    run that had none works; a window moved under iterates already summed is refused. Power: keeping
    the old window's sums would add three more iterates to the new window's (checked: it moves the mean)."""
    import shutil

    from ppn_bayes.errors import RunError
    from ppn_bayes.training import checkpoint_files

    out = tmp_path / "run"
    fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=3), out=out, progress=False)
    old = checkpoint_files.load_checkpoint(checkpoint_files.find_checkpoint(out))["tensors"]
    shutil.copytree(out, tmp_path / "off")
    locs: list[torch.Tensor] = []
    off = fit(tiny_recipe(tiny_llama_dir, corpus, **{**PHASE, "guide_steps": 8}), out=tmp_path / "off", resume=True,
              progress=False, callbacks=[lambda s, step: locs.append(guide_marginals(s.guide)[0].double())])
    window = torch.stack([locs[2], locs[3], guide_marginals(off.posterior.guide)[0].double()])  # after 8, 9, 10
    longer = fit(tiny_recipe(tiny_llama_dir, corpus, **{**PHASE, "guide_steps": 8}, guide_average_steps=3), out=out,
                 resume=True, progress=False)
    recs = [json.loads(x) for x in (longer.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "guide_average"] == [6, 10]
    ckpt = checkpoint_files.load_checkpoint(checkpoint_files.find_checkpoint(out))["tensors"]
    assert int(ckpt["average.window_start"][0]) == 7
    torch.testing.assert_close(guide_marginals(longer.posterior.guide)[0].double(), window.mean(0), rtol=1e-5, atol=1e-6)
    kept_old = (ckpt["average.loc_sum"] + old["average.loc_sum"]) / 6  # what keeping the old sums would export
    assert not torch.allclose(kept_old, window.mean(0), rtol=1e-3, atol=1e-4)
    plain = tmp_path / "plain"
    fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE), out=plain, progress=False)
    fit(tiny_recipe(tiny_llama_dir, corpus, **{**PHASE, "guide_steps": 8}, guide_average_steps=3), out=plain,
        resume=True, progress=False)  # averaging turned on for the new steps: no sums in the old checkpoint
    cut = tmp_path / "cut"

    def stop(s, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=3), out=cut, progress=False,
            callbacks=[stop])
    with pytest.raises(RunError, match="its sums are of another window"):
        fit(tiny_recipe(tiny_llama_dir, corpus, **PHASE, guide_average_steps=4), out=cut, resume=True, progress=False)
