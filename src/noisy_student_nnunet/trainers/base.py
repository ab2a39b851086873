"""The recipe-driven base of our three trainers.

It only wires a recipe (see :mod:`noisy_student_nnunet.recipe`) into nnU-Net's hooks: the training
protocol (epochs, iterations, learning rate, optimizer, poly exponent, deep supervision) and the
augmentation table. Subclasses pick which recipe blocks apply through two class attributes.
Everything else is stock nnU-Net: mixed precision (fp16 autocast + GradScaler) on CUDA, fp32 on CPU,
deep-supervised Dice + CE, "he" initialisation of the PlainConvUNet from the plans.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from noisy_student_nnunet.augmentation import (build_training_transforms, configure_rotation_and_patch,
                                               describe_training_transforms)
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.recipe import PLANS_KEY, recipe_from_plans


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
        # the effective recipe (NSN_RECIPE may override the planned one) is what the results folder's
        # plans.json records: on_train_start saves self.plans_manager.plans there
        self.plans_manager.plans[PLANS_KEY] = self.recipe
        self._apply_schedule(self.recipe[self.schedule_key])
        self.print_to_log_file(f"recipe '{self.recipe['name']}': schedule '{self.schedule_key}', "
                               f"augmentation '{self.augmentation_key}'", also_print_to_console=False)

    def _apply_schedule(self, schedule: dict[str, Any]) -> None:
        if not schedule["mixed_precision"]:
            raise NsnError(f"recipe key '{self.schedule_key}.mixed_precision' = false is not supported: nnU-Net "
                           "trains in mixed precision on CUDA and in fp32 on CPU")
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

    # --- augmentation (recipe table instead of stock's hard-coded values) ---

    @property
    def augmentation_table(self) -> dict[str, Any]:
        return self.recipe[self.augmentation_key]

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Stock's dummy-2D and mirror-axes decisions; rotation (and the initial patch for it) from the table."""
        rotation, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = configure_rotation_and_patch(
            self.augmentation_table, self.configuration_manager.patch_size)
        self.print_to_log_file(f"do_dummy_2d_data_aug: {do_dummy_2d_data_aug}, rotation "
                               f"{[round(float(np.degrees(a)), 3) for a in rotation]} deg, initial patch size "
                               f"{[int(i) for i in initial_patch_size]}")
        self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, do_dummy_2d_data_aug, initial_patch_size, mirror_axes

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """Stock's pipeline with the recipe table (an instance method: stock calls it through ``self``).

        ``rotation_for_DA`` is not used: the rotation is the table's (the same value
        :meth:`configure_rotation_dummyDA_mirroring_and_inital_patch_size` returned).
        """
        transforms = build_training_transforms(
            self.augmentation_table, patch_size, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        self.print_to_log_file(f"augmentation '{self.augmentation_key}' of recipe '{self.recipe['name']}' "
                               f"as built: {describe_training_transforms(transforms)}", also_print_to_console=False)
        return transforms
