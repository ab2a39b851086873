"""The student's side of the pseudo-labeled dataset: where it is, and whether it fits the labeled one.

``nsn pseudolabel`` writes the dataset (:mod:`noisy_student_nnunet.pseudolabel`); ``NoisyStudentTrainer`` reads
it, through this module. The student mixes cases of two preprocessed datasets in each minibatch, so both must
be made with the same plans: same spacing, intensity normalisation (for CT: the labeled dataset's foreground
intensity statistics), transposition, patch and network, and the same labels and channels. nnU-Net itself
would train happily on mismatched data, so :func:`locate_pseudo_dataset` checks this and raises an
:class:`~noisy_student_nnunet.errors.NsnError` naming the first difference.

The dataset is named by the recipe in the plans (``student.pseudo_dataset``, written by
``nsn pseudolabel``) or by the environment variable :data:`ENV_VAR` (a dataset name or id), which wins.
nnU-Net finds the trainers through the shim in ``nnunet_ext``, which re-exports them; this module is only
imported by them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.plans_transfer import check_same_labels, load_json, preprocessed_root

ENV_VAR = "NSN_PSEUDO_DATASET"

#: top-level plans keys that change the preprocessed data
PLANS_KEYS = ("transpose_forward", "transpose_backward", "foreground_intensity_properties_per_channel")
#: configuration keys that change the preprocessed data or what the network sees
CONFIGURATION_KEYS = ("data_identifier", "preprocessor_name", "spacing", "patch_size", "normalization_schemes",
                      "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                      "resampling_fn_seg_kwargs", "architecture")


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
    base = preprocessed_root() / name
    plans_file = base / f"{plans_name}.json"
    if not base.is_dir():
        raise NsnError(f"pseudo-labeled dataset {name} ({origin}) is not preprocessed: no folder {base}")
    if not plans_file.is_file():
        raise NsnError(f"pseudo-labeled dataset {name} is not preprocessed with plans '{plans_name}': "
                       f"no plans file {plans_file}")
    pseudo_plans = load_json(plans_file, "pseudo-labeled plans")
    check_same_plans(labeled_plans, pseudo_plans, configuration, plans_file)
    dataset_json_file = base / "dataset.json"
    pseudo_dataset_json = load_json(dataset_json_file, "pseudo-labeled dataset.json")
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
