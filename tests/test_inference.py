"""LowFootprintPredictor / nnUNetv2_predict_lowfootprint against stock nnU-Net 2.8.1 on the same inputs.

Stock is the reference throughout: stock ``convert_predicted_logits_to_segmentation_with_correct_shape`` on the
same logits for the export, stock ``DefaultPreprocessor`` for preprocessing, stock ``nnUNetPredictor`` for
logits, and the stock ``nnUNetv2_predict`` console script for files end to end.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))
import model_folders as mf  # noqa: E402

from nnunetv2.inference.export_prediction import (  # noqa: E402
    convert_predicted_logits_to_segmentation_with_correct_shape,
    export_prediction_from_logits,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: E402
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from noisy_student_nnunet.inference import LowFootprintPredictor, labels_in_original_geometry  # noqa: E402
from noisy_student_nnunet.inference.export import write_labels  # noqa: E402
from noisy_student_nnunet.inference.preprocessing import preprocess_case  # noqa: E402
from noisy_student_nnunet.predict_cli import main as cli_main  # noqa: E402

BIN = Path(sys.executable).parent
CPU = torch.device("cpu")


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        p, q = a == c, b == c
        out[int(c)] = float(2 * (p & q).sum() / (p.sum() + q.sum()))
    return out


def managers(plans: dict, num_classes: int = mf.NUM_CLASSES):
    pm = PlansManager(plans)
    cm = pm.get_configuration(mf.CONFIGURATION)
    lm = pm.get_label_manager(mf.make_dataset_json(num_classes))
    return pm, cm, lm


def synthetic_properties(pm, cm, spacing_array_order, cropped_shape_transposed, pad=(3, 5, 2)):
    """Properties as stock preprocessing records them, for a crop inside a slightly larger image."""
    tf = pm.transpose_forward
    spacing_t = [spacing_array_order[i] for i in tf]
    net_shape = [int(s) for s in compute_new_shape(cropped_shape_transposed, spacing_t, cm.spacing)]
    before = [s + 2 * p for s, p in zip(cropped_shape_transposed, pad)]
    bbox = [[p, p + s] for s, p in zip(cropped_shape_transposed, pad)]
    props = {
        "spacing": list(spacing_array_order),
        "shape_before_cropping": tuple(before),
        "bbox_used_for_cropping": bbox,
        "shape_after_cropping_and_before_resampling": tuple(cropped_shape_transposed),
    }
    return props, net_shape


def stock_labels(logits, pm, cm, lm, props):
    return convert_predicted_logits_to_segmentation_with_correct_shape(np.array(logits), pm, cm, lm, dict(props))


# ----------------------------------------------------------------------------- export on identical logits
@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1)])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_identical_to_stock_when_no_resampling(transpose_forward, mode):
    plans = mf.make_plans([2.0, 1.0, 1.0], [32, 64, 64], transpose_forward=transpose_forward)
    pm, cm, lm = managers(plans)
    spacing_array = [0.0] * 3
    for axis_t, axis in enumerate(transpose_forward):
        spacing_array[axis] = cm.spacing[axis_t]
    props, net = synthetic_properties(pm, cm, spacing_array, (20, 34, 30))
    assert net == [20, 34, 30]
    logits = mf.smooth_logits(mf.NUM_CLASSES, net, seed=1)
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, mode)
    ref = stock_labels(logits, pm, cm, lm, props)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref)) > 5


def _organ_case(plans_spacing, original_spacing, seed):
    plans = mf.make_plans(plans_spacing, [32, 64, 64])
    pm, cm, lm = managers(plans)
    props, net = synthetic_properties(pm, cm, original_spacing, (80, 192, 192))
    assert net == [40, 96, 96]
    # organs of 12-20 network voxels in-plane radius (19-32 mm at 1.6 mm), 6-10 out of plane
    logits = mf.organ_logits(mf.NUM_CLASSES, net, seed=seed, radius_range=((6, 10), (12, 20), (12, 20)),
                             overlap=False)
    return pm, cm, lm, props, logits


@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_dice_at_2x_upsampling_separate_z(seed):
    """FLARE-like anisotropic plans (z 5 mm -> 2.5 mm, in-plane 1.6 -> 0.8 mm): stock resamples z by order 0
    too, so nearest differs only in-plane."""
    pm, cm, lm, props, logits = _organ_case([5.0, 1.6, 1.6], [2.5, 0.8, 0.8], seed)
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, "nearest")
    ref = stock_labels(logits, pm, cm, lm, props)
    dice = dice_per_class(ours, ref)
    assert len(dice) >= 8
    assert min(dice.values()) >= 0.97, dice


def test_nearest_dice_at_2x_upsampling_isotropic():
    """Trilinear in stock (no separate z): nearest differs along all three axes, a little more."""
    pm, cm, lm, props, logits = _organ_case([3.0, 1.6, 1.6], [1.5, 0.8, 0.8], 0)
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, "nearest")
    ref = stock_labels(logits, pm, cm, lm, props)
    dice = dice_per_class(ours, ref)
    assert min(dice.values()) >= 0.96, dice
    assert np.mean(list(dice.values())) >= 0.97, dice


LINEAR_CASES = {
    # name: (plans spacing (transposed), original spacing (array order), cropped shape (transposed), transpose, kwargs)
    "separate_z_up": ([4.0, 1.2, 1.2], [1.0, 0.6, 0.6], (60, 70, 64), (0, 1, 2), None),
    "trilinear_up": ([2.0, 1.6, 1.6], [1.25, 0.8, 0.8], (40, 70, 64), (0, 1, 2), None),
    "mixed_down_up": ([1.0, 1.0, 1.0], [1.3, 0.7, 1.4], (23, 60, 37), (0, 1, 2), None),
    "separate_z_transposed": ([4.0, 1.0, 1.0], [1.0, 2.0, 0.5], (40, 30, 50), (1, 0, 2), None),
    "force_separate_z_false": ([4.0, 1.2, 1.2], [1.0, 0.6, 0.6], (60, 70, 64), (0, 1, 2),
                               {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": False}),
    "order_z_1": ([4.0, 1.2, 1.2], [1.0, 0.6, 0.6], (60, 70, 64), (0, 1, 2),
                  {"is_seg": False, "order": 1, "order_z": 1, "force_separate_z": None}),
}


@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_linear_matches_stock(name):
    plans_spacing, spacing, cropped, tf, kwargs = LINEAR_CASES[name]
    plans = mf.make_plans(plans_spacing, [32, 64, 64], transpose_forward=tf, probabilities_kwargs=kwargs)
    pm, cm, lm = managers(plans)
    props, net = synthetic_properties(pm, cm, spacing, cropped)
    logits = mf.smooth_logits(mf.NUM_CLASSES, net, seed=2, sigma=2.0)
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, "linear", slab_bytes=2**20)
    ref = stock_labels(logits, pm, cm, lm, props)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    dice = dice_per_class(ours, ref)
    assert len(dice) == mf.NUM_CLASSES - 1
    assert min(dice.values()) >= 0.995, dice
    assert (ours == ref).mean() >= 0.999


def test_linear_falls_back_to_plans_function_for_other_orders():
    """order 3 in the plans: per-channel through stock's own function, running argmax: identical labels."""
    plans = mf.make_plans([4.0, 1.2, 1.2], [32, 64, 64],
                          probabilities_kwargs={"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None})
    pm, cm, lm = managers(plans)
    props, net = synthetic_properties(pm, cm, [2.0, 0.6, 0.6], (16, 40, 36))
    logits = mf.smooth_logits(mf.NUM_CLASSES, net, seed=3, sigma=1.5)
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, "linear")
    np.testing.assert_array_equal(ours, stock_labels(logits, pm, cm, lm, props))


def test_nearest_resampling_rule_is_pixel_centred():
    """Each network voxel becomes a 2x2x2 block at exactly 2x (no half-voxel shift)."""
    plans = mf.make_plans([2.0, 2.0, 2.0], [32, 64, 64])
    pm, cm, lm = managers(plans, num_classes=3)
    props, net = synthetic_properties(pm, cm, [1.0, 1.0, 1.0], (8, 10, 12), pad=(0, 0, 0))
    labels_net = np.random.default_rng(0).integers(0, 3, size=net)
    logits = np.eye(3, dtype=np.float16)[labels_net].transpose(3, 0, 1, 2) * 5
    ours = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, "nearest")
    expected = labels_net.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(ours, expected)


# ----------------------------------------------------------------------------- preprocessing
def assert_equal_up_to_float64_rounding(ours: np.ndarray, ref: np.ndarray) -> None:
    """Stock's preprocessed array, up to the order of float64 additions: the axis-by-axis cubic spline
    (``spline_resize``) sums the same terms in another order, so values that are zero up to rounding (around 1e-16)
    may differ, and a float32 value may move by one unit in its last place; nothing larger."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = max(1.0, float(np.nanmax(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(ours, ref, rtol=2.0 ** -23, atol=1e-13 * scale)


def stock_and_our_preprocessing(image, plans: dict, threads: int = 2) -> tuple[tuple, tuple]:
    """``(data, properties)`` of one image from stock ``DefaultPreprocessor.run_case`` and from ours."""
    pm = PlansManager(plans)
    cm = pm.get_configuration(mf.CONFIGURATION)
    dj = mf.make_dataset_json()
    ref, _, ref_props = DefaultPreprocessor(verbose=False).run_case([str(image)], None, pm, cm, dj)
    return (ref, ref_props), preprocess_case([str(image)], None, pm, cm, dj, threads=threads)


@pytest.mark.parametrize("plans_spacing,transpose", [([3.0, 1.6, 1.6], (0, 1, 2)), ([4.0, 1.2, 1.2], (0, 1, 2)),
                                                     ([1.0, 4.0, 1.0], (1, 0, 2))])
def test_preprocessing_equals_stock(tmp_path, plans_spacing, transpose):
    image = mf.write_ct_image(tmp_path / "c_0000.nii.gz", (30, 70, 64), (0.8, 0.8, 1.5), seed=4)
    plans = mf.make_plans(plans_spacing, [32, 64, 64], transpose_forward=transpose)
    (ref, ref_props), (ours, props) = stock_and_our_preprocessing(image, plans)
    assert_equal_up_to_float64_rounding(ours, ref)
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling", "sitk_stuff"):
        assert props[key] == ref_props[key], key


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("new_shape", [(13, 29, 31), (41, 90, 70), (2, 61, 58)])
def test_3d_resampling_equals_stock(order, new_shape, threads):
    """The lean 3D path (no separate z) against stock ``resample_data_or_seg``, down- and upsampling, in one
    thread and in several (each filters its own lines and interpolates its own output rows or planes): orders 0
    and 1 through scipy's kernel, bit for bit; order 3 axis by axis, up to float64 rounding."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    from noisy_student_nnunet.inference.preprocessing import resample_3d_lean

    data = np.random.default_rng(order).normal(size=(2, 27, 61, 58)).astype(np.float32)
    data[:, :3] = 7.0  # flat regions: clipping to the input range matters
    ref = resample_data_or_seg(data, new_shape, is_seg=False, order=order, do_separate_z=False)
    ours = resample_3d_lean(data, new_shape, order, threads)
    assert ours.dtype == ref.dtype == np.float32
    if order == 3:  # axis by axis (spline_resize)
        assert_equal_up_to_float64_rounding(ours, ref)
    else:
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_separate_z_resampling_equals_stock_bit_for_bit(threads):
    """Thick slices (stock's separate-z path, order 3 in-plane and 0 across): slice by slice, in one thread or in
    several, bit for bit stock's (no denormals are flushed on this path), with 512-voxel rows as in a clinical CT."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    from noisy_student_nnunet.inference.preprocessing import resample_separate_z_lean

    rng = np.random.default_rng(5)
    data = (rng.normal(40, 300, size=(1, 7, 40, 512)) / 300).astype(np.float32)
    data[..., :60] = 0
    new_shape = (4, 19, 230)
    ref = resample_data_or_seg(data, new_shape, is_seg=False, axis=0, order=3, do_separate_z=True, order_z=0)
    ours = resample_separate_z_lean(data, new_shape, 0, 3, threads)
    np.testing.assert_array_equal(ours, ref)


def test_3d_resampling_with_a_nan_spreads_it_as_stock_does():
    """A NaN reaches every output voxel in stock's cubic resampling (its prefilter spreads it along every axis);
    ours falls back to scipy's kernel for such an image."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    from noisy_student_nnunet.inference.preprocessing import resample_3d_lean

    data = np.random.default_rng(2).normal(size=(1, 6, 9, 10)).astype(np.float32)
    data[0, 3, 4, 5] = np.nan
    ref = resample_data_or_seg(data, (12, 9, 7), is_seg=False, order=3, do_separate_z=False)
    ours = resample_3d_lean(data, (12, 9, 7), 3, 2)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))


@pytest.mark.parametrize("threads", [1, 2])
def test_3d_resampling_of_rows_past_the_denormal_horizon_equals_stock(threads):
    """Rows of 538 to 565 samples (with scipy's 12-voxel pad: an image 514 to 541 voxels wide; here 525) drive every
    term of the spline prefilter's start-up sum into float64 denormals; ours flushes them to zero in its worker
    threads. The result must still equal stock's up to float64 rounding (CT-like values, zero slabs, a flat air
    region), and the caller's thread must keep denormals."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    from noisy_student_nnunet.inference.preprocessing import resample_3d_lean

    rng = np.random.default_rng(11)
    data = (rng.normal(40, 300, size=(1, 5, 9, 525)) / 300).astype(np.float32)
    data[..., :80] = -1000 / 300  # air
    data[:, 2, :, 300:] = 0
    new_shape = (3, 5, 230)
    ref = resample_data_or_seg(data, new_shape, is_seg=False, order=3, do_separate_z=False)
    ours = resample_3d_lean(data, new_shape, 3, threads)
    assert_equal_up_to_float64_rounding(ours, ref)
    assert np.float64(5e-324) * np.float64(1.0) != 0, "the caller's thread now flushes denormals"


@pytest.mark.parametrize("seed", range(12))
def test_crop_to_nonzero_without_filling_holes_equals_stock(seed):
    """Stock fills the nonzero mask's holes before taking its box; the lean crop does not, and must crop alike:
    zero borders, zero holes inside, several channels, nothing nonzero at all, nothing zero at all."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    from noisy_student_nnunet.inference.preprocessing import crop_to_nonzero_lean

    rng = np.random.default_rng(seed)
    data = np.zeros((2, 20, 30, 25), np.float32)
    lo = rng.integers(0, 8, 3)
    hi = lo + rng.integers(3, 12, 3)
    data[seed % 2, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.normal(size=tuple(hi - lo)) + 3
    data[:, (lo[0] + hi[0]) // 2, (lo[1] + hi[1]) // 2, lo[2]:hi[2]] = 0  # a zero hole through the middle
    if seed == 10:
        data[:] = 0
    if seed == 11:
        data[:] = -1000
    ref, _, ref_box = crop_to_nonzero(data.copy(), None)
    ours, box = crop_to_nonzero_lean(data.copy())
    assert box == ref_box
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("use_mask", [False, True])
def test_preprocessing_of_a_zero_bordered_image_equals_stock(tmp_path, use_mask):
    """An MR-like image (zero outside the body, zero holes inside) with z-score normalization: without
    use_mask_for_norm the lean crop runs, with it stock's (the filled mask is read); both equal stock's output."""
    import SimpleITK as sitk

    volume = mf.ct_like_volume((24, 60, 56), seed=7).astype(np.float32) + 1000  # air -> about 0
    volume[volume < 300] = 0
    volume[12, 30, 20:30] = 0
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.9, 0.9, 1.4))
    path = tmp_path / "mr_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    plans = mf.make_plans([2.0, 1.5, 1.5], [32, 64, 64])
    configuration = plans["configurations"][mf.CONFIGURATION]
    configuration["normalization_schemes"] = ["ZScoreNormalization"]
    configuration["use_mask_for_norm"] = [use_mask]
    (ref, ref_props), (ours, props) = stock_and_our_preprocessing(path, plans)
    assert_equal_up_to_float64_rounding(ours, ref)
    assert props["bbox_used_for_cropping"] == ref_props["bbox_used_for_cropping"]


# ----------------------------------------------------------------------------- logits, folds, Python API
@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("twofold")
    plans = mf.make_plans([3.0, 1.6, 1.6], [32, 64, 64])
    folder = mf.build_model_folder(root / "model", plans, folds=(0, 1), head_scale=5.0, head_bias_std=1.0)
    image = mf.write_ct_image(root / "in" / "case_a_0000.nii.gz", (30, 80, 72), (0.8, 0.8, 1.5), seed=5)
    return folder, image


def test_fold_average_equals_stock_and_softmax_mode(two_fold_model):
    folder, image = two_fold_model
    stock = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(folder), (0, 1))
    # stock's CPU precision and runtime: fold averaging must equal stock's to the bit (OpenVINO: test_openvino.py)
    ours = LowFootprintPredictor(device=CPU, allow_tqdm=False, precision="fp32", backend="torch")
    ours.initialize_from_trained_model_folder(str(folder), (0, 1))
    data, _ = preprocess_case([str(image)], None, ours.plans_manager, ours.configuration_manager, ours.dataset_json)
    data = torch.from_numpy(data)
    ref = stock.predict_logits_from_preprocessed_data(data)
    got = ours.predict_logits_from_preprocessed_data(data)
    assert got.dtype == torch.float16 and got.device.type == "cpu"
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    # softmax combination = mean of the folds' softmax (returned as its log)
    per_fold = []
    for fold in (0, 1):
        single = LowFootprintPredictor(device=CPU, allow_tqdm=False)
        single.initialize_from_trained_model_folder(str(folder), (fold,))
        per_fold.append(torch.softmax(single.predict_logits_from_preprocessed_data(data).float(), 0))
    mean_prob = (per_fold[0] + per_fold[1]) / 2
    soft = LowFootprintPredictor(device=CPU, allow_tqdm=False, fold_combination="softmax")
    soft.initialize_from_trained_model_folder(str(folder), (0, 1))
    got_soft = soft.predict_logits_from_preprocessed_data(data)
    torch.testing.assert_close(torch.exp(got_soft.float()), mean_prob, atol=2e-3, rtol=1e-2)
    assert (got_soft.float().argmax(0) == mean_prob.argmax(0)).float().mean() > 0.999


def test_python_api_returns_and_writes(two_fold_model, tmp_path):
    folder, image = two_fold_model
    predictor = LowFootprintPredictor(device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    returned = predictor.predict_from_files([[str(image)]], None, num_processes_preprocessing=0,
                                            num_processes_segmentation_export=0)
    assert len(returned) == 1 and returned[0].dtype == np.uint8
    out = tmp_path / "out"
    predictor.predict_from_files([[str(image)]], [str(out / "case_a")], num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_a.nii.gz")))
    np.testing.assert_array_equal(written, returned[0])
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "dataset.json", "plans.json",
                                                     "predict_from_raw_data_args.json"]
    single = predictor.predict_single_npy_array(*_read(image))
    np.testing.assert_array_equal(single, returned[0])


def _read(image):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    return SimpleITKIO().read_images([str(image)])


def test_save_probabilities_is_stock_export(two_fold_model, tmp_path):
    folder, image = two_fold_model
    predictor = LowFootprintPredictor(device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    data, props = preprocess_case([str(image)], None, predictor.plans_manager, predictor.configuration_manager,
                                  predictor.dataset_json)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    predictor.export_case(logits, dict(props), str(tmp_path / "ours"), save_probabilities=True)
    export_prediction_from_logits(logits.numpy(), dict(props), predictor.configuration_manager,
                                  predictor.plans_manager, predictor.dataset_json, str(tmp_path / "stock"),
                                  save_probabilities=True)
    np.testing.assert_array_equal(np.load(tmp_path / "ours.npz")["probabilities"],
                                  np.load(tmp_path / "stock.npz")["probabilities"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "stock.nii.gz"))))
    with open(tmp_path / "ours.pkl", "rb") as f:
        assert pickle.load(f)["bbox_used_for_cropping"] == props["bbox_used_for_cropping"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_nothing(tmp_path):
    plans = mf.make_plans([2.0, 1.0, 1.0], [32, 64, 64])
    pm = PlansManager(plans)
    props = {"sitk_stuff": {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0),
                            "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
    with pytest.raises(AssertionError):
        write_labels(np.zeros((4, 4), dtype=np.uint8), str(tmp_path / "bad"), pm, mf.make_dataset_json(), props)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- console commands end to end
@pytest.fixture(scope="module")
def results_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    plans = mf.make_plans([3.0, 1.6, 1.6], [32, 64, 64])
    mf.results_model_folder(root / "results", plans, head_scale=5.0, head_bias_std=1.0)
    inputs = root / "in"
    mf.write_ct_image(inputs / "case_a_0000.nii.gz", (40, 96, 90), (0.8, 0.8, 1.5), seed=1)
    # exactly the plans' spacing: nothing is resampled, so nearest must equal stock
    mf.write_ct_image(inputs / "case_b_0000.nii.gz", (20, 48, 44), (1.6, 1.6, 3.0), origin=(5.0, -7.5, 12.0),
                      seed=2)
    env = dict(os.environ, nnUNet_results=str(root / "results"), nnUNet_raw=str(root / "raw"),
               nnUNet_preprocessed=str(root / "preprocessed"))
    common = ["-i", str(inputs), "-d", plans["dataset_name"], "-c", mf.CONFIGURATION, "-f", "0", "-device", "cpu",
              "--disable_progress_bar"]
    stock = root / "stock"
    subprocess.run([str(BIN / "nnUNetv2_predict"), *common, "-o", str(stock), "--disable_tta", "-npp", "0",
                    "-nps", "0"], env=env, check=True, capture_output=True)
    ours = root / "ours"
    # fp32 in torch, stock's CPU precision and runtime: these tests are about geometry and export, equal to stock's
    # to the voxel (bf16: test_precision.py; OpenVINO: test_openvino.py)
    done = subprocess.run([str(BIN / "nnUNetv2_predict_lowfootprint"), *common, "-o", str(ours), "--precision",
                           "fp32", "--backend", "torch"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"root": root, "env": env, "common": common, "stock": stock, "ours": ours, "inputs": inputs,
            "plans": plans}


def _image(folder, case):
    return sitk.ReadImage(str(Path(folder) / f"{case}.nii.gz"))


@pytest.mark.parametrize("case", ["case_a", "case_b"])
def test_cli_geometry_equals_stock(results_env, case):
    ours, ref = _image(results_env["ours"], case), _image(results_env["stock"], case)
    source = sitk.ReadImage(str(results_env["inputs"] / f"{case}_0000.nii.gz"))
    assert ours.GetSize() == ref.GetSize() == source.GetSize()
    assert ours.GetSpacing() == ref.GetSpacing()
    assert ours.GetOrigin() == ref.GetOrigin()
    assert ours.GetDirection() == ref.GetDirection()
    assert ours.GetPixelID() == ref.GetPixelID() == sitk.sitkUInt8


def test_cli_nearest_identical_without_resampling(results_env):
    ours = sitk.GetArrayFromImage(_image(results_env["ours"], "case_b"))
    ref = sitk.GetArrayFromImage(_image(results_env["stock"], "case_b"))
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref)) >= 3


def test_linear_export_end_to_end_matches_stock(results_env, monkeypatch):
    """Python API, --export linear: same labels as stock nnUNetv2_predict --disable_tta."""
    folder = Path(results_env["env"]["nnUNet_results"]) / results_env["plans"]["dataset_name"] / \
        f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    predictor = LowFootprintPredictor(device=CPU, allow_tqdm=False, export_mode="linear", precision="fp32",
                                      backend="torch")
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    out = results_env["root"] / "ours_linear"
    predictor.predict_from_files(str(results_env["inputs"]), str(out), num_processes_preprocessing=0,
                                 num_processes_segmentation_export=0)
    for case in ("case_a", "case_b"):
        ours = sitk.GetArrayFromImage(_image(out, case))
        ref = sitk.GetArrayFromImage(_image(results_env["stock"], case))
        dice = dice_per_class(ours, ref)
        assert min(dice.values()) >= 0.995, dice
        assert (ours == ref).mean() >= 0.999


def test_cli_parts_and_continue(results_env, monkeypatch, capsys):
    for key in ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(key, results_env["env"][key])
    out = results_env["root"] / "parts"
    args = [*results_env["common"], "-o", str(out), "-npp", "0", "-nps", "0"]
    assert cli_main([*args, "-num_parts", "2", "-part_id", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_b.nii.gz"]
    before = (out / "case_b.nii.gz").stat().st_mtime_ns
    assert cli_main([*args, "--continue_prediction"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_a.nii.gz", "case_b.nii.gz"]
    assert (out / "case_b.nii.gz").stat().st_mtime_ns == before


@pytest.mark.parametrize("extra,message", [
    (["-i", "/nonexistent/input"], "input folder not found"),
    (["-f", "3"], "checkpoint not found"),
    (["-d", "Dataset991_Missing"], "model folder not found"),
    (["-d", "991"], "-d 991: "),
    (["-part_id", "2"], "-part_id 2"),
    (["--enable_tta", "--disable_tta"], "contradict"),
])
def test_cli_errors_are_one_line(results_env, monkeypatch, capsys, tmp_path, extra, message):
    for key in ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(key, results_env["env"][key])
    args = [*results_env["common"], "-o", str(tmp_path / "out"), *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnUNetv2_predict_lowfootprint: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_accepts_every_stock_argument():
    """Each option of stock nnUNetv2_predict parses here with the same destination and default, but -npp, whose
    default is capped by the cores (documented in predict_cli)."""
    import argparse
    from unittest import mock

    from nnunetv2.inference import predict_from_raw_data as stock_module
    from noisy_student_nnunet.predict_cli import build_parser

    captured = {}

    def fake_parse(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", fake_parse), pytest.raises(SystemExit):
        stock_module.predict_entry_point()
    stock_actions = {a.dest: a for a in captured["parser"]._actions if a.dest != "help"}
    ours = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    for dest, action in stock_actions.items():
        assert dest in ours, dest
        assert ours[dest].option_strings == action.option_strings, dest
        assert ours[dest].default == action.default or dest == "npp", dest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_export_equals_cpu_export():
    pm, cm, lm, props, logits = _organ_case([5.0, 1.6, 1.6], [2.5, 0.8, 0.8], 0)
    for mode in ("nearest", "linear"):
        cpu = labels_in_original_geometry(torch.from_numpy(logits), pm, cm, lm, props, mode)
        gpu = labels_in_original_geometry(torch.from_numpy(logits).cuda(), pm, cm, lm, props, mode)
        assert (cpu == gpu).mean() > 0.9999


@pytest.mark.parametrize("two_d, step", [(False, 3 * 24 * 20), (False, 7 * 20), (True, 3 * 24 * 20)])
def test_patch_accumulation_in_steps_equals_stock(monkeypatch, two_d, step):
    """Weighting a patch and adding it to the fp16 accumulators a few planes and one class at a time gives stock's
    numbers (``prediction *= gaussian``, ``predicted_logits[sl] += prediction``, ``n_predictions[sl[1:]] +=
    gaussian``) bit for bit, for fp16 weights (the predictor's Gaussian), fp32 weights and none (1), in steps of
    whole planes or of rows within a plane."""
    from noisy_student_nnunet.inference import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "ADD_STEP_ELEMENTS", step)  # 3 planes of a 24x20 patch, or 7 rows
    generator = torch.Generator().manual_seed(0)
    patch = (24, 20) if two_d else (11, 24, 20)
    sl = (slice(None), 4, slice(3, 27), slice(5, 25)) if two_d else (slice(None), slice(2, 13), slice(3, 27),
                                                                      slice(5, 25))
    ours = torch.randn((5, 16, 30, 30), generator=generator).half()
    ours_n = torch.rand((16, 30, 30), generator=generator).half()
    stock, stock_n = ours.clone(), ours_n.clone()
    for weights in ((torch.rand(patch, generator=generator) * 10).half(), torch.rand(patch, generator=generator) * 10,
                    1):
        prediction = torch.randn((5, *patch), generator=generator) * 7
        unweighted = prediction.clone()
        LowFootprintPredictor._add_weighted_patch_(ours, ours_n, sl, prediction, weights)
        assert torch.equal(prediction, unweighted)
        prediction *= weights
        stock[sl] += prediction
        stock_n[sl[1:]] += weights
        assert torch.equal(ours, stock) and torch.equal(ours_n, stock_n)


@pytest.mark.parametrize("tile_size", [(40, 224, 192), (17, 33, 31), (5, 80, 7), (1, 64, 64), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_separable_gaussian_equals_stock(tile_size, dtype):
    """The importance map from three 1-D filters equals stock's 3-D ``gaussian_filter`` of a delta, bit for bit."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian as stock_gaussian

    from noisy_student_nnunet.inference.gaussian import compute_gaussian

    for scaling in (1, 10):
        stock = stock_gaussian(tile_size, 1. / 8, scaling, dtype, torch.device("cpu"))
        ours = compute_gaussian(tile_size, 1. / 8, scaling, dtype, torch.device("cpu"))
        assert ours.dtype == stock.dtype and torch.equal(ours, stock)


def test_preprocessing_workers_default_to_the_cores_less_one(monkeypatch):
    """``-npp`` unset: $nnUNet_npp where set, else stock's 3 capped at the usable cores minus one, at least one."""
    from noisy_student_nnunet import predict_cli
    from noisy_student_nnunet.cpu_threads import available_cores

    monkeypatch.setenv("nnUNet_npp", "5")
    assert predict_cli.default_preprocessing_workers() == 5
    monkeypatch.delenv("nnUNet_npp")
    assert predict_cli.default_preprocessing_workers() == max(1, min(3, available_cores() - 1))
    monkeypatch.setattr("noisy_student_nnunet.cpu_threads.available_cores", lambda: 2)
    assert predict_cli.default_preprocessing_workers() == 1
    monkeypatch.setattr("noisy_student_nnunet.cpu_threads.available_cores", lambda: 16)
    assert predict_cli.default_preprocessing_workers() == 3
    npp = next(a for a in predict_cli.build_parser()._actions if a.dest == "npp")
    assert npp.default is None  # decided in main, after the command line


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_argmax_channels_equals_torch_argmax(threads, dtype):
    """The CPU argmax over classes (a running maximum in the scores' own dtype) equals ``torch.argmax`` (first
    maximum wins) with many exact ties, and, in float64, with values closer than float32 can tell apart."""
    from noisy_student_nnunet.inference.resize import argmax_channels

    generator = torch.Generator().manual_seed(threads)
    scores = (torch.randint(0, 4, (6, 20, 60, 70), generator=generator) / 2).to(dtype)  # 0, 0.5, 1, 1.5: ties
    if dtype == torch.float64:
        scores[3] += 1e-12  # above channel 0..2's equal values only in float64
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        labels = argmax_channels(scores)
        labels_300 = argmax_channels(torch.cat([scores] * 50)[:300])
    finally:
        torch.set_num_threads(torch_threads)
    assert labels.dtype == torch.uint8 and labels_300.dtype == torch.int32
    assert torch.equal(labels.long(), torch.argmax(scores, 0))
    assert torch.equal(labels_300.long(), torch.argmax(torch.cat([scores] * 50)[:300], 0))
