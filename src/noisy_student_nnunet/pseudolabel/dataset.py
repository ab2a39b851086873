"""The pseudo-labeled dataset on disk: where things go, and how they get there without half-written files.

Layout (``YYY`` = the output dataset)::

    $nnUNet_raw/DatasetYYY_Name/
        pseudolabel.json            the settings it was made with (written first, atomically, with the folder)
        labelsTr/CASE.nii.gz        pseudo-labels in the image's own geometry
        pseudolabel_cases/CASE.json per-case statistics: the "finished" marker, written last
        pseudolabel_cases/CASE.failed.json   why a case failed (retried on rerun)
        pseudolabel_confidence.csv  all cases' statistics and whether the filter kept them (finalize)
        dataset.json                labels/channels of the labeled dataset; "dataset" maps each kept case
                                    to its original image paths (images are not copied)  (finalize)
    $nnUNet_preprocessed/DatasetYYY_Name/
        pseudolabel_staging/<data_identifier>/   direct path: cases written from the teacher's grid
        <data_identifier>/          the kept cases (hard links to staging, or nnU-Net's preprocessor)
        dataset.json, <plans>.json  the labeled dataset's plans; the plans file is written last

Every file is written under a temporary name and renamed, so a rerun never takes a partial file for
a finished one; a case counts as finished only when its marker exists.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.outputs import atomic_write_text, publish_dir
from noisy_student_nnunet.written import check_file, writing

MANIFEST = "pseudolabel.json"
CASES_DIR = "pseudolabel_cases"
TMP_DIR = "pseudolabel_tmp"
STAGING_DIR = "pseudolabel_staging"
CSV_NAME = "pseudolabel_confidence.csv"
FAILED_SUFFIX = ".failed.json"
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")

# --- environment and dataset names ------------------------------------------------------------------


def nnunet_root(variable: str) -> Path:
    """The folder named by nnU-Net's environment variable (read at call time)."""
    value = os.environ.get(variable)
    if not value:
        raise NsnError(f"environment variable {variable} is not set (see nnU-Net's setting_up_paths.md)")
    return Path(value)


def _roots() -> list[Path]:
    return [Path(os.environ[v]) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
            if os.environ.get(v)]


def datasets_with_id(dataset_id: int) -> list[str]:
    """Dataset folder names with this id in nnUNet_raw/_preprocessed/_results (nnU-Net's lookup)."""
    names: set[str] = set()
    for root in _roots():
        if root.is_dir():
            names.update(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    return sorted(names)


def resolve_dataset(name_or_id: str | int, what: str = "dataset") -> str:
    """``"3"``, ``3`` or ``"Dataset003_X"`` -> ``"Dataset003_X"``; NsnError if unknown or ambiguous."""
    text = str(name_or_id).strip()
    match = _DATASET_RE.match(text)
    dataset_id = int(match.group(1)) if match else int(text) if text.isdigit() else None
    if dataset_id is None:
        raise NsnError(f"{what} '{text}' is neither a dataset id nor a name like Dataset001_Name")
    names = datasets_with_id(dataset_id)
    if match and text not in names:
        raise NsnError(f"{what} {text} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results")
    if not names:
        raise NsnError(f"{what} id {dataset_id} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results")
    if len(names) > 1 and not match:
        raise NsnError(f"{what} id {dataset_id} is ambiguous: {', '.join(names)}")
    return text if match else names[0]


# --- atomic writes ------------------------------------------------------------------------------------


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


# --- the output dataset -------------------------------------------------------------------------------


@dataclass
class OutputDataset:
    """The pseudo-labeled dataset's folders and the settings (manifest) it was made with."""

    name: str
    raw_dir: Path
    preprocessed_dir: Path
    manifest: dict[str, Any]

    @property
    def labels_dir(self) -> Path:
        return self.raw_dir / "labelsTr"

    @property
    def cases_dir(self) -> Path:
        return self.raw_dir / CASES_DIR

    @property
    def tmp_dir(self) -> Path:
        # beside the staged preprocessed data, which is renamed out of it: nnUNet_raw and nnUNet_preprocessed
        # may be different file systems, and a rename cannot cross them
        return self.preprocessed_dir / TMP_DIR

    @property
    def csv_file(self) -> Path:
        return self.raw_dir / CSV_NAME

    def staging_dir(self, data_identifier: str) -> Path:
        return self.preprocessed_dir / STAGING_DIR / data_identifier

    def label_file(self, case: str) -> Path:
        return self.labels_dir / f"{case}{self.manifest['file_ending']}"

    def marker(self, case: str) -> Path:
        return self.cases_dir / f"{case}.json"

    def failure_marker(self, case: str) -> Path:
        return self.cases_dir / f"{case}{FAILED_SUFFIX}"

    def is_done(self, case: str) -> bool:
        return self.marker(case).is_file()

    def mark_done(self, case: str, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.marker(case), {k: _json_number(v) for k, v in record.items()})
        if self.failure_marker(case).exists():
            self.failure_marker(case).unlink()

    def mark_failed(self, case: str, message: str) -> None:
        atomic_write_json(self.failure_marker(case), {"case": case, "error": message})

    def records(self) -> dict[str, dict[str, Any]]:
        """Finished cases' markers, by case id."""
        out: dict[str, dict[str, Any]] = {}
        if self.cases_dir.is_dir():
            for path in sorted(self.cases_dir.glob("*.json")):
                if path.name.startswith(".") or path.name.endswith(FAILED_SUFFIX):
                    continue
                record = json.loads(path.read_text())
                out[record["case"]] = {k: (math.nan if v is None else v) for k, v in record.items()}
        return out

    def failures(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.cases_dir.is_dir():
            for path in sorted(self.cases_dir.glob(f"*{FAILED_SUFFIX}")):
                if not path.name.startswith("."):
                    record = json.loads(path.read_text())
                    out[record["case"]] = record["error"]
        return out

    def new_tmp_dir(self) -> Path:
        """A private scratch folder on the staged data's file system (renames out of it are atomic)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"p{os.getpid()}_", dir=self.tmp_dir))


#: manifest keys that must match for a rerun (or another part) to continue an existing dataset
MANIFEST_SETTINGS = ("source_dataset", "images_dir", "trainer", "plans", "configuration", "folds", "checkpoint",
                     "enable_tta", "ignore_below", "direct_preprocessed", "file_ending")


def _settings_mismatch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    for key in MANIFEST_SETTINGS:
        if existing.get(key) != wanted.get(key):
            return f"{key}: {existing.get(key)!r} there, {wanted.get(key)!r} now"
    return None


def _read_manifest(raw_dir: Path) -> dict[str, Any] | None:
    path = raw_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _parse_output(requested: str) -> tuple[int, str | None]:
    text = requested.strip()
    match = _DATASET_RE.match(text)
    if match:
        return int(match.group(1)), text
    if text.isdigit():
        return int(text), None
    raise NsnError(f"-o: expected a dataset id or a name like Dataset502_Name, got {requested!r}")


def default_output_name(dataset_id: int, source_dataset: str) -> str:
    source = _DATASET_RE.match(source_dataset)
    short = source.group(2) if source else source_dataset
    return f"Dataset{dataset_id:03d}_{short}Pseudo"


def next_free_id(start: int) -> int:
    for dataset_id in range(max(1, start), 1000):
        if not datasets_with_id(dataset_id):
            return dataset_id
    raise NsnError("no free dataset id left (1..999): name the output with -o")


def _open(name: str, manifest: Mapping[str, Any]) -> OutputDataset:
    return OutputDataset(name=name, raw_dir=nnunet_root("nnUNet_raw") / name,
                         preprocessed_dir=nnunet_root("nnUNet_preprocessed") / name, manifest=dict(manifest))


def _adopt(name: str, wanted: Mapping[str, Any]) -> OutputDataset:
    raw_dir = nnunet_root("nnUNet_raw") / name
    existing = _read_manifest(raw_dir)
    if existing is None:
        raise NsnError(f"dataset id {name[7:10]} is taken by {name}, which `nsn pseudolabel` did not make "
                       f"(no {raw_dir / MANIFEST}): choose another -o")
    mismatch = _settings_mismatch(existing, wanted)
    if mismatch:
        raise NsnError(f"{raw_dir / MANIFEST} was made with other settings ({mismatch}): "
                       f"choose another -o, or delete {name} to start over")
    return _open(name, existing)


def _create(name: str, manifest: Mapping[str, Any]) -> OutputDataset | None:
    """Create the raw folder with its manifest in one rename; None if another process created it first."""
    raw_root = nnunet_root("nnUNet_raw")
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=raw_root))
    try:
        publish_dir(tmp)  # mkdtemp's 0700 would make the dataset private whatever the umask
        (tmp / MANIFEST).write_text(json.dumps(dict(manifest), indent=2) + "\n")
        try:
            os.rename(tmp, raw_root / name)
        except OSError:
            if (raw_root / name).exists():
                return None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _open(name, manifest)


def open_output_dataset(requested: str | None, manifest: Mapping[str, Any]) -> OutputDataset:
    """Create the output dataset or continue the one these settings made before.

    ``requested``: ``-o`` (an id or ``DatasetYYY_Name``), or None: continue a dataset that `nsn pseudolabel`
    made from the same labeled dataset, images and settings, else take the next free id after the
    labeled dataset's. An id held by any other dataset is an error (naming it).
    """
    source_id = int(_DATASET_RE.match(manifest["source_dataset"]).group(1))
    if requested is None:
        raw_root = nnunet_root("nnUNet_raw")
        if raw_root.is_dir():
            for raw_dir in sorted(raw_root.glob("Dataset*_*")):
                existing = _read_manifest(raw_dir)
                if existing is not None and _settings_mismatch(existing, manifest) is None:
                    return _open(raw_dir.name, existing)
        for _ in range(20):  # another part may take the same id at the same time: retry
            name = default_output_name(next_free_id(source_id + 1), manifest["source_dataset"])
            created = _create(name, manifest)
            if created is not None:
                return created
            existing = _read_manifest(raw_root / name)
            if existing is not None and _settings_mismatch(existing, manifest) is None:
                return _open(name, existing)
        raise NsnError("could not create the output dataset (ids taken concurrently): name it with -o")

    dataset_id, name = _parse_output(requested)
    if dataset_id == source_id:
        raise NsnError(f"-o {requested}: that is the labeled dataset's id")
    taken = datasets_with_id(dataset_id)
    if name is not None and taken and taken != [name]:
        raise NsnError(f"-o {requested}: dataset id {dataset_id:03d} is taken by {', '.join(taken)}")
    if taken:
        return _adopt(taken[0], manifest)
    name = name or default_output_name(dataset_id, manifest["source_dataset"])
    created = _create(name, manifest)
    return created if created is not None else _adopt(name, manifest)


# --- per-case outputs ---------------------------------------------------------------------------------


def labels_to_original_geometry(labels: np.ndarray, properties: Mapping[str, Any], plans_manager) -> np.ndarray:
    """A preprocessed-grid label map back in the image's geometry: nearest neighbour (the low-footprint
    predictor's resize), un-crop, un-transpose. No C x original-voxels floats."""
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    from noisy_student_nnunet.inference.resize import resize_labels_nearest

    resized = resize_labels_nearest(torch.from_numpy(labels),
                                    properties["shape_after_cropping_and_before_resampling"]).numpy()
    full = np.zeros(properties["shape_before_cropping"], dtype=labels.dtype)
    full = insert_crop_into_image(full, resized, properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(full.transpose(plans_manager.transpose_backward))


def write_label_file(dataset: OutputDataset, case: str, labels_original: np.ndarray, properties: Mapping[str, Any],
                     plans_manager) -> Path:
    """Write ``labelsTr/CASE<ending>`` with the plans' reader/writer, under a temporary name then renamed."""
    from noisy_student_nnunet.inference.export import write_labels

    dataset.labels_dir.mkdir(parents=True, exist_ok=True)
    written = write_labels(labels_original, str(dataset.labels_dir / case), plans_manager,
                           {"file_ending": dataset.manifest["file_ending"]}, dict(properties))
    return Path(written)


def preprocessed_seg(labels: np.ndarray, nonzero_seg: np.ndarray) -> np.ndarray:
    """The seg nnU-Net's preprocessor would store for ``labels``: -1 where background lies outside the
    image's nonzero region (``nonzero_seg`` is what the preprocessor returns for an unlabeled image)."""
    seg = labels.astype(np.int16)[None]
    seg[(seg == 0) & (nonzero_seg < 0)] = -1
    return seg


def stage_preprocessed_case(dataset: OutputDataset, case: str, data: np.ndarray, seg: np.ndarray,
                            properties: dict, plans_manager, configuration_manager, dataset_json: Mapping,
                            scratch: Path) -> None:
    """Write one case the way ``DefaultPreprocessor.run_case_save`` does (foreground locations for
    oversampling, blosc2 chunking for the patch size) into the staging folder, each file renamed into place."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    label_manager = plans_manager.get_label_manager(dataset_json)
    collect = list(label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        collect.append([-1] + label_manager.all_labels)
    properties = dict(properties)
    properties["class_locations"] = DefaultPreprocessor._sample_foreground_locations(seg, collect, verbose=False)
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    staging = dataset.staging_dir(configuration_manager.data_identifier)
    staging.mkdir(parents=True, exist_ok=True)
    with writing(staging / f"{case}.b2nd"):  # blosc2 says only "Error while creating the NDArray" on a full disk
        nnUNetDatasetBlosc2.save_case(data, seg, properties, str(scratch / case), chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        check_file(scratch / f"{case}{suffix}", staging / f"{case}{suffix}")
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        os.replace(scratch / f"{case}{suffix}", staging / f"{case}{suffix}")


# --- finalize pieces ----------------------------------------------------------------------------------


def pseudo_dataset_json(labeled_dataset_json: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]],
                        kept: Iterable[str], name: str, with_ignore: bool, description: str) -> dict[str, Any]:
    """nnU-Net's dataset.json of the pseudo-labeled dataset: the labeled one's labels and channels
    (plus an "ignore" label above all others when low-confidence voxels are marked), and a
    "dataset" mapping from each kept case to its original images (absolute) and its pseudo-label."""
    labels = dict(labeled_dataset_json["labels"])
    if with_ignore:
        labels["ignore"] = max(v for k, v in labels.items() if k != "ignore") + 1
    kept = sorted(kept)
    ending = labeled_dataset_json["file_ending"]
    document: dict[str, Any] = {
        "name": name,
        "description": description,
        "channel_names": labeled_dataset_json.get("channel_names", labeled_dataset_json.get("modality")),
        "labels": labels,
        "numTraining": len(kept),
        "file_ending": ending,
        "dataset": {case: {"images": list(records[case]["images"]), "label": f"labelsTr/{case}{ending}"}
                    for case in kept},
    }
    for key in ("overwrite_image_reader_writer", "regions_class_order"):
        if key in labeled_dataset_json:
            document[key] = labeled_dataset_json[key]
    return document


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def replace_folder(new: Path, final: Path) -> None:
    """Swap a completely written folder into place (the old one, if any, is removed after the swap)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    if old.exists():
        shutil.rmtree(old)


def record_in_plans(plans_file: Path, dataset_name: str) -> bool:
    """Set the recipe's ``student.pseudo_dataset`` in the labeled dataset's plans (atomic write).

    Returns False (changing nothing) when the plans carry no recipe (not made by ``nsn plan``).
    """
    from noisy_student_nnunet.recipe import PLANS_KEY, validate_recipe

    plans = json.loads(plans_file.read_text())
    if PLANS_KEY not in plans:
        return False
    plans[PLANS_KEY]["student"]["pseudo_dataset"] = dataset_name
    validate_recipe(plans[PLANS_KEY])
    atomic_write_text(plans_file, json.dumps(plans, indent=4) + "\n")
    return True
