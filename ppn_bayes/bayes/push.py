"""The push (from the PPN paper): one network, every size.

At every training step a compute price ``lambda`` is drawn (``0`` with probability ``p_dense``, a dense
step; else ``lambda ~ Exponential(rate)``). Each layer ``l`` and unit kind ``k`` has a monotone
threshold curve ``tau_{l,k}(lambda)``; a unit's inclusion probability is::

    rho_u(lambda) = sigmoid((a_u - tau_{l,k}(lambda)) / T) * rho_parent(lambda)

and its mask is a straight-through Bernoulli sample ``m = b + rho - stopgrad(rho)``, ``b ~ Bernoulli(rho)``
(hard in the forward pass, the gradient of ``rho`` in the backward pass). The compute prior
``log p(m | lambda) = -lambda * cost(m)`` enters the Pyro model as a factor on the cost-weighted mean
inclusion ``rho_bar(lambda)`` (its expectation, which has far lower gradient variance than the
sampled cost).

Thresholds are shared per unit kind (``push.thresholds: shared``, the default): one curve
``tau_k(lambda)`` for all layers, so that each layer's level is carried by the latent layer offsets
of the score prior and nothing point-estimated duplicates a latent (docs/method.md,
"Identifiability"). The paper's per-layer curves ``tau_{l,k}`` (``per_layer``) stay for the
``paper`` preset, which has no latents; with latent layer offsets they would be confounded:
adding ``d`` to ``delta_l`` and to control points ``c_1..c_9`` of layer ``l``'s curve changes no
gate at any ``lambda >= 1/6`` (the first cubic basis function vanishes for ``x >= 1/7``).

Thresholds are cubic B-splines of ``x = lambda / (lambda + 1)`` in ``[0, 1)`` with control points
``c_0 = -1/T`` (fixed: every unit is on at ``lambda = 0``) and ``c_j = c_{j-1} + softplus(theta_j)``;
increasing control points make a B-spline non-decreasing, so larger prices never grow the network,
which is what makes keep-sets nested across sizes. No library ships a differentiable B-spline in
torch, so :func:`bspline_basis` is written here (Cox-de Boor) and tested against SciPy.

Amplitude corrections: surviving units are rescaled by ``exp(s_u * v(lambda))`` (per head / group) and
each block output by ``exp(s_d * v(lambda))`` (per hidden dimension), ``v`` a shared monotone spline
with ``v(0) = 0``. Together they are a rank-1 (in log space) rescaling of each output projection, so
they fold into the weights at export, and they vanish on dense steps.

Precision: the push runs in float32 whatever autocast says (:func:`ppn_bayes.device.fp32` on every
public method), and the splines are evaluated in float64 (basis and control points) and rounded once
to the parameters' dtype, so that training, evaluation and export see the same thresholds: a bf16
matmul would move them by ~1e-2 logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ppn_bayes.backbone.units import UnitInventory
from ppn_bayes.config import PushConfig
from ppn_bayes.device import fp32

DEGREE = 3


def _clamped_knots(n_ctrl: int, degree: int = DEGREE, dtype=torch.float64) -> torch.Tensor:
    """Clamped uniform knot vector on [0, 1] for ``n_ctrl`` control points."""
    inner = n_ctrl - degree - 1
    interior = torch.linspace(0, 1, inner + 2, dtype=dtype)[1:-1]
    return torch.cat([torch.zeros(degree + 1, dtype=dtype), interior, torch.ones(degree + 1, dtype=dtype)])


def bspline_basis(x: torch.Tensor, n_ctrl: int, degree: int = DEGREE) -> torch.Tensor:
    """B-spline basis functions ``[..., n_ctrl]`` at points ``x`` in [0, 1] (Cox-de Boor recursion).

    The right end ``x = 1`` is included in the last interval so that the spline is defined there.
    """
    knots = _clamped_knots(n_ctrl, degree)
    last = int((knots[1:] > knots[:-1]).nonzero().max())  # the last non-empty interval: on the host, no sync
    t = knots.to(device=x.device)
    x = x.to(torch.float64).clamp(0.0, 1.0).unsqueeze(-1)
    left, right = t[:-1], t[1:]
    basis = ((x >= left) & (x < right)).to(torch.float64)
    basis[..., last] = torch.where(x[..., 0] >= 1.0, torch.ones_like(basis[..., last]), basis[..., last])
    for k in range(1, degree + 1):
        n = basis.shape[-1] - 1
        d1 = t[k:k + n] - t[:n]
        d2 = t[k + 1:k + 1 + n] - t[1:n + 1]
        a = torch.where(d1 > 0, (x - t[:n]) / torch.where(d1 > 0, d1, 1.0), torch.zeros_like(d1))
        b = torch.where(d2 > 0, (t[k + 1:k + 1 + n] - x) / torch.where(d2 > 0, d2, 1.0), torch.zeros_like(d2))
        basis = a * basis[..., :n] + b * basis[..., 1:n + 1]
    return basis


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MonotoneSpline(nn.Module):
    """``n_series`` monotone cubic B-splines ``f_i(x)``, x in [0, 1], with fixed start ``f_i(0) = start``.

    ``end`` sets the initial value at ``x = 1`` (control points evenly spaced between the two).
    """

    def __init__(self, n_series: int, n_ctrl: int, start: float, end: float):
        super().__init__()
        self.start = float(start)
        step = (end - start) / (n_ctrl - 1)
        self.theta = nn.Parameter(torch.full((n_series, n_ctrl - 1), _inv_softplus(step)))
        self.n_ctrl = n_ctrl

    @torch.no_grad()
    def set_control_points(self, values: torch.Tensor) -> None:
        """Set every series' control points to ``values`` ``[n_ctrl]`` (non-decreasing; first = start)."""
        inc = (values[1:] - values[:-1]).to(torch.float64).clamp_min(1e-3)
        theta = inc + torch.log(-torch.expm1(-inc))  # inverse softplus
        self.theta.copy_(theta.to(self.theta.dtype).expand_as(self.theta))

    def control_points(self) -> torch.Tensor:
        inc = F.softplus(self.theta)
        start = torch.full_like(inc[:, :1], self.start)
        return torch.cat([start, start + inc.cumsum(-1)], dim=-1)

    @fp32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``[..., n_series]`` at points ``x`` (any shape), computed in float64."""
        basis = bspline_basis(x, self.n_ctrl)  # [..., n_ctrl], float64
        return (basis @ self.control_points().double().transpose(0, 1)).to(self.theta.dtype)


def squash(lam: torch.Tensor | float) -> torch.Tensor:
    """``x = lambda / (lambda + 1)``: the spline's argument, mapping [0, inf) onto [0, 1)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    return lam / (lam + 1.0)


def draw_lambda(config: PushConfig, generator: torch.Generator | None = None) -> float:
    """The paper's per-step price: 0 with probability ``p_dense``, else ``Exponential(rate)``."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    if float(u) < config.p_dense:
        return 0.0
    e = torch.empty((), dtype=torch.float64).exponential_(1.0, generator=generator)
    return float(e) / config.rate


def straight_through_bernoulli(rho: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 sample in the forward pass, gradient of ``rho`` in the backward pass."""
    u = torch.rand(rho.shape, generator=generator, dtype=rho.dtype, device="cpu").to(rho.device)
    hard = (u < rho.detach()).to(rho.dtype)
    # Parenthesized so the forward value is exactly ``hard + 0``: ``(hard + rho) - rho`` rounds and
    # would leave masks like 1 - 6e-8 (about 1 entry in 8 in float32), not the hard 0/1 of the paper.
    return hard + (rho - rho.detach())


class Push(nn.Module):
    """Thresholds, inclusion probabilities, masks, amplitude corrections and the expected cost."""

    def __init__(self, inventory: UnitInventory, config: PushConfig, currency: str = "flops"):
        super().__init__()
        self.inventory = inventory
        self.config = config
        self.kinds = tuple(inventory.kinds)
        L, T = inventory.num_layers, config.temperature
        # ``shared``: one curve per kind (series k); ``per_layer``: series k * L + l (the paper's layout)
        self.shared = config.thresholds == "shared"
        n_series = len(self.kinds) * (1 if self.shared else L)
        self.thresholds_spline = MonotoneSpline(n_series, config.control_points,
                                                start=-1.0 / T, end=config.threshold_max)
        costs = inventory.unit_costs(currency)
        total = inventory.total_cost(currency)
        for kind in ("layers", "heads", "groups"):
            self.register_buffer(f"cost_{kind}", (costs[kind] / total).float())
        if config.amplitude:
            H, G, d = inventory.num_heads, inventory.num_groups, inventory.dims.hidden
            self.amp_spline = MonotoneSpline(1, config.control_points, start=0.0, end=1.0)
            self.s_heads = nn.Parameter(torch.zeros(L, H))
            self.s_groups = nn.Parameter(torch.zeros(L, G))
            self.s_attn = nn.Parameter(torch.zeros(L, d))
            self.s_mlp = nn.Parameter(torch.zeros(L, d))

    # ----------------------------------------------------------- thresholds
    def initial_size_target(self, lam: torch.Tensor) -> torch.Tensor:
        """The ``size_curve`` init's kept fraction at price ``lam``: ``1 / (1 + lam / lam_half)``."""
        half = self.config.init_half_price or 1.0 / self.config.rate
        return 1.0 / (1.0 + lam / half)

    @torch.no_grad()
    @fp32
    def calibrate_thresholds(self, scores: dict[str, torch.Tensor], grid: int = 48, x_max: float = 0.97,
                             max_threshold: float = 50.0) -> None:
        """Start the thresholds on a size curve: ``E[size](lambda) ~= initial_size_target(lambda)``.

        Why: with evenly spaced control points, the nested keep probability of a head is the product
        of its own and its layer's sigmoid, so with several kinds gated most early non-dense steps
        sample a wrecked network, and a pretrained model's likelihood then pushes the thresholds the
        wrong way (benchmarks/RESULTS.md, "Push evidence").

        How: on a grid of ``x = lambda / (lambda + 1)`` in ``(0, x_max]`` one threshold shared by every
        layer and kind is solved by bisection so that the expected kept fraction at the initial
        ``scores`` (offsets 0) hits the target (expected size falls monotonically in the threshold);
        the spline's control points are then the least-squares fit to those thresholds with the first
        one held at ``-1/T``, made non-decreasing so the spline stays monotone.
        """
        T = self.config.temperature
        x = torch.linspace(0.0, x_max, grid + 1, dtype=torch.float64)[1:]
        target = self.initial_size_target(x / (1.0 - x))
        tau = torch.empty_like(x)
        for i, goal in enumerate(target.tolist()):
            lo, hi = -1.0 / T, max_threshold
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if self._size_at(scores, mid) > goal else (lo, mid)
            tau[i] = hi
        basis = bspline_basis(x, self.config.control_points)
        c0 = -1.0 / T
        rest = torch.linalg.lstsq(basis[:, 1:], (tau - basis[:, 0] * c0).unsqueeze(-1)).solution.squeeze(-1)
        values = torch.cat([torch.tensor([c0], dtype=torch.float64), rest])
        values = torch.cummax(values, dim=0).values  # monotone; set_control_points keeps steps >= 1e-3
        self.thresholds_spline.set_control_points(values)

    def _size_at(self, scores: dict[str, torch.Tensor], tau: float) -> float:
        """Expected kept fraction when every layer and kind has threshold ``tau``."""
        T = self.config.temperature
        own = {k: torch.sigmoid((scores[k].detach().float().cpu() - tau) / T) for k in self.kinds}
        rho = {k: v.to(self.cost_layers.device) for k, v in self.nest(own).items()}
        return float(self.expected_size(rho))

    @fp32
    def threshold_values(self, x: torch.Tensor) -> torch.Tensor:
        """``tau_{l,k}`` at spline coordinates ``x`` ``[...]``: ``[..., kinds, L]`` (a shared curve
        repeated over layers), the one place that knows the spline's series layout."""
        vals = self.thresholds_spline(x)  # [..., n_series]
        K, L = len(self.kinds), self.inventory.num_layers
        if self.shared:
            return vals.unsqueeze(-1).expand(*vals.shape[:-1], K, L)
        return vals.view(*vals.shape[:-1], K, L)

    @fp32
    def thresholds(self, lam: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """``tau_{l,k}(lambda)`` for every gated kind: ``{kind: [L]}``."""
        x = squash(lam).to(self.thresholds_spline.theta.device)
        vals = self.threshold_values(x)
        return dict(zip(self.kinds, vals.unbind(0)))

    @fp32
    def inclusion(self, scores: dict[str, torch.Tensor], lam: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Inclusion probabilities ``rho`` with nesting (children multiplied by their layer's)."""
        tau = self.thresholds(lam)
        T = self.config.temperature
        own = {}
        for kind in self.kinds:
            t = tau[kind] if kind == "layers" else tau[kind].unsqueeze(-1)
            own[kind] = torch.sigmoid((scores[kind] - t) / T)
        return self.nest(own)

    @fp32
    def nest(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multiply child probabilities (or masks) by their layer's."""
        out = dict(own)
        if "layers" in own:
            for kind in ("heads", "groups"):
                if kind in own:
                    out[kind] = own[kind] * own["layers"].unsqueeze(-1)
        return out

    @fp32
    def expected_size(self, rho: dict[str, torch.Tensor]) -> torch.Tensor:
        """``rho_bar``: cost-weighted mean inclusion (nested rho), i.e. the expected kept fraction."""
        ones = torch.ones(self.inventory.num_layers, device=self.cost_layers.device)
        lay = rho.get("layers", ones)
        total = torch.zeros((), device=self.cost_layers.device)
        for kind in ("layers", "heads", "groups"):
            cost = getattr(self, f"cost_{kind}")
            if kind in rho:
                r = rho[kind]
            elif kind == "layers":
                r = lay
            else:
                r = lay.unsqueeze(-1)  # ungated children live and die with their layer
            total = total + (cost * r).sum()
        return total

    # ----------------------------------------------------------------- masks
    @fp32
    def sample_masks(self, rho: dict[str, torch.Tensor], generator: torch.Generator | None = None
                     ) -> dict[str, torch.Tensor]:
        """Straight-through Bernoulli masks of the *own* (un-nested) probabilities.

        Nesting needs no extra work in the network: a layer gate of 0 silences the layer's heads and
        groups. ``rho`` here is the nested one; dividing out the parent recovers the own probability.
        """
        own = self.unnest(rho)
        if self.config.mask == "expected":
            # The network multiplies a head's gate by its layer's, so the gates must be the *own*
            # probabilities for the effective gate to be the nested rho (E of the sampled product).
            return own
        return {k: straight_through_bernoulli(v, generator) for k, v in own.items()}

    @fp32
    def unnest(self, rho: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(rho)
        if "layers" in rho:
            parent = rho["layers"].clamp_min(1e-12).unsqueeze(-1)
            for kind in ("heads", "groups"):
                if kind in rho:
                    out[kind] = (rho[kind] / parent).clamp(0.0, 1.0)
        return out

    @fp32
    def amplitudes(self, lam: float | torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``{"heads": [L, H], "groups": [L, G], "attn_scale": [L, d], "mlp_scale": [L, d]}`` multipliers."""
        if not self.config.amplitude:
            return None
        v = self.amp_spline(squash(lam).to(self.s_heads.device)).squeeze(-1)
        return {
            "heads": torch.exp(self.s_heads * v),
            "groups": torch.exp(self.s_groups * v),
            "attn_scale": torch.exp(self.s_attn * v),
            "mlp_scale": torch.exp(self.s_mlp * v),
        }

    @fp32
    def gates(self, masks: dict[str, torch.Tensor] | None, lam: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Gate tensors for :meth:`GatedLM.gates`: masks times amplitude corrections.

        ``masks=None`` means dense (every unit kept); amplitudes still apply (they are 1 at lambda = 0).
        """
        gates: dict[str, torch.Tensor] = {} if masks is None else dict(masks)
        amp = self.amplitudes(lam)
        if amp is not None and float(lam) > 0:
            for kind in ("heads", "groups"):
                gates[kind] = amp[kind] * gates[kind] if kind in gates else amp[kind]
            gates["attn_scale"] = amp["attn_scale"]
            gates["mlp_scale"] = amp["mlp_scale"]
        return gates
