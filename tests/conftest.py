"""Shared session fixtures: nnU-Net folders in tmp, a small phantom dataset, tiny low-footprint plans.

Session-scoped so that the (slow) nnU-Net fingerprinting, planning and preprocessing happen once per
test run. Tests run console scripts (``nsn``, ``nnUNetv2_*``) in subprocesses with
``subprocess_env(nnunet_env)`` or the ``run_cli`` fixture, never by changing this process's
environment. Fixtures return paths; tests that write must write to their own names (another plans
name, another results trainer) so that they do not disturb each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest

BIN = Path(sys.executable).parent
# Every dataset id the session-wide nnUNet_raw/nnUNet_preprocessed folders hold. nnU-Net refuses an id with two
# names ("More than one dataset name found"), so each test module takes its ids from here, never a literal.
PHANTOM_ID = 911
STUDENT_PSEUDO_ID = 912  # test_student: a second "Phantoms" dataset, case identifiers equal to the labeled ones
STUDENT_IGNORE_ID = 913  # test_student: the pseudo dataset with an "ignore" label
PIPELINE_PSEUDO_ID = 914  # test_pipeline: run_pipeline.sh's pseudo-labeled dataset
OVERRIDE_PSEUDO_ID = 915  # test_recipe_override: `nsn pseudolabel` of the session teacher, own plans name
PIPELINE_KILLED_PSEUDO_ID = 916  # test_pipeline: the pipeline killed at every stage and rerun
PHANTOM_NAME = "Phantoms"
LOWFOOTPRINT_PLANS = "nnUNetLowFootprintPlans"
# Variables of ours or nnU-Net's that a developer's shell may set and that would leak into tests.
# nnUNet_extTrainer too: every child must find our trainers through the installed start-up hook alone.
_SCRUB = ("NSN_RECIPE", "NSN_PSEUDO_DATASET", "NSN_FINETUNE_FROM", "nnUNet_raw", "nnUNet_preprocessed",
          "nnUNet_results", "nnUNet_extTrainer")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state (torch, numpy, random): a test that draws data without
    its own generator gets the same draw on every run and every machine."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """A clean copy of os.environ with ours/nnU-Net's variables removed, then ``extra`` merged in."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra)
    return env


def console_script(name: str) -> str:
    """Path of a console script installed next to this interpreter (nsn, nnUNetv2_train, ...)."""
    path = BIN / name
    return str(path) if path.exists() else name


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> dict[str, str]:
    """nnUNet_raw / _preprocessed / _results in a session tmp folder, plus CPU-friendly nnU-Net settings."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        env[var] = str(root / var)
    env.update({
        "nnUNet_n_proc_DA": "0",  # data augmentation in the main process: deterministic, 2-core friendly
        "nnUNet_compile": "0",
        "nnUNet_def_n_proc": "2",
        # one torch/OpenMP thread per process: on a small shared machine 2 threads of tiny 3D convolutions
        # ran 5x slower than 1 (oversubscription)
        "OMP_NUM_THREADS": "1",
    })
    return env


@pytest.fixture(scope="session")
def run_cli(nnunet_env) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(["nsn", "plan", ...], env_extra={}, check=True, timeout=...)`` in the nnU-Net test env."""

    def run(args: Sequence[str], env_extra: dict[str, str] | None = None, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [console_script(args[0]), *map(str, args[1:])]
        done = subprocess.run(cmd, env=subprocess_env({**nnunet_env, **(env_extra or {})}), capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n--- stdout ---\n{done.stdout[-5000:]}"
                                 f"\n--- stderr ---\n{done.stderr[-5000:]}")
        return done

    return run


@pytest.fixture(scope="session")
def phantom_dataset(nnunet_env) -> tuple[int, Path]:
    """(dataset_id, raw folder): 8 labeled, 4 unlabeled and 2 test phantoms, small (24-40 x 64-80 x 64-80)."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    folder = write_phantom_dataset(nnunet_env["nnUNet_raw"], PHANTOM_ID, name=PHANTOM_NAME, num_labeled=8,
                                   num_unlabeled=4, num_test=2, seed=0, inplane_voxels=(64, 80), slices=(24, 40),
                                   slice_spacing=(2.0, 3.0))
    return PHANTOM_ID, folder


@pytest.fixture(scope="session")
def lowfootprint_plans(phantom_dataset, nnunet_env, run_cli) -> Path:
    """The phantom dataset planned with ``nsn plan --recipe tiny`` (stock planning + preprocessing run first).

    Returns the path of nnUNetLowFootprintPlans.json; stock nnUNetPlans.json and the preprocessed
    3d_fullres data sit next to it.
    """
    dataset_id, _ = phantom_dataset
    run_cli(["nsn", "plan", "-d", dataset_id, "--recipe", "tiny", "-np", "2"])
    plans = Path(nnunet_env["nnUNet_preprocessed"]) / f"Dataset{dataset_id:03d}_{PHANTOM_NAME}" / \
        f"{LOWFOOTPRINT_PLANS}.json"
    assert plans.is_file()
    return plans


@pytest.fixture(scope="session")
def trained_teacher(lowfootprint_plans, phantom_dataset, nnunet_env, run_cli) -> Path:
    """fold_0 of NoisyStudentTeacherTrainer trained by stock ``nnUNetv2_train ... -device cpu`` (tiny recipe).

    Trained once per session (2 epochs x 4 iterations, then nnU-Net's own validation of the fold);
    tests needing a trained low-footprint model should use this instead of training their own.
    """
    dataset_id, _ = phantom_dataset
    done = run_cli(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "NoisyStudentTeacherTrainer",
                    "-p", LOWFOOTPRINT_PLANS, "-device", "cpu"], timeout=1500)
    fold = (Path(nnunet_env["nnUNet_results"]) / lowfootprint_plans.parent.name /
            f"NoisyStudentTeacherTrainer__{LOWFOOTPRINT_PLANS}__3d_fullres" / "fold_0")
    assert (fold / "checkpoint_final.pth").is_file()
    (fold / "nnUNetv2_train_stdout.txt").write_text(done.stdout)  # for the registration test
    return fold
