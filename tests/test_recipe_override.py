"""A recipe override names only what it changes: after ``nsn pseudolabel``, stock ``nnUNetv2_train -tr
NoisyStudentTrainer`` with ``NSN_RECIPE`` holding only the epochs trains on the recorded pseudo-labels.

The failure this guards against: ``NSN_RECIPE`` replacing the whole planned recipe, so an override file of one key
failed at once (``missing recipe key 'description'``) and a whole recipe written before ``nsn pseudolabel``
lost ``student.pseudo_dataset``. The chain here is the user's: the session's teacher (trained by stock
``nnUNetv2_train``), ``nsn pseudolabel`` on the phantoms' unlabeled images, then the student. It uses a plans
name of its own (a copy of the session's low-footprint plans, same preprocessed data), so the recorded
pseudo-labeled dataset changes no other test's plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noisy_student_nnunet.recipe import PLANS_KEY

from conftest import LOWFOOTPRINT_PLANS, OVERRIDE_PSEUDO_ID

PLANS = "nnUNetOverridePlans"
TEACHER = "NoisyStudentTeacherTrainer"
STUDENT = "NoisyStudentTrainer"
PSEUDO_NAME = f"Dataset{OVERRIDE_PSEUDO_ID:03d}_OverridePseudo"


@pytest.fixture(scope="module")
def pseudolabeled(lowfootprint_plans, trained_teacher, phantom_dataset, run_cli) -> Path:
    """Our plans after ``nsn pseudolabel`` recorded its dataset in them; returns the plans file."""
    dataset_id, raw = phantom_dataset
    plans = json.loads(lowfootprint_plans.read_text())
    plans["plans_name"] = PLANS
    ours = lowfootprint_plans.parent / f"{PLANS}.json"
    ours.write_text(json.dumps(plans, indent=4))
    run_cli(["nsn", "pseudolabel", "-d", dataset_id, "-i", raw / "imagesUnlabeled", "-o", PSEUDO_NAME, "-f", "0",
             "-tr", TEACHER, "-p", LOWFOOTPRINT_PLANS, "--student-plans", PLANS, "-device", "cpu",
             "--disable_progress_bar"], timeout=900)
    assert json.loads(ours.read_text())[PLANS_KEY]["student"]["pseudo_dataset"] == PSEUDO_NAME
    return ours


def test_stock_train_with_an_epochs_only_override_keeps_the_pseudo_labels(pseudolabeled, nnunet_env, run_cli,
                                                                          tmp_path):
    planned = json.loads(pseudolabeled.read_text())[PLANS_KEY]
    assert planned["training"]["num_epochs"] == 2  # the tiny recipe's
    override = tmp_path / "epochs.json"
    override.write_text(json.dumps({"training": {"num_epochs": 1}}))
    dataset = pseudolabeled.parent.name
    run_cli(["nnUNetv2_train", dataset, "3d_fullres", "0", "-tr", STUDENT, "-p", PLANS, "-device", "cpu"],
            env_extra={"NSN_RECIPE": str(override)}, timeout=1500)

    results = Path(nnunet_env["nnUNet_results"]) / dataset / f"{STUDENT}__{PLANS}__3d_fullres"
    checkpoint = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 1  # the override's epochs
    log = "\n".join(p.read_text() for p in sorted((results / "fold_0").glob("training_log_*.txt")))
    assert f"pseudo-labeled dataset: {PSEUDO_NAME}, 4 cases" in log  # found through the planned recipe
    assert f"NSN_RECIPE={override} changed 1 planned recipe key(s): training.num_epochs" in log
    # the results folder records the recipe that ran: the planned one with the epochs changed, nothing else
    recorded = json.loads((results / "plans.json").read_text())[PLANS_KEY]
    assert recorded == dict(planned, training=dict(planned["training"], num_epochs=1))


def test_nsn_plan_lays_a_partial_recipe_over_the_plans(pseudolabeled, run_cli, tmp_path):
    dataset = pseudolabeled.parent.name
    before = json.loads(pseudolabeled.read_text())[PLANS_KEY]
    partial = tmp_path / "lr.json"
    partial.write_text(json.dumps({"finetune": {"initial_lr": 0.002}}))
    done = run_cli(["nsn", "plan", "-d", dataset, "--plans-name", PLANS, "--recipe", partial, "-np", "1"])
    assert "1 key(s) changed" in done.stdout
    after = json.loads(pseudolabeled.read_text())[PLANS_KEY]
    assert after == dict(before, finetune=dict(before["finetune"], initial_lr=0.002))  # pseudo_dataset kept

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"finetune": {"initial_lr": 0.002, "epochs": 5}}))
    done = run_cli(["nsn", "plan", "-d", dataset, "--plans-name", PLANS, "--recipe", bad], check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"nsn plan: error: --recipe {bad}: unknown recipe key 'finetune.epochs'"]
    assert json.loads(pseudolabeled.read_text())[PLANS_KEY] == after  # nothing written
