"""`nsn pseudolabel`: mean-softmax ensemble, sharding, resume after a kill, direct preprocessed path, filters,
bad input.

The teachers are two hand-built folds of the real teacher trainer's network (random weights, seeded; fold 1's
segmentation head scaled so its logits are large: averaging logits then differs from averaging softmax).
Images are CT phantoms (nsn phantoms) at their own spacings (resampled to the plans' spacing) plus one case
written at exactly the plans' spacing (no resampling, where the direct path must equal stock preprocessing
bit for bit).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from noisy_student_nnunet import phantoms as ph
from noisy_student_nnunet.pseudolabel import confidence as conf
from noisy_student_nnunet.pseudolabel.run import PseudolabelSettings, finalize, list_input_cases, run_part

LABELED = "Dataset201_PLTest"
PLANS = "nnUNetLowFootprintPlans"
TRAINER = "NoisyStudentTeacherTrainer"
MODEL = f"{TRAINER}__{PLANS}__3d_fullres"
SPACING_ZYX = (3.0, 1.2, 1.2)
HEAD_SCALE_FOLD1 = 25.0


# --- pure logic ------------------------------------------------------------------------------------------


def test_select_cases_keep_top_min_confidence_nan_lowest():
    confidence = {"a": 0.9, "b": 0.5, "c": math.nan, "d": 0.7, "e": 0.7}
    assert conf.select_cases(confidence) == ["a", "b", "c", "d", "e"]
    assert conf.select_cases(confidence, keep_top=0.4) == ["a", "d"]  # ceil(2.0); tie d/e broken by id
    assert conf.select_cases(confidence, keep_top=0.5) == ["a", "d", "e"]  # ceil(2.5) = 3
    assert conf.select_cases(confidence, keep_top=1.0) == ["a", "b", "c", "d", "e"]
    assert conf.select_cases(confidence, min_confidence=0.7) == ["a", "d", "e"]
    with pytest.raises(ValueError):
        conf.select_cases(confidence, keep_top=0.5, min_confidence=0.5)


def test_case_statistics_known_values():
    labels = np.array([[0, 1, 1, 2]], dtype=np.uint8)
    max_prob = np.array([[0.9, 0.6, 0.4, 0.8]], dtype=np.float32)
    folds = np.array([[[0, 1, 1, 2]], [[0, 1, 0, 2]]], dtype=np.uint8)
    row = conf.case_statistics(labels, max_prob, folds, {0: "bg", 1: "liver", 2: "spleen"}, voxel_volume_ml=0.5,
                               low_threshold=0.5)
    assert row["confidence"] == pytest.approx((0.6 + 0.4 + 0.8) / 3)
    assert row["mean_max_prob"] == pytest.approx(0.675)
    assert row["frac_low_confidence"] == pytest.approx(0.25)
    assert row["fold_agreement"] == pytest.approx(2 / 3)  # foreground union: 3 voxels, folds agree on 2
    assert row["fold_dice"] == pytest.approx((2 * 1 / 3 + 1.0) / 2)  # liver 2/3, spleen 1
    assert row["volume_ml_liver"] == pytest.approx(1.0) and row["volume_ml_spleen"] == pytest.approx(0.5)
    empty = conf.case_statistics(np.zeros((1, 4), np.uint8), max_prob, np.zeros((2, 1, 4), np.uint8),
                                 {0: "bg", 1: "liver"}, 1.0)
    assert math.isnan(empty["confidence"]) and math.isnan(empty["fold_agreement"])


def test_softmax_accumulation_in_slabs_equals_full_softmax(monkeypatch):
    import torch

    from noisy_student_nnunet.pseudolabel import ensemble

    monkeypatch.setattr(ensemble, "_SLAB_VOXELS", 7)  # many slabs
    logits = (torch.randn(4, 5, 3, 2, generator=torch.Generator().manual_seed(0)) * 10).half()
    total = torch.zeros(logits.shape, dtype=torch.float32)
    ensemble.add_softmax_(total, logits)
    full = torch.softmax(logits.float(), 0)
    # Not torch.equal: the SIMD width (AVX2 or AVX-512) moves the last bit of a slab's softmax (7.5e-9 seen).
    # 1e-6 still catches a wrong path: a slab skipped, added twice, or softmax over the wrong axis is off by >= 1e-3.
    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)


def test_input_listing_shards_like_nnunet_and_names_bad_files(tmp_path):
    for name in ["b_0000.nii.gz", "a_0000.nii.gz", "c_0000.nii.gz", "d_0000.nii.gz", "two_0001.nii.gz",
                 "nosuffix.nii.gz", "L1_0000.nii.gz", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    cases = list_input_cases(tmp_path, ".nii.gz", 1, labeled_ids={"L1"})
    assert cases.all_ids == ["L1", "a", "b", "c", "d", "nosuffix", "two"]
    assert cases.part(2, 0) == ["L1", "b", "d", "two"] and cases.part(2, 1) == ["a", "c", "nosuffix"]
    assert set(cases.problems) == {"L1", "nosuffix", "two"}
    assert "two_0001.nii.gz" in cases.problems["two"] and "nosuffix.nii.gz" in cases.problems["nosuffix"]
    assert "labeled" in cases.problems["L1"]
    assert cases.files["a"] == [tmp_path / "a_0000.nii.gz"]


# --- a labeled dataset with two teacher folds, and unlabeled phantoms ---------------------------------------


def _write_world(root: Path) -> dict:
    """nnU-Net folders with the labeled dataset (raw phantoms, plans with the tiny recipe, a 2-fold teacher)."""
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from model_folders import build_model_folder, make_plans, tiny_architecture

    from noisy_student_nnunet.phantoms import write_phantom_dataset
    from noisy_student_nnunet.recipe import PLANS_KEY, load_recipe

    raw, pre, res = root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results"
    source = write_phantom_dataset(raw, 201, name="PLTest", num_labeled=2, num_unlabeled=3, seed=3,
                                   slices=(16, 22), inplane_voxels=(48, 60))
    dataset_json = json.loads((source / "dataset.json").read_text())
    plans = make_plans(SPACING_ZYX, (16, 32, 32), tiny_architecture((4, 8, 16)), dataset_name=LABELED,
                       plans_name=PLANS)
    plans["image_reader_writer"] = dataset_json["overwrite_image_reader_writer"]  # as nnU-Net's planner sets it
    plans[PLANS_KEY] = load_recipe("tiny")
    (pre / LABELED).mkdir(parents=True)
    (pre / LABELED / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    (pre / LABELED / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    model = build_model_folder(res / LABELED / MODEL, plans, dataset_json, folds=(0, 1), trainer_name=TRAINER,
                               seed=5, head_bias_std=1.5)
    checkpoint = model / "fold_1" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=False)
    for key in state["network_weights"]:  # fold 1 confident (large logits): logit and softmax means differ
        if key.startswith("decoder.seg_layers."):
            state["network_weights"][key] = state["network_weights"][key] * HEAD_SCALE_FOLD1
    torch.save(state, checkpoint)

    images = root / "unlabeled"
    shutil.copytree(source / "imagesUnlabeled", images)
    # one case exactly at the plans' spacing: no resampling anywhere
    image = sitk.ReadImage(str(images / "PLTest_unl_0000_0000.nii.gz"))
    image.SetSpacing((SPACING_ZYX[2], SPACING_ZYX[1], SPACING_ZYX[0]))
    sitk.WriteImage(image, str(images / "PLTest_exact_0000.nii.gz"), True)
    return {"raw": raw, "pre": pre, "res": res, "images": images, "model": model}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudolabel")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(name, str(root / name))
        mp.setenv("nnUNet_compile", "0")
        mp.delenv("NSN_RECIPE", raising=False)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        info = _write_world(root)
        info["root"] = root
        yield info
        torch.set_num_threads(threads)


def _settings(world, images=None, **kwargs) -> PseudolabelSettings:
    kwargs.setdefault("precision", "fp32")  # stock's CPU precision: the reference test compares with stock
    return PseudolabelSettings(labeled_dataset=LABELED, images_dir=images or world["images"], folds=(0, 1), **kwargs)


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted, unsharded run (direct path) into Dataset300."""
    result = run_part(_settings(world), output="Dataset300_Reference", progress=False)
    assert not result.failed and result.finalized is not None
    return result


def _dataset_outputs(world, name: str) -> dict:
    """Everything a run produces that must be reproducible: label maps, preprocessed arrays, CSV rows."""
    import SimpleITK as sitk
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    raw = world["raw"] / name
    out = {"labels": {}, "data": {}, "seg": {}}
    for path in sorted((raw / "labelsTr").glob("*.nii.gz")):
        out["labels"][path.name] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    folder = world["pre"] / name / f"{PLANS}_3d_fullres"
    dataset = nnUNetDatasetBlosc2(str(folder))
    for case in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(case)
        out["data"][case], out["seg"][case] = np.asarray(data[:]), np.asarray(seg[:])
    with open(raw / "pseudolabel_confidence.csv") as handle:
        out["csv"] = list(csv.DictReader(handle))
    out["dataset_cases"] = sorted(json.loads((raw / "dataset.json").read_text())["dataset"])
    return out


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a["dataset_cases"] == b["dataset_cases"]
    for key in ("labels", "data", "seg"):
        assert sorted(a[key]) == sorted(b[key]), key
        for case in a[key]:
            assert np.array_equal(a[key][case], b[key][case]), (key, case)
    assert a["csv"] == b["csv"]


# --- the ensemble ----------------------------------------------------------------------------------------


def test_pseudolabels_are_argmax_of_mean_softmax_not_mean_logits(world, reference):
    """Independent computation with stock nnU-Net, one fold at a time; the case differs between logit and
    softmax averaging, and the pseudo-label (stored preprocessed seg and exported label file) is the softmax one."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    case = "PLTest_exact"
    predictors = []
    for folds in ((0,), (1,), (0, 1)):
        predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(world["model"]), folds, "checkpoint_final.pth")
        predictors.append(predictor)
    data, _, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(world["images"] / f"{case}_0000.nii.gz")], None, predictors[0].plans_manager,
        predictors[0].configuration_manager, predictors[0].dataset_json)
    data = torch.from_numpy(data)
    probabilities = [torch.softmax(p.predict_logits_from_preprocessed_data(data).float(), 0) for p in predictors[:2]]
    mean_softmax = (probabilities[0] + probabilities[1]) / 2
    expected = mean_softmax.argmax(0).numpy()
    logit_mean_argmax = predictors[2].predict_logits_from_preprocessed_data(data).float().argmax(0).numpy()
    assert (expected != logit_mean_argmax).mean() > 0.01  # the case tells the two apart

    staged = nnUNetDatasetBlosc2(str(world["pre"] / "Dataset300_Reference" / f"{PLANS}_3d_fullres"))
    _, seg, _, properties = staged.load_case(case)
    ours = np.maximum(np.asarray(seg[0]), 0)  # -1 marks background outside the body, as nnU-Net stores it
    top2 = torch.topk(mean_softmax, 2, dim=0).values.numpy()
    ties = (top2[0] - top2[1]) < 1e-6
    assert np.array_equal(ours[~ties], expected[~ties])
    assert ties.mean() < 1e-3
    # the exported label file of a case at the plans' spacing is the same label map, un-cropped
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    reader = recursive_find_reader_writer_by_name(ph.PHANTOM_READER_WRITER)()  # the plans' reader, reorienting
    label = reader.read_seg(str(world["raw"] / "Dataset300_Reference" / "labelsTr" / f"{case}.nii.gz"))[0][0]
    uncropped = insert_crop_into_image(np.zeros(properties["shape_before_cropping"], np.uint8), ours.astype(np.uint8),
                                       properties["bbox_used_for_cropping"])
    assert np.array_equal(label, uncropped)  # identity transpose: the reader's array order is nnU-Net's
    # confidence in the CSV: mean max-probability of the ensemble over its predicted foreground
    rows = {r["case"]: r for r in csv.DictReader(open(world["raw"] / "Dataset300_Reference" /
                                                      "pseudolabel_confidence.csv"))}
    max_prob = mean_softmax.max(0).values.numpy()
    assert float(rows[case]["confidence"]) == pytest.approx(float(max_prob[expected > 0].mean()), rel=1e-4)


def test_direct_path_equals_stock_preprocessing(world, reference):
    """Data identical for every case; seg and properties (incl. oversampling locations) identical where no
    resampling is involved. With resampling the stock path round-trips the labels (nearest neighbour to the image
    grid, linear back); the direct path keeps the teacher's labels of the network grid."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    result = run_part(_settings(world, direct_preprocessed=False), output="Dataset301_Stock", progress=False,
                      num_processes=1)
    assert result.finalized is not None
    direct = nnUNetDatasetBlosc2(str(world["pre"] / "Dataset300_Reference" / f"{PLANS}_3d_fullres"))
    stock = nnUNetDatasetBlosc2(str(world["pre"] / "Dataset301_Stock" / f"{PLANS}_3d_fullres"))
    assert sorted(direct.identifiers) == sorted(stock.identifiers) and len(direct.identifiers) == 4
    for case in direct.identifiers:
        d_data, d_seg, _, d_prop = direct.load_case(case)
        s_data, s_seg, _, s_prop = stock.load_case(case)
        assert np.array_equal(np.asarray(d_data[:]), np.asarray(s_data[:])), case
        assert sorted(d_prop) == sorted(s_prop)
        if case == "PLTest_exact":
            assert np.array_equal(np.asarray(d_seg[:]), np.asarray(s_seg[:]))
            for key in s_prop["class_locations"]:
                assert np.array_equal(np.asarray(d_prop["class_locations"][key]),
                                      np.asarray(s_prop["class_locations"][key])), key
            for key in ("bbox_used_for_cropping", "shape_before_cropping",
                        "shape_after_cropping_and_before_resampling"):
                assert np.array_equal(np.asarray(d_prop[key]), np.asarray(s_prop[key]))


def test_output_is_an_nnunet_dataset_recorded_for_the_student(world, reference):
    import SimpleITK as sitk

    from noisy_student_nnunet.trainers.pseudo_source import locate_pseudo_dataset
    from noisy_student_nnunet.recipe import PLANS_KEY

    raw = world["raw"] / "Dataset300_Reference"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    labeled_json = json.loads((world["raw"] / LABELED / "dataset.json").read_text())
    assert dataset_json["labels"] == labeled_json["labels"]
    assert dataset_json["channel_names"] == labeled_json["channel_names"]
    assert dataset_json["overwrite_image_reader_writer"] == labeled_json["overwrite_image_reader_writer"]
    assert dataset_json["numTraining"] == 4 and not (raw / "imagesTr").exists()  # images are not copied
    for case, entry in dataset_json["dataset"].items():
        image = sitk.ReadImage(entry["images"][0])
        label = sitk.ReadImage(str(raw / entry["label"]))
        assert Path(entry["images"][0]).parent == world["images"]
        assert label.GetSize() == image.GetSize() and np.allclose(label.GetSpacing(), image.GetSpacing())
        assert np.allclose(label.GetOrigin(), image.GetOrigin())
        assert np.allclose(label.GetDirection(), image.GetDirection())
    plans = json.loads((world["pre"] / LABELED / f"{PLANS}.json").read_text())
    assert plans[PLANS_KEY]["student"]["pseudo_dataset"] is not None
    # the student's own lookup accepts it (same plans, labels, channels)
    recipe = dict(plans[PLANS_KEY])
    recipe["student"] = dict(recipe["student"], pseudo_dataset="Dataset300_Reference")
    located = locate_pseudo_dataset(plans, "3d_fullres", labeled_json, recipe)
    assert located.identifiers == sorted(dataset_json["dataset"])
    rows = list(csv.DictReader(open(raw / "pseudolabel_confidence.csv")))
    assert [r["case"] for r in rows] == sorted(dataset_json["dataset"]) and all(r["kept"] == "1" for r in rows)
    assert {f"volume_ml_{n}" for n in labeled_json["labels"] if n != "background"} <= set(rows[0])
    for row in rows:
        assert 0.0 <= float(row["fold_agreement"]) <= 1.0 and 0.0 <= float(row["fold_dice"]) <= 1.0
        assert 1 / 14 <= float(row["mean_max_prob"]) <= 1.0


# --- restartable and sharded ----------------------------------------------------------------------------


def _nsn(*args: str) -> list[str]:
    return [sys.executable, "-m", "noisy_student_nnunet.cli", "pseudolabel", *args]


def test_killed_run_resumes_to_the_uninterrupted_result(world, reference):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _nsn("-d", LABELED, "-i", str(world["images"]), "-f", "0", "1", "-o", "Dataset302_Killed", "-device",
                "cpu", "--disable_progress_bar", "--precision", "fp32")
    cases_dir = world["raw"] / "Dataset302_Killed" / "pseudolabel_cases"
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if cases_dir.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".") for p in cases_dir.iterdir()):
            break
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = [p for p in cases_dir.iterdir() if not p.name.startswith(".")]
    assert 1 <= len(finished) < 4  # killed part-way
    assert not (world["raw"] / "Dataset302_Killed" / "dataset.json").exists()  # not finalized
    for path in (world["raw"] / "Dataset302_Killed" / "labelsTr").glob("[!.]*"):
        assert path.stat().st_size > 0  # whatever is visible under a final name is complete

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} already done" in rerun.stdout
    _assert_same_outputs(_dataset_outputs(world, "Dataset302_Killed"), _dataset_outputs(world, "Dataset300_Reference"))


def test_two_parts_equal_one_unsharded_run(world, reference):
    first = run_part(_settings(world), output="Dataset303_Parts", num_parts=2, part_id=0, progress=False)
    assert first.finalized is None and len(first.done) == 2
    assert not (world["raw"] / "Dataset303_Parts" / "dataset.json").exists()
    second = run_part(_settings(world), output="Dataset303_Parts", num_parts=2, part_id=1, progress=False)
    assert second.finalized is not None and len(second.done) == 2  # the last part finalizes
    assert set(first.done).isdisjoint(second.done)
    _assert_same_outputs(_dataset_outputs(world, "Dataset303_Parts"), _dataset_outputs(world, "Dataset300_Reference"))
    # a rerun of a part does nothing new
    again = run_part(_settings(world), output="Dataset303_Parts", num_parts=2, part_id=0, progress=False,
                     auto_finalize=False)
    assert again.done == [] and again.skipped == first.done


# --- filtering -------------------------------------------------------------------------------------------


def test_keep_top_drops_least_confident_and_refinalizes(world, reference):
    result = finalize(_settings(world), output="Dataset300_Reference", keep_top=0.5)
    rows = {r["case"]: r for r in csv.DictReader(open(world["raw"] / "Dataset300_Reference" /
                                                      "pseudolabel_confidence.csv"))}
    ranked = sorted(rows, key=lambda c: -float(rows[c]["confidence"]))
    assert result.kept == sorted(ranked[:2]) and [c for c in rows if rows[c]["kept"] == "1"] == result.kept
    dataset_json = json.loads((world["raw"] / "Dataset300_Reference" / "dataset.json").read_text())
    assert sorted(dataset_json["dataset"]) == result.kept and dataset_json["numTraining"] == 2
    folder = world["pre"] / "Dataset300_Reference" / f"{PLANS}_3d_fullres"
    assert sorted(p.name[:-5] for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")) == result.kept
    back = finalize(_settings(world), output="Dataset300_Reference")  # the paper's setting: every case
    assert len(back.kept) == 4 and len(list(folder.glob("*.pkl"))) == 4


def test_ignore_below_marks_low_confidence_voxels(world):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    images = world["root"] / "unlabeled_ignore"
    images.mkdir()
    shutil.copy(world["images"] / "PLTest_exact_0000.nii.gz", images)
    result = run_part(_settings(world, images=images, ignore_below=0.9), output="Dataset304_Ignore", progress=False)
    assert result.finalized is not None
    raw = world["raw"] / "Dataset304_Ignore"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["labels"]["ignore"] == 14 == max(dataset_json["labels"].values())
    row = next(csv.DictReader(open(raw / "pseudolabel_confidence.csv")))
    _, seg, _, properties = nnUNetDatasetBlosc2(str(world["pre"] / "Dataset304_Ignore" /
                                                    f"{PLANS}_3d_fullres")).load_case("PLTest_exact")
    seg = np.asarray(seg[:])
    assert 0 < float(row["frac_ignored"]) < 1
    assert (seg == 14).mean() == pytest.approx(float(row["frac_ignored"]), abs=1e-6)
    assert float(row["frac_ignored"]) == pytest.approx(float(row["frac_low_confidence"]))
    assert any(isinstance(k, tuple) and k[0] == -1 for k in properties["class_locations"])  # nnU-Net's ignore sampling
    # the student's lookup accepts a pseudo-labeled dataset whose only extra label is "ignore"
    from noisy_student_nnunet.trainers.pseudo_source import locate_pseudo_dataset
    from noisy_student_nnunet.recipe import PLANS_KEY

    plans = json.loads((world["pre"] / LABELED / f"{PLANS}.json").read_text())
    recipe = dict(plans[PLANS_KEY], student=dict(plans[PLANS_KEY]["student"], pseudo_dataset="Dataset304_Ignore"))
    labeled_json = json.loads((world["raw"] / LABELED / "dataset.json").read_text())
    assert locate_pseudo_dataset(plans, "3d_fullres", labeled_json, recipe).identifiers == ["PLTest_exact"]


# --- bad input -------------------------------------------------------------------------------------------


def _run_cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from noisy_student_nnunet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["pseudolabel", *args, "-device", "cpu", "--disable_progress_bar"])
    return code, out.getvalue(), err.getvalue()


def test_bad_cases_are_named_others_go_on_nothing_half_written(world):
    images = world["root"] / "unlabeled_bad"
    images.mkdir()
    shutil.copy(world["images"] / "PLTest_exact_0000.nii.gz", images / "good_0000.nii.gz")
    (images / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b not really a nifti")
    shutil.copy(world["images"] / "PLTest_exact_0000.nii.gz", images / "twochan_0001.nii.gz")
    labeled_case = sorted((world["raw"] / LABELED / "labelsTr").iterdir())[0].name[:-len(".nii.gz")]
    shutil.copy(world["images"] / "PLTest_exact_0000.nii.gz", images / f"{labeled_case}_0000.nii.gz")

    code, out, err = _run_cli("-d", LABELED, "-i", str(images), "-f", "0", "1", "-o", "Dataset305_Bad")
    assert code == 1
    assert "corrupt_0000.nii.gz" in err and "twochan_0001.nii.gz" in err and f"{labeled_case}_0000.nii.gz" in err
    assert "1 pseudo-labeled" in out and "3 failed" in out
    raw = world["raw"] / "Dataset305_Bad"
    assert [p.name for p in (raw / "labelsTr").iterdir()] == ["good.nii.gz"]
    assert not (raw / "dataset.json").exists()  # not finalized with failures pending
    assert not (world["pre"] / "Dataset305_Bad" / f"{PLANS}_3d_fullres").exists()

    code, out, err = _run_cli("-d", LABELED, "-i", str(images), "-f", "0", "1", "-o", "Dataset305_Bad", "--finalize")
    assert code == 1 and "3 failed left out" in out
    assert sorted(json.loads((raw / "dataset.json").read_text())["dataset"]) == ["good"]


def test_missing_fold_checkpoint_fails_before_any_work(world):
    before = sorted(p.name for p in world["raw"].iterdir())
    code, out, err = _run_cli("-d", LABELED, "-i", str(world["images"]), "-f", "0", "1", "2", "-o", "Dataset306_X")
    assert code == 2 and f"{MODEL}/fold_2/checkpoint_final.pth" in err
    assert sorted(p.name for p in world["raw"].iterdir()) == before


def test_taken_dataset_ids_and_changed_settings_are_refused(world, reference):
    (world["raw"] / "Dataset307_Other").mkdir()
    code, _, err = _run_cli("-d", LABELED, "-i", str(world["images"]), "-f", "0", "1", "-o", "307")
    assert code == 2 and "Dataset307_Other" in err and "taken" in err
    code, _, err = _run_cli("-d", LABELED, "-i", str(world["images"]), "-f", "0", "1", "-o", "Dataset307_Mine")
    assert code == 2 and "Dataset307_Other" in err
    code, _, err = _run_cli("-d", LABELED, "-i", str(world["images"]), "-f", "0", "1", "-o", "201")
    assert code == 2 and "labeled dataset" in err
    # continuing Dataset300 with other folds would mix two ensembles
    code, _, err = _run_cli("-d", LABELED, "-i", str(world["images"]), "-f", "0", "-o", "300")
    assert code == 2 and "pseudolabel.json" in err and "folds" in err
