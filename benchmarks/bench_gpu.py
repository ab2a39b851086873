"""(c) On a CUDA GPU: peak GPU memory of the whole device (NVML) and time per case, stock against ours.

    python benchmarks/bench_gpu.py [--runs stock stock_notta ours_fp32 ours] [case options of bench_e2e.py]

The case of ``bench_e2e.py`` (random-weight half-width model, one phantom CT), predicted with ``-device cuda``
under ``nsn profile``'s sampler. Without a CUDA device it says so and measures nothing. Also run as
``python benchmarks/bench_inference.py gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _common import PREDICT_RUNS, machine, predict_commands, run_profiled, table
from _inference_case import add_case_arguments, half_width_case

GPU_DATASET = "Dataset982_BenchGpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    add_case_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["stock", "stock_notta", "ours_fp32", "ours"],
                        choices=PREDICT_RUNS)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("(c) GPU: no CUDA device on this machine; nothing measured. The CUDA path (fp16 autocast, logits, "
              "argmax and resizing on the device) is exercised by this benchmark where a GPU exists.")
        return 0
    case = half_width_case(args, "gpu", GPU_DATASET)
    rows = [run_profiled(label, command, case.env, case.root / f"log_{key}.txt")
            for key, label, command in predict_commands(args.runs, case.inputs, case.root, GPU_DATASET, "cuda")]
    print(f"\n(c) GPU, image {case.shape} at {case.spacing} mm. Device: {torch.cuda.get_device_name(0)}. "
          f"Machine: {machine()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("gpu_peak_gb", "peak GPU memory, device (GB)"),
                       ("peak_rss_gb", "peak RSS tree (GB)"), ("cpu_util_pct", "CPU util. (%)")]))
    (case.root / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
