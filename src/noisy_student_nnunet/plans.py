"""Low-footprint plans: nnU-Net's 3d_fullres with half the base width, derived from the stock plans.

The paper (Fig. 1, Table 3) keeps nnU-Net's 3D full-resolution U-Net and halves the base number of
features (16 instead of 32, doubled per stage, capped at 320 as in nnU-Net v1's "bnf16" plans), with
batch 4 and, on FLARE22, a pinned patch of 40x224x192. :func:`derive_lowfootprint_plans` builds that
configuration from a dataset's stock plans; only the architecture, batch and patch change, so the
``data_identifier`` (spacing, normalisation, resampling) is kept and preprocessed data is reused.

The network stays ``dynamic_network_architectures``' ``PlainConvUNet`` with ``arch_kwargs`` built the
way ``ExperimentPlanner.get_plans_for_configuration`` builds them, so stock ``nnUNetv2_predict`` and
``nnUNetv2_train`` run these plans as they are.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

from noisy_student_nnunet.errors import NsnError, error_message
from noisy_student_nnunet.io_checks import check_dataset_files
from noisy_student_nnunet.outputs import atomic_file
from noisy_student_nnunet.recipe import PLANS_KEY, validate_recipe

LOWFOOTPRINT_PLANS = "nnUNetLowFootprintPlans"
CONFIGURATION = "3d_fullres"
#: ExperimentPlanner.UNet_featuremap_min_edge_length and the max_numpool the planner passes
MIN_FEATURE_MAP_SIZE = 4
MAX_NUMPOOL = 999999
#: ExperimentPlanner's UNet_blocks_per_stage_encoder / _decoder: the PlainConvUNet's, whichever planner -pl names
BLOCKS_PER_STAGE_ENCODER = (2,) * 14
BLOCKS_PER_STAGE_DECODER = (2,) * 13
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def features_per_stage(n_stages: int, base: int, cap: int) -> tuple[int, ...]:
    """``min(cap, base * 2**i)`` per stage: the planner's rule with our base."""
    return tuple(min(cap, base * 2 ** i) for i in range(n_stages))


def topology_for_patch(spacing: Sequence[float], patch_size: Sequence[int]) -> dict[str, Any]:
    """nnU-Net's own topology for ``patch_size``: strides, kernel sizes, number of stages.

    Calls ``get_pool_and_conv_props`` with the planner's arguments. The returned ``patch_size`` is
    the input padded to what the pooling needs (equal to the input when it is already divisible).
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernel_sizes, padded_patch, divisible_by = get_pool_and_conv_props(
        list(spacing), list(patch_size), MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL)
    return {
        "n_stages": len(strides),
        "strides": [list(s) for s in strides],
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "patch_size": [int(i) for i in padded_patch],
        "divisible_by": [int(i) for i in divisible_by],
    }


def plain_unet_architecture(spacing: Sequence[float], patch_size: Sequence[int], base: int, cap: int,
                            blocks_encoder: Sequence[int] = BLOCKS_PER_STAGE_ENCODER,
                            blocks_decoder: Sequence[int] = BLOCKS_PER_STAGE_DECODER) -> dict[str, Any]:
    """The ``architecture`` block of a configuration, as ExperimentPlanner builds it, with our width."""
    topology = topology_for_patch(spacing, patch_size)
    n_stages = topology["n_stages"]
    dim = len(spacing)
    conv_op = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm_op = ("torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3
               else "torch.nn.modules.instancenorm.InstanceNorm2d")
    return {
        "network_class_name": PLAIN_CONV_UNET,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(features_per_stage(n_stages, base, cap)),
            "conv_op": conv_op,
            "kernel_sizes": topology["kernel_sizes"],
            "strides": topology["strides"],
            "n_conv_per_stage": list(blocks_encoder[:n_stages]),
            "n_conv_per_stage_decoder": list(blocks_decoder[:n_stages - 1]),
            "conv_bias": True,
            "norm_op": norm_op,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def derive_lowfootprint_plans(stock_plans: dict[str, Any], recipe: dict[str, Any],
                              plans_name: str = LOWFOOTPRINT_PLANS,
                              patch_size: Sequence[int] | None = None,
                              blocks_encoder: Sequence[int] = BLOCKS_PER_STAGE_ENCODER,
                              blocks_decoder: Sequence[int] = BLOCKS_PER_STAGE_DECODER) -> dict[str, Any]:
    """Low-footprint plans (3d_fullres only) from stock plans; pure, no file access.

    ``patch_size``: the patch when the recipe leaves ``network.patch_size`` null (the caller runs the
    planner's heuristics, see :func:`planner_patch_size`); ignored when the recipe pins one. A pinned
    patch that nnU-Net's pooling cannot use as is is an error naming the recipe key.
    """
    validate_recipe(recipe)
    configurations = stock_plans.get("configurations", {})
    if CONFIGURATION not in configurations:
        raise NsnError(f"plans '{stock_plans.get('plans_name', '?')}' have no '{CONFIGURATION}' configuration "
                       f"(2D dataset?): low-footprint plans are 3d_fullres only")
    stock = configurations[CONFIGURATION]
    if "inherits_from" in stock:
        raise NsnError(f"plans '{stock_plans.get('plans_name', '?')}': '{CONFIGURATION}' inherits from another "
                       f"configuration; derive from complete stock plans")
    network = recipe["network"]
    pinned = network["patch_size"]
    wanted = list(pinned) if pinned is not None else (list(patch_size) if patch_size is not None
                                                      else list(stock["patch_size"]))
    spacing = stock["spacing"]
    if len(wanted) != len(spacing):
        raise NsnError(f"recipe key 'network.patch_size' {wanted} does not match the {len(spacing)}D spacing "
                       f"{spacing}")
    architecture = plain_unet_architecture(spacing, wanted, network["base_num_features"],
                                           network["max_num_features"], blocks_encoder, blocks_decoder)
    topology = topology_for_patch(spacing, wanted)
    if topology["patch_size"] != wanted:
        raise NsnError(f"recipe key 'network.patch_size' {wanted} is not divisible by {topology['divisible_by']} "
                       f"(nnU-Net's pooling for spacing {spacing}); nnU-Net would use {topology['patch_size']}")

    config = copy.deepcopy(stock)
    config["batch_size"] = int(network["batch_size"])
    config["patch_size"] = wanted
    config["architecture"] = architecture
    plans = copy.deepcopy(stock_plans)
    plans["plans_name"] = plans_name
    plans["configurations"] = {CONFIGURATION: config}
    plans[PLANS_KEY] = copy.deepcopy(recipe)
    return plans


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_file(path) as tmp, open(tmp, "w") as handle:  # the umask's mode, like nnU-Net's own plans
        json.dump(document, handle, indent=4, sort_keys=False)
        handle.write("\n")


# --- the parts that touch nnU-Net's folders ---------------------------------------------------------


def _require_env(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise NsnError(f"environment variable {name} is not set (nnU-Net's data folders, see `nsn env`)")
    return Path(value)


@contextlib.contextmanager
def _planner_safe_threads():
    """nnU-Net's planner calls ``torch.set_num_threads(get_allowed_n_proc_DA())``, which raises when
    ``nnUNet_n_proc_DA=0`` (a common setting for single-process data augmentation); use 1 meanwhile."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def resolve_dataset(dataset: str | int) -> tuple[int, str]:
    """(id, DatasetXXX_Name) from an id or a name, with nnU-Net's lookup; NsnError if unknown."""
    from nnunetv2.utilities.dataset_name_id_conversion import (convert_dataset_name_to_id,
                                                               maybe_convert_to_dataset_name)
    try:
        name = str(maybe_convert_to_dataset_name(str(dataset)))
        return convert_dataset_name_to_id(name), name
    except (RuntimeError, ValueError, AssertionError) as error:
        raise NsnError(f"dataset '{dataset}' not found in nnUNet_raw / nnUNet_preprocessed: "
                       f"{str(error).splitlines()[0]}") from None


def find_planner_class(name: str) -> type:
    """An ExperimentPlanner subclass by name, searched where ``nnUNetv2_plan_experiment -pl`` searches."""
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ExperimentPlanner)):
        raise NsnError(f"-pl {name}: no nnU-Net experiment planner of that name")
    return cls


def default_plans_name(planner_class: type) -> str:
    """The plans a planner writes by default (``nnUNetPlans`` for ExperimentPlanner), read from its signature."""
    import inspect

    default = inspect.signature(planner_class.__init__).parameters.get("plans_name")
    if default is None or not isinstance(default.default, str):
        raise NsnError(f"-pl {planner_class.__name__}: cannot tell which plans it writes (no plans_name default)")
    return default.default


def ensure_stock_plans(dataset_id: int, dataset_name: str, planner_class: type, num_processes: int) -> Path:
    """The stock plans file, produced first (like ``nnUNetv2_plan_and_preprocess -c 3d_fullres``) if missing."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)

    preprocessed = _require_env("nnUNet_preprocessed") / dataset_name
    stock_file = preprocessed / f"{default_plans_name(planner_class)}.json"
    if stock_file.is_file():
        return stock_file
    raw_folder = _require_env("nnUNet_raw") / dataset_name
    check_raw_files(raw_folder, num_processes)  # fingerprinting and preprocessing read every raw file
    if not (preprocessed / "dataset_fingerprint.json").is_file():
        print(f"nsn plan: no fingerprint for {dataset_name}: extracting it (nnU-Net)")
        try:
            extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                        clean=False, verbose=False)
        except (AssertionError, RuntimeError, FileNotFoundError) as error:
            # SimpleITK puts the file's name on a later line of its message: keep all of it, on one line
            raise NsnError(f"dataset {dataset_name} failed nnU-Net's fingerprinting/integrity check: "
                           f"{error_message(error)}") from None
    print(f"nsn plan: no {stock_file.name}: running nnU-Net's {planner_class.__name__}")
    with _planner_safe_threads():
        _, identifier = plan_experiment_dataset(dataset_id, planner_class)
    stock_file = preprocessed / f"{identifier}.json"
    preprocess_dataset(dataset_id, identifier, (CONFIGURATION,), (num_processes,))
    return stock_file


def check_raw_files(raw_folder: Path, num_workers: int) -> None:
    """Every image and label of a raw dataset complete before nnU-Net reads it: SimpleITK reads a truncated
    .nii.gz silently (zeros past the cut), which would enter the fingerprint and the preprocessed data."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if not (raw_folder / "dataset.json").is_file():
        return  # nnU-Net's own integrity check reports the missing dataset.json
    try:
        cases = get_filenames_of_train_images_and_targets(str(raw_folder))
    except (OSError, KeyError, ValueError, AssertionError, RuntimeError) as error:
        raise NsnError(f"{raw_folder}: cannot list the dataset's files: {error_message(error)}") from None
    files = [f for case in cases.values() for f in (*case["images"], case["label"])]
    check_dataset_files([f for f in files if os.path.isfile(f)], num_workers)


def planner_patch_size(planner: Any, stock_plans: dict[str, Any], recipe: dict[str, Any]) -> list[int]:
    """The patch nnU-Net's planner picks for the low-footprint network.

    Runs the planner's ``get_plans_for_configuration`` on the stock 3d_fullres spacing and median shape
    with our base width and cap. The planner sizes the patch so that a batch of 2 fits its GPU memory
    target; the memory target is scaled by 2 / batch_size so that the recipe's batch fits instead.
    """
    import numpy as np

    stock = stock_plans["configurations"][CONFIGURATION]
    network = recipe["network"]
    planner.UNet_base_num_features = network["base_num_features"]
    planner.UNet_max_features_3d = network["max_num_features"]
    planner.UNet_vram_target_GB = planner.UNet_vram_target_GB * 2 / network["batch_size"]
    median_shape = np.array(stock["median_image_size_in_voxels"], dtype=float)
    n_voxels = float(np.prod(median_shape, dtype=np.float64) * planner.dataset_json["numTraining"])
    with _planner_safe_threads():
        config = planner.get_plans_for_configuration(np.array(stock["spacing"]), median_shape,
                                                     stock["data_identifier"], n_voxels, {})
    return [int(i) for i in config["patch_size"]]


def planned_recipe(dataset: str | int, plans_name: str = LOWFOOTPRINT_PLANS) -> tuple[dict[str, Any] | None, Path]:
    """The recipe already in ``<plans_name>.json`` of a dataset (None if no such plans or no valid recipe).

    ``nsn plan --recipe`` lays its file over it, as ``NSN_RECIPE`` is laid over it in training, so that a
    re-plan keeps what it does not name (``student.pseudo_dataset`` recorded by ``nsn pseudolabel``).
    An invalid recipe there (written by an older version) is no base: the caller starts from a bundled one.
    """
    _, dataset_name = resolve_dataset(dataset)
    plans_file = _require_env("nnUNet_preprocessed") / dataset_name / f"{plans_name}.json"
    try:
        recipe = json.loads(plans_file.read_text()).get(PLANS_KEY)
    except FileNotFoundError:
        return None, plans_file
    except (OSError, ValueError, AttributeError) as error:
        raise NsnError(f"cannot read the existing plans {plans_file}: {error_message(error)}") from None
    try:
        return (validate_recipe(recipe) if recipe is not None else None), plans_file
    except NsnError:
        return None, plans_file


def plan_dataset(dataset: str | int, recipe: dict[str, Any], planner_name: str = "ExperimentPlanner",
                 plans_name: str = LOWFOOTPRINT_PLANS, num_processes: int = 4) -> Path:
    """``nsn plan``: write ``<plans_name>.json`` for a dataset; preprocess only cases whose data is missing."""
    preprocessed_root = _require_env("nnUNet_preprocessed")
    validate_recipe(recipe)
    dataset_id, dataset_name = resolve_dataset(dataset)
    planner_class = find_planner_class(planner_name)
    stock_file = ensure_stock_plans(dataset_id, dataset_name, planner_class, num_processes)
    if stock_file.stem == plans_name:
        raise NsnError(f"--plans-name {plans_name} would overwrite the stock plans it is derived from")
    stock_plans = json.loads(stock_file.read_text())

    patch = None
    if recipe["network"]["patch_size"] is None:
        patch = planner_patch_size(planner_class(dataset_id), stock_plans, recipe)
    plans = derive_lowfootprint_plans(stock_plans, recipe, plans_name, patch)
    plans["experiment_planner_used"] = f"{stock_plans.get('experiment_planner_used', planner_name)} + nsn plan"

    out_file = preprocessed_root / dataset_name / f"{plans_name}.json"
    write_json_atomic(out_file, plans)
    config = plans["configurations"][CONFIGURATION]
    data_folder = preprocessed_root / dataset_name / config["data_identifier"]
    raw_root = os.environ.get("nnUNet_raw")
    missing = missing_preprocessed_cases(data_folder, Path(raw_root) / dataset_name if raw_root else None)
    if missing:
        print(f"nsn plan: {len(missing)} case(s) not preprocessed in {data_folder} (e.g. {missing[0]}): "
              f"preprocessing for {plans_name}")
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        check_raw_files(Path(raw_root) / dataset_name, num_processes)
        preprocess_dataset(dataset_id, plans_name, (CONFIGURATION,), (num_processes,))
    return out_file


def missing_preprocessed_cases(data_folder: Path, raw_folder: Path | None) -> list[str]:
    """Training cases without preprocessed data (properties + image + seg) in ``data_folder``.

    Checked case by case rather than by the folder's existence, so that an interrupted preprocessing
    run is completed by the next ``nsn plan``. Without the raw dataset (preprocessed data only, as on
    a cluster) an existing data folder is trusted.
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if raw_folder is None or not (raw_folder / "dataset.json").is_file():
        if data_folder.is_dir():
            return []
        raise NsnError(f"no preprocessed data in {data_folder} and no raw dataset to preprocess "
                       f"({raw_folder if raw_folder else 'nnUNet_raw is not set'})")
    identifiers = sorted(get_filenames_of_train_images_and_targets(str(raw_folder)))
    if not data_folder.is_dir():
        return identifiers

    def complete(case: str) -> bool:
        return (data_folder / f"{case}.pkl").is_file() and any(
            (data_folder / f"{case}{image}").is_file() and (data_folder / f"{case}{seg}").is_file()
            for image, seg in ((".b2nd", "_seg.b2nd"), (".npz", ".npz"), (".npy", "_seg.npy")))
    return [case for case in identifiers if not complete(case)]
