"""Hierarchical shrinkage priors over unit scores: "the strings of the puppet".

Every unit ``u`` has an importance score on the logit scale, anchored on its weight norm ``r_u`` (the
paper's score) plus a latent offset that the data can move::

    a_u = c_kind + z_u + delta_u,     z_u = log r_u - mean_{u' of the same kind} log r_u'

``c_kind`` is a point estimate (one per unit kind), ``z_u`` is the centred log-norm (centring per kind
makes ``c_kind`` the level and keeps heads, groups and layers, whose norms differ by orders of
magnitude, on one scale). The offsets are latent, non-centred, and pooled:

Regularized horseshoe (default; Piironen & Vehtari 2017, Appendix C.1)::

    tau0    ~ HalfCauchy(global_scale)                  global shrinkage
    lam_l   ~ HalfCauchy(1)                             layer-local scales
    caux    ~ InvGamma(slab_df / 2, slab_df / 2),   c^2 = slab_scale^2 * caux
    lamt_l  = sqrt(c^2 lam_l^2 / (c^2 + tau0^2 lam_l^2))   (the slab caps large scales at c)
    e_l ~ N(0, 1),          delta_l  = tau0 * lamt_l * e_l
    sig_l^h ~ HalfNormal(child_scale),  e_lh ~ N(0, 1),  delta_lh = delta_l + sig_l^h * e_lh
    sig_l^g ~ HalfNormal(child_scale),  e_lg ~ N(0, 1),  delta_lg = delta_l + sig_l^g * e_lg

Heads and channel groups pool toward their layer's offset, so a layer whose heads all look
unimportant moves as a whole, and the horseshoe lets a few layers stand out while shrinking the rest
to the norm-based ordering (``delta = 0`` is the paper). Plain Normal hierarchy (``kind: normal``):
``s ~ HalfNormal(global_scale)``, ``delta_l = s * e_l``, children as above. ``kind: none`` has no latent
sites at all (the paper's preset: scores are the norms).

**Centring (``centre: true``, the default of the ``ours`` preset).** The gates see a score only
through ``a_u - tau_k(lambda)``, and the threshold curves ``tau_k`` (one per kind, shared by all
layers) are point estimates. A shift common to every layer offset, or to every child deviation of
a kind, would move all scores of a kind together, which is exactly what a shift of ``tau_k`` does:
a latent direction with the same effect on the gates as a point estimate. So the offsets enter
centred::

    delta_l  <- delta_l - mean_l delta_l                       (sum over layers 0)
    delta_lh <- delta_l + (sig_l^h e_lh - mean_h sig_l^h e_lh)   (a layer's heads average to delta_l)

The latents then carry only what no point estimate can: each layer's level relative to the others
and each unit's share within its layer; the per-kind level is the shared curve's (the level
``c_kind`` is then frozen at 0, :class:`~ppn_bayes.bayes.model.PPNModel`). The sample sites and their
laws are unchanged; the centring is a deterministic map of them, so the one direction of ``e``
that it removes is identified by the prior alone, as any direction the data do not inform.
``centre: false`` is the uncentred form of runs written before this correction.

Non-centred forms keep the posterior geometry benign for SVI and NUTS (NumPyro's "bad posterior
geometry" notes); the scales are clamped below at ``1e-6`` (see docs/method.md, "Numerical guards").

The prior runs in float32 whatever autocast says (:func:`ppn_bayes.device.fp32`).

The scores are recorded as ``pyro.deterministic`` sites ``score_layers``/``score_heads``/
``score_groups`` so that :class:`pyro.infer.Predictive` returns posterior draws of them directly.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.config import PriorConfig
from ppn_bayes.device import fp32

# Pyro parameters live on their modules (Pyro's examples/svi_torch.py pattern), so torch optimizers,
# state_dict() and DDP see them; nothing goes through the global param store.
pyro.settings.set(module_local_params=True)

SCALE_FLOOR = 1e-6
KINDS = ("layers", "heads", "groups")


def centred_log_norms(norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``log r_u`` minus its mean over the units of the same kind (``z_u`` above)."""
    out = {}
    for kind, r in norms.items():
        logr = r.double().clamp_min(1e-12).log()
        out[kind] = (logr - logr.mean()).float()
    return out


class ScorePrior(PyroModule):
    """Samples the latent score offsets and returns the unit scores ``{"layers": [L], "heads": [L, H], "groups": [L, G]}``.

    Only the unit kinds in ``inventory.kinds`` get scores; layer offsets are sampled whenever any kind
    is gated because they are the pooling centre of heads and groups.
    """

    def __init__(self, inventory: UnitInventory, norms: dict[str, torch.Tensor], config: PriorConfig):
        super().__init__()
        self.inventory = inventory
        self.config = config
        self.kinds = tuple(inventory.kinds)
        z = centred_log_norms({k: norms[k] for k in self.kinds})
        for kind in KINDS:
            self.register_buffer(f"z_{kind}", z.get(kind, torch.zeros(0)))
        # c_kind: point estimates, initialised so that every unit starts well above the lambda = 0
        # threshold (-1/T): a_u ~ c + z_u with z_u roughly in [-1, 1].
        self.level = PyroParam(torch.zeros(len(self.kinds)))

    # ---------------------------------------------------------------- sampling
    def _layer_offsets(self) -> torch.Tensor:
        cfg, L = self.config, self.inventory.num_layers
        device = self.z_layers.device if self.z_layers.numel() else self.level.device
        one = torch.ones((), device=device)
        with pyro.plate("layer_plate", L, dim=-1):
            e_l = pyro.sample("e_layers", dist.Normal(0.0 * one, one))
        if cfg.kind == "normal":
            s = pyro.sample("global_scale", dist.HalfNormal(cfg.global_scale * one)).clamp_min(SCALE_FLOOR)
            return s * e_l
        tau0 = pyro.sample("tau0", dist.HalfCauchy(cfg.global_scale * one)).clamp_min(SCALE_FLOOR)
        caux = pyro.sample("caux", dist.InverseGamma(0.5 * cfg.slab_df * one, 0.5 * cfg.slab_df * one))
        c2 = (cfg.slab_scale**2) * caux
        with pyro.plate("layer_plate_scales", L, dim=-1):
            lam = pyro.sample("lam_layers", dist.HalfCauchy(one)).clamp_min(SCALE_FLOOR)
        lam_tilde = torch.sqrt(c2 * lam**2 / (c2 + tau0**2 * lam**2))
        return tau0 * lam_tilde * e_l

    def _child_offsets(self, kind: str, parent: torch.Tensor, width: int) -> torch.Tensor:
        L = self.inventory.num_layers
        one = torch.ones((), device=parent.device)
        with pyro.plate(f"{kind}_layer_plate", L, dim=-1):
            sig = pyro.sample(f"sig_{kind}", dist.HalfNormal(self.config.child_scale * one)).clamp_min(SCALE_FLOOR)
        with pyro.plate(f"{kind}_unit_plate", width, dim=-1), pyro.plate(f"{kind}_row_plate", L, dim=-2):
            e = pyro.sample(f"e_{kind}", dist.Normal(0.0 * one, one))
        dev = sig.unsqueeze(-1) * e
        if self.config.centre:
            dev = dev - dev.mean(-1, keepdim=True)
        return parent.unsqueeze(-1) + dev

    @fp32
    def forward(self) -> dict[str, torch.Tensor]:
        inv = self.inventory
        levels = dict(zip(self.kinds, self.level.unbind(-1)))
        if self.config.kind == "none":
            offsets = {k: torch.zeros_like(getattr(self, f"z_{k}")) for k in self.kinds}
        else:
            d_layer = self._layer_offsets()
            if self.config.centre:
                d_layer = d_layer - d_layer.mean(-1, keepdim=True)
            offsets = {"layers": d_layer}
            if "heads" in self.kinds:
                offsets["heads"] = self._child_offsets("heads", d_layer, inv.num_heads)
            if "groups" in self.kinds:
                offsets["groups"] = self._child_offsets("groups", d_layer, inv.num_groups)
        scores = {}
        for kind in self.kinds:
            scores[kind] = pyro.deterministic(f"score_{kind}", levels[kind] + getattr(self, f"z_{kind}") + offsets[kind])
        return scores

    @torch.no_grad()
    @fp32
    def initial_scores(self) -> dict[str, torch.Tensor]:
        """Scores with every latent offset at its prior centre 0: ``c_kind + z_u`` (for calibration)."""
        levels = dict(zip(self.kinds, self.level.detach().unbind(-1)))
        return {k: levels[k] + getattr(self, f"z_{k}") for k in self.kinds}

    def latent_names(self) -> list[str]:
        """Names of the latent sample sites, in a fixed order (empty for ``kind: none``)."""
        if self.config.kind == "none":
            return []
        names = ["e_layers"] + (["global_scale"] if self.config.kind == "normal" else ["tau0", "caux", "lam_layers"])
        for kind in ("heads", "groups"):
            if kind in self.kinds:
                names += [f"sig_{kind}", f"e_{kind}"]
        return names
