"""Benchmarks of the low-footprint predictor against stock nnU-Net 2.8.1 (CPU; GPU part where CUDA exists).

    python benchmarks/bench_inference.py export   # (a) export only, same logits, 14 classes, clinical size
    python benchmarks/bench_inference.py e2e      # (b) end to end, half-width model, stock vs ours (fp32, auto),
                                                  #     bf16-vs-fp32 accuracy on a trained model, RSS breakdown
    python benchmarks/bench_inference.py gpu      # (c) peak GPU memory and time per case (needs CUDA)
    python benchmarks/bench_inference.py huge     # (d) 512x512x1000 input, tiny network, our peak RSS
    python benchmarks/bench_inference.py memory   # (e) ours' peak RSS stage by stage on the e2e case
    python benchmarks/bench_inference.py patch    # (f) one network patch: fp32/bf16, channels-last, threads

(b)'s default case is the issue's: a phantom CT of 523 x 433 x 269 voxels (x, y, z) at 0.7 x 0.7 x 1.25 mm, the
FLARE22 half-width 3d_fullres U-Net planned at 2.5 x 1.6 x 1.6 mm (network grid 134 x 189 x 229, patch
40 x 224 x 192: 12 patches at step 0.5).

Each measured run is a separate process: (a) reports wall time and the peak RSS it added on top of the
loaded logits (kernel high-water mark, ``ru_maxrss``); (b)-(d) run the console commands under
:func:`noisy_student_nnunet.profiling.profile_command` (summed RSS of the process tree sampled every 0.1 s,
CPU time of the tree). Work files go to ``--workdir`` (default: $TMPDIR/nsn_bench_inference). Model weights are
random: fine for time and memory, not for accuracy (the export benchmark's Dice uses logits built from a phantom
label map instead).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import model_folders as mf  # noqa: E402

BIN = Path(sys.executable).parent
NUM_CLASSES = 14
GB = 1024.0**3


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, " \
           f"{_total_ram_gb():.0f} GB RAM, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def _total_ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub-markdown table of ``rows`` with (key, header) ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.6f}" if 0.999 <= v < 1 else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def dice_per_class(a: np.ndarray, b: np.ndarray, labels) -> dict[int, float]:
    out = {}
    for c in labels:
        p, q = a == c, b == c
        s = int(p.sum()) + int(q.sum())
        out[int(c)] = float(2 * (p & q).sum() / s) if s else float("nan")
    return out


# ----------------------------------------------------------------------------- (a) export only
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
    logits = mf.logits_from_labels(labels_net, NUM_CLASSES, seed=0)
    np.save(case / "logits.npy", logits)
    np.save(case / "phantom_label.npy", phantom.label)
    plans = mf.make_plans(plans_spacing, [40, 224, 192])
    props = {
        "spacing": list(spacing_zyx),
        "shape_before_cropping": tuple(shape_zyx),
        "bbox_used_for_cropping": [[0, s] for s in shape_zyx],
        "shape_after_cropping_and_before_resampling": tuple(shape_zyx),
        "sitk_stuff": {"spacing": tuple(float(s) for s in spacing_zyx[::-1]), "origin": phantom.origin,
                       "direction": phantom.direction},
    }
    (case / "plans.json").write_text(json.dumps(plans))
    (case / "dataset.json").write_text(json.dumps(mf.make_dataset_json(NUM_CLASSES)))
    with open(case / "properties.pkl", "wb") as f:
        pickle.dump(props, f)
    return case


def _reset_peak_rss() -> None:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS (``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """VmHWM from /proc (resettable), else the kernel's ``ru_maxrss``."""
    try:
        return _rss_status()[1]
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_worker(case: Path, impl: str, out: Path) -> dict:
    """One export in this (fresh) process; prints a JSON line with time and peak memory."""
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
    peak_before = _peak_rss_bytes()
    _reset_peak_rss()  # so loading the logits does not hide the export's own peak
    t0 = time.perf_counter()
    if impl == "stock":
        export_prediction_from_logits(logits, props, cm, pm, dataset_json, str(out), save_probabilities=False)
    else:
        export_labels_from_logits(torch.from_numpy(logits), props, cm, pm, dataset_json, str(out), mode=impl)
    wall = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    return {"impl": impl, "wall_s": wall, "rss_before_gb": rss_before / GB, "peak_gb": peak / GB,
            "added_peak_gb": max(0, peak - rss_before) / GB, "peak_before_gb": peak_before / GB}


def bench_export(args) -> None:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    import SimpleITK as sitk

    work = Path(args.workdir)
    shape = tuple(args.shape)
    spacing = tuple(args.spacing)
    plans_spacing = tuple(args.plans_spacing)
    t0 = time.perf_counter()
    case = prepare_export_case(work, shape, spacing, plans_spacing)
    net = [int(s) for s in compute_new_shape(shape, spacing, plans_spacing)]
    print(f"case: image {shape} (z, y, x) at {spacing} mm, plans spacing {plans_spacing} -> network grid {net}, "
          f"{NUM_CLASSES} classes, fp16 logits {np.prod(net) * NUM_CLASSES * 2 / GB:.2f} GB "
          f"(prepared in {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for impl in args.impls:
        out = case / f"out_{impl}"
        done = subprocess.run([sys.executable, __file__, "_export_worker", str(case), impl, str(out)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{impl}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {impl}: {row['wall_s']:.1f} s, +{row['added_peak_gb']:.2f} GB", flush=True)
    by = {r["impl"]: r for r in rows}
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "out_stock.nii.gz"))) if "stock" in by else None
    for r in rows:
        if "stock" in by:
            r["speedup"] = by["stock"]["wall_s"] / r["wall_s"]
            r["mem_ratio"] = r["added_peak_gb"] / by["stock"]["added_peak_gb"]
        if ref is not None and r["impl"] != "stock":
            ours = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"out_{r['impl']}.nii.gz")))
            d = dice_per_class(ours, ref, range(1, NUM_CLASSES))
            r["dice_min"] = min(d.values())
            r["dice_mean"] = float(np.mean(list(d.values())))
            r["voxels_equal"] = float((ours == ref).mean())
            r["dice"] = d
    print()
    print(f"(a) export only, same logits. Machine: {machine()}")
    print(table(rows, [("impl", "export"), ("wall_s", "wall time (s)"), ("speedup", "x faster"),
                       ("added_peak_gb", "added peak RSS (GB)"), ("mem_ratio", "peak / stock peak"),
                       ("dice_min", "min Dice vs stock"), ("dice_mean", "mean Dice vs stock"),
                       ("voxels_equal", "voxels equal to stock")]))
    if ref is not None:
        from noisy_student_nnunet.flare import FLARE22_ORGANS

        print("\nDice per organ against stock's labels:")
        organ_rows = []
        for organ in FLARE22_ORGANS:
            row = {"organ": organ.name}
            for r in rows:
                if "dice" in r:
                    row[r["impl"]] = r["dice"][organ.label]
            organ_rows.append(row)
        print(table(organ_rows, [("organ", "organ")] + [(r["impl"], r["impl"]) for r in rows if "dice" in r]))
    (case / "results.json").write_text(json.dumps(rows, indent=1, default=str))


# ----------------------------------------------------------------------------- (b) (d) end to end
def prepare_e2e(work: Path, name: str, shape_zyx, spacing_zyx, plans_spacing, patch, architecture,
                dataset_name: str) -> tuple[Path, Path, dict]:
    """A results folder with one random-weight fold and an input folder with one phantom CT."""
    from noisy_student_nnunet.phantoms import make_phantom

    root = work / name
    results = root / "results"
    plans = mf.make_plans(plans_spacing, patch, architecture, dataset_name=dataset_name)
    model = results / dataset_name / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        mf.results_model_folder(results, plans)
    inputs = root / "in"
    image = inputs / "case_0000.nii.gz"
    if not image.is_file():
        inputs.mkdir(parents=True, exist_ok=True)
        make_phantom(1, shape_zyx, spacing_zyx).write(image)
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(root / "raw"),
               nnUNet_preprocessed=str(root / "preprocessed"), nnUNet_compile="0")
    return root, inputs, env


def run_profiled(label: str, command: list[str], env: dict, log: Path, timeout: float | None = None) -> dict:
    from noisy_student_nnunet.profiling import profile_command

    print(f"  running {label}: {' '.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        # the profiler runs the command in a child; we point its stdout/stderr to the log via a shell-free wrapper
        wrapper = [sys.executable, "-c",
                   "import subprocess, sys; sys.exit(subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'w'), "
                   "stderr=subprocess.STDOUT))", str(log), *command]
        result = profile_command(wrapper, interval=0.1, gpu=None, env=env)
    result.write_json(log.with_suffix(".profile.json"))
    s = result.summary()
    ncpu = os.cpu_count() or 1
    row = {
        "run": label,
        "exit": s["exit_code"],
        "wall_s": s["wall_time_s"],
        "peak_rss_gb": (s["peak_rss_tree_mb"] or 0) / 1024,
        "peak_rss_largest_gb": (s["peak_rss_largest_process_mb"] or 0) / 1024,
        "n_processes_max": max(result.samples["n_processes"], default=0),
        "cpu_time_s": s["tree_cpu_time_s"],
        "cpu_util_pct": 100.0 * (s["tree_cpu_time_s"] or 0) / max(1e-9, s["wall_time_s"]) / ncpu,
        "gpu_peak_gb": (s["gpu_memory_peak_mb"] / 1024) if s["gpu_memory_peak_mb"] is not None else None,
        "command": " ".join(command),
    }
    print(f"    {row['wall_s']:.0f} s, peak RSS {row['peak_rss_gb']:.2f} GB (largest process "
          f"{row['peak_rss_largest_gb']:.2f} GB), CPU {row['cpu_util_pct']:.0f} % "
          f"of {ncpu} cores, exit {row['exit']}", flush=True)
    return row


def e2e_runs(which: list[str], inputs: Path, root: Path, dataset_name: str, device: str) -> list[tuple]:
    common = ["-i", str(inputs), "-d", dataset_name, "-c", mf.CONFIGURATION, "-f", "0", "-device", device,
              "--disable_progress_bar"]
    catalogue = {
        "stock": ("stock nnUNetv2_predict (defaults, TTA)", [str(BIN / "nnUNetv2_predict"), *common]),
        "stock_notta": ("stock nnUNetv2_predict --disable_tta",
                        [str(BIN / "nnUNetv2_predict"), *common, "--disable_tta"]),
        "ours_fp32": ("ours nnUNetv2_predict_lowfootprint --precision fp32",
                      [str(BIN / "nnUNetv2_predict_lowfootprint"), *common, "--precision", "fp32"]),
        "ours": ("ours nnUNetv2_predict_lowfootprint (defaults: nearest, --precision auto)",
                 [str(BIN / "nnUNetv2_predict_lowfootprint"), *common]),
        "ours_linear": ("ours --export linear", [str(BIN / "nnUNetv2_predict_lowfootprint"), *common,
                                                  "--export", "linear"]),
    }
    out = []
    for key in which:
        label, command = catalogue[key]
        out.append((key, label, [*command, "-o", str(root / f"out_{key}")]))
    return out


E2E_DATASET = "Dataset980_BenchHalfWidth"
TRAINED_DATASET = "Dataset983_BenchTrained"


def e2e_geometry(args) -> tuple[tuple, tuple, tuple, tuple]:
    """(image shape z y x, spacing z y x, plans spacing, patch) from --shape/--spacing or the older options."""
    shape, spacing = list(args.shape), list(args.spacing)
    if args.slices is not None:
        shape[0] = args.slices
    if args.inplane is not None:
        shape[1:] = [args.inplane, args.inplane]
    if args.slice_spacing is not None:
        spacing[0] = args.slice_spacing
    if args.pixel_spacing is not None:
        spacing[1:] = [args.pixel_spacing, args.pixel_spacing]
    return tuple(shape), tuple(spacing), tuple(args.plans_spacing), tuple(args.patch)


@dataclass
class HalfWidthCase:
    """The FLARE22 half-width model with random weights and one phantom CT, as (b), (c) and (e) measure them."""

    root: Path
    inputs: Path
    env: dict
    shape: tuple
    spacing: tuple
    plans_spacing: tuple
    patch: list
    architecture: dict


def half_width_case(args, prefix: str, dataset_name: str) -> HalfWidthCase:
    """Build (or reuse, under ``--workdir``) the case that ``--shape``/``--spacing``/``--plans_spacing`` describe."""
    shape, spacing, plans_spacing, patch_request = e2e_geometry(args)
    architecture, patch = mf.half_width_architecture(plans_spacing, patch_request)
    name = f"{prefix}_{'x'.join(map(str, shape))}_{'x'.join(map(str, plans_spacing))}"
    root, inputs, env = prepare_e2e(Path(args.workdir), name, shape, spacing, plans_spacing, patch, architecture,
                                    dataset_name)
    return HalfWidthCase(root, inputs, env, shape, spacing, plans_spacing, patch, architecture)


def _labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def accuracy_guard(work: Path, iterations: int, shape_zyx, spacing_zyx) -> dict:
    """bf16 against fp32 labels of a model trained (briefly, here) on phantoms: Dice per organ present.

    A random-weight network gives near-ties almost everywhere, so its bf16/fp32 agreement says nothing; this one
    is trained on phantoms at the plans' spacing (``model_folders.train_phantom_model``) and predicts an unseen
    phantom through the console script with ``--precision fp32`` and ``--precision bf16``.
    """
    import torch

    from noisy_student_nnunet.flare import FLARE22_ORGANS
    from noisy_student_nnunet.phantoms import make_phantom

    root = work / f"accuracy_{iterations}"
    results = root / "results"
    plans = mf.make_plans([2.5, 1.6, 1.6], [32, 64, 64], mf.tiny_architecture((8, 16, 32, 64)),
                          dataset_name=TRAINED_DATASET)
    folder = results / TRAINED_DATASET / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
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
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(root / "raw"),
               nnUNet_preprocessed=str(root / "preprocessed"), nnUNet_compile="0")
    env.pop("NSN_CPU_BF16", None)
    out = {}
    for precision in ("fp32", "bf16"):
        command = [str(BIN / "nnUNetv2_predict_lowfootprint"), "-i", str(inputs), "-o", str(root / precision), "-d",
                   TRAINED_DATASET, "-c", mf.CONFIGURATION, "-f", "0", "-device", "cpu", "--disable_progress_bar",
                   "--precision", precision]
        subprocess.run(command, env=env, check=True, capture_output=True)
        out[precision] = _labels(root / precision / "case.nii.gz")
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


def bench_e2e(args) -> None:
    work = Path(args.workdir)
    case = half_width_case(args, "e2e", E2E_DATASET)
    root, inputs, env = case.root, case.inputs, case.env
    shape, spacing, plans_spacing, patch, architecture = (case.shape, case.spacing, case.plans_spacing, case.patch,
                                                          case.architecture)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    grid = [int(g) for g in compute_new_shape(shape, spacing, plans_spacing)]
    print(f"(b) end to end: phantom {shape} (z, y, x) at {spacing} mm; plans spacing {plans_spacing} (network grid "
          f"{grid}), patch {patch}, half-width PlainConvUNet {architecture['arch_kwargs']['features_per_stage']}, "
          f"1 fold, CPU", flush=True)
    load = os.getloadavg()[0]
    rows = []
    for key, label, command in e2e_runs(args.runs, inputs, root, E2E_DATASET, "cpu"):
        row = run_profiled(label, command, env, root / f"log_{key}.txt")
        row["key"] = key
        row["load_before"] = load
        load = os.getloadavg()[0]
        rows.append(row)
    by = {r["key"]: r for r in rows}
    for r in rows:
        for ref, column in (("stock", "speedup"), ("stock_notta", "speedup_notta")):
            if ref in by:
                r[column] = by[ref]["wall_s"] / r["wall_s"]
        if "stock" in by:
            r["ram_ratio"] = r["peak_rss_gb"] / by["stock"]["peak_rss_gb"]
    for ref_key, column in (("stock_notta", "equal_to_stock_notta"), ("ours_fp32", "equal_to_ours_fp32")):
        if ref_key in by:
            ref = _labels(root / f"out_{ref_key}" / "case.nii.gz")
            for r in rows:
                f = root / f"out_{r['key']}" / "case.nii.gz"
                if r["key"] != ref_key and f.is_file():
                    r[column] = float((_labels(f) == ref).mean())
    accuracy = None
    if args.accuracy_iterations > 0:
        accuracy = accuracy_guard(work, args.accuracy_iterations, (64, 224, 224), (1.25, 0.7, 0.7))
        if "ours" in by:
            by["ours"]["dice_bf16_trained"] = accuracy["min_dice"]
    breakdown = memory_breakdown(root, E2E_DATASET, "auto") if args.breakdown else None
    print()
    print(f"(b) end to end, image {shape} (z, y, x) at {spacing} mm, plans {plans_spacing}, network grid {grid}. "
          f"Machine: {machine()}; {_cpu_flags_note()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("speedup", "x faster than stock"),
                       ("speedup_notta", "x faster than stock --disable_tta"),
                       ("peak_rss_gb", "peak RSS tree (GB)"), ("ram_ratio", "RAM / stock"),
                       ("peak_rss_largest_gb", "peak RSS largest process (GB)"),
                       ("n_processes_max", "processes"),
                       ("cpu_util_pct", "CPU util. (% of all cores)"), ("cpu_time_s", "CPU time (s)"),
                       ("equal_to_stock_notta", "voxels equal to stock --disable_tta"),
                       ("equal_to_ours_fp32", "voxels equal to ours fp32 (random weights)"),
                       ("dice_bf16_trained", "min Dice bf16 vs fp32, organs a trained model learned"),
                       ("load_before", "load avg. before")]))
    if accuracy is not None:
        print(f"\nAccuracy guard: a small U-Net trained on phantoms ({args.accuracy_iterations} iterations, "
              f"{accuracy['train_s']:.0f} s), an unseen phantom 64 x 224 x 224 at 1.25 x 0.7 x 0.7 mm, "
              f"--precision bf16 against --precision fp32 (voxels equal: {accuracy['voxels_equal']:.6f}):")
        organ_rows = [{"organ": k, **v} for k, v in accuracy["organs"].items()]
        print(table(organ_rows, [("organ", "organ"), ("dice_bf16_vs_fp32", "Dice bf16 vs fp32"),
                                 ("voxels_fp32", "voxels (fp32)"), ("dice_fp32_vs_truth", "Dice fp32 vs truth")]))
    if breakdown is not None:
        print_breakdown(breakdown)
    (root / "results.json").write_text(json.dumps({"rows": rows, "accuracy": accuracy, "breakdown": breakdown},
                                                  indent=1, default=str))


def _cpu_flags_note() -> str:
    from noisy_student_nnunet.inference.precision import cpu_native_bf16

    return cpu_native_bf16()[1]


# ----------------------------------------------------------------------------- (e) memory breakdown
def _rss_status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def memory_worker(model: Path, image: Path, precision: str, out: Path) -> dict:
    """Ours' steps for one case in this fresh process (as nnUNetv2_predict_lowfootprint runs them for a single
    case), with the peak RSS of each: the kernel's high-water mark, reset after every step."""
    stages = []
    t0 = time.perf_counter()

    def mark(stage: str, **arrays) -> None:
        rss, hwm = _rss_status()
        stages.append({"stage": stage, "rss_after_gb": rss / GB, "peak_gb": hwm / GB,
                       "s": time.perf_counter() - t0, **{k: v / GB for k, v in arrays.items()}})
        _reset_peak_rss()

    mark("interpreter, numpy")
    import torch

    mark("import torch")
    from noisy_student_nnunet.inference import LowFootprintPredictor
    from noisy_student_nnunet.inference.preprocessing import preprocess_case
    from noisy_student_nnunet.cpu_threads import cpu_thread_count

    mark("import nnU-Net's predictor and ours (nnunetv2, torch._dynamo, SimpleITK, scipy, skimage)")
    torch.set_num_threads(cpu_thread_count())
    predictor = LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, precision=precision)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    weights = sum(v.numel() * v.element_size() for v in predictor.list_of_parameters[0].values())
    mark("model loaded (checkpoint, network)", weights_gb=2 * weights)
    data, properties = preprocess_case([str(image)], None, predictor.plans_manager, predictor.configuration_manager,
                                       predictor.dataset_json)
    voxels = int(np.prod(properties["shape_before_cropping"]))
    mark("read + preprocess (crop, normalise, resample)", input_int16_gb=2 * voxels, input_float32_gb=4 * voxels,
         resampled_gb=data.nbytes)
    data = torch.from_numpy(data)
    logits = predictor.predict_logits_from_preprocessed_data(data)
    del data
    mark("network, sliding window", logits_gb=logits.numel() * logits.element_size())
    out.parent.mkdir(parents=True, exist_ok=True)
    predictor.export_case(logits, properties, str(out))
    mark("export (argmax, nearest resize, write)", labels_gb=voxels)
    return {"stages": stages, "precision": predictor.precision.name}


def memory_breakdown(root: Path, dataset_name: str, precision: str) -> dict:
    model = root / "results" / dataset_name / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    done = subprocess.run([sys.executable, __file__, "_memory_worker", str(model), str(root / "in" / "case_0000.nii.gz"),
                           precision, str(root / "out_memory" / "case")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_breakdown(breakdown: dict) -> None:
    print(f"\nPeak RSS of ours stage by stage ({breakdown['precision']}; one process, the kernel's high-water mark "
          f"reset after each stage; the arrays' sizes for reference):")
    rows = []
    for st in breakdown["stages"]:
        arrays = ", ".join(f"{k[:-3].replace('_', ' ')} {v:.3f}" for k, v in st.items() if k.endswith("_gb")
                           and k not in ("rss_after_gb", "peak_gb"))
        rows.append({**st, "arrays": arrays})
    print(table(rows, [("stage", "stage"), ("peak_gb", "peak RSS during (GB)"), ("rss_after_gb", "RSS after (GB)"),
                       ("arrays", "arrays (GB)"), ("s", "time since start (s)")]))


def bench_memory(args) -> None:
    case = half_width_case(args, "e2e", E2E_DATASET)  # the same folder as (b): its model and input are reused
    print_breakdown(memory_breakdown(case.root, E2E_DATASET, args.precision))


# ----------------------------------------------------------------------------- (f) one patch
def patch_worker(mode: str, threads: int, repeats: int) -> dict:
    """Seconds per forward pass of the half-width U-Net on one 40 x 224 x 192 patch, in this fresh process."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.set_num_threads(threads)
    architecture, patch = mf.half_width_architecture((2.5, 1.6, 1.6), (40, 224, 192))
    net = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], 1, NUM_CLASSES, allow_init=True,
                                 deep_supervision=False).eval()
    x = torch.randn(1, 1, *patch)
    channels_last = mode.endswith("_cl")
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
        for _ in range(repeats + 1):  # the first pass builds oneDNN's kernels
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    rss, hwm = _rss_status()
    return {"mode": mode, "threads": threads, "s_per_patch": float(np.median(times[1:])), "first_s": times[0],
            "peak_gb": hwm / GB}


def bench_patch(args) -> None:
    rows = []
    for threads in args.threads:
        for mode in args.modes:
            done = subprocess.run([sys.executable, __file__, "_patch_worker", mode, str(threads), str(args.repeats)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{mode}: failed\n{done.stderr[-2000:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {mode}, {threads} threads: {rows[-1]['s_per_patch']:.2f} s", flush=True)
    print(f"\n(f) one 40 x 224 x 192 patch, half-width U-Net, median of {args.repeats}. Machine: {machine()}; "
          f"{_cpu_flags_note()}; load avg. {os.getloadavg()[0]:.1f}")
    print(table(rows, [("mode", "mode"), ("threads", "threads"), ("s_per_patch", "s / patch"),
                       ("first_s", "first pass (s)"), ("peak_gb", "peak RSS (GB)")]))


def bench_huge(args) -> None:
    work = Path(args.workdir)
    shape = (args.slices, 512, 512)
    spacing = (1.0, 0.8, 0.8)
    plans_spacing = (2.5, 0.8, 0.8)
    patch = [48, 128, 128]
    architecture = mf.tiny_architecture((4, 8, 16))
    name = f"huge_{'x'.join(map(str, shape))}"
    root, inputs, env = prepare_e2e(work, name, shape, spacing, plans_spacing, patch, architecture,
                                    "Dataset981_BenchHuge")
    print(f"(d) huge case: phantom {shape} (z, y, x) at {spacing} mm; plans spacing {plans_spacing}, patch {patch}, "
          f"tiny PlainConvUNet [4, 8, 16], 14 classes, 1 fold, CPU", flush=True)
    rows = []
    for key, label, command in e2e_runs(args.runs, inputs, root, "Dataset981_BenchHuge", "cpu"):
        row = run_profiled(label, command, env, root / f"log_{key}.txt")
        rows.append(row)
    print()
    print(f"(d) huge case {shape}. Machine: {machine()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("peak_rss_gb", "peak RSS tree (GB)"),
                       ("peak_rss_largest_gb", "peak RSS largest process (GB)"),
                       ("cpu_util_pct", "CPU util. (% of all cores)"), ("exit", "exit code")]))
    (root / "results.json").write_text(json.dumps(rows, indent=1))


def bench_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("(c) GPU: no CUDA device on this machine; nothing measured. The CUDA path (fp16 autocast, logits, "
              "argmax and resizing on the device) is exercised by this benchmark where a GPU exists.")
        return
    case = half_width_case(args, "gpu", "Dataset982_BenchGpu")
    root = case.root
    rows = []
    for key, label, command in e2e_runs(args.runs, case.inputs, root, "Dataset982_BenchGpu", "cuda"):
        rows.append(run_profiled(label, command, case.env, root / f"log_{key}.txt"))
    print()
    print(f"(c) GPU, image {case.shape} at {case.spacing} mm. Device: {torch.cuda.get_device_name(0)}. Machine: {machine()}")
    print(table(rows, [("run", "run"), ("wall_s", "wall time (s)"), ("gpu_peak_gb", "peak GPU memory, device (GB)"),
                       ("peak_rss_gb", "peak RSS tree (GB)"), ("cpu_util_pct", "CPU util. (%)")]))
    (root / "results.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_export_worker":
        print(json.dumps(export_worker(Path(argv[1]), argv[2], Path(argv[3]))))
        return 0
    if argv and argv[0] == "_memory_worker":
        print(json.dumps(memory_worker(Path(argv[1]), Path(argv[2]), argv[3], Path(argv[4]))))
        return 0
    if argv and argv[0] == "_patch_worker":
        print(json.dumps(patch_worker(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_inference"))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("export", help="(a) export only on the same logits")
    p.add_argument("--shape", type=int, nargs=3, default=(269, 433, 523), help="image shape z y x")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="image spacing z y x (mm)")
    p.add_argument("--plans_spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8))
    p.add_argument("--impls", nargs="+", default=["stock", "nearest", "linear"])
    runs = ["stock", "stock_notta", "ours_fp32", "ours", "ours_linear"]
    for name in ("e2e", "gpu", "memory"):
        p = sub.add_parser(name, help={"e2e": "(b) end to end on CPU", "gpu": "(c) GPU end to end",
                                       "memory": "(e) ours' peak RSS stage by stage"}[name])
        p.add_argument("--shape", type=int, nargs=3, default=(269, 433, 523), help="image shape z y x")
        p.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="image spacing z y x (mm)")
        p.add_argument("--plans_spacing", type=float, nargs=3, default=(2.5, 1.6, 1.6), help="z y x (mm)")
        p.add_argument("--patch", type=int, nargs=3, default=(40, 224, 192))
        p.add_argument("--slices", type=int, default=None, help="overrides --shape's z")
        p.add_argument("--inplane", type=int, default=None, help="overrides --shape's y and x")
        p.add_argument("--pixel_spacing", type=float, default=None, help="overrides --spacing's y and x")
        p.add_argument("--slice_spacing", type=float, default=None, help="overrides --spacing's z")
        if name == "memory":
            p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
            continue
        p.add_argument("--runs", nargs="+", default=["stock", "stock_notta", "ours_fp32", "ours"], choices=runs)
        p.add_argument("--accuracy_iterations", type=int, default=600 if name == "e2e" else 0,
                       help="train a small model this long for the bf16-vs-fp32 accuracy guard (0: skip)")
        p.add_argument("--no_breakdown", dest="breakdown", action="store_false",
                       help="skip the stage-by-stage RSS breakdown of ours")
    p = sub.add_parser("patch", help="(f) one network patch: precision, channels-last, threads")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "fp32_cl", "bf16_cl"])
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("huge", help="(d) 512x512xN input, tiny network")
    p.add_argument("--slices", type=int, default=1000)
    p.add_argument("--runs", nargs="+", default=["ours"], choices=runs)
    args = parser.parse_args(argv)
    {"export": bench_export, "e2e": bench_e2e, "gpu": bench_gpu, "huge": bench_huge, "memory": bench_memory,
     "patch": bench_patch}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
