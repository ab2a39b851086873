"""CPU work outside torch: how many threads it gets, and the resampling cut into blocks, one thread each.

The work is numpy/scipy C code that releases the GIL, so threads run it side by side.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


def cpu_work_threads() -> int:
    """Threads for this process's CPU work outside torch: torch's count, at most the cores it may run on."""
    import torch

    from noisy_student_nnunet.cpu_threads import available_cores

    return min(torch.get_num_threads(), available_cores())


def flush_denormals_in_this_thread() -> bool:
    """Treat float denormals as zero in the calling thread (x86 FTZ and DAZ; torch sets the thread's MXCSR).

    scipy's cubic spline prefilter starts each line (mode 'nearest') with a sum over the line that multiplies by
    ``z**n`` (``z = -0.268``, ``n`` the line's length). For lines of 538 to 565 samples that power is a float64
    denormal, which x86 computes in microcode, in every term; longer lines pay a few such terms
    (``benchmarks/bench_spline_prefilter.py``). Flushed, those terms become zero instead of about 1e-310, far below
    the last bit of any coefficient of normal size. Float32 inputs below 1.2e-38 in magnitude are then read as zero
    too; both are far below float64 rounding of the values around them (tested against stock's resampling)."""
    try:
        import torch

        return bool(torch.set_flush_denormal(True))
    except ImportError:
        return False


def in_blocks(work: Callable[[int, int], object], n: int, threads: int, flush_denormals: bool = False) -> None:
    """``work(start, stop)`` over ``range(n)`` cut into at most ``threads`` nearly equal blocks, each in a thread of
    its own where there are several; exceptions propagate.

    ``flush_denormals``: the work runs in pool threads that flush denormals to zero
    (:func:`flush_denormals_in_this_thread`), even for one block, so the caller's thread keeps its float mode."""
    edges = np.linspace(0, n, max(1, min(threads, n)) + 1).round().astype(int)
    blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if len(blocks) <= 1 and not flush_denormals:
        for a, b in blocks:
            work(a, b)
        return

    def in_thread(a: int, b: int) -> None:
        if flush_denormals:
            flush_denormals_in_this_thread()
        work(a, b)

    with ThreadPoolExecutor(max_workers=max(1, len(blocks)), thread_name_prefix="nsn-blocks") as pool:
        for future in [pool.submit(in_thread, a, b) for a, b in blocks]:
            future.result()
