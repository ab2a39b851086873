"""Resource profiler for one command, measuring what FLARE22 ranks on (time, RAM, CPU, GPU memory).

FLARE's monitor (JunMa11/FLARE, FLARE22/Evaluation/Efficiency.py and load_json.py) samples every
0.1 s: GPU memory as total minus free of the whole device (NVML), system-wide CPU utilisation from
``cpu_times`` deltas (``100 * delta / (total delta + 0.1)`` over user, system, idle; utilisation is
``100 - idle``), and system used RAM (``virtual_memory().used`` in MB). The areas are
``sum(samples) * interval``; GPU memory is ranked with a 2 GB tolerance, ``max(0, real - 2048)``, where
FLARE's "real" is the largest value seen in more than 2 % of the samples.

We record those system-wide figures unchanged, and next to them what belongs to the command alone:
the summed RSS and CPU of its process tree and, where NVML reports it, its GPU memory. The command runs
in its own process group so that Ctrl-C (or SIGTERM) ends its whole tree. No GPU gives ``None``
(JSON null), never 0.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, Sequence

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.outputs import atomic_file, atomic_write_bytes

MB = 1048576.0  # FLARE divides bytes by 1048576 and calls it MB
FLARE_GPU_TOLERANCE_MB = 2048.0
FLARE_GPU_MIN_FRACTION = 0.02  # a GPU memory value counts for the max when seen in > 2 % of samples
KILL_GRACE_S = 2.0  # SIGTERM first, SIGKILL after this
TREE_SCAN_BUDGET = 0.02  # at most this fraction of the interval is spent finding the tree's processes


# --------------------------------------------------------------------------------------------- GPU


class GpuReader(Protocol):
    """Reads device-wide used memory and, where supported, used memory per process (both MB)."""

    backend: str
    name: str
    index: int | str

    def device_used_mb(self) -> float: ...

    def process_used_mb(self) -> dict[int, float] | None: ...

    def close(self) -> None: ...


def _default_gpu_selector() -> int | str:
    """The device a CUDA program would use first: CUDA_VISIBLE_DEVICES' first entry, else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.isdigit():
        return int(visible)
    return visible if visible.startswith(("GPU-", "MIG-")) else 0


class NvmlReader:
    """NVML through nvidia-ml-py (``pynvml``, NVIDIA's maintained binding: it tracks the driver's struct
    versions, so no hand-written ctypes layouts here)."""

    backend = "pynvml"

    def __init__(self, selector: int | str) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            if isinstance(selector, int):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(selector)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(selector)
            name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.index = selector
        self._per_process = True

    def device_used_mb(self) -> float:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return float(round((info.total - info.free) / MB))

    def process_used_mb(self) -> dict[int, float] | None:
        """Per-process use; None where the driver does not report it (some vGPU/MIG setups: stop asking)."""
        if not self._per_process:
            return None
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            self._per_process = False
            return None
        return {int(p.pid): p.usedGpuMemory / MB for p in processes if p.usedGpuMemory is not None}

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def open_gpu_reader(selector: int | str | None = None) -> GpuReader | None:
    """An NVML reader for the selected device, or None where there is none to read (no NVIDIA driver, no such
    device, nvidia-ml-py missing): no GPU numbers then, never a crash."""
    selector = _default_gpu_selector() if selector is None else selector
    try:
        return NvmlReader(selector)
    except Exception:  # ImportError, NVMLError (library not found, no device, ...), OSError
        return None


# ------------------------------------------------------------------------------------------- CPU


class FlareCpuMeter:
    """FLARE's system-wide CPU figure: percentages of (user, system, idle) from cpu_times deltas."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._before = self._times()

    def _times(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        return (t.user, t.system, t.idle)

    def sample(self) -> tuple[float, float, float]:
        now = self._times()
        delta = [n - b for n, b in zip(now, self._before)]
        total = sum(delta)
        self._before = now
        return tuple(100.0 * d / (total + 0.1) for d in delta)  # type: ignore[return-value]


class _ProcessTree:
    """RSS, CPU and pids of a process and its descendants, scanning for new descendants within budget."""

    def __init__(self, pid: int, interval: float) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self._processes: dict[int, "psutil.Process"] = {pid: self.root}
        self._cpu_seen: dict[int, float] = {}
        self._interval = interval
        self._scan_every = 1
        self._since_scan = 0
        self.all_pids: set[int] = {pid}
        self.peak_hwm_mb: float | None = None  # largest VmHWM seen in any process of the tree

    def _note_hwm(self, pid: int) -> None:
        """Track the kernel's peak RSS of one process (VmHWM: per address space, so it starts afresh at exec;
        ``ru_maxrss`` does not, and carries the forking parent's peak into the child)."""
        try:
            with open(f"/proc/{pid}/status", "rb") as handle:
                for line in handle:
                    if line.startswith(b"VmHWM:"):
                        mb = int(line.split()[1]) / 1024.0  # kB
                        self.peak_hwm_mb = mb if self.peak_hwm_mb is None else max(self.peak_hwm_mb, mb)
                        return
        except (OSError, ValueError, IndexError):
            return

    def _scan(self) -> None:
        start = time.perf_counter()
        try:
            children = self.root.children(recursive=True)
        except self._psutil.Error:
            children = []
        cost = time.perf_counter() - start
        self._scan_every = max(1, math.ceil(cost / (TREE_SCAN_BUDGET * self._interval)))
        for child in children:
            if child.pid not in self._processes:
                self._processes[child.pid] = child
                self.all_pids.add(child.pid)

    def sample(self, dt: float) -> tuple[float, float, int]:
        """(RSS MB, CPU % since the last sample, number of processes) of the live tree."""
        self._since_scan += 1
        if self._since_scan >= self._scan_every:
            self._since_scan = 0
            self._scan()
        rss, cpu_delta, gone = 0.0, 0.0, []
        for pid, process in self._processes.items():
            try:
                with process.oneshot():
                    rss += process.memory_info().rss
                    times = process.cpu_times()
                self._note_hwm(pid)
            except self._psutil.Error:
                gone.append(pid)
                continue
            used = times.user + times.system
            cpu_delta += used - self._cpu_seen.get(pid, 0.0)
            self._cpu_seen[pid] = used
        for pid in gone:
            del self._processes[pid]
            self._cpu_seen.pop(pid, None)
        return rss / MB, (100.0 * cpu_delta / dt if dt > 0 else 0.0), len(self._processes)

    def live(self) -> list:
        return list(self._processes.values())


# --------------------------------------------------------------------------------------- result


SAMPLE_KEYS = (
    "t",
    "rss_tree_mb",
    "n_processes",
    "system_ram_used_mb",
    "cpu_user_percent",
    "cpu_system_percent",
    "cpu_idle_percent",
    "cpu_utilisation_percent",
    "tree_cpu_percent",
    "gpu_device_used_mb",
    "gpu_tree_used_mb",
)


@dataclass
class ProfileResult:
    """Everything one run measured; :meth:`to_dict` gives the JSON (None where not measurable)."""

    command: list[str]
    exit_code: int
    interval_s: float
    wall_time_s: float
    started_at: str
    samples: dict[str, list] = field(default_factory=lambda: {k: [] for k in SAMPLE_KEYS})
    interrupted: str | None = None
    system_ram_used_baseline_mb: float = 0.0
    peak_rss_largest_process_mb: float | None = None
    tree_cpu_time_s: float | None = None
    sampler_cpu_time_s: float = 0.0
    gpu_backend: str | None = None
    gpu_name: str | None = None
    gpu_index: int | str | None = None

    @property
    def peak_rss_tree_mb(self) -> float | None:
        """Sampled peak of the tree's summed RSS, never below the kernel's peak of its largest process
        (which also catches peaks shorter than the interval)."""
        values = [v for v in (max(self.samples["rss_tree_mb"], default=None), self.peak_rss_largest_process_mb)
                  if v is not None]
        return max(values) if values else None

    @property
    def has_gpu(self) -> bool:
        return self.gpu_backend is not None

    def summary(self) -> dict:
        s = self.samples
        interval = self.interval_s

        def peak(values: list) -> float | None:
            return max(values) if values else None

        def mean(values: list) -> float | None:
            return sum(values) / len(values) if values else None

        util = s["cpu_utilisation_percent"]
        out: dict = {
            "command": list(self.command),
            "exit_code": self.exit_code,
            "interrupted": self.interrupted,
            "started_at": self.started_at,
            "interval_s": interval,
            "n_samples": len(s["t"]),
            "wall_time_s": self.wall_time_s,
            "peak_rss_tree_mb": self.peak_rss_tree_mb,
            "peak_rss_largest_process_mb": self.peak_rss_largest_process_mb,
            "system_ram_used_baseline_mb": self.system_ram_used_baseline_mb,
            "system_ram_used_peak_mb": peak(s["system_ram_used_mb"]),
            "system_ram_used_area_mb_s": sum(s["system_ram_used_mb"]) * interval,
            "cpu_utilisation_peak_percent": peak(util),
            "cpu_utilisation_mean_percent": mean(util),
            "cpu_utilisation_area_percent_s": sum(util) * interval,
            "tree_cpu_percent_peak": peak(s["tree_cpu_percent"]),
            "tree_cpu_percent_mean": mean(s["tree_cpu_percent"]),
            "tree_cpu_time_s": self.tree_cpu_time_s,
            "sampler_cpu_time_s": self.sampler_cpu_time_s,
            "gpu_backend": self.gpu_backend,
            "gpu_name": self.gpu_name,
            "gpu_index": self.gpu_index,
        }
        gpu_keys = (
            "gpu_memory_peak_mb",
            "gpu_memory_flare_max_mb",
            "gpu_memory_flare_tolerated_mb",
            "gpu_memory_area_mb_s",
            "gpu_memory_area_tolerated_mb_s",
            "gpu_tree_memory_peak_mb",
        )
        out.update({k: None for k in gpu_keys})
        gpu = [g for g in s["gpu_device_used_mb"] if g is not None]
        if self.has_gpu and gpu:
            flare_max = flare_gpu_max_mb(gpu)
            out["gpu_memory_peak_mb"] = max(gpu)
            out["gpu_memory_flare_max_mb"] = flare_max
            out["gpu_memory_flare_tolerated_mb"] = max(0.0, flare_max - FLARE_GPU_TOLERANCE_MB)
            out["gpu_memory_area_mb_s"] = sum(gpu) * interval
            out["gpu_memory_area_tolerated_mb_s"] = sum(max(0.0, g - FLARE_GPU_TOLERANCE_MB) for g in gpu) * interval
            tree = [g for g in s["gpu_tree_used_mb"] if g is not None]
            out["gpu_tree_memory_peak_mb"] = max(tree) if tree else None
        return out

    def to_dict(self) -> dict:
        out = self.summary()
        samples = dict(self.samples)
        if not self.has_gpu:
            samples["gpu_device_used_mb"] = None
            samples["gpu_tree_used_mb"] = None
        out["samples"] = samples
        return out

    def write_json(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())

    def plot(self, path: str | os.PathLike) -> None:
        """PNG of RAM, CPU and GPU memory over time (matplotlib Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.samples
        t = s["t"]
        figure, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        axes[0].plot(t, s["rss_tree_mb"], label="process tree RSS")
        axes[0].plot(t, s["system_ram_used_mb"], label="system used (FLARE)", alpha=0.7)
        axes[0].set_ylabel("RAM (MB)")
        axes[1].plot(t, s["cpu_utilisation_percent"], label="system utilisation (FLARE)")
        axes[1].plot(t, s["tree_cpu_percent"], label="process tree", alpha=0.7)
        axes[1].set_ylabel("CPU (%)")
        if self.has_gpu:
            device = [math.nan if g is None else g for g in s["gpu_device_used_mb"]]
            axes[2].plot(t, device, label=f"device used (FLARE), {self.gpu_name}")
            tree = [math.nan if g is None else g for g in s["gpu_tree_used_mb"]]
            if any(not math.isnan(g) for g in tree):
                axes[2].plot(t, tree, label="process tree", alpha=0.7)
            axes[2].axhline(FLARE_GPU_TOLERANCE_MB, color="grey", linestyle=":", label="FLARE 2 GB tolerance")
        else:
            axes[2].text(0.5, 0.5, "no GPU", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_ylabel("GPU memory (MB)")
        axes[2].set_xlabel("time (s)")
        for axis in axes:
            if axis.get_legend_handles_labels()[0]:
                axis.legend(loc="upper right", fontsize="small")
            axis.grid(alpha=0.3)
        title = " ".join(self.command)
        figure.suptitle(title if len(title) < 90 else title[:87] + "...", fontsize="small")
        figure.tight_layout()
        try:
            with atomic_file(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(figure)


def flare_gpu_max_mb(samples: Sequence[float]) -> float:
    """FLARE's GPU memory figure: the largest value seen in more than 2 % of the samples.

    (Transient spikes do not count.) FLARE's script fails when no value repeats that often; we fall
    back to the plain maximum then.
    """
    counts: dict[float, int] = {}
    for value in samples:
        counts[value] = counts.get(value, 0) + 1
    frequent = [v for v, c in counts.items() if c > FLARE_GPU_MIN_FRACTION * len(samples)]
    return max(frequent) if frequent else max(samples)


# ------------------------------------------------------------------------------------- profiler


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as shells report it


def _signal_tree(pgid: int, processes: list, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for process in processes:  # descendants that left the group
        try:
            process.send_signal(sig)
        except Exception:
            pass


def profile_command(
    command: Sequence[str],
    interval: float = 0.1,
    gpu: int | str | None | bool = None,
    gpu_reader: GpuReader | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> ProfileResult:
    """Run ``command`` to completion, sampling resources every ``interval`` seconds.

    ``gpu``: None picks the device CUDA would use (CUDA_VISIBLE_DEVICES, else 0); an index or UUID
    picks one; False measures no GPU. ``gpu_reader`` replaces NVML (any object with the
    :class:`GpuReader` methods). SIGINT or SIGTERM received meanwhile ends the command's whole process
    tree (SIGTERM, then SIGKILL after 2 s); the result then says which signal interrupted it.
    """
    import psutil

    command = [str(c) for c in command]
    if not command:
        raise NsnError("no command to profile; give it after --")
    if not interval > 0:
        raise NsnError(f"--interval must be positive, got {interval}")

    reader = gpu_reader
    if reader is None and gpu is not False:
        reader = open_gpu_reader(None if gpu is None or gpu is True else gpu)

    cpu_meter = FlareCpuMeter()
    baseline_ram = psutil.virtual_memory().used / MB
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    try:
        # its own process group: Ctrl-C at the terminal reaches us, and we end the whole group
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        child = subprocess.Popen(command, env=env, cwd=cwd, **group)
    except FileNotFoundError:
        raise NsnError(f"command not found: {command[0]}") from None
    except PermissionError:
        raise NsnError(f"command not executable: {command[0]}") from None

    interrupt: dict[str, float] = {}  # signal number and time of the first SIGINT/SIGTERM
    previous_handlers: dict[int, object] = {}
    tree = _ProcessTree(child.pid, interval)

    def on_signal(signum, _frame) -> None:
        if not interrupt:
            interrupt.update(signal=signum, at=time.monotonic())
            _signal_tree(child.pid, tree.live(), signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, on_signal)

    result = ProfileResult(command, 0, interval, 0.0, started_at, system_ram_used_baseline_mb=baseline_ram)
    if reader is not None:
        result.gpu_backend, result.gpu_name, result.gpu_index = reader.backend, reader.name, reader.index
    samples = result.samples
    try:
        pidfd = os.pidfd_open(child.pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        pidfd = None
    status, usage = None, None
    killed_hard = False
    try:
        # the first sample covers the first interval (FLARE's CPU figure is a delta over the interval)
        next_t, last_t = t0 + interval, t0
        while True:
            now = time.monotonic()
            if now >= next_t:
                rss, tree_cpu, n_proc = tree.sample(now - last_t)
                last_t = now
                user, system, idle = cpu_meter.sample()
                samples["t"].append(now - t0)
                samples["rss_tree_mb"].append(rss)
                samples["n_processes"].append(n_proc)
                samples["system_ram_used_mb"].append(psutil.virtual_memory().used / MB)
                samples["cpu_user_percent"].append(user)
                samples["cpu_system_percent"].append(system)
                samples["cpu_idle_percent"].append(idle)
                samples["cpu_utilisation_percent"].append(100.0 - idle)
                samples["tree_cpu_percent"].append(tree_cpu)
                gpu_device, gpu_tree = None, None
                if reader is not None:
                    try:
                        gpu_device = reader.device_used_mb()
                        per_process = reader.process_used_mb()
                        if per_process is not None:
                            gpu_tree = sum(mb for pid, mb in per_process.items() if pid in tree.all_pids)
                    except Exception:  # a failed read is a gap (null), not a zero
                        gpu_device, gpu_tree = None, None
                samples["gpu_device_used_mb"].append(gpu_device)
                samples["gpu_tree_used_mb"].append(gpu_tree)
                next_t += interval
                if next_t <= now:  # fell behind (slow sample or suspended): do not burst
                    next_t = now + interval
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            status = None
            if interrupt and not killed_hard and time.monotonic() - interrupt["at"] > KILL_GRACE_S:
                _signal_tree(child.pid, tree.live(), signal.SIGKILL)
                killed_hard = True
            timeout = max(0.0, min(next_t - time.monotonic(), 0.25))
            if pidfd is not None:
                select.select([pidfd], [], [], timeout)
            else:
                time.sleep(min(timeout, 0.01))
    finally:
        wall = time.monotonic() - t0
        if pidfd is not None:
            os.close(pidfd)
        if status is None:  # interrupted by an exception in the loop: do not leave the child behind
            _signal_tree(child.pid, tree.live(), signal.SIGKILL)
            _, status, usage = os.wait4(child.pid, 0)
        child.returncode = _exit_code(status)  # reaped here; tell Popen so it does not wait again
        if interrupt:
            _signal_tree(child.pid, tree.live(), signal.SIGKILL)  # stragglers of the group
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if reader is not None and gpu_reader is None:
            reader.close()

    self_after = resource.getrusage(resource.RUSAGE_SELF)
    result.exit_code = child.returncode
    result.wall_time_s = wall
    result.interrupted = signal.Signals(int(interrupt["signal"])).name if interrupt else None
    # the kernel's per-process peak (VmHWM, read at each sample); ru_maxrss only where /proc is not readable,
    # since it includes the forking parent's peak from before exec
    result.peak_rss_largest_process_mb = tree.peak_hwm_mb if tree.peak_hwm_mb is not None \
        else usage.ru_maxrss / 1024.0  # KiB on Linux
    result.tree_cpu_time_s = usage.ru_utime + usage.ru_stime
    result.sampler_cpu_time_s = (self_after.ru_utime + self_after.ru_stime) - (
        self_before.ru_utime + self_before.ru_stime
    )
    return result


__all__ = [
    "FLARE_GPU_TOLERANCE_MB",
    "FlareCpuMeter",
    "GpuReader",
    "ProfileResult",
    "flare_gpu_max_mb",
    "open_gpu_reader",
    "profile_command",
]
