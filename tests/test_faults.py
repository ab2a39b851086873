"""Faults of the machine never leave a wrong file that looks right (docs/errors.md "Machine faults").

A full disk (a small tmpfs), damaged or incompatible model files, and two runs on one folder, run with the real
console scripts on real NIfTI files (the variants of a damaged model also through the predictor class in this
process: one subprocess shows the one-line error, the others save its 5 s start-up each). The model is a hand-built
random-weight model folder (tests/model_folders.py, no training): these faults are about files, not about what the
network predicts. The kill-and-rerun test of the whole chain is in test_pipeline.py (it reuses that module's pipeline
run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import console_script, subprocess_env  # noqa: E402
from model_folders import build_model_folder, make_plans, tiny_architecture  # noqa: E402

DATASET_ID = 251  # this module's own nnU-Net folders: no clash with conftest's registry
DATASET = f"Dataset{DATASET_ID:03d}_Faults"
ENV = {"nnUNet_compile": "0", "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "0"}
# the label writers: SimpleITK (nnU-Net's default; returns silently on a full disk) and nibabel (raises)
WRITERS = {"SimpleITKIO": "nnUNetPlans", "NibabelIOWithReorient": "nnUNetPlansNibabel"}


def run(args: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [console_script(str(args[0])), *map(str, args[1:])]
    return subprocess.run(cmd, env=subprocess_env({**ENV, **env}), capture_output=True, text=True, timeout=timeout)


def error_line(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line holding every fragment; returns it."""
    assert done.returncode == code, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def readable_labels(path: Path) -> np.ndarray:
    """The whole label map, decompressed to its end (a truncated gzip stream raises here)."""
    return np.asarray(nib.load(path).dataobj)


@contextmanager
def small_disk(folder: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (unmounted afterwards); skips where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the full-disk tests "
                    f"need one")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def free_space(folder: Path) -> None:
    """The disk is given room again: the tmpfs grows to 8 MiB, its files stay."""
    subprocess.run(["mount", "-o", "remount,size=8m", str(folder)], check=True, capture_output=True)


# --- a random one-fold model per label writer, and inputs whose second case does not fit in 64 KiB -----------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("faults")
    env = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw, pre, res = (Path(env[name]) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    source = write_phantom_dataset(raw, DATASET_ID, name="Faults", num_labeled=1, num_unlabeled=1, seed=4,
                                   slices=(16, 18), inplane_voxels=(48, 52))
    (pre / DATASET).mkdir(parents=True)
    for writer, plans_name in WRITERS.items():
        dataset_json = json.loads((source / "dataset.json").read_text())
        dataset_json.pop("overwrite_image_reader_writer", None)
        plans = make_plans((3.0, 1.2, 1.2), (16, 32, 32), tiny_architecture((4, 8, 16)), dataset_name=DATASET,
                           plans_name=plans_name)
        plans["image_reader_writer"] = writer
        (pre / DATASET / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))
        (pre / DATASET / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        build_model_folder(res / DATASET / f"nnUNetTrainer__{plans_name}__3d_fullres", plans, dataset_json,
                           folds=(0,), trainer_name="nnUNetTrainer", seed=2, head_bias_std=2.0)
    # a_small (5 KiB of labels) fits in 64 KiB with the run's JSON files, b_big (190 KiB: noise gives noisy
    # labels) does not; c_small comes after it and must not be attempted
    inputs = root / "inputs"
    inputs.mkdir()
    phantom = next((source / "imagesUnlabeled").iterdir())
    shutil.copy(phantom, inputs / "a_small_0000.nii.gz")
    shutil.copy(phantom, inputs / "c_small_0000.nii.gz")
    noise = np.random.default_rng(0).normal(0, 300, (160, 160, 48)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, nib.load(phantom).affine), inputs / "b_big_0000.nii.gz")
    small = root / "small_inputs"  # where the size of a case does not matter: quicker
    small.mkdir()
    shutil.copy(phantom, small / "a_small_0000.nii.gz")
    return {"root": root, "env": env, "raw": raw, "pre": pre, "res": res, "inputs": inputs, "small": small,
            "phantom": phantom}


def predict(world, output: Path, plans: str = "nnUNetPlans", *extra, env: dict | None = None,
            inputs: Path | None = None) -> subprocess.CompletedProcess:
    return run(["nnUNetv2_predict_lowfootprint", "-i", inputs or world["inputs"], "-o", output, "-d", DATASET_ID,
                "-p", plans, "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_progress_bar", "-npp", "0",
                "-nps", "0", *extra], {**world["env"], **(env or {})})


def pseudolabel(world, output: str, *extra, env: dict | None = None,
                inputs: Path | None = None) -> subprocess.CompletedProcess:
    return run(["nsn", "pseudolabel", "-d", DATASET_ID, "-i", inputs or world["inputs"], "-o", output, "-f", "0",
                "-tr", "nnUNetTrainer", "-p", "nnUNetPlans", "-device", "cpu", "--disable_progress_bar", *extra],
               {**world["env"], **(env or {})})


# --- full disk ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_disk_prediction_stops_names_the_file_and_a_rerun_completes(world, tmp_path, writer):
    with small_disk(tmp_path / "disk") as out:
        done = predict(world, out, WRITERS[writer])
        line = error_line(done, 3, "b_big.nii.gz", "no space left on device")
        assert str(out / "b_big.nii.gz") in line
        # what was complete stays, readable; nothing else under a final name, no partial file left behind
        names = sorted(p.name for p in out.iterdir())
        assert [n for n in names if n.endswith(".nii.gz")] == ["a_small.nii.gz"], names
        assert not [n for n in names if "partial" in n or n.endswith(".tmp")], names
        assert readable_labels(out / "a_small.nii.gz").shape == nib.load(world["phantom"]).shape
        failed = json.loads((out / ".failed.json").read_text())["failed"]
        assert list(failed) == ["b_big"] and "no space left on device" in failed["b_big"]
        small_mtime = (out / "a_small.nii.gz").stat().st_mtime_ns

        free_space(out)
        done = predict(world, out, WRITERS[writer], "--continue_prediction")
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_small.nii.gz", "b_big.nii.gz", "c_small.nii.gz"]
        assert (out / "a_small.nii.gz").stat().st_mtime_ns == small_mtime  # not predicted again
        assert readable_labels(out / "b_big.nii.gz").shape == (160, 160, 48)
        assert readable_labels(out / "c_small.nii.gz").shape == nib.load(world["phantom"]).shape
        assert not (out / ".failed.json").exists()


def test_full_disk_pseudolabeling_stops_before_marking_a_case_and_a_rerun_completes(world, tmp_path):
    """nnUNet_raw (labels, markers) on a 64 KiB disk; SimpleITK writes the labels (it returns silently)."""
    name = "Dataset252_FullDisk"
    with small_disk(tmp_path / "raw") as raw:
        env = {"nnUNet_raw": str(raw)}
        done = pseudolabel(world, name, env=env)
        line = error_line(done, 3, "b_big.nii.gz", "no space left on device")
        assert str(raw / name / "labelsTr" / "b_big.nii.gz") in line
        labels, cases = raw / name / "labelsTr", raw / name / "pseudolabel_cases"
        assert sorted(p.name for p in labels.iterdir()) == ["a_small.nii.gz"]  # no partial file either
        assert readable_labels(labels / "a_small.nii.gz").shape == nib.load(world["phantom"]).shape
        markers = sorted(p.name for p in cases.iterdir() if not p.name.startswith("."))
        assert markers == ["a_small.json", "b_big.failed.json"], markers  # b_big never marked done
        assert "no space left on device" in json.loads((cases / "b_big.failed.json").read_text())["error"]
        assert not (raw / name / "dataset.json").exists()

        free_space(raw)
        done = pseudolabel(world, name, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 pseudo-labeled, 1 already done, 0 failed" in done.stdout
        assert sorted(p.name for p in labels.iterdir()) == ["a_small.nii.gz", "b_big.nii.gz", "c_small.nii.gz"]
        assert readable_labels(labels / "b_big.nii.gz").shape == (160, 160, 48)
        assert sorted(json.loads((raw / name / "dataset.json").read_text())["dataset"]) == ["a_small", "b_big",
                                                                                            "c_small"]


def test_written_files_are_checked_cheaply_before_their_rename(tmp_path):
    """The check (gzip trailer against the NIfTI header) catches every cut of a label map, and costs a read of
    the header and the last 4 bytes, not a decompression."""
    import SimpleITK as sitk

    from noisy_student_nnunet.outputs import atomic_write_text
    from noisy_student_nnunet.written import WriteFailed, check_file

    labels = np.zeros((30, 50, 40), np.uint8)
    labels[5:20, 10:30, 10:30] = 3
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(whole), True)
    check_file(whole, whole)
    data = whole.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.nii.gz").write_bytes(data[:cut])
        with pytest.raises(WriteFailed, match=r"final.nii.gz: written incompletely"):
            check_file(tmp_path / "cut.nii.gz", tmp_path / "final.nii.gz")
    atomic_write_text(tmp_path / "a.json", '{"a": 1}\n')
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- damaged or incompatible model files ----------------------------------------------------------------------


def _model_copy(world, trainer: str) -> Path:
    """A copy of the SimpleITK model folder under another trainer name (its own results folder)."""
    target = world["res"] / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(world["res"] / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres", target)
    return target


def _damage(world, kind: str) -> tuple[str, Path, str]:
    """(trainer name, file named by the error, fragment of the message) for one kind of damage."""
    import torch

    folder = _model_copy(world, f"Damaged{kind.title()}")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if kind == "truncated":
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
        return folder.name.split("__")[0], checkpoint, "damaged checkpoint"
    if kind == "foreign":
        torch.save({"state_dict": torch.load(checkpoint, weights_only=False)["network_weights"]}, checkpoint)
        return folder.name.split("__")[0], checkpoint, "not an nnU-Net checkpoint (no 'network_weights')"
    if kind == "text":
        checkpoint.write_text("not a checkpoint\n")
        return folder.name.split("__")[0], checkpoint, "damaged checkpoint"
    if kind == "plans":  # plans.json of a wider network than the weights
        plans = json.loads((folder / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["architecture"] = tiny_architecture((8, 16, 32))
        (folder / "plans.json").write_text(json.dumps(plans))
        return folder.name.split("__")[0], checkpoint, "does not match"
    if kind == "second_fold":  # fold 1 holds weights of other plans: named before any case is predicted
        other = make_plans((3.0, 1.2, 1.2), (16, 32, 32), tiny_architecture((8, 16, 32)), dataset_name=DATASET)
        build_model_folder(world["root"] / "other_model", other, folds=(0,))
        (folder / "fold_1").mkdir()
        shutil.copy(world["root"] / "other_model" / "fold_0" / "checkpoint_final.pth", folder / "fold_1")
        return folder.name.split("__")[0], folder / "fold_1" / "checkpoint_final.pth", "does not match"
    raise ValueError(kind)


def test_truncated_checkpoint_is_a_one_line_error_naming_it(world, tmp_path):
    """The issue's finding: a checkpoint cut short gave a 25-line torch traceback."""
    trainer, named, fragment = _damage(world, "truncated")
    done = run(["nnUNetv2_predict_lowfootprint", "-i", world["small"], "-o", tmp_path / "out", "-d", DATASET_ID,
                "-tr", trainer, "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_progress_bar"],
               world["env"])
    error_line(done, 2, str(named), fragment)
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("kind", ["foreign", "text", "plans", "second_fold"])
def test_damaged_or_incompatible_model_files_name_the_file(world, kind):
    """The predictor's loading (also the teacher ensemble's), in this process: NsnError naming the file, which the
    console scripts print as one line with exit status 2 (as the truncated case above shows)."""
    import torch

    from noisy_student_nnunet.errors import NsnError
    from noisy_student_nnunet.inference import LowFootprintPredictor

    trainer, named, fragment = _damage(world, kind)
    predictor = LowFootprintPredictor(device=torch.device("cpu"), precision="fp32", allow_tqdm=False)
    folds = (0, 1) if kind == "second_fold" else (0,)
    with pytest.raises(NsnError) as raised:
        predictor.initialize_from_trained_model_folder(
            str(world["res"] / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"), folds)
    message = str(raised.value)
    assert "\n" not in message and str(named) in message and fragment in message, message


def test_missing_fold_and_damaged_teacher_checkpoint_in_pseudolabel(world):
    done = pseudolabel(world, "Dataset253_NoFold", "-f", "0", "3")
    error_line(done, 2, str(world["res"] / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_3"))
    trainer, named, fragment = _damage(world, "truncated")
    done = run(["nsn", "pseudolabel", "-d", DATASET_ID, "-i", world["inputs"], "-o", "Dataset254_Damaged",
                "-f", "0", "-tr", trainer, "-p", "nnUNetPlans", "-device", "cpu", "--disable_progress_bar"],
               world["env"])
    error_line(done, 2, str(named), fragment)


# --- two runs on one folder -----------------------------------------------------------------------------------


def _hold_lock(folder: Path, name: str) -> subprocess.Popen:
    """Another process holding ``folder/name`` until killed (its pid is in the lock file)."""
    code = ("import sys, time; from noisy_student_nnunet.locks import folder_lock\n"
            "with folder_lock(sys.argv[1], 'a test holder', sys.argv[2]):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), name], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_pseudolabel_run_of_a_part_is_refused_and_a_killed_holder_leaves_no_block(world):
    name, small = "Dataset255_Locked", world["small"]
    done = pseudolabel(world, name, inputs=small)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = world["raw"] / name
    holder = _hold_lock(folder, ".nsn_pseudolabel_part0of1.lock")
    try:
        done = pseudolabel(world, name, inputs=small)
        error_line(done, 2, f"pid {holder.pid} on {socket.gethostname()}", "a test holder", str(folder))
        # a part of another --num-parts would share out the cases differently: refused, naming the running part
        done = pseudolabel(world, name, "--num-parts", "2", "--part-id", "1", inputs=small)
        error_line(done, 2, "part 0/1 is running", f"pid {holder.pid}", "the same --num-parts (this run: 2)")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    other_part = _hold_lock(folder, ".nsn_pseudolabel_part0of2.lock")
    try:  # another part of the same layout is not blocked
        assert pseudolabel(world, name, "--num-parts", "2", "--part-id", "1", inputs=small).returncode == 0
    finally:
        other_part.send_signal(signal.SIGKILL)
        other_part.wait()
    # the holder died by SIGKILL: its lock file (with its pid) stays, and does not block the rerun
    assert str(holder.pid) in (folder / ".nsn_pseudolabel_part0of1.lock").read_text()
    done = pseudolabel(world, name, inputs=small)
    assert done.returncode == 0 and "1 already done" in done.stdout, done.stderr[-3000:]


def test_second_pipeline_on_one_work_folder_is_refused_naming_the_holder(world, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    holder = _hold_lock(work, ".nsn.lock")
    env = subprocess_env({**ENV, **world["env"], "NSN_PYTHON": sys.executable,
                          "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])})
    try:
        start = time.monotonic()
        done = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "run_pipeline.sh"),
                               "-d", str(DATASET_ID), "-u", str(world["inputs"]), "-w", str(work), "-D", "cpu"],
                              env=env, capture_output=True, text=True, timeout=120)
        error_line(done, 2, f"pid {holder.pid} on {socket.gethostname()}", str(work))
        assert time.monotonic() - start < 60 and not (work / "logs" / "plan.log").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("stopped_in", [".npz", ".pkl", ".nii.gz"])
def test_a_full_disk_during_a_multi_file_export_names_the_file_being_written(tmp_path, stopped_in):
    """``--save_probabilities`` writes .npz, .pkl, then the label map: the error names the one the disk filled in
    (it named the label map whatever stopped), and no file, final or temporary, is left."""
    import errno

    from noisy_student_nnunet.inference.export import atomic_outputs
    from noisy_student_nnunet.written import WriteFailed

    suffixes = [".npz", ".pkl", ".nii.gz"]
    with pytest.raises(WriteFailed) as failed:
        with atomic_outputs(str(tmp_path / "case_001"), suffixes) as tmp:
            for suffix in suffixes[: suffixes.index(stopped_in) + 1]:
                Path(tmp + suffix).write_bytes(b"partial")
                time.sleep(0.01)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert failed.value.path == tmp_path / f"case_001{stopped_in}"
    assert list(tmp_path.iterdir()) == []
