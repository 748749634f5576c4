"""The sandwich rule's prices (US-Nets' sandwich, ``train.sandwich``; docs/method.md 5a).

Every optimizer step of a sandwich run trains, on the same micro-batch, the dense network, the
smallest size the recipe targets, each further target size and a few random prices;
:func:`sandwich_prices` says which prices those are at a step (the loop, ``training/loop.py``, runs
one pass per price).
"""

from __future__ import annotations

import torch

from ppn_bayes.bayes.lambda_star import solve_lambda
from ppn_bayes.bayes.unit_table import parse_target
from ppn_bayes.training.heldout import median_scores
from ppn_bayes.training.schedule import step_seed
from ppn_bayes.training.session import Session


def target_sizes(t) -> list[float]:
    """The sizes a sandwich step trains, in its pass order: ``sandwich_min_size``, then ``sandwich_sizes`` largest first."""
    return [t.sandwich_min_size, *sorted(t.sandwich_sizes, reverse=True)]


def sandwich_prices(s: Session, step: int) -> list[float]:
    """The sandwich's prices for optimizer step ``step``: ``[0, lambda_min, lambda_s1 .. lambda_sK, r_1 .. r_N]``.

    ``0`` is the dense network; ``lambda_min`` the price at which the *current* push keeps
    ``train.sandwich_min_size`` of the decoder's parameters in expectation at the guide's median scores
    (the keep-set step's bisection, :func:`ppn_bayes.bayes.lambda_star.solve_lambda`, reused), and
    ``lambda_s`` the same for each of ``train.sandwich_sizes`` (largest first); ``r_i ~ Exp(rate)``
    from a generator seeded by ``(seed, step)`` alone (stream 2), so a resumed run draws the same prices.
    """
    from types import SimpleNamespace

    t, ppn = s.recipe.train, s.ppn
    with torch.no_grad():
        scores = {k: v.detach().unsqueeze(0) for k, v in median_scores(ppn, s.guide).items()}
        view = SimpleNamespace(inventory=ppn.inventory,
                               inclusion=lambda sc, lam: {k: v.cpu() for k, v in ppn.push.inclusion(sc, lam).items()})
        solved = [float(solve_lambda(view, None, scores, parse_target(ppn.inventory, size=x))[0])
                  for x in target_sizes(t)]
    g = torch.Generator().manual_seed(step_seed(t.seed, step, stream=2))
    rand = [float(torch.empty((), dtype=torch.float64).exponential_(1.0, generator=g)) / ppn.push.config.rate
            for _ in range(t.sandwich_random)]
    return [0.0, *solved, *rand]
