"""Bad input never gives a wrong score, a traceback or a lost run (docs/errors.md).

Every test is one finding of the issue, run with the real console scripts on real NIfTI files. The model is a
hand-built random-weight nnU-Net model folder (tests/model_folders.py, no training): bad input is about files
and options, not about what the network predicts. Its images are CT phantoms (nsn phantoms).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import console_script, subprocess_env  # noqa: E402
from model_folders import build_model_folder, make_plans, tiny_architecture  # noqa: E402

from noisy_student_nnunet.cli import main as nsn_main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface-distance's scipy namespaces

DATASET_ID = 231  # this module's own nnU-Net folders: no clash with conftest's registry
DATASET = f"Dataset{DATASET_ID:03d}_BadInput"
MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"
ENV = {"nnUNet_compile": "0", "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "0"}


# --- helpers -------------------------------------------------------------------------------------------------


def run(args: list, env: dict | None = None, umask: int = 0o022, timeout: float = 300,
        **kwargs) -> subprocess.CompletedProcess:
    """A console script in a subprocess with a clean environment (``env`` merged in)."""
    cmd = [console_script(str(args[0])), *map(str, args[1:])]
    return subprocess.run(cmd, env=subprocess_env({**ENV, **(env or {})}), capture_output=True, text=True,
                          timeout=timeout, umask=umask, **kwargs)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, and an ``error:`` line holding every fragment; returns that line."""
    assert done.returncode == code, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def truncate(source: Path, target: Path) -> Path:
    """The first half of a file's gzip stream, as an interrupted copy leaves it."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- a labeled dataset with a one-fold random model, and unlabeled phantoms ------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("bad_input")
    env = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw, pre, res = (Path(env[name]) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    source = write_phantom_dataset(raw, DATASET_ID, name="BadInput", num_labeled=1, num_unlabeled=2, seed=4,
                                   slices=(16, 18), inplane_voxels=(48, 52))
    dataset_json = json.loads((source / "dataset.json").read_text())
    plans = make_plans((3.0, 1.2, 1.2), (16, 32, 32), tiny_architecture((4, 8, 16)), dataset_name=DATASET,
                       plans_name="nnUNetPlans")
    (pre / DATASET).mkdir(parents=True)
    (pre / DATASET / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    (pre / DATASET / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    build_model_folder(res / DATASET / MODEL, plans, dataset_json, folds=(0,), trainer_name="nnUNetTrainer", seed=2)
    images = sorted((source / "imagesUnlabeled").iterdir())
    return {"root": root, "env": env, "raw": raw, "pre": pre, "good": images[0], "good2": images[1]}


def predict(world, inputs: Path, output: Path, *extra) -> subprocess.CompletedProcess:
    return run(["nnUNetv2_predict_lowfootprint", "-i", inputs, "-o", output, "-d", DATASET_ID, "-c", "3d_fullres",
                "-f", "0", "-device", "cpu", "--disable_progress_bar", *extra], world["env"])


def pseudolabel(world, inputs: Path, output: str, *extra, umask: int = 0o022) -> subprocess.CompletedProcess:
    return run(["nsn", "pseudolabel", "-d", DATASET_ID, "-i", inputs, "-o", output, "-f", "0", "-tr", "nnUNetTrainer",
                "-p", "nnUNetPlans", "-device", "cpu", "--disable_progress_bar", *extra], world["env"], umask=umask)


# --- every argument is checked before any work starts -----------------------------------------------------------


@pytest.mark.parametrize("number, option, fragment", [
    (240, ["--keep-top", "1.5"], "--keep-top"),
    (242, ["--keep-top", "0"], "--keep-top"),
    (243, ["--min-confidence", "2"], "--min-confidence"),
    (244, ["--num-parts", "0"], "--num-parts must be at least 1"),
    (245, ["-np", "0"], "-np must be at least 1"),
], ids=["keep-top 1.5", "keep-top 0", "min-confidence 2", "num-parts 0", "np 0"])
def test_pseudolabel_options_are_refused_before_the_ensemble_runs(world, number, option, fragment):
    """The filter used to be checked only after the whole ensemble had run, leaving a half-built dataset."""
    before = tree(world["raw"]), tree(world["pre"])
    done = pseudolabel(world, world["good"].parent, f"Dataset{number}_Refused", *option)
    line = assert_one_line_error(done, fragment)
    assert "[0, -1]" not in line
    assert (tree(world["raw"]), tree(world["pre"])) == before  # nothing written, not even the dataset folder


@pytest.mark.parametrize("option, fragment", [
    (["-f", "abc"], "-f"),
    (["-num_parts", "0"], "-num_parts must be at least 1"),
], ids=["f abc", "num_parts 0"])
def test_predictor_options_are_one_line_errors(world, tmp_path, option, fragment):
    done = predict(world, world["good"].parent, tmp_path / "out", *option)
    line = assert_one_line_error(done, fragment)
    assert "0 .. -1" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", ["5", "-0.1", "nan"])
def test_nsd_dsc_threshold_outside_0_1_is_refused(tmp_path, capsys, threshold):
    (tmp_path / "gt").mkdir()
    assert nsn_main(["evaluate", str(tmp_path / "gt"), str(tmp_path / "gt"), "--nsd-dsc-threshold", threshold]) == 2
    assert "--nsd-dsc-threshold" in capsys.readouterr().err


OUTPUT_CASES = {
    # command, what -o (or --plot / --summary) names
    "evaluate -o folder": ("evaluate", "-o", "folder"),
    "evaluate -o below a file": ("evaluate", "-o", "below"),
    "evaluate --summary folder": ("evaluate", "--summary", "folder"),
    "profile -o folder": ("profile", "-o", "folder"),
    "profile --plot below a file": ("profile", "--plot", "below"),
    "phantoms -o below a file": ("phantoms", "-o", "below"),
    "predictor -o file": ("predict", "-o", "file"),
    "predictor -o below a file": ("predict", "-o", "below"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_an_output_path_that_cannot_be_written_is_refused_before_work(world, tmp_path, case):
    command, option, kind = OUTPUT_CASES[case]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = {"folder": tmp_path / "a_folder", "file": blocker, "below": blocker / "sub" / "out.csv"}[kind]
    if kind == "folder":
        target.mkdir()
    marker = tmp_path / "the_command_ran"
    if command == "evaluate":
        gt = tmp_path / "gt"
        gt.mkdir()
        shutil.copy(world["raw"] / DATASET / "labelsTr" / os.listdir(world["raw"] / DATASET / "labelsTr")[0],
                    gt / "case.nii.gz")
        done = run(["nsn", "evaluate", gt, gt, "-np", "1", option, target])
    elif command == "profile":
        done = run(["nsn", "profile", "--no-gpu", option, target, "--", "touch", marker])
        assert not marker.exists()  # refused before the profiled command ran
    elif command == "phantoms":
        done = run(["nsn", "phantoms", "-d", "5", "-n", "1", "-u", "0", "-o", target])
    else:
        done = predict(world, world["good"].parent, target)
    assert_one_line_error(done, option, str(blocker if kind != "folder" else target))


def test_phantom_sizes_beyond_memory_are_refused_before_allocating(tmp_path):
    """2048^3 voxels need far more than the 4 GB address space this run may use: refused by the estimate,
    not by a MemoryError after trying (nor by the kernel's OOM killer)."""
    limit = 4 * 1024**3

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = run(["nsn", "phantoms", "-d", "5", "-n", "1", "-u", "0", "--slices", "2048", "2048", "--inplane-voxels",
                "2048", "2048", "-o", tmp_path / "raw"], preexec_fn=cap_memory, timeout=120)
    assert_one_line_error(done, "2048x2048x2048", "GB", "--slices")
    assert tree(tmp_path / "raw") == []


# --- a bad input file is named in one line; NSN_DEBUG=1 shows the traceback --------------------------------------


@pytest.mark.parametrize("command", ["nsn", "predictor"])
def test_nsn_debug_shows_the_traceback(world, tmp_path, command):
    if command == "nsn":
        args = ["nsn", "evaluate", tmp_path / "missing", tmp_path / "missing"]
    else:
        args = ["nnUNetv2_predict_lowfootprint", "-i", tmp_path / "missing", "-o", tmp_path / "o", "-d", DATASET_ID,
                "-c", "3d_fullres", "-device", "cpu"]
    plain = run(args, world["env"])
    assert_one_line_error(plain, "missing")
    debug = run(args, {**world["env"], "NSN_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_plan_names_the_corrupt_raw_image(tmp_path, damage):
    """nnU-Net's fingerprinting message used to be cut before the file's name; a truncated image went into the
    fingerprint and the preprocessed data silently."""
    from noisy_student_nnunet.phantoms import write_phantom_dataset

    env = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    folder = write_phantom_dataset(env["nnUNet_raw"], 6, num_labeled=2, num_unlabeled=0, slices=(16, 16),
                                   inplane_voxels=(48, 48))
    bad = sorted((folder / "imagesTr").iterdir())[1]
    if damage == "garbage":
        bad.write_bytes(b"this is not an image")
    else:
        truncate(bad, bad)
    done = run(["nsn", "plan", "-d", "6", "--recipe", "tiny", "-np", "1"], env)
    assert_one_line_error(done, bad.name)
    assert not (tmp_path / "nnUNet_preprocessed" / folder.name / "nnUNetPlans.json").exists()


# --- many cases: a bad case is named and skipped, the others finish, a rerun retries only those ---------------


def test_predictor_skips_bad_cases_names_them_and_reruns_only_those(world, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(world["good"], inputs / "good_0000.nii.gz")
    (inputs / "corrupt_0000.nii.gz").write_bytes(gzip.compress(b"not a NIfTI image " * 200))
    truncate(world["good2"], inputs / "truncated_0000.nii.gz")
    shutil.copy(world["good"], inputs / "nosuffix.nii.gz")
    shutil.copy(world["good"], inputs / "twochan_0000.nii.gz")
    shutil.copy(world["good2"], inputs / "twochan_0001.nii.gz")
    bad = {"corrupt": "corrupt_0000.nii.gz", "truncated": "truncated_0000.nii.gz", "nosuffix": "nosuffix.nii.gz",
           "twochan": "twochan_0000.nii.gz"}

    done = predict(world, inputs, out)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    for case, name in bad.items():
        assert any(name in line and case in line for line in done.stderr.splitlines()), (case, done.stderr)
    assert "truncated" in done.stderr and "channel" in done.stderr
    predicted = sorted(p.name for p in out.glob("*.nii.gz"))
    assert predicted == ["good.nii.gz"]  # the good case is done, failed cases left no output
    assert not list(out.glob(".*partial*"))
    failed = json.loads((out / ".failed.json").read_text())["failed"]
    assert sorted(failed) == sorted(bad) and "truncated" in failed["truncated"]
    good_mtime = (out / "good.nii.gz").stat().st_mtime_ns

    # fix one case; the rerun predicts only it (stock's sequential mode, -npp 0 -nps 0, is accepted)
    shutil.copy(world["good2"], inputs / "truncated_0000.nii.gz")
    done = predict(world, inputs, out, "--continue_prediction", "-npp", "0", "-nps", "0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz", "truncated.nii.gz"]
    assert (out / "good.nii.gz").stat().st_mtime_ns == good_mtime
    assert sorted(json.loads((out / ".failed.json").read_text())["failed"]) == ["corrupt", "nosuffix", "twochan"]

    # remove the rest: a clean run removes the list of failures
    for name in ("corrupt_0000.nii.gz", "nosuffix.nii.gz", "twochan_0000.nii.gz", "twochan_0001.nii.gz"):
        (inputs / name).unlink()
    done = predict(world, inputs, out, "--continue_prediction")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / ".failed.json").exists()


@pytest.fixture(scope="module")
def pseudolabel_with_a_truncated_image(world):
    inputs = world["root"] / "unlabeled_truncated"
    inputs.mkdir()
    shutil.copy(world["good"], inputs / "good_0000.nii.gz")
    truncate(world["good2"], inputs / "cut_0000.nii.gz")
    done = pseudolabel(world, inputs, "Dataset241_Truncated", umask=0o022)
    return done, world["raw"] / "Dataset241_Truncated"


def test_pseudolabel_names_a_truncated_image_and_labels_the_others(pseudolabel_with_a_truncated_image):
    done, dataset = pseudolabel_with_a_truncated_image
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert any("cut_0000.nii.gz" in line and "truncated" in line for line in done.stderr.splitlines()), done.stderr
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["good.nii.gz"]
    assert (dataset / "pseudolabel_cases" / "cut.failed.json").is_file()


def test_pseudolabeled_dataset_folder_has_the_umasks_permissions(pseudolabel_with_a_truncated_image):
    _, dataset = pseudolabel_with_a_truncated_image
    assert dataset.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 before


# --- nsn evaluate: exact label values, never a wrapped one -------------------------------------------------


SHAPE = (20, 18, 16)


def save_labels(path: Path, data: np.ndarray) -> Path:
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(data.dtype)
    nib.save(image, str(path))
    return path


def liver(dtype=np.uint8, value=1) -> np.ndarray:
    data = np.zeros(SHAPE, dtype)
    data[4:12, 4:12, 4:10] = value
    return data


@pytest.fixture()
def label_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for name in ("a_good.nii.gz", "b_bad.nii.gz"):
        save_labels(gt / name, liver())
    save_labels(pred / "a_good.nii.gz", liver())
    return gt, pred


@pytest.mark.parametrize("where, dtype, value, shown", [
    ("prediction", np.uint16, 257, "257"),  # wrapped to 1 = liver: DSC 1.0 before
    ("prediction", np.uint8, 99, "99"),  # ignored without a word before
    ("prediction", np.int16, -1, "-1"),  # wrapped to 255 before
    ("prediction", np.float32, 1.5, "1.5"),  # truncated to 1 = liver before
    ("prediction", np.float32, np.nan, "NaN"),
    ("reference", np.uint8, 99, "99"),
])
def test_label_values_outside_the_label_set_fail_the_case_naming_file_and_values(label_folders, tmp_path, capsys,
                                                                                 where, dtype, value, shown):
    gt, pred = label_folders
    save_labels(pred / "b_bad.nii.gz", liver(dtype, value) if where == "prediction" else liver())
    if where == "reference":
        save_labels(gt / "b_bad.nii.gz", liver(dtype, value))
    csv_path, summary = tmp_path / "r.csv", tmp_path / "s.json"
    code = nsn_main(["evaluate", str(gt), str(pred), "-np", "1", "-o", str(csv_path), "--summary", str(summary)])
    err = capsys.readouterr().err
    assert code == 1
    bad_file = str((gt if where == "reference" else pred) / "b_bad.nii.gz")
    assert any(bad_file in line and shown in line for line in err.splitlines()), err
    rows = csv_path.read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["a_good.nii.gz"]  # the bad case is not scored
    assert list(json.loads(summary.read_text())["failed_cases"]) == ["b_bad.nii.gz"]


def test_unknown_labels_as_background_counts_them_with_a_warning(label_folders, tmp_path, capsys):
    gt, pred = label_folders
    predicted = liver()
    predicted[14:18, 14:17, 12:15] = 99  # an unknown label beside a correct liver
    save_labels(pred / "b_bad.nii.gz", predicted)
    csv_path = tmp_path / "r.csv"
    args = ["evaluate", str(gt), str(pred), "-np", "1", "-o", str(csv_path)]
    assert nsn_main(args) == 1
    capsys.readouterr()
    assert nsn_main(args + ["--unknown-labels-as-background"]) == 0
    err = capsys.readouterr().err
    assert any("warning" in line and "b_bad.nii.gz" in line and "99" in line for line in err.splitlines()), err
    rows = {row.split(",")[0]: row.split(",") for row in csv_path.read_text().splitlines()[1:]}
    assert float(rows["b_bad.nii.gz"][1]) == 1.0  # Liver_DSC: 99 counted as background

    save_labels(pred / "b_bad.nii.gz", liver(np.float32, 1.5))  # not a label at all: still an error
    assert nsn_main(args + ["--unknown-labels-as-background"]) == 1
    assert "non-integer" in capsys.readouterr().err


def test_evaluate_names_a_truncated_file_instead_of_eoferror(label_folders, capsys):
    gt, pred = label_folders
    save_labels(pred / "b_bad.nii.gz", liver())
    truncate(pred / "b_bad.nii.gz", pred / "b_bad.nii.gz")
    assert nsn_main(["evaluate", str(gt), str(pred), "-np", "1"]) == 1
    err = capsys.readouterr().err
    assert "EOFError" not in err
    assert any(str(pred / "b_bad.nii.gz") in line and "truncated" in line for line in err.splitlines()), err


@pytest.mark.parametrize("value", ['"one"', "1.5", "true", "[1, 2.5]"])
def test_labels_json_with_a_non_integer_value_is_a_one_line_error(tmp_path, value):
    labels = tmp_path / "dataset.json"
    labels.write_text('{"labels": {"background": 0, "liver": %s}}' % value)
    (tmp_path / "gt").mkdir()
    done = run(["nsn", "evaluate", tmp_path / "gt", tmp_path / "gt", "--labels", labels])
    assert_one_line_error(done, str(labels), "liver")


def test_evaluate_messages_are_not_printed_on_the_progress_bar_line(label_folders):
    gt, pred = label_folders
    save_labels(pred / "b_bad.nii.gz", liver()[:, :, :-1])  # other shape: a failed case
    done = run(["nsn", "evaluate", gt, pred, "-np", "1"])
    assert done.returncode == 1
    lines = [line for line in done.stderr.split("\n") if "b_bad.nii.gz" in line]
    assert lines, done.stderr
    for line in lines:  # what the terminal shows of the line: the text after the last carriage return
        shown = line.split("\r")[-1]
        assert "%|" not in shown and (shown.startswith("nsn evaluate") or shown.startswith("  b_bad")), repr(line)


# --- outputs are complete or absent, with the umask's permissions --------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)], ids=["umask 022", "umask 002"])
@pytest.mark.parametrize("command", ["evaluate", "profile"])
def test_written_files_have_the_umasks_permissions(label_folders, tmp_path, command, umask, mode):
    gt, pred = label_folders
    shutil.copy(pred / "a_good.nii.gz", pred / "b_bad.nii.gz")
    if command == "evaluate":
        files = [tmp_path / "r.csv", tmp_path / "s.json"]
        done = run(["nsn", "evaluate", gt, pred, "-np", "1", "-o", files[0], "--summary", files[1]], umask=umask)
    else:
        files = [tmp_path / "p.json", tmp_path / "p.png"]
        done = run(["nsn", "profile", "--no-gpu", "-o", files[0], "--plot", files[1], "--", "true"], umask=umask)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in files:
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))  # 0600 before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_read_checked_trusts_a_read_only_once_its_gzip_stream_checks_out(tmp_path):
    """The gzip check runs beside the reader's read: a cut stream is a CaseError naming the file whether the read
    returned (SimpleITK reads the missing voxels as zeros) or failed; on a whole file the read's result, or its own
    error, comes through."""
    import SimpleITK as sitk

    from noisy_student_nnunet.errors import CaseError
    from noisy_student_nnunet.io_checks import read_checked

    whole = tmp_path / "whole_0000.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (40, 64, 64)).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(whole), True)
    cut = truncate(whole, tmp_path / "cut_0000.nii.gz")

    def read(paths):
        return sitk.GetArrayFromImage(sitk.ReadImage(paths[0]))

    assert read_checked([whole], 1, read).shape == (40, 64, 64)
    assert read([str(cut)]).shape == (40, 64, 64)  # the reader alone takes the cut file
    with pytest.raises(CaseError, match="cut_0000.nii.gz: truncated file"):
        read_checked([cut], 1, read)

    def failing(paths):
        raise RuntimeError("reader failed")

    with pytest.raises(CaseError, match="cut_0000.nii.gz: truncated file"):
        read_checked([cut], 1, failing)
    with pytest.raises(RuntimeError, match="reader failed"):
        read_checked([whole], 1, failing)
    with pytest.raises(CaseError, match="expects 2"):
        read_checked([whole], 2, read)
    with pytest.raises(CaseError, match="missing_0000.nii.gz: file not found"):
        read_checked([tmp_path / "missing_0000.nii.gz"], 1, read)


def test_read_checked_decompresses_once_for_simpleitk_and_still_names_a_bad_stream(tmp_path, monkeypatch):
    """With nnU-Net's SimpleITKIO each .nii.gz is decompressed once, checked, into an in-memory .nii that the reader
    gets instead (it would decompress the stream a second time): the same array and geometry as reading the
    original, the copies and their links gone afterwards, no descriptor left open; a cut or corrupt stream is a
    CaseError naming the original file; where no copy can be made, the check runs beside the read of the
    original."""
    import SimpleITK as sitk
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from noisy_student_nnunet import io_checks
    from noisy_student_nnunet.errors import CaseError
    from noisy_student_nnunet.io_checks import read_checked, reads_plain_nifti

    assert reads_plain_nifti(SimpleITKIO) and not reads_plain_nifti(NibabelIO)
    files = []
    for channel in range(2):
        image = sitk.GetImageFromArray(
            np.random.default_rng(channel).integers(-1000, 1000, (30, 48, 40)).astype(np.int16))
        image.SetSpacing((0.8, 0.7, 2.5))
        image.SetOrigin((-10.0, 20.5, 3.0))
        image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        files.append(tmp_path / f"case_{channel:04d}.nii.gz")
        sitk.WriteImage(image, str(files[-1]), True)
    expected, expected_properties = SimpleITKIO().read_images([str(f) for f in files])
    seen = []

    def read(paths):
        seen.append(list(paths))
        assert all(Path(path).is_file() for path in paths)
        return SimpleITKIO().read_images(paths)

    open_before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    data, properties = read_checked(files, 2, read, reads_plain_nifti=True)
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == open_before
    np.testing.assert_array_equal(data, expected)
    assert properties["spacing"] == expected_properties["spacing"]
    assert properties["sitk_stuff"] == expected_properties["sitk_stuff"]
    assert len(seen) == 1  # the reader read the copies (no retry with the originals)
    assert all(path.endswith(".nii") and path not in map(str, files) for path in seen[0])
    assert not any(Path(path).exists() for path in seen[0])  # the copies are removed

    cut = truncate(files[1], tmp_path / "cut_0001.nii.gz")
    with pytest.raises(CaseError, match="cut_0001.nii.gz: truncated file"):
        read_checked([files[0], cut], 2, read, reads_plain_nifti=True)
    flipped = bytearray(files[0].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt_0000.nii.gz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CaseError, match="corrupt_0000.nii.gz: corrupt gzip data"):
        read_checked([corrupt], 1, read, reads_plain_nifti=True)

    monkeypatch.setattr(io_checks, "_memory_for_copies", lambda needed: False)
    seen.clear()
    data, _ = read_checked(files, 2, read, reads_plain_nifti=True)
    np.testing.assert_array_equal(data, expected)
    assert seen == [[str(f) for f in files]]
    with pytest.raises(CaseError, match="cut_0001.nii.gz: truncated file"):
        read_checked([files[0], cut], 2, read, reads_plain_nifti=True)
