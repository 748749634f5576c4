"""Small real run directories and hand-made posteriors for the posterior-to-mask tests.

``make_run_dir`` trains a :class:`~ppn_bayes.bayes.model.PPNModel` on a tiny random Llama for a few SVI
steps and writes the posterior files with :func:`~ppn_bayes.bayes.posterior.save_posterior`: the same
files a real ``ppn fit`` leaves, in about a second. ``StubPosterior`` has fixed, known draws so that
inclusion probabilities can be checked against hand computations.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch

from ppn_bayes.backbone.gated import gate
from ppn_bayes.backbone.units import Dims, UnitInventory
from ppn_bayes.bayes.guides import make_guide
from ppn_bayes.bayes.model import PPNModel
from ppn_bayes.bayes.posterior import save_posterior
from ppn_bayes.bayes.push import Push
from ppn_bayes.config import GuideConfig, PriorConfig, PushConfig
from tests.tiny_models import VOCAB, tiny_model


def make_run_dir(path: Path, family: str = "llama", kinds: tuple[str, ...] = ("layers", "heads", "groups"),
                 group_size: int = 16, steps: int = 3, seed: int = 0, prior: str = "horseshoe",
                 guide: str = "mean_field", init_scale: float = 0.3) -> Path:
    """A run directory with real posterior files (few SVI steps on a 3-layer tiny model)."""
    pyro.set_rng_seed(seed)
    gated = gate(tiny_model(family, seed=seed), group_size=group_size, kinds=kinds)
    prior_cfg, push_cfg = PriorConfig(kind=prior), PushConfig()
    guide_cfg = GuideConfig(kind=guide, init_scale=init_scale)
    m = PPNModel(gated, prior_cfg, push_cfg, num_sequences=8, tokens_per_sequence=16)
    g = make_guide(m.prior, guide_cfg)
    loss_fn = pyro.infer.Trace_ELBO()(m, g)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    loss_fn(ids)
    params = [p for n, p in loss_fn.named_parameters() if not n.startswith("model.gated.")]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ids).backward()
        opt.step()
    save_posterior(path, m.prior, m.push, g, prior_cfg, push_cfg, guide_cfg)
    return Path(path)


def small_inventory(L: int = 2, H: int = 4, KV: int = 2, hd: int = 4, d: int = 16, ff: int = 32,
                    group_size: int = 8, kinds: tuple[str, ...] = ("layers", "heads", "groups")) -> UnitInventory:
    dims = Dims(num_layers=L, num_heads=H, num_kv_heads=KV, head_dim=hd, hidden=d, intermediate=ff,
                mlp_matrices=3, layer_extra_params=2 * d)
    return UnitInventory(dims=dims, group_size=group_size, kinds=kinds)


class StubPosterior:
    """A posterior whose draws are given: the real push (thresholds, inclusion) on a given inventory."""

    def __init__(self, inventory: UnitInventory, draws: dict[str, torch.Tensor], push: Push | None = None):
        self.inventory = inventory
        self.push = push or Push(inventory, PushConfig(amplitude=False))
        self._draws = draws

    def draws(self, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
        K = next(iter(self._draws.values())).shape[0]
        assert num_samples == K, f"stub has {K} draws"
        return {k: v.clone() for k, v in self._draws.items()}

    def thresholds(self, lam: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.push.thresholds(lam)

    def inclusion(self, scores: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.push.inclusion({k: v.float() for k, v in scores.items()}, lam)
