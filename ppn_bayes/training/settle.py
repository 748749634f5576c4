"""The settle phase: a sandwich run's last ``train.settle_steps`` joint steps train the keep-sets it exports.

**Why.** Until the end of a sandwich run (``training/sandwich.py``) every pruned pass trains a
sub-network *sampled* at its price: straight-through masks drawn from the inclusion probabilities of
the current posterior draw. The sub-network ``ppn keepset`` later exports at a size is one fixed
set, the median-rule keep-set of the final posterior, and a sampled mask matches it only as often as
the sampler happens to draw it (with heads and channel groups gated, almost never exactly). A peer
healed per size (ShortGPT, GISP) trains the very network it ships on every token. The settle phase
gives the one run the same: for its last N joint steps each target size's pass trains that size's
exported keep-set, so the shared weights finish adapted to the networks a user gets.

**What.** At the phase's first step (``steps - settle_steps``) the keep-set of every sandwich size
(``sandwich_min_size`` and ``sandwich_sizes``; random prices are dropped) is solved from the live
posterior exactly as ``ppn keepset`` solves it from the run's files
(:class:`ppn_bayes.bayes.keepsets.KeepsetSolver`: 256 joint draws, seed 0, the median rule). From
then on each such pass runs that keep-set's hard masks, with the push's amplitude corrections at its
``lambda*`` (what the export folds into the weights), on the same loss as before (distillation from
the dense pass, or the data). The dense pass is unchanged. The guide and the push are frozen (their
learning rate is 0, ``schedule.group_multiplier``): with the masks fixed their only gradient would
be the KL pulling q back to its prior. So the keep-sets the run exports are the ones it settled,
and a resumed run re-solves the same sets from the same frozen posterior.

**What it is, in Bayesian terms.** The settle steps are not SVI steps for the gates: the gate
posterior is the one at the phase's start, and the weights then take a point step conditional on
its keep-sets (a coordinate step of the joint objective, the keep-sets held at their posterior
median). The reported uncertainty is the posterior's at that step; nothing in the settle phase is
evidence about which units matter. The tokens are the run's own (no extra data), one pass per size
as before (no extra compute).
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.bayes.posterior import Posterior
from ppn_bayes.training.sandwich import target_sizes
from ppn_bayes.training.session import Session

#: the keep-set solver's settings: those of ``ppn keepset`` by default, so the export finds the same sets
DRAWS, SEED = 256, 0


def settle_keepsets(s: Session) -> list[tuple[float, dict[str, torch.Tensor], object]]:
    """``(lambda*, hard masks on the run's device, KeepsetResult)`` of every :func:`~ppn_bayes.training.sandwich.target_sizes` size,
    solved from the live posterior as ``ppn keepset`` solves it from the run's files. The draws re-seed
    the global RNGs (Pyro's ``set_rng_seed``); their states are restored, so the run's noise is untouched."""
    t, ppn = s.recipe.train, s.ppn
    parts = (ppn.prior, ppn.push, s.guide)
    if s.device.type != "cpu":  # the solver runs where `ppn keepset` runs it: on CPU copies
        parts = tuple(copy.deepcopy(m).cpu() for m in parts)
    post = Posterior(ppn.inventory, *parts, t.tempering)
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[s.device.index or 0] if s.device.type == "cuda" else []):
        solver = KeepsetSolver(post, num_draws=DRAWS, seed=SEED)
        results = [solver.solve(size=x) for x in target_sizes(t)]
    random.setstate(states[0])
    np.random.set_state(states[1])
    out = []
    for r in results:
        masks = {k: v.to(s.device) for k, v in ppn.inventory.masks(r.keep).items()}
        out.append((float(r.lam), masks, r))
    return out
