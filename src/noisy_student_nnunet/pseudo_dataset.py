"""Old import path, kept for code not yet moved: this module's two halves now live where their side is named.

- the student's side (find and check the pseudo-labeled dataset): :mod:`noisy_student_nnunet.trainers.pseudo_source`;
- preprocessing a raw dataset with another dataset's plans (``nsn pseudolabel --stock-preprocessing``, tests,
  benchmarks): :mod:`noisy_student_nnunet.plans_transfer`.

Nothing in the package imports this; remove it once ``benchmarks/student_ablations.py`` imports from the above.
"""

from noisy_student_nnunet.plans_transfer import check_same_labels, preprocess_with_plans  # noqa: F401
from noisy_student_nnunet.trainers.pseudo_source import (  # noqa: F401
    ENV_VAR,
    PseudoDataset,
    check_same_plans,
    locate_pseudo_dataset,
    pseudo_dataset_setting,
    resolve_dataset_name,
)
