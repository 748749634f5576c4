"""Switch a loaded model between sub-networks in place: no weight copies, microseconds per switch.

Dropping a layer of a pre-norm residual stack is exact deletion, and deletion is the one structural
change that costs nothing to undo: :meth:`SubnetSwitch.use` swaps the model's layer ``ModuleList``
for a new list holding the *same* kept layer modules, renumbers their ``layer_idx`` (the KV-cache
slot each attention writes) to ``0..k-1``, points the config at ``k`` layers, and restores all three
on exit. Dropped layers are simply not run, so a 50%-layers view really does half the layer work.

Heads and MLP channel groups cannot be removed without cutting weights; inside the view they are
switched off with hard 0/1 masks through :class:`~ppn_bayes.backbone.gated.GatedLM` (exact, but
the masked work is still computed: use :func:`~ppn_bayes.backbone.materialize.materialize` or
:func:`ppn_bayes.export.resize.resize` when head/channel savings must turn into speed).
Optional amplitude corrections (``attn_scale``/``mlp_scale`` ``[L, hidden]``) go through the same
gates. This is what makes a sub-network a free draft model (:mod:`ppn_bayes.evaluation.speculative`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.units import KeepSet, UnitInventory
from ppn_bayes.errors import ConfigError


class SubnetSwitch:
    """Sub-network views of one model, by keep-set.

    Args:
        model: a ``transformers`` causal LM or a :class:`GatedLM` around one (its hooks are reused).
        inventory: the inventory the keep-sets refer to (group size, gated kinds); defaults to the
            gated model's, or a layers/heads/groups inventory with ``group_size`` 1.
    """

    def __init__(self, model: nn.Module, inventory: UnitInventory | None = None):
        if isinstance(model, GatedLM):
            self.gated, self._owns_hooks = model, False
        else:
            kw = {} if inventory is None else {"group_size": inventory.group_size, "kinds": inventory.kinds}
            self.gated, self._owns_hooks = GatedLM(model, **kw), True
        self.model = self.gated.model
        self.family = self.gated.family
        self.inventory = inventory or self.gated.inventory
        if self.inventory.dims != self.gated.inventory.dims:
            raise ConfigError("the inventory describes a different architecture than the model; use the "
                              "inventory of the run trained on this model")
        if self.inventory.group_size != self.gated.inventory.group_size:
            raise ConfigError(f"the inventory's group size {self.inventory.group_size} differs from the gated "
                              f"model's {self.gated.inventory.group_size}; gate the model with the run's group size")
        self.active: KeepSet | None = None

    def close(self) -> nn.Module:
        """Remove the hooks this switch installed; returns the plain model."""
        if self._owns_hooks:
            self.gated.remove_hooks()
        return self.model

    def _masks(self, keep: KeepSet) -> dict[str, torch.Tensor | None]:
        """Head/group masks, or ``None`` where every unit of every kept layer is on (no hook work)."""
        m = self.inventory.masks(keep)
        kept = m["layers"].bool()
        heads = m["heads"] if not bool(m["heads"][kept].all()) else None
        groups = m["groups"] if not bool(m["groups"][kept].all()) else None
        return {"heads": heads, "groups": groups}

    @contextlib.contextmanager
    def use(self, keep: KeepSet, amplitudes: dict[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
        """Inside the block, ``self.model`` *is* the sub-network ``keep`` (restored on exit, even on error)."""
        keep = self.inventory.complete(keep)
        if not keep.layers:
            raise ConfigError("the keep-set keeps no layer; a sub-network needs at least one")
        if self.active is not None:
            raise ConfigError("a sub-network is already active on this model; leave its block first")
        fam, model, config = self.family, self.model, self.model.config
        layers = fam.layers(model)
        saved_config = {a: getattr(config, a) for a in ("num_hidden_layers", "n_layer", "layer_types")
                        if getattr(config, a, None) is not None}
        holders = [(m, m.layer_idx) for l in keep.layers for m in fam.layer_idx_holders(layers[l])]
        amplitudes = amplitudes or {}
        masks = self._masks(keep)
        for kind in ("heads", "groups"):  # per-unit amplitude corrections multiply the 0/1 masks
            if amplitudes.get(kind) is not None:
                masks[kind] = amplitudes[kind] if masks[kind] is None else masks[kind] * amplitudes[kind]
        gates = {**masks, "attn_scale": amplitudes.get("attn_scale"), "mlp_scale": amplitudes.get("mlp_scale")}
        self.active = keep
        try:
            if len(keep.layers) < len(layers):
                fam.set_layers(model, nn.ModuleList([layers[l] for l in keep.layers]))
                for new_idx, l in enumerate(keep.layers):
                    for m in fam.layer_idx_holders(layers[l]):
                        m.layer_idx = new_idx
                for attr in ("num_hidden_layers", "n_layer"):
                    if attr in saved_config:
                        setattr(config, attr, len(keep.layers))
                if "layer_types" in saved_config:
                    config.layer_types = [saved_config["layer_types"][l] for l in keep.layers]
            with self.gated.gates(**gates):
                yield model
        finally:
            fam.set_layers(model, layers)
            for m, idx in holders:
                m.layer_idx = idx
            for attr, value in saved_config.items():
                setattr(config, attr, value)
            self.active = None


@contextlib.contextmanager
def switch(model: nn.Module, keep: KeepSet, inventory: UnitInventory | None = None,
           amplitudes: dict[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """One-off view: ``with switch(model, keep, inv) as small: small(ids)``; the model is restored after."""
    sw = SubnetSwitch(model, inventory)
    try:
        with sw.use(keep, amplitudes) as small:
            yield small
    finally:
        sw.close()
