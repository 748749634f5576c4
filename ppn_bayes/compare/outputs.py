"""What ``ppn compare`` writes: the Markdown table, the plot, and the checked, atomic files of ``--out``."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppn_bayes.errors import OutputError
from ppn_bayes.files import (
    atomic_write_bytes,
    atomic_write_many,
    check_no_overlap,
    check_owned,
    check_writable,
)


def markdown_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per method and size, the dense model first."""
    transfer = "transfer_perplexity" in result["dense"]
    head = ("| method | size | params kept | FLOPs kept | perplexity |" + (" transfer ppl (x dense) |" if transfer else "")
            + " decode speedup | cost s (all sizes) |\n| --- | ---: | ---: | ---: | ---: |"
            + (" ---: |" if transfer else "") + " ---: | ---: |")
    lines = [head]
    costs = result.get("costs", {})
    for r in [result["dense"], *result["results"]]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['size']:.2f} | - | - | skipped: {r['skipped']} | - | - |")
            continue
        ppl = f"{r['perplexity']:.2f}" + (f" ± {r['perplexity_std']:.2f}" if "perplexity_std" in r else "")
        sp = r.get("decode_speedup")
        speed = f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-"
        name = r["method"] + (f" (tau={r['tau']:.3f})" if "tau" in r else "")
        cost = costs.get(r["method"], r.get("cost_seconds", 0.0))
        moved = ""
        if transfer:
            moved = (f" {r['transfer_perplexity']:.2f} (x{r['transfer_perplexity'] / result['dense']['transfer_perplexity']:.2f}) |"
                     if "transfer_perplexity" in r else " - |")
        lines.append(f"| {name} | {r['size']:.2f} | {r['param_fraction']:.3f} | {r['flops_fraction']:.3f} | {ppl} |"
                     f"{moved} {speed} | {cost:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Held-out perplexity vs decoder-params kept (left) and vs FLOPs kept (right), log y, as a PNG."""
    atomic_write_bytes(Path(path), plot_png(result))


def plot_png(result: dict[str, Any]) -> bytes:
    """The PNG bytes of :func:`plot`'s figure."""
    import matplotlib  # lazy: heavy, and only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    by_method: dict[str, list[dict]] = {}
    for r in result["results"]:
        if "skipped" not in r:
            by_method.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab20").colors  # up to 20 methods without a repeated colour
    dense = result["dense"]["perplexity"]
    top = max(r["perplexity"] for rs in by_method.values() for r in rs) if by_method else dense
    clip = dense * 30.0 if top > dense * 30.0 else None  # keep the informative range readable
    for ax, key, label in ((axes[0], "param_fraction", "fraction of decoder parameters kept"),
                           (axes[1], "flops_fraction", "fraction of decoder FLOPs per token")):
        for i, (method, rs) in enumerate(by_method.items()):
            rs = sorted(rs, key=lambda r: r[key])
            name = method + (" (active per token)" if method == "prunepath" else "")
            healed = any(r.get("healed_tokens") for r in rs)
            ax.plot([r[key] for r in rs], [r["perplexity"] for r in rs], marker="o", label=name,
                    color=colors[i % len(colors)], ls="--" if healed else "-",
                    lw=2.2 if method.startswith("ppn") else 1.2)
        ax.axhline(dense, color="k", ls=":", lw=1, label="dense")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        if clip is not None:
            ax.set_ylim(top=clip)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("held-out perplexity" + (" (clipped at 30x dense)" if clip is not None else ""))
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


#: What ``ppn compare`` writes into ``--out``: its four files and the runs it fits when none is given.
COMPARE_ENTRIES = ("compare.json", "keepsets.json", "compare.md", "compare.png", "ppn-run", "ppn-paper-run")


def check_out(out_dir: str | os.PathLike, inputs: list[tuple[str, Any]], fits: Sequence[str] = ()) -> None:
    """Before the model loads: ``--out`` can be written, overlaps none of the ``(what, path)`` inputs and,
    if it exists, holds only an earlier comparison (which is replaced); see :mod:`ppn_bayes.files`.

    ``fits``: the methods whose run is to be fitted into ``--out`` (:func:`~ppn_bayes.compare.rows.fit_ppn_run`). A run an
    earlier comparison fitted there is never refitted over; the user is told now how to reuse it,
    not after the peers have been measured.
    """
    check_writable(out_dir)
    check_no_overlap(out_dir, inputs, writes=COMPARE_ENTRIES)
    check_owned(out_dir, COMPARE_ENTRIES, "ppn compare")
    for method in fits:
        earlier = Path(out_dir) / f"{method}-run"
        if os.path.lexists(earlier):
            flag = "--paper-run" if method == "ppn-paper" else "--run"
            raise OutputError(f"--out {out_dir} already holds the {method} run an earlier comparison fitted "
                              f"({earlier}); pass {flag} {earlier} to reuse it, or choose another --out")


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """``compare.json``, ``keepsets.json``, ``compare.md`` and ``compare.png`` in ``out_dir`` (atomic writes).

    The structured methods' keep-sets go to their own file: with single-neuron groups they are large.
    """
    out = Path(out_dir)
    paths = {"json": out / "compare.json", "keepsets": out / "keepsets.json", "markdown": out / "compare.md",
             "plot": out / "compare.png"}
    main = {k: v for k, v in result.items() if k != "keepsets"}
    atomic_write_many({  # all four or none: a full disk leaves the previous set as it was
        paths["json"]: (json.dumps(main, indent=2, sort_keys=True) + "\n").encode(),
        paths["keepsets"]: (json.dumps(result.get("keepsets", {}), sort_keys=True) + "\n").encode(),
        paths["markdown"]: markdown_table(result).encode(),
        paths["plot"]: plot_png(result),
    })
    return {k: str(v) for k, v in paths.items()}
