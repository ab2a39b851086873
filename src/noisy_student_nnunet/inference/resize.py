"""Resampling at low memory: label maps by nearest neighbour, class scores slab by slab.

Everything here works on torch tensors on whatever device they live on (CPU or CUDA), so the CUDA path of the
predictor keeps argmax and resizing on the GPU. Source coordinates use pixel centres (``align_corners=False``),
the convention of stock nnU-Net's ``resample_data_or_seg`` (skimage ``resize`` / scipy ``zoom`` with
``grid_mode=True`` in-plane, ``map_coordinates`` on ``(o + 0.5) * in / out - 0.5`` out of plane).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy.ndimage import map_coordinates

NEAREST = "nearest"
LINEAR = "linear"


def nearest_source_indices(n_in: int, n_out: int) -> np.ndarray:
    """Input index for every output index along one axis.

    Same rounding as stock's order-0 out-of-plane step (scipy ``map_coordinates(order=0, mode='nearest')`` on
    ``in / out * (o + 0.5) - 0.5``), so nearest neighbour agrees with stock exactly along that axis.
    """
    if n_in == n_out:
        return np.arange(n_out, dtype=np.int64)
    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
    idx = map_coordinates(np.arange(n_in, dtype=np.float64), [coords], order=0, mode="nearest")
    return np.clip(np.rint(idx), 0, n_in - 1).astype(np.int64)


def linear_source_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, w)``: output o = (1 - w) * in[i0] + w * in[i1]; edges clamp (scipy mode 'nearest')."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (float(n_in) / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, x - i0


def resize_labels_nearest(labels, new_shape: Sequence[int]):
    """Nearest-neighbour resize of an integer label map (numpy array or torch tensor, any device).

    Returns the same kind as given. CPU: numpy ``take`` per axis (much faster than torch's ``index_select`` for
    uint8 and immune to thread contention); CUDA: ``index_select`` on the device. Axes that shrink go first so
    intermediates stay small.
    """
    new_shape = [int(s) for s in new_shape]
    assert labels.ndim == len(new_shape), (tuple(labels.shape), new_shape)
    order = sorted(range(labels.ndim), key=lambda d: new_shape[d] / labels.shape[d])
    on_gpu = isinstance(labels, torch.Tensor) and labels.device.type != "cpu"
    out = labels if on_gpu or not isinstance(labels, torch.Tensor) else labels.numpy()
    for dim in order:
        if out.shape[dim] == new_shape[dim]:
            continue
        idx = nearest_source_indices(out.shape[dim], new_shape[dim])
        if on_gpu:
            out = out.index_select(dim, torch.from_numpy(idx).to(out.device))
        else:
            out = np.take(out, idx, axis=dim)
    if isinstance(labels, torch.Tensor) and not on_gpu:
        return torch.from_numpy(np.ascontiguousarray(out))
    return out


def argmax_channels(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax`` over dim 0 (first maximum wins, as numpy and torch), as uint8/int32 labels.

    CPU: a running maximum over channels in the scores' own dtype with torch's element-wise kernels (in its
    threads): one pass per channel, no int64 index array. Comparisons and maxima round nothing, so every dtype
    gives the exact argmax. torch's CPU argmax over the outer dim is several times slower, and numpy compares
    float16 one element at a time (``benchmarks/bench_case_overheads.py`` times the three). CUDA: ``torch.argmax``.
    Where a score is NaN the label may differ from torch's and numpy's (they return the NaN's channel): such a
    voxel has no meaningful label either way.
    """
    if out is None:
        out = torch.empty(scores.shape[1:], dtype=torch.uint8 if scores.shape[0] <= 256 else torch.int32,
                          device=scores.device)
    if scores.device.type != "cpu":
        out.copy_(torch.argmax(scores, 0))
        return out
    out.zero_()
    best = scores[0].clone()
    better = torch.empty(scores.shape[1:], dtype=torch.bool)
    for c in range(1, scores.shape[0]):
        torch.gt(scores[c], best, out=better)
        out.masked_fill_(better, c)
        torch.maximum(best, scores[c], out=best)
    return out


def _interp_axis(x: torch.Tensor, dim: int, n_out: int, mode: str) -> torch.Tensor:
    """1-D nearest or linear interpolation of a float tensor along ``dim``."""
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    if mode == NEAREST:
        idx = torch.from_numpy(nearest_source_indices(n_in, n_out)).to(x.device)
        return x.index_select(dim, idx)
    i0, i1, w = linear_source_weights(n_in, n_out)
    shape = [1] * x.ndim
    shape[dim] = n_out
    w_t = torch.from_numpy(w).to(device=x.device, dtype=x.dtype).view(shape)
    lo = x.index_select(dim, torch.from_numpy(i0).to(x.device))
    hi = x.index_select(dim, torch.from_numpy(i1).to(x.device))
    hi -= lo
    hi *= w_t
    lo += hi
    return lo


def _interp_inplane(x: torch.Tensor, new_hw: Sequence[int], modes: Sequence[str]) -> torch.Tensor:
    """Resample the last two axes of ``(C, R, H, W)``; bilinear uses torch's kernel (same pixel-centre rule)."""
    if tuple(x.shape[-2:]) == tuple(new_hw):
        return x
    if modes[0] == LINEAR and modes[1] == LINEAR:
        return torch.nn.functional.interpolate(x, size=tuple(int(s) for s in new_hw), mode="bilinear",
                                               align_corners=False)
    x = _interp_axis(x, 2, int(new_hw[0]), modes[0])
    return _interp_axis(x, 3, int(new_hw[1]), modes[1])


def _rows(x: torch.Tensor, dim: int, rows: np.ndarray) -> torch.Tensor:
    """``x`` restricted to the sorted indices ``rows`` along ``dim``: a view when they are contiguous."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return x.narrow(dim, int(rows[0]), len(rows))
    return x.index_select(dim, torch.from_numpy(rows).to(x.device))


def resample_scores_to_labels(
    scores: torch.Tensor,
    new_shape: Sequence[int],
    modes: Sequence[str],
    to_labels: Callable[[torch.Tensor], torch.Tensor],
    out_dtype: torch.dtype = torch.uint8,
    slab_bytes: int = 64 * 1024**2,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Resample ``(C, X, Y, Z)`` class scores to ``new_shape`` and turn them into labels, one slab of X at a time.

    ``modes`` gives 'linear' or 'nearest' per spatial axis (linear interpolation is separable, so the slab result
    equals resampling the whole array). Each slab is computed in float32 and cast back to ``scores.dtype`` before
    ``to_labels`` (argmax), as stock stores its resampled array in the logits' dtype. With 'nearest' along X,
    output rows that copy the same input row get that row's labels (one argmax per input row). Memory: the
    labels plus a few float32 slabs of about ``slab_bytes``.
    """
    c, n0 = scores.shape[0], scores.shape[1]
    new_shape = [int(s) for s in new_shape]
    out = torch.empty(new_shape, dtype=out_dtype, device=scores.device)
    rows_per_slab = max(1, int(slab_bytes // (4 * c * new_shape[1] * new_shape[2])))
    if modes[0] == NEAREST:
        src0 = nearest_source_indices(n0, new_shape[0])
    else:
        i0, i1, w0 = linear_source_weights(n0, new_shape[0])
    for a in range(0, new_shape[0], rows_per_slab):
        b = min(new_shape[0], a + rows_per_slab)
        if modes[0] == NEAREST:
            rows, pos = np.unique(src0[a:b], return_inverse=True)
            x = _interp_inplane(_rows(scores, 1, rows).float(), new_shape[1:], modes[1:])
            labels = to_labels(x.to(scores.dtype)).to(out_dtype)
            del x
            if out.device.type == "cpu":
                out.numpy()[a:b] = labels.numpy()[pos]
            else:
                out[a:b] = labels.index_select(0, torch.from_numpy(pos.astype(np.int64)).to(out.device))
        else:
            n = b - a
            rows, pos = np.unique(np.concatenate([i0[a:b], i1[a:b]]), return_inverse=True)
            x = _interp_inplane(_rows(scores, 1, rows).float(), new_shape[1:], modes[1:])
            lo = _rows(x, 1, pos[:n].astype(np.int64)) if np.all(np.diff(pos[:n]) == 1) else \
                x.index_select(1, torch.from_numpy(pos[:n].astype(np.int64)).to(x.device))
            lo = lo.clone()
            hi = x.index_select(1, torch.from_numpy(pos[n:].astype(np.int64)).to(x.device))
            del x
            w = torch.from_numpy(w0[a:b]).to(device=lo.device, dtype=lo.dtype).view(1, -1, 1, 1)
            hi -= lo
            hi *= w
            lo += hi
            del hi
            out[a:b] = to_labels(lo.to(scores.dtype)).to(out_dtype)
            del lo
        if progress is not None:
            progress(b - a)
    return out
