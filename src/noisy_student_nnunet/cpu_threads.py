"""How many threads torch should use on the CPU.

Stock ``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(multiprocessing.cpu_count())``: every
core of the machine, whatever the process may run on. A process restricted to fewer cores (``taskset``,
a container's or SLURM's CPU set, two folds trained side by side) then runs more OpenMP threads than
cores, and OpenMP's spin-waiting makes that several times slower (measured on 2 cores: one demo
epoch took 52 s with 2 threads on one core against 4.4 s alone). We use ``$NSN_NUM_THREADS``, else
``$OMP_NUM_THREADS`` (what PyTorch users set to limit threads), else the cores the process may run on.
"""

from __future__ import annotations

import math
import os

from noisy_student_nnunet.errors import NsnError

ENV_VAR = "NSN_NUM_THREADS"


def _cgroup_quota_cpus() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``; ``docker --cpus``), None without."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
            quota, period = int(q.read()), int(p.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its affinity mask (else the machine's count), bounded by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota_cpus()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def cpu_thread_count(environ: dict[str, str] | None = None) -> int:
    """``$NSN_NUM_THREADS``, else ``$OMP_NUM_THREADS`` (positive integers), else :func:`available_cores`."""
    environ = os.environ if environ is None else environ
    for var in (ENV_VAR, "OMP_NUM_THREADS"):
        value = environ.get(var, "").strip()
        if not value:
            continue
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise NsnError(f"{var} must be a positive integer, got {value!r}")
        return threads
    return available_cores()
