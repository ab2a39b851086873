"""Large allocations straight from the kernel and back: the OpenVINO predictor's peak RAM without the heap's slack.

glibc serves an allocation below its mmap threshold from the heap, and the threshold rises (up to 32 MB) each time
a larger mapped block is freed. The predictor allocates and frees arrays of a few to a few hundred MB per case
and per patch (resampling, the producer thread's patch copies, per-class temporaries), so after the first ones
they come from the heap, whose freed space glibc keeps rather than returning it. On a clinical CT (523 x 433 x
269, 12 patches, 2 cores of an EPYC with AVX512-BF16) a fixed 1 MB threshold lowered the OpenVINO backend's peak
from 1979 to 1887 MB at no measurable cost in time (22.7 s against 21.5-22.8 s). The torch backend's activations
are large allocations too: mapped afresh on every layer they cost page faults, 34.7 s against 30.0 s, for 14 MB;
so the predictor fixes the threshold with OpenVINO only (whose buffers are allocated once). What is allocated and
freed again and again must stay below the threshold: adding each patch to the fp16 accumulators one class at a time,
torch's fp32 cast temporaries (7 MB each) cost 68 ms per patch in page faults (13 ms without;
benchmarks/bench_case_overheads.py), until the sliding window added patches in small steps (now 128 KB of fp32)
(``predictor.ADD_STEP_ELEMENTS``, ``_add_weighted_patch_``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt``
M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes are mapped (glibc's initial threshold is 128 KiB, its ceiling 32 MiB)
MMAP_THRESHOLD_BYTES = 1024 * 1024


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl has no mallopt
        return False
