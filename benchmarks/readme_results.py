"""Regenerate the README's results block from the benchmarks' JSON outputs.

    python benchmarks/readme_results.py

Reads ``benchmarks/demo_smollm2.json`` (``benchmarks/demo.py``), ``benchmarks/compare_smollm2.json``
(``benchmarks/compare_smollm2.py``: every method on the same calibration and test blocks) and, when
present, ``benchmarks/fair_fight_distill.md`` (``benchmarks/fair_fight.py``), and rewrites
the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md. Missing inputs
are skipped with a note, never invented.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = HERE / name
    return json.loads(path.read_text()) if path.is_file() else None


def demo_section(demo: dict) -> list[str]:
    fit_s = next((v for k, v in demo["seconds"].items() if k.startswith("fit")), 0.0)
    lines = [(f"**`ppn demo`** on the bundled default ({demo['device']}; wall time "
              f"{sum(demo['seconds'].values()):.0f} s, of which the fit {fit_s:.0f} s):"),
             "", "| model | decoder params kept | test perplexity | decode tok/s | speedup | ideal (FLOPs) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in demo["rows"]:
        lines.append(f"| {r['model']} | {r['size_params']:.3f} | {r['perplexity']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x |")
    per_size = all("perplexity" in k for k in demo["keepsets"])
    lines += ["", "| requested size | params kept | FLOPs kept | lambda* | layers kept | P(draw = keep-set) |"
              + (" test perplexity (x dense) |" if per_size else ""),
              "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if per_size else "")]
    for k in demo["keepsets"]:
        lam = "saturated" if k.get("lambda_saturated") else f"{k['lambda']:.3g}"
        ppl = f" {k['perplexity']:.2f} ({k['ppl_ratio']:.2f}) |" if per_size else ""
        lines.append(f"| {k['requested']:.2f} | {k['achieved_params']:.3f} | {k['achieved_flops']:.3f} | "
                     f"{lam} | {k['layers']} | {k['p_equal']:.2f} |{ppl}")
    if "usable_sizes" in demo:
        usable = ", ".join(f"{u:g}" for u in demo["usable_sizes"]) or "none of these sizes"
        lines += ["", f"Usable (test perplexity within {demo['usable_ratio']:.2f}x dense): {usable}."]
    return lines


FIGHTS = (  # (tag, title) of the fair fights the README shows (benchmarks/fair_fight.py --tag)
    ("distill", "**The fair fight** (`python benchmarks/fair_fight.py`: one distilled PPN run against peers healed "
                "*per size* on the same token budget; details in `benchmarks/RESULTS.md`):"),
    ("distill-full", "**The same fight with every weight trained** (`python benchmarks/fair_fight.py --recipe "
                     "inference/smollm2-distill-full.yaml --tag distill-full --heal-lr 5e-4`: the PPN run trains full "
                     "weights at 5e-4, and every peer is healed at that rate too; measured with the recipe's earlier "
                     "`distill_weight: 1`):"),
    ("distill-full-w05", "**The full-weights recipe as committed** (`distill_weight: 0.5`, half distillation and half "
                         "the data loss; its one run and its own sub-networks healed per size at 5e-4, by the same command "
                         "with `--recipe benchmarks/fair_fight/distill-full-w05/recipe.yaml --tag distill-full-w05 --stages "
                         "ppn,healed-data,healed-distill --healed ppn-healed --heal-lr 5e-4`, on the same blocks; the peers' "
                         "rows are those of the table above):"),
)


def fair_fight_section(fight_md: str | None, title: str = FIGHTS[0][1]) -> list[str]:
    """A fair fight's tables (``benchmarks/fair_fight.py``), as that script wrote them."""
    if not fight_md:
        return []
    return [title, "", *fight_md.rstrip().split("\n")]


def compare_section(merged: dict | None) -> list[str]:
    rows = [r for r in (merged or {}).get("results", []) if "skipped" not in r]
    if not rows:
        return ["(no `benchmarks/compare_smollm2.py` result recorded yet)"]
    sizes = sorted({r["size"] for r in rows}, reverse=True)
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: not m.startswith("ppn"))
    dense = merged["dense"]["perplexity"]
    head = "| method | " + " | ".join(f"{s:g}" for s in sizes) + " |"
    title = ("**Held-out perplexity vs fraction of decoder parameters kept** (SmolLM2-135M, bundled test split, "
             f"16 x 128 tokens; dense {dense:.2f}; blank = not run at that size)")
    lines = [title, "", head, "| --- | " + " | ".join("---:" for _ in sizes) + " |"]
    for m in methods:
        cells = []
        for s in sizes:
            hit = [r for r in rows if r["method"] == m and r["size"] == s]
            cells.append(f"{hit[0]['perplexity']:.4g}" if hit else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", ("Structured methods (ppn, gisp, shortgpt, prunepath, random) give real speed; wanda and sparsegpt "
                   "are unstructured (no speed on dense kernels). One PPN run gives every size; the peers need a run "
                   "(and a healing run) per size. Conditions, costs and decode speedups: `benchmarks/RESULTS.md`; "
                   "plot: `benchmarks/compare_smollm2.png`.")]
    return lines


def build() -> str:
    demo, merged = _load("demo_smollm2.json"), _load("compare_smollm2.json")
    lines = ["Measured on this project's development machine; `benchmarks/RESULTS.md` has every figure, its",
             "conditions and the command that regenerates it. Regenerate this block with",
             "`python benchmarks/readme_results.py` (`python benchmarks/compare_smollm2.py` re-runs the comparison",
             "and calls it).", ""]
    lines += demo_section(demo) if demo else ["(no `benchmarks/demo.py` result recorded yet)"]
    lines += [""] + compare_section(merged)
    for tag, title in FIGHTS:
        fight = HERE / f"fair_fight_{tag}.md"
        section = fair_fight_section(fight.read_text() if fight.is_file() else None, title)
        if section:
            lines += [""] + section
    return "\n".join(lines)


def main() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{build()}\n{END}{tail}")
    print("README.md results block regenerated")


if __name__ == "__main__":
    main()
