"""What the benchmarks share: the machine line, markdown tables, fresh-process workers, peak RSS, stock runs.

Each benchmark is a short script; a measured run happens in a process of its own (clean peak RSS, same cold
start), either a worker of the script itself (:func:`run_worker`) or a console command under ``nsn profile``'s
sampler (:func:`run_profiled`). :func:`machine` names the CPU model and whether it executes bf16 natively,
because the same command takes twice as long on a CPU without it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # model_folders: hand-built nnU-Net model folders

BIN = Path(sys.executable).parent
GB = 1024.0 ** 3


# --- the machine ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line for a result: CPU model, cores this process may use, RAM, native bf16, GPU, torch and threads."""
    import psutil
    import torch

    from noisy_student_nnunet.cpu_threads import cpu_thread_count
    from noisy_student_nnunet.inference.precision import cpu_native_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16, why = cpu_native_bf16()
    return (f"{cpu_model()}, {cpu_thread_count()} of {os.cpu_count()} cores usable, "
            f"{psutil.virtual_memory().total / GB:.0f} GB RAM, native bf16: {'yes' if bf16 else 'no'} ({why}), "
            f"{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")


#: ``--isa avx2``: the environment that caps every library's kernels at AVX2 and takes the fp32 path, so that a CPU
#: with AVX-512 and bf16 runs the code an AVX2-only CPU (AMD Zen 2/3, Intel before Skylake-SP) runs. It imitates
#: that CPU's instruction set, not its clock, caches or memory: times are this CPU's with AVX2 kernels.
ISA_CAPS: dict[str, dict[str, str]] = {
    "avx2": {
        "NSN_CPU_BF16": "0",  # no native bf16: the trainers' autocast (inference's ``auto`` is fp32 anyway)
        "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN in torch (convolutions) and in OpenVINO's CPU plugin
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL in torch (GEMMs of the unfolded convolutions)
        "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS in numpy and scipy
    },
}

_ISA_PROBE = r"""
import os, subprocess, sys
import torch, openvino as ov
conv = torch.nn.Conv3d(8, 8, 3, padding=1).eval()
x = torch.randn(2, 8, 16, 32, 32)
model = ov.Core().compile_model(ov.convert_model(conv, example_input=x), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
kernels = {str(op.get_rt_info()["primitiveType"].astype(str)) for op in model.get_runtime_model().get_ordered_ops()
           if "primitiveType" in op.get_rt_info()}
conv_kernel = next((k for k in sorted(kernels) if "conv" in k), "?")
onednn = subprocess.run([sys.executable, "-c", "import torch; torch.nn.Conv3d(8, 8, 3)(torch.randn(2, 8, 8, 8, 8))"],
                        env=dict(os.environ, ONEDNN_VERBOSE="1"), capture_output=True, text=True).stdout
isa = next((line.split("isa:")[1] for line in onednn.splitlines() if "isa:" in line), "?")
print(f"torch ATen {torch.backends.cpu.get_cpu_capability()}, torch oneDNN {isa}, OpenVINO convolution {conv_kernel}")
"""


def apply_isa_cap(isa: str | None) -> str:
    """Cap this process's environment (and so every child's) at ``isa``; return what the kernels report.

    The report comes from a child that runs one convolution in torch and one in OpenVINO, so it shows the kernels
    the measured commands get, not what the flags promise.
    """
    if isa is not None:
        os.environ.update(ISA_CAPS[isa])
    probe = subprocess.run([sys.executable, "-c", _ISA_PROBE], capture_output=True, text=True)
    report = probe.stdout.strip() or f"probe failed: {probe.stderr.strip()[-200:]}"
    caps = " ".join(f"{k}={v}" for k, v in ISA_CAPS[isa].items()) if isa else "none"
    return f"instruction-set cap: {caps}; kernels: {report}"


# --- results ----------------------------------------------------------------------------------------------


def warm_guest_memory(gigabytes: float) -> str:
    """Touch ``gigabytes`` of memory once, in a child process, and say how long it took.

    On these virtual machines the first touch of guest memory that nothing has used since boot is slow (the host
    backs it then): 16 GB took 45.0 s and, minutes after other runs, 32.5 s again (a Xeon with AMX, 2026-12-06;
    docs/results/bench_backends_amx_e437608.txt and bench_stages_avx2_amx_3cases_warm_memory.txt). Every run then
    pays for the fresh memory it touches, stock most
    (it touches the most), whatever order the runs come in. Touching the memory first removes that cost, which
    bare metal does not have, from every run alike."""
    if gigabytes <= 0:
        return "guest memory: not warmed first"
    import psutil

    gigabytes = min(gigabytes, psutil.virtual_memory().available / 2**30 - 2)  # never the OOM killer
    if gigabytes <= 0:
        return "guest memory: not warmed first (less than 2 GB available)"
    code = ("import numpy as np, time; t = time.perf_counter(); keep = []\n"
            f"for _ in range({int(gigabytes * 8)}):\n"
            "    a = np.empty(2**24); a.fill(1.0); keep.append(a)\n"  # 128 MB each
            "print(round(time.perf_counter() - t, 1))")
    took = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return (f"guest memory: {gigabytes:.3g} GB touched first ({took} s), "
            "so no run pays for the host backing fresh memory")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub-markdown table of ``rows`` with (key, header) ``columns``."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6f}" if 0.999 <= value < 1 else (f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}")
        return "" if value is None else str(value)
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)


def dice_per_class(a: np.ndarray, b: np.ndarray, labels) -> dict[int, float]:
    """Dice of each label between two label maps (NaN where neither has it)."""
    out = {}
    for c in labels:
        p, q = a == c, b == c
        total = int(p.sum()) + int(q.sum())
        out[int(c)] = float(2 * (p & q).sum() / total) if total else float("nan")
    return out


def read_labels(path: Path) -> np.ndarray:
    """A label file as a numpy array (SimpleITK, nnU-Net's reader)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def timed(function: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """(result, wall seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# --- peak memory of this process --------------------------------------------------------------------------


def rss_status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc."""
    rss = hwm = 0
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def reset_peak_rss() -> None:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS (``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """VmHWM from /proc (resettable), else the kernel's ``ru_maxrss``."""
    try:
        return rss_status()[1]
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- measured runs in processes of their own ---------------------------------------------------------------


def run_worker(script: str | Path, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python SCRIPT ARGS`` in a fresh process; the worker prints its result as the last JSON line."""
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(map(str, args))}: exit {done.returncode}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_profiled(label: str, command: list[str], env: dict, log: Path, timeout: float | None = None) -> dict:
    """``command`` under ``nsn profile``'s sampler (whole process tree, every 0.1 s); its output goes to ``log``."""
    from noisy_student_nnunet.profiling import profile_command

    print(f"  running {label}: {' '.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    # the profiler runs the command in a child; a shell-free wrapper points its stdout/stderr to the log
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
          f"{row['peak_rss_largest_gb']:.2f} GB), CPU {row['cpu_util_pct']:.0f} % of {ncpu} cores, exit {row['exit']}",
          flush=True)
    return row


def console_command(name: str) -> str:
    """A console script next to this interpreter, else the one on PATH (a machine where the packages are not
    installed, only put on PYTHONPATH, gets wrapper scripts there: benchmarks/gpu_check.sh), else the bare name."""
    import shutil

    installed = BIN / name
    return str(installed) if installed.is_file() else (shutil.which(name) or name)


#: the predictions compared: stock nnUNetv2_predict and ours, by key
PREDICT_RUNS = ("stock", "stock_notta", "ours_fp32", "ours", "ours_bf16", "ours_linear")


def predict_commands(which: Sequence[str], inputs: Path, out_root: Path, dataset_name: str,
                     device: str) -> list[tuple[str, str, list[str]]]:
    """(key, label, command) of each run in ``which`` (see :data:`PREDICT_RUNS`), writing to ``out_root/out_KEY``."""
    import model_folders as mf

    common = ["-i", str(inputs), "-d", dataset_name, "-c", mf.CONFIGURATION, "-f", "0", "-device", device,
              "--disable_progress_bar"]
    stock, ours = console_command("nnUNetv2_predict"), console_command("nnUNetv2_predict_lowfootprint")
    catalogue = {
        "stock": ("stock nnUNetv2_predict (defaults, TTA)", [stock, *common]),
        "stock_notta": ("stock nnUNetv2_predict --disable_tta", [stock, *common, "--disable_tta"]),
        "ours_fp32": ("ours nnUNetv2_predict_lowfootprint --precision fp32", [ours, *common, "--precision", "fp32"]),
        "ours": ("ours nnUNetv2_predict_lowfootprint (defaults: nearest, --precision auto)", [ours, *common]),
        "ours_bf16": ("ours nnUNetv2_predict_lowfootprint --precision bf16", [ours, *common, "--precision", "bf16"]),
        "ours_linear": ("ours --export linear", [ours, *common, "--export", "linear"]),
    }
    return [(key, catalogue[key][0], [*catalogue[key][1], "-o", str(out_root / f"out_{key}")]) for key in which]


def nnunet_env(root: Path, results: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's folders under ``root`` (results at ``results``), no compile."""
    return dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(root / "raw"),
                nnUNet_preprocessed=str(root / "preprocessed"), nnUNet_compile="0")
