"""Disease in the phantoms: focal lesions inside organs, labeled as their organ (as FLARE labels them).

HU per contrast phase (native, arterial, portal venous) follow the usual appearance: metastases hypodense with
an enhancing rim, hepatocellular carcinoma bright in the arterial phase and washed out in the portal phase,
cysts water-dense in every phase, renal cell carcinoma strongly and unevenly enhancing, pancreatic
adenocarcinoma hypodense against the enhancing pancreas. Organ-level changes (hepatomegaly, splenomegaly,
atrophic kidney) are organ scale factors that the anatomy applies; a missing kidney is a dropped organ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from noisy_student_nnunet.phantoms.anatomy import ORGAN_LABELS
from noisy_student_nnunet.phantoms.cohorts import Lesion
from noisy_student_nnunet.phantoms.geometry import Canvas, Noise, ellipsoid, ellipsoid_box


@dataclass(frozen=True)
class LesionKind:
    """Appearance of a lesion kind: core and rim HU per phase (native, arterial, portal), texture in HU."""

    organ: str
    core_hu: tuple[float, float, float]
    rim_hu: tuple[float, float, float] | None = None
    texture_hu: float = 6.0


LESION_KINDS: dict[str, LesionKind] = {
    "liver_metastasis": LesionKind("liver", (38, 55, 70), rim_hu=(45, 100, 105), texture_hu=8.0),
    "liver_hcc": LesionKind("liver", (45, 125, 90), texture_hu=12.0),
    "liver_cyst": LesionKind("liver", (6, 6, 6), texture_hu=3.0),
    "kidney_cyst": LesionKind("kidney", (8, 8, 8), texture_hu=3.0),
    "kidney_tumour": LesionKind("kidney", (35, 150, 110), texture_hu=22.0),
    "pancreas_adenocarcinoma": LesionKind("pancreas", (38, 60, 70), texture_hu=8.0),
    "pancreas_cyst": LesionKind("pancreas", (10, 12, 12), texture_hu=3.0),
}
_RIM_MM = 2.5


def lesion_hu(kind: LesionKind, phase: int, strength: float, rim: bool = False) -> float:
    """HU of a lesion's core (or rim) in ``phase``, its enhancement scaled like the organs' (``strength``)."""
    values = kind.rim_hu if rim and kind.rim_hu is not None else kind.core_hu
    return values[0] + strength * (values[phase] - values[0])


def paint_lesions(canvas: Canvas, lesions: Sequence[Lesion], phase: int, strength: float,
                  rng: np.random.Generator) -> int:
    """Paint each lesion at a random point of its organ, inside the organ only (its label stays the organ's).

    Returns how many were placed: a lesion whose organ is absent from this canvas is skipped."""
    placed = 0
    for lesion in lesions:
        kind = LESION_KINDS[lesion.kind]
        label = ORGAN_LABELS[lesion.organ]
        inside = np.flatnonzero(canvas.label == label)
        if inside.size == 0:
            continue
        z, y, x = np.unravel_index(inside[int(rng.integers(inside.size))], canvas.shape)
        center = np.array([canvas.z[z], canvas.y[y], canvas.x[x]], float)
        semi = 0.5 * lesion.diameter_mm * rng.uniform(0.8, 1.2, 3)
        box = ellipsoid_box(center, semi, 2.0)
        texture = Noise(rng, box, max(2.0, 0.5 * min(canvas.voxel)))
        core = lesion_hu(kind, phase, strength)
        rim = lesion_hu(kind, phase, strength, rim=True)

        def values(ch, f, core=core, rim=rim, texture=texture, amp=kind.texture_hu):
            base = np.where(f > -_RIM_MM, np.float32(rim), np.float32(core))
            return base + np.float32(amp) * texture(ch.z, ch.y, ch.x)

        canvas.paint(box, lambda ch, c=center, s=semi: ellipsoid(ch, c, s), values,
                     where=lambda ch, lab=label: ch.label == lab)
        placed += 1
    return placed
