"""(a) Export only: stock ``export_prediction_from_logits`` against ours (nearest, linear) on the same logits.

    python benchmarks/bench_export.py [--shape Z Y X] [--spacing Z Y X] [--plans_spacing Z Y X] [--impls ...]

The case: a phantom CT of clinical size (default 523 x 433 x 269 voxels at 0.7 x 0.7 x 1.25 mm), its label map
resized to the plans' grid (default 2.5 x 0.8 x 0.8 mm) and turned into network-like logits (14 classes), so
the labels compared are meaningful although no network runs. Each export runs in a fresh process; "added peak"
is its peak RSS (VmHWM, reset after the logits are loaded) minus its RSS before the export. Also run as
``python benchmarks/bench_inference.py export``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import GB, dice_per_class, machine, peak_rss_bytes, read_labels, reset_peak_rss, run_worker, table

import model_folders as mf  # noqa: E402  (on sys.path through _common)

NUM_CLASSES = 14


def prepare_export_case(work: Path, shape_zyx, spacing_zyx, plans_spacing) -> Path:
    """Phantom label map at the image size -> network grid -> network-like logits; saved with properties."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    import torch

    from noisy_student_nnunet.inference.resize import resize_labels_nearest
    from noisy_student_nnunet.phantoms import make_phantom

    case = work / f"export_{'x'.join(map(str, shape_zyx))}"
    if (case / "logits.npy").is_file():
        return case
    case.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(0, shape_zyx, spacing_zyx)
    net = [int(s) for s in compute_new_shape(shape_zyx, spacing_zyx, plans_spacing)]
    labels_net = resize_labels_nearest(torch.from_numpy(phantom.label), net).numpy()
    np.save(case / "logits.npy", mf.logits_from_labels(labels_net, NUM_CLASSES, seed=0))
    np.save(case / "phantom_label.npy", phantom.label)
    props = {
        "spacing": list(spacing_zyx),
        "shape_before_cropping": tuple(shape_zyx),
        "bbox_used_for_cropping": [[0, s] for s in shape_zyx],
        "shape_after_cropping_and_before_resampling": tuple(shape_zyx),
        "sitk_stuff": {"spacing": tuple(float(s) for s in spacing_zyx[::-1]), "origin": phantom.origin,
                       "direction": phantom.direction},
    }
    (case / "plans.json").write_text(json.dumps(mf.make_plans(plans_spacing, [40, 224, 192])))
    (case / "dataset.json").write_text(json.dumps(mf.make_dataset_json(NUM_CLASSES)))
    with open(case / "properties.pkl", "wb") as f:
        pickle.dump(props, f)
    return case


def export_worker(case: Path, impl: str, out: Path) -> dict:
    """One export in this (fresh) process: wall time and the peak RSS it added."""
    import psutil
    import torch

    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from noisy_student_nnunet.inference.export import export_labels_from_logits

    plans = json.loads((case / "plans.json").read_text())
    dataset_json = json.loads((case / "dataset.json").read_text())
    with open(case / "properties.pkl", "rb") as f:
        props = pickle.load(f)
    pm = PlansManager(plans)
    cm = pm.get_configuration(mf.CONFIGURATION)
    logits = np.load(case / "logits.npy")
    rss_before = psutil.Process().memory_info().rss
    peak_before = peak_rss_bytes()
    reset_peak_rss()  # so loading the logits does not hide the export's own peak
    t0 = time.perf_counter()
    if impl == "stock":
        export_prediction_from_logits(logits, props, cm, pm, dataset_json, str(out), save_probabilities=False)
    else:
        export_labels_from_logits(torch.from_numpy(logits), props, cm, pm, dataset_json, str(out), mode=impl)
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"impl": impl, "wall_s": wall, "rss_before_gb": rss_before / GB, "peak_gb": peak / GB,
            "added_peak_gb": max(0, peak - rss_before) / GB, "peak_before_gb": peak_before / GB}


def compare_with_stock(case: Path, rows: list[dict]) -> None:
    """Speed-up, memory ratio and Dice against stock's labels, into each row."""
    by = {r["impl"]: r for r in rows}
    if "stock" not in by:
        return
    ref = read_labels(case / "out_stock.nii.gz")
    for r in rows:
        r["speedup"] = by["stock"]["wall_s"] / r["wall_s"]
        r["mem_ratio"] = r["added_peak_gb"] / by["stock"]["added_peak_gb"]
        if r["impl"] != "stock":
            ours = read_labels(case / f"out_{r['impl']}.nii.gz")
            d = dice_per_class(ours, ref, range(1, NUM_CLASSES))
            r.update(dice_min=min(d.values()), dice_mean=float(np.mean(list(d.values()))),
                     voxels_equal=float((ours == ref).mean()), dice=d)


def print_results(rows: list[dict]) -> None:
    from noisy_student_nnunet.flare import FLARE22_ORGANS

    print(f"\n(a) export only, same logits. Machine: {machine()}")
    print(table(rows, [("impl", "export"), ("wall_s", "wall time (s)"), ("speedup", "x faster"),
                       ("added_peak_gb", "added peak RSS (GB)"), ("mem_ratio", "peak / stock peak"),
                       ("dice_min", "min Dice vs stock"), ("dice_mean", "mean Dice vs stock"),
                       ("voxels_equal", "voxels equal to stock")]))
    compared = [r for r in rows if "dice" in r]
    if compared:
        print("\nDice per organ against stock's labels:")
        organ_rows = [{"organ": o.name, **{r["impl"]: r["dice"][o.label] for r in compared}} for o in FLARE22_ORGANS]
        print(table(organ_rows, [("organ", "organ")] + [(r["impl"], r["impl"]) for r in compared]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(export_worker(Path(argv[1]), argv[2], Path(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    parser.add_argument("--shape", type=int, nargs=3, default=(269, 433, 523), help="image shape z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="image spacing z y x (mm)")
    parser.add_argument("--plans_spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8))
    parser.add_argument("--impls", nargs="+", default=["stock", "nearest", "linear"])
    args = parser.parse_args(argv)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    shape, spacing, plans_spacing = tuple(args.shape), tuple(args.spacing), tuple(args.plans_spacing)
    t0 = time.perf_counter()
    case = prepare_export_case(Path(args.workdir), shape, spacing, plans_spacing)
    net = [int(s) for s in compute_new_shape(shape, spacing, plans_spacing)]
    print(f"case: image {shape} (z, y, x) at {spacing} mm, plans spacing {plans_spacing} -> network grid {net}, "
          f"{NUM_CLASSES} classes, fp16 logits {np.prod(net) * NUM_CLASSES * 2 / GB:.2f} GB "
          f"(prepared in {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for impl in args.impls:
        try:
            rows.append(run_worker(__file__, ["_worker", case, impl, case / f"out_{impl}"]))
        except RuntimeError as error:
            print(f"{impl}: failed: {error}")
            continue
        print(f"  {impl}: {rows[-1]['wall_s']:.1f} s, +{rows[-1]['added_peak_gb']:.2f} GB", flush=True)
    compare_with_stock(case, rows)
    print_results(rows)
    (case / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
