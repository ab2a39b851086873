"""Synthetic abdominal CT phantoms with the 13 FLARE22 organs, written as nnU-Net raw datasets.

Why: the pipeline (teachers, pseudo-labels, student, low-footprint inference, evaluation) needs data
that looks like abdominal CT to nnU-Net's planner and is hard enough that a small network trained
briefly stays well below perfect Dice, so that a semi-supervised gain can show. Real FLARE22 data is
large and licensed; these phantoms take tens of milliseconds each and depend only on a seed.

How: the anatomy is defined in *reference millimetres* (X towards the patient's left, Y towards
posterior, Z towards superior; an adult abdomen, body about 340 mm wide) as smooth implicit shapes
(deformed ellipsoids and tubes along splines) whose surfaces are perturbed by smooth random fields.
A case maps the reference frame onto its voxel grid: small cases fit a scaled-down body into the
field of view (realistic spacing and HU, fewer voxels); ``body_scale`` gives real anatomical size
(``--clinical``: 512x512xN). Each shape is evaluated only inside its bounding box, in slabs, so a
small case takes tens of milliseconds and a clinical one a few seconds.

Array order is (z, y, x) = (inferior->superior, anterior->posterior, patient right->left): with the
identity direction that is standard axial CT in ITK/LPS. Other axis-aligned directions reorient the
array so that the anatomy stays physically correct; a phantom dataset stores its cases in several scanner
orientations (SCANNER_ORIENTATIONS) and reads them with nnU-Net's reorienting reader.

Modules: ``geometry`` (noise fields, canvas, implicit shapes), ``anatomy`` (the normal abdomen), ``pathology``
(lesions inside organs), ``acquisition`` (orientation, noise, kernel, offset), ``cohorts`` (named distributions of
pathology and acquisition, mixes and the ``iid`` / ``shift`` settings), ``generator`` (one case: ``make_phantom``),
``cases`` (what each case of a dataset is) and ``writing`` (``write_phantom_dataset``).
"""

from noisy_student_nnunet.phantoms.acquisition import PHANTOM_READER_WRITER, SCANNER_ORIENTATIONS
from noisy_student_nnunet.phantoms.anatomy import ORGAN_LABELS
from noisy_student_nnunet.phantoms.cases import (CLINICAL_DEFAULTS, DROP_WEIGHTS, MAX_VOXELS_PER_AXIS,
                                                 MIN_INPLANE_VOXELS, MIN_SLICES, SMALL_DEFAULTS, CaseSpec,
                                                 plan_cases)
from noisy_student_nnunet.phantoms.generator import Phantom, make_phantom
from noisy_student_nnunet.phantoms.cohorts import COHORTS, MIXES, SETTINGS, Condition, Lesion
from noisy_student_nnunet.phantoms.writing import (BYTES_PER_VOXEL, FIXED_BYTES, check_memory, dataset_folder_name,
                                                   remake_case, write_phantom_dataset)

__all__ = ["BYTES_PER_VOXEL", "CLINICAL_DEFAULTS", "DROP_WEIGHTS", "FIXED_BYTES", "MAX_VOXELS_PER_AXIS",
           "MIN_INPLANE_VOXELS", "MIN_SLICES", "ORGAN_LABELS", "PHANTOM_READER_WRITER", "SCANNER_ORIENTATIONS",
           "SMALL_DEFAULTS", "COHORTS", "MIXES", "SETTINGS", "CaseSpec", "Condition", "Lesion", "Phantom",
           "check_memory", "dataset_folder_name", "make_phantom", "plan_cases", "remake_case", "write_phantom_dataset"]
