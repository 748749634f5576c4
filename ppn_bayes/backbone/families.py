"""The registry of model families: which adapter serves which ``transformers`` ``model_type``.

The built-in adapters are registered here, explicitly, when this module is imported; a user's
adapter is added with :func:`register` (before or after, the built-ins stay). Adapters themselves
(:mod:`ppn_bayes.backbone.llama`, :mod:`ppn_bayes.backbone.gpt2`) only define their classes.
"""

from __future__ import annotations

from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone.gpt2 import GPT2Family
from ppn_bayes.backbone.llama import LlamaFamily, Olmo2Family
from ppn_bayes.errors import ModelError

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Serve ``family.model_types`` with ``family`` (replacing an earlier adapter of the same type)."""
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def family_for(config) -> Family:
    """The adapter for a ``transformers`` config, or a one-line error listing what is supported."""
    mt = getattr(config, "model_type", None)
    if mt not in _REGISTRY:
        raise ModelError(
            f"unsupported architecture {mt!r}; ppn-bayes supports {', '.join(supported_model_types())} "
            "(add a family adapter in ppn_bayes/backbone/ and register it with ppn_bayes.backbone.families.register)"
        )
    return _REGISTRY[mt]


for _family in (LlamaFamily(), Olmo2Family(), GPT2Family()):
    register(_family)
