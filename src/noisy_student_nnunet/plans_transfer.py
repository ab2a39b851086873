"""Preprocessing a raw dataset with another dataset's plans, as nnU-Net's documentation moves plans between datasets.

``nsn pseudolabel --stock-preprocessing`` preprocesses the pseudo-labeled dataset this way with the labeled
dataset's plans (the default path writes the preprocessed data itself), and tests and benchmarks make stand-in
pseudo-labeled datasets with it. Datasets that share plans must share labels and channels:
:func:`check_same_labels` says so, here and on the student's side
(:mod:`noisy_student_nnunet.trainers.pseudo_source`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from noisy_student_nnunet.errors import NsnError

#: dataset.json keys that must agree between datasets preprocessed with the same plans
DATASET_JSON_KEYS = ("labels", "channel_names", "regions_class_order")


def preprocessed_root() -> Path:
    """``$nnUNet_preprocessed``; NsnError when unset."""
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise NsnError("environment variable nnUNet_preprocessed is not set")
    return Path(root)


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file; NsnError naming ``what`` and the file when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NsnError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise NsnError(f"cannot read {what} {path}: {error}") from None


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
    as "not preprocessed" by the student's :func:`~noisy_student_nnunet.trainers.pseudo_source.locate_pseudo_dataset`.
    Returns ``$nnUNet_preprocessed/<target>``.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    from noisy_student_nnunet.plans import resolve_dataset

    source = resolve_dataset(source_dataset)[1]
    target = resolve_dataset(target_dataset)[1]
    if source == target:
        raise NsnError(f"source and target dataset are the same: {source}")
    raw_root = os.environ.get("nnUNet_raw")
    if not raw_root:
        raise NsnError("environment variable nnUNet_raw is not set")
    raw_folder = Path(raw_root) / target
    target_json = load_json(raw_folder / "dataset.json", "raw dataset.json")
    source_plans_file = preprocessed_root() / source / f"{plans_name}.json"
    plans = load_json(source_plans_file, "plans")
    for configuration in configurations:
        if configuration not in plans.get("configurations", {}):
            raise NsnError(f"plans {source_plans_file} have no configuration '{configuration}'")
    check_same_labels(load_json(preprocessed_root() / source / "dataset.json", "dataset.json"), target_json,
                      raw_folder / "dataset.json")

    plans["dataset_name"] = target
    plans["image_reader_writer"] = _reader_writer_name(raw_folder, target_json)
    base = preprocessed_root() / target
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
