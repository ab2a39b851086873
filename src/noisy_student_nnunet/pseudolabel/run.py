"""Pseudo-labeling as a restartable job: list and shard the unlabeled cases, run the ensemble per case,
and a final step that turns the finished cases into a dataset the student trains on.

One process per part (``cases[part_id::num_parts]``, nnU-Net's meaning) writes only finished cases;
a rerun skips them. The final step (:func:`finalize`) runs once, explicitly or automatically when
the last case of all parts is done: it applies the optional filter, writes the CSV and dataset.json,
puts the preprocessed data in place and records the dataset in the labeled dataset's plans.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from noisy_student_nnunet import validation
from noisy_student_nnunet.errors import CaseError, NsnError
from noisy_student_nnunet.locks import FolderBusy, folder_lock, holder_if_held
from noisy_student_nnunet.outputs import atomic_write_text
from noisy_student_nnunet.written import WriteFailed
from noisy_student_nnunet.io_checks import (InputCases, check_channels_read, group_case_files, name_unreadable_file,
                                            num_input_channels, read_images_checked)
from noisy_student_nnunet.pseudolabel import confidence as conf
from noisy_student_nnunet.pseudolabel import dataset as ds


@dataclass
class PseudolabelSettings:
    """What a pseudo-labeled dataset is made from. Parts and reruns must agree on all of it (the manifest)."""

    labeled_dataset: str  #: name or id of the labeled dataset the teachers were trained on
    images_dir: Path  #: unlabeled images, nnU-Net naming (CASE_0000.nii.gz, ...)
    folds: Sequence[int | str] = (0, 1, 2, 3, 4)
    trainer: str = "NoisyStudentTeacherTrainer"
    plans: str = "nnUNetLowFootprintPlans"
    configuration: str = "3d_fullres"
    checkpoint: str = "checkpoint_final.pth"
    enable_tta: bool = False  #: mirroring; off by default (the paper's low-footprint inference)
    ignore_below: float | None = None  #: mark voxels below this confidence with the ignore label
    direct_preprocessed: bool = True  #: write the student's preprocessed data from the teacher's grid
    tile_step_size: float = 0.5
    #: plans of the student to record the dataset in (default: the teachers' plans); differs in later
    #: rounds of iterated pseudo-labeling, where the student gets plans of its own name
    student_plans: str | None = None
    #: network precision (inference.precision): like the device, it is not part of the manifest
    precision: str = "auto"
    #: what runs the network (inference.backend): not part of the manifest either
    backend: str = "auto"

    def resolved(self) -> "PseudolabelSettings":
        from noisy_student_nnunet.pseudolabel.ensemble import parse_folds

        images_dir = Path(self.images_dir).expanduser().resolve()
        if not images_dir.is_dir():
            raise NsnError(f"-i: unlabeled images folder not found: {self.images_dir}")
        if self.ignore_below is not None and not 0.0 < self.ignore_below <= 1.0:
            raise NsnError(f"--ignore-below must be in (0, 1], got {self.ignore_below}")
        return PseudolabelSettings(
            labeled_dataset=ds.resolve_dataset(self.labeled_dataset, "labeled dataset (-d)"), images_dir=images_dir,
            folds=tuple(parse_folds(self.folds)), trainer=self.trainer, plans=self.plans,
            configuration=self.configuration, checkpoint=self.checkpoint, enable_tta=self.enable_tta,
            ignore_below=self.ignore_below, direct_preprocessed=self.direct_preprocessed,
            tile_step_size=self.tile_step_size, student_plans=self.student_plans, precision=self.precision,
            backend=self.backend)

    @property
    def model_dir(self) -> Path:
        from noisy_student_nnunet.pseudolabel.ensemble import model_folder

        return model_folder(ds.nnunet_root("nnUNet_results"), self.labeled_dataset, self.trainer, self.plans,
                            self.configuration)

    def manifest(self, file_ending: str) -> dict[str, Any]:
        return {
            "source_dataset": self.labeled_dataset,
            "images_dir": str(self.images_dir),
            "trainer": self.trainer,
            "plans": self.plans,
            "configuration": self.configuration,
            "folds": [str(f) for f in self.folds],
            "checkpoint": self.checkpoint,
            "enable_tta": self.enable_tta,
            "ignore_below": self.ignore_below,
            "direct_preprocessed": self.direct_preprocessed,
            "file_ending": file_ending,
            "ensemble": "mean of the folds' softmax probabilities, then argmax (preprocessed grid)",
        }


def list_input_cases(images_dir: Path, file_ending: str, num_channels: int,
                     labeled_ids: set[str] = frozenset()) -> InputCases:
    """Group ``CASE_XXXX<ending>`` files by case; a case with the wrong channel files, a file without a
    channel suffix or a case id that is also a labeled case becomes a problem naming the file."""
    out = group_case_files(images_dir, file_ending, num_channels, expects="the teacher")
    for case in sorted(set(out.files) & set(labeled_ids)):
        out.problems[case] = (f"{out.files.pop(case)[0]}: case id '{case}' is also a labeled case; rename the "
                              f"unlabeled image (the student mixes both datasets)")
    if not out.files and not out.problems:
        raise NsnError(f"-i: no images ending in {file_ending} in {images_dir}")
    return out


def labeled_case_ids(labeled_dataset: str, file_ending: str) -> set[str]:
    """Case ids of the labeled dataset (raw dataset.json mapping or labelsTr; else preprocessed gt)."""
    raw = Path(ds.nnunet_root("nnUNet_raw")) / labeled_dataset
    dataset_json = raw / "dataset.json"
    if dataset_json.is_file():
        document = json.loads(dataset_json.read_text())
        if "dataset" in document:
            return set(document["dataset"])
    for folder in (raw / "labelsTr", ds.nnunet_root("nnUNet_preprocessed") / labeled_dataset / "gt_segmentations"):
        if folder.is_dir():
            return {p.name[:-len(file_ending)] for p in folder.iterdir() if p.name.endswith(file_ending)}
    return set()


def _read_case(files: Sequence[Path], plans_manager, num_channels: int) -> tuple[np.ndarray, dict]:
    try:  # a truncated .nii.gz reads "fine": its stream is checked as it is decompressed, or beside the read
        data, properties = read_images_checked(files, num_channels, plans_manager.image_reader_writer_class,
                                               expects="the teacher")
    except CaseError:
        raise
    except Exception as error:  # find the file that failed, to name it
        raise CaseError(name_unreadable_file(files, plans_manager.image_reader_writer_class, error)) from None
    check_channels_read(files, data.shape[0], num_channels, expects="the teacher")
    if not np.all(np.isfinite(data)):
        raise CaseError(f"{files[0]}: image contains NaN or infinite values")
    return data, properties


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def voxel_volume_ml(configuration_manager, plans_manager, properties: dict) -> float:
    spacing = list(configuration_manager.spacing)
    if len(spacing) < 3:  # 2d configurations keep the first axis' spacing
        spacing = [properties["spacing"][plans_manager.transpose_forward[0]]] + spacing
    return float(np.prod(spacing)) / 1000.0


class Pseudolabeler:
    """The ensemble plus the output dataset: pseudo-labels one case at a time."""

    def __init__(self, settings: PseudolabelSettings, dataset: ds.OutputDataset, ensemble):
        self.settings = settings
        self.dataset = dataset
        self.ensemble = ensemble
        self.label_names = conf.label_names_from_dataset_json(ensemble.dataset_json)
        self.num_channels = num_input_channels(ensemble.dataset_json)
        # the pseudo dataset's dataset.json (labels + ignore): what the staged preprocessed data is made for
        self.pseudo_json = ds.pseudo_dataset_json(ensemble.dataset_json, {}, [], dataset.name,
                                                  settings.ignore_below is not None, "")
        self.ignore_label = self.pseudo_json["labels"].get("ignore")
        self.low_threshold = settings.ignore_below if settings.ignore_below is not None else conf.DEFAULT_LOW_THRESHOLD

    def process(self, case: str, files: Sequence[Path]) -> dict[str, Any]:
        """Pseudo-label one case and write its outputs; return its marker record."""
        pm, cm = self.ensemble.plans_manager, self.ensemble.configuration_manager
        data, properties = _read_case(files, pm, self.num_channels)
        preprocessor = cm.preprocessor_class(verbose=False)
        data, nonzero_seg, properties = preprocessor.run_case_npy(data, None, properties, pm, cm,
                                                                  self.ensemble.dataset_json)
        prediction = self.ensemble.predict(data)
        row = conf.case_statistics(prediction.labels, prediction.max_prob, prediction.fold_labels, self.label_names,
                                   voxel_volume_ml(cm, pm, properties), self.low_threshold)
        labels = prediction.labels
        if self.ignore_label is not None:
            labels = conf.apply_ignore_label(labels, prediction.max_prob, self.settings.ignore_below, self.ignore_label)
            row["frac_ignored"] = float((labels == self.ignore_label).mean())
        del prediction
        scratch = self.dataset.new_tmp_dir()
        try:
            ds.write_label_file(self.dataset, case, ds.labels_to_original_geometry(labels, properties, pm),
                                properties, pm)
            if self.settings.direct_preprocessed:
                ds.stage_preprocessed_case(self.dataset, case, data, ds.preprocessed_seg(labels, nonzero_seg),
                                           properties, pm, cm, self.pseudo_json, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = {"case": case, "images": [str(f) for f in files], **row}
        self.dataset.mark_done(case, record)
        return record


@dataclass
class PartResult:
    dataset: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    finalized: "FinalizeResult | None" = None


@dataclass
class FinalizeResult:
    dataset: str
    cases: int
    kept: list[str]
    excluded_failed: list[str]
    recorded_in: Path | None
    preprocessed: Path


def _setup(settings: PseudolabelSettings, output: str | None):
    """Resolve the settings, check the inputs and open the output dataset; fail fast, before any model is read."""
    from noisy_student_nnunet.pseudolabel.ensemble import fold_checkpoints

    settings = settings.resolved()
    model_dir = settings.model_dir
    fold_checkpoints(model_dir, settings.folds, settings.checkpoint)  # missing fold: fail before any work
    model_json = json.loads((model_dir / "dataset.json").read_text())
    plans_file = ds.nnunet_root("nnUNet_preprocessed") / settings.labeled_dataset / f"{settings.plans}.json"
    if not plans_file.is_file():
        raise NsnError(f"labeled dataset's plans not found: {plans_file}")
    try:
        conf.label_names_from_dataset_json(model_json)
    except ValueError as error:
        raise NsnError(f"{model_dir / 'dataset.json'}: {error}") from None
    file_ending = model_json["file_ending"]
    num_channels = num_input_channels(model_json, model_dir / "dataset.json")
    inputs = list_input_cases(settings.images_dir, file_ending, num_channels,
                              labeled_case_ids(settings.labeled_dataset, file_ending))
    dataset = ds.open_output_dataset(output, settings.manifest(file_ending))  # a taken id fails here, before loading
    return settings, dataset, inputs, model_json, plans_file


def _load_teachers(settings: PseudolabelSettings, device: str):
    """The teacher ensemble (``settings`` resolved): checkpoints read, the predictor built."""
    from noisy_student_nnunet.pseudolabel.ensemble import TeacherEnsemble

    return TeacherEnsemble(settings.model_dir, settings.folds, settings.checkpoint, device=device,
                           use_mirroring=settings.enable_tta, tile_step_size=settings.tile_step_size,
                           progress=False, precision=settings.precision, backend=settings.backend)


def run_part(settings: PseudolabelSettings, output: str | None = None, num_parts: int = 1, part_id: int = 0,
             device: str = "cpu", progress: bool = True, keep_top: float | None = None,
             min_confidence: float | None = None, auto_finalize: bool = True, num_processes: int = 2) -> PartResult:
    """Pseudo-label this part's cases (skipping finished ones); finalize when every case of every part is done."""
    validation.parts(num_parts, part_id, "--num-parts", "--part-id")
    check_filter(keep_top, min_confidence)  # the filter applies at the end: refuse it before hours of work
    validation.at_least(num_processes, "-np", 1, "processes for --stock-preprocessing")
    settings, dataset, inputs, _, _ = _setup(settings, output)
    _refuse_other_layouts(dataset.raw_dir, num_parts)
    # one process per part: a second run of the same part is refused (naming the first) before it reads the
    # teachers; other parts go on
    with folder_lock(dataset.raw_dir, f"nsn pseudolabel part {part_id}/{num_parts}",
                     _part_lock_name(part_id, num_parts)):
        ensemble = _load_teachers(settings, device)
        return _label_part(settings, dataset, ensemble, inputs, num_parts, part_id, progress, keep_top,
                           min_confidence, auto_finalize, num_processes)


_PART_LOCK = re.compile(r"\.nsn_pseudolabel_part(\d+)of(\d+)\.lock")  #: what _part_lock_name makes


def _part_lock_name(part_id: int, num_parts: int) -> str:
    return f".nsn_pseudolabel_part{part_id}of{num_parts}.lock"


def _refuse_other_layouts(folder: Path, num_parts: int) -> None:
    """A part of another --num-parts still running would share out the cases differently: two processes could
    label one case at once. Refuse, naming it."""
    for lock in sorted(folder.glob(".nsn_pseudolabel_part*.lock")):
        found = _PART_LOCK.fullmatch(lock.name)
        if found and int(found[2]) != num_parts:
            holder = holder_if_held(lock)
            if holder:
                raise FolderBusy(f"{folder}: part {found[1]}/{found[2]} is running ({holder}); every part of one run "
                                 f"must use the same --num-parts (this run: {num_parts}): wait for it or stop it")


def _label_part(settings: PseudolabelSettings, dataset: ds.OutputDataset, ensemble, inputs: InputCases,
                num_parts: int, part_id: int, progress: bool, keep_top: float | None, min_confidence: float | None,
                auto_finalize: bool, num_processes: int) -> PartResult:
    from tqdm import tqdm

    pseudolabeler = Pseudolabeler(settings, dataset, ensemble)
    result = PartResult(dataset=dataset.name)
    cases = inputs.part(num_parts, part_id)
    for case in tqdm(cases, desc=f"pseudo-labeling part {part_id}/{num_parts}", disable=not progress,
                     file=sys.stderr):
        if case in inputs.problems:
            message = inputs.problems[case]
        elif dataset.is_done(case):
            result.skipped.append(case)
            continue
        else:
            try:
                pseudolabeler.process(case, inputs.files[case])
                result.done.append(case)
                continue
            except WriteFailed as error:  # disk full: the next cases would fail alike; stop, a rerun resumes
                _mark_failed_if_possible(dataset, case, str(error))
                raise
            except CaseError as error:
                message = str(error)
            except (RuntimeError, ValueError, OSError, AssertionError) as error:
                message = f"{inputs.files[case][0]}: {type(error).__name__}: {_first_line(error)}"
        dataset.mark_failed(case, message)
        result.failed[case] = message
        print(f"nsn pseudolabel: case {case} failed: {message}", file=sys.stderr)
    if auto_finalize and not result.failed:
        records = dataset.records()
        if all(case in records for case in inputs.all_ids):
            result.finalized = finalize(settings, output=dataset.name, keep_top=keep_top,
                                        min_confidence=min_confidence, num_processes=num_processes,
                                        _opened=(dataset, inputs), wait_for_lock=False)
    return result


def _mark_failed_if_possible(dataset: ds.OutputDataset, case: str, message: str) -> None:
    """Record why ``case`` failed, if the disk still takes the small marker (a rerun retries the case anyway)."""
    try:
        dataset.mark_failed(case, message)
    except (WriteFailed, OSError):
        pass


def write_csv(path: Path, records: dict[str, dict[str, Any]], kept: set[str], label_names: dict[int, str]) -> None:
    extra = ["frac_ignored"] if any("frac_ignored" in r for r in records.values()) else []
    columns = conf.csv_columns(label_names, extra) + ["kept"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for case in sorted(records):
        row = []
        for column in columns:
            if column == "kept":
                row.append(int(case in kept))
                continue
            value = records[case].get(column, math.nan)
            row.append("" if isinstance(value, float) and math.isnan(value) else
                       (f"{value:.6g}" if isinstance(value, float) else value))
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def check_filter(keep_top: float | None, min_confidence: float | None) -> None:
    """The case filter's options: a fraction of cases in (0, 1], or a confidence (mean max-probability) in [0, 1]."""
    if keep_top is not None and min_confidence is not None:
        raise NsnError("--keep-top and --min-confidence are exclusive")
    if keep_top is not None:
        validation.number_in(keep_top, "--keep-top (fraction of cases kept)", 0.0, 1.0, low_open=True)
    if min_confidence is not None:
        validation.number_in(min_confidence, "--min-confidence (a mean probability)", 0.0, 1.0)


def finalize(settings: PseudolabelSettings, output: str | None = None, keep_top: float | None = None,
             min_confidence: float | None = None, num_processes: int = 2, wait_for_lock: bool = True,
             _opened: tuple | None = None) -> FinalizeResult | None:
    """Turn the finished cases into the student's dataset (idempotent; rerun it to change the filter).

    Refuses while cases are neither finished nor failed; failed cases are left out (and named).
    Returns None if another process holds the finalize lock and ``wait_for_lock`` is False.
    """
    check_filter(keep_top, min_confidence)
    if _opened is None:
        settings, dataset, inputs, _, _ = _setup(settings, output)
    else:
        dataset, inputs = _opened  # from run_part: settings already resolved
    dataset.raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(dataset.raw_dir, "nsn pseudolabel finalize", ".finalize.lock", wait=wait_for_lock):
            return _finalize_locked(settings, dataset, inputs, keep_top, min_confidence, num_processes)
    except FolderBusy:  # another part is finalizing (only without wait_for_lock)
        return None


def _finalize_locked(settings: PseudolabelSettings, dataset: ds.OutputDataset, inputs: InputCases,
                     keep_top: float | None, min_confidence: float | None, num_processes: int) -> FinalizeResult:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    all_records = dataset.records()
    failures = dataset.failures()
    records = {case: all_records[case] for case in inputs.all_ids if case in all_records}
    failed = sorted(case for case in inputs.all_ids if case not in records and case in failures)
    missing = [case for case in inputs.all_ids if case not in records and case not in failures]
    if missing:
        raise NsnError(f"{len(missing)} case(s) not pseudo-labeled yet (first: {missing[0]}): "
                       f"run all parts (--num-parts/--part-id) before finalizing {dataset.name}")
    if not records:
        raise NsnError(f"no case of {dataset.name} was pseudo-labeled successfully: nothing to finalize")
    kept = conf.select_cases({c: float(r["confidence"]) for c, r in records.items()}, keep_top, min_confidence)
    if not kept:
        raise NsnError(f"the filter (--keep-top {keep_top} / --min-confidence {min_confidence}) keeps no case")

    preprocessed_root = ds.nnunet_root("nnUNet_preprocessed")
    student_plans = settings.student_plans or settings.plans
    labeled_plans_file = preprocessed_root / settings.labeled_dataset / f"{student_plans}.json"
    labeled_json = json.loads((settings.model_dir / "dataset.json").read_text())
    label_names = conf.label_names_from_dataset_json(labeled_json)
    write_csv(dataset.csv_file, records, set(kept), label_names)
    description = (f"Pseudo-labels of {settings.images_dir} by the {len(settings.folds)}-fold teacher ensemble "
                   f"{settings.trainer}__{settings.plans}__{settings.configuration} of {settings.labeled_dataset} "
                   f"(mean softmax, argmax); made by nsn pseudolabel")
    dataset_json = ds.pseudo_dataset_json(labeled_json, records, kept, dataset.name,
                                          settings.ignore_below is not None, description)
    ds.atomic_write_json(dataset.raw_dir / "dataset.json", dataset_json)

    if settings.direct_preprocessed:
        plans = json.loads(labeled_plans_file.read_text())
        data_identifier = PlansManager(plans).get_configuration(settings.configuration).data_identifier
        _assemble_direct(dataset, plans, student_plans, data_identifier, kept, dataset_json)
    else:
        from noisy_student_nnunet.plans_transfer import preprocess_with_plans

        preprocess_with_plans(settings.labeled_dataset, dataset.name, student_plans,
                              configurations=(settings.configuration,), num_processes=num_processes)
    recorded = ds.record_in_plans(labeled_plans_file, dataset.name)
    if not recorded:
        print(f"nsn pseudolabel: note: {labeled_plans_file} carries no recipe (not made by `nsn plan`); "
              f"set NSN_PSEUDO_DATASET={dataset.name} for the student", file=sys.stderr)
    manifest = dict(dataset.manifest)
    manifest["finalized"] = {"cases": len(records), "kept": len(kept), "keep_top": keep_top,
                             "min_confidence": min_confidence, "failed": failed}
    ds.atomic_write_json(dataset.raw_dir / ds.MANIFEST, manifest)
    shutil.rmtree(dataset.tmp_dir, ignore_errors=True)
    return FinalizeResult(dataset=dataset.name, cases=len(records), kept=kept, excluded_failed=failed,
                          recorded_in=labeled_plans_file if recorded else None,
                          preprocessed=dataset.preprocessed_dir)


def _assemble_direct(dataset: ds.OutputDataset, plans: dict[str, Any], plans_name: str, data_identifier: str,
                     kept: Sequence[str], dataset_json: dict[str, Any]) -> None:
    """Put the kept staged cases in place as ``<data_identifier>/`` (hard links), then the dataset.json,
    then the plans file last: the plans file says "preprocessed" (as in ``preprocess_with_plans``)."""
    base = dataset.preprocessed_dir
    base.mkdir(parents=True, exist_ok=True)
    final_plans = base / f"{plans_name}.json"
    if final_plans.exists():
        final_plans.unlink()
    staging = dataset.staging_dir(data_identifier)
    new = base / f".{data_identifier}.new"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir()
    for case in kept:
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            source = staging / f"{case}{suffix}"
            if not source.is_file():
                raise NsnError(f"staged preprocessed file missing: {source} (delete its marker "
                               f"{dataset.marker(case)} and rerun to redo the case)")
            ds.link_or_copy(source, new / source.name)
    ds.replace_folder(new, base / data_identifier)
    ds.atomic_write_json(base / "dataset.json", dataset_json)
    plans = dict(plans)
    plans["dataset_name"] = dataset.name
    atomic_write_text(final_plans, json.dumps(plans, indent=4) + "\n")
