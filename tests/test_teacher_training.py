"""NoisyStudentTeacherTrainer: stock ``nnUNetv2_train`` trains it on phantoms with the tiny recipe.

One real training run (2 epochs x 4 iterations, CPU, fp32) through nnU-Net's own console script (the
session fixture ``trained_teacher`` in conftest.py), then
stock ``nnUNetv2_predict`` on the trained folder; plus in-process checks of what the trainer wires
from the recipe (schedule, optimizer, Table 4 augmentation, NSN_RECIPE override).
"""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from noisy_student_nnunet.augmentation import describe_training_transforms
from noisy_student_nnunet.recipe import ENV_VAR, PLANS_KEY, load_recipe

TRAINER = "NoisyStudentTeacherTrainer"
PLANS = "nnUNetLowFootprintPlans"


def test_stock_nnunetv2_train_trains_the_teacher(trained_teacher):
    fold = trained_teacher
    assert (fold / "checkpoint_final.pth").is_file()
    logs = [p.read_text() for p in sorted(fold.glob("training_log_*.txt"))]
    log = next(text for text in reversed(logs) if "Training done." in text)
    tiny = load_recipe("tiny")
    assert "recipe 'tiny': schedule 'training', augmentation 'teacher_augmentation'" in log
    # the augmentation the trainer really built is the recipe's teacher table (= paper Table 4 values)
    built = re.search(r"augmentation 'teacher_augmentation' of recipe 'tiny' as built: (\{.*\})", log)
    assert built and ast.literal_eval(built.group(1)) == tiny["teacher_augmentation"]
    assert "rotation [-30.0, 30.0] deg" in log  # the table's rotation, logged by our configure_rotation...
    # the recipe's schedule: 2 epochs, poly(0.9) from lr 0.01
    assert "Epoch 1" in log and "Epoch 2" not in log
    assert "Current learning rate: 0.01" in log and f"Current learning rate: {0.01 * 0.5 ** 0.9:.5f}" in log

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["current_epoch"] == 2
    assert checkpoint["grad_scaler_state"] is None  # fp32 on CPU
    first_conv = next(v for k, v in checkpoint["network_weights"].items() if k.endswith("conv.weight"))
    assert first_conv.shape[0] == tiny["network"]["base_num_features"]

    plans = json.loads((fold.parent / "plans.json").read_text())
    assert plans["plans_name"] == PLANS and plans[PLANS_KEY] == tiny
    debug = json.loads((fold / "debug.json").read_text())
    assert debug["device"] == "cpu" and debug["batch_size"] == "4"


def test_stock_nnunetv2_predict_runs_the_model(trained_teacher, phantom_dataset, run_cli, tmp_path):
    dataset_id, raw = phantom_dataset
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[:1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / images[0].name).symlink_to(images[0])
    out = tmp_path / "out"
    run_cli(["nnUNetv2_predict", "-i", inputs, "-o", out, "-d", dataset_id, "-c", "3d_fullres", "-tr", TRAINER,
             "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"], timeout=600)
    prediction = out / images[0].name.replace("_0000.nii.gz", ".nii.gz")
    assert prediction.is_file()
    pred, image = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(images[0]))
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= set(range(14))


def _trainer(lowfootprint_plans, fold: int):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    plans = json.loads(lowfootprint_plans.read_text())
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key
    dataset_json = json.loads(lowfootprint_plans.with_name("dataset.json").read_text())
    trainer_class = recursive_find_trainer_class_by_name(TRAINER)  # found the way nnUNetv2_train finds it
    return trainer_class(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))


@pytest.fixture()
def in_process_env(nnunet_env, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, nnunet_env[var])
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_trainer_wires_the_recipe(lowfootprint_plans, in_process_env):
    tiny = load_recipe("tiny")
    trainer = _trainer(lowfootprint_plans, fold=3)  # not fold 0: the training test owns that folder
    assert type(trainer).__module__ == "noisy_student_nnunet.trainers.teacher"
    schedule = tiny["training"]
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (
        schedule["num_epochs"], schedule["num_iterations_per_epoch"], schedule["num_val_iterations_per_epoch"])
    assert trainer.initial_lr == 0.01 and trainer.grad_scaler is None
    trainer.initialize()
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.99 and group["nesterov"] is True and group["weight_decay"] == 3e-5
    assert scheduler.exponent == 0.9 and scheduler.max_steps == schedule["num_epochs"]

    rotation, dummy_2d, initial, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert np.degrees(rotation) == pytest.approx((-30, 30))
    transforms = trainer.get_training_transforms(trainer.configuration_manager.patch_size, rotation,
                                                 trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d)
    assert describe_training_transforms(transforms) == tiny["teacher_augmentation"]


def test_env_recipe_overrides_and_is_recorded(lowfootprint_plans, in_process_env, monkeypatch, tmp_path):
    recipe = load_recipe("tiny")
    recipe["name"] = "override"
    recipe["training"]["num_epochs"] = 3
    recipe["teacher_augmentation"]["gamma"]["p_sample"] = 0.4
    path = tmp_path / "override.json"
    path.write_text(json.dumps(recipe))
    monkeypatch.setenv(ENV_VAR, str(path))
    trainer = _trainer(lowfootprint_plans, fold=4)
    assert trainer.num_epochs == 3
    # what on_train_start saves into the results folder's plans.json
    assert trainer.plans_manager.plans[PLANS_KEY] == recipe
    transforms = trainer.get_training_transforms(trainer.configuration_manager.patch_size, (0, 0), None, (0, 1, 2),
                                                 False)
    assert describe_training_transforms(transforms)["gamma"]["p_sample"] == 0.4
