"""Seconds per case for ``nsn pseudolabel`` on CPU, with and without the direct preprocessed-grid path.

    python benchmarks/bench_pseudolabel.py [--cases 6] [--folds 2] [--threads 2] [--workdir DIR]

Setup (once, in --workdir): a phantom dataset (4 labeled, N unlabeled, nsn phantoms' default small sizes:
96-128 in-plane voxels, 24-64 slices, spacings drawn per case, so every case is resampled), planned with
``nsn plan --recipe tiny`` (stock fingerprint, planning and preprocessing first), and a teacher model folder with
random-weight folds of the real teacher network (time does not depend on the weights).

Each mode runs in its own process (same model load, same cold start):
- ``direct``: per case, the student's preprocessed data is written from the teacher's grid; the final step
  only hard-links the kept cases into place.
- ``stock``: per case only the label file is written; the final step preprocesses the raw pseudo-labeled dataset
  with the labeled dataset's plans (``preprocess_with_plans``: nnU-Net's preprocessor reads image and label
  again, crops, normalises, resamples both).
Reported: pseudo-labeling time per case (the parts' work), the final step's time, and their sum per case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, run_worker  # also puts tests/ (model_folders) on sys.path

LABELED_ID = 811
PLANS = "nnUNetLowFootprintPlans"
TRAINER = "NoisyStudentTeacherTrainer"


def _env(workdir: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(workdir / name)
    os.environ.setdefault("nnUNet_compile", "0")
    os.environ.pop("NSN_RECIPE", None)


def setup(workdir: Path, cases: int, folds: int, threads: int) -> dict:
    """Phantoms + ``nsn plan --recipe tiny`` + a random-weight teacher folder; reused if already there."""
    marker = workdir / "setup.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info["cases"] == cases and info["folds"] == folds:
            return info
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _env(workdir)
    from model_folders import results_model_folder

    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.plans import plan_dataset
    from noisy_student_nnunet.recipe import load_recipe

    raw = write_phantom_dataset(workdir / "nnUNet_raw", LABELED_ID, name="BenchPL", num_labeled=4,
                                num_unlabeled=cases, seed=1)
    plans_file = plan_dataset(LABELED_ID, load_recipe("tiny"), num_processes=threads)
    plans = json.loads(plans_file.read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    results_model_folder(workdir / "nnUNet_results", plans, dataset_json=dataset_json, folds=tuple(range(folds)),
                         trainer_name=TRAINER, seed=0, head_bias_std=1.0)
    info = {"cases": cases, "folds": folds, "labeled": raw.name, "images": str(raw / "imagesUnlabeled"),
            "plans": plans["configurations"]["3d_fullres"]["spacing"],
            "patch": plans["configurations"]["3d_fullres"]["patch_size"]}
    marker.write_text(json.dumps(info))
    return info


def measure(workdir: Path, mode: str, threads: int) -> dict:
    """One mode, in this process: pseudo-label every case (no auto-finalize), then the final step."""
    _env(workdir)
    import torch

    torch.set_num_threads(threads)
    from noisy_student_nnunet.pseudolabel.run import PseudolabelSettings, finalize, run_part

    info = json.loads((workdir / "setup.json").read_text())
    output = {"direct": "Dataset901_BenchDirect", "stock": "Dataset902_BenchStock"}[mode]
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.rmtree(workdir / root / output, ignore_errors=True)
    settings = PseudolabelSettings(labeled_dataset=info["labeled"], images_dir=Path(info["images"]),
                                   folds=tuple(range(info["folds"])), direct_preprocessed=mode == "direct")
    start = time.perf_counter()
    part = run_part(settings, output=output, device="cpu", progress=False, auto_finalize=False)
    parts_s = time.perf_counter() - start
    assert not part.failed, part.failed
    start = time.perf_counter()
    finalize(settings, output=output, num_processes=threads)
    final_s = time.perf_counter() - start
    return {"mode": mode, "cases": len(part.done), "parts_s": parts_s, "finalize_s": final_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="unlabeled phantoms (default 6)")
    parser.add_argument("--folds", type=int, default=2, help="teacher folds (default 2; the paper uses 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and preprocessing processes")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsn_bench_pseudolabel")
    parser.add_argument("--measure", choices=["direct", "stock"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.measure, args.threads)))
        return

    info = setup(args.workdir, args.cases, args.folds, args.threads)
    results = []
    for mode in ("stock", "direct"):
        try:
            results.append(run_worker(__file__, ["--measure", mode, "--workdir", args.workdir,
                                                 "--threads", args.threads]))
        except RuntimeError as error:
            sys.exit(f"{mode} run failed: {error}")

    print(f"nsn pseudolabel on CPU ({machine()}; {args.threads} threads): {info['cases']} phantoms, "
          f"{info['folds']} random-weight teacher folds, "
          f"tiny recipe (patch {info['patch']}, spacing {info['plans']})")
    print(f"{'path':8s} {'cases':>5s} {'pseudo-label s/case':>20s} {'final step s':>13s} {'total s/case':>13s}")
    for r in results:
        total = (r["parts_s"] + r["finalize_s"]) / r["cases"]
        r["total_per_case"] = total
        print(f"{r['mode']:8s} {r['cases']:5d} {r['parts_s'] / r['cases']:20.2f} {r['finalize_s']:13.2f} "
              f"{total:13.2f}")
    stock, direct = results
    saved = stock["total_per_case"] - direct["total_per_case"]
    print(f"direct path saves {saved:.2f} s per case ({100 * saved / stock['total_per_case']:.0f}% of the stock path)")


if __name__ == "__main__":
    main()
