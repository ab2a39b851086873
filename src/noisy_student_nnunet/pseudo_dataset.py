"""The pseudo-labeled dataset of the noisy student: where it is, and whether it fits the labeled one.

The student mixes cases of two preprocessed datasets in each minibatch, so both must be made with the
same plans: same spacing, intensity normalisation (for CT: the labeled dataset's foreground intensity
statistics), transposition, patch and network, and the same labels and channels. nnU-Net itself would
train happily on mismatched data, so :func:`locate_pseudo_dataset` checks this and raises an
:class:`~noisy_student_nnunet.errors.NsnError` naming the first difference.

The dataset is named by the recipe in the plans (``student.pseudo_dataset``, written by
``nsn pseudolabel``) or by the environment variable :data:`ENV_VAR` (a dataset name or id), which wins.

:func:`preprocess_with_plans` preprocesses a raw dataset with another dataset's plans, the way nnU-Net's
documentation moves plans between datasets; ``nsn pseudolabel`` and the tests use it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from noisy_student_nnunet.errors import NsnError

ENV_VAR = "NSN_PSEUDO_DATASET"

#: top-level plans keys that change the preprocessed data
PLANS_KEYS = ("transpose_forward", "transpose_backward", "foreground_intensity_properties_per_channel")
#: configuration keys that change the preprocessed data or what the network sees
CONFIGURATION_KEYS = ("data_identifier", "preprocessor_name", "spacing", "patch_size", "normalization_schemes",
                      "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                      "resampling_fn_seg_kwargs", "architecture")
#: dataset.json keys that must agree
DATASET_JSON_KEYS = ("labels", "channel_names", "regions_class_order")


@dataclass(frozen=True)
class PseudoDataset:
    """A located and checked pseudo-labeled preprocessed dataset."""

    name: str  #: e.g. Dataset502_PhantomsPseudo
    folder: Path  #: $nnUNet_preprocessed/<name>/<data_identifier>: the cases
    plans_file: Path  #: $nnUNet_preprocessed/<name>/<plans_name>.json
    identifiers: list[str] = field(default_factory=list)
    dataset_json: dict[str, Any] = field(default_factory=dict)  #: its dataset.json

    def __str__(self) -> str:  # nnU-Net's debug.json stores str() of trainer attributes
        return f"{self.name}: {len(self.identifiers)} pseudo-labeled cases in {self.folder}"

    @property
    def ignore_label(self) -> int | None:
        """The "ignore" label of low-confidence voxels (``nsn pseudolabel --ignore-below``), or None."""
        value = self.dataset_json.get("labels", {}).get("ignore")
        return int(value) if value is not None else None


def _preprocessed_root() -> Path:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise NsnError("environment variable nnUNet_preprocessed is not set")
    return Path(root)


def resolve_dataset_name(name_or_id: str | int) -> str:
    """``"502"``, ``502`` or ``"Dataset502_X"`` -> ``"Dataset502_X"``, as nnU-Net resolves it; NsnError if unknown."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    text = str(name_or_id).strip()
    if not text:
        raise NsnError("empty dataset name or id")
    try:
        return str(maybe_convert_to_dataset_name(text))
    except (RuntimeError, ValueError) as error:
        first = str(error).splitlines()[0]
        raise NsnError(f"pseudo-labeled dataset '{text}' not found: {first}") from None


def pseudo_dataset_setting(recipe: dict[str, Any]) -> tuple[str | None, str]:
    """The configured pseudo-labeled dataset and where the setting came from (``$NSN_PSEUDO_DATASET`` wins)."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return override, f"${ENV_VAR}"
    return recipe["student"]["pseudo_dataset"], "recipe key 'student.pseudo_dataset'"


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NsnError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise NsnError(f"cannot read {what} {path}: {error}") from None


def _resolved_configuration(plans: dict[str, Any], configuration: str, where: str) -> dict[str, Any]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration not in plans.get("configurations", {}):
        raise NsnError(f"{where} has no configuration '{configuration}'")
    return PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration


def check_same_plans(labeled_plans: dict[str, Any], pseudo_plans: dict[str, Any], configuration: str,
                     pseudo_plans_file: Path | str) -> None:
    """Raise NsnError naming the first plans key where the pseudo-labeled dataset's plans differ."""
    for key in PLANS_KEYS:
        if labeled_plans.get(key) != pseudo_plans.get(key):
            raise NsnError(f"pseudo-labeled plans {pseudo_plans_file} were made with other plans: '{key}' differs "
                           f"from the labeled dataset's (preprocess it with the labeled dataset's plans)")
    ours = _resolved_configuration(labeled_plans, configuration, "the labeled plans")
    theirs = _resolved_configuration(pseudo_plans, configuration, f"pseudo-labeled plans {pseudo_plans_file}")
    for key in CONFIGURATION_KEYS:
        if ours.get(key) != theirs.get(key):
            raise NsnError(f"pseudo-labeled plans {pseudo_plans_file} were made with other plans: "
                           f"'configurations.{configuration}.{key}' differs from the labeled dataset's")


def _without_added_ignore(labeled: dict[str, Any] | None, pseudo: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pseudo-labeled labels minus an "ignore" label the labeled dataset lacks, if it sits above all others.

    ``nsn pseudolabel --ignore-below`` marks low-confidence voxels with such a label (nnU-Net's rule:
    the ignore label is the highest); the classes themselves must still be the labeled dataset's.
    """
    if not isinstance(labeled, dict) or not isinstance(pseudo, dict) or "ignore" in labeled or "ignore" not in pseudo:
        return pseudo
    others = {k: v for k, v in pseudo.items() if k != "ignore"}
    values = [v for v in others.values() if isinstance(v, int)]
    if values and pseudo["ignore"] == max(values) + 1:
        return others
    return pseudo


def check_same_labels(labeled_dataset_json: dict[str, Any], pseudo_dataset_json: dict[str, Any],
                      pseudo_dataset_json_file: Path | str) -> None:
    """Raise NsnError if labels, channels or regions of the two dataset.json files differ.

    The pseudo-labeled dataset may add nnU-Net's "ignore" label (the highest value) to the labeled classes.
    """
    for key in DATASET_JSON_KEYS:
        ours, theirs = labeled_dataset_json.get(key), pseudo_dataset_json.get(key)
        if key == "labels":
            theirs = _without_added_ignore(ours, theirs)
        if key == "channel_names":  # older datasets call it "modality"
            ours = ours if ours is not None else labeled_dataset_json.get("modality")
            theirs = theirs if theirs is not None else pseudo_dataset_json.get("modality")
        if ours != theirs:
            raise NsnError(f"pseudo-labeled dataset.json {pseudo_dataset_json_file} has other '{key}' than the "
                           f"labeled dataset: {theirs!r} vs {ours!r}")


def locate_pseudo_dataset(labeled_plans: dict[str, Any], configuration: str, labeled_dataset_json: dict[str, Any],
                          recipe: dict[str, Any]) -> PseudoDataset:
    """Find the pseudo-labeled dataset named by the recipe or ``$NSN_PSEUDO_DATASET`` and check that it fits.

    It must be preprocessed for ``configuration`` with plans of the labeled dataset's plans name whose
    preprocessing-relevant keys equal the labeled plans', and carry the same labels and channels.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import file_ending_dataset_mapping

    setting, origin = pseudo_dataset_setting(recipe)
    if setting is None:
        raise NsnError(f"no pseudo-labeled dataset: {origin} is null; run `nsn pseudolabel` or set {ENV_VAR} "
                       f"to a dataset name or id")
    name = resolve_dataset_name(setting)
    if name == labeled_plans.get("dataset_name"):
        raise NsnError(f"{origin} names the labeled dataset itself ({name}); it must name the pseudo-labeled one")
    plans_name = labeled_plans["plans_name"]
    base = _preprocessed_root() / name
    plans_file = base / f"{plans_name}.json"
    if not base.is_dir():
        raise NsnError(f"pseudo-labeled dataset {name} ({origin}) is not preprocessed: no folder {base}")
    if not plans_file.is_file():
        raise NsnError(f"pseudo-labeled dataset {name} is not preprocessed with plans '{plans_name}': "
                       f"no plans file {plans_file}")
    pseudo_plans = _load_json(plans_file, "pseudo-labeled plans")
    check_same_plans(labeled_plans, pseudo_plans, configuration, plans_file)
    dataset_json_file = base / "dataset.json"
    pseudo_dataset_json = _load_json(dataset_json_file, "pseudo-labeled dataset.json")
    check_same_labels(labeled_dataset_json, pseudo_dataset_json, dataset_json_file)
    data_identifier = _resolved_configuration(labeled_plans, configuration, "the labeled plans")["data_identifier"]
    folder = base / data_identifier
    if not folder.is_dir():
        raise NsnError(f"pseudo-labeled dataset {name} is not preprocessed for '{configuration}': no folder {folder}")
    identifiers: list[str] = []
    for ending, dataset_class in file_ending_dataset_mapping.items():
        identifiers = sorted(dataset_class.get_identifiers(str(folder)))
        if identifiers:
            break
    if not identifiers:
        raise NsnError(f"pseudo-labeled dataset {name} has no preprocessed cases in {folder}")
    return PseudoDataset(name=name, folder=folder, plans_file=plans_file, identifiers=identifiers,
                         dataset_json=pseudo_dataset_json)


def _reader_writer_name(raw_folder: Path, dataset_json: dict[str, Any]) -> str:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(str(raw_folder), copy.deepcopy(dataset_json))
    if not cases:
        raise NsnError(f"raw dataset {raw_folder} has no training cases")
    example = next(iter(cases.values()))["images"][0]
    return determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                     verbose=False).__name__


def preprocess_with_plans(source_dataset: str | int, target_dataset: str | int, plans_name: str,
                          configurations: Sequence[str] = ("3d_fullres",), num_processes: int = 1) -> Path:
    """Preprocess raw ``target_dataset`` with the plans ``plans_name`` of ``source_dataset``; return its folder.

    This is nnU-Net's "move plans between datasets" recipe: the target gets a copy of the source's plans
    (so the source's spacing and intensity normalisation, not the target's own fingerprint; no fingerprint
    is extracted), its raw dataset.json is copied next to them, and nnU-Net's preprocessor runs. The plans
    file is written under its final name only after preprocessing finished, so an interrupted run is seen
    as "not preprocessed" by :func:`locate_pseudo_dataset`. Returns ``$nnUNet_preprocessed/<target>``.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    source = resolve_dataset_name(source_dataset)
    target = resolve_dataset_name(target_dataset)
    if source == target:
        raise NsnError(f"source and target dataset are the same: {source}")
    raw_root = os.environ.get("nnUNet_raw")
    if not raw_root:
        raise NsnError("environment variable nnUNet_raw is not set")
    raw_folder = Path(raw_root) / target
    target_json = _load_json(raw_folder / "dataset.json", "raw dataset.json")
    source_plans_file = _preprocessed_root() / source / f"{plans_name}.json"
    plans = _load_json(source_plans_file, "plans")
    for configuration in configurations:
        if configuration not in plans.get("configurations", {}):
            raise NsnError(f"plans {source_plans_file} have no configuration '{configuration}'")
    check_same_labels(_load_json(_preprocessed_root() / source / "dataset.json", "dataset.json"), target_json,
                      raw_folder / "dataset.json")

    plans["dataset_name"] = target
    plans["image_reader_writer"] = _reader_writer_name(raw_folder, target_json)
    base = _preprocessed_root() / target
    base.mkdir(parents=True, exist_ok=True)
    final_plans = base / f"{plans_name}.json"
    if final_plans.exists():
        final_plans.unlink()  # preprocessing below replaces the data; stale plans would mark it complete
    partial_name = f"{plans_name}__nsn_partial"
    partial_plans = base / f"{partial_name}.json"
    partial_plans.write_text(json.dumps(plans, indent=4))
    shutil.copyfile(raw_folder / "dataset.json", base / "dataset.json")
    preprocess_dataset(convert_dataset_name_to_id(target), partial_name, tuple(configurations), [num_processes],
                       verbose=False, show_progress_bar=True)
    os.replace(partial_plans, final_plans)
    return base
