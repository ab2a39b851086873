"""The paper's augmentation tables (Tables 4 and 5) as batchgeneratorsv2 transforms.

:func:`build_training_transforms` is nnU-Net 2.8.1's ``nnUNetTrainer.get_training_transforms`` with the
augmentation values taken from a recipe table instead of being hard-coded. Everything stock does that
is not augmentation is kept as is: cropping to the patch inside ``SpatialTransform``, dummy-2D handling
for anisotropic patches, masking for ``use_mask_for_norm``, ``RemoveLabel -1 -> 0``, cascade
transforms, region conversion (with the ignore label) and deep-supervision downsampling.

Readings of the tables (documented in the README as well):

* Gamma: the tables have one gamma row, p=0.1 for the teacher. In nnU-Net (v1, which the authors
  used, and v2) p=0.1 is the *inverted* gamma transform; stock adds a second, non-inverted gamma at
  p=0.3 that the tables do not list. We build exactly one gamma transform, ``invert_image`` taken from
  the recipe (true in both bundled recipes).
* Rotation: stock nnU-Net rotates +-180 deg in-plane when the patch is anisotropic (dummy-2D, e.g.
  40x224x192); the tables say +-30 deg. The table wins: the rotation comes from the recipe in every
  case, and the initial (pre-crop) patch size is computed for that rotation. A recipe with
  ``angle_deg: [-180, 180]`` reproduces stock.
* Rotation and scaling p_sample (0.2) are not in the tables; they are stock's ``p_rotation`` and
  ``p_scaling``, which the authors' nnU-Net used.
* Mirroring p_axis: stock's ``MirrorTransform`` flips each allowed axis with a hard-coded p=0.5
  (= the tables' p_axis). :class:`AxisMirrorTransform` makes p_axis a parameter; at 0.5 it behaves
  like stock.
* Gaussian noise sigma^2 goes to ``noise_variance`` unchanged, as stock does (batchgenerators samples
  that value and uses it as the noise standard deviation, in v1 and v2 alike).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

#: nnU-Net's anisotropy threshold (nnunetv2.configuration.ANISO_THRESHOLD), repeated to keep this import light
ANISO_THRESHOLD = 3
#: the scale range stock nnU-Net uses for the initial patch size (not the scaling augmentation's range)
INITIAL_PATCH_SCALE_RANGE = (0.85, 1.25)


class AxisMirrorTransform(MirrorTransform):
    """``MirrorTransform`` with the per-axis flip probability as a parameter (stock hard-codes 0.5)."""

    def __init__(self, allowed_axes: tuple[int, ...], p_per_axis: float = 0.5):
        super().__init__(allowed_axes)
        self.p_per_axis = float(p_per_axis)

    def get_parameters(self, **data_dict) -> dict:
        return {"axes": [i for i in self.allowed_axes if torch.rand(1) < self.p_per_axis]}


def rotation_radians(table: dict[str, Any]) -> tuple[float, float]:
    """The table's rotation range in radians (what ``SpatialTransform`` takes)."""
    low, high = table["rotation"]["angle_deg"]
    return (math.radians(low), math.radians(high))


def configure_rotation_and_patch(table: dict[str, Any], patch_size: Sequence[int]
                                 ) -> tuple[tuple[float, float], bool, np.ndarray, tuple[int, ...] | None]:
    """Recipe version of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``.

    Same dummy-2D and mirror-axes decisions as stock; the rotation is the table's in every case and
    the initial patch size (the crop the data loader takes before augmentation) is computed for it.
    A table that never mirrors (``mirror.p_sample`` or ``p_axis`` 0) gets ``mirror_axes`` None, as stock's
    ``nnUNetTrainerNoMirroring``: the checkpoint then allows no test-time mirroring either, since a model
    that never saw a flipped case should not be averaged over flipped ones.
    Returns ``(rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes)``.
    """
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    patch_size = tuple(int(i) for i in patch_size)
    dim = len(patch_size)
    if dim == 2:
        do_dummy_2d_data_aug = False
        mirror_axes: tuple[int, ...] = (0, 1)
    elif dim == 3:
        do_dummy_2d_data_aug = (max(patch_size) / patch_size[0]) > ANISO_THRESHOLD
        mirror_axes = (0, 1, 2)
    else:
        raise ValueError(f"patch size must be 2D or 3D, got {patch_size}")
    rotation = rotation_radians(table)
    initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, INITIAL_PATCH_SCALE_RANGE)
    if do_dummy_2d_data_aug:
        initial_patch_size[0] = patch_size[0]
    if not (table["mirror"]["p_sample"] > 0 and table["mirror"]["p_axis"] > 0):
        return rotation, do_dummy_2d_data_aug, initial_patch_size, None
    return rotation, do_dummy_2d_data_aug, initial_patch_size, mirror_axes


def build_training_transforms(
        table: dict[str, Any],
        patch_size: Sequence[int],
        deep_supervision_scales: Sequence | None,
        mirror_axes: Sequence[int] | None,
        do_dummy_2d_data_aug: bool,
        use_mask_for_norm: Sequence[bool] | None = None,
        is_cascaded: bool = False,
        foreground_labels: Sequence[int] | None = None,
        regions: Sequence | None = None,
        ignore_label: int | None = None,
) -> ComposeTransforms:
    """Training transforms for one augmentation table (``teacher_augmentation`` / ``student_augmentation``).

    Arguments other than ``table`` are those of stock ``get_training_transforms`` (the rotation comes
    from the table). The order of transforms is stock's.
    """
    rot, scl = table["rotation"], table["scaling"]
    transforms: list[BasicTransform] = []
    if do_dummy_2d_data_aug:
        ignore_axes: tuple[int, ...] | None = (0,)
        transforms.append(Convert3DTo2DTransform())
        patch_size_spatial = tuple(patch_size[1:])
    else:
        patch_size_spatial = tuple(patch_size)
        ignore_axes = None
    transforms.append(SpatialTransform(
        patch_size_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=rot["p_sample"], rotation=rotation_radians(table),
        p_scaling=scl["p_sample"], scaling=tuple(scl["range"]), p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1,
    ))
    if do_dummy_2d_data_aug:
        transforms.append(Convert2DTo3DTransform())

    noise = table["gaussian_noise"]
    transforms.append(RandomTransform(GaussianNoiseTransform(
        noise_variance=tuple(noise["variance"]), p_per_channel=1, synchronize_channels=True,
    ), apply_probability=noise["p_sample"]))
    blur = table["gaussian_blur"]
    transforms.append(RandomTransform(GaussianBlurTransform(
        blur_sigma=tuple(blur["sigma"]), synchronize_channels=False, synchronize_axes=False,
        p_per_channel=blur["p_channel"], benchmark=True,
    ), apply_probability=blur["p_sample"]))
    brightness = table["brightness"]
    transforms.append(RandomTransform(MultiplicativeBrightnessTransform(
        multiplier_range=BGContrast(tuple(brightness["range"])), synchronize_channels=False, p_per_channel=1,
    ), apply_probability=brightness["p_sample"]))
    contrast = table["contrast"]
    transforms.append(RandomTransform(ContrastTransform(
        contrast_range=BGContrast(tuple(contrast["range"])), preserve_range=True, synchronize_channels=False,
        p_per_channel=1,
    ), apply_probability=contrast["p_sample"]))
    lowres = table["low_resolution"]
    transforms.append(RandomTransform(SimulateLowResolutionTransform(
        scale=tuple(lowres["zoom"]), synchronize_channels=False, synchronize_axes=True, ignore_axes=ignore_axes,
        allowed_channels=None, p_per_channel=lowres["p_channel"],
    ), apply_probability=lowres["p_sample"]))
    gamma = table["gamma"]
    transforms.append(RandomTransform(GammaTransform(
        gamma=BGContrast(tuple(gamma["range"])), p_invert_image=1 if gamma["invert_image"] else 0,
        synchronize_channels=False, p_per_channel=1, p_retain_stats=1,
    ), apply_probability=gamma["p_sample"]))
    mirror = table["mirror"]
    if mirror_axes is not None and len(mirror_axes) > 0:
        transforms.append(RandomTransform(AxisMirrorTransform(
            allowed_axes=tuple(mirror_axes), p_per_axis=mirror["p_axis"],
        ), apply_probability=mirror["p_sample"]))

    # --- not augmentation: exactly as stock ---
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        transforms.append(MaskImageTransform(
            apply_to_channels=[i for i in range(len(use_mask_for_norm)) if use_mask_for_norm[i]],
            channel_idx_in_seg=0, set_outside_to=0,
        ))
    transforms.append(RemoveLabelTansform(-1, 0))
    if is_cascaded:
        assert foreground_labels is not None, "We need foreground_labels for cascade augmentations"
        transforms.append(MoveSegAsOneHotToDataTransform(
            source_channel_idx=1, all_labels=foreground_labels, remove_channel_from_source=True))
        transforms.append(RandomTransform(ApplyRandomBinaryOperatorTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), strel_size=(1, 8), p_per_label=0.5,
        ), apply_probability=0.4))
        transforms.append(RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), fill_with_other_class_p=0,
            dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5,
        ), apply_probability=0.2))
    if regions is not None:
        # the ignore label must also be converted
        transforms.append(ConvertSegmentationToRegionsTransform(
            regions=list(regions) + [ignore_label] if ignore_label is not None else regions, channel_in_seg=0))
    if deep_supervision_scales is not None:
        transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
    return ComposeTransforms(transforms)


def _range(value: Any) -> list[float]:
    """A range as a plain list; ``BGContrast`` keeps it in ``contrast_range``."""
    if isinstance(value, BGContrast):
        value = value.contrast_range
    return [float(v) for v in value]


def describe_training_transforms(transforms: ComposeTransforms) -> dict[str, Any]:
    """Read the augmentation table back from built transforms (same keys as a recipe table).

    Used by tests and for the training log, so that what the trainer really built can be compared
    with the paper value by value. Transforms that are not augmentation are skipped.
    """
    table: dict[str, Any] = {}
    for transform in transforms.transforms:
        p_sample = 1.0
        if isinstance(transform, RandomTransform):
            p_sample, transform = float(transform.apply_probability), transform.transform
        if isinstance(transform, SpatialTransform):
            table["rotation"] = {"p_sample": float(transform.p_rotation),
                                 "angle_deg": [round(math.degrees(a), 6) for a in transform.rotation]}
            table["scaling"] = {"p_sample": float(transform.p_scaling), "range": _range(transform.scaling)}
        elif isinstance(transform, GaussianNoiseTransform):
            table["gaussian_noise"] = {"p_sample": p_sample, "variance": _range(transform.noise_variance)}
        elif isinstance(transform, GaussianBlurTransform):
            table["gaussian_blur"] = {"p_sample": p_sample, "p_channel": float(transform.p_per_channel),
                                      "sigma": _range(transform.blur_sigma)}
        elif isinstance(transform, MultiplicativeBrightnessTransform):
            table["brightness"] = {"p_sample": p_sample, "range": _range(transform.multiplier_range)}
        elif isinstance(transform, ContrastTransform):
            table["contrast"] = {"p_sample": p_sample, "range": _range(transform.contrast_range)}
        elif isinstance(transform, SimulateLowResolutionTransform):
            table["low_resolution"] = {"p_sample": p_sample, "p_channel": float(transform.p_per_channel),
                                       "zoom": _range(transform.scale)}
        elif isinstance(transform, GammaTransform):
            if "gamma" in table:
                raise ValueError("more than one gamma transform: the tables have one")
            table["gamma"] = {"p_sample": p_sample, "range": _range(transform.gamma),
                              "invert_image": transform.p_invert_image == 1}
        elif isinstance(transform, MirrorTransform):
            table["mirror"] = {"p_sample": p_sample, "p_axis": float(getattr(transform, "p_per_axis", 0.5))}
    return table
