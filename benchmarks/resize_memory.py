"""Peak RSS of a lazy resize at sizes 0.25/0.5/0.75 (layer keep-sets) vs loading the full model.

Each measurement runs in a fresh subprocess that reports its own peak RSS (``ru_maxrss``) at exit, so
nothing one step allocates is charged to another. A baseline subprocess imports the same modules
(torch, transformers, ppn_bayes.export.resize) and does nothing: ``peak - baseline`` is the memory the work
itself needed. The full load touches every weight once (as any use of the model
would), since transformers may memory-map weights lazily. The keep-sets are evenly spaced layers (no run needed); every layer costs the same.

    OMP_NUM_THREADS=1 python benchmarks/resize_memory.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

PRELUDE = """
import resource, json, sys, torch, transformers
import ppn_bayes.export.resize
from ppn_bayes.hub.zoo import resolve_model
"""

TASKS = {
    "baseline": "pass",
    "full load": """
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
with torch.no_grad():  # touch every weight: a model one uses is resident, not just mapped
    total = sum(float(p.sum()) for p in m.parameters())
""",
    "resize": """
from transformers import AutoConfig
from ppn_bayes.backbone import KeepSet, UnitInventory, family_for
path = resolve_model(MODEL)
cfg = AutoConfig.from_pretrained(path)
fam = family_for(cfg)
inv = UnitInventory(dims=fam.dims(cfg), kinds=("layers",), family=fam.name)
L = inv.num_layers
k = max(1, round(SIZE * L))
keep = KeepSet(layers=sorted({round(i * (L - 1) / max(k - 1, 1)) for i in range(k)}))
ppn_bayes.export.resize.resize(path, keep, inv, OUT)
""",
}


def measure(task: str, model: str, size: float = 1.0) -> int:
    """Peak RSS in bytes of a subprocess running one task."""
    with tempfile.TemporaryDirectory() as tmp:
        code = PRELUDE + f"MODEL, SIZE, OUT = {model!r}, {size!r}, {os.path.join(tmp, 'out')!r}\n" + \
            textwrap.dedent(TASKS[task]) + \
            "\nprint(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))\n"
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="0.25,0.5,0.75")
    args = ap.parse_args()
    base = measure("baseline", args.model)
    full = measure("full load", args.model)
    mib = 1 / 2**20
    print(f"model {args.model}; peak RSS of a fresh process (baseline = imports only: {base * mib:.0f} MiB)")
    print(f"{'what':<14} {'peak MiB':>9} {'above baseline':>15} {'ratio to full load':>19}")
    print(f"{'full load':<14} {full * mib:>9.0f} {(full - base) * mib:>15.0f} {1.0:>19.2f}")
    rows = {"baseline": base, "full": full}
    for s in [float(x) for x in args.sizes.split(",")]:
        peak = measure("resize", args.model, s)
        rows[f"resize {s}"] = peak
        print(f"{'resize ' + str(s):<14} {peak * mib:>9.0f} {(peak - base) * mib:>15.0f} "
              f"{(peak - base) / (full - base):>19.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
