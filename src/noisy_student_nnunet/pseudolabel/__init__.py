"""Pseudo-labels from the teacher ensemble (paper, section 2.2): ``nsn pseudolabel``.

- :mod:`.ensemble`: every teacher fold's sliding window; softmax probabilities averaged on the fly.
- :mod:`.confidence`: per-case confidence, fold agreement, organ volumes; case filter; ignore label.
- :mod:`.dataset`: the output dataset on disk (manifest, per-case markers, atomic writes, export).
- :mod:`.run`: sharded, restartable runs (:func:`run_part`) and the final step (:func:`finalize`).

Import torch/nnU-Net-heavy pieces from the submodules; this module stays light.
"""

from noisy_student_nnunet.pseudolabel.run import (  # noqa: F401
    FinalizeResult,
    PartResult,
    PseudolabelSettings,
    finalize,
    list_input_cases,
    run_part,
)

__all__ = ["PseudolabelSettings", "run_part", "finalize", "PartResult", "FinalizeResult", "list_input_cases"]
