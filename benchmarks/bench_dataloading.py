"""Data loading of NoisyStudentTrainer against stock nnUNetTrainer: batches per second on the same plans (CPU).

    python benchmarks/bench_dataloading.py [--recipe tiny] [--batches 10] [--rounds 30] [--workers 0]

On phantoms (a labeled dataset and, standing in for the pseudo-labeled one, a second dataset of the same
phantoms preprocessed with the first one's low-footprint plans, so both sources cost the same; fold
"all", so the labeled training set is the same 8 cases), each trainer builds its training loader with its
own ``get_dataloaders`` (``nnUNet_n_proc_DA=--workers``; 0 = nnU-Net's single-threaded augmenter, i.e. the
CPU cost of one batch) and the loaders take turns drawing ``--batches`` batches per round, with the same
random seeds per round, so slow phases of a shared machine hit all of them alike. Single-threaded the
clock is this process's CPU time (the loading work itself); with workers, wall time. Reported: all batches
over all rounds, and the quartiles of the per-round rates.

Rows:
* ``nnUNetTrainer``: stock loader, stock augmentation.
* ``NoisyStudentFinetuneTrainer``: stock loader (labeled only) with Table 5 augmentation.
* ``NoisyStudentTrainer``: the mixed 1 labeled + 3 pseudo-labeled loader with Table 5 augmentation.

The cost of mixing is NoisyStudentTrainer against NoisyStudentFinetuneTrainer (same augmentation, same
plans; only the loader differs). Against stock the augmentation also differs (Table 5 has one gamma
transform, stock two). Work files go to ``--workdir`` (default benchmarks/out/dataloading); reruns reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import machine

HERE = Path(__file__).resolve().parent
LABELED_ID, PSEUDO_ID = 931, 932
PLANS = "nnUNetLowFootprintPlans"
CONFIGURATION = "3d_fullres"
TRAINERS = ("nnUNetTrainer", "NoisyStudentFinetuneTrainer", "NoisyStudentTrainer")


def prepare(workdir: Path, recipe_name: str, num_processes: int) -> tuple[str, str]:
    """Phantoms, low-footprint plans and the pseudo-labeled stand-in, made once under ``workdir``."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.plans import plan_dataset
    from noisy_student_nnunet.plans_transfer import preprocess_with_plans
    from noisy_student_nnunet.recipe import load_recipe

    raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    labeled, pseudo = f"Dataset{LABELED_ID}_Phantoms", f"Dataset{PSEUDO_ID}_Phantoms"
    sizes = dict(inplane_voxels=(64, 80), slices=(24, 40), slice_spacing=(2.0, 3.0))
    if not (raw / labeled).is_dir():
        write_phantom_dataset(raw, LABELED_ID, name="Phantoms", num_labeled=8, num_unlabeled=0, seed=0, **sizes)
    if not (raw / pseudo).is_dir():
        # the same seed: the same 8 cases, so both sources cost the same to load and augment and the
        # comparison measures the mixing, not two case distributions
        write_phantom_dataset(raw, PSEUDO_ID, name="Phantoms", num_labeled=8, num_unlabeled=0, seed=0, **sizes)
    if not (pre / labeled / f"{PLANS}.json").is_file():
        plan_dataset(LABELED_ID, load_recipe(recipe_name), num_processes=num_processes)
    if not (pre / pseudo / f"{PLANS}.json").is_file():
        preprocess_with_plans(LABELED_ID, PSEUDO_ID, PLANS, num_processes=num_processes)
    return labeled, pseudo


def build_loader(trainer_name: str, labeled: str):
    """The trainer's own training loader (what ``run_training`` iterates), built on CPU."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from noisy_student_nnunet.trainers import NoisyStudentFinetuneTrainer, NoisyStudentTrainer

    classes = {"nnUNetTrainer": nnUNetTrainer, "NoisyStudentTrainer": NoisyStudentTrainer,
               "NoisyStudentFinetuneTrainer": NoisyStudentFinetuneTrainer}
    base = Path(os.environ["nnUNet_preprocessed"]) / labeled
    plans = json.loads((base / f"{PLANS}.json").read_text())
    plans["continue_training"] = False
    # fold "all": the labeled training cases are all 8 phantoms, the same 8 as the pseudo-labeled stand-in
    trainer = classes[trainer_name](plans, CONFIGURATION, "all", json.loads((base / "dataset.json").read_text()),
                                    torch.device("cpu"))
    trainer.initialize()
    train_loader, val_loader = trainer.get_dataloaders()
    return trainer, train_loader, val_loader


def shutdown(loader) -> None:
    if hasattr(loader, "_finish"):
        loader._finish()


def time_batches(loader, batches: int, seed: int, clock) -> float:
    """Seconds (of ``clock``) for ``batches`` batches after seeding numpy and torch."""
    import numpy as np
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    start = clock()
    for _ in range(batches):
        next(loader)
    return clock() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "dataloading")
    parser.add_argument("--recipe", default="tiny", help="recipe for the low-footprint plans (default: tiny)")
    parser.add_argument("--batches", type=int, default=10, help="batches per trainer per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=0,
                        help="nnUNet_n_proc_DA (0: single-threaded; else use more --batches, e.g. 40)")
    parser.add_argument("-np", type=int, default=2, help="processes for preprocessing")
    args = parser.parse_args(argv)

    workdir = args.workdir.absolute()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(workdir / var)
    os.environ["nnUNet_n_proc_DA"] = str(args.workers)
    os.environ["nnUNet_compile"] = "0"
    os.environ["NSN_PSEUDO_DATASET"] = str(PSEUDO_ID)
    os.environ.pop("NSN_RECIPE", None)
    labeled, _ = prepare(workdir, args.recipe, args.np)

    import torch

    if args.workers == 0:
        torch.set_num_threads(1)  # as in nnU-Net's background workers
    # single-threaded, the CPU time of this process is the loading work itself, little disturbed by other
    # processes on a shared machine; with background workers only wall time means anything
    clock, clock_name = (time.process_time, "CPU time") if args.workers == 0 else (time.perf_counter, "wall time")
    times: dict[str, list[float]] = {name: [] for name in TRAINERS}
    composition = ""
    if args.workers == 0:
        loaders = {}
        try:
            for name in TRAINERS:
                trainer, train_loader, val_loader = build_loader(name, labeled)
                loaders[name] = train_loader
                next(train_loader)  # warm-up (GaussianBlur's benchmark, file caches)
                composition = str(getattr(trainer, "batch_composition", None) or composition)
            for round_index in range(args.rounds):
                order = TRAINERS if round_index % 2 == 0 else tuple(reversed(TRAINERS))
                for name in order:
                    times[name].append(time_batches(loaders[name], args.batches, round_index, clock))
        finally:
            for loader in loaders.values():
                shutdown(loader)
    else:
        # background workers never stop producing: only one trainer's loader may exist at a time, and its
        # queue of cached batches must be full before the clock starts
        for round_index in range(args.rounds):
            order = TRAINERS if round_index % 2 == 0 else tuple(reversed(TRAINERS))
            for name in order:
                trainer, train_loader, val_loader = build_loader(name, labeled)
                shutdown(val_loader)
                composition = str(getattr(trainer, "batch_composition", None) or composition)
                try:
                    for _ in range(train_loader.num_cached + 2):
                        next(train_loader)
                    times[name].append(time_batches(train_loader, args.batches, round_index, clock))
                finally:
                    shutdown(train_loader)

    total = {name: sum(t) for name, t in times.items()}
    rate = {name: args.batches * args.rounds / total[name] for name in TRAINERS}
    per_round = {name: sorted(args.batches / x for x in t) for name, t in times.items()}
    quartiles = {name: (r[len(r) // 4], r[(3 * len(r)) // 4]) for name, r in per_round.items()}
    patch = json.loads((Path(os.environ["nnUNet_preprocessed"]) / labeled / f"{PLANS}.json").read_text())[
        "configurations"][CONFIGURATION]["patch_size"]
    print(f"# data loading, recipe '{args.recipe}', patch {patch}, batch 4, nnUNet_n_proc_DA={args.workers}, "
          f"{args.rounds} rounds x {args.batches} batches per trainer, {clock_name}")
    print(f"# {machine()}")
    print(f"# student minibatch: {composition}")
    print()
    print("| trainer | batches/s | rounds' quartiles | ms/batch | vs NoisyStudentFinetuneTrainer | vs nnUNetTrainer |")
    print("|---|---|---|---|---|---|")
    for name in TRAINERS:
        low, high = quartiles[name]
        print(f"| {name} | {rate[name]:.2f} | {low:.2f}-{high:.2f} | {1000 / rate[name]:.1f} | "
              f"{rate[name] / rate['NoisyStudentFinetuneTrainer'] - 1:+.1%} | "
              f"{rate[name] / rate['nnUNetTrainer'] - 1:+.1%} |")
    cost = 1 - rate["NoisyStudentTrainer"] / rate["NoisyStudentFinetuneTrainer"]
    print()
    print(f"cost of mixing (NoisyStudentTrainer vs NoisyStudentFinetuneTrainer, same augmentation): {cost:+.1%} "
          f"(target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
