"""Stock nnU-Net finds our trainers through its own discovery, in a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import LOWFOOTPRINT_PLANS, console_script

TRAINERS = ("NoisyStudentTeacherTrainer", "NoisyStudentTrainer", "NoisyStudentFinetuneTrainer")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """Only what a fresh login shell has, plus nnU-Net's folders: no nnUNet_extTrainer, no PYTHONPATH."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def test_nnunet_discovery_finds_all_three_trainers_in_a_clean_interpreter():
    code = ("import os\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            f"for name in {TRAINERS!r}:\n"
            "    print('MODULE', name, find(name).__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], env=clean_env({}), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    modules = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("MODULE"))
    assert set(modules) == set(TRAINERS)
    for module in modules.values():
        assert module.startswith("noisy_student_nnunet.trainers."), modules


def test_user_value_of_nnUNet_extTrainer_is_kept(tmp_path):
    code = "import os; print(os.environ['nnUNet_extTrainer'])"
    done = subprocess.run([sys.executable, "-c", code], env=clean_env({"nnUNet_extTrainer": str(tmp_path)}),
                          capture_output=True, text=True, check=True)
    parts = done.stdout.strip().split(os.pathsep)
    assert parts[0] == str(tmp_path)
    assert parts[1].endswith(os.path.join("noisy_student_nnunet", "nnunet_ext"))


def test_nsn_env_prints_an_export_line():
    done = subprocess.run([console_script("nsn"), "env"], env=clean_env({}), capture_output=True, text=True,
                          check=True)
    assert done.stdout.startswith("export nnUNet_extTrainer=")
    assert "nnunet_ext" in done.stdout


def test_stock_nnUNetv2_train_runs_our_teacher_trainer(trained_teacher):
    """The session's teacher was trained by the stock console script in a child without nnUNet_extTrainer
    (conftest scrubs it), -device cpu: it wrote a checkpoint, and the class that ran was ours."""
    stdout = (trained_teacher / "nnUNetv2_train_stdout.txt").read_text()
    assert "Using trainer 'NoisyStudentTeacherTrainer' from:" in stdout
    assert os.path.join("noisy_student_nnunet", "nnunet_ext") in stdout
    import torch

    checkpoint = torch.load(trained_teacher / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "NoisyStudentTeacherTrainer"
    assert checkpoint["current_epoch"] >= 1
    assert (trained_teacher / "validation" / "summary.json").is_file()


def test_unknown_trainer_gives_nnunets_own_error(lowfootprint_plans, nnunet_env):
    dataset = lowfootprint_plans.parent.name
    done = subprocess.run([console_script("nnUNetv2_train"), dataset, "3d_fullres", "0", "-tr", "NoSuchTrainer",
                           "-p", LOWFOOTPRINT_PLANS, "-device", "cpu"], env=clean_env(dict(nnunet_env)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Could not find requested nnunet trainer NoSuchTrainer" in done.stderr
