"""The teacher: the low-footprint nnU-Net trained on labeled data with Table 4's augmentation."""

from noisy_student_nnunet.trainers.base import RecipeTrainer


class NoisyStudentTeacherTrainer(RecipeTrainer):
    """Table 3 protocol, Table 4 augmentation, labeled cases only (paper, section 3.3)."""

    schedule_key = "training"
    augmentation_key = "teacher_augmentation"
