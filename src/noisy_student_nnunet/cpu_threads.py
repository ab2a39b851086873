"""How many threads torch should use on the CPU.

Stock ``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(multiprocessing.cpu_count())``: every
core of the machine, whatever the process may run on. A process restricted to fewer cores (``taskset``,
a container's or SLURM's CPU set, two folds trained side by side) then runs more OpenMP threads than
cores, and OpenMP's spin-waiting makes that several times slower (measured on 2 cores: one demo
epoch took 52 s with 2 threads on one core against 4.4 s alone). We use ``$NSN_NUM_THREADS``, else
``$OMP_NUM_THREADS`` (what PyTorch users set to limit threads), else the cores the process may run on.
"""

from __future__ import annotations

import os

from noisy_student_nnunet.errors import NsnError

ENV_VAR = "NSN_NUM_THREADS"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 matrix work natively (AMX-BF16 or AVX512-BF16).

    Elsewhere torch emulates bf16 and autocast is slower than fp32. The checks are private torch
    functions (present in 2.14); without them we say no.
    """
    import torch

    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and bool(check()) for check in checks)
