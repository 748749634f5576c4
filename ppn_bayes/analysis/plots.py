"""Plots of a run and its posterior (matplotlib, Agg backend; PNG + SVG; colour-blind-safe).

Lines use the Okabe-Ito palette; heat maps use ``cividis`` (perceptually uniform and readable with
every common colour-vision deficiency). Every function takes plain data (metrics records, posterior
draws, keep-set results) and an output path *stem*; it writes ``stem.png`` and ``stem.svg``
atomically and returns the two paths.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ppn_bayes.files import atomic_write_bytes

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
HEATMAP = "cividis"


def save(fig, stem: str | Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` atomically; close the figure."""
    stem = Path(stem)
    paths = []
    for ext, kw in (("png", {"dpi": 150}), ("svg", {})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        path = stem.with_suffix(f".{ext}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def plot_traces(metrics: Sequence[dict[str, Any]], stem: str | Path) -> list[Path]:
    """ELBO loss and token loss against the training step (train records of metrics.jsonl)."""
    train = [r for r in metrics if r.get("type", "train") == "train" and "step" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "elbo", "ELBO loss (−ELBO)"), (axes[1], "token_loss", "token loss (nats/token)")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, color=OKABE_ITO[0], lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no '{key}' in metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0] + " during training")
        ax.grid(alpha=0.3)
    evals = [r for r in metrics if r.get("type") == "eval" and r.get("token_loss") is not None]
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["token_loss"] for r in evals], "o", color=OKABE_ITO[1],
                     label="held-out")
        axes[1].legend()
    fig.tight_layout()
    return save(fig, stem)


def plot_layer_forest(scores: torch.Tensor, stem: str | Path, thresholds: torch.Tensor | None = None,
                      lam: float | None = None) -> list[Path]:
    """Forest plot of layer scores ``[K, L]``: median and 50 % / 90 % credible intervals per layer,
    with the push's threshold tau_l(lambda) where given (a layer is kept while its score is above)."""
    s = scores.double()
    q = torch.quantile(s, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64), dim=0)
    L = s.shape[1]
    y = torch.arange(L)
    fig, ax = plt.subplots(figsize=(6, 0.35 * L + 1.5))
    ax.hlines(y, q[0], q[4], color=OKABE_ITO[0], lw=1.2, label="90 % interval")
    ax.hlines(y, q[1], q[3], color=OKABE_ITO[0], lw=3.5, label="50 % interval")
    ax.plot(q[2], y, "o", color="white", mec=OKABE_ITO[0], ms=5, label="median")
    if thresholds is not None:
        ax.plot(thresholds.double(), y, "|", color=OKABE_ITO[3], ms=12, mew=2,
                label=f"threshold τ_l(λ={lam:.3g})" if lam is not None else "threshold")
    ax.set_yticks(y, [f"layer {i}" for i in range(L)])
    ax.invert_yaxis()
    ax.set_xlabel("layer score a_l (logit scale)")
    ax.set_title("Layer scores: posterior medians and credible intervals")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return save(fig, stem)


def plot_unit_heatmaps(scores: torch.Tensor, stem: str | Path, unit: str = "head") -> list[Path]:
    """Layer x unit heat maps of the posterior mean and sd of scores ``[K, L, H]``."""
    s = scores.double()
    mean, sd = s.mean(0), s.std(0)
    L, H = mean.shape
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * H * 2 + 3), 0.35 * L + 2))
    for ax, data, title in ((axes[0], mean, f"posterior mean of {unit} scores"),
                            (axes[1], sd, f"posterior sd of {unit} scores")):
        im = ax.imshow(data.numpy(), cmap=HEATMAP, aspect="auto", interpolation="nearest")
        ax.set_xlabel(unit)
        ax.set_ylabel("layer")
        ax.set_title(title)
        if H <= 32:
            ax.set_xticks(range(H))
        if L <= 64:
            ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    return save(fig, stem)


def plot_puppet(results: Sequence[Any], stem: str | Path, max_units: int = 400) -> list[Path]:
    """The "puppet" chart: units (rows, in the order they leave as size falls) x requested sizes
    (columns), shaded by inclusion probability; the reported keep-set is outlined per column."""
    if not results:
        raise ValueError("plot_puppet needs at least one keep-set result")
    table = results[0].table
    prio = table.flatten(results[0].priority)
    order = torch.argsort(prio, descending=True, stable=True)
    if order.numel() > max_units:  # keep layers and heads, thin the groups evenly
        keep_idx = order[table.kind_id[order] < 2]
        groups = order[table.kind_id[order] == 2]
        room = max(max_units - keep_idx.numel(), 0)
        step = max(1, groups.numel() // max(room, 1))
        order = order[torch.isin(order, torch.cat([keep_idx, groups[::step][:room]]))]
    pi = torch.stack([table.flatten(r.inclusion)[order] for r in results], dim=1)
    kept = torch.stack([table.flatten(table.inventory.masks(r.keep))[order] > 0.5 for r in results], dim=1)
    n, m = pi.shape
    fig, ax = plt.subplots(figsize=(1.1 * m + 4, min(0.14 * n + 1.8, 22)))
    im = ax.imshow(pi.numpy(), cmap=HEATMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    rows, cols = kept.nonzero(as_tuple=True)
    ax.scatter(cols.numpy(), rows.numpy(), marker="s", s=9 if n <= 80 else 2, color=OKABE_ITO[1],
               label="in the reported keep-set")
    ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=8, frameon=False)
    ax.set_xticks(range(m), [f"{r.requested_size:.2g}" for r in results])
    ax.set_xlabel(f"requested size ({results[0].target.currency} fraction)")
    labels = [table.unit_name(int(u)) for u in order]
    if n <= 80:
        ax.set_yticks(range(n), labels, fontsize=7)
    else:
        ax.set_ylabel(f"{n} units, most durable at the top")
    ax.set_title("Keep-sets across sizes\n(shade: inclusion probability π; square: kept in the reported keep-set)")
    fig.colorbar(im, ax=ax, label="inclusion probability π", shrink=0.8)
    fig.tight_layout()
    return save(fig, stem)


def plot_perplexity_vs_size(points: Sequence[dict[str, float]], stem: str | Path,
                            baselines: dict[str, Sequence[tuple[float, float]]] | None = None,
                            dense: float | None = None) -> list[Path]:
    """Held-out perplexity against size: ``points`` are ``{"size", "ppl", "ppl_lo", "ppl_hi"}`` (band =
    credible interval over sampled keep-sets); ``baselines`` map a method name to ``[(size, ppl)]``."""
    pts = sorted(points, key=lambda p: p["size"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [p["size"] for p in pts]
    ax.plot(x, [p["ppl"] for p in pts], "o-", color=OKABE_ITO[0], label="PPN keep-set")
    if all("ppl_lo" in p and "ppl_hi" in p for p in pts):
        ax.fill_between(x, [p["ppl_lo"] for p in pts], [p["ppl_hi"] for p in pts], color=OKABE_ITO[0], alpha=0.25,
                        label="90 % band over sampled keep-sets")
    for i, (name, series) in enumerate((baselines or {}).items()):
        bx, by = zip(*sorted(series))
        ax.plot(bx, by, "s--", color=OKABE_ITO[(i + 1) % len(OKABE_ITO)], label=name)
    if dense is not None:
        ax.axhline(dense, color="grey", ls=":", label="dense model")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of decoder parameters")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Held-out perplexity vs size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, stem)


def plot_reliability(curves: dict[str, Sequence[dict[str, float]]], stem: str | Path, title: str,
                     xlabel: str = "forecast probability", ylabel: str = "observed frequency") -> list[Path]:
    """Reliability curves: per series, each non-empty bin's mean forecast against its observed frequency
    (``{"mean_forecast", "observed", "count"}`` rows, :func:`ppn_bayes.analysis.calibration_checks.reliability_curve`),
    marker area by count, with the diagonal of perfect calibration and a +-0.1 band around it."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="calibrated")
    ax.fill_between([0, 1], [-0.1, 0.9], [0.1, 1.1], color="grey", alpha=0.12, label="within 0.1")
    for i, (label, curve) in enumerate(curves.items()):
        pts = [r for r in curve if r["count"]]
        if not pts:
            continue
        n = sum(r["count"] for r in pts)
        x, y = [r["mean_forecast"] for r in pts], [r["observed"] for r in pts]
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, y, "-", color=color, lw=1.2, label=f"{label} (n = {n})")
        ax.scatter(x, y, s=[12 + 300 * r["count"] / n for r in pts], color=color, alpha=0.8, zorder=3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save(fig, stem)
