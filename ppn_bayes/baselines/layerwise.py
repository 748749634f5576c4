"""Layer-by-layer calibration, as Wanda and SparseGPT run it.

Both papers prune one decoder layer at a time and feed the *pruned* layer's outputs to the next, so
each layer is calibrated on the inputs it will really see. :func:`sequential_prune` does that with
the model's own layer modules: one dense forward records what every layer is called with besides the
hidden states (attention masks, rotary embeddings, ...; they differ per layer for sliding-window
models), then for each layer it (1) runs the calibration hidden states through the layer with
pre-hooks on its matrix products collecting input statistics, (2) prunes those matrices, (3) runs
the layer again to get the inputs of the next one. Memory is one layer's activations over the
calibration set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ppn_bayes.backbone.families import family_for
from ppn_bayes.backbone.projections import is_projection


class InputStats(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def capture_layer_calls(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4
                        ) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Layer-0 hidden states per batch and, per layer and batch, the other call arguments."""
    layers = family_for(model.config).layers(model)
    device = next(model.parameters()).device
    inputs: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    handles = []

    def hook_for(l: int):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            if l == 0:
                inputs.append(hs.detach())
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[l].append((tuple(args[1:]), rest))

        return hook

    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(hook_for(l), with_kwargs=True))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, calls


@torch.no_grad()
def sequential_prune(model: nn.Module, blocks: torch.Tensor, make_stats: Callable[[nn.Module], InputStats],
                     prune: Callable[[nn.Module, InputStats], None], batch_size: int = 4) -> None:
    """Prune every matrix product of every decoder layer in place, layer by layer (see module doc)."""
    layers = family_for(model.config).layers(model)
    xs, calls = capture_layer_calls(model, blocks, batch_size)
    for l, layer in enumerate(layers):
        mods = [(name, mod) for name, mod in layer.named_modules() if is_projection(mod)]
        stats = {name: make_stats(mod) for name, mod in mods}
        handles = [mod.register_forward_pre_hook(lambda m, a, s=stats[name]: s.add(a[0])) for name, mod in mods]
        try:
            for x, (args, kwargs) in zip(xs, calls[l]):
                layer(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, mod in mods:
            prune(mod, stats[name])
        xs = [_hidden(layer(x, *args, **kwargs)) for x, (args, kwargs) in zip(xs, calls[l])]
