"""The run directory that ``ppn fit`` writes, and :class:`RunDir`, the directory opened for reading.

Layout of a run directory::

    config.yaml            the resolved recipe (every key, preset applied): what the run *is*
    manifest.json          library version, base model identity, status, steps done, inventory
    metrics.jsonl          one JSON object per training step ("type": "train") and held-out evaluation
    posterior.json, units/guide/push.safetensors     the model-free posterior (ppn_bayes.bayes.posterior)
    weights.safetensors    weights: full  -> the trained decoder tensors, keyed by base parameter names
    adapter.safetensors    weights: lora  -> "<module>.A" [r, in] / "<module>.B" [out, r]; rank/alpha metadata
    checkpoint/            everything needed to resume: state.safetensors (guide, push, prior, trained
                           weights), optimizer.pt, rng.safetensors, trainer.json

Why it is crash-safe: every file outside ``checkpoint/`` is written to a temporary name in the same
directory and renamed into place (``os.replace`` is atomic), and metrics lines are appended with one
``write`` each. The checkpoint directory has its own protocol: :mod:`ppn_bayes.training.checkpoint_files`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch

from ppn_bayes.backbone.gated import gate
from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.bayes.posterior import Posterior
from ppn_bayes.config import Recipe, dump_recipe, load_recipe
from ppn_bayes.errors import ConfigError, RunError
from ppn_bayes.files import atomic_save_tensors, atomic_write_bytes
from ppn_bayes.hub.zoo import load_model, model_identity, resolve_model
from ppn_bayes.schema import (
    RUN_FIX,
    Bool,
    Int,
    Invalid,
    List,
    Map,
    Num,
    Obj,
    Opt,
    Spec,
    Str,
    check_path,
    check_shapes,
    load_json,
    load_jsonl,
    load_tensors,
    tensor_header,
)
from ppn_bayes.training.lora import LoRA

CONFIG, MANIFEST, METRICS = "config.yaml", "manifest.json", "metrics.jsonl"
WEIGHTS, ADAPTER = "weights.safetensors", "adapter.safetensors"
CHECKPOINT, CHECKPOINT_OLD = "checkpoint", "checkpoint.old"
CKPT_FILES = ("state.safetensors", "rng.safetensors", "optimizer.pt", "trainer.json")
POSTERIOR_FILES = ("posterior.json", "units.safetensors", "guide.safetensors", "push.safetensors")
#: The files ``ppn fit`` writes at the top of a run directory (what an output must never overlap).
RUN_FILES = (CONFIG, MANIFEST, METRICS, WEIGHTS, ADAPTER, *POSTERIOR_FILES)
RUN_ENTRIES = (*RUN_FILES, CHECKPOINT, CHECKPOINT_OLD, f"{CHECKPOINT}.tmp-*")
FORMAT = 1

# "starting": the directory exists (made whole by ppn fit, see train._init_dir) but no step has run yet
STATUSES = ("starting", "running", "finished", "failed", "interrupted")

# ------------------------------------------------------------------------------------------- schemas
# What the readers below rely on, checked on load (ppn_bayes.schema); other keys are kept unchecked.

MANIFEST_SCHEMA = Obj(
    required={"status": Str(STATUSES)},
    optional={"format": Int(1, FORMAT), "created": Str(), "updated": Str(), "library": Map(), "recipe": Map(),
              "base": Obj(optional={k: Str() for k in ("name", "path", "config_sha256", "weights_sha256")}),
              "weights": Str(("frozen", "lora", "full")), "tempering": Num(0, open_lo=True),
              "num_sequences": Int(1), "num_tokens": Num(0, open_lo=True), "block_size": Int(2),
              "inventory": Map(), "world_size": Int(1), "device": Str(), "steps_total": Int(1),
              "error": Opt(Str()), "final_eval": Bool(), "steps_done": Int(0), "checkpoint_step": Int(0),
              "psis": Opt(Obj(optional={"khat": Opt(Num(finite=False))})),
              # `ppn calibrate` (ppn_bayes.analysis.calibration): how beta was obtained; runs without it are uncalibrated
              "calibration": Obj(required={
                  "method": Str(), "beta": Num(0, open_lo=True), "unit": Str(("chapters", "documents")),
                  "n_units": Int(1), "trained_with_beta": Num(0, open_lo=True),
                  "posterior": Str(("rederived", "not rederived")), "details": Map()})})


_LOOSE = Num(finite=False)  # logged values; the loop stops before a NaN would be logged, and plots cope
_TRAIN_RECORD = Obj(required={"step": Int(0)}, optional={
    **{k: _LOOSE for k in ("elbo", "token_loss", "kl", "compute", "lambda", "sampled_size", "expected_size",
                           "grad_norm", "seconds", "khat", "distill_kl")}, "lr": Map(_LOOSE), "grad_norms": Map(_LOOSE),
    "prices": List(_LOOSE),  # the sandwich's prices of the step (dense, smallest size, random)
    "settle": Bool(),  # a settle step (training/settle.py): the sizes' keep-sets were trained
    "sandwich": List(Obj(optional={k: _LOOSE for k in ("lambda", "token_loss", "sampled_size", "expected_size",
                                                       "distill_kl")}))})
_EVAL_RECORD = Obj(required={"step": Int(0)}, optional={
    "dense": _LOOSE, "token_loss": _LOOSE, "seconds": _LOOSE, "khat": _LOOSE,
    "lambdas": List(Obj(optional={"lambda": _LOOSE, "loss": _LOOSE, "size": _LOOSE}))})


_SUMMARY_KEYS = ("scale_min", "scale_mean", "scale_max", "log_scale_mean", "scale_ratio", "scale_move", "loc_move", "kl")
_GUIDE_RECORD = Obj(required={"step": Int(0), "lr_sum": _LOOSE}, optional={
    "phase": Str(("joint", "guide")),
    **{k: _LOOSE for k in _SUMMARY_KEYS}})
_AVERAGE_RECORD = Obj(required={"step": Int(0), "steps": Int(2)}, optional={  # training/averaging.py: the export
    **{k: _LOOSE for k in ("loc_spread_rms", "sd_within_rms", "widening", "sd_ratio_to_last", *_SUMMARY_KEYS)},
    **{f"window_{k}": _LOOSE for k in ("rhat", "rhat_loc", "rhat_log_sd", "rhat_over", "ess_min", "mcse_rel", "drift",
                                       "iterates")}})  # bayes/diagnostics.window_stationarity
_RECORDS = {"train": _TRAIN_RECORD, "eval": _EVAL_RECORD, "guide": _GUIDE_RECORD, "guide_average": _AVERAGE_RECORD}


class _Record(Spec):
    """A metrics record: ``{"type": "train" | "eval" | "guide" | "guide_average", "step": >= 0, ...}`` (``guide``:
    the guide's summary every ``log_every`` steps, :func:`ppn_bayes.bayes.guides.guide_summary`; ``guide_average``:
    the averaged export's, :mod:`ppn_bayes.training.averaging`)."""

    def check(self, value, where):
        Obj(required={"type": Str(tuple(_RECORDS))}).check(value, where)
        return _RECORDS[value["type"]].check(value, where)


METRICS_SCHEMA = _Record()
TRAINER_SCHEMA = Obj(required={"step": Int(0)},
                     optional={"seconds": Num(0), "world_size": Int(1), "recipe_sha256": Str()})


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- small files


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_json(path: Path, spec: Spec = MANIFEST_SCHEMA, fix: str = RUN_FIX) -> dict:
    """A run's JSON file, validated against ``spec`` (the manifest's by default): one-line errors."""
    return load_json(Path(path), spec, fix, missing="pass a run directory written by `ppn fit`")


def write_config(run_dir: Path, recipe: Recipe) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG, dump_recipe(recipe).encode())


def update_manifest(run_dir: Path, **fields: Any) -> dict:
    """Merge ``fields`` into ``manifest.json`` (atomically) and return the new manifest."""
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path) if path.is_file() else {"format": FORMAT, "created": now()}
    manifest.update(fields)
    manifest["updated"] = now()
    write_json(path, manifest)
    return manifest


def append_metrics(run_dir: Path, record: dict) -> None:
    """One line per record, written with a single ``write`` to an append-only descriptor: a kill
    cannot leave half a line (a regular-file write completes before a signal is delivered)."""
    line = (json.dumps(record, default=float) + "\n").encode()
    fd = os.open(Path(run_dir) / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl``, each validated (a damaged line is a one-line RunError naming
    it; resuming an unfinished run drops such lines when it rewrites the file)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return load_jsonl(path, METRICS_SCHEMA, "delete or repair that line (the file is the run's training log)")


def _valid_records(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` that parse and match the schema; the others are dropped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            out.append(METRICS_SCHEMA.check(json.loads(line), ""))
        except (ValueError, RecursionError, Invalid):  # a damaged line: dropped, as the file is rewritten
            continue
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records of steps after ``step`` (they will be replayed on resume), and damaged lines."""
    kept = [r for r in _valid_records(run_dir) if r["step"] <= step]
    data = "".join(json.dumps(r, default=float) + "\n" for r in kept)
    atomic_write_bytes(Path(run_dir) / METRICS, data.encode())


# ----------------------------------------------------------------------------------------------- exports


def save_weights(run_dir: Path, mode: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """``weights.safetensors`` (full) or ``adapter.safetensors`` (lora); nothing for frozen weights."""
    if mode == "full":
        atomic_save_tensors(tensors, Path(run_dir) / WEIGHTS, metadata={"format": "ppn-weights"})
    elif mode == "lora":
        atomic_save_tensors(tensors, Path(run_dir) / ADAPTER, metadata=metadata)


# ------------------------------------------------------------------------------------------------ the Run


class RunDir:
    """A run directory, opened for reading: the recipe, manifest, posterior, metrics and trained model.

    Light on purpose: opening a run reads two small files; the posterior, metrics and model are
    loaded on first use. What every later step reads of a run, and nothing more: the analysis
    methods users call (keep-sets, report, plots, uncertainty) are :class:`ppn_bayes.run.Run`'s, a
    subclass at the top of the package that may import the analysis rooms this one may not.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        check_path(self.path)
        if not self.path.is_dir():
            raise RunError(f"run directory {self.path} does not exist; pass a directory written by `ppn fit`")
        self.manifest: dict = read_json(self.path / MANIFEST)
        try:
            self.recipe: Recipe = load_recipe(self.path / CONFIG)
        except ConfigError as err:
            raise RunError(f"{self.path / CONFIG}: {err}") from None
        self._posterior: Posterior | None = None

    def check(self) -> RunDir:
        """Validate, as a whole, every file of the run that a later step reads, before any step writes:
        the manifest and recipe (on opening), the four posterior files (schema, tensor names and shapes
        against the unit inventory, finiteness), every metrics record, and the header of the trained
        weights or adapter (names, shapes against the recipe's LoRA rank). Returns the run."""
        post = self.posterior
        read_metrics(self.path)
        self._check_agreement(post)
        weights = self.manifest.get("weights")
        if weights is not None and weights != self.recipe.train.weights:
            raise RunError(f"{self.path / MANIFEST}: weights is {weights!r} but {CONFIG} says "
                           f"train.weights: {self.recipe.train.weights}; {RUN_FIX}")
        mode = self.recipe.train.weights
        if mode == "full":
            tensor_header(self.path / WEIGHTS, RUN_FIX, missing=_NOT_YET)
        elif mode == "lora":
            check_adapter_header(self.path / ADAPTER, self.recipe.train.lora_rank)
        return self

    def _check_agreement(self, post: Posterior) -> None:
        """The run's files describe one run: the posterior's inventory and configs are the recipe's
        and the manifest's (a ``posterior.json`` copied from another run can be well-formed)."""
        r, inv = self.recipe, post.inventory
        facts = [("units.group_size", r.units.group_size, inv.group_size),
                 ("units.kinds", [k for k in ("layers", "heads", "groups") if k in r.units.kinds], list(inv.kinds)),
                 ("prior", dataclasses.asdict(r.prior), dataclasses.asdict(post.prior.config)),
                 ("push", dataclasses.asdict(r.push), dataclasses.asdict(post.push.config))]
        recorded = self.manifest.get("inventory", {}).get("dims")
        if recorded is not None:
            facts.append(("the inventory's dims", recorded, dataclasses.asdict(inv.dims)))
        for key, want, have in facts:
            if want != have:
                raise RunError(f"{self.path / 'posterior.json'} does not belong to this run: its {key} differs from "
                               f"{CONFIG}/{MANIFEST}; {RUN_FIX}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, status={self.status!r}, steps={self.manifest.get('steps_done')}, "
                f"base={self.manifest.get('base', {}).get('name')!r})")

    # --------------------------------------------------------------- facts
    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def inventory(self) -> UnitInventory:
        return self.posterior.inventory

    @property
    def posterior(self) -> Posterior:
        if self._posterior is None:
            self._posterior = Posterior.from_dir(self.path)
        return self._posterior

    @property
    def metrics(self) -> list[dict]:
        """Every record of ``metrics.jsonl`` (training steps and held-out evaluations)."""
        return read_metrics(self.path)

    def train_metrics(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "train"]

    def eval_metrics(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "eval"]

    # -------------------------------------------------------- base model
    def base_path(self) -> Path:
        """The base checkpoint directory: where it was at training time, else resolved from the recipe."""
        recorded = self.manifest.get("base", {}).get("path")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)

        return resolve_model(self.recipe.model.name, trust_remote_code=self.recipe.model.trust_remote_code)

    def check_base(self, model_path: str | os.PathLike[str]) -> None:
        """Raise a RunError unless ``model_path`` is the base model this run was trained on."""

        want = self.manifest.get("base", {})
        have = model_identity(model_path)
        for key in ("config_sha256", "weights_sha256"):
            if want.get(key) and want[key] != have[key]:
                raise RunError(f"run {self.path} was trained on {want.get('name')!r} but {model_path} is "
                               f"{have['name']!r} ({key.split('_')[0]} hash differs); pass the run's own base model")

    def load_model(self, device: str = "cpu", merge: bool = True):
        """The trained network as a :class:`~ppn_bayes.backbone.gated.GatedLM` (no gates set).

        The base model is loaded from the manifest's path, checked against its hashes, and the run's
        trained weights are applied: ``weights.safetensors`` replaces decoder tensors; the adapter is
        merged into the projections (``merge=False`` keeps it as hooks, see :mod:`ppn_bayes.training.lora`).
        The push's amplitude corrections and thresholds are in ``self.posterior.push``.
        """

        path = self.base_path()
        self.check_base(path)
        dtype = getattr(torch, self.recipe.model.dtype)
        model, _ = load_model(path, dtype=dtype, device=device, trust_remote_code=self.recipe.model.trust_remote_code)
        units = self.recipe.units
        gated = gate(model, group_size=units.group_size, kinds=tuple(units.kinds))
        mode = self.recipe.train.weights
        if mode == "full":
            apply_full_weights(model, load_run_tensors(self.path / WEIGHTS))
        elif mode == "lora":
            tensors = load_run_tensors(self.path / ADAPTER)
            lora = LoRA(gated, rank=self.recipe.train.lora_rank, alpha=self.recipe.train.lora_alpha)
            check_shapes({k: tuple(v.shape) for k, v in tensors.items()},
                         {k: tuple(v.shape) for k, v in lora.state().items()}, str(self.path / ADAPTER),
                         "the adapter belongs to another base model or rank; " + RUN_FIX)
            lora.load_state(tensors)
            if merge:
                lora.merge()
            else:
                gated.lora = lora  # keep the adapter (and its hooks) alive with the model
        return gated

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_path(), trust_remote_code=self.recipe.model.trust_remote_code)


_NOT_YET = "the run has not reached its first checkpoint yet (resume it: ppn fit --resume --out RUN)"


def load_run_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A trained-weights or adapter file of a run: readable, finite (one-line errors)."""
    return load_tensors(path, RUN_FIX, missing=_NOT_YET)


def check_adapter_header(path: Path, rank: int) -> None:
    """``adapter.safetensors`` holds ``<module>.A`` [rank, in] / ``<module>.B`` [out, rank] pairs."""
    header = tensor_header(path, RUN_FIX, missing=_NOT_YET)
    modules: dict[str, set[str]] = {}
    for name, (shape, _) in header.items():
        module, _, part = name.rpartition(".")
        axis = {"A": 0, "B": 1}.get(part)
        if axis is None or len(shape) != 2 or shape[axis] != rank:
            raise RunError(f"{path}: tensor {name} {list(shape)} is not a LoRA factor of rank {rank} "
                           f"(<module>.A [{rank}, in], <module>.B [out, {rank}]); {RUN_FIX}")
        modules.setdefault(module, set()).add(part)
    broken = [m for m, parts in modules.items() if parts != {"A", "B"}]
    if broken or not modules:
        raise RunError(f"{path} lacks adapter pairs (e.g. {(broken or ['any'])[0]}); {RUN_FIX}")


@torch.no_grad()
def apply_full_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy trained decoder tensors (keyed by base parameter names) into ``model``, after checking
    that every one is a parameter of it, of its shape."""
    params = dict(model.named_parameters())
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()},
                 {k: tuple(params[k].shape) for k in tensors if k in params}, "the run's trained weights",
                 "the run belongs to another architecture; pass its own base model")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].dtype))


def recipe_fields_changed(old: Recipe, new: Recipe) -> list[str]:
    """Keys outside ``train`` (and ``name``) that differ: these define the model and cannot change on resume."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    out = []
    for section in ("preset", "model", "units", "prior", "push", "guide", "data"):
        if isinstance(a[section], dict):
            out += [f"{section}.{k}" for k in a[section] if a[section][k] != b[section][k] and k != "val_blocks"]
        elif a[section] != b[section]:
            out.append(section)
    for key in ("weights", "lora_rank", "lora_alpha", "tempering"):
        if a["train"][key] != b["train"][key]:
            out.append(f"train.{key}")
    return out


def open_run(path: str | os.PathLike[str] | RunDir) -> RunDir:
    """Open a run directory written by :func:`ppn_bayes.training.loop.fit`, checked as a whole (:meth:`RunDir.check`).

    A :class:`RunDir` (or :class:`ppn_bayes.run.Run`) passes through unchanged (it was checked when it was
    opened), so functions that take "a run or its directory" call this once instead of testing the type.
    """
    return path if isinstance(path, RunDir) else RunDir(path).check()
