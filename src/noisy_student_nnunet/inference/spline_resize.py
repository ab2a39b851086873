"""Cubic-spline resizing of a 3D image one axis at a time: stock's 3D resampling at a fraction of its cost.

Stock resamples image data with ``skimage.transform.resize(order=3, mode='edge')``, which runs
``scipy.ndimage.zoom``: pad by 12 voxels (edge values), spline-prefilter along each axis, then evaluate the
tensor-product cubic B-spline at each output voxel from 4 x 4 x 4 = 64 coefficients. Both steps are separable:
the prefilter is a 1-D filter along each axis, and a tensor-product spline sampled on a grid can be evaluated
along one axis at a time (4 coefficients per output value and axis). Done axis by axis, each later axis works on
an array already shrunk along the earlier ones, and the 64-tap evaluation becomes 3 x 4 taps. The two in-plane
axes go first, plane by plane; axis 0, the strided one, last, on the shrunken stack.

In exact arithmetic the two orders of work give the same numbers (linear operations along different axes
commute; padding with edge values commutes with them too). In float64 they differ in the order of additions, by
about 1e-16 of the values' range. After the cast to float32 that rarely shows: on the 523 x 433 x 269 clinical CT
no voxel differs from stock's, and in the tests only values that are zero up to rounding do (about 1e-16 apart).
``benchmarks/bench_preprocessing.py`` times that CT's preprocessing against scipy's 64-tap kernel and stock's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: scipy.ndimage.zoom pads by this many voxels (mode 'nearest') before its spline prefilter
SPLINE_PAD = 12


def cubic_bspline_taps(n_in: int, n_out: int, pad: int = SPLINE_PAD) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, weights)``, each ``(n_out, 4)``: the 4 coefficients (indices into an axis padded by ``pad``) and
    cubic B-spline weights that give output sample ``i``, at scipy's grid-mode coordinate
    ``(i + 0.5) * n_in / n_out - 0.5`` (pixel centres, as skimage's resize asks for)."""
    zoom = n_in / n_out
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * zoom - 0.5 + pad
    start = np.floor(x)
    t = x - start
    weights = np.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6, (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6,
                        t ** 3 / 6], axis=1)
    indices = start.astype(np.intp)[:, None] - 1 + np.arange(4)
    return indices, weights


def edge_pad(array: np.ndarray, axis: int, pad: int = SPLINE_PAD, out: np.ndarray | None = None) -> np.ndarray:
    """float64 ``np.pad(array, pad, mode='edge')`` along ``axis`` only, into ``out`` when given."""
    shape = list(array.shape)
    shape[axis] += 2 * pad
    if out is None:
        out = np.empty(shape, dtype=np.float64)
    moved, source = np.moveaxis(out, axis, 0), np.moveaxis(array, axis, 0)
    moved[pad:pad + source.shape[0]] = source
    moved[:pad] = source[:1]
    moved[pad + source.shape[0]:] = source[-1:]
    return out


def prefilter(padded: np.ndarray, axis: int) -> None:
    """scipy's cubic spline prefilter of every line along ``axis``, in place (what ``zoom`` runs on its padded
    copy). Lines of 538 to 565 samples are slow where denormals are kept (see ``preprocessing``)."""
    from scipy.ndimage import spline_filter1d

    spline_filter1d(padded, 3, axis, output=padded, mode="nearest")


def evaluate_along(coefficients: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray,
                   out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``out`` (``coefficients``' shape with ``len(indices)`` along ``axis``) = the 4-tap spline sums along ``axis``;
    ``scratch``: a buffer of ``out``'s shape (reused: no allocation per call)."""
    shape = [1] * coefficients.ndim
    shape[axis] = len(indices)
    for k in range(4):
        np.take(coefficients, indices[:, k], axis=axis, out=scratch)
        if k == 0:
            np.multiply(scratch, weights[:, 0].reshape(shape), out=out)
        else:
            scratch *= weights[:, k].reshape(shape)
            out += scratch
    return out


class _PlaneResizer:
    """Resizes float64 planes along both their axes (each padded, prefiltered, evaluated) with buffers allocated
    once per thread: allocations above glibc's mmap threshold (1 MB in the OpenVINO predictor, ``heap.py``) would
    otherwise be page-faulted afresh for every plane."""

    def __init__(self, shape: tuple[int, int], new_shape: tuple[int, int],
                 taps: Sequence[tuple[np.ndarray, np.ndarray] | None]):
        self.taps = list(taps)
        self.buffers: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        current = list(shape)
        for axis in (0, 1):
            if self.taps[axis] is None:
                self.buffers.append(None)
                continue
            padded_shape = list(current)
            padded_shape[axis] += 2 * SPLINE_PAD
            current[axis] = new_shape[axis]
            self.buffers.append((np.empty(padded_shape), np.empty(current), np.empty(current)))

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        for axis in (0, 1):
            if self.taps[axis] is None:
                continue
            padded, out, scratch = self.buffers[axis]
            edge_pad(plane, axis, out=padded)
            prefilter(padded, axis)
            plane = evaluate_along(padded, axis, *self.taps[axis], out=out, scratch=scratch)
        return plane


def resize_cubic_separable(channel: np.ndarray, new_shape: Sequence[int],
                           run_blocks: Callable[[Callable[[int, int], None], int], None]) -> np.ndarray:
    """``skimage.transform.resize(channel.astype(float), new_shape, 3, mode='edge', anti_aliasing=False)`` before
    its last step (the clip to the input's range, which the caller does), float64, of a 3D ``channel`` without NaN,
    one axis at a time (equal up to float64 rounding: see the module's docstring;
    an axis whose length does not change is left alone, where stock filters and samples it at its own points,
    which gives the same values up to rounding, except that stock spreads a NaN along it).

    ``run_blocks(work, n)`` runs ``work(start, stop)`` over ``range(n)`` in blocks (threads, denormals flushed):
    first each input plane along axis 0 is resized in its two other axes (a plane at a time, in the cache), then
    the shrunken stack is prefiltered and evaluated along axis 0 over blocks of axis 1. Memory: that stack, padded
    along axis 0, and the output, in float64. Starting with axis 0 (as until e7bd30a) padded and filtered the whole
    input in float64 (8 bytes per input voxel) along its strided axis, newly allocated (and page-faulted) per case.
    """
    new_shape = tuple(int(s) for s in new_shape)
    taps = [cubic_bspline_taps(n, m) if n != m else None for n, m in zip(channel.shape, new_shape)]
    depth = channel.shape[0]
    stack = np.empty((depth, *new_shape[1:]), dtype=np.float64)

    def planes(a: int, b: int) -> None:
        resize_plane = _PlaneResizer(channel.shape[1:], new_shape[1:], taps[1:])
        for i in range(a, b):
            stack[i] = resize_plane(channel[i])

    run_blocks(planes, depth)
    if taps[0] is None:
        return stack
    padded = np.empty((depth + 2 * SPLINE_PAD, *new_shape[1:]), dtype=np.float64)

    def pad_and_filter(a: int, b: int) -> None:
        edge_pad(stack[:, a:b], 0, out=padded[:, a:b])
        prefilter(padded[:, a:b], 0)

    run_blocks(pad_and_filter, new_shape[1])
    stack = None  # the in-plane stack is released before the output is allocated
    output = np.empty(new_shape, dtype=np.float64)
    indices, weights = taps[0]

    def evaluate(a: int, b: int) -> None:
        scratch = np.empty((new_shape[0], b - a, new_shape[2]))
        evaluate_along(padded[:, a:b], 0, indices, weights, out=output[:, a:b], scratch=scratch)

    run_blocks(evaluate, new_shape[1])
    return output
