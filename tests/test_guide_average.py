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


# ------------------------------------------------------------------ is the window stationary?


def _ar1(n: int, dim: int, phi: float, seed: int) -> torch.Tensor:
    """A stationary AR(1) sequence per column (unit marginal variance), started in its stationary law."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, dim, generator=g, dtype=torch.float64) * (1 - phi ** 2) ** 0.5
    x = torch.empty(n, dim, dtype=torch.float64)
    x[0] = torch.randn(dim, generator=g, dtype=torch.float64)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def test_window_stationarity_passes_stationary_noise_and_fails_drift():
    """The check against sequences whose answer is known (seeds 0-4, 30 marginals each).

    * A long stationary AR(1) window (2,000 iterates, phi 0.5: ~670 effective draws) is stationary:
      R-hat's sampling error there is ~0.01, so the worst of 30 stays under 1.1 (observed <= 1.01), and
      with the exported sd 10x the jitter the average is precise (MCSE ~ 1/sqrt(670)/10 < 0.01).
    * Power: the same noise plus a linear drift of 2 noise sds over the window fails everywhere: the
      four quarters' means sit at 0.25 / 0.75 / 1.25 / 1.75, between-quarter variance 0.42 against a
      within variance ~1, so R-hat ~ sqrt(1.42) = 1.19 per marginal (asserted >= 1.15, each of the 30
      above 1.1); ``drift`` reads the halves' shift (1 sd / 10 in exported-sd units ~ 0.1, against a
      stationary sd of sqrt(2 / 333) / 10 ~ 0.008 per marginal: the worst of 30 under 0.04 = 5 sds).
    * Power for precision: stationary but with the exported sd equal to the jitter (a width that is
      all optimizer noise) on a short window (45 iterates, ~15 effective) is not precise
      (MCSE ~ 1/sqrt(15) ~ 0.26 > 0.1).
    * The demo-like short window (45 iterates, phi 0.5) is *not shown* stationary in some seeds: the
      check errs toward not certifying (the docstring's warning), recorded here so that a change of
      that behaviour is seen.
    """
    from ppn_bayes.bayes.diagnostics import WINDOW_MCSE_TOL, WINDOW_RHAT_TOL, window_stationarity

    worst_short = []
    for seed in range(5):
        x = _ar1(2000, 30, 0.5, seed)
        sd = torch.full((30,), 10.0, dtype=torch.float64)
        ok = window_stationarity(x, 0.1 * x, sd)
        assert ok["rhat"] <= WINDOW_RHAT_TOL and ok["mcse_rel"] <= WINDOW_MCSE_TOL and ok["drift"] < 0.04, ok
        drifting = x + torch.linspace(0.0, 2.0, 2000, dtype=torch.float64)[:, None]
        bad = window_stationarity(drifting, 0.1 * x, sd)
        assert bad["rhat"] >= 1.15 and bad["rhat_over"] == 1.0 and bad["drift"] > 0.08, bad
        short = _ar1(45, 30, 0.5, seed)
        loose = window_stationarity(short, 0.1 * short, torch.ones(30, dtype=torch.float64))
        assert loose["mcse_rel"] > WINDOW_MCSE_TOL, loose
        worst_short.append(loose["rhat"])
    assert max(worst_short) > WINDOW_RHAT_TOL  # a short window cannot certify (conservative, by design)


def test_the_drift_is_bounded_when_the_width_is_the_windows_own():
    """With the window's own widened sds (sqrt(mean s^2 + var_t mu), what load_average exports) the
    drift is at most 2 on an even window and 2 sqrt(N/(N-1)) on an odd one (the diagnostics
    docstring's bound), for any sequence: checked on AR(1) noise plus trends of every steepness.
    Power (the bound is tight where the docstring says): two plateaus with a negligible within-sd
    read 2 on 44 iterates and, with the middle iterate half-way, 2 sqrt(45/44) on 45; a linear trend
    reads sqrt(3) within 3 %."""
    from ppn_bayes.bayes.diagnostics import window_stationarity

    def drift(loc, within=1e-6):
        sd = (within ** 2 + loc.var(0, unbiased=False)).sqrt()
        return window_stationarity(loc, torch.zeros_like(loc), sd)["drift"]

    for n in (44, 45):
        bound = 2.0 if n % 2 == 0 else 2 * (n / (n - 1)) ** 0.5
        for seed, slope in enumerate((0.0, 0.5, 3.0, 30.0, 300.0)):
            loc = _ar1(n, 20, 0.7, seed) + slope * torch.linspace(0, 1, n, dtype=torch.float64)[:, None]
            assert drift(loc, 0.01) <= bound + 1e-9, (n, slope)
        plateaus = torch.cat([torch.zeros(n // 2), torch.full((n % 2,), 0.5), torch.ones(n // 2)]).double()[:, None]
        plateaus = plateaus + 1e-9 * _ar1(n, 1, 0.0, 9)  # R-hat needs a marginal that moves within its halves
        assert drift(plateaus) == pytest.approx(bound, rel=1e-4), n
    line = torch.linspace(0, 1, 400, dtype=torch.float64)[:, None]
    assert drift(line) == pytest.approx(3 ** 0.5, rel=3e-2)


def test_window_stationarity_edge_cases():
    """Too short to judge (< WINDOW_MIN_ITERATES) is None; a marginal that never moved counts as
    stationary (its R-hat is undefined, NaN in arviz) and adds no Monte-Carlo error; no latents: None."""
    from ppn_bayes.bayes.diagnostics import WINDOW_MIN_ITERATES, window_stationarity

    x = _ar1(200, 3, 0.3, 0)
    assert window_stationarity(x[:WINDOW_MIN_ITERATES - 1], x[:WINDOW_MIN_ITERATES - 1], torch.ones(3)) is None
    assert window_stationarity(x[:, :0], x[:, :0], torch.ones(0)) is None
    frozen = torch.cat([x, torch.full((200, 1), 0.7, dtype=torch.float64)], 1)
    res = window_stationarity(frozen, torch.zeros_like(frozen), torch.full((4,), 5.0))
    assert res["rhat"] <= 1.1 and res["mcse_rel"] < 0.1 and all(v == v for v in res.values())


def test_the_verdict_of_an_averaged_run_is_its_windows(tmp_path):
    """guide_convergence: with a guide_average record carrying the window check, the verdict is the
    window's (stationary and precise), whatever the flattening rates say; the warning and the report
    name the R-hat and the drift. Power: the same records with a drifting window read not converged,
    and without the window numbers the flattening verdict rules as before."""
    from ppn_bayes.analysis.report import _fit_lines
    from ppn_bayes.bayes.guides import convergence_warning, guide_convergence

    travelling = [{"type": "guide", "step": 5 * i, "lr_sum": 0.5 * i, "kl": 10.0 - i, "scale_move": 0.1 * i,
                   "loc_move": 0.1 * i, "log_scale_mean": -3.0, "scale_ratio": 1.0, "scale_min": 0.04,
                   "scale_mean": 0.05, "scale_max": 0.06} for i in range(4)]  # constant rate: not flattened
    base = {"type": "guide_average", "step": 15, "steps": 45, "widening": 2.5, "loc_spread_rms": 0.1}
    still = base | {"window_rhat": 1.04, "window_rhat_loc": 1.04, "window_rhat_log_sd": 1.01, "window_rhat_over": 0.0,
                    "window_ess_min": 300.0, "window_mcse_rel": 0.04, "window_drift": 0.03, "window_iterates": 45.0}
    drifting = still | {"window_rhat": 3.1, "window_rhat_over": 1.0, "window_drift": 1.79}
    assert not guide_convergence(travelling)["converged"]
    conv = guide_convergence([*travelling, still])
    assert conv["converged"] and not conv["flattened"] and convergence_warning(conv) is None
    bad = guide_convergence([*travelling, drifting])
    assert not bad["converged"]
    warning = convergence_warning(bad)
    assert "R-hat up to 3.10" in warning and "1.79 posterior sds" in warning and "100%" in warning
    imprecise = guide_convergence([*travelling, still | {"window_mcse_rel": 0.3, "window_ess_min": 9.0}])
    assert not imprecise["converged"] and "imprecise" in convergence_warning(imprecise)
    lines = "\n".join(_fit_lines([*travelling, drifting]))
    assert "**not stationary**" in lines and "3.10" in lines
    assert "**stationary** and **precise**" in "\n".join(_fit_lines([*travelling, still]))


def test_after_calibrate_the_verdict_reads_the_rederived_window():
    """A posterior re-derived by ``ppn calibrate`` with a checked window is what the run exports, so the
    verdict reads that window (``_exported_records``), and the report says it is calibrate's. Power: the
    training's window drifts, so a verdict that still read it would say not converged; a calibration
    that did not re-derive (or re-derived without a checked window) leaves the training's verdict."""
    from ppn_bayes.analysis.report import _exported_records, _fit_lines
    from ppn_bayes.bayes.guides import guide_convergence

    guide = [{"type": "guide", "step": 5 * i, "lr_sum": 0.5 * i, "kl": 10.0 - i, "scale_move": 0.1 * i,
              "loc_move": 0.1 * i, "log_scale_mean": -3.0, "scale_ratio": 1.0, "scale_min": 0.04,
              "scale_mean": 0.05, "scale_max": 0.06} for i in range(4)]
    window = {"window_rhat": 3.1, "window_rhat_loc": 3.1, "window_rhat_log_sd": 1.2, "window_rhat_over": 1.0,
              "window_ess_min": 4.0, "window_mcse_rel": 0.9, "window_drift": 1.8, "window_iterates": 45.0}
    trained = [*guide, {"type": "guide_average", "step": 15, "steps": 45, "widening": 2.5, **window}]
    still = {"steps": 40, "widening": 1.3, "window_rhat": 1.03, "window_rhat_loc": 1.03, "window_rhat_log_sd": 1.0,
             "window_rhat_over": 0.0, "window_ess_min": 200.0, "window_mcse_rel": 0.05, "window_drift": 0.04,
             "window_iterates": 40.0}
    cal = {"method": "given", "beta": 0.5, "posterior": "rederived", "details": {"steps": 60, "average": still}}
    records = _exported_records({"calibration": cal}, trained)
    assert records[:-1] == trained and records[-1]["step"] == 15 + 60 and records[-1]["source"] == "ppn calibrate"
    conv = guide_convergence(records)
    assert conv["converged"] and conv["window"]["rhat"] == 1.03 and conv["window"]["steps"] == 40
    lines = "\n".join(_fit_lines(records))
    assert "`ppn calibrate`'s re-derivation" in lines and "**stationary** and **precise**" in lines
    assert not guide_convergence(trained)["converged"]
    for other in ({**cal, "posterior": "not rederived"}, {**cal, "details": {"steps": 60, "average": None}},
                  {**cal, "details": {"steps": 60, "average": {"steps": 3, "widening": 1.1}}}, "damaged", None,
                  {**cal, "details": {"steps": "60", "average": still | {"window_rhat": "1.0"}}}):
        assert _exported_records({"calibration": other}, trained) == trained
        assert not guide_convergence(_exported_records({"calibration": other}, trained))["converged"]
    assert "(train.guide_average_steps)" in "\n".join(_fit_lines(trained))


def test_the_window_check_reads_the_runs_own_iterates_and_survives_a_resume(tiny_llama_dir, corpus, tmp_path):
    """A window of 8 iterates (2 joint + 9 guide-only steps): the guide_average record's window_* numbers
    are window_stationarity of the iterates a callback records on the same run with averaging off
    (the trace is the iterates, in order), and a run interrupted inside the window and resumed writes
    the same numbers (the trace is in the checkpoint). Power: the same iterates shuffled in time read
    another R-hat and drift (a trace stored out of order would fail the equality), and a resume that
    lost the trace would have fewer than 8 rows (no numbers at all)."""
    from ppn_bayes.bayes.diagnostics import window_stationarity

    phase = {**PHASE, "guide_steps": 9, "guide_push_steps": 9}
    locs, sds = [], []

    def record(s, step):
        if step >= 4:  # the state after steps 4..10; the 11th is the run's last iterate
            loc, sd = guide_marginals(s.guide)
            locs.append(loc.double())
            sds.append(sd.double())

    off = fit(tiny_recipe(tiny_llama_dir, corpus, **phase), out=tmp_path / "off", progress=False, callbacks=[record])
    last = guide_marginals(off.posterior.guide)
    loc = torch.stack([*locs, last[0].double()])
    log_sd = torch.stack([*sds, last[1].double()]).log()
    r = tiny_recipe(tiny_llama_dir, corpus, **phase, guide_average_steps=8)
    on = fit(r, out=tmp_path / "on", progress=False)

    def numbers(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        (avg,) = [x for x in recs if x["type"] == "guide_average"]
        return {k.removeprefix("window_"): v for k, v in avg.items() if k.startswith("window_")}

    got = numbers(on.path)
    want = window_stationarity(loc, log_sd, guide_marginals(on.posterior.guide)[1].double())
    assert loc.shape[0] == 8 and set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = window_stationarity(loc[perm], log_sd[perm], guide_marginals(on.posterior.guide)[1].double())
    assert shuffled["rhat"] != pytest.approx(got["rhat"], rel=1e-2) and shuffled["drift"] != pytest.approx(got["drift"], rel=1e-2)

    def stop(s, step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(r, out=tmp_path / "cut", progress=False, callbacks=[stop])
    fit(None, out=tmp_path / "cut", resume=True, progress=False)
    assert numbers(tmp_path / "cut") == got


def test_the_score_space_window_check_reads_the_runs_trace(tiny_llama_dir, corpus, tmp_path):
    """benchmarks/window_scores.py: its raw check is the run's own guide_average record (the trace read
    in guide_marginals' flat order, against the exported sds), its score check runs on every iterate,
    and its exported score sds are those of the run's posterior as loaded. Power: a trace read from
    the wrong rows or out of order would change the raw numbers (a shuffled trace reads another R-hat:
    test_the_window_check_reads_the_runs_own_iterates_and_survives_a_resume)."""
    import importlib.util
    from pathlib import Path

    from ppn_bayes.bayes.posterior import Posterior

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("window_scores", root / "benchmarks" / "window_scores.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    phase = PHASE | {"guide_steps": 9, "guide_push_steps": 9}
    run = fit(tiny_recipe(tiny_llama_dir, corpus, **phase, guide_average_steps=8), out=tmp_path / "run", progress=False)
    (rec,) = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"guide_average"' in x]
    out = bench.window_in_scores(run.path, draws=64)
    assert out["iterates"] == 8
    for k in ("rhat", "drift", "mcse_rel", "ess_min"):
        assert out["raw"][k] == pytest.approx(rec[f"window_{k}"], rel=1e-3, abs=1e-5), k
    assert set(out["scores"]) == set(out["raw"]) and all(v == v for v in out["scores"].values())
    assert "e_layers" in out["per_site"]
    sd = bench._layer_scores(Posterior.from_dir(run.path), 64, 0)[1]
    assert out["score_sd_exported_mean"] == pytest.approx(float(sd.mean()), rel=1e-6)
