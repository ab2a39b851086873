"""Our nnU-Net trainers. Import them from here; nnU-Net finds them through the shim in ``nnunet_ext``."""

from noisy_student_nnunet.trainers.finetune import NoisyStudentFinetuneTrainer
from noisy_student_nnunet.trainers.student import NoisyStudentTrainer
from noisy_student_nnunet.trainers.teacher import NoisyStudentTeacherTrainer

__all__ = ["NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"]
