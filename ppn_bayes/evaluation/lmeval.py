"""Zero-shot lm-eval tasks on an in-memory model: the bridge behind ``ppn eval --tasks``.

Why in memory: a PPN sub-network is a gated view of the trained network (hooks that mask units and
scale branches) or a materialised smaller model; neither exists as a checkpoint lm-eval could load by
name. lm-eval's ``HFLM`` accepts an already-built ``transformers`` model, and a gated model's hooks
live on that very model, so wrapping it evaluates exactly the sub-network the caller set up.

Offline by design: tasks are looked up first in the tasks shipped with ppn-bayes
(:data:`ppn_bayes.data.tasks.TASKS_DIR`, default :data:`~ppn_bayes.data.tasks.LOCAL_TASK`) and in the caller's
``include_path`` folders; lm-eval's own catalogue (over 14,000 YAML files, ~20 s to index) is scanned
only when a requested name is not found there. Built-in tasks download their data from the Hugging
Face Hub, so they need a network; local task YAMLs over local JSONL files do not.

lm-eval is an optional dependency (``pip install 'ppn-bayes[eval]'``); without it every entry point
raises a one-line :class:`~ppn_bayes.errors.ConfigError` saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ppn_bayes.data.tasks import LOCAL_TASK, TASKS_DIR
from ppn_bayes.errors import ConfigError

INSTALL_HINT = "install it with: pip install 'ppn-bayes[eval]'"
#: Metrics reported per task (whichever of them the task computes), with their standard errors.
METRICS = ("acc", "acc_norm", "exact_match", "perplexity", "word_perplexity", "f1", "mcc")


def require_lm_eval() -> str:
    """lm-eval's version, or a one-line ConfigError telling how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"zero-shot tasks need lm-eval, which is not installed; {INSTALL_HINT}") from None
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - a version lookup failure must not block evaluation
        return str(getattr(lm_eval, "__version__", "unknown"))


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (duplicates dropped); empty -> the local task."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    return names or [LOCAL_TASK]


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    paths = [TASKS_DIR] + [Path(p).expanduser() for p in extra]
    for p in paths[1:]:
        if not p.is_dir():
            raise ConfigError(f"task folder {p} does not exist; pass a directory of lm-eval task YAMLs")
    return paths


def task_manager(include_paths: list[Path], defaults: bool):
    """lm-eval's TaskManager over our folders (and its own catalogue when ``defaults``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths], include_defaults=defaults)


def resolve_tasks(names: list[str], include_paths: list[Path], builtin: bool = True):
    """A TaskManager that knows every name, scanning lm-eval's catalogue only if it must."""
    manager = task_manager(include_paths, defaults=False)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing and builtin:
        manager = task_manager(include_paths, defaults=True)
        missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = "the shipped and included task folders" + (" or lm-eval's catalogue" if builtin else "")
        raise ConfigError(f"unknown lm-eval task {missing[0]!r} (not in {where}); use {LOCAL_TASK}, a name "
                          "from `lm_eval ls tasks`, or --include-path DIR with your own task YAML")
    return manager


def hf_model(model: Any) -> Any:
    """The ``transformers`` model lm-eval should call: a GatedLM's wrapped model (its hooks, and so its
    gates, stay in effect), anything else as it is."""
    inner = getattr(model, "model", None)
    if hasattr(model, "inventory") and hasattr(model, "set_gates") and inner is not None:
        return inner
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval warns at length that a model object (not a name) was passed; that is the point here."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def summarize(results: dict[str, Any], names: list[str], n_samples: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {"acc": ..., "acc_stderr": ..., "samples": n}}`` from lm-eval's ``results`` section.

    lm-eval keys metrics as ``"<metric>,<filter>"`` (``"acc,none"``); the filter suffix is dropped.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        raw = results.get(name, {})
        row: dict[str, Any] = {}
        for key, value in raw.items():
            metric = key.split(",")[0]
            base = metric.removesuffix("_stderr")
            if base in METRICS and isinstance(value, (int, float)):
                row[metric] = float(value)
        counts = n_samples.get(name, {})
        row["samples"] = int(counts.get("effective", counts.get("original", 0))) if isinstance(counts, dict) else 0
        out[name] = row
    return out


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    builtin: bool = True,
    seed: int = 1234,
    per_item: bool = False,
) -> dict[str, Any]:
    """Zero-shot scores of an in-memory causal LM on lm-eval tasks.

    Args:
        model: a ``transformers`` causal LM, a materialised/resized one, or a
            :class:`~ppn_bayes.backbone.gated.GatedLM` with its gates set (evaluated as gated).
        tokenizer: the model's tokenizer.
        tasks: names, ``"a,b"`` or ``None`` for the shipped :data:`~ppn_bayes.data.tasks.LOCAL_TASK`.
        limit: items per task (an int, or a fraction < 1); ``None`` for all. For quick checks only.
        batch_size: requests per forward pass.
        include_path: extra folder(s) of task YAMLs.
        builtin: also look names up in lm-eval's own catalogue (slow to index; needs a network to run).
        seed: lm-eval's seeds (few-shot sampling, numpy, torch), for repeatable numbers.
        per_item: also return each item's choice log-likelihoods (``"items"``), for paired
            comparisons between sizes (the same items, right or wrong under both).

    Returns:
        ``{"tasks": {name: {"acc": .., "acc_stderr": .., "acc_norm": .., "samples": n}}, "limit": ..,
        "lm_eval_version": ..}`` (plus ``"items": {name: [{"doc_id", "label", "loglikelihoods",
        "acc"}]}`` with ``per_item``).
    """
    version = require_lm_eval()
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    if limit is not None and not limit > 0:
        raise ConfigError(f"--limit {limit} must be positive (an item count, or a fraction below 1)")
    names = parse_tasks(tasks)
    manager = resolve_tasks(names, _include_paths(include_path), builtin=builtin)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    net = hf_model(model)
    was_training = bool(getattr(net, "training", False))
    try:
        with _quiet():
            lm = HFLM(pretrained=net, tokenizer=tokenizer, backend="causal", batch_size=int(batch_size),
                      max_length=_max_length(net))
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=0,
                                  log_samples=per_item, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    finally:
        if was_training:
            net.train()
    if out is None:  # pragma: no cover - simple_evaluate returns None only on non-zero ranks
        raise RuntimeError("lm-eval returned no results")
    result = {"tasks": summarize(out.get("results", {}), names, out.get("n-samples", {})),
              "limit": limit, "lm_eval_version": version}
    if per_item:
        result["items"] = {name: item_rows(out.get("samples", {}).get(name, [])) for name in names}
    return result


def item_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-item rows of a multiple-choice task from lm-eval's logged samples, in ``doc_id`` order."""
    rows = []
    for s in sorted(samples, key=lambda s: s.get("doc_id", 0)):
        lls = [float(r[0]) if isinstance(r, (tuple, list)) else float(r) for r in s.get("filtered_resps", [])]
        rows.append({"doc_id": int(s.get("doc_id", 0)), "label": s.get("target"), "loglikelihoods": lls,
                     "acc": s.get("acc")})
    return rows


def _max_length(model: Any) -> int | None:
    """The model's context, so lm-eval truncates long requests from the left instead of failing."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
