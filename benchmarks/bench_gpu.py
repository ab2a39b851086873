"""(c) On a CUDA GPU: peak GPU memory of the whole device (NVML) and time per case, stock against ours.

    python benchmarks/bench_gpu.py [--runs stock stock_notta ours_fp32 ours] [--device cuda|cpu]
                                   [--output result.json] [case options of bench_e2e.py]

The case of ``bench_e2e.py`` (random-weight half-width model, one phantom CT; ``--shape 300 512 512 --spacing 2.5
0.8 0.8`` for a 512 x 512 x 300 CT at 0.8 x 0.8 x 2.5 mm), predicted with ``-device cuda`` under ``nsn profile``'s
sampler: wall time, peak GPU memory of the device (NVML), peak RSS of the process tree. Then the labels of each of
our runs against stock's, per label: Dice against stock without mirroring (``stock_notta``: the same network
passes, so what differs is fp16 on the GPU, the export and the preprocessing) and against stock's default with
mirroring. Weights are random: the Dice says whether the two predictors agree, not how good the model is.
Without a CUDA device it says so and measures nothing, unless ``--device cpu`` (same runs on the CPU, with a
small ``--shape`` and ``--patch``: ours runs OpenVINO there). ``--output`` writes the rows, the agreement and the
machine as JSON. Also run as ``python benchmarks/bench_inference.py gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import PREDICT_RUNS, dice_per_class, machine, predict_commands, read_labels, run_profiled, table
from _inference_case import add_case_arguments, half_width_case

GPU_DATASET = "Dataset982_BenchGpu"
#: what each of our runs is compared with: stock without mirroring (the same passes) and stock's default
REFERENCES = ("stock_notta", "stock")


def agreement(root: Path, keys: list[str]) -> dict[str, dict]:
    """Labels of each non-stock run against each stock run present: Dice per label (labels either map has), their
    mean and minimum, and the share of equal voxels."""
    maps = {key: read_labels(root / f"out_{key}" / "case.nii.gz") for key in keys
            if (root / f"out_{key}" / "case.nii.gz").is_file()}
    out: dict[str, dict] = {}
    for key in maps:
        if key.startswith("stock"):
            continue
        for reference in REFERENCES:
            if reference not in maps:
                continue
            ours, theirs = maps[key], maps[reference]
            labels = sorted(int(c) for c in set(np.unique(ours)) | set(np.unique(theirs)))
            dice = dice_per_class(ours, theirs, labels)
            foreground = [d for c, d in dice.items() if c != 0 and not np.isnan(d)]
            out[f"{key}_vs_{reference}"] = {
                "dice_per_label": {str(c): d for c, d in dice.items()},
                "dice_mean_foreground": float(np.mean(foreground)) if foreground else None,
                "dice_min_foreground": float(np.min(foreground)) if foreground else None,
                "voxels_equal": float((ours == theirs).mean()),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    add_case_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["stock", "stock_notta", "ours_fp32", "ours"],
                        choices=PREDICT_RUNS)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default; without one nothing is measured) or cpu (the same runs, small case)")
    parser.add_argument("--output", type=Path, default=None, help="JSON record: rows, agreement, machine")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("(c) GPU: no CUDA device on this machine; nothing measured. The CUDA path (fp16 autocast, logits, "
              "argmax and resizing on the device) is exercised by this benchmark where a GPU exists "
              "(--device cpu runs the same comparison on the CPU).")
        return 0
    case = half_width_case(args, "gpu", GPU_DATASET)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    rows: list[dict] = []
    record = {"benchmark": "bench_gpu",
              "command": " ".join(["bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "device": device, "image_shape_zyx": list(case.shape),
              "image_spacing_zyx_mm": list(case.spacing), "plans_spacing_zyx_mm": list(case.plans_spacing),
              "patch": list(case.patch), "rows": rows, "agreement": {}, "ok": False,
              "note": "random weights: near-ties almost everywhere, so labels differ wherever the arithmetic or the "
                      "export does (ours' default nearest export against stock's linear resampling of logits); "
                      "ours_linear against stock_notta is the like-for-like comparison"}

    def write_record() -> None:
        if args.output:  # after every run: a benchmark stopped from outside keeps what it measured
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(record, indent=1) + "\n")

    for key, label, command in predict_commands(args.runs, case.inputs, case.root, GPU_DATASET, args.device):
        row = run_profiled(label, command, case.env, case.root / f"log_{key}.txt")
        row["key"] = key
        rows.append(row)
        write_record()
    agree = agreement(case.root, [row["key"] for row in rows if row["exit"] == 0])
    for row in rows:
        for reference in REFERENCES:
            row[f"dice_vs_{reference}"] = agree.get(f"{row['key']}_vs_{reference}", {}).get("dice_mean_foreground")
    record.update(agreement=agree, ok=all(row["exit"] == 0 for row in rows))
    write_record()
    print(f"\n(c) {args.device}, image {case.shape} at {case.spacing} mm, model planned at {case.plans_spacing} mm, "
          f"patch {case.patch}. Device: {device}. Machine: {machine()}")
    print(table(rows, [("run", "run"), ("exit", "exit"), ("wall_s", "wall time (s)"),
                       ("gpu_peak_gb", "peak GPU memory, device (GB)"), ("peak_rss_gb", "peak RSS tree (GB)"),
                       ("cpu_util_pct", "CPU util. (%)"), ("dice_vs_stock_notta", "Dice vs stock --disable_tta"),
                       ("dice_vs_stock", "Dice vs stock (TTA)")]))
    for name, figures in agree.items():
        print(f"  {name}: mean foreground Dice {figures['dice_mean_foreground']}, min "
              f"{figures['dice_min_foreground']}, voxels equal {figures['voxels_equal']:.6f}")
    (case.root / "results.json").write_text(json.dumps(rows, indent=1))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
