"""FLARE22 label conventions shared by phantoms, evaluation and the demo.

Label order, CSV column prefixes and NSD tolerances (mm) follow the challenge's evaluation code
(see docs/flare-evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Organ:
    label: int
    name: str  # the name used in dataset.json
    column: str  # the prefix of the official CSV columns (Liver_DSC, RK_DSC, ...)
    nsd_tolerance_mm: float
    z_range_only: bool = False  # scored only on the reference's labelled z-range (aorta, IVC, esophagus)


FLARE22_ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", 5.0),
    Organ(2, "right_kidney", "RK", 3.0),
    Organ(3, "spleen", "Spleen", 3.0),
    Organ(4, "pancreas", "Pancreas", 5.0),
    Organ(5, "aorta", "Aorta", 2.0, z_range_only=True),
    Organ(6, "inferior_vena_cava", "IVC", 2.0, z_range_only=True),
    Organ(7, "right_adrenal_gland", "RAG", 2.0),
    Organ(8, "left_adrenal_gland", "LAG", 2.0),
    Organ(9, "gallbladder", "Gallbladder", 2.0),
    Organ(10, "esophagus", "Esophagus", 3.0, z_range_only=True),
    Organ(11, "stomach", "Stomach", 5.0),
    Organ(12, "duodenum", "Duodenum", 7.0),
    Organ(13, "left_kidney", "LK", 3.0),
)


def flare22_dataset_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net dataset.json for the FLARE22 organs."""
    return {"background": 0, **{organ.name: organ.label for organ in FLARE22_ORGANS}}
