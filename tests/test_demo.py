"""``nsn demo``'s own pieces (the chain it runs is covered by test_pipeline.py): best fold, the table, its env."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from noisy_student_nnunet.demo import DemoModel, ModelScore, best_fold, demo_environment, format_table
from noisy_student_nnunet.errors import NsnError


def _summary(folder: Path, fold: str, dice: float) -> None:
    path = folder / f"fold_{fold}" / "validation" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"foreground_mean": {"Dice": dice}}))


def test_best_fold_is_the_highest_cross_validation_dice(tmp_path):
    _summary(tmp_path, "0", 0.41)
    _summary(tmp_path, "1", 0.57)
    _summary(tmp_path, "2", 0.50)
    assert best_fold(tmp_path, ("0", "1", "2")) == "1"
    with pytest.raises(NsnError, match="fold 3"):
        best_fold(tmp_path, ("0", "3"))


def _score(title: str, liver: float, seconds: float, ram: float | None) -> ModelScore:
    entry = lambda d: {"DSC": {"mean": d, "std": 0.0}, "NSD": {"mean": d / 2, "std": 0.0}}  # noqa: E731
    summary = {"per_structure": {"Liver": entry(liver), "Spleen": entry(0.0)}, "overall": entry(liver / 2)}
    return ModelScore(DemoModel(title, "T", ("0",)), summary, seconds, ram)


def test_table_has_every_model_organ_mean_time_and_ram():
    table = format_table([_score("teacher fold 0", 0.75, 9.5, 1077.0), _score("student fold 1", 0.8125, 10.0, None)])
    lines = table.splitlines()
    assert "teacher fold 0" in lines[0] and "student fold 1" in lines[0]
    liver = next(line for line in lines if line.startswith("Liver")).split()
    assert liver[1:] == ["0.7500", "0.3750", "0.8125", "0.4062"]
    mean = next(line for line in lines if line.startswith("mean")).split()
    assert mean[1:] == ["0.3750", "0.1875", "0.4062", "0.2031"]
    assert next(line for line in lines if line.startswith("prediction time")).split()[-2:] == ["9.5", "10.0"]
    assert next(line for line in lines if line.startswith("peak RAM")).split()[-2:] == ["1077", "n/a"]


def test_environment_keeps_everything_inside_the_work_folder(tmp_path):
    env = demo_environment(tmp_path, base={"NSN_RECIPE": "x.json", "nnUNet_raw": "/elsewhere", "PATH": "/usr/bin"})
    assert env["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    assert "NSN_RECIPE" not in env  # the demo's recipe comes from its plans, not from the user's shell
    assert env["nnUNet_def_n_proc"] == "1"
    assert "NSN_NUM_THREADS" not in env  # threads: all cores (the pipeline splits them among folds side by side)
    assert env["PATH"].endswith("/usr/bin")


def test_augmentation_runs_in_the_training_process_on_a_small_cpu(tmp_path, monkeypatch):
    import noisy_student_nnunet.cpu_threads as cpu_threads

    for cores, workers in ((1, "0"), (2, "0"), (8, "1")):
        monkeypatch.setattr(cpu_threads, "available_cores", lambda cores=cores: cores)
        assert demo_environment(tmp_path, base={})["nnUNet_n_proc_DA"] == workers
        assert int(demo_environment(tmp_path, base={}, device="cuda")["nnUNet_n_proc_DA"]) >= 2
    assert demo_environment(tmp_path, base={"nnUNet_n_proc_DA": "3"})["nnUNet_n_proc_DA"] == "3"  # the user's own


def test_results_document_has_every_stage_organ_time_and_ram():
    from noisy_student_nnunet.demo import results_document

    scores = [_score("teacher fold 0", 0.75, 9.5, 1077.0), _score("fine-tuned fold 0", 0.8125, 10.0, None)]
    document = results_document(scores, seed=3, device="cpu")
    assert document["seed"] == 3 and list(document["stages"]) == ["teacher fold 0", "fine-tuned fold 0"]
    teacher = document["stages"]["teacher fold 0"]
    assert teacher["organs"]["Liver"] == {"DSC": 0.75, "NSD": 0.375}
    assert teacher["mean"] == {"DSC": 0.375, "NSD": 0.1875}
    assert teacher["prediction_time_s"] == 9.5 and teacher["peak_ram_mb"] == 1077.0
    assert document["stages"]["fine-tuned fold 0"]["peak_ram_mb"] is None
    json.dumps(document)  # serialisable as it is


def test_device_choice():
    import torch

    from noisy_student_nnunet.demo import DEFAULT_RECIPES, resolve_device
    from noisy_student_nnunet.recipe import load_recipe

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(NsnError, match="--device cuda"):
            resolve_device("cuda")
    with pytest.raises(NsnError, match="--device"):
        resolve_device("tpu")
    for recipe in DEFAULT_RECIPES.values():
        load_recipe(recipe)  # both bundled and valid


def test_cpu_teacher_folds_train_side_by_side():
    import os

    from noisy_student_nnunet.demo import parallel_folds

    cores = len(os.sched_getaffinity(0))
    assert parallel_folds("cpu", 2) == (["-j", "2"] if cores >= 2 else [])
    assert parallel_folds("cpu", 5) == (["-j", str(min(5, cores))] if cores >= 2 else [])
    assert parallel_folds("cuda", 2) == []


def test_a_work_folder_keeps_its_seed(tmp_path):
    from noisy_student_nnunet.demo import run_demo

    dataset = tmp_path / "nnUNet_raw" / "Dataset990_DemoPhantoms"
    dataset.mkdir(parents=True)
    (dataset / "phantoms.json").write_text(json.dumps({"seed": 0, "cases": []}))
    with pytest.raises(NsnError, match="phantoms of seed 0 .* not seed 1 of setting iid"):
        run_demo(tmp_path, seed=1)
    with pytest.raises(NsnError, match="phantoms of seed 0 .* not seed 0 of setting shift"):  # nor its setting
        run_demo(tmp_path, seed=0, setting="shift")


def test_a_second_demo_on_one_work_folder_is_refused_naming_the_first(tmp_path):
    code = ("import sys, time; from noisy_student_nnunet.locks import folder_lock\n"
            "with folder_lock(sys.argv[1], 'nsn demo'):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "noisy_student_nnunet.cli", "demo", "-w", str(tmp_path)],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode != 0 and len(lines) == 1 and f"pid {holder.pid}" in lines[0], second.stderr
    assert not (tmp_path / "nnUNet_raw").exists()  # refused before any work
