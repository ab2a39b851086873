"""The built batchgeneratorsv2 pipelines carry the paper's Tables 4 and 5 value by value.

The expected values below are typed in from the paper (Koehler et al., Tables 4 and 5), not read
from the bundled recipes, so a wrong recipe value fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from noisy_student_nnunet.augmentation import (AxisMirrorTransform, build_training_transforms,
                                               configure_rotation_and_patch, describe_training_transforms)
from noisy_student_nnunet.recipe import load_recipe

# Paper, Table 4 (teacher). p for rotation/scaling is not in the table (stock nnU-Net: 0.2).
TABLE4 = {
    "rotation_deg": (-30, 30),
    "scaling": (0.7, 1.4),
    "gaussian_noise": {"p_sample": 0.1, "variance": (0.0, 0.1)},
    "gaussian_blur": {"p_sample": 0.2, "p_channel": 0.5, "sigma": (0.5, 1.0)},
    "brightness": {"p_sample": 0.15, "range": (0.75, 1.25)},
    "contrast": {"p_sample": 0.15, "range": (0.75, 1.25)},
    "low_resolution": {"p_sample": 0.25, "p_channel": 0.5, "zoom": (0.5, 1.0)},
    "gamma": {"p_sample": 0.1, "range": (0.7, 1.5)},
    "mirror": {"p_sample": 1.0, "p_axis": 0.5},
}
# Paper, Table 5 (student).
TABLE5 = {
    "rotation_deg": (-30, 30),
    "scaling": (0.7, 1.4),
    "gaussian_noise": {"p_sample": 0.15, "variance": (0.0, 0.1)},
    "gaussian_blur": {"p_sample": 0.2, "p_channel": 0.5, "sigma": (0.5, 1.5)},
    "brightness": {"p_sample": 0.15, "range": (0.7, 1.3)},
    "contrast": {"p_sample": 0.15, "range": (0.65, 1.5)},
    "low_resolution": {"p_sample": 0.25, "p_channel": 0.5, "zoom": (0.5, 1.0)},
    "gamma": {"p_sample": 0.15, "range": (0.7, 1.5)},
    "mirror": {"p_sample": 1.0, "p_axis": 0.5},
}

FLARE_PATCH = (40, 224, 192)


def _find(transforms, cls):
    """[(p_sample, transform)] for every transform of type cls, unwrapping RandomTransform."""
    found = []
    for t in transforms.transforms:
        p = 1.0
        if isinstance(t, RandomTransform):
            p, t = t.apply_probability, t.transform
        if isinstance(t, cls):
            found.append((p, t))
    return found


def _one(transforms, cls):
    found = _find(transforms, cls)
    assert len(found) == 1, f"expected exactly one {cls.__name__}, found {len(found)}"
    return found[0]


def _as_tuple(value):
    return tuple(float(v) for v in getattr(value, "contrast_range", value))


def _build(table, patch=FLARE_PATCH, **kwargs):
    rotation, dummy_2d, _, mirror_axes = configure_rotation_and_patch(table, patch)
    ds_scales = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    return build_training_transforms(table, patch, ds_scales, mirror_axes, dummy_2d, **kwargs)


@pytest.mark.parametrize("key, expected", [("teacher_augmentation", TABLE4), ("student_augmentation", TABLE5)])
def test_built_transforms_equal_paper_tables(key, expected):
    transforms = _build(load_recipe("flare22")[key])

    _, spatial = _one(transforms, SpatialTransform)
    assert spatial.rotation == pytest.approx(tuple(math.radians(a) for a in expected["rotation_deg"]))
    assert spatial.p_rotation == 0.2 and spatial.p_scaling == 0.2
    assert _as_tuple(spatial.scaling) == pytest.approx(expected["scaling"])
    assert spatial.p_elastic_deform == 0

    p, noise = _one(transforms, GaussianNoiseTransform)
    assert p == expected["gaussian_noise"]["p_sample"]
    assert _as_tuple(noise.noise_variance) == pytest.approx(expected["gaussian_noise"]["variance"])

    p, blur = _one(transforms, GaussianBlurTransform)
    assert p == expected["gaussian_blur"]["p_sample"]
    assert blur.p_per_channel == expected["gaussian_blur"]["p_channel"]
    assert _as_tuple(blur.blur_sigma) == pytest.approx(expected["gaussian_blur"]["sigma"])

    p, brightness = _one(transforms, MultiplicativeBrightnessTransform)
    assert p == expected["brightness"]["p_sample"]
    assert _as_tuple(brightness.multiplier_range) == pytest.approx(expected["brightness"]["range"])

    p, contrast = _one(transforms, ContrastTransform)
    assert p == expected["contrast"]["p_sample"]
    assert _as_tuple(contrast.contrast_range) == pytest.approx(expected["contrast"]["range"])

    p, lowres = _one(transforms, SimulateLowResolutionTransform)
    assert p == expected["low_resolution"]["p_sample"]
    assert lowres.p_per_channel == expected["low_resolution"]["p_channel"]
    assert _as_tuple(lowres.scale) == pytest.approx(expected["low_resolution"]["zoom"])

    # one gamma only (stock has a second, non-inverted one at p=0.3 that the tables do not list)
    p, gamma = _one(transforms, GammaTransform)
    assert p == expected["gamma"]["p_sample"]
    assert _as_tuple(gamma.gamma) == pytest.approx(expected["gamma"]["range"])
    assert gamma.p_invert_image == 1

    p, mirror = _one(transforms, MirrorTransform)
    assert p == expected["mirror"]["p_sample"]
    assert isinstance(mirror, AxisMirrorTransform) and mirror.p_per_axis == expected["mirror"]["p_axis"]
    assert tuple(mirror.allowed_axes) == (0, 1, 2)


@pytest.mark.parametrize("key", ["teacher_augmentation", "student_augmentation"])
def test_a_table_without_mirroring_builds_no_mirror_and_allows_no_mirrored_inference(key):
    table = load_recipe("demo")[key]
    assert table["mirror"]["p_sample"] == 0  # nnU-Net reads the demo phantoms reoriented to RAS (configs/demo.json)
    rotation, dummy_2d, _, mirror_axes = configure_rotation_and_patch(table, (16, 32, 32))
    assert mirror_axes is None
    transforms = build_training_transforms(table, (16, 32, 32), [[1, 1, 1], [1, 0.5, 0.5]], mirror_axes, dummy_2d)
    assert not any(isinstance(getattr(t, "transform", t), MirrorTransform) for t in transforms.transforms)
    assert "mirror" not in describe_training_transforms(transforms)
    # the paper's tables keep it
    assert configure_rotation_and_patch(load_recipe("flare22")[key], FLARE_PATCH)[3] == (0, 1, 2)


@pytest.mark.parametrize("key", ["teacher_augmentation", "student_augmentation"])
def test_describe_reads_back_the_recipe_table(key):
    table = load_recipe("flare22")[key]
    assert describe_training_transforms(_build(table)) == table


def test_rotation_follows_the_table_not_stocks_dummy_2d_180_degrees():
    table = load_recipe("flare22")["teacher_augmentation"]
    rotation, dummy_2d, initial, mirror_axes = configure_rotation_and_patch(table, FLARE_PATCH)
    assert dummy_2d  # 224 / 40 > 3: stock would rotate +-180 deg in-plane here
    assert np.degrees(rotation) == pytest.approx((-30, 30))
    assert mirror_axes == (0, 1, 2)
    # the initial patch covers the patch rotated by 30 deg in-plane (and stock's 0.85 scale margin)
    assert initial[0] == FLARE_PATCH[0]
    in_plane = (224 * math.cos(math.radians(30)) + 192 * math.sin(math.radians(30))) / 0.85
    assert initial[1] == int(in_plane)
    assert initial[2] >= 192

    # isotropic patch: 3D rotation, no dummy 2D
    rotation, dummy_2d, initial, _ = configure_rotation_and_patch(table, (64, 64, 64))
    assert not dummy_2d and all(i > 64 for i in initial)

    # a recipe asking for +-180 reproduces stock
    wide = {**table, "rotation": {"p_sample": 0.2, "angle_deg": [-180, 180]}}
    rotation, *_ = configure_rotation_and_patch(wide, FLARE_PATCH)
    assert np.degrees(rotation) == pytest.approx((-180, 180))


def test_pipeline_matches_stock_except_the_table():
    """Same transform types in the same order as stock nnU-Net, minus stock's second gamma."""
    table = load_recipe("flare22")["teacher_augmentation"]
    for patch in (FLARE_PATCH, (64, 64, 64)):
        rotation, dummy_2d, _, mirror_axes = configure_rotation_and_patch(table, patch)
        kwargs = dict(use_mask_for_norm=[True], regions=[[1, 2], [2]], ignore_label=3)
        ours = build_training_transforms(table, patch, [[1, 1, 1], [0.5, 0.5, 0.5]], mirror_axes, dummy_2d, **kwargs)
        stock = nnUNetTrainer.get_training_transforms(patch, rotation, [[1, 1, 1], [0.5, 0.5, 0.5]], mirror_axes,
                                                      dummy_2d, **kwargs)

        def kinds(transforms):
            out = []
            for t in transforms.transforms:
                inner = t.transform if isinstance(t, RandomTransform) else t
                out.append(MirrorTransform if isinstance(inner, MirrorTransform) else type(inner))
            return out

        stock_kinds = kinds(stock)
        stock_kinds.remove(GammaTransform)  # the non-inverted p=0.3 gamma
        assert kinds(ours) == stock_kinds
        assert (Convert3DTo2DTransform in kinds(ours)) == dummy_2d
        assert (Convert2DTo3DTransform in kinds(ours)) == dummy_2d
        for kind in (MaskImageTransform, RemoveLabelTansform, ConvertSegmentationToRegionsTransform,
                     DownsampleSegForDSTransform):
            assert kind in kinds(ours)
        _, lowres = _one(ours, SimulateLowResolutionTransform)
        assert lowres.ignore_axes == ((0,) if dummy_2d else None)


@pytest.mark.parametrize("patch", [(16, 64, 48), (32, 32, 32)])
def test_pipeline_runs_on_a_sample(patch):
    """Crop to the patch, labels -1 removed, deep-supervision targets at the right scales."""
    torch.manual_seed(0)
    np.random.seed(0)
    table = load_recipe("flare22")["student_augmentation"]
    rotation, dummy_2d, initial, mirror_axes = configure_rotation_and_patch(table, patch)
    scales = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    transforms = build_training_transforms(table, patch, scales, mirror_axes, dummy_2d)
    for _ in range(3):
        image = torch.randn((1, *initial))
        seg = torch.randint(0, 3, (1, *initial), dtype=torch.int16)
        seg[:, :2] = -1  # padding label of nnU-Net's data loader
        out = transforms(image=image, segmentation=seg)
        assert tuple(out["image"].shape) == (1, *patch)
        targets = out["segmentation"]
        assert isinstance(targets, list) and len(targets) == len(scales)
        for target, scale in zip(targets, scales):
            assert tuple(target.shape[1:]) == tuple(round(p * s) for p, s in zip(patch, scale))
            assert target.min() >= 0


def test_axis_mirror_probability_is_a_parameter():
    image = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    never = AxisMirrorTransform((0, 1, 2), p_per_axis=0.0)
    always = AxisMirrorTransform((0, 1, 2), p_per_axis=1.0)
    assert torch.equal(never(image=image.clone())["image"], image)
    assert torch.equal(always(image=image.clone())["image"], torch.flip(image, (1, 2, 3)))
    torch.manual_seed(0)
    half = AxisMirrorTransform((0, 1, 2), p_per_axis=0.5)
    flips = np.mean([len(half.get_parameters(image=image)["axes"]) for _ in range(2000)])
    assert flips == pytest.approx(1.5, abs=0.1)  # 3 axes x 0.5, as stock MirrorTransform
