"""The recipe-driven base of our three trainers.

It only wires a recipe (see :mod:`noisy_student_nnunet.recipe`) into nnU-Net's hooks: the training
protocol (epochs, iterations, learning rate, optimizer, poly exponent, deep supervision) and the
augmentation table. Subclasses pick which recipe blocks apply through two class attributes.
Everything else is stock nnU-Net: mixed precision (fp16 autocast + GradScaler) on CUDA, fp32 on CPU,
deep-supervised Dice + CE, "he" initialisation of the PlainConvUNet from the plans.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from noisy_student_nnunet.augmentation import (build_training_transforms, configure_rotation_and_patch,
                                               describe_training_transforms)
from noisy_student_nnunet.cpu_threads import cpu_thread_count
from noisy_student_nnunet.inference.precision import cpu_native_bf16
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.recipe import ENV_VAR, PLANS_KEY, changed_keys, recipe_from_plans
from noisy_student_nnunet.training_cost import CostClock, finish


def build_optimizer(parameters, schedule: dict[str, Any]) -> torch.optim.Optimizer:
    """The schedule's optimiser: Table 3's SGD (Nesterov momentum) or AdamW (``momentum`` as beta1).

    AdamW is there for short CPU schedules: on the demo phantoms SGD at lr 1e-2 spends its first
    thousands of iterations on the largest organ, AdamW at lr 3e-3 learns most organs in that time.
    """
    if schedule["optimizer"] == "adamw":
        return torch.optim.AdamW(parameters, schedule["initial_lr"], weight_decay=schedule["weight_decay"],
                                 betas=(schedule["momentum"], 0.999))
    return torch.optim.SGD(parameters, schedule["initial_lr"], weight_decay=schedule["weight_decay"],
                           momentum=schedule["momentum"], nesterov=schedule["nesterov"])


class Fp32Loss(torch.nn.Module):
    """A loss computed in fp32 from outputs made under CPU bf16 autocast (Dice sums lose digits in bf16)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.inner = loss

    def __getattr__(self, name: str):
        # transparent: ``trainer.loss.loss`` still reaches what stock's loss wraps
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, output, target):
        with torch.autocast("cpu", enabled=False):
            output = [o.float() for o in output] if isinstance(output, (list, tuple)) else output.float()
            return self.inner(output, target)


class RecipeTrainer(nnUNetTrainer):
    """nnU-Net's trainer with the protocol and augmentation taken from the recipe in the plans."""

    #: recipe block with the training protocol ("training" or "finetune")
    schedule_key: str = "training"
    #: recipe block with the augmentation table ("teacher_augmentation" or "student_augmentation")
    augmentation_key: str = "teacher_augmentation"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.device.type == "cpu":
            # stock nnUNetv2_train asked for every core of the machine; use those this process may run on
            torch.set_num_threads(cpu_thread_count())
        self.recipe: dict[str, Any] = recipe_from_plans(plans)
        overridden = changed_keys(plans.get(PLANS_KEY) or {}, self.recipe) if os.environ.get(ENV_VAR) else []
        # the effective recipe (NSN_RECIPE laid over the planned one) is what the results folder's
        # plans.json records: on_train_start saves self.plans_manager.plans there
        self.plans_manager.plans[PLANS_KEY] = self.recipe
        self._apply_schedule(self.recipe[self.schedule_key])
        self._throttle_progress_plot()
        if self.device.type == "cpu":
            self.print_to_log_file(f"CPU training: {torch.get_num_threads()} threads, "
                                   + ("bf16 autocast (native bf16 on this CPU)" if self.cpu_bf16 else "fp32"))
        self.print_to_log_file(f"recipe '{self.recipe['name']}': schedule '{self.schedule_key}', "
                               f"augmentation '{self.augmentation_key}'", also_print_to_console=False)
        if overridden:
            self.print_to_log_file(f"{ENV_VAR}={os.environ[ENV_VAR]} changed {len(overridden)} planned recipe "
                                   f"key(s): {', '.join(overridden)}")

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

    @functools.cached_property
    def cpu_bf16(self) -> bool:
        """bf16 autocast for training on the CPU: the recipe asks for mixed precision and the CPU has native bf16.

        Stock trains in fp32 on the CPU (its fp16 autocast is CUDA-only). On AMX/AVX512-BF16 CPUs a demo
        training step (width 8, batch 4 of 16x32x32, one thread) takes 0.11 s under bf16 autocast against
        0.17 s in fp32. ``NSN_CPU_BF16=0`` turns it off (``=1`` forces it). (Inference's ``auto`` is fp32 on the CPU.)
        Decided once per trainer (it asks torch and may read /proc/cpuinfo), not on every step.
        """
        return (self.device.type == "cpu" and self.recipe[self.schedule_key]["mixed_precision"]
                and cpu_native_bf16()[0])

    def _cpu_autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_bf16 else contextlib.nullcontext()

    def _build_loss(self):
        loss = super()._build_loss()
        return Fp32Loss(loss) if self.cpu_bf16 else loss

    def train_step(self, batch: dict) -> dict:
        with self._cpu_autocast():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._cpu_autocast():
            return super().validation_step(batch)

    def on_train_start(self):
        super().on_train_start()  # a resumed training has loaded its checkpoint (current_epoch) by now
        self._cost_clock = CostClock.start(self.current_epoch)

    def on_train_end(self):
        """Stock's, then ``training_cost.json`` (iterations, CPU minutes, training cases) in the fold folder."""
        super().on_train_end()  # stops the augmentation workers: their CPU time counts from here on
        if self.local_rank == 0 and getattr(self, "_cost_clock", None) is not None:
            training_cases, _ = self.do_split()
            finish(self._cost_clock, type(self).__name__, self.fold, self.num_epochs, self.num_iterations_per_epoch,
                   list(training_cases)).write(self.output_folder)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Stock's cross-validation, predicted as our predictor predicts: without test-time mirroring.

        The paper predicts without mirroring and picks the best student fold by cross-validation, so the
        validation scores the model as it will be used; it is also 8 network passes per patch fewer (on 2
        CPU cores a demo fold's validation took 46 s with mirroring). The checkpoint keeps its mirroring
        axes: stock ``nnUNetv2_predict`` still mirrors these models when asked to.
        """
        axes = self.inference_allowed_mirroring_axes
        self.inference_allowed_mirroring_axes = None
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes

    def save_checkpoint(self, filename: str) -> None:
        """Stock's, written under a temporary name, checked (a zip archive whose directory is whole) and renamed.

        Stock ``torch.save`` writes the final name directly: a kill during the save leaves a truncated
        ``checkpoint_latest.pth`` that ``--c`` then fails on, or a ``checkpoint_final.pth`` that a rerun of the
        pipeline takes for a finished fold; a full disk gives torch's "unexpected pos" instead of the cause.
        """
        from noisy_student_nnunet.written import check_file, discard, writing

        tmp = f"{filename}.partial-{os.getpid()}"
        try:
            with writing(filename):
                super().save_checkpoint(tmp)
            if os.path.exists(tmp):  # not on other ranks, nor with checkpointing disabled
                check_file(tmp, filename)
                os.replace(tmp, filename)
        except BaseException:
            discard(tmp)
            raise

    def _throttle_progress_plot(self) -> None:
        """Draw progress.png when a checkpoint is saved and at the end, not after every epoch.

        Stock draws it after every epoch; with the short epochs of CPU recipes matplotlib's ~0.5 s is a
        tenth of the epoch (demo recipe: 4.4 s per epoch on 2 cores).
        """
        plot = self.logger.plot_progress_png

        def plot_at_checkpoints(output_folder: str) -> None:
            epoch = self.current_epoch
            if (epoch + 1) % self.save_every == 0 or epoch >= self.num_epochs - 1:
                plot(output_folder)

        self.logger.plot_progress_png = plot_at_checkpoints

    def configure_optimizers(self):
        schedule = self.recipe[self.schedule_key]
        optimizer = build_optimizer(self.network.parameters(), schedule)
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
