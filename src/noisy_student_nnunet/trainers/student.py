"""The noisy student (placeholder until issue 4: behaves like the teacher)."""

from noisy_student_nnunet.trainers.base import RecipeTrainer


class NoisyStudentTrainer(RecipeTrainer):
    schedule_key = "training"
    augmentation_key = "student_augmentation"
