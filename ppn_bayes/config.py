"""Typed recipes: the YAML files that ``ppn fit`` takes, validated into dataclasses.

A recipe has eight sections (``model``, ``units``, ``prior``, ``push``, ``guide``, ``data``, ``train``,
``calibration``); every key has a type and a default. Unknown keys, wrong types and out-of-range
values are errors that name the key (``train.lr_guide: expected a number, got 'fast'``), never a
traceback. YAML is read with the safe loader only.

The ``preset`` key chooses defaults: ``ours`` (the Bayesian PPN) or ``paper`` (the published method:
norm scores without latent offsets, neurons and heads gated, lambda ~ Exp(0.3) with 1/3 dense steps,
T = 0.5, 10 spline control points, amplitude corrections, AdamW (0.9, 0.95), weight decay 0.1, cosine
decay). Keys given in the recipe override the preset.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ppn_bayes.errors import ConfigError
from ppn_bayes.schema import short
from ppn_bayes.shipped import bundled_recipe

#: Seeds go to numpy's legacy seeding (through Pyro) as well as torch's: 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
#: A recipe is a few dozen YAML nodes; one that expands (through aliases) beyond this is refused before
#: anything walks or prints it (a "billion laughs" alias bomb is kilobytes of text, gigabytes expanded).
MAX_YAML_NODES = 10_000


@dataclass
class UnitsConfig:
    """Which units are gated and how MLP channels are grouped."""

    kinds: list[str] = field(default_factory=lambda: ["layers", "heads", "groups"])
    group_size: int = 64  # MLP channels per group; 1 = single neurons (the paper)
    # The prior mean of every score (ppn_bayes/bayes/anchor.py). ``data``: Block Influence for layers,
    # first-order Taylor importance for heads and groups, from one pass over ``anchor_blocks``
    # training blocks (empirical Bayes). ``norm``: the weight norms (the paper).
    score_anchor: Literal["norm", "data"] = "data"
    anchor_blocks: int = 8


@dataclass
class PriorConfig:
    """The hierarchical shrinkage prior over score offsets (see docs/method.md)."""

    kind: Literal["horseshoe", "normal", "none"] = "horseshoe"  # none = the paper: no latent offsets
    global_scale: float = 0.1  # tau0 ~ HalfCauchy(global_scale)
    slab_scale: float = 2.0  # regularized horseshoe slab width c
    slab_df: float = 4.0  # slab degrees of freedom
    child_scale: float = 0.5  # heads/groups pool toward their layer with sd ~ HalfNormal(child_scale)
    # Centre the offsets: layer offsets sum to 0 over layers, a layer's child deviations sum to 0 over
    # its heads (groups). The per-kind level is then the shared threshold curve's alone, and the
    # latents carry only contrasts between layers and within a layer (docs/method.md).
    centre: bool = True


@dataclass
class PushConfig:
    """The paper's push: lambda draws, spline thresholds, temperature, amplitude corrections."""

    rate: float = 0.3  # lambda ~ Exponential(rate) on non-dense steps
    p_dense: float = 1.0 / 3.0  # probability of a dense (lambda = 0) step
    temperature: float = 0.5  # T in sigmoid((a - tau) / T)
    control_points: int = 10  # of each monotone cubic B-spline
    threshold_max: float = 3.0  # linear init: the initial threshold at lambda -> infinity
    # Initial thresholds. ``linear``: control points evenly spaced from -1/T to threshold_max.
    # ``size_curve``: solved so that the initial expected kept fraction, nesting included, is
    # 1 / (1 + lambda / init_half_price) -- independent of how many unit kinds are nested.
    init: Literal["linear", "size_curve"] = "linear"
    init_half_price: float | None = None  # size_curve: price at which half is kept; None = 1 / rate
    amplitude: bool = True  # amplitude corrections exp(s * u(lambda))
    mask: Literal["sample", "expected"] = "sample"  # straight-through Bernoulli, or rho itself
    # Threshold curves. ``shared``: one curve per unit kind for all layers (identifiable: each
    # layer's level is carried by the latent layer offsets; docs/method.md "Identifiability").
    # ``per_layer``: one curve per layer and kind (the paper; confounded with latent layer offsets,
    # so only for priors without latents).
    thresholds: Literal["shared", "per_layer"] = "shared"


@dataclass
class GuideConfig:
    kind: Literal["mean_field", "low_rank"] = "mean_field"
    rank: int = 8  # low_rank only
    init_scale: float = 0.05  # initial posterior sd of every latent


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # bundled alias, hub id or local directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    corpus: str = "bundled"  # bundled, a local file/dir of text/JSONL, or a hub dataset name
    block_size: int = 256
    train_blocks: int | None = None  # None = all training blocks
    val_blocks: int = 16
    # Refit checks (issue 12): train on a bootstrap resample of the train split's chapters (or
    # documents), drawn with replacement from this seed before blocks are packed; null = the split itself.
    bootstrap_seed: int | None = None
    bootstrap_unit: Literal["chapters", "documents"] = "chapters"


@dataclass
class TrainConfig:
    steps: int = 200
    # A guide-only phase after ``steps``: this many further steps (on further blocks) that train the score
    # posterior alone, weights frozen (the push trains for guide_push_steps), the guide's lr on its own schedule.
    guide_steps: int = 0
    # The guide's learning rate and schedule in that phase (null: lr_guide and schedule).
    guide_lr: float | None = None
    guide_schedule: Literal["cosine", "constant"] | None = None
    # The push (splines, amplitude corrections) trains in the phase's first min(this, guide_steps) steps,
    # at lr_push on the phase's schedule over them, so that it follows scores that move; then it is frozen
    # and the guide settles alone (weights and adapters never train there). 0: frozen throughout.
    guide_push_steps: int = 0
    # Export guide and push averaged over the last min(N, guide_steps) steps, sds widened by the means' spread
    guide_average_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    weights: Literal["frozen", "lora", "full"] = "frozen"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr_guide: float = 0.02
    lr_push: float = 0.01  # splines, amplitude scales, score offsets c_kind
    lr_weights: float = 1e-4
    weight_decay: float = 0.0  # weights only; guide/push groups never decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    clip_grad: float = 1.0
    tempering: float = 1.0  # likelihood tempering factor (recorded in the run)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    grad_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    eval_lambdas: list[float] = field(default_factory=lambda: [0.25, 1.0])  # held-out loss at these prices too
    eval_batch_size: int = 8
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun (WORLD_SIZE > 1); fsdp shards the weights
    # In-place distillation (docs/method.md, "Distillation"): on pruned steps each sequence's loss is
    # w * KL(teacher || sub-network) + (1 - w) * NLL, summed over its predicted tokens; 0 = the data NLL
    # alone (dense steps always train on the data). ``self``: the same weights with every gate on (no
    # gradient); ``base``: the frozen base model (LoRA off; with weights: full, a frozen copy in memory).
    distill_weight: float = 0.0
    teacher: Literal["self", "base"] = "self"
    # The sandwich rule (US-Nets): each step trains the dense network, the price of ``sandwich_min_size`` (solved
    # from the current push), ``sandwich_sizes`` and ``sandwich_random`` prices ~ Exp(rate), into one optimizer step.
    sandwich: bool = False
    sandwich_min_size: float = 0.4
    sandwich_random: int = 2
    # further target sizes trained every step (each its own pass at the price solved from the current push),
    # between the dense network and the smallest: the sizes a user will export, e.g. [0.75, 0.5]
    sandwich_sizes: list[float] = field(default_factory=list)
    # The last N joint steps train the sandwich sizes' exported keep-sets, guide and push frozen (training/settle.py)
    settle_steps: int = 0


@dataclass
class CalibrationConfig:
    """``ppn calibrate``: the learning rate beta of the Gibbs posterior by information matching over
    independent units of text (docs/method.md, "Calibrating beta"; ppn_bayes/analysis/calibration.py)."""

    unit: Literal["chapters", "documents"] = "chapters"  # what counts as one independent observation
    units: int = 16  # units sampled (chapters/documents with >= blocks_per_unit training blocks)
    blocks_per_unit: int = 4  # blocks drawn from each sampled unit (>= 2: within- vs between-unit spread)
    draws: int = 2  # common (lambda, mask) draws per block, lambda at stratified Exp(rate) quantiles
    max_dims: int | None = None  # score directions kept (top curvature); None = min(#scores, (units - 1) // 3)
    steps: int = 60  # guide-only SVI steps that re-derive the posterior at the calibrated beta (0: record only)
    lr: float | None = None  # their learning rate; None = the guide-only phase's (train.guide_lr, else train.lr_guide)
    bootstrap: int = 200  # unit-bootstrap replicates for beta's standard error
    seed: int = 0


@dataclass
class Recipe:
    name: str = "run"
    preset: Literal["ours", "paper"] = "ours"
    model: ModelConfig = field(default_factory=ModelConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    push: PushConfig = field(default_factory=PushConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's choices, applied before the recipe's own keys.
PAPER_PRESET: dict[str, dict[str, Any]] = {
    "units": {"kinds": ["heads", "groups"], "group_size": 1, "score_anchor": "norm"},
    "prior": {"kind": "none"},
    "push": {"rate": 0.3, "p_dense": 1.0 / 3.0, "temperature": 0.5, "control_points": 10, "amplitude": True,
             "init": "linear", "thresholds": "per_layer"},
    "train": {"betas": [0.9, 0.95], "weight_decay": 0.1, "schedule": "cosine"},
}

_UNIT_KINDS = ("layers", "heads", "groups")
# No nested or adjacent unbounded digit runs: linear time on a hostile 100,000-digit string.
_EXPONENT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and len(value) <= 64 and _EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short(value)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping of keys, got {short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0][:60], sorted(names), n=1)
        hint = f"; did you mean {where}{close[0]}?" if close else ""
        key = unknown[0] if len(unknown[0]) <= 40 else unknown[0][:40] + "..."  # the input, cut: the list matters more
        raise ConfigError(f"unknown key {where}{key}; valid keys here: {', '.join(sorted(names))}{hint}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(recipe: Recipe) -> Recipe:
    """Range checks that types alone cannot express; each names its key."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    _check_finite(recipe)
    u, p, pu, t, d, g = recipe.units, recipe.prior, recipe.push, recipe.train, recipe.data, recipe.guide
    check_seed(t.seed, "train.seed")
    need(bool(u.kinds) and all(k in _UNIT_KINDS for k in u.kinds), "units.kinds",
         f"choose one or more of {list(_UNIT_KINDS)}, got {short(u.kinds)}")
    need(u.group_size >= 1, "units.group_size", "must be >= 1 (1 = single neurons)")
    need(u.anchor_blocks >= 1, "units.anchor_blocks", f"must be >= 1, got {u.anchor_blocks}")
    for key, val in (("prior.global_scale", p.global_scale), ("prior.slab_scale", p.slab_scale),
                     ("prior.slab_df", p.slab_df), ("prior.child_scale", p.child_scale),
                     ("push.rate", pu.rate), ("push.temperature", pu.temperature),
                     ("push.threshold_max", pu.threshold_max), ("train.tempering", t.tempering),
                     ("guide.init_scale", g.init_scale)):
        need(val > 0, key, f"must be > 0, got {val}")
    need(pu.init_half_price is None or pu.init_half_price > 0, "push.init_half_price",
         f"must be > 0 or null, got {pu.init_half_price}")
    need(0.0 <= pu.p_dense < 1.0, "push.p_dense", f"must be in [0, 1), got {pu.p_dense}")
    need(pu.control_points >= 4, "push.control_points", "a cubic B-spline needs >= 4 control points")
    need(pu.thresholds == "shared" or p.kind == "none", "push.thresholds",
         "per_layer curves are confounded with the latent layer offsets (docs/method.md, Identifiability); "
         "use push.thresholds=shared, or prior.kind=none (the paper preset)")
    need(g.rank >= 1, "guide.rank", "must be >= 1")
    need(d.block_size >= 8, "data.block_size", f"must be >= 8 tokens, got {d.block_size}")
    need(d.train_blocks is None or d.train_blocks >= 1, "data.train_blocks", "must be >= 1 or null")
    need(d.val_blocks >= 1, "data.val_blocks", "must be >= 1")
    if d.bootstrap_seed is not None:
        check_seed(d.bootstrap_seed, "data.bootstrap_seed")
    for key, val in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                     ("train.lora_rank", t.lora_rank), ("train.log_every", t.log_every),
                     ("train.checkpoint_every", t.checkpoint_every)):
        need(val >= 1, key, f"must be >= 1, got {val}")
    for key, val in (("train.lr_guide", t.lr_guide), ("train.lr_push", t.lr_push), ("train.lr_weights", t.lr_weights)):
        need(val > 0, key, f"must be > 0, got {val}")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)")
    need(t.weight_decay >= 0 and t.clip_grad >= 0 and t.warmup_steps >= 0 and t.eval_every >= 0,
         "train", "weight_decay, clip_grad, warmup_steps and eval_every must be >= 0")
    need(all(x > 0 for x in t.eval_lambdas), "train.eval_lambdas", f"prices must be > 0, got {short(t.eval_lambdas)}")
    for key, val in (("train.guide_steps", t.guide_steps), ("train.guide_push_steps", t.guide_push_steps)):
        need(val >= 0, key, f"must be >= 0, got {val}")
    need(t.guide_average_steps == 0 or t.guide_average_steps >= 2, "train.guide_average_steps",
         f"must be 0 (off) or >= 2 (a window of one iterate has no spread), got {t.guide_average_steps}")
    need(t.guide_lr is None or t.guide_lr > 0, "train.guide_lr", f"must be > 0 or null, got {t.guide_lr}")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    need(0.0 <= t.distill_weight <= 1.0, "train.distill_weight",
         f"must be in [0, 1] (0 = data loss only, 1 = distillation only), got {t.distill_weight}")
    need(0.0 < t.sandwich_min_size < 1.0, "train.sandwich_min_size",
         f"must be in (0, 1) (a fraction of decoder parameters, e.g. 0.4), got {t.sandwich_min_size}")
    need(t.sandwich_random >= 0, "train.sandwich_random", f"must be >= 0, got {t.sandwich_random}")
    sizes = t.sandwich_sizes
    need(all(t.sandwich_min_size < x < 1.0 for x in sizes) and len(set(sizes)) == len(sizes), "train.sandwich_sizes",
         f"must be distinct fractions in (sandwich_min_size {t.sandwich_min_size:g}, 1), got {short(sizes)}")
    need(t.sandwich or not sizes, "train.sandwich_sizes", "applies to the sandwich rule; set train.sandwich: true, or train.sandwich_sizes: []")
    need(0 <= t.settle_steps < t.steps, "train.settle_steps", f"must be in [0, train.steps), got {t.settle_steps}")
    need(not t.settle_steps or (t.sandwich and t.weights != "frozen" and not t.guide_steps), "train.settle_steps",
         "trains the sandwich sizes' keep-sets: set train.sandwich: true, weights: lora|full, guide_steps: 0 (or this to 0)")
    c = recipe.calibration
    check_seed(c.seed, "calibration.seed")
    need(c.units >= 3, "calibration.units", f"must be >= 3 units to estimate their spread, got {c.units}")
    need(c.blocks_per_unit >= 2, "calibration.blocks_per_unit",
         f"must be >= 2 (within- and between-unit spread), got {c.blocks_per_unit}")
    need(c.draws >= 1, "calibration.draws", f"must be >= 1, got {c.draws}")
    need(c.max_dims is None or c.max_dims >= 1, "calibration.max_dims", f"must be >= 1 or null, got {c.max_dims}")
    need(c.steps >= 0, "calibration.steps", f"must be >= 0 (0 records beta only), got {c.steps}")
    need(c.lr is None or c.lr > 0, "calibration.lr", f"must be > 0 or null (train.guide_lr or train.lr_guide), got {c.lr}")
    need(c.bootstrap >= 0, "calibration.bootstrap", f"must be >= 0, got {c.bootstrap}")
    need(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
         f"use auto, cpu, cuda or cuda:N, got {short(t.device)}")
    return recipe


def check_seed(seed: Any, key: str = "--seed") -> int:
    """A seed must be an integer in ``[0, 2**32 - 1]`` (what every random generator downstream accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{key}: a seed must be a whole number from 0 to {SEED_MAX}, got {short(seed)}; "
                          "use e.g. 0")
    return seed


def _check_finite(recipe: Recipe) -> None:
    """Every number of a recipe must be finite (YAML reads ``.inf`` and ``.nan`` as floats): checked
    before the range rules, with the key's default as the example fix (never the bad value again)."""
    for section in dataclasses.fields(Recipe):
        cfg = getattr(recipe, section.name)
        if not dataclasses.is_dataclass(cfg):
            continue
        defaults = type(cfg)()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{section.name}.{f.name}: must be a finite number, got {short(value)}; "
                                  f"use e.g. {getattr(defaults, f.name)} (the default)")


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a parsed YAML mapping into a :class:`Recipe` (preset defaults first, then the keys)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections (model, units, ...), got {type(data).__name__}")
    preset = data.get("preset", "ours")
    if preset not in ("ours", "paper"):
        raise ConfigError(f"preset: expected one of 'ours', 'paper', got {short(preset)}")
    merged = _merge(PAPER_PRESET, data) if preset == "paper" else data
    return validate(_build(Recipe, merged, ""))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe (safe loader only), after ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:
        path = bundled_recipe(path.name)  # `ppn fit smollm2-demo` takes the packaged copy
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; pass a YAML file such as inference/smollm2-demo.yaml")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), f"recipe {path}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    if overrides and (data is None or isinstance(data, dict)):
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data)


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load``, refusing a document whose aliases expand beyond :data:`MAX_YAML_NODES` nodes
    (or refer to themselves) before it is constructed: the composed node graph is walked once, each
    node's expanded size memoized, so a billion-laughs document is measured in microseconds."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # composing only: aliases stay shared nodes
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:
            key = id(n)
            if key in sizes:
                if sizes[key] < 0:
                    raise ConfigError(f"{what} has an alias that refers to itself; write the value out")
                return sizes[key]
            sizes[key] = -1
            total = 1
            if isinstance(n, yaml.SequenceNode):
                total += sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total += sum(size(k) + size(v) for k, v in n.value)
            if total > MAX_YAML_NODES:
                raise ConfigError(f"{what} expands to more than {MAX_YAML_NODES} YAML values through its aliases "
                                  "(&name / *name); a recipe needs a few dozen: write it without nested aliases")
            sizes[key] = total
            return total

        size(node)
        return loader.construct_document(node)
    except RecursionError:  # composing, measuring or constructing a document nested thousands deep
        raise ConfigError(f"{what} is nested too deeply for a recipe; write it flat") from None
    finally:
        loader.dispose()


def apply_overrides(data: dict | None, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (``--set train.steps=20``) to a parsed recipe mapping.

    Each value is parsed with the safe YAML loader (``20`` is an int, ``[0.5, 1]`` a list, ``null`` None),
    so an override is validated exactly like the same key written in the file.
    """
    out = _merge({}, data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {short(item)} is not KEY=VALUE; write e.g. --set train.steps=20")
        try:
            value = safe_yaml(raw, f"override {short(item)}") if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {short(item)}: the value is not valid YAML; quote it") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {short(item)}: {part[:60]} is not a section; sections are "
                                  "model, units, prior, push, guide, data, train")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
