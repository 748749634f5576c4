"""What a comparison runs: the method names, GISP's objectives and :class:`CompareOptions`.

The options are one typed object; :func:`compare_options` applies keyword overrides to it and
refuses an unknown name in one line. The fairness rules they serve are in :mod:`ppn_bayes.compare`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ppn_bayes.compare.healing import HEAL_LR, check_heal_loss, check_heal_lr
from ppn_bayes.errors import ConfigError

PEERS = ("gisp", "shortgpt", "prunepath", "wanda", "sparsegpt", "random")
PPN_METHODS = ("ppn", "ppn-paper", "ppn-healed")  # ppn-healed: the ppn run's sub-networks, healed per size
ANCHOR = ("anchor",)  # the data score anchor of ppn_bayes.bayes.anchor alone: no training (not a default peer)
METHODS = PPN_METHODS + ANCHOR + PEERS
GISP_OBJECTIVES = ("perplexity", "margin")


def gisp_label(objective: str) -> str:
    """The ``method`` of GISP's rows: ``gisp`` (perplexity objective, as published) or ``gisp-margin``."""
    return "gisp" if objective == "perplexity" else f"gisp-{objective}"


def check_methods(methods: Sequence[str]) -> list[str]:
    out = [m.strip() for m in methods if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise ConfigError(f"unknown method(s) {bad or '(none)'}; choose from {','.join(METHODS)}")
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class CompareOptions:
    """How :func:`~ppn_bayes.compare.comparison.compare` runs, beyond the model, the data, the sizes and the methods.

    ``heal_blocks``: train blocks for optional healing (:mod:`ppn_bayes.compare`); ``heal_loss``: what healing
    minimizes, ``data`` (next-token NLL) or ``distill`` (forward KL from the dense model's logits);
    ``heal_lr``: its AdamW learning rate (:data:`~ppn_bayes.compare.healing.HEAL_LR` by default).
    ``run_dir``/``paper_run_dir``: the finished runs of the ``ppn``/``ppn-healed`` and ``ppn-paper``
    rows; without them, and with ``fit_dir`` and ``model_path``, they are fitted (:func:`~ppn_bayes.compare.rows.fit_ppn_run`).
    ``seeds``: random keep-sets averaged; ``group_size``: MLP channels per unit for the structured peers;
    ``gisp_step``, ``gisp_objective`` (``perplexity`` or ``margin``) and ``gisp_choices``
    (:class:`~ppn_bayes.data.tasks.choices.ChoiceExample` items for the margin objective);
    ``prunepath_experts``; ``anchor_kinds`` (the ``anchor`` rows). ``decode_tokens`` (0: no decode
    timing), ``batch_size`` (evaluation), ``progress`` (a line per method on stderr). ``transfer``:
    test blocks of another domain (a ``transfer_perplexity`` per row).
    """

    heal_blocks: torch.Tensor | None = None
    heal_loss: str = "data"
    heal_lr: float = HEAL_LR
    run_dir: str | os.PathLike | None = None
    paper_run_dir: str | os.PathLike | None = None
    model_path: str | os.PathLike | None = None
    fit_dir: str | os.PathLike | None = None
    seeds: Sequence[int] = (0, 1, 2)
    group_size: int = 1
    gisp_step: float = 0.1
    gisp_objective: str = "perplexity"
    gisp_choices: Sequence[Any] | None = None
    prunepath_experts: int = 16
    anchor_kinds: Sequence[str] = ("layers", "heads", "groups")
    decode_tokens: int = 16
    batch_size: int = 8
    progress: bool = False
    transfer: torch.Tensor | None = None

    def check(self, methods: Sequence[str]) -> CompareOptions:
        """Eager checks (one-line errors) of what ``methods`` need from these options."""
        check_heal_loss(self.heal_loss)
        check_heal_lr(self.heal_lr)
        if "ppn-healed" in methods and (self.heal_blocks is None or self.heal_blocks.shape[0] == 0):
            raise ConfigError("method ppn-healed heals each size: pass --heal-tokens N (heal_blocks=) as for the peers")
        if self.gisp_objective not in GISP_OBJECTIVES:
            raise ConfigError(f"unknown GISP objective {self.gisp_objective!r}; choose from {','.join(GISP_OBJECTIVES)}")
        if self.gisp_objective == "margin" and "gisp" in methods and not self.gisp_choices:
            raise ConfigError("GISP's margin objective needs choice examples: pass gisp_choices=[ChoiceExample, ...] "
                              "(ppn compare builds them from the bundled train novels)")
        return self


def compare_options(options: CompareOptions | None = None, **overrides: Any) -> CompareOptions:
    """``options`` (default :class:`CompareOptions`) with ``overrides``; an unknown name is a one-line error."""
    names = {f.name for f in dataclasses.fields(CompareOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown compare option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(options or CompareOptions(), **overrides)
