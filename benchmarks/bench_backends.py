"""(g) Backends (issue 20): stock against ours with torch and with OpenVINO, one case and a folder of 10, in one run.

    python benchmarks/bench_backends.py [--shape 64 200 200 --spacing 2.5 1.4 1.4] [--runs ...]
        [--folder_runs ...] [--trained RESULTS DATASET MODEL IMAGES]

1. One case (the half-width FLARE22 model with random weights, ``_inference_case.py``; ``--quiet_head``: its
   segmentation head scaled down, so that the label maps are one class and write as fast as a trained model's
   rather than as noise), every command under
   ``nsn profile``'s sampler: stock defaults (TTA), stock ``--disable_tta``, ours torch, ours OpenVINO cold (its
   cache emptied first: the run converts) and warm, all with ``--precision auto`` (fp32 on every CPU); then each
   backend with ``--precision bf16`` (OpenVINO cold and warm), which a CPU with native bf16 runs faster. Speed-ups
   and RAM against stock in the same run.
2. Where the time goes, for ours with each backend (warm), in a fresh process with no worker threads so that the
   stages add up: imports, start-up (model loading, OpenVINO compilation), reading, preprocessing, network (the
   patches alone: the floor), export, writing; end to end divided by network time.
3. A folder of 10 mixed cases (sizes, spacings, orientations): cases per hour and peak RAM, stock against ours.
4. ``--trained``: labels of a trained model (e.g. the demo's) per organ against torch fp32, Dice over its images.

The machine line names the CPU's flags; every figure depends on the load, which is printed with each run.
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

from _common import (BIN, ISA_CAPS, apply_isa_cap, dice_per_class, machine, nnunet_env, read_labels, run_profiled,
                     run_worker, table, warm_guest_memory)
from _inference_case import add_case_arguments, half_width_case

import model_folders as mf  # noqa: E402  (on sys.path through _common)

DATASET = "Dataset982_BenchBackends"
OURS = str(BIN / "nnUNetv2_predict_lowfootprint")
STOCK = str(BIN / "nnUNetv2_predict")
#: key -> (label, command tail after the common arguments); ``auto`` precision is fp32 on every CPU
RUNS = {
    "stock": ("stock nnUNetv2_predict (defaults, TTA)", [STOCK]),
    "stock_notta": ("stock nnUNetv2_predict --disable_tta", [STOCK, "--disable_tta"]),
    "torch": ("ours --backend torch (auto precision)", [OURS, "--backend", "torch"]),
    "ov_cold": ("ours --backend openvino, cold (converts)", [OURS, "--backend", "openvino"]),
    "ov": ("ours --backend openvino, warm (auto precision)", [OURS, "--backend", "openvino"]),
    "ov_seq": ("ours --backend openvino, warm, -npp 0 -nps 0 (no worker threads)",
               [OURS, "--backend", "openvino", "-npp", "0", "-nps", "0"]),
    "torch_bf16": ("ours --backend torch --precision bf16", [OURS, "--backend", "torch", "--precision", "bf16"]),
    "ov_bf16_cold": ("ours --backend openvino --precision bf16, cold (converts)",
                     [OURS, "--backend", "openvino", "--precision", "bf16"]),
    "ov_bf16": ("ours --backend openvino --precision bf16, warm",
                [OURS, "--backend", "openvino", "--precision", "bf16"]),
}
STAGES = ("imports", "start-up", "reading", "preprocessing", "network", "sliding window, other", "export",
          "writing", "other")


def machine_line() -> str:
    import openvino

    from noisy_student_nnunet.inference.precision import speed_flags

    return (f"{machine()}; CPU flags: {' '.join(speed_flags()) or 'none of avx2/avx512/amx'}; "
            f"OpenVINO {openvino.get_version()}")


def _common_args(inputs: Path, dataset: str, model_dir: str | None = None) -> list[str]:
    args = ["-i", str(inputs), "-d", dataset, "-c", mf.CONFIGURATION, "-f", "0", "-device", "cpu",
            "--disable_progress_bar"]
    if model_dir is not None:
        trainer, plans, _ = model_dir.split("__")
        args += ["-tr", trainer, "-p", plans]
    return args


def cache_for(cache: Path, head: list[str]) -> Path:
    """One OpenVINO cache folder per precision choice, so that a cold run of one does not empty another's."""
    return cache / ("bf16" if "bf16" in head else "auto")


def run_set(keys: list[str], inputs: Path, out_root: Path, env: dict, cache: Path, tag: str) -> list[dict]:
    """Each run of ``keys`` under the profiler; a cold run empties its OpenVINO cache first."""
    rows = []
    for key in keys:
        label, head = RUNS[key]
        extra = {"NSN_OPENVINO_CACHE": str(cache_for(cache, head))}
        if key.endswith("_cold"):
            shutil.rmtree(extra["NSN_OPENVINO_CACHE"], ignore_errors=True)
        out = out_root / f"{tag}_{key}"
        shutil.rmtree(out, ignore_errors=True)
        command = [head[0], *_common_args(inputs, DATASET), *head[1:], "-o", str(out)]
        load = os.getloadavg()[0]
        row = run_profiled(label, command, {**env, **extra}, out_root / f"log_{tag}_{key}.txt")
        row.update(key=key, load_before=load)
        rows.append(row)
    by = {r["key"]: r for r in rows}
    for r in rows:
        for ref, column in (("stock", "speedup"), ("stock_notta", "speedup_notta")):
            if ref in by:
                r[column] = by[ref]["wall_s"] / r["wall_s"]
        if "stock" in by or "stock_notta" in by:
            r["ram_ratio"] = r["peak_rss_gb"] / by.get("stock", by.get("stock_notta"))["peak_rss_gb"]
    return rows


# --- where the time goes: a worker process -----------------------------------------------------------------


def stages_worker(model: str, inputs: str, out: str, backend: str, pipelined: str = "0") -> dict:
    """Predict every case of ``inputs`` sequentially, timing each stage (timers around the real functions).

    ``pipelined`` "1": with the command's default workers (preprocessing ahead, export in the background), whose
    stage timers overlap; only the totals of such a run mean something."""
    start = time.perf_counter()
    raw = {k: 0.0 for k in ("load", "prepare", "check", "preprocess", "network", "window", "export",
                            "writing")}
    import torch

    from noisy_student_nnunet.inference import predictor as predictor_module
    from noisy_student_nnunet.cpu_threads import cpu_thread_count

    if backend == "openvino":
        import openvino  # noqa: F401
    imports = time.perf_counter() - start

    def timed(key, function):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                raw[key] += time.perf_counter() - t0
        return wrapper

    t0 = time.perf_counter()
    torch.set_num_threads(cpu_thread_count())
    predictor = predictor_module.LowFootprintPredictor(device=torch.device("cpu"), allow_tqdm=False, backend=backend)
    predictor.initialize_from_trained_model_folder(model, (0,))
    raw["load"] = time.perf_counter() - t0
    # the reader's read with the gzip check beside it, or the decompression before it
    predictor_module.read_images_checked = timed("check", predictor_module.read_images_checked)
    predictor_module.preprocess_image = timed("preprocess", predictor_module.preprocess_image)
    predictor._run_network = timed("network", predictor._run_network)
    predictor._prepare_backend = timed("prepare", predictor._prepare_backend)  # conversion/compilation, once
    predictor._internal_predict_sliding_window_return_logits = timed(
        "window", predictor._internal_predict_sliding_window_return_logits)
    predictor_module.labels_in_original_geometry = timed("export", predictor_module.labels_in_original_geometry)
    predictor_module.write_labels = timed("writing", predictor_module.write_labels)
    if pipelined == "1":
        from noisy_student_nnunet.predict_cli import default_preprocessing_workers

        workers = {"num_processes_preprocessing": default_preprocessing_workers(),
                   "num_processes_segmentation_export": 3}
    else:
        workers = {"num_processes_preprocessing": 0, "num_processes_segmentation_export": 0}
    predictor.predict_from_files(inputs, out, **workers)
    total = time.perf_counter() - start
    result = {"backend": backend, "total": total, "imports": imports, "start-up": raw["load"] + raw["prepare"],
              "reading": raw["check"],  # DefaultPreprocessor's route: read_images_checked wraps the read alone
              "preprocessing": raw["preprocess"],
              "network": raw["network"], "sliding window, other": raw["window"] - raw["network"] - raw["prepare"],
              "export": raw["export"], "writing": raw["writing"], "workers": workers}
    result["other"] = max(0.0, total - sum(result[s] for s in STAGES if s != "other"))
    return result


def copies_of_the_case(inputs: Path, root: Path, n: int) -> Path:
    """A folder of ``n`` hard links (copies where links fail) to the one case of ``inputs``."""
    if n <= 1:
        return inputs
    (image,) = sorted(inputs.glob("*_0000.nii.gz"))
    folder = root / f"stages_in_{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        target = folder / f"copy{i:02d}_0000.nii.gz"
        try:
            os.link(image, target)
        except OSError:
            shutil.copy(image, target)
    return folder


def stages(model: Path, inputs: Path, out_root: Path, env: dict, cases: int = 1) -> list[dict]:
    """Each backend in a fresh process over ``cases`` copies of the case; besides the totals, what one case costs
    once imports and start-up are paid (a folder's steady state): ``per case`` and ``per case / network``.

    With several cases, each backend runs a second time with the command's default workers (the next case
    preprocessed ahead, the last one exported in the background): its ``per case`` against the network time of
    the serial run (that run's stage timers overlap, so only its totals are shown)."""
    rows = []
    folder = copies_of_the_case(inputs, out_root, cases)
    for backend in ("torch", "openvino"):
        serial_network = None
        for pipelined in (["0", "1"] if cases > 1 else ["0"]):
            out = out_root / f"stages_{backend}_{pipelined}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_worker(__file__, ["--stages_worker", str(model), str(folder), str(out), backend, pipelined],
                                env=env)
            result["cases"] = cases
            result["per_case"] = (result["total"] - result["imports"] - result["start-up"]) / cases
            if pipelined == "1":
                workers = result.pop("workers")
                result = {k: result[k] for k in ("cases", "total", "imports", "start-up", "per_case")}
                result["backend"] = (f"{backend}, pipelined (-npp {workers['num_processes_preprocessing']}, -nps "
                                     f"{workers['num_processes_segmentation_export']})")
                result["network"] = serial_network
            else:
                result.pop("workers")
                result["backend"] = f"{backend}, serial (-npp 0 -nps 0)" if cases > 1 else backend
                serial_network = result["network"]
            result["per_case_ratio"] = result["per_case"] / max(1e-9, result["network"] / cases)
            rows.append(result)
    return rows


def print_stages(rows: list[dict], title: str) -> None:
    print(f"\nWhere the time goes ({title}; fresh process, warm cache; serial: no worker threads, so the stages add "
          "up; pipelined: the command's default workers, its network column the serial run's), seconds:")
    columns = [("backend", "backend"), ("cases", "cases")] + [(s, s) for s in STAGES] + [
        ("total", "end to end"), ("ratio", "end to end / network"), ("per_case", "per case, after start-up"),
        ("per_case_ratio", "per case / network")]
    for r in rows:
        r["ratio"] = r["total"] / max(1e-9, r["network"])
    print(table(rows, columns))


# --- a folder of mixed cases ------------------------------------------------------------------------------


def mixed_folder(root: Path, n: int = 10) -> Path:
    """``n`` phantom CTs of different sizes, spacings and orientations (axis flips), written once."""
    from noisy_student_nnunet.phantoms import make_phantom

    folder = root / "mixed"
    if len(list(folder.glob("*_0000.nii.gz"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(48, 160, 160), (64, 200, 200), (40, 256, 256), (80, 180, 180), (56, 220, 200),
              (36, 192, 240), (72, 160, 200), (50, 240, 240), (44, 200, 170), (60, 210, 210)]
    spacings = [(2.5, 1.4, 1.4), (3.0, 1.2, 1.2), (2.0, 1.0, 1.0), (2.5, 1.6, 1.6), (3.0, 1.3, 1.3),
                (2.2, 1.1, 1.1), (2.5, 1.5, 1.5), (2.0, 1.2, 1.2), (3.5, 1.7, 1.7), (2.8, 1.25, 1.25)]
    directions = [None, (-1, 0, 0, 0, 1, 0, 0, 0, 1), None, (1, 0, 0, 0, -1, 0, 0, 0, 1), None,
                  (1, 0, 0, 0, 1, 0, 0, 0, -1), None, (-1, 0, 0, 0, -1, 0, 0, 0, 1), None, None]
    for i in range(n):
        direction = tuple(float(v) for v in directions[i]) if directions[i] else None
        make_phantom(100 + i, shapes[i], spacings[i], direction=direction).write(folder / f"mix{i:02d}_0000.nii.gz")
    return folder


# --- labels of a trained model ------------------------------------------------------------------------------


#: name -> (extra arguments of nnUNetv2_predict_lowfootprint, extra environment); torch_fp32 is the reference
TRAINED_VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "torch_fp32": (["--backend", "torch", "--precision", "fp32"], {}),
    "openvino_fp32": (["--backend", "openvino", "--precision", "fp32"], {}),
    "openvino_auto": (["--backend", "openvino"], {}),
    "openvino_bf16": (["--backend", "openvino", "--precision", "bf16"], {}),
    "torch_bf16": (["--backend", "torch", "--precision", "bf16"], {}),
}


def trained_labels(results: Path, dataset: str, model_dir: str, images: Path, work: Path,
                   variants: dict[str, tuple[list[str], dict[str, str]]] = TRAINED_VARIANTS) -> dict:
    """Per organ Dice of each backend/precision against torch fp32, pooled over the images (the guard)."""
    env = {**nnunet_env(work, results), "NSN_OPENVINO_CACHE": str(work / "ov_cache_trained")}
    env.pop("NSN_CPU_BF16", None)
    import subprocess

    maps = {}
    for name, (extra, extra_env) in {"torch_fp32": TRAINED_VARIANTS["torch_fp32"], **variants}.items():
        out = work / f"trained_{name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [OURS, *_common_args(images, dataset, model_dir), *extra, "-o", str(out)]
        started = time.perf_counter()
        done = subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr[-2000:]}")
        precision = [line for line in done.stdout.splitlines() if "precision" in line][:1]
        maps[name] = ({p.name: read_labels(p) for p in sorted(out.glob("*.nii.gz"))}, precision,
                      time.perf_counter() - started, done.stdout)
    labels = json.loads((results / dataset / model_dir / "dataset.json").read_text())["labels"]
    organs = {int(v): k for k, v in labels.items() if isinstance(v, int) and v > 0}
    import numpy as np

    reference = maps["torch_fp32"][0]
    rows = []
    for name, (cases, precision, seconds, stdout) in maps.items():
        if name == "torch_fp32":
            continue
        ref = np.concatenate([reference[c].ravel() for c in sorted(reference)])
        got = np.concatenate([cases[c].ravel() for c in sorted(reference)])
        dice = dice_per_class(got, ref, sorted(organs))
        present = {organs[c]: d for c, d in dice.items() if d == d}
        rows.append({"run": name, "precision": precision[0] if precision else "", "cases": len(reference),
                     "min_dice": min(present.values()), "worst_organ": min(present, key=present.get),
                     "voxels_equal": float((got == ref).mean()), "dice": present, "wall_s": seconds})
    return {"rows": rows, "stdout": {name: found[3] for name, found in maps.items()}}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--stages_worker"]:
        print(json.dumps(stages_worker(*argv[1:6])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nsn_bench_backends"))
    add_case_arguments(parser)
    parser.set_defaults(shape=(64, 200, 200), spacing=(2.5, 1.4, 1.4))
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=None,
                        help="default: stock stock_notta torch ov_cold ov, then torch_bf16 ov_bf16_cold ov_bf16 "
                             "(not with --isa, whose CPU has no bf16)")
    parser.add_argument("--folder_runs", nargs="*", choices=list(RUNS), default=["stock_notta", "torch", "ov"],
                        help="runs on the folder of 10 mixed cases (none: skip the folder)")
    parser.add_argument("--no_stages", dest="stages", action="store_false")
    parser.add_argument("--stage_cases", type=int, default=1,
                        help="copies of the case the stage timing predicts in one process (stage columns are sums "
                             "over them; 'per case' is one case's cost once imports and start-up are paid)")
    parser.add_argument("--isa", choices=list(ISA_CAPS), default=None,
                        help="cap every run's kernels (stock's too) at this instruction set and take the fp32 path: "
                             "avx2 runs what an AVX2-only CPU runs, at this CPU's clock (see _common.ISA_CAPS)")
    parser.add_argument("--trained", nargs=4, metavar=("RESULTS", "DATASET", "MODEL_DIR", "IMAGES"), default=None,
                        help="a trained model (nnUNet_results, dataset name, Trainer__Plans__config, image folder) "
                             "whose labels are compared per organ against torch fp32")
    parser.add_argument("--quiet_head", action="store_true",
                        help="scale the random model's segmentation head down so that one class wins everywhere: the "
                             "label maps compress like a trained model's (random weights give noise, whose gzip "
                             "writing takes about 14x as long: bench_case_overheads.py); the network's work is the "
                             "same")
    parser.add_argument("--warm_memory_gb", type=float, default=0,
                        help="touch this much memory once before the runs (virtual machines back fresh guest memory "
                             "slowly the first time; see _common.warm_guest_memory); 0: do not")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = ["stock", "stock_notta", "torch", "ov_cold", "ov"]
        if args.isa is None:
            args.runs += ["torch_bf16", "ov_bf16_cold", "ov_bf16"]
    started = time.time()
    if args.isa is None:
        os.environ.pop("NSN_CPU_BF16", None)
    isa_line = apply_isa_cap(args.isa)  # before any child starts: every run inherits the cap
    print(f"Machine: {machine_line()}\n{isa_line}\n{warm_guest_memory(args.warm_memory_gb)}", flush=True)
    case = half_width_case(args, "backends", DATASET)
    cache = case.root / "ov_cache"
    env = {**case.env, "NSN_OPENVINO_CACHE": str(cache)}
    print(f"(g) one case: phantom {case.shape} (z, y, x) at {case.spacing} mm, plans {case.plans_spacing}, patch "
          f"{case.patch}, half-width U-Net {case.architecture['arch_kwargs']['features_per_stage']}, 1 fold"
          f"{', quiet head (one class everywhere)' if args.quiet_head else ', random weights (noise label maps)'}",
          flush=True)
    rows = run_set(args.runs, case.inputs, case.root, env, cache, "one")
    stage_env = {**env, "NSN_OPENVINO_CACHE": str(cache_for(cache, []))}  # warm after the "ov" runs above
    stage_rows = stages(case.model, case.inputs, case.root, stage_env, args.stage_cases) if args.stages else []
    folder_rows = []
    if args.folder_runs:
        folder = mixed_folder(Path(args.workdir))
        folder_rows = run_set(args.folder_runs, folder, case.root, env, cache, "folder")
        for r in folder_rows:
            r["cases_per_hour"] = 10 * 3600.0 / r["wall_s"]
    trained = trained_labels(Path(args.trained[0]), args.trained[1], args.trained[2], Path(args.trained[3]),
                             case.root) if args.trained else None

    print(f"\nMachine: {machine_line()}\n{isa_line}\nCommand: python benchmarks/bench_backends.py {' '.join(argv)}")
    columns = [("run", "run"), ("wall_s", "wall (s)"), ("speedup", "x faster than stock"),
               ("speedup_notta", "x faster than stock --disable_tta"), ("peak_rss_gb", "peak RSS tree (GB)"),
               ("ram_ratio", "RAM / stock"), ("cpu_util_pct", "CPU % of all cores"), ("load_before", "load before")]
    print(f"\n(g.1) one case {case.shape} at {case.spacing} mm:")
    print(table(rows, columns))
    if stage_rows:
        print_stages(stage_rows, f"{args.stage_cases} x the case {case.shape}")
    if folder_rows:
        print("\n(g.3) folder of 10 mixed cases (sizes 36-80 x 160-256 x 160-256, spacings 2-3.5 x 1-1.7 mm, axis "
              "flips):")
        print(table(folder_rows, [("run", "run"), ("wall_s", "wall (s)"), ("cases_per_hour", "cases / hour"),
                                  ("speedup_notta", "x faster than stock --disable_tta"),
                                  ("peak_rss_gb", "peak RSS tree (GB)"), ("ram_ratio", "RAM / stock"),
                                  ("load_before", "load before")]))
    if trained:
        print(f"\n(g.4) trained model {args.trained[2]} on {args.trained[3]}: per organ Dice against torch fp32")
        print(table(trained["rows"], [("run", "run"), ("precision", "precision (as logged)"), ("cases", "cases"),
                                      ("min_dice", "min Dice over organs"), ("worst_organ", "worst organ"),
                                      ("voxels_equal", "voxels equal")]))
        organs = list(dict.fromkeys(organ for r in trained["rows"] for organ in r["dice"]))
        print("\nDice per organ against torch fp32, pooled over the images (4 decimals: the guard is 0.997):")
        print(table([{"run": r["run"], **{o: f"{r['dice'][o]:.4f}" if o in r["dice"] else "" for o in organs}}
                     for r in trained["rows"]], [("run", "run")] + [(organ, organ) for organ in organs]))
    print(f"\nbenchmark wall time {time.time() - started:.0f} s")
    (case.root / "results_backends.json").write_text(json.dumps(
        {"machine": machine_line(), "isa": isa_line, "one": rows, "stages": stage_rows, "folder": folder_rows,
         "trained": trained["rows"] if trained else None},
        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
