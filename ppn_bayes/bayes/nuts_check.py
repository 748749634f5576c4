"""The NUTS gold standard: NUTS against mean-field SVI on the layer-gate-only model.

:func:`nuts_check`: Pyro's NUTS on the layer-gate-only model (a handful of latents, frozen
weights, a fixed calibration batch, fixed ``lam``), R-hat and ESS per site, and the comparison of
the NUTS posterior of the layer scores with a mean-field SVI fit of the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyro
import torch
from pyro.infer import MCMC, NUTS, Predictive, Trace_ELBO
from scipy import stats

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.bayes.diagnostics import convergence, samples_to_inference_data
from ppn_bayes.bayes.guides import make_guide
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.bayes.psis import deterministic_push
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
from ppn_bayes.errors import ConfigError


# ------------------------------------------------------------------ NUTS vs SVI
@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Weights without gradients for the block (NUTS and the check's SVI move only the latents)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gate_only_model(gated: GatedLM | PPNModel, batch_size: int, prior: PriorConfig | None = None,
                    tokens_per_sequence: int = 2, tempering: float = 1.0) -> PPNModel:
    """The layer-gate-only PPN model for the NUTS check (``mask: expected``, no amplitudes).

    A :class:`PPNModel` is used as it is (its trained thresholds and levels included); a
    :class:`GatedLM` gets a fresh model with ``num_sequences = batch_size`` (no up-scaling of the
    calibration batch: the posterior is that of the batch itself).
    """
    if isinstance(gated, PPNModel):
        model = gated
    else:
        model = PPNModel(gated, prior or PriorConfig(kind="normal"), PushConfig(mask="expected", amplitude=False),
                         num_sequences=batch_size, tokens_per_sequence=tokens_per_sequence, tempering=tempering)
    if tuple(model.inventory.kinds) != ("layers",):
        raise ConfigError(f"the NUTS check gates layers only, this model gates {list(model.inventory.kinds)}; "
                          "wrap the model with gate(model, kinds=('layers',))")
    if model.prior.config.kind == "none":
        raise ConfigError("prior kind 'none' has no latent scores to check; use prior kind 'normal' or 'horseshoe'")
    return model


def run_nuts(model: PPNModel, args: tuple, kwargs: dict, num_warmup: int, num_samples: int, chains: int,
             seed: int, max_tree_depth: int = 6) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``chains`` sequential NUTS chains (separate seeds; a torch LM does not fork well), stacked
    ``[chains, num_samples, ...]``, and the divergence count per chain."""
    per_chain, divergences = [], []
    for c in range(chains):
        pyro.set_rng_seed(seed + 1000 * c)
        kernel = NUTS(model, max_tree_depth=max_tree_depth, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        per_chain.append(mcmc.get_samples())
        divergences.append(len(mcmc.diagnostics()["divergences"]["chain 0"]))
    samples = {k: torch.stack([s[k] for s in per_chain]) for k in per_chain[0]}
    return samples, {"divergences": divergences}


def fit_svi(model: PPNModel, args: tuple, kwargs: dict, steps: int, lr: float, seed: int,
            guide_cfg: GuideConfig | None = None, num_particles: int = 2, lr_push: float | None = None,
            hide: tuple[str, ...] = ()):
    """Mean-field SVI of the guide (weights frozen; the push too unless ``lr_push`` is given, then its
    splines and, where trained, score levels are learned jointly, as in training); lr decays linearly
    to lr/10 so the final parameters sit near the optimum rather than wherever the last noisy step
    left them. ``hide``: model sites left out of the objective (``poutine.block``), e.g. ``("compute",)``
    to fit the posterior of the scores' own prior without the price factor (simulation-based
    calibration draws its truths from that prior)."""
    pyro.set_rng_seed(seed)
    guide = make_guide(model.prior, guide_cfg or GuideConfig())
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
    target = pyro.poutine.block(model, hide=list(hide)) if hide else model
    loss_fn = (lambda *a, **k: elbo.differentiable_loss(target, guide, *a, **k)) if hide else elbo(model, guide)
    groups = [{"params": list(guide.parameters()), "lr": lr}]
    if lr_push is not None:
        push = [p for n, p in model.named_parameters() if not n.startswith("gated.") and p.requires_grad]
        groups.append({"params": push, "lr": lr_push})
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(*args, **kwargs)
        loss.backward()
        opt.step()
        sched.step()
    return guide


def layer_score_draws(model: PPNModel, samples: dict[str, torch.Tensor] | None = None, guide=None,
                 num_samples: int = 1000) -> torch.Tensor:
    """Layer scores ``[S, L]`` for given latent draws (NUTS) or drawn from a guide (SVI)."""
    with torch.no_grad():
        if samples is not None:
            pred = Predictive(model.prior, posterior_samples=samples, return_sites=["score_layers"])
        else:
            pred = Predictive(model.prior, guide=guide, num_samples=num_samples, return_sites=["score_layers"])
        return pred()["score_layers"].reshape(-1, model.inventory.num_layers)


def compare_scores(nuts: torch.Tensor, svi: torch.Tensor) -> dict[str, Any]:
    """Means, sds and their agreement: Spearman and Kendall rank correlation of the means, the largest
    absolute gap, and the largest gap in units of the NUTS sd."""
    mn, sn = nuts.mean(0).double(), nuts.std(0).double()
    ms, ss = svi.mean(0).double(), svi.std(0).double()
    gap = (ms - mn).abs()
    return {
        "nuts_mean": mn.tolist(), "nuts_sd": sn.tolist(), "svi_mean": ms.tolist(), "svi_sd": ss.tolist(),
        "spearman": float(stats.spearmanr(mn.numpy(), ms.numpy()).statistic),
        "kendall": float(stats.kendalltau(mn.numpy(), ms.numpy()).statistic),
        "max_abs_diff": float(gap.max()),
        "max_diff_in_nuts_sd": float((gap / sn.clamp_min(1e-12)).max()),
        "sd_ratio": (ss / sn.clamp_min(1e-12)).tolist(),
    }


def nuts_check(gated: GatedLM | PPNModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, lam: float = 1.0, prior: PriorConfig | None = None, tempering: float = 1.0,
               num_warmup: int = 200, num_samples: int = 200, chains: int = 2, svi_steps: int = 600,
               svi_lr: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """NUTS on the layer-gate-only model vs mean-field SVI of the same model, on one fixed batch.

    Returns ``sites``: R-hat and bulk ESS per site (worst element, :func:`convergence`; two chains
    by default, run one after the other), the divergences per chain, the NUTS and SVI means and
    sds of the layer scores and their agreement (:func:`compare_scores`), and ``idata`` (the NUTS
    draws as arviz data, latents and scores).
    """
    if chains < 1 or num_samples < 4:
        raise ConfigError("nuts_check needs chains >= 1 and num_samples >= 4")
    model = gate_only_model(gated, input_ids.shape[0], prior, input_ids.shape[1], tempering)
    args, kwargs = (input_ids,), {"attention_mask": attention_mask, "lam": float(lam)}
    with frozen(model.gated), deterministic_push(model):
        samples, stats_ = run_nuts(model, args, kwargs, num_warmup, num_samples, chains, seed)
        nuts_scores = layer_score_draws(model, {k: v.flatten(0, 1) for k, v in samples.items()})
        guide = fit_svi(model, args, kwargs, svi_steps, svi_lr, seed)
        svi_scores = layer_score_draws(model, guide=guide, num_samples=2000)
    idata = samples_to_inference_data({**samples, "score_layers": nuts_scores}, model.inventory, chains)
    per_site = convergence(idata)
    return {"sites": per_site, "divergences": stats_["divergences"], "chains": chains,
            "num_warmup": num_warmup, "num_samples": num_samples, "lam": float(lam),
            "scores": compare_scores(nuts_scores, svi_scores), "idata": idata, "guide": guide}
