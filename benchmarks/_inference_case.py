"""The random-weight cases the inference benchmarks predict: a model folder with one fold and a phantom CT.

Weights are random: fine for time and memory, not for accuracy (``bench_e2e.py``'s accuracy guard trains a model
for that). The default case is issue 12's: a phantom CT of 523 x 433 x 269 voxels (x, y, z) at 0.7 x 0.7 x
1.25 mm, the FLARE22 half-width 3d_fullres U-Net planned at 2.5 x 1.6 x 1.6 mm (network grid 134 x 189 x 229,
patch 40 x 224 x 192: 12 patches at step 0.5). A case is built once under ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from _common import nnunet_env

import model_folders as mf  # noqa: E402  (on sys.path through _common)


def random_weight_case(work: Path, name: str, shape_zyx, spacing_zyx, plans_spacing, patch, architecture,
                       dataset_name: str, head_scale: float = 1.0, head_bias_std: float = 0.0
                       ) -> tuple[Path, Path, dict]:
    """(root, input folder, environment): a results folder with one random-weight fold, one phantom CT.
    ``head_scale``, ``head_bias_std``: the segmentation head's weights scaled, random biases added
    (``model_folders.build_model_folder``)."""
    from noisy_student_nnunet.phantoms import make_phantom

    root = work / name
    results = root / "results"
    plans = mf.make_plans(plans_spacing, patch, architecture, dataset_name=dataset_name)
    model = results / dataset_name / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        mf.results_model_folder(results, plans, head_scale=head_scale, head_bias_std=head_bias_std)
    inputs = root / "in"
    image = inputs / "case_0000.nii.gz"
    if not image.is_file():
        inputs.mkdir(parents=True, exist_ok=True)
        make_phantom(1, shape_zyx, spacing_zyx).write(image)
    return root, inputs, nnunet_env(root, results)


@dataclass
class HalfWidthCase:
    """The FLARE22 half-width model with random weights and one phantom CT, as (b), (c) and (e) measure them."""

    root: Path
    inputs: Path
    env: dict
    shape: tuple
    spacing: tuple
    plans_spacing: tuple
    patch: list
    architecture: dict
    dataset_name: str

    @property
    def model(self) -> Path:
        """The model folder (one random-weight fold)."""
        return self.root / "results" / self.dataset_name / f"nnUNetTrainer__nnUNetPlans__{mf.CONFIGURATION}"


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that describe the half-width case (defaults: issue 12's)."""
    parser.add_argument("--shape", type=int, nargs=3, default=(269, 433, 523), help="image shape z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="image spacing z y x (mm)")
    parser.add_argument("--plans_spacing", type=float, nargs=3, default=(2.5, 1.6, 1.6), help="z y x (mm)")
    parser.add_argument("--patch", type=int, nargs=3, default=(40, 224, 192))
    parser.add_argument("--slices", type=int, default=None, help="overrides --shape's z")
    parser.add_argument("--inplane", type=int, default=None, help="overrides --shape's y and x")
    parser.add_argument("--pixel_spacing", type=float, default=None, help="overrides --spacing's y and x")
    parser.add_argument("--slice_spacing", type=float, default=None, help="overrides --spacing's z")


def case_geometry(args: argparse.Namespace) -> tuple[tuple, tuple, tuple, tuple]:
    """(image shape z y x, spacing z y x, plans spacing, patch) from --shape/--spacing or the older options."""
    shape, spacing = list(args.shape), list(args.spacing)
    if args.slices is not None:
        shape[0] = args.slices
    if args.inplane is not None:
        shape[1:] = [args.inplane, args.inplane]
    if args.slice_spacing is not None:
        spacing[0] = args.slice_spacing
    if args.pixel_spacing is not None:
        spacing[1:] = [args.pixel_spacing, args.pixel_spacing]
    return tuple(shape), tuple(spacing), tuple(args.plans_spacing), tuple(args.patch)


#: ``--quiet_head``'s segmentation head: weights scaled by this and random biases of standard deviation 1 (nnU-Net
#: starts them at 0), so that the logits are the biases up to about 1e-4: one class wins everywhere, and the label
#: map compresses as a trained model's does, not as noise
QUIET_HEAD_SCALE = 1e-5


def half_width_case(args: argparse.Namespace, prefix: str, dataset_name: str) -> HalfWidthCase:
    """Build (or reuse, under ``--workdir``) the case that ``--shape``/``--spacing``/``--plans_spacing`` describe
    (and ``--quiet_head``, where the command has it)."""
    shape, spacing, plans_spacing, patch_request = case_geometry(args)
    architecture, patch = mf.half_width_architecture(plans_spacing, patch_request)
    quiet = getattr(args, "quiet_head", False)
    name = f"{prefix}{'_quiet' if quiet else ''}_{'x'.join(map(str, shape))}_{'x'.join(map(str, plans_spacing))}"
    root, inputs, env = random_weight_case(Path(args.workdir), name, shape, spacing, plans_spacing, patch,
                                           architecture, dataset_name, QUIET_HEAD_SCALE if quiet else 1.0,
                                           1.0 if quiet else 0.0)
    return HalfWidthCase(root, inputs, env, shape, spacing, plans_spacing, patch, architecture, dataset_name)
