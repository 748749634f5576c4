"""The options several commands share, declared once: one name, one default, one help text.

A command adds what it needs (``add_posterior_options(p)``, ``add_device(p)``, ``add_json(p, ...)``)
instead of spelling the flag itself, so ``--quantile`` means the same thing with the same default in
``keepset``, ``resize``, ``report``, ``eval`` and ``uncertainty``, and ``--device`` is ``auto``
everywhere (CUDA when present, else CPU; ``ppn_bayes.device.resolve_device``). Comma-separated
options (``--sizes 0.75,0.5``) are read by :func:`comma_list`; every ``--json`` answer is written by
:func:`json_text` (strict JSON: a figure that is not a number, e.g. an empty reliability bin, is ``null``).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ppn_bayes.errors import ConfigError

QUANTILE = 0.5
DRAWS = 256
SEED = 0
DEVICE = "auto"

QUANTILE_HELP = (f"posterior quantile that ranks units (default {QUANTILE}: the median; lower is risk-averse, "
                 "e.g. 0.1)")
DRAWS_HELP = f"joint posterior draws of the scores and masks (default {DRAWS})"
SEED_HELP = f"seed of the posterior draws (default {SEED})"
DEVICE_HELP = f"cpu, cuda, cuda:N or auto (default {DEVICE}: CUDA when present, else CPU)"


def add_posterior_options(p: Any, quantile: bool = True, draws: bool = True, seed: bool = True,
                          quantile_unset: bool = False) -> None:
    """``--quantile``, ``--draws``, ``--seed`` for commands that read keep-sets off the posterior.

    ``quantile_unset``: the parser stores ``None`` when the flag is absent (for a command that must
    tell "not given" from the default; it then uses :data:`QUANTILE`).
    """
    if quantile:
        p.add_argument("--quantile", type=float, default=None if quantile_unset else QUANTILE, help=QUANTILE_HELP)
    if draws:
        p.add_argument("--draws", type=int, default=DRAWS, help=DRAWS_HELP)
    if seed:
        p.add_argument("--seed", type=int, default=SEED, help=SEED_HELP)


def add_device(p: Any, what: str = "") -> None:
    """``--device`` (default ``auto``); ``what`` says what runs there, e.g. "for --eval"."""
    p.add_argument("--device", default=DEVICE, help=f"{what + ': ' if what else ''}{DEVICE_HELP}")


def add_json(p: Any, what: str = "the result") -> None:
    """``--json``: print ``what`` as one JSON object on stdout instead of text."""
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object")


def quantile_of(args: argparse.Namespace) -> float:
    """The quantile a command uses, for parsers built with ``quantile_unset``."""
    return QUANTILE if args.quantile is None else args.quantile


def comma_list(text: str, kind: type, flag: str, example: str = "0.75,0.5") -> list:
    """``"1.0, 0.75"`` -> ``[1.0, 0.75]`` for a comma-separated option; a one-line error names the flag."""
    try:
        values = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma-separated list of {kind.__name__} values such as {example}, "
                          f"got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty; give at least one value, e.g. {flag} {example}")
    return values


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON (RFC 8259, what ``jq`` and browsers read): NaN and infinities become ``null``."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)
