"""The posterior as a small, model-free object: guide + push + unit norms, saved and loaded as files.

Everything after training (keep-sets, inclusion probabilities, reports, diagnostics) needs only
these few kilobytes, never the language model. :func:`save_posterior` writes them into a run
directory; :class:`Posterior` rebuilds the score prior, the guide and the push from them.

Files (all written atomically):

* ``posterior.json``: the unit inventory, the prior/push/guide configs, the tempering factor.
* ``units.safetensors``: the unit weight norms (score anchors), ``norm_layers`` etc.
* ``guide.safetensors``: the guide's parameters (``guide_state``).
* ``push.safetensors``: the push's splines and amplitude scales and the prior's score levels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyro
import torch
from pyro.infer import Predictive

from ppn_bayes.backbone.units import ALL_KINDS, Dims, UnitInventory
from ppn_bayes.bayes.guides import guide_state, make_guide
from ppn_bayes.bayes.prior import ScorePrior
from ppn_bayes.bayes.push import Push
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig, recipe_from_dict
from ppn_bayes.errors import ConfigError, RunError
from ppn_bayes.files import atomic_save_tensors, atomic_write_bytes
from ppn_bayes.schema import RUN_FIX, Bool, Int, List, Map, Num, Obj, Str, check_path, load_json, load_tensors

FILES = ("posterior.json", "units.safetensors", "guide.safetensors", "push.safetensors")

_DIMS = {f.name: (Bool() if f.type in ("bool", bool) else Int(0 if f.name == "layer_extra_params" else 1))
         for f in dataclasses.fields(Dims)}
_DIMS["mlp_matrices"] = Int(2, 3)
#: ``posterior.json``: the inventory (checked field by field), the three configs (checked by the recipe
#: validator, so a value the recipe would refuse is refused here too), the tempering factor.
POSTERIOR_SCHEMA = Obj(required={
    "inventory": Obj(required={"dims": Obj(required=_DIMS), "group_size": Int(1), "kinds": List(Str(ALL_KINDS))},
                     optional={"family": Str(), "embedding_params": Int(0)}),
    "prior": Map(), "push": Map(), "guide": Map()}, optional={"tempering": Num(0, open_lo=True)})
_INCOMPLETE = "the run directory is incomplete (re-run or --resume `ppn fit`)"


def _load_tensors(path: Path, want: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A posterior tensor file, its names and shapes checked against ``want`` before it is read."""
    return load_tensors(path, RUN_FIX, want, missing=_INCOMPLETE)


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def save_posterior(run_dir: Path, prior: ScorePrior, push: Push, guide, prior_cfg: PriorConfig,
                   push_cfg: PushConfig, guide_cfg: GuideConfig, tempering: float = 1.0) -> None:
    """Write the four posterior files of a run."""
    run_dir = Path(run_dir)
    meta = {
        "inventory": prior.inventory.to_dict(),
        "prior": dataclasses.asdict(prior_cfg),
        "push": dataclasses.asdict(push_cfg),
        "guide": dataclasses.asdict(guide_cfg),
        "tempering": tempering,
    }
    atomic_save_tensors({f"norm_{k}": getattr(prior, f"z_{k}") for k in prior.kinds}, run_dir / "units.safetensors")
    atomic_save_tensors(guide_state(guide) or {"_empty": torch.zeros(0)}, run_dir / "guide.safetensors")
    state = {f"push.{k}": v for k, v in push.state_dict().items() if not k.startswith("cost_")}
    state["prior.level"] = prior.level.detach()
    atomic_save_tensors(state, run_dir / "push.safetensors")
    atomic_write_bytes(run_dir / "posterior.json", json.dumps(meta, indent=2).encode())


class Posterior:
    """Posterior over unit scores and the push's thresholds, rebuilt from a run's small files.

    ``draws(k)`` gives ``k`` joint posterior draws of every unit score (joint, not per-unit
    marginals: correlated gates stay correlated); ``thresholds(lam)`` and ``inclusion(scores, lam)``
    are the push's; the inventory knows every unit's cost.
    """

    def __init__(self, inventory: UnitInventory, prior: ScorePrior, push: Push, guide, tempering: float = 1.0):
        self.inventory = inventory
        self.prior = prior
        self.push = push
        self.guide = guide
        self.tempering = tempering

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> Posterior:
        """Rebuild the posterior of a run directory, every file validated first (one-line RunErrors):
        ``posterior.json`` against :data:`POSTERIOR_SCHEMA` and the recipe's rules, then each tensor
        file's names and shapes against the objects it is loaded into (``units`` against the
        inventory, ``push`` against a fresh :class:`Push`, ``guide`` against a fresh guide), and
        finiteness."""
        run_dir = Path(run_dir)
        check_path(run_dir)
        meta_path = run_dir / "posterior.json"
        if not meta_path.is_file():
            raise RunError(f"{run_dir} has no posterior.json; pass a run directory written by `ppn fit`")
        meta = load_json(meta_path, POSTERIOR_SCHEMA, RUN_FIX)
        try:
            inventory = UnitInventory.from_dict(meta["inventory"])
            # Runs written before the identifiability correction have neither push.thresholds nor
            # prior.centre: per-layer curves and uncentred offsets, which is what they were trained with.
            # (New recipes may not combine per-layer curves with latents, so validate them as shared.)
            legacy = "thresholds" not in meta["push"]
            push_meta = {**meta["push"], "thresholds": "shared"} if legacy else meta["push"]
            cfg = recipe_from_dict({"prior": {"centre": False, **meta["prior"]}, "push": push_meta,
                                    "guide": meta["guide"]})
        except ConfigError as err:
            raise RunError(f"{meta_path}: {err}; {RUN_FIX}") from None
        prior_cfg, guide_cfg = cfg.prior, cfg.guide
        push_cfg = dataclasses.replace(cfg.push, thresholds="per_layer") if legacy else cfg.push
        dims = inventory.dims
        if dims.num_heads % dims.num_kv_heads:
            raise RunError(f"{meta_path}: inventory.dims: num_heads {dims.num_heads} is not a multiple of "
                           f"num_kv_heads {dims.num_kv_heads}; {RUN_FIX}")
        shape = {"layers": (dims.num_layers,), "heads": (dims.num_layers, dims.num_heads),
                 "groups": (dims.num_layers, inventory.num_groups)}
        units = _load_tensors(run_dir / "units.safetensors", {f"norm_{k}": shape[k] for k in inventory.kinds})
        # The prior re-centres log norms; z is already centred, so exp(z) round-trips exactly.
        norms = {k: units[f"norm_{k}"].exp() for k in inventory.kinds}
        prior = ScorePrior(inventory, norms, prior_cfg)
        push = Push(inventory, push_cfg)
        fresh = {f"push.{k}": v for k, v in push.state_dict().items() if not k.startswith("cost_")}
        mismatch = RunError(f"{run_dir / 'push.safetensors'} does not match posterior.json (push.thresholds: "
                            f"{push_cfg.thresholds}); the two files come from different runs: re-run `ppn fit`")
        try:
            state = _load_tensors(run_dir / "push.safetensors",
                                  {**_shapes(fresh), "prior.level": tuple(prior.level.shape)})
        except RunError as err:
            if "thresholds_spline" in str(err):  # per-layer curves against a shared-curve posterior.json, or back
                raise mismatch from None
            raise
        push_state = {k[len("push."):]: v for k, v in state.items() if k.startswith("push.")}
        try:
            push.load_state_dict({**push.state_dict(), **push_state})
        except RuntimeError:
            raise mismatch from None
        with torch.no_grad():
            prior.level.copy_(state["prior.level"])
        guide = make_guide(prior, guide_cfg)
        gstate = _load_tensors(run_dir / "guide.safetensors", _shapes(guide_state(guide)) or {"_empty": (0,)})
        gstate.pop("_empty", None)
        if gstate:
            guide.load_state_dict(gstate)
        return cls(inventory, prior, push, guide, float(meta.get("tempering", 1.0)))

    @torch.no_grad()
    def draws(self, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``num_samples`` joint posterior draws: ``{"layers": [K, L], "heads": [K, L, H], "groups": [K, L, G]}``
        plus every latent site (``e_layers``, ``tau0``, ...)."""
        pyro.set_rng_seed(seed)
        sites = [f"score_{k}" for k in self.inventory.kinds] + self.prior.latent_names()
        pred = Predictive(self.prior, guide=self.guide, num_samples=num_samples, return_sites=sites)
        out = pred()
        inv = self.inventory
        shapes = {"layers": (inv.num_layers,), "heads": (inv.num_layers, inv.num_heads),
                  "groups": (inv.num_layers, inv.num_groups)}
        draws = {k: v for k, v in out.items() if not k.startswith("score_")}
        for kind in inv.kinds:
            draws[kind] = out[f"score_{kind}"].reshape(num_samples, *shapes[kind])
        return draws

    @torch.no_grad()
    def median_scores(self) -> dict[str, torch.Tensor]:
        """Scores at the guide's median (the point estimate used when no quantile is asked for)."""
        med = self.guide.median()
        tr = pyro.poutine.trace(pyro.poutine.condition(self.prior, data=med)).get_trace()
        return {k: tr.nodes[f"score_{k}"]["value"] for k in self.inventory.kinds}

    def thresholds(self, lam: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.push.thresholds(lam)

    def inclusion(self, scores: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.push.inclusion(scores, lam)
