"""Preprocessing for inference with stock nnU-Net's result and less memory.

Stock ``DefaultPreprocessor.run_case`` does, for an image without a previous-stage segmentation, three things
the predictor does not need or can do leaner: it copies the image to float32 once more, it resamples the
nonzero mask (then discarded by the predictor), and its resampling makes whole-volume float64 copies:

- with ``do_separate_z`` (anisotropic spacing), float64 coordinate grids of the whole output (about 50 bytes
  per output voxel). Here: slice by slice; each needed input slice gets the identical skimage in-plane call,
  out-of-plane order 0 picks slices with stock's rounding.
- without (the 3D path, e.g. 0.7 x 0.7 x 1.25 mm to 1.6 x 1.6 x 2.5 mm): skimage ``resize`` of a float64 copy,
  which scipy's ``zoom`` pads by 12 voxels (another copy) and spline-prefilters into a third: about 26 bytes per
  input voxel on top of the float32 image, 1.6 GB for a 523 x 433 x 269 CT. Here: the float32 channel is
  written once into a float64 array padded along the first axis, prefiltered in place, and the cubic spline is
  evaluated one axis at a time (:mod:`.spline_resize`; other orders: padded along every axis and interpolated by
  scipy's own routine, :func:`resize_3d_lean`): 8 bytes per input voxel.

And it is faster where stock is slow on a clinical CT (523 x 433 x 269 voxels), where stock's preprocessing
takes a large share of the network's time:

- the 3D path's cubic spline is evaluated axis by axis: 3 x 4 coefficients per output voxel, each axis on an
  array already shrunk along the ones before, instead of 4 x 4 x 4 from the whole padded volume (on the clinical
  CT's preprocessing, 2 cores of a Xeon with AMX: 1.25 s against 2.01 s, ``benchmarks/bench_preprocessing.py``);
- the 3D path's spline prefilter and interpolation run in ``threads`` threads (scipy releases the GIL): each
  thread filters its own block of lines, or interpolates its own block of output rows, with the same arithmetic;
  on the separate-z path (thick slices) each thread resizes its own slices;
- the 3D cubic path's worker threads flush float denormals to zero: on rows of 538 to 565 samples (an image 514
  to 541 voxels wide, padded by 12 on each side) scipy's prefilter start-up multiplies by a denormal power in every
  term, which x86 computes in microcode (:func:`.blocks.flush_denormals_in_this_thread`);
- cropping to the nonzero region skips stock's ``binary_fill_holes`` of the whole volume (1.5 s) when nothing
  reads the filled mask (:func:`crop_to_nonzero_lean`).

:func:`preprocess_case` runs the same steps (transpose, crop to nonzero, normalise, resample) with the same
functions. The output is equal to stock's bit for bit (tested), except that the axis-by-axis cubic spline adds its
float64 values in another order: values that are zero up to rounding may differ by about 1e-16 (on the clinical CT
no voxel differs). Anything else (custom preprocessors, other
resampling functions, order_z != 0, cascades) runs stock's code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from noisy_student_nnunet.inference.resize import nearest_source_indices
from noisy_student_nnunet.inference.blocks import in_blocks
from noisy_student_nnunet.inference.spline_resize import SPLINE_PAD, resize_cubic_separable

STOCK_RESAMPLING_FN = "resample_data_or_seg_to_shape"


def _lean_resampling_plan(configuration_manager, current_spacing, new_spacing):
    """``(axis, order)`` when a lean path reproduces the plans' data resampling (``axis`` None: the 3D path),
    else None."""
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
    order = int(kwargs.get("order", 3))
    if not do_separate_z:
        return None, order
    if axis is None:
        return None
    return int(axis), order


def resample_separate_z_lean(data: np.ndarray, new_shape: Sequence[int], axis: int, order: int,
                             threads: int = 1) -> np.ndarray:
    """Stock ``resample_data_or_seg(data, new_shape, is_seg=False, axis, order, do_separate_z=True, order_z=0)``,
    one slice at a time: only the input slices that the output uses are resized, no coordinate grids; ``threads``
    threads resize their own blocks of slices (the same calls)."""
    from skimage.transform import resize

    new_shape = np.array([int(s) for s in new_shape])
    shape = np.array(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    shape_2d = tuple(int(s) for i, s in enumerate(new_shape) if i != axis)
    src = nearest_source_indices(int(shape[axis]), int(new_shape[axis]))
    used = np.unique(src)

    def resize_slices(c: int, first: int, stop: int) -> None:
        for i in used[first:stop]:
            plane = np.take(data[c], i, axis=axis).astype(float)
            resized = resize(plane, shape_2d, order, mode="edge", anti_aliasing=False)
            for o in np.flatnonzero(src == i):
                index = [slice(None)] * 3
                index[axis] = int(o)
                out[(c, *index)] = resized

    for c in range(data.shape[0]):
        in_blocks(lambda first, stop, c=c: resize_slices(c, first, stop), len(used), threads)
    return out


#: order 3 through :func:`resize_cubic_separable` (False: scipy's 64-tap kernel, as before 2026-12-06; benchmarks)
CUBIC_AXIS_BY_AXIS = True


def _zoom_shift():
    """scipy's interpolation kernel behind ``ndimage.zoom`` (private), or None where this scipy lacks it."""
    try:
        from scipy.ndimage import _nd_image

        return _nd_image.zoom_shift
    except (ImportError, AttributeError):
        return None


def _edge_padded_float64(channel: np.ndarray, pad: int, threads: int = 1) -> np.ndarray:
    """``np.pad(channel.astype(float), pad, mode='edge')`` with one allocation (no float64 copy of the input)."""
    out = np.empty([n + 2 * pad for n in channel.shape], dtype=np.float64)
    inner = tuple(slice(pad, pad + n) for n in channel.shape[1:])

    def copy(a: int, b: int) -> None:
        out[(slice(pad + a, pad + b), *inner)] = channel[a:b]

    in_blocks(copy, channel.shape[0], threads)
    for axis, n in enumerate(channel.shape):
        lo, hi, first, last = [slice(None)] * out.ndim, [slice(None)] * out.ndim, [slice(None)] * out.ndim, \
            [slice(None)] * out.ndim
        lo[axis], first[axis] = slice(0, pad), slice(pad, pad + 1)
        hi[axis], last[axis] = slice(pad + n, None), slice(pad + n - 1, pad + n)
        out[tuple(lo)] = out[tuple(first)]
        out[tuple(hi)] = out[tuple(last)]
    return out


def resize_3d_lean(channel: np.ndarray, new_shape: Sequence[int], order: int, threads: int = 1) -> np.ndarray:
    """float32 ``skimage.transform.resize(channel.astype(float), new_shape, order, mode='edge',
    anti_aliasing=False)``, as stock's 3D resampling computes it, with one float64 array of the padded input
    instead of three, in ``threads`` threads.

    Order 3 (the plans' default for image data) runs one axis at a time
    (:func:`~noisy_student_nnunet.inference.spline_resize.resize_cubic_separable`: 3 x 4 taps per voxel instead of
    64; stock's numbers up to float64 rounding, none different on the clinical CT). Other orders run scipy's own
    kernel, bit for bit, as follows.

    skimage calls ``scipy.ndimage.zoom(order, mode='nearest', grid_mode=True)``, which pads by 12 voxels, runs the
    separable spline prefilter (axis by axis, float64) and interpolates; float32 values are exact in float64, so
    filling the padded float64 array from the float32 channel gives the same numbers. Then skimage clips to the
    input's range. Threads split the work without changing a number: the prefilter along one axis treats each
    line on its own, so each thread filters the lines of its block of another axis; the interpolation computes
    each output voxel from its own index, so each thread fills a block of output rows, its offset given to scipy
    as an output-space shift (``(row + shift + 0.5) * zoom - 0.5``: the same coordinates as the whole call's).
    """
    from scipy.ndimage import spline_filter1d
    from scipy.ndimage._ni_support import _extend_mode_to_code

    new_shape = tuple(int(s) for s in new_shape)
    lo, hi = np.min(channel), np.max(channel)  # skimage clips the result to the input's range
    has_nan = np.isnan(lo)
    if has_nan:
        lo, hi = np.nanmin(channel), np.nanmax(channel)
    if order == 3 and channel.ndim == 3 and CUBIC_AXIS_BY_AXIS and not has_nan:
        # (a NaN spreads along every axis in stock's prefilter, also along axes the axis-by-axis path leaves alone)
        output = resize_cubic_separable(
            channel, new_shape, lambda work, n: in_blocks(work, n, threads, flush_denormals=True))
        return _clipped_float32(output, lo, hi)
    zoom_shift = _zoom_shift()
    if zoom_shift is None:  # public route: same numbers, the padded float32 copy and the filtered one
        from skimage.transform import resize

        return resize(channel.astype(float), new_shape, order, mode="edge", anti_aliasing=False).astype(np.float32)
    output = np.empty(new_shape, dtype=np.float64)
    zoom = np.divide(np.array(channel.shape), np.array(new_shape), out=np.ones(channel.ndim, dtype=np.float64),
                     where=np.array(new_shape) != 0)
    if order > 1:
        filtered = _edge_padded_float64(channel, SPLINE_PAD, threads)
        for axis in range(filtered.ndim):  # scipy's spline_filter, in place as it does for axes after the first
            split = 1 if axis == 0 else 0  # lines along `axis` are independent: blocks of another axis

            def prefilter(a: int, b: int, axis: int = axis, split: int = split) -> None:
                block = filtered[(slice(None),) * split + (slice(a, b),)]
                spline_filter1d(block, order, axis, output=block, mode="nearest")

            in_blocks(prefilter, filtered.shape[split], threads, flush_denormals=True)
        npad = SPLINE_PAD
    else:
        filtered, npad = channel, 0
    zoom = np.ascontiguousarray(zoom)
    mode = _extend_mode_to_code("nearest")

    def interpolate(a: int, b: int) -> None:
        shift = np.array([a] + [0] * (len(new_shape) - 1), dtype=np.float64) if a else None
        zoom_shift(filtered, zoom, shift, output[a:b], order, mode, 0.0, npad, True)

    in_blocks(interpolate, new_shape[0], threads)
    filtered = None  # frees the padded float64 array (8 bytes per input voxel) before the clip
    return _clipped_float32(output, lo, hi)


def _clipped_float32(output: np.ndarray, lo, hi) -> np.ndarray:
    """skimage's last step: the float64 result clipped to the input's range, then float32 (stock's dtype)."""
    np.clip(output, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), out=output)
    return output.astype(np.float32)


def resample_3d_lean(data: np.ndarray, new_shape: Sequence[int], order: int, threads: int = 1) -> np.ndarray:
    """Stock ``resample_data_or_seg(data, new_shape, is_seg=False, order=order, do_separate_z=False)`` for float32
    ``data`` (C, X, Y, Z), channel by channel through :func:`resize_3d_lean`."""
    new_shape = [int(s) for s in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        out[c] = resize_3d_lean(data[c], new_shape, order, threads)
    return out


#: stock normalization schemes that read the nonzero mask only when ``use_mask_for_norm`` is set
_MASK_READ_ONLY_IF_ASKED = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                            "RGBTo01Normalization")


def normalization_reads_mask(configuration_manager) -> bool:
    """Whether any channel's normalization may read the filled nonzero mask (stock's ``seg`` after cropping)."""
    schemes = configuration_manager.normalization_schemes
    return any(use or scheme not in _MASK_READ_ONLY_IF_ASKED
               for scheme, use in zip(schemes, configuration_manager.use_mask_for_norm))


def crop_to_nonzero_lean(data: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Stock ``crop_to_nonzero(data)``'s cropped data and bounding box, without its mask.

    Stock fills the holes of the nonzero mask (``binary_fill_holes`` of the whole volume) before taking its bounding
    box. Filling never moves the box: a zero voxel outside the box of the nonzero voxels lies in a slab of zeros
    that reaches the volume's border, so it is not a hole. The filled mask itself is only read by normalizations
    with ``use_mask_for_norm`` (:func:`normalization_reads_mask`); there stock's function runs.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    bbox = get_bbox_from_mask(mask)
    return data[(slice(None), *bounding_box_to_slice(bbox))], bbox


def uses_stock_preprocessor(configuration_manager, seg_from_prev_stage_file: str | None) -> bool:
    """The case goes through the plans' own preprocessor (which reads its files itself): a preprocessor other than
    ``DefaultPreprocessor``, or a previous stage's segmentation to stack on."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    return configuration_manager.preprocessor_class is not DefaultPreprocessor or seg_from_prev_stage_file is not None


def preprocess_case(
    image_files: Sequence[str],
    seg_from_prev_stage_file: str | None,
    plans_manager,
    configuration_manager,
    dataset_json: dict,
    verbose: bool = False,
    threads: int = 1,
) -> tuple[np.ndarray, dict]:
    """Read and preprocess one case like stock ``preprocessor.run_case``; returns ``(data, properties)``.

    ``data`` is float32 ``(C, *network_grid_shape)``; with a previous-stage segmentation it has the one-hot
    channels stacked on, as in stock's data iterators. ``threads``: for the 3D resampling (same numbers).
    """
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    if uses_stock_preprocessor(configuration_manager, seg_from_prev_stage_file):
        preprocessor = configuration_manager.preprocessor_class(verbose=verbose)
        data, seg, properties = preprocessor.run_case(
            list(image_files), seg_from_prev_stage_file, plans_manager, configuration_manager, dataset_json
        )
        if seg_from_prev_stage_file is not None:
            label_manager = plans_manager.get_label_manager(dataset_json)
            seg_onehot = convert_labelmap_to_one_hot(seg[0], label_manager.foreground_labels, data.dtype)
            data = np.vstack((data, seg_onehot))
        return np.ascontiguousarray(data, dtype=np.float32), properties

    data, properties = plans_manager.image_reader_writer_class().read_images(list(image_files))
    return preprocess_image(data, properties, plans_manager, configuration_manager, verbose, threads)


def preprocess_image(
    data: np.ndarray,
    properties: dict,
    plans_manager,
    configuration_manager,
    verbose: bool = False,
    threads: int = 1,
) -> tuple[np.ndarray, dict]:
    """What :func:`preprocess_case` does after the read on ``DefaultPreprocessor``'s route: ``data`` and
    ``properties`` as the plans' reader returned them (``data`` is modified in place: pass an array read for
    this call alone). Callers that read through :func:`~noisy_student_nnunet.io_checks.read_images_checked` so release
    the read's temporary copies before the preprocessing's own memory peak."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    data = data.astype(np.float32, copy=False)  # readers return float32, freshly allocated
    transpose_forward = plans_manager.transpose_forward
    data = data.transpose([0, *[i + 1 for i in transpose_forward]])
    original_spacing = [properties["spacing"][i] for i in transpose_forward]
    properties["shape_before_cropping"] = data.shape[1:]
    if normalization_reads_mask(configuration_manager):
        data, seg, bbox = crop_to_nonzero(data, None)
    else:  # no normalizer reads the mask: a view that reads as "no mask" (the normalizers ignore it)
        data, bbox = crop_to_nonzero_lean(data)
        seg = np.broadcast_to(np.int8(0), (1, *data.shape[1:]))
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
    if lean is not None and lean[0] is None and data.dtype == np.float32:
        data = resample_3d_lean(data, new_shape, lean[1], threads)
    elif lean is not None and lean[0] is not None:
        data = resample_separate_z_lean(data, new_shape, *lean, threads=threads)
    else:
        data = configuration_manager.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
    return np.ascontiguousarray(data, dtype=np.float32), properties
