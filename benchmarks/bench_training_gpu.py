"""Training speed of our three trainers against stock ``nnUNetTrainer``, on the same plans, N iterations each.

    python benchmarks/bench_training_gpu.py [--device cuda] [--iterations 50] [--override KEY=VALUE ...]
                                            [--output result.json] [--work DIR]

The FLARE22 recipe as it is (patch 40 x 224 x 192, batch 4 = 1 labeled + 3 pseudo-labeled, mixed precision, the
half-width U-Net), planned by ``nsn plan`` on phantom CTs; a second phantom dataset preprocessed with the same
plans stands in for ``nsn pseudolabel``'s output. ``--override network.patch_size=[24,64,64]`` (dotted recipe
keys, JSON values, as ``recipe_ablation.py``) plans a smaller network for a CPU. Each trainer runs in a process
of its own (clean peak memory; one failing does not stop the others), driven as ``nnUNetv2_train`` drives it
(constructed, ``on_train_start``: network, loss, its own data loaders and augmentation workers), then
``--warmup`` untimed and ``--iterations`` timed ``train_step``s on batches from its training loader, without
epochs, validation or checkpoints: whole runs would not fit a short GPU lease. The fine-tune starts from the
student's weights (saved by the student's run). ``torch.compile`` is off (``nnUNet_compile=0``, ``--compile``
turns it on): compiling takes a minute per trainer.

Per trainer: iterations per second (waiting for the loader included, and the steps alone), seconds per
iteration waiting for data and in the step, peak GPU memory (``torch.cuda.max_memory_allocated`` and, through
NVML, the whole device's peak while it ran), the losses, and for the student the labeled:pseudo-labeled count of
every batch (``batch['sources']``, which the mixed loader sets for each sample). ``--output`` writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _common import machine, table

HERE = Path(__file__).resolve().parent
LABELED_ID, PSEUDO_ID = 988, 989
LABELED_NAME, PSEUDO_NAME = f"Dataset{LABELED_ID:03d}_BenchTrain", f"Dataset{PSEUDO_ID:03d}_BenchTrainPseudo"
PLANS = "nnUNetLowFootprintPlans"
CONFIGURATION = "3d_fullres"
#: in the order they run: stock first (what the others are compared with), the fine-tune after the student
TRAINERS = {
    "stock": "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer",
    "student": "noisy_student_nnunet.trainers:NoisyStudentTrainer",
    "finetune": "noisy_student_nnunet.trainers:NoisyStudentFinetuneTrainer",
    "teacher": "noisy_student_nnunet.trainers:NoisyStudentTeacherTrainer",
}
STUDENT_CHECKPOINT = "student_checkpoint.pth"
#: phantom geometry: FLARE-like CTs at about the plans' spacing (GPU), or the tests' small cases (--small)
PHANTOMS = {"full": {"inplane_voxels": (224, 256), "inplane_spacing": (1.5, 1.7), "slices": (48, 64),
                     "slice_spacing": (2.5, 3.0)},
            "small": {"inplane_voxels": (64, 80), "slices": (24, 40), "slice_spacing": (2.0, 3.0)}}


def environment(work: Path, device: str, da_workers: int | None, compile_network: bool) -> dict[str, str]:
    """This process's environment with nnU-Net's folders under ``work`` and the benchmark's settings."""
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="1" if compile_network else "0")
    for key in ("NSN_RECIPE", "NSN_PSEUDO_DATASET", "NSN_FINETUNE_FROM"):
        env.pop(key, None)
    if da_workers is not None:
        env["nnUNet_n_proc_DA"] = str(da_workers)
    elif device == "cpu":
        env["nnUNet_n_proc_DA"] = "0"  # augmentation in the training process: workers would fight it for cores
    return env


def prepare(work: Path, recipe: dict, cases: int, size: str, processes: int) -> dict:
    """Phantoms, ``nsn plan`` with ``recipe`` and the pseudo-labeled stand-in preprocessed with the same plans, in
    ``work`` (kept: a rerun with the same recipe reuses them). Returns the timings."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.plans import plan_dataset
    from noisy_student_nnunet.plans_transfer import preprocess_with_plans

    times = {}
    raw = work / "raw"
    for var in ("raw", "preprocessed", "results"):
        (work / var).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for dataset_id, name, seed in ((LABELED_ID, LABELED_NAME, 0), (PSEUDO_ID, PSEUDO_NAME, 1)):
        if not (raw / name).is_dir():
            write_phantom_dataset(raw, dataset_id, name=name.split("_", 1)[1], num_labeled=cases, num_unlabeled=0,
                                  num_test=0, seed=seed, **PHANTOMS[size])
    times["phantoms_s"] = time.perf_counter() - start
    planned = work / "preprocessed" / LABELED_NAME / f"{PLANS}.json"
    recorded = work / "recipe_planned.json"
    if planned.is_file() and recorded.is_file() and json.loads(recorded.read_text()) == recipe:
        times["plan_s"] = times["pseudo_preprocess_s"] = 0.0
        return times
    start = time.perf_counter()
    plan_dataset(LABELED_ID, recipe, plans_name=PLANS, num_processes=processes)
    times["plan_s"] = time.perf_counter() - start
    start = time.perf_counter()
    preprocess_with_plans(LABELED_NAME, PSEUDO_ID, PLANS, num_processes=processes)
    times["pseudo_preprocess_s"] = time.perf_counter() - start
    recorded.write_text(json.dumps(recipe))
    return times


class NvmlPeak:
    """The whole device's used memory (NVML, MB), sampled every ``interval`` s in a thread: its peak and the
    value before the run. Nothing (None) where NVML cannot read a device."""

    def __init__(self, interval: float = 0.05):
        from noisy_student_nnunet.profiling import open_gpu_reader

        self.reader = open_gpu_reader()
        self.interval = interval
        self.baseline_mb = self.reader.device_used_mb() if self.reader else None
        self.peak_mb = self.baseline_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.reader else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.reader.device_used_mb())

    def __enter__(self) -> "NvmlPeak":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.reader.device_used_mb())
            self.reader.close()


def worker(name: str, work: Path, device_name: str, iterations: int, warmup: int) -> dict:
    """One trainer's run in this process; the result as a dict (printed as the last line by ``--worker``)."""
    import importlib

    import numpy as np
    import torch

    module, _, cls = TRAINERS[name].partition(":")
    trainer_class = getattr(importlib.import_module(module), cls)
    preprocessed = work / "preprocessed" / LABELED_NAME
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:  # as nnUNetv2_train sets them
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    with (NvmlPeak() if cuda else _nothing()) as nvml:
        start = time.perf_counter()
        trainer = trainer_class(plans, CONFIGURATION, 0, dataset_json, device)
        trainer.on_train_start()  # as nnUNetv2_train: initialize, loaders and their workers, debug.json
        setup_s = time.perf_counter() - start
        loader = trainer.dataloader_train
        trainer.network.train()
        losses, compositions = [], Counter()
        data_s = step_s = 0.0
        try:
            for i in range(warmup + iterations):
                if i == warmup:  # the timed part: cuDNN has chosen its kernels, the loader's queue has filled
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    data_s = step_s = 0.0
                    losses = []
                t0 = time.perf_counter()
                batch = next(loader)
                t1 = time.perf_counter()
                losses.append(float(trainer.train_step(batch)["loss"]))  # .cpu() of the loss: the step is done
                if cuda:
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                data_s += t1 - t0
                step_s += t2 - t1
                if i >= warmup and "sources" in batch:
                    counts = Counter(batch["sources"])
                    compositions[f"{counts.get('labeled', 0)}:{counts.get('pseudo', 0)}"] += 1
            if name == "student":  # what the fine-tune starts from
                trainer.save_checkpoint(str(work / STUDENT_CHECKPOINT))
        finally:
            for augmenter in (trainer.dataloader_train, trainer.dataloader_val):
                if hasattr(augmenter, "_finish"):
                    augmenter._finish()
    total = data_s + step_s
    result = {
        "trainer": name,
        "class": cls,
        "status": "ok",
        "device": str(device),
        "amp": trainer.grad_scaler is not None,
        "cpu_bf16": bool(getattr(trainer, "cpu_bf16", False)),
        "batch_size": int(trainer.batch_size),
        "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
        "features_per_stage": trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"],
        "da_workers": int(os.environ.get("nnUNet_n_proc_DA", -1)),
        "setup_s": setup_s,
        "warmup_iterations": warmup,
        "iterations": iterations,
        "seconds": total,
        "it_per_s": iterations / total if total else None,
        "step_only_it_per_s": iterations / step_s if step_s else None,
        "data_wait_s_per_it": data_s / iterations if iterations else None,
        "step_s_per_it": step_s / iterations if iterations else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses_finite": bool(np.isfinite(losses).all()) if losses else None,
        "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
        "nvml_device_peak_mb": nvml.peak_mb if cuda else None,
        "nvml_device_before_mb": nvml.baseline_mb if cuda else None,
        "batch_compositions": dict(compositions) if compositions else None,
    }
    if name == "student":
        labeled, pseudo = trainer.labeled_per_batch, trainer.pseudo_per_batch
        groups = trainer.batch_size // (labeled + pseudo)
        expected = f"{labeled * groups}:{pseudo * groups}"
        result["expected_composition"] = expected
        result["every_batch_as_expected"] = set(compositions) == {expected}
    return result


class _nothing:
    """A context with no figures (NVML on a CPU run)."""

    def __enter__(self):
        return None

    def __exit__(self, *_exc) -> None:
        return None


def run_trainer(name: str, args: argparse.Namespace, env: dict[str, str], log: Path) -> dict:
    """``--worker NAME`` in a fresh process (its output in ``log``); a failure is a result with its reason."""
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(args.work),
               "--device", args.device, "--iterations", str(args.iterations), "--warmup", str(args.warmup),
               "--output", str(result_file)]
    extra = {}
    if name == "student":
        extra["NSN_PSEUDO_DATASET"] = PSEUDO_NAME
    if name == "finetune":
        extra["NSN_FINETUNE_FROM"] = str(args.work / STUDENT_CHECKPOINT)
    start = time.perf_counter()
    print(f"  {name}: {' '.join(command)}", flush=True)
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, env={**env, **extra}, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {args.timeout:.0f} s"
    if code != 0 or not result_file.is_file():
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        error = errors[-1] if errors else (lines[-1] if lines else "")
        return {"trainer": name, "status": f"failed ({code if isinstance(code, str) else f'exit {code}'})",
                "wall_s": time.perf_counter() - start, "log": str(log), "error": error.strip()}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["log"] = str(log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--iterations", type=int, default=50, help="timed train_steps per trainer (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed train_steps first (default 3)")
    parser.add_argument("--recipe", default="flare22", help="bundled recipe name or JSON path (default flare22)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe key laid over --recipe before planning (repeatable)")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--cases", type=int, default=6,
                        help="phantoms per dataset, labeled and pseudo (default 6; nnU-Net's 5 folds need 5)")
    parser.add_argument("--small", action="store_true", help="the tests' small phantoms (for a small patch)")
    parser.add_argument("--da_workers", type=int, default=None,
                        help="nnUNet_n_proc_DA (default: nnU-Net's own on CUDA, 0 on the CPU)")
    parser.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                        help="processes for planning and preprocessing")
    parser.add_argument("--compile", action="store_true", help="let nnU-Net torch.compile the network")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per trainer before it is stopped")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nsn_bench_training_gpu")
    parser.add_argument("--output", type=Path, default=None, help="the JSON record")
    parser.add_argument("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    if args.worker:  # the result to --output, the trainer's own output to stdout (the log)
        args.output.write_text(json.dumps(worker(args.worker, args.work, args.device, args.iterations, args.warmup)))
        return 0
    if args.cases < 5:
        parser.error("--cases must be at least 5: nnU-Net splits the labeled cases into 5 folds")

    import torch

    from recipe_ablation import apply_overrides
    from noisy_student_nnunet.recipe import load_recipe

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_training_gpu: no CUDA device on this machine (use --device cpu with a small --override patch)",
              file=sys.stderr)
        return 2
    recipe = apply_overrides(load_recipe(args.recipe), args.override)
    env = environment(args.work, args.device, args.da_workers, args.compile)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"bench_training_gpu: recipe {recipe['name']}, device {args.device}, work {args.work}", flush=True)
    start = time.perf_counter()
    prepared = prepare(args.work, recipe, args.cases, "small" if args.small else "full", args.processes)
    print(f"  prepared in {time.perf_counter() - start:.0f} s: {prepared}", flush=True)
    (args.work / "logs").mkdir(exist_ok=True)
    if "finetune" in args.trainers and "student" not in args.trainers and \
            not (args.work / STUDENT_CHECKPOINT).is_file():
        sys.exit("bench_training_gpu: the fine-tune needs the student's checkpoint: run the student too")
    runs: list[dict] = []
    record = {
        "benchmark": "bench_training_gpu",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "device": args.device,
        "recipe": recipe["name"],
        "network": recipe["network"],
        "student_ratio": f"{recipe['student']['labeled_per_batch']}:{recipe['student']['pseudo_per_batch']}",
        "compile": args.compile,
        "prepare": prepared,
        "runs": runs,
        "ok": False,
    }
    for name in sorted(args.trainers, key=list(TRAINERS).index):
        student = next((r for r in runs if r["trainer"] == "student"), None)
        if name == "finetune" and student is not None and student["status"] != "ok":
            runs.append({"trainer": name, "status": "skipped (the student failed: no weights to start from)"})
        else:
            runs.append(run_trainer(name, args, env, args.work / "logs" / f"{name}.log"))
        print(f"    {json.dumps({k: v for k, v in runs[-1].items() if k != 'features_per_stage'})}", flush=True)
        by = {r["trainer"]: r for r in runs if r.get("status") == "ok"}
        if "stock" in by and by["stock"]["it_per_s"]:
            for r in by.values():
                r["it_per_s_vs_stock"] = r["it_per_s"] / by["stock"]["it_per_s"]
        record["ok"] = len(runs) == len(args.trainers) and all(r.get("status") == "ok" for r in runs)
        if args.output:  # after every trainer: a run stopped from outside keeps what it measured
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(record, indent=1) + "\n")
    print("\n" + table(runs, [("trainer", "trainer"), ("status", "status"), ("it_per_s", "it/s"),
                              ("step_only_it_per_s", "it/s (steps alone)"),
                              ("data_wait_s_per_it", "data wait (s/it)"),
                              ("peak_gpu_allocated_mb", "peak allocated (MB)"),
                              ("nvml_device_peak_mb", "device peak, NVML (MB)"),
                              ("batch_compositions", "labeled:pseudo per batch"), ("it_per_s_vs_stock", "vs stock")]))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
