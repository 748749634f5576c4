"""Low-rank adapters (LoRA) on the attention and MLP projections, attached by forward hooks.

Why hand-written rather than ``peft``: ``peft`` replaces every ``nn.Linear`` with a wrapper module,
which renames the base parameters (``q_proj.base_layer.weight``) and moves the modules that
:class:`~ppn_bayes.backbone.gated.GatedLM` has hooked. Both would break the gated backbone: its unit
norms and slice rules address parameters by their base names, and its gate hooks sit on the original
projection modules. Here the wrapped model is not touched at all: every target projection gets one
forward hook that adds ``scale * B(A(x))`` to its output, where ``x`` is the projection's input *after*
the gate pre-hooks (so a gated head or channel is cut out of the adapter's path exactly as out of the
base weight's), and the hook is prepended so that it runs before the gated backbone's output hook
(layer gate and amplitude scale multiply base and adapter alike). Merging is ``W += scale * B @ A``.

``A`` starts random (Kaiming-uniform, as in the LoRA paper and ``peft``) and ``B`` at zero, so an
untrained adapter changes nothing. ``scale = alpha / rank``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ppn_bayes.backbone.gated import GatedLM
from ppn_bayes.backbone.projections import is_projection


def _in_out(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed): Conv1D stores its weight as ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    w = module.weight
    return int(w.shape[0]), int(w.shape[1]), True


def lora_targets(gated: GatedLM) -> dict[str, nn.Module]:
    """Every projection inside the decoder layers, keyed by its module name in the wrapped model
    (``model.layers.3.self_attn.q_proj``): the attention and MLP projections of every family."""
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(gated.family.layers(gated.model)):
        prefix = gated.family.layer_prefix(i)
        for name, module in layer.named_modules():
            if name and is_projection(module):
                out[prefix + name] = module
    return out


def _key(name: str) -> str:
    """Module names contain dots, which ``nn.ModuleDict`` keys may not."""
    return name.replace(".", "__")


class LoRAPair(nn.Module):
    """``A [r, in]`` and ``B [out, r]`` of one target."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)


class LoRA(nn.Module):
    """Adapters on every projection of a gated model's decoder layers.

    The adapters live in this module (not inside the wrapped model), so the base model's
    ``state_dict`` and parameter names are unchanged; :meth:`state` gives ``{target.A, target.B}``.
    """

    def __init__(self, gated: GatedLM, rank: int = 8, alpha: float = 16.0, seed: int = 0):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.targets = lora_targets(gated)
        self.pairs = nn.ModuleDict()
        generator = torch.Generator().manual_seed(seed)  # own RNG: building adapters leaves torch's alone
        for name, module in self.targets.items():
            fin, fout, _ = _in_out(module)
            self.pairs[_key(name)] = LoRAPair(fin, fout, self.rank, generator)
        self.to(next(iter(self.targets.values())).weight.device)
        self._handles: list = []
        self.attach()

    # ----------------------------------------------------------------- hooks
    def _hook(self, name: str):
        pair = self.pairs[_key(name)]

        def hook(module, args, out):
            x = args[0]
            delta = (x.to(pair.A.dtype) @ pair.A.t()) @ pair.B.t()
            return out + (self.scale * delta).to(out.dtype)

        return hook

    def attach(self) -> None:
        """Install the hooks (prepended: they must run before the gated backbone's output hooks)."""
        if self._handles:
            return
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._hook(name), prepend=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def disabled(self):
        """The base model without its adapters for the duration (the ``teacher: base`` pass of
        in-place distillation); the hooks are re-installed, in front again, on exit."""
        attached = bool(self._handles)
        self.detach()
        try:
            yield
        finally:
            if attached:
                self.attach()

    # ------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor]:
        """``{"<target>.A": [r, in], "<target>.B": [out, r]}`` with base module names."""
        out = {}
        for name in self.targets:
            pair = self.pairs[_key(name)]
            out[f"{name}.A"] = pair.A.detach()
            out[f"{name}.B"] = pair.B.detach()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.targets:
                pair = self.pairs[_key(name)]
                pair.A.copy_(tensors[f"{name}.A"])
                pair.B.copy_(tensors[f"{name}.B"])

    def metadata(self) -> dict[str, str]:
        return {"format": "ppn-lora", "rank": str(self.rank), "alpha": str(self.alpha)}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the base weights and remove the hooks (the model then stands alone)."""
        self.detach()
        merge_adapter(self.targets, self.state(), self.scale)


@torch.no_grad()
def merge_adapter(targets: dict[str, nn.Module], tensors: dict[str, torch.Tensor], scale: float) -> None:
    """``W += scale * B @ A`` for every target (transposed for Conv1D)."""
    for name, module in targets.items():
        delta = scale * (tensors[f"{name}.B"].double() @ tensors[f"{name}.A"].double())
        _, _, transposed = _in_out(module)
        if transposed:
            delta = delta.t()
        module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
