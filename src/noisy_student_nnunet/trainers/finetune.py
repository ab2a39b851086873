"""The labeled-only fine-tune (placeholder until issue 4: behaves like the teacher)."""

from noisy_student_nnunet.trainers.base import RecipeTrainer


class NoisyStudentFinetuneTrainer(RecipeTrainer):
    schedule_key = "finetune"
    augmentation_key = "student_augmentation"
