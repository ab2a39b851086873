"""(f) One network patch: seconds per forward pass of the half-width U-Net in fp32 / bf16, channels-last, threads.

    python benchmarks/bench_patch.py [--modes fp32 bf16 fp32_cl bf16_cl] [--threads 1 2] [--repeats 3]

One 40 x 224 x 192 patch of the FLARE22 half-width U-Net (planned at 2.5 x 1.6 x 1.6 mm), random weights, each
mode and thread count in a fresh process, median of ``--repeats`` passes after a first one that builds
oneDNN's kernels. Also run as ``python benchmarks/bench_inference.py patch``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from _common import GB, machine, rss_status, run_worker, table

import model_folders as mf  # noqa: E402  (on sys.path through _common)

NUM_CLASSES = 14


def patch_worker(mode: str, threads: int, repeats: int) -> dict:
    """Seconds per forward pass on one patch, in this fresh process."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.set_num_threads(threads)
    architecture, patch = mf.half_width_architecture((2.5, 1.6, 1.6), (40, 224, 192))
    net = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], 1, NUM_CLASSES, allow_init=True,
                                 deep_supervision=False).eval()
    x = torch.randn(1, 1, *patch)
    if mode.endswith("_cl"):
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
        for _ in range(repeats + 1):  # the first pass builds oneDNN's kernels
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return {"mode": mode, "threads": threads, "s_per_patch": float(np.median(times[1:])), "first_s": times[0],
            "peak_gb": rss_status()[1] / GB}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(patch_worker(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "fp32_cl", "bf16_cl"])
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        for mode in args.modes:
            try:
                rows.append(run_worker(__file__, ["_worker", mode, threads, args.repeats]))
            except RuntimeError as error:
                print(f"{mode}: failed: {error}")
                continue
            print(f"  {mode}, {threads} threads: {rows[-1]['s_per_patch']:.2f} s", flush=True)
    print(f"\n(f) one 40 x 224 x 192 patch, half-width U-Net, median of {args.repeats}. Machine: {machine()}; "
          f"load avg. {os.getloadavg()[0]:.1f}")
    print(table(rows, [("mode", "mode"), ("threads", "threads"), ("s_per_patch", "s / patch"),
                       ("first_s", "first pass (s)"), ("peak_gb", "peak RSS (GB)")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
