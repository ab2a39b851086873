"""Shim found by nnU-Net's trainer discovery through ``nnUNet_extTrainer``.

nnU-Net imports every module in this folder as a top-level name, so this folder holds only this
re-export. The classes live in :mod:`noisy_student_nnunet.trainers` (their ``__module__`` is a real,
importable path, which DDP's spawned workers need).
"""

from noisy_student_nnunet.trainers import (  # noqa: F401
    NoisyStudentFinetuneTrainer,
    NoisyStudentTeacherTrainer,
    NoisyStudentTrainer,
)
