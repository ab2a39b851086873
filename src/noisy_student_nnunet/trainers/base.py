"""The recipe-driven base of our three trainers.

It only wires a recipe (see :mod:`noisy_student_nnunet.recipe`) into nnU-Net's hooks: the training
protocol (epochs, iterations, learning rate, optimizer, poly exponent, deep supervision) and the
augmentation table. Subclasses pick which recipe blocks apply through two class attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.recipe import recipe_from_plans


class RecipeTrainer(nnUNetTrainer):
    """nnU-Net's trainer with the protocol and augmentation taken from the recipe in the plans."""

    #: recipe block with the training protocol ("training" or "finetune")
    schedule_key: str = "training"
    #: recipe block with the augmentation table ("teacher_augmentation" or "student_augmentation")
    augmentation_key: str = "teacher_augmentation"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.recipe: dict[str, Any] = recipe_from_plans(plans)
        self._apply_schedule(self.recipe[self.schedule_key])
        self.print_to_log_file(f"recipe '{self.recipe['name']}': schedule '{self.schedule_key}', "
                               f"augmentation '{self.augmentation_key}'", also_print_to_console=False)

    def _apply_schedule(self, schedule: dict[str, Any]) -> None:
        if not schedule["mixed_precision"]:
            raise NsnError("recipe key 'mixed_precision' = false is not supported: nnU-Net trains in mixed "
                           "precision on CUDA and in fp32 on CPU")
        self.num_epochs = schedule["num_epochs"]
        self.num_iterations_per_epoch = schedule["num_iterations_per_epoch"]
        self.num_val_iterations_per_epoch = schedule["num_val_iterations_per_epoch"]
        self.initial_lr = schedule["initial_lr"]
        self.weight_decay = schedule["weight_decay"]
        self.oversample_foreground_percent = schedule["oversample_foreground_percent"]
        self.enable_deep_supervision = schedule["deep_supervision"]
        self.save_every = schedule["save_every"]

    def configure_optimizers(self):
        schedule = self.recipe[self.schedule_key]
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=schedule["momentum"], nesterov=schedule["nesterov"])
        lr_scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=schedule["poly_exponent"])
        return optimizer, lr_scheduler
