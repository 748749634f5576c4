"""``ppn report``: a Markdown report a user can act on without reading anything else.

It answers, in this order: what the run is, and whether its posterior is calibrated; which layers
and heads the push removes first (the priority order every keep-set is a prefix of); which keep
decisions the posterior is unsure about (boundary units per size, probability that a posterior draw
gives the reported keep-set); a per-size table (lambda*, achieved vs requested size in params and
FLOPs); optionally the held-out loss of each keep-set with a credible band; the arviz summary and
PSIS k-hat when :mod:`ppn_bayes.bayes.diagnostics` and :mod:`ppn_bayes.bayes.psis` are available; plots.

**Saying how sure it is, truthfully** (issue 12). The inclusion probabilities pi are shares of
posterior draws, so they mean "the chance another fit keeps the unit" only if the posterior's width
is right. The learning rate ``beta`` (``train.tempering``, the weight of the token likelihood) sets
that width; at the default ``beta = 1`` per token every token counts as independent evidence and pi
is far too sure (issue 12: five seeds keep layer sets with Jaccard 0.42 while reporting P = 1.00).
So the report labels pi **calibrated** only when the run's manifest records a calibration
(``manifest["calibration"]``, written by ``ppn calibrate RUN``) whose ``beta`` was estimated (not given
by hand with ``--beta``) and whose posterior was re-derived at it, and says how it was re-derived
(steps, rate, the averaged window); otherwise **not calibrated**, with the reason, in one line
(:func:`calibration_line`).

**Credible band of the held-out loss** (``band_samples`` > 0, ``ppn report --band K``; it loads the
model, so it is off by default): at each size, the held-out NLL of the reported keep-set on the run's
first ``band_blocks`` validation blocks, and the 5-95 % band of the NLL of ``K`` sampled
sub-networks at the same size (each posterior draw's own keep-set, same rule and budget:
:func:`ppn_bayes.analysis.uncertainty.evaluate_keepset`, the code behind ``ppn keepset --eval``). Alongside it, ``keepsets.json`` (every
size's keep-set with per-unit probabilities) and ``posterior.nc`` (arviz NetCDF). All files are
written atomically into the run directory (or ``out``).

Where a report may go: into its own run directory (the default; a new report replaces the old one,
it is derived from the run), or into a directory of its own. Never into another run (it would
replace that run's report), never into a directory holding files the report does not write, and
over an earlier report elsewhere only with ``overwrite`` (``ppn report --force``). The report is
written under the output's writer lock, the same lock ``ppn fit`` holds on its run directory, so a
report is not written into a run that is still being trained (:mod:`ppn_bayes.files`).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.analysis import plots
from ppn_bayes.analysis.calibration import GIVEN
from ppn_bayes.analysis.uncertainty import evaluate_keepset, run_test_blocks
from ppn_bayes.bayes import diagnostics as diag
from ppn_bayes.bayes.guides import convergence_warning, guide_convergence, not_converged_text
from ppn_bayes.bayes.keepsets import KeepsetResult, KeepsetSolver, check_quantile
from ppn_bayes.bayes.psis import khat_reading
from ppn_bayes.bayes.unit_table import parse_target
from ppn_bayes.errors import ConfigError, OutputError, RunError
from ppn_bayes.files import (
    atomic_write_bytes,
    check_no_overlap,
    check_owned,
    check_writable,
    real,
    writer_lock,
)
from ppn_bayes.training.rundir import MANIFEST, RunDir, open_run, read_json, read_metrics

#: What a report writes into its directory.
REPORT_ENTRIES = ("report.md", "keepsets.json", "posterior.nc", "plots")


def _exit_text(x: float) -> str:
    """An exit coordinate as the price at which the unit leaves."""
    if x <= 0:
        return "already out at λ = 0"
    if x >= 1:
        return "never (beyond the trained range)"
    return f"λ ≈ {x / (1 - x):.3g}"


def keepset_text(r: KeepsetResult) -> str:
    """A short human-readable summary of one keep-set (``ppn keepset`` without ``--json``)."""
    k, a = r.keep, r.achieved
    lines = [
        f"requested {r.target.kind} {r.target.value:g}: {r.requested_size:.4f} of decoder {r.target.currency}",
        (f"achieved  {r.achieved_size:.4f} ({a['params']:.0f} params = {a['params_fraction']:.4f}; "
        f"{a['flops']:.0f} FLOPs/token = {a['flops_fraction']:.4f}; {int(a['layers'])} layers)"),
        (f"lambda* {r.lam:.4g}{' (saturated)' if r.lambda_saturated else ''}, expected size there "
        f"{r.expected_size_at_lambda:.4f}; quantile {r.quantile}, {r.num_draws} draws"),
        f"kept: {len(k.layers)} layers, {len(k.heads)} heads, {len(k.groups)} channel groups",
        f"P(a posterior draw gives this keep-set) = {r.p_equal:.3f}; {len(r.boundary)} boundary units",
    ]
    for b in r.boundary[:10]:
        lines.append(f"  {b['unit']:<14} pi = {b['pi']:.2f} ({'kept' if b['kept'] else 'dropped'})")
    if r.eval:
        e = r.eval
        lines.append(f"held-out NLL {e['nll']:.4f} (ppl {e['ppl']:.2f}); sampled keep-sets 90 % band "
                     f"[{e['nll_q05']:.4f}, {e['nll_q95']:.4f}]")
    return "\n".join(lines)


def removal_order(result: KeepsetResult, kind: str, limit: int | None = None) -> list[tuple[str, float]]:
    """Units of one kind in the order the push removes them (first to go first), with exit coords."""
    table = result.table
    prio = table.flatten(result.priority)
    kid = ("layers", "heads", "groups").index(kind)
    idx = (table.kind_id == kid).nonzero().flatten()
    idx = idx[torch.argsort(prio[idx], stable=True)]
    out = [(table.unit_name(int(u)), float(prio[u])) for u in idx]
    return out[:limit] if limit else out


SUMMARY_SITES = ("score_layers", "tau0", "global_scale", "caux", "lam_layers", "sig_heads", "sig_groups")


def _diagnostics(posterior, num_draws: int, seed: int, out: Path, manifest: dict, metrics: list[dict]
                 ) -> tuple[list[str], Path | None]:
    """Markdown lines for the arviz summary and PSIS, and the NetCDF path (None when unavailable).

    The table shows the layer scores and the shrinkage scales (a few dozen rows); every latent,
    heads and groups included, is in the NetCDF. PSIS needs the model and a held-out batch, so the
    report shows a k-hat the run recorded (manifest ``psis`` or a metrics record with ``khat``).
    """

    lines: list[str] = []
    nc = None
    try:
        idata = diag.to_inference_data(posterior, num_draws=num_draws, seed=seed)
        nc = diag.save_netcdf(idata, out / "posterior.nc")
        names = [v for v in SUMMARY_SITES if v in idata.posterior.data_vars]
        summary = diag.summary(idata, var_names=names or None)
        table = summary.to_markdown() if _has_tabulate() else "```\n" + summary.to_string() + "\n```"
        lines += [("Posterior summary of the layer scores and shrinkage scales (arviz; one chain of SVI draws, "
                  "so R-hat is undefined and shown as NaN):"), "", table, ""]
    except Exception as err:  # noqa: BLE001 - diagnostics must not cost the user the rest of the report
        lines.append(f"_arviz summary unavailable: {type(err).__name__}: {str(err).splitlines()[0][:200]}_")
    psis = manifest.get("psis") or next((m for m in reversed(metrics) if "khat" in m), None)
    if psis and psis.get("khat") is not None:
        k = float(psis["khat"])
        reading = khat_reading(k)
        lines.append(f"PSIS k-hat of the variational approximation: **{k:.3f}** ({reading}; k < 0.5 good, "
                     "0.5-0.7 questionable, > 0.7 bad).")
    else:
        lines.append("PSIS k-hat: not recorded by this run (it needs the model and a held-out batch: "
                     "`ppn_bayes.bayes.psis.psis_khat`, see notebooks/02_posterior_diagnostics.ipynb).")
    return lines, nc


def _has_tabulate() -> bool:
    return importlib.util.find_spec("tabulate") is not None


def _run_facts(run_dir: Path) -> tuple[dict, list[dict]]:
    """(manifest, metrics) when the directory is a full run; empty when it only holds a posterior.
    Both are validated (:mod:`ppn_bayes.run`'s schemas): a damaged file is a one-line RunError before
    anything is written."""

    manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else {}
    return manifest, read_metrics(run_dir)


def check_report_out(run_dir: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse a report output that would replace another run's files or a user's (module docstring)."""
    check_writable(out)
    if real(out) == real(run_dir):
        return
    check_no_overlap(out, [("run directory", run_dir)], writes=REPORT_ENTRIES)
    own = real(run_dir)
    for where in (real(out), *real(out).parents):
        if where == own:
            break  # inside its own run: a directory of its own there is fine
        if (where / "manifest.json").is_file():
            what = "is another run" if where == real(out) else f"lies inside another run ({where})"
            raise OutputError(f"--out {out} {what}; a report goes into its own run directory or a directory "
                              "of its own; choose another --out")
    if check_owned(out, REPORT_ENTRIES, "ppn report") and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} already holds a report; pass --force to replace it, or choose another --out")


def _rederived_how(cal: dict) -> str:
    """How ``ppn calibrate`` re-derived the posterior (its ``details``), as a parenthesis; empty when
    the record predates these keys."""
    d = cal.get("details") if isinstance(cal.get("details"), dict) else {}
    steps, avg = d.get("steps"), d.get("average")
    if not isinstance(steps, int):
        return ""
    if isinstance(avg, dict) and isinstance(avg.get("steps"), int) and isinstance(avg.get("widening"), (int, float)):
        return (f" ({steps} guide-only steps at a {d.get('schedule', 'constant')} rate, the last {avg['steps']} "
                f"averaged and their sds widened {avg['widening']:.2f}x by the means' spread)")
    rate = f", {d['schedule']} rate" if isinstance(d.get("schedule"), str) else ""
    return f" ({steps} guide-only steps{rate}, last iterate)"


def calibration_line(manifest: dict) -> tuple[bool, str]:
    """``(calibrated, one line)``: how the posterior's learning rate ``beta`` was obtained, from
    ``manifest["calibration"]`` (``{"method", "beta", "unit", "n_units", "trained_with_beta",
    "posterior": "rederived" | "not rederived", "details"}``, written by ``ppn calibrate``), or why
    the inclusion probabilities are not calibrated (module docstring)."""
    cal = manifest.get("calibration")
    trained = manifest.get("tempering", (manifest.get("recipe") or {}).get("train", {}).get("tempering", 1.0))
    trained = float(trained) if isinstance(trained, (int, float)) and not isinstance(trained, bool) else 1.0
    if not isinstance(cal, dict) or not isinstance(cal.get("beta"), (int, float)):
        why = ("every training token counted as independent evidence, so π is likely too sure" if trained == 1.0
               else "set by hand, not estimated")
        return False, (f"not calibrated: beta = {trained:g} per token assumed (train.tempering; {why}); "
                       "run `ppn calibrate RUN`")
    if cal.get("method") == GIVEN:  # `ppn calibrate --beta B`: a value by hand is not a calibration
        done = ("the posterior was re-derived at it" + _rederived_how(cal) if cal.get("posterior") == "rederived"
                else "the posterior was not re-derived at it")
        return False, (f"not calibrated: beta = {cal['beta']:.4g} given by hand (`ppn calibrate --beta`), not "
                       f"estimated; {done}; run `ppn calibrate RUN` without --beta to estimate it")
    unit = str(cal.get("unit", "units"))
    n = cal.get("n_units")
    was = cal.get("trained_with_beta", trained)
    how = (f"beta = {cal['beta']:.4g} (the token likelihood's weight) estimated by "
           f"{cal.get('method', 'an unnamed method')} with {n if n is not None else 'an unrecorded number of'} {unit} "
           f"as the independent units of data; trained with beta = {was:g}" if isinstance(was, (int, float))
           else f"beta = {cal['beta']:.4g} estimated by {cal.get('method', 'an unnamed method')}")
    if cal.get("posterior") == "rederived":
        return True, f"calibrated: {how}; the posterior was re-derived at the calibrated beta{_rederived_how(cal)}"
    return False, (f"not calibrated: {how}, but the posterior was not re-derived at it, so π still reflects the "
                   "trained beta; run `ppn calibrate RUN` to re-derive it")


def fit_warning(run: Any) -> str | None:
    """The one-line warning when the run's score posterior has not flattened (guides.guide_convergence),
    or ``None`` (converged, or a run without guide records to judge)."""

    return convergence_warning(_fit_convergence(run))


def fit_verdict(run: Any) -> str:
    """One line on whether the score posterior has converged, for a summary that always says something:
    the :func:`fit_warning` text (less its ``warning:``), "converged", or why it cannot be judged."""
    conv = _fit_convergence(run)
    if conv is None:
        return "not judged: too few guide records (fewer than three; a longer run logs more)"
    if conv["converged"] and "window" in conv:
        return ("converged (the averaging window is stationary and its average precise; report.md, "
                "\"Is the posterior fitted?\")")
    if conv["converged"]:
        return "converged (the guide's fit flattened; report.md, \"Is the posterior fitted?\")"
    return not_converged_text(conv)


def _fit_convergence(run: Any) -> dict[str, Any] | None:
    """``guides.guide_convergence`` of a run (object or directory) on :func:`_exported_records`."""
    manifest, metrics = _run_facts(Path(getattr(run, "path", run)))
    return guide_convergence(_exported_records(manifest, metrics))


def _exported_records(manifest: dict, metrics: list[dict]) -> list[dict]:
    """The run's metrics, plus ``ppn calibrate``'s checked window (``calibration.details.average``) as the
    newest ``guide_average`` record when it re-derived the posterior (what the run exports now)."""
    cal = manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else {}
    d, avg = (cal["details"], cal["details"].get("average")) if isinstance(cal.get("details"), dict) else ({}, None)
    if cal.get("posterior") != "rederived" or not isinstance(avg, dict) or not isinstance(avg.get("window_rhat"), float):
        return metrics  # not re-derived, no checked window, or a damaged record: the training's verdict
    last = max((m["step"] for m in metrics if isinstance(m.get("step"), int)), default=0) + (
        d["steps"] if isinstance(d.get("steps"), int) else 1)
    return [*metrics, avg | {"type": "guide_average", "step": last, "source": "ppn calibrate"}]


def _fit_lines(metrics: list[dict]) -> list[str]:
    """The report's "Is the posterior fitted?" section."""

    recs = [m for m in metrics if m.get("type") == "guide"]
    if not recs:
        return ["_This run logged no guide records (it predates them, or it has no latent scores)._", ""]
    last = recs[-1]
    lines = [(f"After {last['step']} steps the guide's marginal sds (unconstrained space) are "
              f"{last['scale_min']:.3g}-{last['scale_max']:.3g} (mean {last['scale_mean']:.3g}), "
              f"**{last['scale_ratio']:.2f}x** their initial values; its means moved by {last['loc_move']:.3g} "
              f"(rms) from their start; KL(q || prior) = {last['kl']:.4g} nats (start {recs[0]['kl']:.4g})."), ""]
    conv = guide_convergence(metrics)
    if conv is None:
        lines.append("Too few guide records (fewer than three) to judge whether the fit flattened.")
    else:
        rates = ", ".join(f"{k} {v:.0%}" for k, v in conv["relative_rate"].items())
        verdict = "**flattened**" if conv["flattened"] else "**not flattened**"
        lines.append(f"Between steps {conv['steps'][1]} and {conv['steps'][2]} the guide moved at {rates} of its "
                     f"average rate per unit of learning rate (flattened when all <= {conv['tol']:.0%}): {verdict}.")
        warning = convergence_warning(conv)
        if warning:
            lines += ["", f"> {warning}"]
    avg = [m for m in metrics if m.get("type") == "guide_average"]
    if avg:
        a = avg[-1]
        where = "of `ppn calibrate`'s re-derivation" if a.get("source") == "ppn calibrate" else "(train.guide_average_steps)"
        lines += ["", (f"The exported posterior is the average of the last {a['steps']} iterates {where}, "
                       f"its sds widened by the spread of the means there ({a['widening']:.2f}x, geometric mean): the "
                       "inclusion probabilities cover where the optimizer's noise could have left the fit, not the data "
                       "alone (docs/training.md, \"Iterate averaging\").")]
        win = conv.get("window") if conv else None
        if win is not None:
            verdict = ("**stationary**" if win["stationary"] else "**not stationary**") + " and " + (
                "**precise**" if win["precise"] else "**not precise**")
            lines += ["", (f"Is that window the optimizer's stationary noise, or the fit still travelling? Over its "
                           f"{win['steps']} iterates the split R-hat of the guide's marginals is at most {win['rhat']:.2f} "
                           f"({win['rhat_over']:.0%} above {win['rhat_tol']}); a mean moved up to {win['drift']:.2f} "
                           f"posterior sds between the window's halves; the average's Monte-Carlo error is at most "
                           f"{win['mcse_rel']:.2f} posterior sds (<= {win['mcse_tol']} wanted; {win['ess_min']:.0f} "
                           f"effective iterates at the fewest): {verdict} (Dhaka et al. 2020; docs/training.md, "
                           "\"Iterate averaging\"). This verdict, not the flattening above, says whether the "
                           "exported posterior converged.")]
    return lines + [""]


def check_band(band_samples: int, band_blocks: int, num_draws: int) -> None:
    """Eager checks of the credible-band options (one-line ConfigError)."""

    if isinstance(band_samples, bool) or not isinstance(band_samples, int) or band_samples < 0:
        raise ConfigError(f"--band must be a whole number of sampled sub-networks >= 0 (0 = no band), got {band_samples!r}")
    if band_samples > num_draws:
        raise ConfigError(f"--band {band_samples} exceeds the {num_draws} posterior draws; pass --draws {band_samples} "
                          "or more, or a smaller --band")
    if band_samples and (isinstance(band_blocks, bool) or not isinstance(band_blocks, int) or band_blocks < 1):
        raise ConfigError(f"--band-blocks must be a whole number >= 1, got {band_blocks!r}")


def write_report(run: Any, sizes: Sequence[float] = (0.25, 0.5, 0.75), num_draws: int = 256, quantile: float = 0.5,
                 seed: int = 0, out: str | Path | None = None, overwrite: bool = False, band_samples: int = 0,
                 band_blocks: int = 4, device: str = "cpu") -> Path:
    """Write ``report.md``, ``keepsets.json``, the plots (``plots/``) and ``posterior.nc``; return the report path.

    ``out``: the run directory by default; elsewhere, an earlier report there is replaced only with
    ``overwrite`` (see the module docstring). A report that fails half-way into a new ``out``
    removes it again. ``band_samples`` > 0 adds each keep-set's held-out NLL on ``band_blocks``
    validation blocks with the 5-95 % band over that many sampled sub-networks (loads the model on
    ``device``; needs a full run directory).
    """

    check_band(band_samples, band_blocks, num_draws)
    run_dir = Path(getattr(run, "path", run))
    if band_samples and not isinstance(run, RunDir) and not (run_dir / MANIFEST).is_file():
        raise RunError(f"{run_dir} holds a posterior but no run (manifest.json, weights), so a held-out band "
                       "cannot be computed; pass a run directory written by `ppn fit`, or drop --band")
    if isinstance(run, RunDir):
        run.check()
    elif not hasattr(run, "posterior") and (run_dir / MANIFEST).is_file():
        run = open_run(run_dir)  # a full run: every file checked, as a whole, before anything is written
    out = Path(out) if out is not None else run_dir
    check_report_out(run_dir, out, overwrite)
    with writer_lock(out, "ppn report"):
        check_report_out(run_dir, out, overwrite)  # again, now that no other writer can change it
        created = not os.path.lexists(out)
        try:
            return _write_report(run, run_dir, out, sizes, num_draws, quantile, seed, band_samples, band_blocks,
                                 device)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _write_report(run: Any, run_dir: Path, out: Path, sizes: Sequence[float], num_draws: int, quantile: float,
                  seed: int, band_samples: int = 0, band_blocks: int = 4, device: str = "cpu") -> Path:

    solver = KeepsetSolver(run_dir if not hasattr(run, "posterior") else run.posterior, num_draws, seed)
    for s in sizes:  # every size and the quantile before the draws, which the first solve takes
        parse_target(solver.inventory, size=s)
    check_quantile(quantile)
    results = [solver.solve(size=s, quantile=quantile) for s in sorted(sizes)]
    inv, post = solver.inventory, solver.posterior
    manifest, metrics = _run_facts(run_dir)
    if band_samples:

        gated = run.load_model(device)
        blocks = run_test_blocks(run, band_blocks, split="validation")
        for r in results:
            r.eval = {"split": "validation", **evaluate_keepset(gated, r, blocks, band_samples)}

    figs = out / "plots"
    made: list[tuple[str, Path]] = []
    if metrics:
        made.append(("Training traces", plots.plot_traces(metrics, figs / "traces")[0]))
    if "layers" in solver.scores:
        mid = results[len(results) // 2]
        made.append(("Layer scores", plots.plot_layer_forest(solver.scores["layers"], figs / "layer_forest",
                                                              post.thresholds(mid.lam)["layers"], mid.lam)[0]))
    if "heads" in solver.scores:
        made.append(("Head scores", plots.plot_unit_heatmaps(solver.scores["heads"], figs / "head_heatmaps", "head")[0]))
    if "groups" in solver.scores:
        made.append(("Channel-group scores", plots.plot_unit_heatmaps(solver.scores["groups"], figs / "group_heatmaps",
                                                                      "channel group")[0]))
    made.append(("Keep-sets across sizes", plots.plot_puppet(results, figs / "puppet")[0]))
    ppl = [{"size": r.requested_size, "ppl": r.eval["ppl"], "ppl_lo": r.eval["ppl_q05"], "ppl_hi": r.eval["ppl_q95"]}
           for r in results if r.eval]
    if ppl:
        made.append(("Perplexity vs size", plots.plot_perplexity_vs_size(ppl, figs / "perplexity_vs_size")[0]))

    diag_lines, nc = _diagnostics(post, min(num_draws, 256), seed, out, manifest, metrics)
    atomic_write_bytes(out / "keepsets.json", json.dumps({
        "quantile": quantile, "draws": num_draws, "seed": seed,
        "keepsets": [r.to_dict() for r in results]}, indent=1).encode())
    md = _markdown(run_dir, inv, manifest, metrics, results, diag_lines, nc, made, out, quantile, num_draws,
                   band_samples)
    path = out / "report.md"
    atomic_write_bytes(path, md.encode())
    return path


def _markdown(run_dir: Path, inv, manifest: dict, metrics: list[dict], results: list[KeepsetResult],
              diag_lines: list[str], nc: Path | None, made: list[tuple[str, Path]], out: Path, quantile: float,
              num_draws: int, band_samples: int = 0) -> str:
    d = inv.describe()
    base = manifest.get("base", {}).get("name", "unknown base model")
    train = [m for m in metrics if m.get("type", "train") == "train"]
    L = [f"# PPN report: {run_dir.name}", ""]
    L += ["## The run", "",
          (f"- base model: **{base}** ({d['family'] or 'family unknown'}); status: {manifest.get('status', 'unknown')}, "
          f"steps done: {manifest.get('steps_done', len(train) or 'unknown')}"),
          (f"- gated units: {', '.join(inv.kinds)} — {inv.num_layers} layers, {inv.num_heads} heads/layer "
          f"({inv.dims.num_kv_heads} KV heads), {inv.num_groups} channel groups/layer of {inv.group_size}"),
          (f"- decoder: {d['decoder_params']:.4g} parameters, {d['decoder_flops_per_token']:.4g} FLOPs/token; "
          f"embeddings and LM head ({d['embedding_params']:.4g} params) are never pruned"),
          f"- keep-sets rank units by the {quantile} posterior quantile of their exit price over {num_draws} joint draws"]
    calibrated, cal_line = calibration_line(manifest)
    L.append(f"- inclusion probabilities: **{cal_line.split(':')[0]}** —{cal_line.split(':', 1)[1]}")
    if train:
        last = train[-1]
        L.append(f"- last training step {last.get('step')}: ELBO loss {last.get('elbo', float('nan')):.4g}, "
                 f"token loss {last.get('token_loss', float('nan')):.4g}")
    L.append("")
    ref = results[len(results) // 2]
    L += ["## What goes first", "",
          ("Units leave in the order below as the compute price λ rises (the posterior "
          f"{quantile}-quantile of the price at which each unit's score falls under its layer's threshold). "
          "Every keep-set is a prefix of the reverse order, so smaller models drop exactly these units first."), ""]
    if "layers" in inv.kinds:
        order = removal_order(ref, "layers")
        L.append("**Layers, first to go → last:** " + ", ".join(f"{n.split()[1]} ({_exit_text(x)})" for n, x in order))
        L.append("")
    for kind, label in (("heads", "Heads"), ("groups", "Channel groups")):
        if kind in inv.kinds:
            first = removal_order(ref, kind, 12)
            L.append(f"**{label} going first:** " + ", ".join(f"{n.split()[1]} ({_exit_text(x)})" for n, x in first))
            L.append("")
    L += ["## Keep-sets by size", "",
          ("| requested size | achieved params | achieved FLOPs | λ* | expected size at λ* | layers | heads | groups "
          "| P(draw = reported) | boundary units |"),
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        k = r.keep
        L.append(f"| {r.requested_size:.3f} | {r.achieved['params_fraction']:.4f} | {r.achieved['flops_fraction']:.4f} "
                 f"| {r.lam:.4g}{'*' if r.lambda_saturated else ''} | {r.expected_size_at_lambda:.4f} | {len(k.layers)} "
                 f"| {len(k.heads)} | {len(k.groups)} | {r.p_equal:.3f} | {len(r.boundary)} |")
    L += ["", ("Achieved sizes never exceed the request (exact costs, a GQA KV head charged once). λ* is the price "
          "at which the push's expected size equals the request; * marks a request beyond the trained range."), ""]
    label = ("**calibrated** (the posterior was re-derived at a calibrated beta; see The run): read π as the chance "
             "that another fit of this recipe keeps the unit" if calibrated else
             "**not calibrated** (see The run): π describes the spread of this fit's posterior at its assumed beta, not "
             "the chance that another fit keeps the unit; `benchmarks/calibration_refits.py` measures that")
    L += ["## Uncertain decisions", "",
          ("π is the share of posterior draws whose own keep-set (same rule, same budget) keeps the unit; units with "
          f"0.1 < π < 0.9 are boundary units, listed most uncertain first. These π are {label}."), ""]
    for r in results:
        L.append(f"**Size {r.requested_size:.3g}** — P(a draw gives the reported keep-set) = {r.p_equal:.3f}; "
                 f"{len(r.boundary)} boundary units.")
        if r.boundary:
            L.append("")
            L.append("| unit | π | in reported keep-set |")
            L.append("|---|---|---|")
            for b in r.boundary[:12]:
                L.append(f"| {b['unit']} | {b['pi']:.2f} | {'yes' if b['kept'] else 'no'} |")
            if len(r.boundary) > 12:
                L.append(f"| … {len(r.boundary) - 12} more in keepsets.json | | |")
        L.append("")
    L += _band_lines(results, band_samples)
    L += ["## Is the posterior fitted?", ""] + _fit_lines(_exported_records(manifest, metrics))
    L += ["## Diagnostics", ""] + diag_lines + [""]
    if nc is not None:
        L += [f"Posterior draws of every latent are saved as arviz NetCDF: `{nc.name}`.", ""]
    L += ["## Plots", ""]
    for title, png in made:
        L += [f"### {title}", "", f"![{title}]({png.relative_to(out).as_posix()})", ""]
    L += ["## Files", "", ("- `keepsets.json`: every size's keep-set with per-unit inclusion probabilities π, mask "
          "probabilities ρ and credible intervals of scores and gates"), "- `plots/`: PNG and SVG of every figure", ""]
    return "\n".join(L)


def _band_lines(results: list[KeepsetResult], band_samples: int) -> list[str]:
    """The "Held-out loss" section: each keep-set's NLL with the band over sampled sub-networks."""
    L = ["## Held-out loss", ""]
    evals = [r for r in results if r.eval]
    if not evals:
        return L + [("_Not computed (it loads the model): `ppn report RUN --band 8` adds each keep-set's held-out "
                     "loss with a 5-95 % band over 8 sampled sub-networks._"), ""]
    e0 = evals[0].eval
    L += [(f"Mean next-token NLL (nats) on the first {e0['blocks']} {e0.get('split', 'held-out')} blocks: the reported "
           f"keep-set, and the 5-95 % credible band over {e0['samples']} sub-networks sampled from the posterior at the "
           "same size (each draw's own keep-set)."), "",
          "| requested size | NLL (ppl) of the keep-set | sampled: median | 5 % | 95 % | keep-set inside the band |",
          "|---|---|---|---|---|---|"]
    for r in evals:
        e = r.eval
        inside = "yes" if e["nll_q05"] <= e["nll"] <= e["nll_q95"] else ("below" if e["nll"] < e["nll_q05"] else "above")
        L.append(f"| {r.requested_size:.3f} | {e['nll']:.4f} ({e['ppl']:.2f}) | {e['nll_q50']:.4f} | {e['nll_q05']:.4f} "
                 f"| {e['nll_q95']:.4f} | {inside} |")
    return L + [""]
