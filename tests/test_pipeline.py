"""``scripts/run_pipeline.sh`` end to end on tiny phantoms with the tiny recipe and two folds.

One run of the real script (stock ``nnUNetv2_train``, ``nsn pseudolabel``, ``nnUNetv2_predict_lowfootprint``,
``nsn profile``, ``nsn evaluate`` in subprocesses), then every stage's outputs are checked; a rerun skips every
finished step; a failing step stops the run and names itself. The run uses plans of its own name so that it
leaves the session's shared plans alone.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import PHANTOM_NAME, PIPELINE_PSEUDO_ID, subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_pipeline.sh"
PLANS = "nnUNetLowFootprintPlansPipeline"
PSEUDO_ID, PSEUDO_NAME = PIPELINE_PSEUDO_ID, f"Dataset{PIPELINE_PSEUDO_ID:03d}_PipelinePseudo"
# students on other folds than the teachers (-s): fold 1 gets no student, fold 2 no teacher
FOLDS_OF = {"NoisyStudentTeacherTrainer": ("0", "1"), "NoisyStudentTrainer": ("0", "2")}
TRAINERS = tuple(FOLDS_OF)


def _env(nnunet_env: dict[str, str]) -> dict[str, str]:
    env = subprocess_env(nnunet_env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NSN_PYTHON"] = sys.executable
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline_run(phantom_dataset, lowfootprint_plans, nnunet_env, tmp_path_factory):
    """(args, env, work, completed process) of one full pipeline run."""
    dataset_id, raw = phantom_dataset
    work = tmp_path_factory.mktemp("pipeline_work")
    args = ["-d", str(dataset_id), "-u", str(raw / "imagesUnlabeled"), "-t", str(raw / "imagesTs"),
            "-l", str(raw / "labelsTs"), "-r", "tiny", "-f", " ".join(FOLDS_OF["NoisyStudentTeacherTrainer"]),
            "-s", " ".join(FOLDS_OF["NoisyStudentTrainer"]), "-D", "cpu", "-p", PLANS,
            "-o", PSEUDO_NAME, "-w", str(work), "-j", "2"]  # -j 2: the teacher folds side by side
    env = _env(nnunet_env)
    done = _run(args, env)
    assert done.returncode == 0, f"pipeline failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return args, env, work, done


def test_every_stage_leaves_its_outputs(pipeline_run, phantom_dataset, nnunet_env):
    _, _, work, done = pipeline_run
    dataset_id, raw = phantom_dataset
    dataset_name = f"Dataset{dataset_id:03d}_{PHANTOM_NAME}"
    preprocessed = Path(nnunet_env["nnUNet_preprocessed"])
    results = Path(nnunet_env["nnUNet_results"]) / dataset_name

    # 1. plans: half-width network, the tiny recipe, the pseudo-labeled dataset recorded by `nsn pseudolabel`
    plans = json.loads((preprocessed / dataset_name / f"{PLANS}.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"][0] == 4
    assert plans["noisy_student_recipe"]["name"] == "tiny"
    assert plans["noisy_student_recipe"]["student"]["pseudo_dataset"] in (PSEUDO_NAME, str(PSEUDO_ID))

    # 2. teachers and 4. students: every fold trained to the end and validated by nnU-Net
    for trainer, folds in FOLDS_OF.items():
        for fold in folds:
            folder = results / f"{trainer}__{PLANS}__3d_fullres" / f"fold_{fold}"
            assert (folder / "checkpoint_final.pth").is_file(), folder
            assert (folder / "validation" / "summary.json").is_file(), folder
        others = {"0", "1", "2"} - set(folds)
        assert not any((results / f"{trainer}__{PLANS}__3d_fullres" / f"fold_{f}").exists() for f in others)
    # the students really trained on the pseudo-labeled dataset
    student_logs = list((results / f"NoisyStudentTrainer__{PLANS}__3d_fullres" / "fold_0").glob("training_log_*.txt"))
    assert any(f"pseudo-labeled dataset: {PSEUDO_NAME}" in log.read_text() for log in student_logs)

    # 3. pseudo-labels: one hard label map per unlabeled image, preprocessed with the student's plans
    unlabeled = sorted(p.name.replace("_0000.nii.gz", "") for p in (raw / "imagesUnlabeled").glob("*.nii.gz"))
    pseudo_raw = Path(nnunet_env["nnUNet_raw"]) / PSEUDO_NAME
    labels = sorted(p.name.replace(".nii.gz", "") for p in (pseudo_raw / "labelsTr").glob("*.nii.gz"))
    assert labels == unlabeled
    labeled_json = json.loads((raw / "dataset.json").read_text())
    assert json.loads((pseudo_raw / "dataset.json").read_text())["labels"] == labeled_json["labels"]
    assert (preprocessed / PSEUDO_NAME / f"{PLANS}.json").is_file()
    with open(pseudo_raw / "pseudolabel_confidence.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(unlabeled)

    # fine-tune: the best student fold by cross-validation
    best = [line for line in done.stdout.splitlines() if "best student fold by cross-validation" in line]
    assert len(best) == 1
    fold = best[0].rsplit(" ", 1)[1]
    scores = {f: json.loads((results / f"NoisyStudentTrainer__{PLANS}__3d_fullres" / f"fold_{f}" / "validation" /
                             "summary.json").read_text())["foreground_mean"]["Dice"] for f in FOLDS_OF[TRAINERS[1]]}
    assert scores[fold] == max(scores.values())
    assert (results / f"NoisyStudentFinetuneTrainer__{PLANS}__3d_fullres" / f"fold_{fold}" /
            "checkpoint_final.pth").is_file()

    # 5. predictions of the test images in their own geometry, profiled, and evaluated
    test_images = sorted((raw / "imagesTs").glob("*.nii.gz"))
    predictions = work / "predictions_finetuned"
    for image in test_images:
        prediction = predictions / image.name.replace("_0000.nii.gz", ".nii.gz")
        reference, predicted = nib.load(image), nib.load(prediction)
        assert predicted.shape == reference.shape
        assert np.allclose(predicted.affine, reference.affine, atol=1e-4)
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {int(v) for v in labeled_json["labels"].values()}
    profile = json.loads((work / "profile_predict.json").read_text())
    assert profile["exit_code"] == 0 and profile["peak_rss_tree_mb"] > 0 and profile["wall_time_s"] > 0
    assert (work / "profile_predict.png").stat().st_size > 10_000
    with open(work / "evaluation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(test_images)
    summary = json.loads((work / "evaluation_summary.json").read_text())
    assert 0.0 <= summary["overall"]["DSC"]["mean"] <= 1.0

    # every step logged to its own file
    logs = {p.name for p in (work / "logs").glob("*.log")}
    assert {"plan.log", "pseudolabel_round1.log", "predict.log", "evaluate.log", "pipeline.log"} <= logs
    assert {f"train_{t}_fold{f}.log" for t, folds in FOLDS_OF.items() for f in folds} <= logs
    assert "pipeline complete" in done.stdout


def test_rerun_skips_finished_steps(pipeline_run):
    args, env, work, _ = pipeline_run
    done = _run(args, env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = {line.split("]", 1)[1].split(":", 1)[0].strip() for line in done.stdout.splitlines()
               if "done already, skipped" in line}
    trained = {f"train_{t}_fold{f}" for t, folds in FOLDS_OF.items() for f in folds}
    assert {"plan", "predict"} | trained <= skipped
    assert any(s.startswith("finetune_round1_fold") for s in skipped)
    assert not any(line.split("]", 1)[1].lstrip().startswith("train_") for line in done.stdout.splitlines()
                   if "]" in line and "skipped" not in line)


def test_failing_step_stops_and_names_itself(pipeline_run, tmp_path):
    args, env, work, _ = pipeline_run
    bad = list(args)
    bad[bad.index("-r") + 1] = "no_such_recipe"  # only the plan step reads it: use a fresh plans name
    bad[bad.index("-p") + 1] = "nnUNetPlansThatFail"
    bad[bad.index("-w") + 1] = str(tmp_path / "work")
    done = _run(bad, env, timeout=600)
    assert done.returncode == 1
    assert "step 'plan' failed" in done.stderr and str(tmp_path / "work" / "logs" / "plan.log") in done.stderr
    assert "pipeline complete" not in done.stdout


def test_bad_arguments_are_one_line_errors(nnunet_env, tmp_path):
    env = _env(nnunet_env)
    done = _run(["-d", "911", "-u", str(tmp_path / "missing")], env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "missing" in done.stderr
    done = _run(["-d", "911", "-u", str(tmp_path), "-s", " "], env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "-s need at least one fold" in done.stderr
    done = _run(["-d", "911", "-u", str(tmp_path), "-j", "0"], env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "-j must be a positive integer" in done.stderr
