"""(b) End to end on the CPU: stock ``nnUNetv2_predict`` against ``nnUNetv2_predict_lowfootprint``, one case.

    python benchmarks/bench_e2e.py [--runs stock stock_notta ours ours_bf16] [--accuracy_iterations 600]
                                   [--no_breakdown] [case options: --shape, --spacing, --plans_spacing, --patch]

The case is issue 12's (see ``_inference_case.py``): the half-width FLARE22 model with random weights, one
phantom CT of 523 x 433 x 269 voxels. Every command runs under ``nsn profile``'s sampler (peak RSS summed over
the process tree, CPU time of the tree). Random weights say nothing about accuracy, so an accuracy guard
trains a small U-Net on phantoms and compares ``--precision bf16`` with ``--precision fp32`` per organ it
learned; then ours' RSS stage by stage (``bench_memory.py``). Also run as
``python benchmarks/bench_inference.py e2e``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BIN, PREDICT_RUNS, dice_per_class, machine, nnunet_env, predict_commands, read_labels, \
    run_profiled, table
from _inference_case import add_case_arguments, half_width_case
from bench_memory import E2E_DATASET, memory_breakdown, print_breakdown

import model_folders as mf  # noqa: E402  (on sys.path through _common)

TRAINED_DATASET = "Dataset983_BenchTrained"


def accuracy_guard(work: Path, iterations: int, shape_zyx, spacing_zyx) -> dict:
    """bf16 against fp32 labels of a model trained (briefly) on phantoms: Dice per organ present.

    A random-weight network gives near-ties almost everywhere, so its bf16/fp32 agreement says nothing; this one
    is trained at the plans' spacing (``model_folders.train_phantom_model``) and predicts an unseen phantom
    through the console script with ``--precision fp32`` and ``--precision bf16``.
    """
    import torch

    from noisy_student_nnunet.flare import FLARE22_ORGANS
    from noisy_student_nnunet.phantoms import make_phantom

    root = work / f"accuracy_{iterations}"
    plans = mf.make_plans([2.5, 1.6, 1.6], [32, 64, 64], mf.tiny_architecture((8, 16, 32, 64)),
                          dataset_name=TRAINED_DATASET)
    folder = root / "results" / TRAINED_DATASET / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    t0 = time.perf_counter()
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"  accuracy guard: training a small U-Net [8, 16, 32, 64] on phantoms ({iterations} iterations)",
              flush=True)
        mf.train_phantom_model(folder, plans, iterations=iterations, case_shape=(48, 112, 112), num_cases=8,
                               log=True)
    trained_s = time.perf_counter() - t0
    inputs = root / "in"
    phantom = make_phantom(4242, shape_zyx, spacing_zyx)
    if not (inputs / "case_0000.nii.gz").is_file():
        inputs.mkdir(parents=True, exist_ok=True)
        phantom.write(inputs / "case_0000.nii.gz")
    env = nnunet_env(root, root / "results")
    env.pop("NSN_CPU_BF16", None)
    out = {}
    for precision in ("fp32", "bf16"):
        command = [str(BIN / "nnUNetv2_predict_lowfootprint"), "-i", str(inputs), "-o", str(root / precision), "-d",
                   TRAINED_DATASET, "-c", mf.CONFIGURATION, "-f", "0", "-device", "cpu", "--disable_progress_bar",
                   "--precision", precision]
        subprocess.run(command, env=env, check=True, capture_output=True)
        out[precision] = read_labels(root / precision / "case.nii.gz")
    present = [o for o in FLARE22_ORGANS if (out["fp32"] == o.label).any() or (out["bf16"] == o.label).any()]
    dice_bf16 = dice_per_class(out["bf16"], out["fp32"], [o.label for o in present])
    dice_truth = dice_per_class(out["fp32"], phantom.label, [o.label for o in present])
    return {
        "organs": {o.name: {"dice_bf16_vs_fp32": dice_bf16[o.label], "dice_fp32_vs_truth": dice_truth[o.label],
                            "voxels_fp32": int((out["fp32"] == o.label).sum())} for o in present},
        # over the organs the model learned (Dice >= 0.5 against the truth): an unlearned organ is near-ties
        "min_dice": min((dice_bf16[o.label] for o in present if dice_truth[o.label] >= 0.5), default=float("nan")),
        "voxels_equal": float((out["bf16"] == out["fp32"]).mean()),
        "train_s": trained_s,
        "torch_threads": torch.get_num_threads(),
    }


def compare(rows: list[dict], root: Path) -> None:
    """Speed-ups and RAM against stock, and voxel agreement with stock --disable_tta and ours fp32, into rows."""
    by = {r["key"]: r for r in rows}
    for r in rows:
        for ref, column in (("stock", "speedup"), ("stock_notta", "speedup_notta")):
            if ref in by:
                r[column] = by[ref]["wall_s"] / r["wall_s"]
        if "stock" in by:
            r["ram_ratio"] = r["peak_rss_gb"] / by["stock"]["peak_rss_gb"]
    for ref_key, column in (("stock_notta", "equal_to_stock_notta"), ("ours", "equal_to_ours")):
        if ref_key in by:
            ref = read_labels(root / f"out_{ref_key}" / "case.nii.gz")
            for r in rows:
                f = root / f"out_{r['key']}" / "case.nii.gz"
                if r["key"] != ref_key and f.is_file():
                    r[column] = float((read_labels(f) == ref).mean())


def print_accuracy(accuracy: dict, iterations: int) -> None:
    print(f"\nAccuracy guard: a small U-Net trained on phantoms ({iterations} iterations, "
          f"{accuracy['train_s']:.0f} s), an unseen phantom 64 x 224 x 224 at 1.25 x 0.7 x 0.7 mm, "
          f"--precision bf16 against --precision fp32 (voxels equal: {accuracy['voxels_equal']:.6f}):")
    organ_rows = [{"organ": k, **v} for k, v in accuracy["organs"].items()]
    print(table(organ_rows, [("organ", "organ"), ("dice_bf16_vs_fp32", "Dice bf16 vs fp32"),
                             ("voxels_fp32", "voxels (fp32)"), ("dice_fp32_vs_truth", "Dice fp32 vs truth")]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    add_case_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["stock", "stock_notta", "ours", "ours_bf16"],
                        choices=PREDICT_RUNS)
    parser.add_argument("--accuracy_iterations", type=int, default=600,
                        help="train a small model this long for the bf16-vs-fp32 accuracy guard (0: skip)")
    parser.add_argument("--no_breakdown", dest="breakdown", action="store_false",
                        help="skip the stage-by-stage RSS breakdown of ours")
    args = parser.parse_args(argv)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    case = half_width_case(args, "e2e", E2E_DATASET)
    grid = [int(g) for g in compute_new_shape(case.shape, case.spacing, case.plans_spacing)]
    print(f"(b) end to end: phantom {case.shape} (z, y, x) at {case.spacing} mm; plans spacing {case.plans_spacing} "
          f"(network grid {grid}), patch {case.patch}, half-width PlainConvUNet "
          f"{case.architecture['arch_kwargs']['features_per_stage']}, 1 fold, CPU", flush=True)
    load = os.getloadavg()[0]
    rows = []
    for key, label, command in predict_commands(args.runs, case.inputs, case.root, E2E_DATASET, "cpu"):
        row = run_profiled(label, command, case.env, case.root / f"log_{key}.txt")
        row.update(key=key, load_before=load)
        load = os.getloadavg()[0]
        rows.append(row)
    compare(rows, case.root)
    accuracy = None
    if args.accuracy_iterations > 0:
        accuracy = accuracy_guard(Path(args.workdir), args.accuracy_iterations, (64, 224, 224), (1.25, 0.7, 0.7))
        for r in rows:
            if r["key"] == "ours_bf16":
                r["dice_bf16_trained"] = accuracy["min_dice"]
    breakdown = memory_breakdown(case.model, case.root, "auto") if args.breakdown else None
    print(f"\n(b) end to end, image {case.shape} (z, y, x) at {case.spacing} mm, plans {case.plans_spacing}, network "
          f"grid {grid}. Machine: {machine()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("speedup", "x faster than stock"),
                       ("speedup_notta", "x faster than stock --disable_tta"),
                       ("peak_rss_gb", "peak RSS tree (GB)"), ("ram_ratio", "RAM / stock"),
                       ("peak_rss_largest_gb", "peak RSS largest process (GB)"),
                       ("n_processes_max", "processes"),
                       ("cpu_util_pct", "CPU util. (% of all cores)"), ("cpu_time_s", "CPU time (s)"),
                       ("equal_to_stock_notta", "voxels equal to stock --disable_tta"),
                       ("equal_to_ours", "voxels equal to ours, defaults (fp32; random weights)"),
                       ("dice_bf16_trained", "min Dice bf16 vs fp32, organs a trained model learned"),
                       ("load_before", "load avg. before")]))
    if accuracy is not None:
        print_accuracy(accuracy, args.accuracy_iterations)
    if breakdown is not None:
        print_breakdown(breakdown)
    (case.root / "results.json").write_text(json.dumps({"rows": rows, "accuracy": accuracy, "breakdown": breakdown},
                                                       indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
