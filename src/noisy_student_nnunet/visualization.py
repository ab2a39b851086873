"""Pictures of segmentations: CT slices with the reference and each model's labels overlaid.

Slices are taken after reorienting every volume to LPS (SimpleITK's ``DICOMOrient``), so scanner
orientations (the phantoms have several) all show the same way: axial slices with the patient's left on
the image's right and anterior at the top (radiological convention), coronal slices with the head at the
top, pixels drawn with their physical aspect ratio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noisy_student_nnunet.flare import FLARE22_ORGANS

#: label -> RGB of ITK-SNAP's default label table (the viewer's first 13 colours, in which FLARE22's
#: organs are usually shown: liver red, right kidney green, spleen blue, ...)
ORGAN_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0), 5: (0, 255, 255), 6: (255, 0, 255),
    7: (255, 239, 213), 8: (0, 0, 205), 9: (205, 133, 63), 10: (210, 180, 140), 11: (102, 205, 170),
    12: (0, 0, 128), 13: (0, 139, 139),
}
#: soft-tissue window for the CT underlay (HU)
WINDOW = (-160.0, 240.0)


@dataclass
class OrientedVolume:
    """A volume as a (z, y, x) array in LPS orientation, with its (z, y, x) spacing in mm."""

    array: np.ndarray
    spacing_zyx: tuple[float, float, float]


def read_lps(path: str | os.PathLike) -> OrientedVolume:
    import SimpleITK as sitk

    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return OrientedVolume(sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing())))


def choose_slices(reference: np.ndarray) -> tuple[int, int]:
    """The axial and the coronal slice that show the most organs (ties: the most labelled voxels)."""

    def best(axis: int) -> int:
        moved = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1)
        organs = np.array([np.unique(row[row > 0]).size for row in moved])
        voxels = (moved > 0).sum(axis=1)
        return int(np.lexsort((voxels, organs))[-1])

    return best(0), best(1)


def overlay(ct: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """An RGB picture (float, 0..1) of a CT slice in the soft-tissue window with labels blended in."""
    low, high = WINDOW
    grey = np.clip((ct.astype(np.float32) - low) / (high - low), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for label, colour in ORGAN_COLOURS.items():
        mask = labels == label
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32) / 255
    return rgb


def plot_segmentation_slices(image: str | os.PathLike, reference: str | os.PathLike,
                             predictions: dict[str, str | os.PathLike], output: str | os.PathLike,
                             title: str = "") -> Path:
    """One column per label map (reference first, then ``predictions`` in order), axial row and coronal row.

    Written atomically (temporary name, then rename); returns ``output``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ct = read_lps(image)
    columns = {"reference": read_lps(reference).array, **{name: read_lps(p).array for name, p in predictions.items()}}
    for name, labels in columns.items():
        if labels.shape != ct.array.shape:
            raise ValueError(f"{name}: label map shape {labels.shape} differs from the image's {ct.array.shape}")
    axial, coronal = choose_slices(columns["reference"])
    dz, dy, dx = ct.spacing_zyx
    figure, axes = plt.subplots(2, len(columns), figsize=(2.6 * len(columns), 5.6), squeeze=False)
    for column, (name, labels) in enumerate(columns.items()):
        axes[0, column].imshow(overlay(ct.array[axial], labels[axial]), aspect=dy / dx, interpolation="nearest")
        # coronal: z runs from inferior to superior in LPS; flip it so that the head is at the top
        axes[1, column].imshow(overlay(ct.array[::-1, coronal], labels[::-1, coronal]), aspect=dz / dx,
                               interpolation="nearest")
        axes[0, column].set_title(name, fontsize=9)
        for row in range(2):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    axes[0, 0].set_ylabel(f"axial slice {axial}", fontsize=8)
    axes[1, 0].set_ylabel(f"coronal slice {coronal}", fontsize=8)
    present = sorted({int(v) for labels in columns.values() for v in np.unique(labels) if v > 0} & set(ORGAN_COLOURS))
    names = {organ.label: organ.column for organ in FLARE22_ORGANS}
    handles = [Patch(color=np.asarray(ORGAN_COLOURS[label]) / 255, label=names.get(label, str(label)))
               for label in present]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}.png")
    try:
        figure.savefig(partial, dpi=110)
    finally:
        plt.close(figure)
    os.replace(partial, output)
    return output
