"""ppn-bayes: push puppet networks, Bayesian structured pruning of causal language models.

The public API, and nothing else. Names are imported on first use (PEP 562) so that ``import
ppn_bayes`` and the ``ppn`` command start fast; every name maps to the module that defines it, so
a reader can find it by grepping this table.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ppn_bayes.version import __version__

# transformers 5.x loads "hub kernels" by default when the `kernels` package is installed (it now is, as
# its dependency): layer code fetched from the Hub at run time, which breaks the offline promise and
# fails outright on the meta device. Off unless the user asks for it (USE_HUB_KERNELS=YES).
os.environ.setdefault("USE_HUB_KERNELS", "NO")

_EXPORTS: dict[str, str] = {
    # errors
    "PPNError": "ppn_bayes.errors",
    # models and data
    "load_model": "ppn_bayes.hub.zoo",
    "resolve_model": "ppn_bayes.hub.zoo",
    "token_blocks": "ppn_bayes.data.corpus",
    "load_corpus": "ppn_bayes.data.corpus",
    # the gated backbone
    "gate": "ppn_bayes.backbone",
    "GatedLM": "ppn_bayes.backbone",
    "KeepSet": "ppn_bayes.backbone",
    "UnitInventory": "ppn_bayes.backbone",
    "materialize": "ppn_bayes.backbone.materialize",
    # recipes, the Pyro model, inference
    "Recipe": "ppn_bayes.config",
    "load_recipe": "ppn_bayes.config",
    "PPNModel": "ppn_bayes.bayes.model",
    "make_guide": "ppn_bayes.bayes.guides",
    "Posterior": "ppn_bayes.bayes.posterior",
    "fit": "ppn_bayes.run",
    "load_run": "ppn_bayes.run",
    "Run": "ppn_bayes.run",
    # after training
    "keepset": "ppn_bayes.bayes.keepsets",
    "resize": "ppn_bayes.export.resize",
    "resize_run": "ppn_bayes.export.from_run",
    "load_resized": "ppn_bayes.export.load",
    "perplexity": "ppn_bayes.backbone.perplexity",
}

__all__ = ["__version__"] + list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ppn_bayes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
