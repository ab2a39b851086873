"""``scripts/run_pipeline.sh`` end to end on tiny phantoms with the tiny recipe and two folds.

One run of the real script (stock ``nnUNetv2_train``, ``nsn pseudolabel``, ``nnUNetv2_predict_lowfootprint``,
``nsn profile``, ``nsn evaluate`` in subprocesses), then every stage's outputs are checked; a rerun skips every
finished step; a failing step stops the run and names itself; a second run killed with SIGKILL in every stage and
rerun each time finishes like the uninterrupted one. The runs use plans of their own names so that they leave the
session's shared plans alone.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import PHANTOM_NAME, PIPELINE_KILLED_PSEUDO_ID, PIPELINE_PSEUDO_ID, subprocess_env

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
            # what the training cost: the recipe's iterations, its CPU time, the fold's labeled training cases
            cost = json.loads((folder / "training_cost.json").read_text())
            schedule = plans["noisy_student_recipe"]["training"]
            assert cost["iterations"] == schedule["num_epochs"] * schedule["num_iterations_per_epoch"]
            assert cost["cpu_minutes"] > 0 and cost["start_epoch"] == 0
            split = json.loads((preprocessed / dataset_name / "splits_final.json").read_text())[int(fold)]
            assert cost["training_cases"] == sorted(split["train"])
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


# --- SIGKILL at a random point of every stage, rerun with the same command ----------------

KILLED_PLANS = "nnUNetLowFootprintPlansKilled"
KILLED_PSEUDO = f"Dataset{PIPELINE_KILLED_PSEUDO_ID:03d}_KilledPseudo"
# pipeline.log names of the stages, in order; one fold each for teacher and student keeps the run short
KILL_STAGES = ("plan", "train_NoisyStudentTeacherTrainer_fold0", "pseudolabel_round1",
               "train_NoisyStudentTrainer_fold0", "finetune_round1_fold0", "predict", "evaluate")


def _kill_during(args: list[str], env: dict[str, str], log: Path, stage: str, progress: Path | None,
                 delay: float) -> None:
    """Start the pipeline, wait until ``stage`` runs and has written ``progress`` (a glob: a checkpoint_latest.pth,
    a finished case), SIGKILL the pipeline and every step it started ``delay`` seconds later; fails unless the
    kill landed inside that stage."""
    seen = log.read_text() if log.exists() else ""
    process = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    started = re.compile(rf"^\[[0-9:]+\] {re.escape(stage)}: (?!done already)", re.M)
    deadline = time.monotonic() + 1800

    def reached() -> bool:
        if not started.search(log.read_text()[len(seen):] if log.exists() else ""):
            return False
        return progress is None or any(progress.parent.glob(progress.name))

    while not reached():
        assert process.poll() is None, f"the pipeline ended ({process.returncode}) before stage {stage} began"
        assert time.monotonic() < deadline, f"stage {stage} did not begin"
        time.sleep(0.05)
    time.sleep(delay)
    lines = log.read_text()[len(seen):].splitlines()
    alive = process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert alive and started.match(lines[-1]), f"stage {stage} was over before the kill: {lines[-3:]}"
    # the steps die a moment after the shell; until the last one has, it holds the work folder's lock (inherited)
    # and a rerun is refused naming it, as it should be: wait for that, as a user would
    from noisy_student_nnunet.locks import LOCK_NAME, holder_if_held

    deadline = time.monotonic() + 60
    while holder_if_held(log.parents[1] / LOCK_NAME) and time.monotonic() < deadline:
        time.sleep(0.1)


def _epoch(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["current_epoch"])


def test_killed_at_every_stage_and_rerun_finishes_like_an_uninterrupted_run(pipeline_run, phantom_dataset,
                                                                              nnunet_env, tmp_path):
    """"Equal" for a resumed training: nnU-Net resumes from checkpoint_latest.pth and trains to the same final
    epoch, so every checkpoint_final.pth has the epoch of the uninterrupted run; the weights are not bitwise equal
    (nnU-Net does not checkpoint its random state: the augmentation and sampling draws after a resume differ), so
    the test Dice is compared within noise. Pseudo-labels and predictions cover the same cases, each file whole."""
    import nibabel as nib

    dataset_id, raw = phantom_dataset
    args = ["-d", str(dataset_id), "-u", str(raw / "imagesUnlabeled"), "-t", str(raw / "imagesTs"),
            "-l", str(raw / "labelsTs"), "-r", "tiny", "-f", "0", "-s", "0", "-D", "cpu", "-p", KILLED_PLANS,
            "-o", KILLED_PSEUDO, "-w", str(tmp_path / "work")]
    env = _env(nnunet_env)
    log = tmp_path / "work" / "logs" / "pipeline.log"
    results = Path(nnunet_env["nnUNet_results"]) / f"Dataset{dataset_id:03d}_{PHANTOM_NAME}"
    fold = "{}__" + KILLED_PLANS + "__3d_fullres/fold_0/checkpoint_latest.pth"
    # kill once the stage has something to resume from: a checkpoint (after epoch 1 of 2), a finished case
    progress = {"train_NoisyStudentTeacherTrainer_fold0": results / fold.format("NoisyStudentTeacherTrainer"),
                "pseudolabel_round1": Path(nnunet_env["nnUNet_raw"]) / KILLED_PSEUDO / "pseudolabel_cases" / "*.json",
                "train_NoisyStudentTrainer_fold0": results / fold.format("NoisyStudentTrainer"),
                # the tiny recipe fine-tunes one epoch: no checkpoint_latest.pth, the rerun starts it again
                "finetune_round1_fold0": (results / fold.format("NoisyStudentFinetuneTrainer")).with_name(
                    "training_log_*.txt"),
                "predict": tmp_path / "work" / "predictions_finetuned" / "*.nii.gz"}
    delays = random.Random(22)
    for stage in KILL_STAGES:  # each start resumes the last one, then is killed in the next stage
        _kill_during(args, env, log, stage, progress.get(stage), delays.uniform(0.0, 0.5))
    # every killed training resumed: nnU-Net starts a new training log per start
    for trainer in ("NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"):
        logs = sorted((results / f"{trainer}__{KILLED_PLANS}__3d_fullres" / "fold_0").glob("training_log_*.txt"),
                      key=lambda log: log.stat().st_mtime)
        assert len(logs) >= 2, (trainer, logs)
        if trainer != "NoisyStudentFinetuneTrainer":  # killed after epoch 0's checkpoint: resumed at epoch 1
            assert "Epoch 1" in logs[-1].read_text() and "Epoch 0" not in logs[-1].read_text(), logs[-1]
    done = _run(args, env)
    assert done.returncode == 0, f"rerun after the kills failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "pipeline complete" in done.stdout

    for trainer in ("NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer"):
        killed = results / f"{trainer}__{KILLED_PLANS}__3d_fullres" / "fold_0"
        whole = next((results / f"{trainer}__{PLANS}__3d_fullres").glob("fold_*"))
        assert _epoch(killed / "checkpoint_final.pth") == _epoch(whole / "checkpoint_final.pth"), trainer
        assert (killed / "validation" / "summary.json").is_file() and not (killed / "checkpoint_latest.pth").exists()
    roots = [*results.glob(f"*__{KILLED_PLANS}__*"), Path(nnunet_env["nnUNet_raw"]) / KILLED_PSEUDO,
             Path(nnunet_env["nnUNet_preprocessed"]) / KILLED_PSEUDO, tmp_path / "work"]
    leftovers = [p for root in roots for p in root.rglob("*") if "partial" in p.name or p.name.endswith(".tmp")]
    assert not leftovers, leftovers

    unlabeled = sorted(p.name.replace("_0000.nii.gz", "") for p in (raw / "imagesUnlabeled").glob("*.nii.gz"))
    labels = Path(nnunet_env["nnUNet_raw"]) / KILLED_PSEUDO / "labelsTr"
    assert sorted(p.name.replace(".nii.gz", "") for p in labels.glob("*.nii.gz")) == unlabeled
    for case in unlabeled:  # whole files: decompressed to the end
        assert np.asarray(nib.load(labels / f"{case}.nii.gz").dataobj).shape == \
            nib.load(raw / "imagesUnlabeled" / f"{case}_0000.nii.gz").shape
    predictions = tmp_path / "work" / "predictions_finetuned"
    for image in sorted((raw / "imagesTs").glob("*.nii.gz")):
        predicted = np.asarray(nib.load(predictions / image.name.replace("_0000.nii.gz", ".nii.gz")).dataobj)
        assert predicted.shape == nib.load(image).shape
    killed_dsc = json.loads((tmp_path / "work" / "evaluation_summary.json").read_text())["overall"]["DSC"]["mean"]
    whole_dsc = json.loads((pipeline_run[2] / "evaluation_summary.json").read_text())["overall"]["DSC"]["mean"]
    assert abs(killed_dsc - whole_dsc) < 0.25, (killed_dsc, whole_dsc)  # 2 epochs of 4 iterations: noisy
