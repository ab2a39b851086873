"""Preprocessing for inference with stock nnU-Net's result and less memory.

Stock ``DefaultPreprocessor.run_case`` does, for an image without a previous-stage segmentation, three things
the predictor does not need or can do leaner: it copies the image to float32 once more, it resamples the
nonzero mask (then discarded by the predictor), and its out-of-plane resampling
(``resample_data_or_seg`` with ``do_separate_z``) builds float64 coordinate grids of the whole output
(about 50 bytes per output voxel). :func:`preprocess_case` runs the same steps (transpose, crop to nonzero,
normalise, resample) with the same functions, but resamples slice by slice: each needed input slice gets the
identical skimage in-plane call, out-of-plane order 0 picks slices with stock's rounding. The output is equal to
stock's bit for bit (tested). Anything else (custom preprocessors, other resampling functions or orders,
cascades) runs stock's code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from noisy_student_nnunet.inference.resize import nearest_source_indices

STOCK_RESAMPLING_FN = "resample_data_or_seg_to_shape"


def _lean_resampling_plan(configuration_manager, current_spacing, new_spacing):
    """``(axis, order)`` when the slice-wise path reproduces the plans' data resampling, else None."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    cfg = configuration_manager.configuration
    if cfg.get("resampling_fn_data") != STOCK_RESAMPLING_FN:
        return None
    kwargs = dict(cfg.get("resampling_fn_data_kwargs", {}))
    if kwargs.get("is_seg", False) or kwargs.get("order_z", 0) != 0:
        return None
    do_separate_z, axis = determine_do_sep_z_and_axis(
        kwargs.get("force_separate_z", False), current_spacing, new_spacing,
        kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
    )
    if not do_separate_z or axis is None:
        return None
    return int(axis), int(kwargs.get("order", 3))


def resample_separate_z_lean(data: np.ndarray, new_shape: Sequence[int], axis: int, order: int) -> np.ndarray:
    """Stock ``resample_data_or_seg(data, new_shape, is_seg=False, axis, order, do_separate_z=True, order_z=0)``,
    one slice at a time: only the input slices that the output uses are resized, no coordinate grids."""
    from skimage.transform import resize

    new_shape = np.array([int(s) for s in new_shape])
    shape = np.array(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    shape_2d = tuple(int(s) for i, s in enumerate(new_shape) if i != axis)
    src = nearest_source_indices(int(shape[axis]), int(new_shape[axis]))
    for c in range(data.shape[0]):
        for i in np.unique(src):
            plane = np.take(data[c], i, axis=axis).astype(float)
            resized = resize(plane, shape_2d, order, mode="edge", anti_aliasing=False)
            for o in np.flatnonzero(src == i):
                index = [slice(None)] * 3
                index[axis] = int(o)
                out[(c, *index)] = resized
    return out


def preprocess_case(
    image_files: Sequence[str],
    seg_from_prev_stage_file: str | None,
    plans_manager,
    configuration_manager,
    dataset_json: dict,
    verbose: bool = False,
) -> tuple[np.ndarray, dict]:
    """Read and preprocess one case like stock ``preprocessor.run_case``; returns ``(data, properties)``.

    ``data`` is float32 ``(C, *network_grid_shape)``; with a previous-stage segmentation it has the one-hot
    channels stacked on, as in stock's data iterators.
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    preprocessor_class = configuration_manager.preprocessor_class
    if preprocessor_class is not DefaultPreprocessor or seg_from_prev_stage_file is not None:
        preprocessor = preprocessor_class(verbose=verbose)
        data, seg, properties = preprocessor.run_case(
            list(image_files), seg_from_prev_stage_file, plans_manager, configuration_manager, dataset_json
        )
        if seg_from_prev_stage_file is not None:
            label_manager = plans_manager.get_label_manager(dataset_json)
            seg_onehot = convert_labelmap_to_one_hot(seg[0], label_manager.foreground_labels, data.dtype)
            data = np.vstack((data, seg_onehot))
        return np.ascontiguousarray(data, dtype=np.float32), properties

    rw = plans_manager.image_reader_writer_class()
    data, properties = rw.read_images(list(image_files))  # float32, freshly allocated: safe to modify in place
    data = data.astype(np.float32, copy=False)
    transpose_forward = plans_manager.transpose_forward
    data = data.transpose([0, *[i + 1 for i in transpose_forward]])
    original_spacing = [properties["spacing"][i] for i in transpose_forward]
    properties["shape_before_cropping"] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data, None)
    properties["bbox_used_for_cropping"] = bbox
    properties["shape_after_cropping_and_before_resampling"] = data.shape[1:]

    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < len(data.shape[1:]):
        target_spacing = [original_spacing[0]] + target_spacing
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)

    # normalise in place on the cropped view (the array was read for us alone), as stock does on its copy
    data = DefaultPreprocessor(verbose=verbose)._normalize(
        data, seg, configuration_manager, plans_manager.foreground_intensity_properties_per_channel
    )
    del seg
    lean = _lean_resampling_plan(configuration_manager, original_spacing, target_spacing)
    if lean is not None:
        data = resample_separate_z_lean(data, new_shape, *lean)
    else:
        data = configuration_manager.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
    return np.ascontiguousarray(data, dtype=np.float32), properties
