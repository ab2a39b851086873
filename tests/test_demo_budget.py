"""The demo's budget: a measured training step sizes its epochs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from noisy_student_nnunet.demo_budget import (BUDGET_MINUTES, CALIBRATIONS, MIN_SCALE, plan_budget,
                                              projected_minutes, scaled_recipe)
from noisy_student_nnunet.recipe import load_recipe, validate_recipe

DEMO = load_recipe("demo")
#: the fp32 calibration run's steps (one thread, both threads)
REFERENCE = (CALIBRATIONS["fp32"].step_s, 0.09, "fp32")


def test_a_cpu_that_fits_the_budget_trains_the_whole_recipe():
    fast = plan_budget(DEMO, REFERENCE[0] / 2, REFERENCE[1] / 2, "fp32")
    assert fast.scale == 1 and fast.projected_minutes == fast.full_minutes < BUDGET_MINUTES
    assert "the whole recipe" in fast.describe()


def test_the_projection_reproduces_each_calibration_run():
    # the fp32 run (AVX2 kernels): 0.149 s and 0.090 s per step, 16.8 minutes; the bf16 run: 0.103, 0.066, 14.9
    assert projected_minutes(DEMO, *REFERENCE) == pytest.approx(16.8, abs=0.1)
    assert projected_minutes(DEMO, 0.103, 0.066, "bf16") == pytest.approx(14.9, abs=0.1)


def test_a_slower_cpu_trains_fewer_epochs_to_fit_the_budget():
    slow = plan_budget(DEMO, REFERENCE[0] * 1.5, REFERENCE[1] * 1.5, "fp32")
    assert slow.full_minutes > BUDGET_MINUTES and MIN_SCALE < slow.scale < 1
    assert slow.projected_minutes == pytest.approx(BUDGET_MINUTES)
    assert f"{slow.scale:.2f} of the recipe's epochs" in slow.describe()
    # the projection grows with the step and with the epochs
    assert projected_minutes(DEMO, *REFERENCE, 0.5) < projected_minutes(DEMO, *REFERENCE) < slow.full_minutes
    # bf16 steps project with the bf16 run's overheads
    assert projected_minutes(DEMO, *REFERENCE[:2], "bf16") > projected_minutes(DEMO, *REFERENCE)


def test_never_below_the_checked_share_and_zero_minutes_means_the_whole_recipe():
    crawl = plan_budget(DEMO, REFERENCE[0] * 5, REFERENCE[1] * 5, "fp32")
    assert crawl.scale == MIN_SCALE and crawl.projected_minutes > BUDGET_MINUTES  # says it will take longer
    assert plan_budget(DEMO, REFERENCE[0] * 5, REFERENCE[1] * 5, "fp32", minutes=0).scale == 1


def test_scaled_recipe_scales_every_schedule_and_stays_valid():
    scaled = scaled_recipe(DEMO, 0.6)
    assert scaled["training"]["num_epochs"] == round(DEMO["training"]["num_epochs"] * 0.6)
    assert scaled["finetune"]["num_epochs"] == round(DEMO["finetune"]["num_epochs"] * 0.6)
    for block in ("training", "finetune"):
        assert scaled[block]["save_every"] <= scaled[block]["num_epochs"]
        assert scaled[block]["num_iterations_per_epoch"] == DEMO[block]["num_iterations_per_epoch"]
    assert "0.60 of its epochs" in scaled["description"]
    validate_recipe(scaled)
    assert DEMO["training"]["num_epochs"] == load_recipe("demo")["training"]["num_epochs"]  # not changed in place
    assert scaled_recipe(DEMO, 1.0) == DEMO


def test_the_demo_measures_once_per_work_folder_and_a_rerun_keeps_its_choice(tmp_path):
    from noisy_student_nnunet.demo import BUDGETED_RECIPE, budgeted_recipe

    # a budget no CPU can meet: the smallest share, after timing the demo network's step on this CPU
    path, note = budgeted_recipe(tmp_path, "demo", minutes=0.01)
    written = load_recipe(path)
    assert path == str(tmp_path / BUDGETED_RECIPE)
    assert written["training"]["num_epochs"] == round(DEMO["training"]["num_epochs"] * MIN_SCALE)
    assert f"{MIN_SCALE:.2f} of the recipe's epochs" in note and "a training step takes" in note
    # a rerun (another budget asked) resumes with the first run's epochs, without timing again
    again_path, again_note = budgeted_recipe(tmp_path, "demo", minutes=0)
    assert again_path == path and load_recipe(again_path) == written
    assert "as this work folder chose" in again_note and "a training step takes" not in again_note
    assert json.loads((tmp_path / BUDGETED_RECIPE).read_text()) == written


def test_an_older_work_folder_keeps_its_planned_recipe_and_another_layout_the_whole_recipe(tmp_path):
    from noisy_student_nnunet.demo import BUDGETED_RECIPE, budgeted_recipe
    from noisy_student_nnunet.recipe import PLANS_KEY

    # plans written before the demo sized its epochs: the pipeline will not plan again, so their recipe trains
    planned_recipe = scaled_recipe(DEMO, 0.7)
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"plans_name": "nnUNetLowFootprintPlans", PLANS_KEY: planned_recipe}))
    path, note = budgeted_recipe(tmp_path / "old", "demo", minutes=0.01, planned=plans)
    assert load_recipe(path) == planned_recipe and "as planned in" in note and "a training step" not in note
    # three teacher folds, two student folds, one core...: the budget's calibration does not hold, nothing is scaled
    path, note = budgeted_recipe(tmp_path / "other", "demo", minutes=0.01, calibrated_layout=False)
    assert load_recipe(path) == DEMO and "the whole recipe" in note
    assert (tmp_path / "other" / BUDGETED_RECIPE).is_file()


def test_a_share_that_rounds_to_every_epoch_is_the_whole_recipe():
    # find a step just slow enough for a share above 0.99: 42 and 20 epochs round back to themselves
    step = REFERENCE[0]
    while plan_budget(DEMO, step, step * 0.6, "fp32").full_minutes <= BUDGET_MINUTES:
        step *= 1.001
    budget = plan_budget(DEMO, step, step * 0.6, "fp32")
    assert budget.full_minutes > BUDGET_MINUTES and budget.scale == 1 and "the whole recipe" in budget.describe()


def test_a_negative_budget_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "noisy_student_nnunet.cli", "demo", "-w", str(tmp_path),
                             "--minutes", "-1"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "--minutes" in lines[0], result.stderr
    assert not (tmp_path / "nnUNet_raw").exists()


def test_a_training_step_is_timed_on_the_recipe_network():
    from noisy_student_nnunet.step_time import build_recipe_network, measure_training_step

    tiny = load_recipe("tiny")
    network, patch = build_recipe_network(tiny)
    assert list(patch) == list(tiny["network"]["patch_size"] or [16, 32, 32])
    assert 0 < measure_training_step(tiny, bf16=False, steps=2) < 30
