"""Every method on the same model, calibration and test data, in one table (``ppn compare``).

Fairness, by construction:

* **Same tokens.** Every peer is calibrated on the same calibration blocks (a seeded draw from the
  train split), and every row is evaluated on the same held-out test blocks with the same
  :func:`ppn_bayes.backbone.perplexity.perplexity`. GISP with the margin objective (``gisp_objective="margin"``,
  rows ``gisp-margin``) calibrates on choice examples instead; ``ppn compare`` cuts them from the
  train novels by the shipped cloze task's rules (:mod:`ppn_bayes.data.tasks.choices`), never from the
  task's evaluated items.
* **Same currency.** A size is the fraction of *decoder* parameters kept
  (:meth:`UnitInventory.size_of`); embeddings and the LM head are never pruned and not counted. Each
  row reports the size it *achieved* (``param_fraction``, ``<=`` the request for every method but
  PrunePath, whose per-token active fraction is measured on the test blocks) and its FLOPs fraction.
* **As published, optionally healed.** Peers run as their papers describe, without retraining;
  ``heal_tokens > 0`` fine-tunes every pruned model on the same number of held-out *train* tokens
  (disjoint from the calibration blocks), keeping its sparsity, where a comparison needs it.
* **Cost counted.** ``cost_seconds`` is the wall time that produced a row's model. GISP, ShortGPT,
  random and PrunePath produce every size in one run (``one_run_for_all_sizes``), Wanda and
  SparseGPT run once per size; ``costs`` sums what each method spent for all sizes. PPN: one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.materialize import materialize
from ppn_bayes.backbone.perplexity import perplexity
from ppn_bayes.backbone.units import KeepSet
from ppn_bayes.baselines import NestedKeepSets, UnstructuredResult, check_blocks, check_sizes, timed
from ppn_bayes.errors import ConfigError, RunError
from ppn_bayes.files import atomic_write_bytes, atomic_write_many

PEERS = ("gisp", "shortgpt", "prunepath", "wanda", "sparsegpt", "random")
PPN_METHODS = ("ppn", "ppn-paper", "ppn-healed")  # ppn-healed: the ppn run's sub-networks, healed per size
ANCHOR = ("anchor",)  # the data score anchor of ppn_bayes.bayes.anchor alone: no training (not a default peer)
METHODS = PPN_METHODS + ANCHOR + PEERS
GISP_OBJECTIVES = ("perplexity", "margin")
HEAL_LOSSES = ("data", "distill")


def gisp_label(objective: str) -> str:
    """The ``method`` of GISP's rows: ``gisp`` (perplexity objective, as published) or ``gisp-margin``."""
    return "gisp" if objective == "perplexity" else f"gisp-{objective}"


def check_methods(methods: Sequence[str]) -> list[str]:
    out = [m.strip() for m in methods if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise ConfigError(f"unknown method(s) {bad or '(none)'}; choose from {','.join(METHODS)}")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- measuring


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int, trials: int = 3) -> float:
    """Best-of-``trials`` seconds for ``new_tokens`` greedy batch-1 decode steps with a KV cache (the
    speed bench's timer, synchronized on CUDA)."""
    from ppn_bayes.evaluation.bench import time_generation

    return min(time_generation(model, prompt, new_tokens)["decode_s"] for _ in range(trials))


def check_heal_loss(loss: str) -> str:
    if loss not in HEAL_LOSSES:
        raise ConfigError(f"unknown heal loss {loss!r}; choose from {','.join(HEAL_LOSSES)} (data: next-token NLL, "
                          "distill: forward KL from the dense model)")
    return loss


def heal(model: nn.Module, blocks: torch.Tensor, lr: float = 5e-5, batch_size: int = 4, loss: str = "data",
         teacher: nn.Module | None = None) -> nn.Module:
    """Fine-tune the decoder layers on ``blocks`` (one pass), keeping every zero weight zero.

    Zeros are the pruned weights of Wanda/SparseGPT; re-applying the mask after each step keeps
    the sparsity (structured models are already cut, so they have none to keep).

    ``loss``: ``data`` (the mean next-token NLL) or ``distill`` (the mean per-token forward KL from
    ``teacher``'s next-token distribution, the teacher under ``torch.no_grad``: what Minitron heals
    with, and what PPN's in-place distillation trains its sub-networks with; see docs/method.md).
    """
    from ppn_bayes.backbone.families import family_for
    from ppn_bayes.bayes.model import sequence_kl

    check_heal_loss(loss)
    if loss == "distill" and teacher is None:
        raise ConfigError("heal(loss='distill') needs the dense model as teacher=")

    layers = family_for(model.config).layers(model)
    params = [p for p in layers.parameters() if p.dtype.is_floating_point]
    masks = [(p != 0) for p in params]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    try:
        for s in range(0, blocks.shape[0], batch_size):
            batch = blocks[s:s + batch_size].to(device)
            if loss == "data":
                value = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
                logits = model(input_ids=batch, use_cache=False).logits
                value = sequence_kl(logits, target, None).sum() / (batch.shape[0] * (batch.shape[1] - 1))
            opt.zero_grad()
            value.backward()
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    p.mul_(m)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
    return model


class Bench:
    """Shared state of one comparison: data, the dense reference, decode timing."""

    def __init__(self, model: nn.Module, test: torch.Tensor, heal_blocks: torch.Tensor | None,
                 decode_tokens: int, batch_size: int, trials: int = 5, heal_loss: str = "data",
                 transfer: torch.Tensor | None = None):
        self.model, self.test, self.heal_blocks, self.transfer = model, test, heal_blocks, transfer
        self.heal_loss = check_heal_loss(heal_loss)
        self.decode_tokens, self.batch_size, self.trials = decode_tokens, batch_size, trials
        self.prompt = test[:1, : min(32, test.shape[1])]
        # Whether the dense model decodes with a KV cache at all: an architecture whose cache this
        # transformers cannot drive still gets perplexities, and ``decode_error`` says why it has no
        # speedups. Only the dense model's failure is tolerated: a pruned model that fails where its
        # dense model decodes is a bug, and raises.
        self.decode_error: str | None = None
        if decode_tokens > 0:
            try:
                self._decode(model)
            except (TypeError, ValueError, AttributeError, NotImplementedError) as err:
                self.decode_error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        self.can_decode = decode_tokens > 0 and self.decode_error is None
        self.keepsets: dict[str, dict[str, dict]] = {}  # method -> size -> KeepSet JSON (first seed)

    def _decode(self, model: nn.Module) -> float:
        return decode_seconds(model, self.prompt.to(next(model.parameters()).device), self.decode_tokens, 1)

    def speedup(self, model: nn.Module) -> float | None:
        """Dense decode time / ``model``'s, each the best of ``trials`` runs taken *alternately*.

        Alternating the two inside one loop exposes both to the same background load (shared CPUs),
        so the ratio is far steadier than one measured against a dense time taken minutes earlier.
        """
        if not self.can_decode:
            return None
        dense = mine = float("inf")
        for _ in range(self.trials):
            dense, mine = min(dense, self._decode(self.model)), min(mine, self._decode(model))
        return dense / mine

    def ppl(self, model: nn.Module) -> dict[str, float]:
        """Perplexity on the test blocks, and on the transfer blocks (another domain) when given."""
        r = perplexity(model, self.test, batch_size=self.batch_size)
        out = {"perplexity": r["perplexity"], "nll": r["nll"]}
        if self.transfer is not None:
            t = perplexity(model, self.transfer, batch_size=self.batch_size)
            out.update(transfer_perplexity=t["perplexity"], transfer_nll=t["nll"])
        return out

    @property
    def healing(self) -> bool:
        return self.heal_blocks is not None and self.heal_blocks.shape[0] > 0

    def maybe_heal(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """Heal ``model`` when healing is on; ``(model, {"healed_tokens", "heal_seconds"[, "heal_loss"]})``.

        Healing runs once per size, so its time is part of what producing that size costs. With
        ``heal_loss="distill"`` the teacher is the dense model of this comparison."""
        if not self.healing:
            return model, {"healed_tokens": 0, "heal_seconds": 0.0}
        with timed() as t:
            model = heal(model, self.heal_blocks, loss=self.heal_loss, teacher=self.model)
        return model, {"healed_tokens": int(self.heal_blocks.numel()), "heal_seconds": t.seconds,
                       "heal_loss": self.heal_loss}


# ----------------------------------------------------------------------------- rows


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
    from ppn_bayes.baselines import decoder_param_fraction

    frac = decoder_param_fraction(model)
    name = res.method if res.pattern == "unstructured" else f"{res.method}-2:4"
    return {"method": name, "size": size, "pattern": res.pattern, **bench.ppl(model), "param_fraction": frac,
            "flops_fraction": frac, "cost_seconds": res.seconds, "one_run_for_all_sizes": False,
            **healing, "sparse_speedup": "none on dense kernels"}


def random_rows(bench: Bench, sizes: list[float], seeds: Sequence[int], group_size: int) -> list[dict]:
    from ppn_bayes.baselines.random import random_keepsets

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
    from ppn_bayes.baselines.prunepath import moefy
    from ppn_bayes.errors import SizeError

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
    read by ``2 + sandwich_random`` passes (:func:`run_passes`): the same tokens, more compute."""
    t = recipe.train
    return (t.steps + t.guide_steps) * t.batch_size * t.grad_accum * recipe.data.block_size


def run_passes(recipe: Any) -> int:
    """Forward/backward passes per optimizer step: 1, or the sandwich's ``2 + sandwich_random``."""
    t = recipe.train
    return 2 + t.sandwich_random if getattr(t, "sandwich", False) else 1


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
    try:
        from ppn_bayes.run import load_run  # the Bayesian core's run directory API
    except ImportError:
        raise ConfigError(f"method {method} needs ppn_bayes.run (the PPN run API), which this install lacks; "
                          "drop ppn,ppn-paper from --methods") from None
    fit_seconds = 0.0
    if run_dir is None and fit_dir is not None and model_path is not None:
        run_dir, fit_seconds = fit_ppn_run("ppn-paper" if method == "ppn-paper" else "ppn", model_path, fit_dir)
    if run_dir is None:
        flag = "--paper-run" if method == "ppn-paper" else "--run"
        raise RunError(f"method {method} needs a finished run; pass {flag} RUN_DIR (make one with `ppn fit`)")
    run = load_run(run_dir)
    if model_path is not None:
        run.check_base(model_path)
    solved = _ppn_keepsets(run, sizes, method)
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
    import yaml

    from ppn_bayes.config import bundled_recipe, recipe_from_dict
    from ppn_bayes.training.loop import fit

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


def _ppn_keepsets(run: Any, sizes: list[float], method: str) -> dict[float, tuple[KeepSet, float]]:
    """``size -> (KeepSet, lambda*)`` from the run's posterior (:func:`ppn_bayes.bayes.keepsets.keepsets`)."""
    try:
        from ppn_bayes.bayes.keepsets import keepsets
    except ImportError:
        raise ConfigError(f"method {method} needs the posterior-to-keep-set step (ppn_bayes.bayes.keepsets), which this "
                          "install lacks; drop ppn,ppn-paper from --methods") from None
    results = keepsets(run, list(sizes))
    return {s: (run.inventory.complete(r.keep), float(r.lam)) for s, r in zip(sizes, results)}


# ----------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class CompareOptions:
    """How :func:`compare` runs, beyond the model, the data, the sizes and the methods.

    ``heal_blocks``: train blocks for optional healing (module docstring); ``heal_loss``: what healing
    minimizes, ``data`` (next-token NLL) or ``distill`` (forward KL from the dense model's logits).
    ``run_dir``/``paper_run_dir``: the finished runs of the ``ppn``/``ppn-healed`` and ``ppn-paper``
    rows; without them, and with ``fit_dir`` and ``model_path``, they are fitted (:func:`fit_ppn_run`).
    ``seeds``: random keep-sets averaged; ``group_size``: MLP channels per unit for the structured peers;
    ``gisp_step``, ``gisp_objective`` (``perplexity`` or ``margin``) and ``gisp_choices``
    (:class:`~ppn_bayes.data.tasks.choices.ChoiceExample` items for the margin objective);
    ``prunepath_experts``; ``anchor_kinds`` (the ``anchor`` rows). ``decode_tokens`` (0: no decode
    timing), ``batch_size`` (evaluation), ``progress`` (a line per method on stderr). ``transfer``:
    test blocks of another domain (a ``transfer_perplexity`` per row).
    """

    heal_blocks: torch.Tensor | None = None
    heal_loss: str = "data"
    run_dir: str | os.PathLike | None = None
    paper_run_dir: str | os.PathLike | None = None
    model_path: str | os.PathLike | None = None
    fit_dir: str | os.PathLike | None = None
    seeds: Sequence[int] = (0, 1, 2)
    group_size: int = 1
    gisp_step: float = 0.1
    gisp_objective: str = "perplexity"
    gisp_choices: Sequence[Any] | None = None
    prunepath_experts: int = 16
    anchor_kinds: Sequence[str] = ("layers", "heads", "groups")
    decode_tokens: int = 16
    batch_size: int = 8
    progress: bool = False
    transfer: torch.Tensor | None = None

    def check(self, methods: Sequence[str]) -> CompareOptions:
        """Eager checks (one-line errors) of what ``methods`` need from these options."""
        check_heal_loss(self.heal_loss)
        if "ppn-healed" in methods and (self.heal_blocks is None or self.heal_blocks.shape[0] == 0):
            raise ConfigError("method ppn-healed heals each size: pass --heal-tokens N (heal_blocks=) as for the peers")
        if self.gisp_objective not in GISP_OBJECTIVES:
            raise ConfigError(f"unknown GISP objective {self.gisp_objective!r}; choose from {','.join(GISP_OBJECTIVES)}")
        if self.gisp_objective == "margin" and "gisp" in methods and not self.gisp_choices:
            raise ConfigError("GISP's margin objective needs choice examples: pass gisp_choices=[ChoiceExample, ...] "
                              "(ppn compare builds them from the bundled train novels)")
        return self


def compare_options(options: CompareOptions | None = None, **overrides: Any) -> CompareOptions:
    """``options`` (default :class:`CompareOptions`) with ``overrides``; an unknown name is a one-line error."""
    names = {f.name for f in dataclasses.fields(CompareOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown compare option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(options or CompareOptions(), **overrides)


def compare(model: nn.Module, calib: torch.Tensor, test: torch.Tensor, sizes: Sequence[float],
            methods: Sequence[str] = PEERS, options: CompareOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Run ``methods`` at ``sizes`` on ``model``; ``{"dense", "results", "costs", "tokens", "config"}``.

    How it runs is a :class:`CompareOptions` (``options``), or its fields given as keywords
    (``compare(..., heal_blocks=b, decode_tokens=0)``), which replace those of ``options``.
    ``model`` is never modified (peers work on copies or cut copies). Every GISP row records its
    ``objective``: ``perplexity`` (next-token NLL of ``calib``; rows named ``gisp``) or ``margin`` (rows
    ``gisp-margin``). ``anchor``: the data score anchor alone (:func:`ppn_bayes.bayes.anchor.anchor_pruning`,
    Block Influence for layers and Taylor importance for heads and channel groups, on ``calib``).
    ``ppn-healed``: the ``ppn`` run's sub-networks healed per size like the peers (needs
    ``heal_blocks``); every healed row records its ``heal_loss``. ``tokens`` in the result: the training
    tokens each method spent for all sizes (a PPN run's once, plus healing per size; calibration, the
    same for every peer, is not counted). With ``transfer`` every row also has ``transfer_perplexity``
    (and ``transfer_nll``), read as a ratio to the dense row's on the same blocks.
    """
    sizes = check_sizes(sizes)
    methods = check_methods(methods)
    o = compare_options(options, **overrides).check(methods)
    calib, test = check_blocks(calib), check_blocks(test, "test")
    transfer = None if o.transfer is None else check_blocks(o.transfer, "transfer")
    from ppn_bayes.backbone.families import family_for

    family_for(model.config)  # an unsupported architecture fails here, before minutes of dense evaluation
    bench = Bench(model, test, o.heal_blocks, o.decode_tokens, o.batch_size, heal_loss=o.heal_loss, transfer=transfer)
    if (o.run_dir is None and o.fit_dir is not None and o.model_path is not None
            and {"ppn", "ppn-healed"} <= set(methods)):  # one run for both: its rows healed and not
        o = dataclasses.replace(o, run_dir=str(fit_ppn_run("ppn", o.model_path, o.fit_dir)[0]))
    dense = {"method": "dense", "size": 1.0, **bench.ppl(model), "param_fraction": 1.0, "flops_fraction": 1.0,
             "decode_speedup": 1.0 if bench.can_decode else None, "cost_seconds": 0.0}
    rows: list[dict] = []
    for method in methods:
        if o.progress:
            print(f"ppn compare: {method}", flush=True, file=sys.stderr)
        rows += _method_rows(bench, method, calib, sizes, o)
    costs: dict[str, float] = {}
    for r in rows:  # a one-run method's run once (per seed for random); per-size runs and heals summed
        if "cost_seconds" not in r:
            continue
        m = r["method"]
        if r.get("one_run_for_all_sizes"):
            costs.setdefault(m, r["cost_seconds"] * (len(o.seeds) if m == "random" else 1))
        else:
            costs[m] = costs.get(m, 0.0) + r["cost_seconds"]
        costs[m] += r.get("heal_seconds", 0.0)
    tokens: dict[str, int] = {}
    for r in rows:  # a PPN run's training tokens once, plus every size's healing tokens
        if "skipped" in r:
            continue
        m = r["method"]
        tokens.setdefault(m, int(r.get("train_tokens", 0)))
        tokens[m] += int(r.get("healed_tokens", 0))
    config = {"sizes": sizes, "methods": methods, "calib_blocks": int(calib.shape[0]),
              "test_blocks": int(test.shape[0]), "block_size": int(test.shape[1]), "seeds": list(o.seeds),
              "group_size": o.group_size, "gisp_step": o.gisp_step, "gisp_objective": o.gisp_objective,
              "gisp_choices": len(o.gisp_choices) if o.gisp_objective == "margin" and o.gisp_choices else 0,
              "prunepath_experts": o.prunepath_experts, "anchor_kinds": list(o.anchor_kinds),
              "heal_tokens": int(o.heal_blocks.numel()) if o.heal_blocks is not None else 0, "heal_loss": o.heal_loss,
              "decode_tokens": o.decode_tokens, "decode_error": bench.decode_error}
    return {"dense": dense, "results": rows, "costs": costs, "tokens": tokens, "config": config,
            "keepsets": bench.keepsets}


def _method_rows(bench: Bench, method: str, calib: torch.Tensor, sizes: list[float], o: CompareOptions
                 ) -> list[dict]:
    model = bench.model
    if method in PPN_METHODS:
        return ppn_rows(bench, method, o.paper_run_dir if method == "ppn-paper" else o.run_dir, sizes,
                        o.model_path, o.fit_dir)
    if method == "gisp":
        from ppn_bayes.baselines.gisp import gisp

        objective = o.gisp_objective
        res = gisp(model, calib, sizes, objective=objective, choices=o.gisp_choices,
                   step=o.gisp_step, group_size=o.group_size)
        res.method = gisp_label(objective)
        return structured_rows(bench, res, {"objective": objective})
    if method == "anchor":
        from ppn_bayes.bayes.anchor import anchor_pruning

        res = anchor_pruning(model, calib, sizes, kinds=o.anchor_kinds, group_size=o.group_size)
        return structured_rows(bench, res, {"kinds": list(o.anchor_kinds)})
    if method == "shortgpt":
        from ppn_bayes.baselines.shortgpt import shortgpt

        return structured_rows(bench, shortgpt(model, calib, sizes, group_size=o.group_size))
    if method == "random":
        return random_rows(bench, sizes, o.seeds, o.group_size)
    if method == "prunepath":
        return prunepath_rows(bench, calib, sizes, o.prunepath_experts)
    if method not in ("wanda", "sparsegpt"):  # check_methods refuses these first; never a silent fallback
        raise ConfigError(f"unknown method {method!r}; choose from {','.join(METHODS)}")
    from ppn_bayes.baselines.sparsegpt import sparsegpt
    from ppn_bayes.baselines.wanda import wanda

    fn = wanda if method == "wanda" else sparsegpt
    rows = [unstructured_row(bench, fn(model, calib, s, "unstructured"), s) for s in sizes]
    rows.append(unstructured_row(bench, fn(model, calib, 0.5, "2:4"), 0.5))
    return rows


# ----------------------------------------------------------------------------- reports


def markdown_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per method and size, the dense model first."""
    transfer = "transfer_perplexity" in result["dense"]
    head = ("| method | size | params kept | FLOPs kept | perplexity |" + (" transfer ppl (x dense) |" if transfer else "")
            + " decode speedup | cost s (all sizes) |\n| --- | ---: | ---: | ---: | ---: |"
            + (" ---: |" if transfer else "") + " ---: | ---: |")
    lines = [head]
    costs = result.get("costs", {})
    for r in [result["dense"], *result["results"]]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['size']:.2f} | - | - | skipped: {r['skipped']} | - | - |")
            continue
        ppl = f"{r['perplexity']:.2f}" + (f" ± {r['perplexity_std']:.2f}" if "perplexity_std" in r else "")
        sp = r.get("decode_speedup")
        speed = f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-"
        name = r["method"] + (f" (tau={r['tau']:.3f})" if "tau" in r else "")
        cost = costs.get(r["method"], r.get("cost_seconds", 0.0))
        moved = ""
        if transfer:
            moved = (f" {r['transfer_perplexity']:.2f} (x{r['transfer_perplexity'] / result['dense']['transfer_perplexity']:.2f}) |"
                     if "transfer_perplexity" in r else " - |")
        lines.append(f"| {name} | {r['size']:.2f} | {r['param_fraction']:.3f} | {r['flops_fraction']:.3f} | {ppl} |"
                     f"{moved} {speed} | {cost:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Held-out perplexity vs decoder-params kept (left) and vs FLOPs kept (right), log y, as a PNG."""
    atomic_write_bytes(Path(path), plot_png(result))


def plot_png(result: dict[str, Any]) -> bytes:
    """The PNG bytes of :func:`plot`'s figure."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    by_method: dict[str, list[dict]] = {}
    for r in result["results"]:
        if "skipped" not in r:
            by_method.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab20").colors  # up to 20 methods without a repeated colour
    dense = result["dense"]["perplexity"]
    top = max(r["perplexity"] for rs in by_method.values() for r in rs) if by_method else dense
    clip = dense * 30.0 if top > dense * 30.0 else None  # keep the informative range readable
    for ax, key, label in ((axes[0], "param_fraction", "fraction of decoder parameters kept"),
                           (axes[1], "flops_fraction", "fraction of decoder FLOPs per token")):
        for i, (method, rs) in enumerate(by_method.items()):
            rs = sorted(rs, key=lambda r: r[key])
            name = method + (" (active per token)" if method == "prunepath" else "")
            healed = any(r.get("healed_tokens") for r in rs)
            ax.plot([r[key] for r in rs], [r["perplexity"] for r in rs], marker="o", label=name,
                    color=colors[i % len(colors)], ls="--" if healed else "-",
                    lw=2.2 if method.startswith("ppn") else 1.2)
        ax.axhline(dense, color="k", ls=":", lw=1, label="dense")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        if clip is not None:
            ax.set_ylim(top=clip)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out perplexity" + (" (clipped at 30x dense)" if clip is not None else ""))
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


#: What ``ppn compare`` writes into ``--out``: its four files and the runs it fits when none is given.
COMPARE_ENTRIES = ("compare.json", "keepsets.json", "compare.md", "compare.png", "ppn-run", "ppn-paper-run")


def check_out(out_dir: str | os.PathLike, inputs: list[tuple[str, Any]], fits: Sequence[str] = ()) -> None:
    """Before the model loads: ``--out`` can be written, overlaps none of the ``(what, path)`` inputs and,
    if it exists, holds only an earlier comparison (which is replaced); see :mod:`ppn_bayes.files`.

    ``fits``: the methods whose run is to be fitted into ``--out`` (:func:`fit_ppn_run`). A run an
    earlier comparison fitted there is never refitted over; the user is told now how to reuse it,
    not after the peers have been measured.
    """
    from ppn_bayes.errors import OutputError
    from ppn_bayes.files import check_no_overlap, check_owned, check_writable

    check_writable(out_dir)
    check_no_overlap(out_dir, inputs, writes=COMPARE_ENTRIES)
    check_owned(out_dir, COMPARE_ENTRIES, "ppn compare")
    for method in fits:
        earlier = Path(out_dir) / f"{method}-run"
        if os.path.lexists(earlier):
            flag = "--paper-run" if method == "ppn-paper" else "--run"
            raise OutputError(f"--out {out_dir} already holds the {method} run an earlier comparison fitted "
                              f"({earlier}); pass {flag} {earlier} to reuse it, or choose another --out")


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """``compare.json``, ``keepsets.json``, ``compare.md`` and ``compare.png`` in ``out_dir`` (atomic writes).

    The structured methods' keep-sets go to their own file: with single-neuron groups they are large.
    """
    out = Path(out_dir)
    paths = {"json": out / "compare.json", "keepsets": out / "keepsets.json", "markdown": out / "compare.md",
             "plot": out / "compare.png"}
    main = {k: v for k, v in result.items() if k != "keepsets"}
    atomic_write_many({  # all four or none: a full disk leaves the previous set as it was
        paths["json"]: (json.dumps(main, indent=2, sort_keys=True) + "\n").encode(),
        paths["keepsets"]: (json.dumps(result.get("keepsets", {}), sort_keys=True) + "\n").encode(),
        paths["markdown"]: markdown_table(result).encode(),
        paths["plot"]: plot_png(result),
    })
    return {k: str(v) for k, v in paths.items()}
