"""A gated view of a ``transformers`` causal LM, without copying its weights.

:class:`GatedLM` holds the original model as a plain child module and multiplies, through forward
hooks, four places of every layer by the current gates:

* head gates ``heads[l, h]`` scale head ``h``'s slice of the attention output projection's input,
* group gates ``groups[l, g]`` scale channel group ``g`` of the MLP down projection's input,
* the layer gate ``layers[l]`` scales both residual branches' outputs (biases included),
* optional amplitude vectors ``attn_scale[l]``/``mlp_scale[l]`` (``[hidden]``) scale the branch outputs
  per output dimension (the push's rank-1 amplitude correction; see :mod:`ppn_bayes.bayes.push`).

Because the gates multiply *linear* maps' inputs/outputs, a gate of 0 is exactly the same as cutting
that head/channel out of the weights, and a layer gate of 0 is exactly deleting the layer from a
pre-norm residual stack. With no gates set (the default) the hooks return immediately and the
logits are bit-for-bit those of the wrapped model. Gates are differentiable, so soft or
straight-through masks train the scores.

Why hooks, not a rewritten model: every supported architecture keeps its own, well-tested
``transformers`` forward (attention kernels, KV cache, generation, gradient checkpointing); the
adapter in :mod:`ppn_bayes.backbone.family` only names four modules per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.family import Family
from ppn_bayes.backbone.slicing import unit_sq_norms
from ppn_bayes.backbone.units import ALL_KINDS, KeepSet, UnitInventory
from ppn_bayes.errors import ConfigError

GATE_NAMES = ("layers", "heads", "groups", "attn_scale", "mlp_scale")


class GatedLM(nn.Module):
    """Gates on layers, attention heads and MLP channel groups of a wrapped causal LM.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` of a supported family (not copied).
        group_size: MLP channels per group (1 = single neurons).
        kinds: which unit kinds are gated; the others are always kept with their layer.
    """

    def __init__(self, model: nn.Module, group_size: int = 1, kinds: tuple[str, ...] = ALL_KINDS):
        super().__init__()
        self.model = model
        self.family: Family = family_for(model.config)
        if "heads" in kinds and not self.family.supports_heads:
            raise ConfigError(
                f"{model.config.model_type} normalizes queries across all heads, so head gates are not an "
                "exact cut; gate kinds 'layers' and 'groups' instead"
            )
        dims = self.family.dims(model.config)
        self.inventory = UnitInventory(
            dims=dims,
            group_size=group_size,
            kinds=tuple(kinds),
            family=self.family.name,
            embedding_params=self.family.embedding_params(model),
        )
        self.register_buffer("_group_sizes", self.inventory.group_sizes(), persistent=False)
        sizes = self._group_sizes.unique()
        self._uniform_group: int | None = int(sizes[0]) if sizes.numel() == 1 else None
        self._gates: dict[str, torch.Tensor | None] = dict.fromkeys(GATE_NAMES)
        self._handles: list = []
        self._install_hooks()

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        fam = self.family
        for l, layer in enumerate(fam.layers(self.model)):
            self._handles.append(fam.heads_input(layer).register_forward_pre_hook(self._heads_hook(l)))
            self._handles.append(fam.channels_input(layer).register_forward_pre_hook(self._groups_hook(l)))
            self._handles.append(fam.attn_branch(layer).register_forward_hook(self._branch_hook(l, "attn_scale")))
            self._handles.append(fam.mlp_branch(layer).register_forward_hook(self._branch_hook(l, "mlp_scale")))

    def _heads_hook(self, l: int):
        hd = self.inventory.dims.head_dim

        def hook(module, args):
            g = self._gates["heads"]
            if g is None:
                return None
            x = args[0]
            scale = g[l].to(device=x.device, dtype=x.dtype)
            # A [..., H, hd] view times [H, 1]: no repeat_interleave, whose backward is a slow scatter.
            return ((x.unflatten(-1, (scale.shape[0], hd)) * scale.unsqueeze(-1)).flatten(-2), *args[1:])

        return hook

    def _groups_hook(self, l: int):
        def hook(module, args):
            g = self._gates["groups"]
            if g is None:
                return None
            x = args[0]
            gl = g[l].to(device=x.device, dtype=x.dtype)
            if self._uniform_group is not None:  # equal groups: a view, as for heads
                return ((x.unflatten(-1, (gl.shape[0], self._uniform_group)) * gl.unsqueeze(-1)).flatten(-2),
                        *args[1:])
            scale = torch.repeat_interleave(gl, self._group_sizes.to(x.device), output_size=x.shape[-1])
            return (x * scale, *args[1:])

        return hook

    def _branch_hook(self, l: int, scale_name: str):
        def hook(module, args, out):
            lg, sc = self._gates["layers"], self._gates[scale_name]
            if lg is None and sc is None:
                return None
            # One multiplication of the activation (scale vector times layer gate first): the
            # activation-sized products and their gradient reductions are most of the hooks' cost.
            if sc is None:
                return out * lg[l].to(device=out.device, dtype=out.dtype)
            scale = sc[l] if lg is None else sc[l] * lg[l]
            return out * scale.to(device=out.device, dtype=out.dtype)

        return hook

    def remove_hooks(self) -> nn.Module:
        """Detach every hook and return the untouched wrapped model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return self.model

    # ------------------------------------------------------------------ gates
    def set_gates(self, **gates: torch.Tensor | None) -> None:
        """Set (or with ``None`` clear) gate tensors: ``layers [L]``, ``heads [L, H]``, ``groups [L, G]``,
        ``attn_scale``/``mlp_scale`` ``[L, hidden]``. Unnamed gates are left as they are."""
        inv = self.inventory
        device = self.device
        shapes = {
            "layers": (inv.num_layers,),
            "heads": (inv.num_layers, inv.num_heads),
            "groups": (inv.num_layers, inv.num_groups),
            "attn_scale": (inv.num_layers, inv.dims.hidden),
            "mlp_scale": (inv.num_layers, inv.dims.hidden),
        }
        for name, value in gates.items():
            if name not in shapes:
                raise ConfigError(f"unknown gate {name!r}; choose from {list(shapes)}")
            if value is not None and tuple(value.shape) != shapes[name]:
                raise ConfigError(f"gate {name!r} has shape {tuple(value.shape)}, expected {shapes[name]}")
            # Once here, not in every hook call: a CPU gate would be copied to the GPU (with a host
            # sync) four times per layer per forward pass. A no-op for gates made on the device.
            self._gates[name] = None if value is None else value.to(device)

    def clear_gates(self) -> None:
        self._gates = dict.fromkeys(GATE_NAMES)

    def current_gates(self) -> dict[str, torch.Tensor | None]:
        return dict(self._gates)

    @contextlib.contextmanager
    def gates(self, **gates: torch.Tensor | None) -> Iterator[GatedLM]:
        """Temporarily set gates: ``with gated.gates(layers=m): logits = gated(ids).logits``."""
        saved = dict(self._gates)
        self.set_gates(**gates)
        try:
            yield self
        finally:
            self._gates = saved

    @contextlib.contextmanager
    def keep(self, keep: KeepSet) -> Iterator[GatedLM]:
        """Temporarily apply the hard 0/1 masks of a keep-set."""
        m = self.inventory.masks(keep)
        with self.gates(layers=m["layers"], heads=m["heads"], groups=m["groups"]):
            yield self

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the wrapped model's first parameter lives (its decoder's device)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ norms
    @torch.no_grad()
    def unit_norms(self) -> dict[str, torch.Tensor]:
        """Frobenius norm of every unit's weights: ``{"layers": [L], "heads": [L, H], "groups": [L, G]}``.

        The paper's score anchor ``r_u``: a head's norm covers its q/o slices and its share of K/V;
        a group's norm covers its rows/columns of the MLP matrices; a layer's norm covers all of them.
        """
        inv = self.inventory
        rules = self.family.slice_rules(self.config)
        # Accumulated where the weights are (index_add_/+= into CPU tensors fail for CUDA weights);
        # float32 whatever the weights' dtype, as unit_sq_norms returns.
        device = self.device
        heads = torch.zeros(inv.num_layers, inv.num_heads, device=device)
        groups = torch.zeros(inv.num_layers, inv.num_groups, device=device)
        sizes = inv.group_sizes()
        owner = torch.repeat_interleave(torch.arange(inv.num_groups), sizes).to(device)
        for l, layer in enumerate(self.family.layers(self.model)):
            params = dict(layer.named_parameters())
            for rule in rules:
                if rule.name not in params:
                    continue
                sq = unit_sq_norms(params[rule.name], rule, inv.dims)
                if rule.unit == "ch":
                    groups[l].index_add_(0, owner, sq.float())
                else:
                    heads[l] += sq.float()
        layers = (heads.sum(1) + groups.sum(1)).sqrt()
        return {"layers": layers, "heads": heads.sqrt(), "groups": groups.sqrt()}


def gate(model: nn.Module, group_size: int = 1, kinds: tuple[str, ...] = ALL_KINDS) -> GatedLM:
    """Wrap a ``transformers`` causal LM in a :class:`GatedLM` (no weights are copied)."""
    return GatedLM(model, group_size=group_size, kinds=kinds)
