"""scipy's cubic spline prefilter per sample, by line length, with denormals kept and flushed (issue 20).

    python benchmarks/bench_spline_prefilter.py [--lengths 520 536 540 550 565 570 600 800] [--lines 20000]

Stock's 3D resampling (skimage ``resize``, order 3) runs ``scipy.ndimage.spline_filter1d(mode='nearest')`` along each
axis of the image padded by 12 voxels on each side. Its start-up sum multiplies by ``z**n`` (``z = -0.268``, ``n``
the line's length), a float64 denormal for lines of 538 to 565 samples; x86 computes denormals in microcode. The
predictor's resampling threads flush denormals to zero (``blocks.flush_denormals_in_this_thread``); this
prints what that is worth per line length, and checks that both give the same coefficients.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from _common import machine, table


def ns_per_sample(lines: np.ndarray, flush: bool) -> tuple[float, np.ndarray]:
    """Filter a copy of ``lines`` along their last axis in a fresh thread; nanoseconds per sample and the result."""
    from scipy.ndimage import spline_filter1d

    from noisy_student_nnunet.inference.blocks import flush_denormals_in_this_thread

    work = lines.copy()

    def run() -> float:
        if flush:
            flush_denormals_in_this_thread()
        started = time.perf_counter()
        spline_filter1d(work, 3, -1, output=work, mode="nearest")
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=1) as pool:
        seconds = pool.submit(run).result()
    return seconds / lines.size * 1e9, work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[520, 536, 540, 550, 565, 570, 600, 800])
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args(argv)
    rows = []
    for n in args.lengths:
        lines = np.random.default_rng(n).standard_normal((args.lines, n))
        kept, a = ns_per_sample(lines, flush=False)
        flushed, b = ns_per_sample(lines, flush=True)
        rows.append({"n": n, "image": n - 24, "kept": kept, "flushed": flushed, "x": kept / flushed,
                     "equal": bool(np.array_equal(a, b))})
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/bench_spline_prefilter.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(table(rows, [("n", "samples per line"), ("image", "image width (padded by 12 + 12)"),
                       ("kept", "ns/sample, denormals kept"), ("flushed", "ns/sample, flushed"),
                       ("x", "x faster flushed"), ("equal", "same coefficients")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
