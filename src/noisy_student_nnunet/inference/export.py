"""From network-resolution logits to a label map in the original image geometry, without C x original floats.

Stock ``export_prediction_from_logits`` resamples all C logit channels to the original grid (float64 copy,
fp16 result array of C x original voxels), then takes the argmax. Two modes here:

- ``nearest`` (the paper's, section 2.3): argmax at the network's resolution, then nearest-neighbour resampling
  of the uint8 label map. Memory: two label maps. Along a separate-z axis (order 0 in stock too) it agrees with
  stock exactly; in-plane it replaces stock's linear interpolation of scores, which moves boundaries by up to
  half a network voxel.
- ``linear``: stock's answer (resampling of scores as the plans' ``resampling_fn_probabilities`` says, then
  argmax), computed slab by slab along the first axis. For stock's ``resample_data_or_seg_to_shape`` with
  order and order_z in {0, 1} (the planner's default is order 1, order_z 0, ``force_separate_z`` None) it uses
  the same separate-z decision and pixel-centre coordinates, interpolates in float32 and rounds to the logits'
  dtype before the argmax, as stock does; labels differ from stock only where two classes tie to float
  precision. Any other resampling function or order: per channel through the plans' own function, with a
  running argmax (one channel at the original size at a time).

Then both re-insert the crop, transpose axes back and (in :func:`export_labels_from_logits`) write through the
plans' reader/writer, with the same geometry as stock.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from noisy_student_nnunet.inference.resize import (
    LINEAR,
    NEAREST,
    argmax_channels,
    resample_scores_to_labels,
    resize_labels_nearest,
)

EXPORT_MODES = (NEAREST, LINEAR)
STOCK_RESAMPLING_FN = "resample_data_or_seg_to_shape"


def _label_dtypes(label_manager) -> tuple[np.dtype, torch.dtype]:
    """numpy dtype of the written map (stock's rule) and the torch dtype used while computing it."""
    if len(label_manager.foreground_labels) < 255:
        return np.dtype(np.uint8), torch.uint8
    return np.dtype(np.uint16), torch.int32


def make_to_labels(label_manager) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores ``(C, ...)`` -> labels, on the scores' device (argmax, first maximum wins as in numpy)."""
    if label_manager.has_regions:
        def regions(scores: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(label_manager.convert_logits_to_segmentation(scores))
        return regions
    return argmax_channels


def _labels_at_network_resolution(
    scores: torch.Tensor, to_labels, dtype: torch.dtype, slab_voxels: int = 2**20
) -> torch.Tensor:
    """Labels of ``(C, X, ...)`` scores, slab by slab along X (small float buffers, no int64 index array)."""
    out = torch.empty(scores.shape[1:], dtype=dtype, device=scores.device)
    per_row = max(1, int(np.prod(scores.shape[2:])))
    rows = max(1, slab_voxels // per_row)
    for a in range(0, scores.shape[1], rows):
        out[a:a + rows] = to_labels(scores[:, a:a + rows]).to(dtype)
    return out


def _stock_spacings(plans_manager, configuration_manager, properties: dict):
    """(current_spacing, new_spacing) exactly as stock's export passes them to the resampling function."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target_shape = properties["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(target_shape) else \
        [spacing_transposed[0], *configuration_manager.spacing]
    return current, spacing_transposed


def linear_axis_modes(plans_manager, configuration_manager, properties: dict) -> list[str] | None:
    """Per-axis 'linear'/'nearest' reproducing the plans' score resampling, or None if that needs the fallback."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    cfg = configuration_manager.configuration
    if cfg.get("resampling_fn_probabilities") != STOCK_RESAMPLING_FN:
        return None
    kwargs = dict(cfg.get("resampling_fn_probabilities_kwargs", {}))
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    if kwargs.get("is_seg", False) or order not in (0, 1):
        return None
    current, new = _stock_spacings(plans_manager, configuration_manager, properties)
    do_separate_z, axis = determine_do_sep_z_and_axis(
        kwargs.get("force_separate_z", False), current, new,
        kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
    )
    modes = [LINEAR if order == 1 else NEAREST] * len(new)
    if do_separate_z:
        if order_z not in (0, 1):
            return None
        modes[axis] = LINEAR if order_z == 1 else NEAREST
    return modes


def _linear_per_channel_fallback(
    scores: torch.Tensor, new_shape, plans_manager, configuration_manager, properties, dtype: torch.dtype
) -> torch.Tensor:
    """Any resampling function: resample one channel at a time with it and keep a running argmax."""
    current, new = _stock_spacings(plans_manager, configuration_manager, properties)
    fn = configuration_manager.resampling_fn_probabilities
    scores_np = scores.detach().cpu().numpy()
    best = labels = None
    for c in range(scores_np.shape[0]):
        channel = np.asarray(fn(scores_np[c:c + 1], new_shape, current, new))[0]
        if best is None:
            best, labels = channel.copy(), np.zeros(channel.shape, dtype=np.int32)
            continue
        better = channel > best
        labels[better] = c
        best[better] = channel[better]
        del channel, better
    return torch.from_numpy(labels).to(dtype)


def labels_in_original_geometry(
    logits: torch.Tensor | np.ndarray,
    plans_manager,
    configuration_manager,
    label_manager,
    properties: dict,
    mode: str = NEAREST,
    slab_bytes: int = 64 * 1024**2,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Label map for one case in the original image's array layout (what stock passes to ``write_seg``).

    ``logits``: ``(C, *network_grid)`` on any device; CUDA tensors are argmaxed and resized on the GPU.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    if mode not in EXPORT_MODES:
        raise ValueError(f"export mode must be one of {EXPORT_MODES}, got {mode!r}")
    scores = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
    np_dtype, t_dtype = _label_dtypes(label_manager)
    to_labels = make_to_labels(label_manager)
    target_shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]

    with torch.inference_mode():
        if mode == NEAREST:
            labels = _labels_at_network_resolution(scores, to_labels, t_dtype)
            labels = resize_labels_nearest(labels, target_shape)
        else:
            modes = linear_axis_modes(plans_manager, configuration_manager, properties)
            if list(scores.shape[1:]) == target_shape:
                labels = _labels_at_network_resolution(scores, to_labels, t_dtype)
            elif modes is not None:
                labels = resample_scores_to_labels(scores, target_shape, modes, to_labels, t_dtype, slab_bytes,
                                                   progress)
            else:
                labels = _linear_per_channel_fallback(scores, target_shape, plans_manager, configuration_manager,
                                                      properties, t_dtype)
        labels_np = labels.cpu().numpy().astype(np_dtype, copy=False)
    del labels
    full = np.zeros(properties["shape_before_cropping"], dtype=np_dtype)
    full = insert_crop_into_image(full, labels_np, properties["bbox_used_for_cropping"])
    return full.transpose(plans_manager.transpose_backward)


@contextmanager
def atomic_outputs(output_file_truncated: str, suffixes: Sequence[str]) -> Iterator[str]:
    """Yield a hidden temporary truncated name; on success check each ``tmp + s`` that was written (synced, whole:
    :mod:`noisy_student_nnunet.written`) and rename it to ``final + s``; on failure delete them. Readers (and
    ``--continue_prediction``) never see half a file; a full disk raises ``WriteFailed`` naming the file."""
    from noisy_student_nnunet.written import check_file, discard, writing

    folder, base = os.path.split(output_file_truncated)
    tmp = os.path.join(folder, f".{base}.partial-{os.getpid()}")
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as error:
            with writing(output_file_truncated + _being_written(tmp, suffixes)):  # WriteFailed if the disk is full
                raise error
        for s in suffixes:  # SimpleITK returns without an error on a full disk: check before any rename
            if os.path.exists(tmp + s):
                check_file(tmp + s, output_file_truncated + s)
    except BaseException:
        for s in suffixes:
            discard(tmp + s)
        raise
    for s in suffixes:
        if os.path.exists(tmp + s):
            os.replace(tmp + s, output_file_truncated + s)


def _being_written(tmp: str, suffixes: Sequence[str]) -> str:
    """The suffix of the file a writer stopped in: the one of ``tmp + s`` changed last (the first if none is)."""
    started = [(os.stat(tmp + s).st_mtime_ns, i) for i, s in enumerate(suffixes) if os.path.exists(tmp + s)]
    return suffixes[max(started)[1]] if started else suffixes[0]


def write_labels(labels: np.ndarray, output_file_truncated: str, plans_manager, dataset_json: dict,
                 properties: dict) -> str:
    """Write a label map with the plans' reader/writer (same geometry as stock), atomically; returns the path."""
    ending = dataset_json["file_ending"]
    with atomic_outputs(output_file_truncated, [ending]) as tmp:
        plans_manager.image_reader_writer_class().write_seg(labels, tmp + ending, properties)
    return output_file_truncated + ending


def export_labels_from_logits(
    logits: torch.Tensor | np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    dataset_json: dict | str,
    output_file_truncated: str,
    mode: str = NEAREST,
    slab_bytes: int = 64 * 1024**2,
) -> str:
    """Low-footprint counterpart of stock ``export_prediction_from_logits`` (without probabilities)."""
    if isinstance(dataset_json, str):
        from batchgenerators.utilities.file_and_folder_operations import load_json
        dataset_json = load_json(dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    labels = labels_in_original_geometry(logits, plans_manager, configuration_manager, label_manager, properties,
                                         mode, slab_bytes)
    return write_labels(labels, output_file_truncated, plans_manager, dataset_json, properties)


def export_stock_with_probabilities(
    logits: torch.Tensor | np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    dataset_json: dict,
    output_file_truncated: str,
) -> None:
    """``--save_probabilities``: stock's export unchanged (npz + pkl + label map), written atomically."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    suffixes = [".npz", ".pkl", dataset_json["file_ending"]]
    with atomic_outputs(output_file_truncated, suffixes) as tmp:
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json, tmp,
                                      save_probabilities=True)
