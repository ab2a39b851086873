"""(d) A huge case: 512 x 512 x N phantom (default N = 1000) through ours with a tiny network; peak RSS.

    python benchmarks/bench_huge.py [--slices 1000] [--runs ours]

Plans 2.5 x 0.8 x 0.8 mm (network grid 400 x 512 x 512 for 1000 slices at 1 mm), a tiny U-Net [4, 8, 16] with
random weights, patch 48 x 128 x 128, 14 classes, one fold, CPU, under ``nsn profile``'s sampler. Stock is not
run by default: its export alone needs about 14 x 262 M x (2 + 8) bytes. Also run as
``python benchmarks/bench_inference.py huge``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import PREDICT_RUNS, machine, predict_commands, run_profiled, table
from _inference_case import random_weight_case

import model_folders as mf  # noqa: E402  (on sys.path through _common)

HUGE_DATASET = "Dataset981_BenchHuge"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--runs", nargs="+", default=["ours"], choices=PREDICT_RUNS)
    args = parser.parse_args(argv)
    shape, spacing, plans_spacing, patch = (args.slices, 512, 512), (1.0, 0.8, 0.8), (2.5, 0.8, 0.8), [48, 128, 128]
    root, inputs, env = random_weight_case(Path(args.workdir), f"huge_{'x'.join(map(str, shape))}", shape, spacing,
                                           plans_spacing, patch, mf.tiny_architecture((4, 8, 16)), HUGE_DATASET)
    print(f"(d) huge case: phantom {shape} (z, y, x) at {spacing} mm; plans spacing {plans_spacing}, patch {patch}, "
          f"tiny PlainConvUNet [4, 8, 16], 14 classes, 1 fold, CPU", flush=True)
    rows = [run_profiled(label, command, env, root / f"log_{key}.txt")
            for key, label, command in predict_commands(args.runs, inputs, root, HUGE_DATASET, "cpu")]
    print(f"\n(d) huge case {shape}. Machine: {machine()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("peak_rss_gb", "peak RSS tree (GB)"),
                       ("peak_rss_largest_gb", "peak RSS largest process (GB)"),
                       ("cpu_util_pct", "CPU util. (% of all cores)"), ("exit", "exit code")]))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
