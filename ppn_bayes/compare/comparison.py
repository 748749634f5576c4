"""The comparison: :func:`compare` runs every method at every size into one result.

The result holds the dense row, every method's rows, what each method cost in seconds and in
training tokens for all sizes, the configuration and the structured methods' keep-sets.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.baselines import check_blocks, check_sizes
from ppn_bayes.baselines.gisp import gisp
from ppn_bayes.baselines.shortgpt import shortgpt
from ppn_bayes.baselines.sparsegpt import sparsegpt
from ppn_bayes.baselines.wanda import wanda
from ppn_bayes.bayes.anchor import anchor_pruning
from ppn_bayes.compare.bench import Bench
from ppn_bayes.compare.options import (
    METHODS,
    PEERS,
    PPN_METHODS,
    CompareOptions,
    check_methods,
    compare_options,
    gisp_label,
)
from ppn_bayes.compare.rows import (
    fit_ppn_run,
    ppn_rows,
    prunepath_rows,
    random_rows,
    structured_rows,
    unstructured_row,
)
from ppn_bayes.errors import ConfigError


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
    family_for(model.config)  # an unsupported architecture fails here, before minutes of dense evaluation
    bench = Bench(model, test, o.heal_blocks, o.decode_tokens, o.batch_size, heal_loss=o.heal_loss, transfer=transfer,
                  heal_lr=o.heal_lr)
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
              "heal_tokens": int(o.heal_blocks.numel()) if o.heal_blocks is not None else 0,
              "heal_loss": o.heal_loss, "heal_lr": o.heal_lr,
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
        objective = o.gisp_objective
        res = gisp(model, calib, sizes, objective=objective, choices=o.gisp_choices,
                   step=o.gisp_step, group_size=o.group_size)
        res.method = gisp_label(objective)
        return structured_rows(bench, res, {"objective": objective})
    if method == "anchor":
        res = anchor_pruning(model, calib, sizes, kinds=o.anchor_kinds, group_size=o.group_size)
        return structured_rows(bench, res, {"kinds": list(o.anchor_kinds)})
    if method == "shortgpt":
        return structured_rows(bench, shortgpt(model, calib, sizes, group_size=o.group_size))
    if method == "random":
        return random_rows(bench, sizes, o.seeds, o.group_size)
    if method == "prunepath":
        return prunepath_rows(bench, calib, sizes, o.prunepath_experts)
    if method not in ("wanda", "sparsegpt"):  # check_methods refuses these first; never a silent fallback
        raise ConfigError(f"unknown method {method!r}; choose from {','.join(METHODS)}")
    fn = wanda if method == "wanda" else sparsegpt
    rows = [unstructured_row(bench, fn(model, calib, s, "unstructured"), s) for s in sizes]
    rows.append(unstructured_row(bench, fn(model, calib, 0.5, "2:4"), 0.5))
    return rows
