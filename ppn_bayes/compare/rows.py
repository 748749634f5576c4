"""One method's rows: a size each, with its perplexity, achieved size, speedup and cost.

A size is the fraction of *decoder* parameters kept (:meth:`UnitInventory.size_of`); each row
reports the size it *achieved* and its FLOPs fraction. The structured peers' keep-sets are cut out
of the weights, the unstructured ones are scored as they zero weights, PrunePath's per-token active
fraction is measured on the test blocks. PPN's rows come from a finished run (:func:`ppn_rows`),
fitted first when none is given (:func:`fit_ppn_run`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ppn_bayes.backbone.materialize import materialize
from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.baselines import NestedKeepSets, UnstructuredResult, decoder_param_fraction, timed
from ppn_bayes.baselines.prunepath import moefy
from ppn_bayes.baselines.random import random_keepsets
from ppn_bayes.bayes.keepsets import keepsets
from ppn_bayes.compare.bench import Bench
from ppn_bayes.config import recipe_from_dict
from ppn_bayes.errors import ConfigError, RunError, SizeError
from ppn_bayes.run import load_run  # the Bayesian core's run directory API
from ppn_bayes.shipped import bundled_recipe
from ppn_bayes.training.loop import fit


def structured_rows(bench: Bench, res: NestedKeepSets, extra: dict | None = None) -> list[dict]:
    rows = []
    for size, keep in res.keepsets.items():
        bench.keepsets.setdefault(res.method, {}).setdefault(str(size), keep.to_dict())
        small = materialize(bench.model, keep, res.inventory)
        small, healing = bench.maybe_heal(small)
        rows.append({"method": res.method, "size": size, **bench.ppl(small),
                     "param_fraction": res.inventory.size_of(keep, "params"),
                     "flops_fraction": res.inventory.size_of(keep, "flops"),
                     "decode_speedup": bench.speedup(small), "cost_seconds": res.seconds,
                     "one_run_for_all_sizes": True, **healing,
                     "layers_kept": len(keep.layers), **(extra or {})})
    return rows


def unstructured_row(bench: Bench, res: UnstructuredResult, size: float) -> dict:
    model, healing = bench.maybe_heal(res.model)
    frac = decoder_param_fraction(model)
    name = res.method if res.pattern == "unstructured" else f"{res.method}-2:4"
    return {"method": name, "size": size, "pattern": res.pattern, **bench.ppl(model), "param_fraction": frac,
            "flops_fraction": frac, "cost_seconds": res.seconds, "one_run_for_all_sizes": False,
            **healing, "sparse_speedup": "none on dense kernels"}


def random_rows(bench: Bench, sizes: list[float], seeds: Sequence[int], group_size: int) -> list[dict]:
    per_seed = [structured_rows(bench, random_keepsets(bench.model, sizes, s, group_size)) for s in seeds]
    rows = []
    for i, size in enumerate(sizes):
        runs = [r[i] for r in per_seed]
        ppls = [r["perplexity"] for r in runs]
        rows.append({**runs[0], "perplexity": statistics.mean(ppls),
                     "perplexity_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                     "perplexities": ppls, "nll": statistics.mean(r["nll"] for r in runs),
                     "param_fraction": statistics.mean(r["param_fraction"] for r in runs),
                     "flops_fraction": statistics.mean(r["flops_fraction"] for r in runs),
                     "decode_speedup": runs[0]["decode_speedup"], "seeds": list(seeds),
                     "cost_seconds": sum(r["cost_seconds"] for r in runs) / len(runs),
                     "heal_seconds": sum(r["heal_seconds"] for r in runs)})
    return rows


def prunepath_rows(bench: Bench, calib: torch.Tensor, sizes: list[float], n_experts: int) -> list[dict]:
    pp = moefy(bench.model, calib, n_experts=n_experts)
    rows = []
    for size in sizes:
        try:
            tau = pp.tau_for(size)
        except SizeError as err:
            rows.append({"method": "prunepath", "size": size, "skipped": str(err)})
            continue
        pp.set_tau(tau)
        pp.reset_stats()
        ppl = bench.ppl(pp.model)
        active = pp.mean_active_fraction()
        rows.append({"method": "prunepath", "size": size, "tau": tau, **ppl, "active_fraction": active,
                     "param_fraction": pp.param_fraction(active), "flops_fraction": pp.flops_fraction(active),
                     "decode_speedup": bench.speedup(pp.model), "cost_seconds": pp.seconds,
                     "one_run_for_all_sizes": True, "healed_tokens": 0, "dynamic": True})
    return rows


def run_tokens(recipe: Any) -> int:
    """Training-set tokens a run's optimizer steps read (joint and guide-only steps alike):
    ``(steps + guide_steps) x batch_size x grad_accum x block_size``. With the sandwich rule each is
    read by ``2 + len(sandwich_sizes) + sandwich_random`` passes (:func:`run_passes`): the same tokens,
    more compute."""
    t = recipe.train
    return (t.steps + t.guide_steps) * t.batch_size * t.grad_accum * recipe.data.block_size


def run_passes(recipe: Any) -> int:
    """Forward/backward passes per optimizer step: 1, or the sandwich's
    ``2 + len(sandwich_sizes) + sandwich_random`` (the settle phase's steps drop the random prices)."""
    t = recipe.train
    return 2 + len(getattr(t, "sandwich_sizes", [])) + t.sandwich_random if getattr(t, "sandwich", False) else 1


def ppn_rows(bench: Bench, method: str, run_dir: str | os.PathLike | None, sizes: list[float],
             model_path: str | os.PathLike | None = None, fit_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of a finished PPN run: its nested keep-sets, evaluated on the run's *trained* network.

    Perplexity is that of the gated network with the keep-set's hard masks times the push's
    amplitude corrections at the keep-set's ``lambda*`` (the sub-network PPN serves); the decode
    speed is that of the keep-set cut out of the weights. The run must have been trained on the
    compared base model (checked by hash when ``model_path`` is known). Without a run, and with
    ``fit_dir`` and ``model_path``, one is fitted first (:func:`fit_ppn_run`); its time is the cost.

    ``ppn-healed``: the same sub-networks, each then healed per size with the comparison's healing
    budget and loss (:meth:`Bench.maybe_heal`), as a user with one target size would: the decoder
    (adapters merged) is fine-tuned under that size's fixed gates (masks times amplitudes), so the
    pruned units stay out, and restored before the next size.
    """
    fit_seconds = 0.0
    if run_dir is None and fit_dir is not None and model_path is not None:
        run_dir, fit_seconds = fit_ppn_run("ppn-paper" if method == "ppn-paper" else "ppn", model_path, fit_dir)
    if run_dir is None:
        flag = "--paper-run" if method == "ppn-paper" else "--run"
        raise RunError(f"method {method} needs a finished run; pass {flag} RUN_DIR (make one with `ppn fit`)")
    run = load_run(run_dir)
    if model_path is not None:
        run.check_base(model_path)
    solved = _ppn_keepsets(run, sizes)
    with timed() as t:
        gated = run.load_model(device=str(next(bench.model.parameters()).device))
    inv, push = run.inventory, run.posterior.push
    trained = max((float(r.get("seconds", 0.0)) for r in run.metrics), default=0.0)  # cumulative train time
    seconds = (fit_seconds or trained) + t.seconds
    healing = method == "ppn-healed"
    if healing and not bench.healing:
        raise ConfigError("method ppn-healed heals each size: pass --heal-tokens N (heal_blocks=) as for the peers")
    saved = {k: v.detach().clone() for k, v in gated.model.state_dict().items()} if healing else None
    t = run.recipe.train
    extra = {"train_tokens": run_tokens(run.recipe), "passes_per_step": run_passes(run.recipe),
             "distill_weight": t.distill_weight, "sandwich": t.sandwich}
    rows = []
    for size in sizes:
        keep, lam = solved[size]
        bench.keepsets.setdefault(method, {})[str(size)] = keep.to_dict()
        with torch.no_grad():
            gates = {k: v.detach() for k, v in push.gates(inv.masks(keep), lam).items()}
        healed = {"healed_tokens": 0}
        with gated.gates(**gates):
            if healing:
                _, healed = bench.maybe_heal(gated.model)
            with torch.no_grad():
                ppl = bench.ppl(gated)
        small = materialize(gated.model, keep, inv)
        rows.append({"method": method, "size": size, **ppl, "lambda": lam,
                     "param_fraction": inv.size_of(keep, "params"), "flops_fraction": inv.size_of(keep, "flops"),
                     "decode_speedup": bench.speedup(small), "cost_seconds": seconds,
                     "one_run_for_all_sizes": True, **healed, "run": str(run_dir),
                     "weights": t.weights, **extra})
        if saved is not None:
            gated.model.load_state_dict(saved)
    gated.remove_hooks()
    return rows


DEMO_RECIPE = "smollm2-demo"  # a bundled recipe (inference/smollm2-demo.yaml)


def fit_ppn_run(method: str, model_path: str | os.PathLike, out_dir: str | os.PathLike,
                recipe: str | os.PathLike | None = None) -> tuple[Path, float]:
    """Fit the run a ``ppn``/``ppn-paper`` row needs when none is given: ``(run_dir, seconds)``.

    ``ppn``: the demo recipe as written, on ``model_path``. ``ppn-paper``: the same model, data and
    training budget, with the ``paper`` preset supplying units, prior and push (the recipe's own
    units/prior/push sections are dropped so they do not override the preset).
    """
    path = bundled_recipe(DEMO_RECIPE) if recipe is None else Path(recipe)
    if not path.is_file():
        raise ConfigError(f"no --run given and the recipe {path} is missing; pass --run RUN_DIR")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["model"] = {**data.get("model", {}), "name": str(model_path)}
    if method == "ppn-paper":
        data = {k: v for k, v in data.items() if k not in ("units", "prior", "push", "preset")}
        data["train"] = {k: v for k, v in data.get("train", {}).items()
                         if k not in ("betas", "weight_decay", "schedule", "guide_steps")}  # no latents: no guide
        data.update(preset="paper", name=f"{data.get('name', 'demo')}-paper")
    run_dir = Path(out_dir) / f"{method}-run"
    with timed() as t:
        fit(recipe_from_dict(data), out=run_dir, progress=False)
    return run_dir, t.seconds


def _ppn_keepsets(run: Any, sizes: list[float]) -> dict[float, tuple[KeepSet, float]]:
    """``size -> (KeepSet, lambda*)`` from the run's posterior (:func:`ppn_bayes.bayes.keepsets.keepsets`)."""
    results = keepsets(run, list(sizes))
    return {s: (run.inventory.complete(r.keep), float(r.lam)) for s, r in zip(sizes, results)}
