"""How many threads the network gets on the CPU: the cores this process may run on, no more, no fewer.

Stock ``nnUNetv2_predict -device cpu`` sets ``torch.set_num_threads(multiprocessing.cpu_count())``, the host's
logical CPU count, which ignores the affinity mask (``taskset``, ``docker --cpuset-cpus``, SLURM) and CPU quotas
(``docker --cpus``): more threads than cores, and oversubscribed OpenMP convolutions run much slower. Its
predictor then caps the network at ``nnUNet_def_n_proc`` threads (8 by default), which leaves most cores of a
large machine idle. Here: the cores the process may use (affinity, then a cgroup quota), or OMP_NUM_THREADS
where the user set it.
"""

from __future__ import annotations

import math
import os


def _cgroup_quota_cpus() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), None without a quota."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
            quota, period = int(q.read()), int(p.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Logical CPUs this process may run on: the affinity mask, bounded by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def network_threads() -> int:
    """Threads for the network on the CPU: OMP_NUM_THREADS when set to a number, else :func:`usable_cpus`."""
    try:
        explicit = int(os.environ.get("OMP_NUM_THREADS", ""))
        if explicit > 0:
            return explicit
    except ValueError:
        pass
    return usable_cpus()
