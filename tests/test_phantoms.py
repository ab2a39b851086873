"""Synthetic abdominal CT phantoms: determinism, geometry, labels, HU and the `nsn phantoms` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from noisy_student_nnunet import cli
from noisy_student_nnunet import phantoms as ph
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.flare import FLARE22_ORGANS, flare22_dataset_labels

SMALL = {"inplane_voxels": (48, 64), "slices": (16, 24)}
ORGANS = {organ.name: organ.label for organ in FLARE22_ORGANS}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def run_nsn(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "noisy_student_nnunet.cli", "phantoms", *args],
                          capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    return ph.write_phantom_dataset(root, 901, num_labeled=4, num_unlabeled=2, num_test=2, seed=3,
                                    drop_probability=0.5, **SMALL)


def test_same_seed_gives_identical_files(tmp_path, dataset):
    again = ph.write_phantom_dataset(tmp_path / "a", 901, num_labeled=4, num_unlabeled=2, num_test=2, seed=3,
                                     drop_probability=0.5, **SMALL)
    first, second = files_of(dataset), files_of(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = ph.write_phantom_dataset(tmp_path / "b", 901, num_labeled=4, num_unlabeled=2, num_test=2, seed=4,
                                     drop_probability=0.5, **SMALL)
    assert files_of(other)["imagesTr/Phantoms_0000_0000.nii.gz"] != first["imagesTr/Phantoms_0000_0000.nii.gz"]


def test_layout_dataset_json_and_unique_ids(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == flare22_dataset_labels() and meta["numTraining"] == 4
    manifest = json.loads((dataset / "phantoms.json").read_text())
    ids = [case["identifier"] for case in manifest["cases"]]
    assert len(ids) == len(set(ids)) == 8
    by_split = {s: sorted(c["identifier"] for c in manifest["cases"] if c["split"] == s)
                for s in ("labeled", "unlabeled", "test")}
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in by_split["labeled"]]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in by_split["labeled"]]
    assert sorted(p.name for p in (dataset / "imagesUnlabeled").iterdir()) == [
        f"{i}_0000.nii.gz" for i in by_split["unlabeled"]]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == [f"{i}.nii.gz" for i in by_split["test"]]
    labels_anywhere = {p.name for p in dataset.rglob("*.nii.gz") if p.parent.name.startswith("labels")}
    assert not any(name.startswith(i) for i in by_split["unlabeled"] for name in labels_anywhere)
    assert not set(by_split["labeled"]) & set(by_split["unlabeled"])


def test_labels_spacing_and_every_organ_unless_dropped(dataset):
    manifest = json.loads((dataset / "phantoms.json").read_text())
    dropped_any = False
    for case in manifest["cases"]:
        image, itk = read(dataset / case["image"])
        assert image.dtype == np.int16 and list(image.shape) == case["shape_zyx"]
        assert np.allclose(itk.GetSpacing()[::-1], case["spacing_zyx"], atol=1e-4)
        assert itk.GetDirection() == tuple(case["direction"]) == ph.SCANNER_ORIENTATIONS[case["orientation"]][0]
        if case["label"] is None:
            continue
        label, itk_label = read(dataset / case["label"])
        assert itk_label.GetSpacing() == itk.GetSpacing() and itk_label.GetOrigin() == itk.GetOrigin()
        counts = np.bincount(label.ravel(), minlength=14)
        assert label.max() <= 13 and len(counts) == 14
        for name, value in ORGANS.items():
            assert (counts[value] == 0) == (name in case["dropped"]), (case["identifier"], name)
            assert counts[value] == case["organ_voxels"][name]
        dropped_any |= bool(case["dropped"])
    assert dropped_any  # drop_probability 0.5 over 6 labeled cases with this seed


def test_scanner_orientations_differ_on_disk_and_nnunets_reader_sees_one_anatomy(dataset):
    """The cases are stored in several orientations; dataset.json names nnU-Net's reorienting reader, and
    through it every labeled case has the liver on the patient's right of the spleen and the oesophagus
    above the kidneys (RAS: x grows to the right, z upwards; the reader returns (z, y, x))."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    meta = json.loads((dataset / "dataset.json").read_text())
    manifest = json.loads((dataset / "phantoms.json").read_text())
    assert len({case["orientation"] for case in manifest["cases"]}) > 1
    reader_class = determine_reader_writer_from_dataset_json(meta, str(dataset / manifest["cases"][0]["image"]))
    assert reader_class.__name__ == ph.PHANTOM_READER_WRITER == "NibabelIOWithReorient"
    on_disk = set()
    for case in manifest["cases"]:
        if case["label"] is None:
            continue
        seg = reader_class().read_seg(str(dataset / case["label"]))[0][0]
        centre = {organ: np.argwhere(seg == ORGANS[organ]).mean(0) for organ in
                  ("liver", "spleen", "esophagus", "right_kidney", "left_kidney") if (seg == ORGANS[organ]).any()}
        if "spleen" in centre:
            assert centre["liver"][2] > centre["spleen"][2], case["identifier"]
        kidney = next(centre[k] for k in ("right_kidney", "left_kidney") if k in centre)
        assert centre["esophagus"][0] > kidney[0], case["identifier"]
        stored, _ = read(dataset / case["label"])
        on_disk.add(tuple(np.argwhere(stored == ORGANS["liver"]).mean(0) > np.array(stored.shape) / 2))
    assert len(on_disk) > 1  # without reorientation the liver lies in different array corners


def test_forced_drop_and_hu_ranges():
    phantom = ph.make_phantom(11, (24, 64, 64), (3.0, 0.8, 0.8), drop=["gallbladder", 3])
    counts = phantom.organ_voxels()
    assert counts["gallbladder"] == 0 and counts["spleen"] == 0 and phantom.dropped == ("gallbladder", "spleen")
    assert all(n > 0 for name, n in counts.items() if name not in ("gallbladder", "spleen"))
    image, label = phantom.image, phantom.label
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert -1024 <= image.min() and image.max() <= 3071
    corners = np.concatenate([image[:, :4, :4].ravel(), image[:, :4, -4:].ravel(), image[:, -4:, :4].ravel()])
    assert abs(np.median(corners) + 1000) <= 3  # air outside the body
    assert (label[:, :4, :4] == 0).all()
    liver = image[label == ORGANS["liver"]].mean()
    assert 20 < liver < 200
    body = image > -500
    assert ((image > -150) & (image < -50)).sum() > 0.05 * body.sum()  # fat
    assert (image > 250).sum() > 0  # bone
    for seed in range(4):  # the smallest accepted volume still holds every organ
        small = ph.make_phantom(seed, (ph.MIN_SLICES, ph.MIN_INPLANE_VOXELS, ph.MIN_INPLANE_VOXELS), (5.0, 0.6, 0.6))
        assert min(small.organ_voxels().values()) > 0


def test_spacing_and_direction_as_requested(tmp_path):
    flipped = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    permuted = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # index x -> physical y, y -> z, z -> x
    cases = [(None, (20, 56, 60), (2.5, 0.7, 0.9)), (flipped, (20, 56, 60), (2.5, 0.7, 0.9)),
             (permuted, (60, 20, 56), (0.9, 2.5, 0.7))]
    centroids = []
    for i, (direction, shape, spacing) in enumerate(cases):
        phantom = ph.make_phantom(5, shape, spacing, direction=direction)
        phantom.write(tmp_path / f"{i}.nii.gz", tmp_path / f"{i}_seg.nii.gz")
        image, itk = read(tmp_path / f"{i}.nii.gz")
        label, _ = read(tmp_path / f"{i}_seg.nii.gz")
        assert image.shape == label.shape == shape
        assert np.allclose(itk.GetSpacing(), spacing[::-1], atol=1e-6)
        assert np.allclose(itk.GetDirection(), direction or np.eye(3).ravel())

        def centre(value):
            index = np.argwhere(label == value).mean(0)[::-1]
            return np.array(itk.TransformContinuousIndexToPhysicalPoint(index.tolist()))

        liver, spleen, esophagus, kidney = (centre(ORGANS[n]) for n in ("liver", "spleen", "esophagus", "right_kidney"))
        assert liver[0] < spleen[0]  # LPS: the liver is on the patient's right (smaller x)
        assert esophagus[2] > kidney[2]  # the oesophagus is superior
        centroids.append(liver)
    # Same seed and the same size per physical axis: the same anatomy wherever the array axes point.
    assert np.allclose(centroids[0], centroids[1], atol=0.5) and np.allclose(centroids[0], centroids[2], atol=0.5)
    placed = ph.make_phantom(5, (20, 56, 60), (2.5, 0.7, 0.9), origin=(10.0, -20.0, 30.0), direction=flipped)
    placed.write(tmp_path / "placed.nii.gz")
    assert np.allclose(read(tmp_path / "placed.nii.gz")[1].GetOrigin(), (10.0, -20.0, 30.0), atol=1e-4)
    with pytest.raises(ValueError):
        ph.make_phantom(5, (20, 56, 60), (2.5, 0.7, 0.9), direction=(0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1))


def test_case_plan_is_stable_and_valid():
    few = ph.plan_cases(3, 2, 1, seed=7)
    more = ph.plan_cases(3, 9, 1, seed=7)
    assert few[:3] == more[:3] and few[-1] == more[-1]  # adding unlabeled cases leaves the others alone
    for case in more:
        assert 24 <= case.shape_zyx[0] <= 64 and 96 <= case.shape_zyx[1] == case.shape_zyx[2] <= 128
        assert 0.6 <= case.spacing_zyx[1] <= 1.0 and 1.0 <= case.spacing_zyx[0] <= 5.0
    clinical = ph.plan_cases(2, 0, 0, seed=1, clinical=True)
    assert all(c.shape_zyx[1:] == (512, 512) and c.shape_zyx[0] >= 200 and c.body_scale for c in clinical)
    assert all(len(c.dropped) == 1 for c in ph.plan_cases(5, 0, 0, drop_probability=1.0))
    with pytest.raises(NsnError):
        ph.plan_cases(1, 0, 0, slices=(30, 20))


@pytest.mark.parametrize("args, fragment", [
    (["-n", "0"], "--num-labeled"),
    (["-u", "x"], "--num-unlabeled"),
    (["--slices", "40", "20"], "--slices"),
    (["--slices", "4", "8"], "--slices"),
    (["--inplane-voxels", "16", "16"], "--inplane-voxels"),
    (["--inplane-spacing", "0", "1"], "--inplane-spacing"),
    (["--slice-spacing", "2", "x"], "--slice-spacing"),
    (["--drop-probability", "1.5"], "--drop-probability"),
    (["--name", "bad name"], "--name"),
])
def test_cli_rejects_bad_values_in_one_line(tmp_path, capsys, args, fragment):
    root = tmp_path / "raw"
    assert cli.main(["phantoms", "-d", "5", "-o", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nsn phantoms: error:") and fragment in err
    assert not root.exists()


def test_cli_subprocess_errors_and_nothing_partial(tmp_path):
    root = tmp_path / "raw"
    bad = run_nsn("-d", "0", "-o", str(root))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "-d" in bad.stderr
    no_root = run_nsn("-d", "5")
    assert no_root.returncode == 2 and "nnUNet_raw" in no_root.stderr
    existing = root / "Dataset005_Phantoms"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    taken = run_nsn("-d", "5", "-n", "1", "-u", "0", "-o", str(root))
    assert taken.returncode == 2 and taken.stderr.count("\n") == 1 and "not empty" in taken.stderr
    assert sorted(p.name for p in root.iterdir()) == ["Dataset005_Phantoms"]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    other = run_nsn("-d", "5", "--name", "Other", "-n", "1", "-u", "0", "-o", str(root))
    assert other.returncode == 2 and "Dataset005_Phantoms" in other.stderr
    assert sorted(p.name for p in root.iterdir()) == ["Dataset005_Phantoms"]


def test_cli_writes_dataset_from_env(tmp_path):
    root = tmp_path / "raw"
    (root / "Dataset006_Phantoms").mkdir(parents=True)  # an empty target folder is fine
    done = run_nsn("-d", "6", "-n", "2", "-u", "1", "-t", "1", "--inplane-voxels", "48", "56",
                   "--slices", "16", "20", env={"nnUNet_raw": str(root)})
    assert done.returncode == 0, done.stderr
    folder = root / "Dataset006_Phantoms"
    assert sorted(p.name for p in folder.iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", "imagesUnlabeled", "labelsTr", "labelsTs", "phantoms.json"]
    assert len(list((folder / "imagesUnlabeled").iterdir())) == 1
    assert [p.name for p in root.iterdir()] == ["Dataset006_Phantoms"]  # no partial folder left


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = ph.make_phantom
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ph.writing, "make_phantom", failing)  # the name write_phantom_dataset calls
    with pytest.raises(OSError):
        ph.write_phantom_dataset(tmp_path, 7, num_labeled=2, num_unlabeled=1, **SMALL)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Cohorts: pathology and acquisition

from dataclasses import replace  # noqa: E402

from noisy_student_nnunet.phantoms.cohorts import COHORTS, MIXES, Condition, Lesion  # noqa: E402

LESION_CASES = [("liver_metastasis", "liver", "portal", "darker"), ("liver_hcc", "liver", "arterial", "brighter"),
                ("liver_cyst", "liver", "native", "darker"), ("kidney_cyst", "left_kidney", "portal", "darker"),
                ("kidney_tumour", "right_kidney", "native", None),
                ("pancreas_adenocarcinoma", "pancreas", "arterial", "darker"),
                ("pancreas_cyst", "pancreas", "portal", "darker")]


@pytest.mark.parametrize("kind,organ,phase,appearance", LESION_CASES)
def test_lesions_are_labeled_as_their_organ_and_look_as_in_their_phase(kind, organ, phase, appearance):
    # sharp kernel: no blur spreads the lesion's HU beyond it, so every changed voxel must be the organ's
    plain = Condition(phase=phase, kernel="sharp", seed=5)
    sick = replace(plain, lesions=(Lesion(organ, kind, 40.0),))
    args = (11, (24, 80, 80), (2.5, 0.8, 0.8))
    healthy, lesioned = ph.make_phantom(*args, condition=plain), ph.make_phantom(*args, condition=sick)
    assert np.array_equal(healthy.label, lesioned.label)  # the lesion is labeled as its organ
    changed = healthy.image != lesioned.image
    assert changed.sum() >= 20
    assert set(np.unique(healthy.label[changed])) == {ORGANS[organ]}
    before, after = healthy.image[changed].astype(float).mean(), lesioned.image[changed].astype(float).mean()
    if appearance == "darker":
        assert after < before - 15
    elif appearance == "brighter":
        assert after > before + 15
    if kind.endswith("cyst"):
        assert abs(after) < 25  # water in every phase


def test_phase_kernel_offset_organ_scale_and_coverage_do_what_they_say():
    args = (4, (24, 80, 80), (2.5, 0.8, 0.8))
    native = ph.make_phantom(*args, condition=Condition(phase="native", kernel="sharp"))
    portal = ph.make_phantom(*args, condition=Condition(phase="portal", kernel="sharp"))
    assert native.info["phase"] == "native" and portal.info["phase"] == "portal"
    kidney = native.label == ORGANS["left_kidney"]
    assert portal.image[kidney].mean() > native.image[kidney].mean() + 60  # enhancing kidney cortex
    shifted = ph.make_phantom(*args, condition=Condition(phase="native", kernel="sharp", hu_offset=20.0))
    assert np.array_equal(shifted.label, native.label)
    inside = native.image > -900  # away from the -1024 clip
    assert abs(float((shifted.image[inside].astype(float) - native.image[inside]).mean()) - 20.0) < 0.5
    big = ph.make_phantom(*args, condition=Condition(organ_scale=(("spleen", 1.5),)))
    small = ph.make_phantom(*args, condition=Condition(organ_scale=(("right_kidney", 0.65),)))
    normal = ph.make_phantom(*args, condition=Condition())
    assert big.organ_voxels()["spleen"] > 1.5 * normal.organ_voxels()["spleen"]
    assert small.organ_voxels()["right_kidney"] < 0.6 * normal.organ_voxels()["right_kidney"]
    soft = ph.make_phantom(*args, condition=Condition(kernel="soft", noise_sd=15.0))
    sharp = ph.make_phantom(*args, condition=Condition(kernel="sharp", noise_sd=15.0))
    liver = soft.label == ORGANS["liver"]
    rough = [float(np.abs(np.diff(p.image.astype(float), axis=2))[liver[:, :, 1:]].mean()) for p in (soft, sharp)]
    assert rough[1] > 1.3 * rough[0]  # the sharp kernel leaves fine-grained noise
    partial = ph.make_phantom(*args, condition=Condition(coverage=(0.0, 160.0)))
    voxels = partial.organ_voxels()
    assert voxels["liver"] > 0 and voxels["right_kidney"] > 0 and voxels["esophagus"] == 0  # ends inside the liver


def test_shift_setting_narrow_labeled_cohort_broad_unlabeled_and_test():
    cases = ph.plan_cases(8, 24, 8, seed=2, setting="shift", inplane_voxels=(72, 80), slices=(16, 24),
                          slice_spacing=(2.5, 3.5))
    labeled = [c for c in cases if c.split == "labeled"]
    assert {c.cohort for c in labeled} == {"pancreas_portal"}
    assert {c.condition.phase for c in labeled} == {"portal"}
    assert all(2.5 <= c.spacing_zyx[0] <= 3.0 and c.condition.coverage is None for c in labeled)
    assert {lesion.organ for c in labeled for lesion in c.condition.lesions} <= {"pancreas"}
    for split in ("unlabeled", "test"):
        chosen = [c for c in cases if c.split == split]
        assert {c.cohort for c in chosen} <= set(MIXES["flare_mix"])
    unlabeled = [c for c in cases if c.split == "unlabeled"]
    assert len({c.cohort for c in unlabeled}) >= 3
    assert len({c.condition.phase for c in unlabeled}) == 3
    assert any(c.condition.lesions and c.condition.lesions[0].organ == "liver" for c in unlabeled)
    thick = [c.spacing_zyx[0] for c in unlabeled if c.cohort == "kidney_native"]
    assert thick and min(thick) >= COHORTS["kidney_native"].slice_spacing[0]
    assert not {c.seed for c in unlabeled} & {c.seed for c in cases if c.split == "test"}  # different cases
    # iid is the phantoms as they were: no cohort draws at all
    assert ph.plan_cases(4, 4, 2, seed=2) == ph.plan_cases(4, 4, 2, seed=2, setting="iid")
    assert all(c.condition == Condition() and c.cohort == "iid" for c in ph.plan_cases(4, 4, 2, seed=2))


def test_cli_writes_a_shift_dataset_whose_cases_can_be_made_again(tmp_path):
    result = run_nsn("-d", "12", "-o", str(tmp_path), "--setting", "shift", "--cohort", "test=kidney_native",
                     "-n", "2", "-u", "2", "-t", "2", "--inplane-voxels", "48", "56", "--slices", "16", "20")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "Dataset012_Phantoms"
    manifest = json.loads((folder / "phantoms.json").read_text())
    assert manifest["cohorts"] == {"labeled": "pancreas_portal", "unlabeled": "flare_mix", "test": "kidney_native"}
    for record in manifest["cases"]:
        assert record["cohort"] == {"labeled": "pancreas_portal", "test": "kidney_native"}.get(
            record["split"], record["cohort"])
        if record["split"] == "test":
            on_disk, _ = read(folder / record["label"])
            assert np.array_equal(ph.remake_case(record).label, on_disk)
    bad = run_nsn("-d", "13", "-o", str(tmp_path), "--cohort", "martian")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "martian" in bad.stderr
