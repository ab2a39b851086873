"""How a scanner records the phantom: orientation on disk, image noise and in-plane blur."""

from __future__ import annotations

import numpy as np

# How axial abdominal CT arrives as NIfTI (ITK direction, row-major) and how often a phantom case is
# stored so: DICOM's LPS as ITK writes it, the same with slices stored head to feet, and RAS as some
# converters write it. The anatomy stays physically correct; only the array order changes, which is why
# a phantom dataset asks nnU-Net to read it with its reorienting reader (see write_phantom_dataset).
SCANNER_ORIENTATIONS: dict[str, tuple[tuple[float, ...], float]] = {
    "LPS": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0.5),
    "LPI": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0), 0.25),
    "RAS": ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), 0.25),
}
#: nnU-Net's reader for the phantom datasets: it turns every case to RAS on read and predictions back on
#: write, so a network sees one anatomical orientation whatever the scanner stored
PHANTOM_READER_WRITER = "NibabelIOWithReorient"


def axis_map(direction) -> tuple[list[int], list[float], np.ndarray]:
    """For an axis-aligned ITK direction: the physical axis and sign of each index axis (x, y, z)."""
    d = np.asarray(direction, float).reshape(3, 3)
    perm, sign = [], []
    for a in range(3):
        col = d[:, a]
        p = int(np.argmax(np.abs(col)))
        if not np.isclose(abs(col[p]), 1.0) or not np.allclose(np.delete(col, p), 0.0):
            raise ValueError("direction must be an axis-aligned (signed permutation) 3x3 matrix")
        perm.append(p)
        sign.append(float(np.sign(col[p])))
    if sorted(perm) != [0, 1, 2]:
        raise ValueError("direction must be an axis-aligned (signed permutation) 3x3 matrix")
    return perm, sign, d


def blur_inplane(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing along y and x."""
    out = a * 0.5
    out[:, 1:] += 0.25 * a[:, :-1]
    out[:, :-1] += 0.25 * a[:, 1:]
    out[:, 0] += 0.25 * a[:, 0]
    out[:, -1] += 0.25 * a[:, -1]
    b = out * 0.5
    b[:, :, 1:] += 0.25 * out[:, :, :-1]
    b[:, :, :-1] += 0.25 * out[:, :, 1:]
    b[:, :, 0] += 0.25 * out[:, :, 0]
    b[:, :, -1] += 0.25 * out[:, :, -1]
    return b
