"""Hand-built nnU-Net v2 model folders and CT-like images for tests and benchmarks (no training).

A model folder is what ``nnUNetv2_train`` leaves behind and what
``nnUNetPredictor.initialize_from_trained_model_folder`` reads: ``plans.json``, ``dataset.json`` and
``fold_X/checkpoint_final.pth`` holding ``network_weights``, ``trainer_name``, ``init_args['configuration']`` and
``inference_allowed_mirroring_axes``. Weights are random (seeded); that is enough to compare predictors on identical
logits and to measure time and memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

CONFIGURATION = "3d_fullres"
NUM_CLASSES = 14  # background + 13 FLARE22 organs

CT_INTENSITY_PROPERTIES = {
    "max": 1500.0,
    "mean": 60.0,
    "median": 55.0,
    "min": -1000.0,
    "percentile_00_5": -980.0,
    "percentile_99_5": 1100.0,
    "std": 180.0,
}


def arch_kwargs(
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
) -> dict:
    """The ``architecture`` block of a plans configuration for PlainConvUNet (stock planner's layout)."""
    n_stages = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [int(f) for f in features],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[int(k) for k in ks] for ks in kernel_sizes],
            "strides": [[int(s) for s in st] for st in strides],
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def tiny_architecture(features: Sequence[int] = (4, 8, 16)) -> dict:
    """A 3-stage U-Net small enough for CPU tests; the patch must be divisible by 4."""
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (len(features) - 1)
    return arch_kwargs(features, strides, [[3, 3, 3]] * len(features))


def half_width_architecture(
    spacing: Sequence[float] = (2.5, 0.8, 0.8), patch_size: Sequence[int] = (40, 224, 192)
) -> tuple[dict, list[int]]:
    """FLARE22-style half-width 3d_fullres U-Net (16, 32, ... up to 320 features), topology from nnU-Net's planner."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(spacing), list(patch_size), 4, 999999)
    features = [min(320, 16 * 2**i) for i in range(len(strides))]
    return arch_kwargs(features, strides, kernels), [int(p) for p in patch]


def make_plans(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    architecture: dict | None = None,
    *,
    transpose_forward: Sequence[int] = (0, 1, 2),
    probabilities_kwargs: dict | None = None,
    dataset_name: str = "Dataset990_LowFootprintTest",
    plans_name: str = "nnUNetPlans",
) -> dict:
    """A plans dict with one 3d_fullres configuration (spacing and patch in transposed axis order)."""
    transpose_forward = [int(i) for i in transpose_forward]
    transpose_backward = [int(np.argwhere(np.array(transpose_forward) == i)[0][0]) for i in range(3)]
    probabilities_kwargs = probabilities_kwargs or {
        "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [64, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": transpose_backward,
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{plans_name}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [int(p) for p in patch_size],
                "median_image_size_in_voxels": [64, 128, 128],
                "spacing": [float(s) for s in spacing],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": dict(probabilities_kwargs),
                "architecture": architecture or tiny_architecture(),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITY_PROPERTIES)},
    }


def make_dataset_json(num_classes: int = NUM_CLASSES) -> dict:
    labels = {"background": 0, **{f"organ{i:02d}": i for i in range(1, num_classes)}}
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }


def build_model_folder(
    folder: str | os.PathLike,
    plans: dict,
    dataset_json: dict | None = None,
    *,
    folds: Sequence[int | str] = (0,),
    trainer_name: str = "nnUNetTrainer",
    seed: int = 0,
    head_scale: float = 1.0,
    head_bias_std: float = 0.0,
    checkpoint_name: str = "checkpoint_final.pth",
) -> Path:
    """Write plans.json, dataset.json and one random-weight checkpoint per fold; returns the folder.

    ``head_scale`` multiplies the final 1x1x1 convolution and ``head_bias_std`` adds random class biases so that
    several classes win somewhere (random networks otherwise favour one or two classes).
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataset_json = dataset_json or make_dataset_json()
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, n_in, n_out, enable_deep_supervision=False
        )
        state = network.state_dict()
        generator = torch.Generator().manual_seed(seed + 1000 + i)
        for key in state:
            if key.startswith("decoder.seg_layers.") and key.endswith(".weight"):
                state[key] = state[key] * head_scale
            elif key.startswith("decoder.seg_layers.") and key.endswith(".bias") and head_bias_std > 0:
                state[key] = state[key] + head_bias_std * torch.randn(state[key].shape, generator=generator)
        write_checkpoint(folder, fold, state, plans, dataset_json, trainer_name, checkpoint_name)
    return folder


def write_checkpoint(folder: Path, fold: int | str, state: dict, plans: dict, dataset_json: dict,
                     trainer_name: str = "nnUNetTrainer", checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """``fold_X/<checkpoint_name>`` with the keys nnU-Net's predictor reads."""
    import torch

    checkpoint = {
        "network_weights": state,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": fold,
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    fold_dir = Path(folder) / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, fold_dir / checkpoint_name)
    return fold_dir / checkpoint_name


def train_phantom_model(
    folder: str | os.PathLike,
    plans: dict,
    *,
    iterations: int = 300,
    num_cases: int = 6,
    case_shape: Sequence[int] = (32, 96, 96),
    batch_size: int = 2,
    seed: int = 0,
    log: bool = False,
    device: str = "cpu",
) -> Path:
    """A model folder (fold 0) whose network was really trained, briefly, on phantom CTs: for checks that need
    a trained model's confident logits (random weights give near-ties everywhere) without nnU-Net's trainer.

    The phantoms are drawn at the plans' spacing and normalised as nnU-Net's CTNormalization does with the plans'
    intensity properties, so what the network sees at inference (any image spacing, our or stock's
    preprocessing) is what it was trained on. Loss: cross-entropy + soft Dice, Adam; random crops of the plans'
    patch size. About 0.2 s per iteration on 2 cores with :func:`tiny_architecture` ``(8, 16, 32, 64)``. ``device``:
    where the network trains ("cuda": seconds instead of a minute); the checkpoint holds CPU tensors either way.
    """
    import torch
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from noisy_student_nnunet.flare import flare22_dataset_labels
    from noisy_student_nnunet.phantoms import make_phantom

    folder = Path(folder)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": flare22_dataset_labels(), "numTraining": num_cases,
                    "file_ending": ".nii.gz"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    n_classes = len(dataset_json["labels"])
    normaliser = CTNormalization(use_mask_for_norm=False,
                                 intensityproperties=plans["foreground_intensity_properties_per_channel"]["0"])
    images, labels = [], []
    for case in range(num_cases):
        phantom = make_phantom(seed * 1000 + case, case_shape, cm.spacing)
        images.append(torch.from_numpy(normaliser.run(phantom.image.astype(np.float32))).to(device))
        labels.append(torch.from_numpy(phantom.label.astype(np.int64)).to(device))

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = nnUNetTrainer.build_network_architecture(pm, cm, 1, n_classes, enable_deep_supervision=False).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=iterations, pct_start=0.1)
    patch = [int(p) for p in cm.patch_size]
    network.train()
    for it in range(iterations):
        xs, ys = [], []
        for _ in range(batch_size):
            i = int(rng.integers(num_cases))
            start = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(case_shape, patch)]
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            xs.append(images[i][box][None])
            ys.append(labels[i][box])
        x, y = torch.stack(xs), torch.stack(ys)
        logits = network(x)
        probabilities = torch.softmax(logits, 1)
        one_hot = torch.nn.functional.one_hot(y, n_classes).permute(0, 4, 1, 2, 3).float()
        intersection = (probabilities * one_hot).sum((0, 2, 3, 4))
        dice = (2 * intersection + 1) / (probabilities.sum((0, 2, 3, 4)) + one_hot.sum((0, 2, 3, 4)) + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + 1 - dice[1:].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (it % 25 == 0 or it == iterations - 1):
            print(f"iteration {it}: loss {loss.item():.3f}, mean foreground Dice {dice[1:].mean().item():.3f}",
                  flush=True)
    network.eval()
    write_checkpoint(folder, 0, {k: v.cpu() for k, v in network.state_dict().items()}, plans, dataset_json)
    return folder


def results_model_folder(results_root: str | os.PathLike, plans: dict, **kwargs) -> Path:
    """Build the model folder where ``nnUNetv2_predict -d NAME -p PLANS -c 3d_fullres`` looks for it."""
    trainer = kwargs.get("trainer_name", "nnUNetTrainer")
    folder = Path(results_root) / plans["dataset_name"] / f"{trainer}__{plans['plans_name']}__{CONFIGURATION}"
    return build_model_folder(folder, plans, **kwargs)


def rotation_direction(angle_deg: float = 10.0) -> tuple[float, ...]:
    """A direction cosine matrix (row-major, 9 values): rotation about z, with y flipped."""
    a = np.deg2rad(angle_deg)
    m = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    m = m @ np.diag([1.0, -1.0, 1.0])
    return tuple(float(v) for v in m.ravel())


def ct_like_volume(shape_zyx: Sequence[int], seed: int = 0, smooth: bool = True) -> np.ndarray:
    """int16 HU volume: air, an elliptic body with soft tissue, a few bright/dark ellipsoids, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape_zyx)
    vol = np.full(tuple(shape_zyx), -1000, dtype=np.int16)
    body = (y[None, :, None] / 0.8) ** 2 + (x[None, None, :] / 0.9) ** 2 < 1.0
    vol[np.broadcast_to(body, vol.shape)] = 40
    for _ in range(8):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.12, 0.35, 3)
        hu = rng.choice([-100, 60, 150, 300, 700])
        d = (
            ((z - c[0]) / r[0])[:, None, None] ** 2
            + ((y - c[1]) / r[1])[None, :, None] ** 2
            + ((x - c[2]) / r[2])[None, None, :] ** 2
        )
        vol[d < 1.0] = hu
    noise = rng.normal(0, 20, size=vol.shape).astype(np.float32)
    return np.clip(vol + noise, -1024, 3000).astype(np.int16)


def write_ct_image(
    path: str | os.PathLike,
    shape_zyx: Sequence[int],
    spacing_xyz: Sequence[float],
    origin: Sequence[float] = (-120.5, 80.25, -300.0),
    direction: Sequence[float] | None = None,
    seed: int = 0,
) -> Path:
    """Write a CT-like NIfTI (SimpleITK, int16) with the given geometry; returns the path."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(ct_like_volume(shape_zyx, seed))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(direction if direction is not None else rotation_direction())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def smooth_logits(
    num_classes: int, shape: Sequence[int], seed: int = 0, sigma: float = 3.0, dtype=np.float16
) -> np.ndarray:
    """Spatially smooth random class scores (C, *shape): every class wins in sizeable blobs."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty((num_classes, *shape), dtype=np.float32)
    for c in range(num_classes):
        field = gaussian_filter(rng.normal(size=tuple(shape)).astype(np.float32), sigma, mode="nearest")
        out[c] = field / (field.std() + 1e-8) * 3.0
    return out.astype(dtype)


def logits_from_labels(
    labels: np.ndarray, num_classes: int, seed: int = 0, margin: float = 10.0, boundary_sigma: float = 1.0,
    noise_sd: float = 0.3, dtype=np.float16,
) -> np.ndarray:
    """Logits shaped like a trained network's for a label map: each class scores about ``margin`` inside its
    region, falling off over about ``boundary_sigma`` voxels, plus smooth noise. Returns (C, *labels.shape)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty((num_classes, *labels.shape), dtype=dtype)
    for c in range(num_classes):
        score = gaussian_filter((labels == c).astype(np.float32), boundary_sigma)
        score *= margin
        noise = gaussian_filter(rng.normal(size=labels.shape).astype(np.float32), 2.0)
        noise *= noise_sd / max(float(noise.std()), 1e-6)
        score += noise
        out[c] = score
    return out


def organ_labels(
    num_classes: int,
    shape: Sequence[int],
    seed: int = 0,
    radius_range: Sequence[tuple[float, float]] = ((4.0, 12.0),) * 3,
    overlap: bool = True,
) -> np.ndarray:
    """int16 label map of ellipsoidal "organs" 1 .. num_classes-1 on background 0. Radii (per axis, voxels) are
    drawn from ``radius_range``; with ``overlap=False`` organs keep 2 voxels apart (rejection sampling, an organ
    that finds no room is left out)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, dtype=np.int16)
    for c in range(1, num_classes):
        for _ in range(200):
            radii = [rng.uniform(lo, hi) for lo, hi in radius_range]
            centre = [rng.uniform(min(r, n / 2), max(n / 2, n - r)) for r, n in zip(radii, shape)]
            box = tuple(slice(max(0, int(m - r - 3)), min(n, int(m + r + 4))) for m, r, n in zip(centre, radii, shape))
            grids = np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing="ij")
            inside = sum(((g - m) / r) ** 2 for g, m, r in zip(grids, centre, radii)) < 1.0
            grown = sum(((g - m) / (r + 2)) ** 2 for g, m, r in zip(grids, centre, radii)) < 1.0
            if overlap or not np.any(labels[box][grown]):
                labels[box][inside] = c
                break
    return labels


def organ_logits(
    num_classes: int,
    shape: Sequence[int],
    seed: int = 0,
    radius_range: Sequence[tuple[float, float]] = ((4.0, 12.0),) * 3,
    margin: float = 10.0,
    boundary_sigma: float = 1.0,
    overlap: bool = True,
    dtype=np.float16,
) -> np.ndarray:
    """Network-like logits (C, *shape) for random ellipsoidal organs (:func:`organ_labels`,
    :func:`logits_from_labels`); radii are in voxels of ``shape``, the network grid."""
    labels = organ_labels(num_classes, shape, seed, radius_range, overlap)
    return logits_from_labels(labels, num_classes, seed, margin, boundary_sigma, dtype=dtype)
