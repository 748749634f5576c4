"""Run ``ppn demo`` (the main job on the bundled default) and keep its summary for the README.

    OMP_NUM_THREADS=2 python benchmarks/demo.py [--out runs/demo]

Writes ``benchmarks/demo_smollm2.json`` (what the demo measured, the device, the wall time of
each step); ``python benchmarks/readme_results.py`` then regenerates the README's results block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from ppn_bayes.demo import format_demo, run_demo
from ppn_bayes.files import atomic_write_bytes

HERE = Path(__file__).resolve().parent


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--json", default=str(HERE / "demo_smollm2.json"))
    args = parser.parse_args()
    res = run_demo(args.out, progress=False)
    print(format_demo(res))
    summary = {**res.to_dict(), "device": device_label(), "command": "ppn demo --out " + args.out}
    atomic_write_bytes(Path(args.json), json.dumps(summary, indent=2).encode())


if __name__ == "__main__":
    main()
