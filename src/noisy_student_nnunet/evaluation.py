"""FLARE22 accuracy metrics: DSC and NSD per case and organ, exactly as the challenge scores them.

The rules follow the official FLARE22 evaluation script (JunMa11/FLARE, FLARE22_DSC_NSD_Eval.py), as
docs/flare-evaluation.md sets them out, so that users can trust these numbers instead of the official code:

- labels read as uint8, spacing from the reference's NIfTI header (nibabel ``get_zooms()``);
- reference and prediction both empty: DSC = NSD = 1; exactly one empty: DSC = NSD = 0;
- aorta, IVC and esophagus are scored only on ``[z_min, z_max)`` of the reference along the third
  array axis (the official code's exclusive upper bound), for DSC and NSD alike;
- DSC = 2|A∩B| / (|A| + |B|); NSD = surface Dice at the organ's tolerance (mm) from DeepMind's
  ``surface-distance`` package; NSD = 0 when DSC < 0.2;
- values rounded to 4 decimals.

Deliberate additions, where the official script would silently compute a wrong score:

- prediction and reference must share geometry (shape, spacing, affine), otherwise the case fails
  naming the file;
- label values are read exactly, never wrapped into uint8 (the official ``np.uint8(...)`` turns 257 into
  the liver and -1 into 255, and 1.5 into 1): a value outside the label set is an error naming the file
  and the values (``unknown_labels_as_background`` counts them as background, with a warning), a
  non-integer or NaN value is always an error;
- a truncated ``.nii.gz`` is an error naming the file.

A failed case is reported and left out (``skip_failed``) or raises :class:`CaseError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from noisy_student_nnunet.errors import CaseError, NsnError, error_message
from noisy_student_nnunet.flare import FLARE22_ORGANS, Organ
from noisy_student_nnunet.io_checks import read_gzip_stream
from noisy_student_nnunet.outputs import atomic_write_text

NIFTI_SUFFIX = ".nii.gz"
NSD_ZERO_BELOW_DSC = 0.2  # FLARE22 rule: a prediction this far off gets no surface credit
DECIMALS = 4
MAX_LABEL = 255  # label maps are scored as uint8, as the official script reads them
UNKNOWN_LABELS_FLAG = "--unknown-labels-as-background"
GEOMETRY_ATOL = 1e-4  # mm; header floats written by different tools may differ in the last bits


@dataclass(frozen=True)
class LabelSpec:
    """One scored structure: which label values form it, its CSV column prefix and NSD tolerance."""

    name: str
    column: str
    values: tuple[int, ...]
    nsd_tolerance_mm: float
    z_range_only: bool = False

    @classmethod
    def from_organ(cls, organ: Organ) -> "LabelSpec":
        return cls(organ.name, organ.column, (organ.label,), organ.nsd_tolerance_mm, organ.z_range_only)


FLARE22_SPECS: tuple[LabelSpec, ...] = tuple(LabelSpec.from_organ(organ) for organ in FLARE22_ORGANS)


def label_specs_from_dataset_json(path: str | os.PathLike, tolerance_mm: float) -> tuple[LabelSpec, ...]:
    """Label specs from an nnU-Net dataset.json.

    A label whose name and value are those of a FLARE22 organ keeps FLARE's column, tolerance and
    z-range rule (a FLARE22 dataset.json therefore scores exactly like ``--labels flare22``); any other
    label uses its own name as column prefix and ``tolerance_mm``. Region labels (lists) are scored as
    the union of their values.
    """
    path = Path(path)
    try:
        labels = json.loads(path.read_text())["labels"]
    except FileNotFoundError:
        raise NsnError(f"labels file not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise NsnError(f"{path} is not a dataset.json with a 'labels' entry") from None
    if not isinstance(labels, dict):
        raise NsnError(f"{path}: 'labels' must map names to values, got {type(labels).__name__}")
    flare_by_name = {organ.name: organ for organ in FLARE22_ORGANS}
    specs = []
    for name, value in labels.items():
        values = _label_values_of(path, name, value)
        if values == (0,) or name == "background":
            continue
        if any(not 0 < v < 256 for v in values):
            raise NsnError(f"{path}: label {name!r} has values {list(values)}; labels must be 1..255")
        organ = flare_by_name.get(name)
        if organ is not None and values == (organ.label,):
            specs.append(LabelSpec.from_organ(organ))
        else:
            specs.append(LabelSpec(name, name, values, float(tolerance_mm)))
    if not specs:
        raise NsnError(f"{path} defines no foreground labels")
    return tuple(specs)


def _label_values_of(path: Path, name: str, value) -> tuple[int, ...]:
    """A dataset.json label's value(s) as whole numbers; ``int()`` would turn 1.5 into 1 and fail on "one"."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise NsnError(f"{path}: label {name!r} has value {json.dumps(value)}; label values are whole numbers "
                       f"(or lists of them for regions)")
    return tuple(items)


def csv_columns(specs: Sequence[LabelSpec]) -> list[str]:
    """Name, then every ``<column>_DSC``, then every ``<column>_NSD`` (the official FLARE22 order)."""
    return ["Name"] + [f"{s.column}_DSC" for s in specs] + [f"{s.column}_NSD" for s in specs]


def _round(value: float) -> float:
    # numpy rounding on float64, as the official script's round(np.float64, 4)
    return float(round(np.float64(value), DECIMALS))


def _mask(data: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return data == values[0] if len(values) == 1 else np.isin(data, values)


def score_structure(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    spec: LabelSpec,
    nsd_zero_below_dsc: float = NSD_ZERO_BELOW_DSC,
) -> tuple[float, float]:
    """Unrounded (DSC, NSD) of one structure under the FLARE22 rules.

    Returns NaN for both when the z-range rule leaves nothing to score (the reference labels the
    structure on a single slice, so ``[z_min, z_max)`` is empty): the official script then divides
    0 by 0 as well.
    """
    import surface_distance  # DeepMind's package, as the official FLARE code

    gt = _mask(reference, spec.values)
    pred = _mask(prediction, spec.values)
    gt_any, pred_any = bool(gt.any()), bool(pred.any())
    if not gt_any and not pred_any:
        return 1.0, 1.0
    if gt_any != pred_any:
        return 0.0, 0.0
    if spec.z_range_only:
        z_index = np.nonzero(gt.any(axis=(0, 1)))[0]
        z_lower, z_upper = int(z_index.min()), int(z_index.max())
        gt, pred = gt[:, :, z_lower:z_upper], pred[:, :, z_lower:z_upper]  # upper bound exclusive
    gt_sum, pred_sum = int(gt.sum()), int(pred.sum())
    if gt_sum + pred_sum == 0:
        return math.nan, math.nan
    dsc = 2.0 * int(np.logical_and(gt, pred).sum()) / (gt_sum + pred_sum)
    if dsc < nsd_zero_below_dsc or gt_sum == 0 or pred_sum == 0:
        # one side empty after the z-crop: the official code yields NSD 0 (all distances infinite);
        # surface-distance 0.1 cannot compute that case under numpy 2 (np.Inf), so it is set here.
        return dsc, 0.0
    distances = surface_distance.compute_surface_distances(gt, pred, tuple(float(s) for s in spacing))
    nsd = float(surface_distance.compute_surface_dice_at_tolerance(distances, spec.nsd_tolerance_mm))
    return dsc, nsd


def _nifti_image_class(content: bytes):
    """``Nifti1Image`` or ``Nifti2Image`` for decompressed NIfTI bytes (``sizeof_hdr`` tells which)."""
    import nibabel as nib

    sizes = {int.from_bytes(content[:4], order) for order in ("little", "big")}
    return nib.Nifti2Image if 540 in sizes else nib.Nifti1Image


def _nifti_from_bytes(content: bytes):
    """A NIfTI-1 or NIfTI-2 image parsed from its decompressed bytes."""
    return _nifti_image_class(content).from_bytes(content)


def _array_in_bytes(content: bytes) -> tuple[np.ndarray, tuple[float, ...], np.ndarray] | None:
    """The voxel array of a decompressed NIfTI as a view into ``content`` (no second copy of the file in memory),
    with zooms and affine; None where nibabel's own reading is needed (scaled data, a short file)."""
    import io
    import math

    header = _nifti_image_class(content).header_class.from_fileobj(io.BytesIO(content))
    slope, inter = header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return None
    dtype, shape, offset = header.get_data_dtype(), header.get_data_shape(), int(header.get_data_offset())
    count = math.prod(shape)
    if offset + count * dtype.itemsize > len(content):
        return None
    data = np.frombuffer(content, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    return data, tuple(float(z) for z in header.get_zooms()), np.asarray(header.get_best_affine(), dtype=np.float64)


def _read_label_array(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """The stored array (its own dtype, nibabel axis order), header spacing and affine; CaseError naming the
    file when it is truncated, unreadable or not 3D."""
    import nibabel as nib

    path = Path(path)
    # a .gz stream is read and decompressed once: checked to its end (nibabel reads a truncated one without
    # an error), then parsed from memory
    content = read_gzip_stream(path) if path.name.endswith(".gz") else None
    try:
        found = None if content is None else _array_in_bytes(content)
        if found is not None:
            data, zooms, affine = found
        else:
            image = nib.load(str(path)) if content is None else _nifti_from_bytes(content)
            data = np.asanyarray(image.dataobj)
            zooms = tuple(float(z) for z in image.header.get_zooms())
            affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise CaseError(f"{path}: cannot read label map: {error_message(error)}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{path} is not a 3D label map (shape {data.shape})")
    return data, zooms[:3], affine


def _format_values(values: Sequence[int | float], limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def _format_label_set(allowed: frozenset[int]) -> str:
    values = sorted(allowed)
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return _format_values(values)


def to_label_map(data: np.ndarray, path: str | os.PathLike, allowed: frozenset[int] | None = None,
                 unknown_as_background: bool = False) -> tuple[np.ndarray, list[int]]:
    """A uint8 label map from a label image's array, exactly or not at all.

    Non-integer or non-finite values raise CaseError. Values outside ``allowed`` (default: 0..255, what
    uint8 holds) raise CaseError naming them, or with ``unknown_as_background`` become 0; returns the map
    and the unknown values found.
    """
    if data.dtype == bool:
        data = data.view(np.uint8)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise CaseError(f"{path}: label map holds NaN or infinite values")
        fractional = data != np.floor(data)
        if fractional.any():
            examples = [float(v) for v in np.unique(data[fractional])]
            raise CaseError(f"{path}: label map holds non-integer values ({_format_values(examples)}); "
                            f"labels are whole numbers")
        del fractional
    elif data.dtype.kind not in "iu":
        raise CaseError(f"{path}: label map of type {data.dtype}; labels are whole numbers")
    outside: list[int] = []
    if data.size and (data.min() < 0 or data.max() > MAX_LABEL):
        out_of_range = (data < 0) | (data > MAX_LABEL)
        outside = [int(v) for v in np.unique(data[out_of_range])]
        labels = np.where(out_of_range, 0, data).astype(np.uint8)
    else:
        labels = data.astype(np.uint8)  # exact: whole numbers within 0..255
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=MAX_LABEL + 1))
    known = frozenset(range(MAX_LABEL + 1)) if allowed is None else allowed | {0}
    unknown_in_range = [int(v) for v in present if int(v) not in known]
    unknown = sorted(set(unknown_in_range) | set(outside))
    if unknown and not unknown_as_background:
        raise CaseError(f"{path}: label values {_format_values(unknown)} are not in the label set "
                        f"({_format_label_set(known)}); fix the file, or pass {UNKNOWN_LABELS_FLAG} to count them "
                        f"as background")
    if unknown_in_range:
        labels[np.isin(labels, unknown_in_range)] = 0
    return labels, unknown


def load_label_image(path: str | os.PathLike, allowed: frozenset[int] | None = None,
                     unknown_as_background: bool = False) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """uint8 label array (nibabel axis order), header spacing and affine of a NIfTI label map; values are
    checked as :func:`to_label_map` says (never wrapped)."""
    data, zooms, affine = _read_label_array(path)
    labels, _ = to_label_map(data, path, allowed, unknown_as_background)
    return labels, zooms, affine


def label_set(specs: Sequence[LabelSpec]) -> frozenset[int]:
    """The label values a map may hold when scored with ``specs``: background and every structure's values."""
    return frozenset({0, *(v for spec in specs for v in spec.values)})


@dataclass
class CaseResult:
    name: str
    dsc: list[float]
    nsd: list[float]
    missing_prediction: bool = False
    warnings: list[str] = field(default_factory=list)  #: unknown labels counted as background
    error: str | None = None  #: why the case could not be scored (then dsc and nsd are empty)


def evaluate_case(
    reference_path: str | os.PathLike,
    prediction_path: str | os.PathLike | None,
    specs: Sequence[LabelSpec] = FLARE22_SPECS,
    nsd_zero_below_dsc: float = NSD_ZERO_BELOW_DSC,
    unknown_labels_as_background: bool = False,
) -> CaseResult:
    """Rounded DSC and NSD of every structure of one case; no prediction file counts as all empty.

    Raises :class:`CaseError` naming the file for an unreadable or truncated file, label values outside the
    label set of ``specs`` (unless ``unknown_labels_as_background``), non-integer labels or other geometry.
    """
    name = Path(reference_path).name
    allowed = label_set(specs)
    notes: list[str] = []

    def load(path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
        data, zooms, affine = _read_label_array(path)
        labels, unknown = to_label_map(data, path, allowed, unknown_labels_as_background)
        if unknown:
            notes.append(f"{path}: label values {_format_values(unknown)} are not in the label set "
                         f"({_format_label_set(allowed)}): counted as background ({UNKNOWN_LABELS_FLAG})")
        return labels, zooms, affine

    reference, spacing, affine = load(reference_path)
    missing = prediction_path is None or not Path(prediction_path).is_file()
    if missing:
        prediction = np.zeros_like(reference)
    else:
        prediction, pred_spacing, pred_affine = load(prediction_path)
        if prediction.shape != reference.shape:
            raise CaseError(f"case {name}: prediction shape {prediction.shape} != reference shape {reference.shape}")
        if not np.allclose(pred_spacing, spacing, rtol=0, atol=GEOMETRY_ATOL):
            raise CaseError(f"case {name}: prediction spacing {pred_spacing} != reference spacing {spacing}")
        if not np.allclose(pred_affine, affine, rtol=0, atol=GEOMETRY_ATOL):
            raise CaseError(f"case {name}: prediction affine differs from the reference affine (origin or direction)")
    dsc, nsd = [], []
    for spec in specs:
        d, n = score_structure(reference, prediction, spacing, spec, nsd_zero_below_dsc)
        dsc.append(_round(d))
        nsd.append(_round(n))
    return CaseResult(name, dsc, nsd, missing, notes)


def _evaluate_case_star(job: tuple) -> CaseResult:
    *arguments, skip_failed = job
    try:
        return evaluate_case(*arguments)
    except CaseError as error:
        if not skip_failed:
            raise
        return CaseResult(Path(arguments[0]).name, [], [], error=str(error))


@dataclass
class EvaluationResult:
    specs: tuple[LabelSpec, ...]
    cases: list[CaseResult]
    missing_predictions: list[str] = field(default_factory=list)
    unmatched_predictions: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  #: case -> why it was not scored (left out of all means)

    def rows(self) -> list[list]:
        return [[c.name, *c.dsc, *c.nsd] for c in self.cases]

    def nan_entries(self) -> list[str]:
        """``case/column`` of values left undefined by the z-range rule (single-slice references)."""
        out = []
        for case in self.cases:
            for spec, d in zip(self.specs, case.dsc):
                if math.isnan(d):
                    out.append(f"{case.name}/{spec.column}")
        return out

    def summary(self) -> dict:
        """Mean and std (population, as numpy) per structure and overall; NaNs are left out and listed."""
        dsc = np.array([c.dsc for c in self.cases], dtype=np.float64).reshape(len(self.cases), len(self.specs))
        nsd = np.array([c.nsd for c in self.cases], dtype=np.float64).reshape(len(self.cases), len(self.specs))

        def stats(values: np.ndarray) -> dict:
            values = values[~np.isnan(values)]
            if values.size == 0:
                return {"mean": None, "std": None}
            return {"mean": _round(values.mean()), "std": _round(values.std())}

        per_structure = {
            spec.column: {"DSC": stats(dsc[:, i]), "NSD": stats(nsd[:, i]), "nsd_tolerance_mm": spec.nsd_tolerance_mm}
            for i, spec in enumerate(self.specs)
        }
        return {
            "n_cases": len(self.cases),
            "overall": {"DSC": stats(dsc.ravel()), "NSD": stats(nsd.ravel())},
            "per_structure": per_structure,
            "missing_predictions": list(self.missing_predictions),
            "unmatched_predictions": list(self.unmatched_predictions),
            "undefined_values": self.nan_entries(),
            "failed_cases": dict(self.failed),
        }

    def table(self) -> str:
        """A per-structure text table: mean ± std of DSC and NSD, then the overall row."""
        summary = self.summary()
        width = max([len(s.column) for s in self.specs] + [len("Overall")])

        def fmt(entry: dict) -> str:
            if entry["mean"] is None:
                return f"{'n/a':>15}"
            return f"{entry['mean']:.4f} ± {entry['std']:.4f}"

        lines = [f"{'Structure':<{width}}  {'tol mm':>6}  {'DSC':>15}  {'NSD':>15}"]
        for spec in self.specs:
            entry = summary["per_structure"][spec.column]
            lines.append(f"{spec.column:<{width}}  {spec.nsd_tolerance_mm:>6g}  "
                         f"{fmt(entry['DSC'])}  {fmt(entry['NSD'])}")
        lines.append(f"{'Overall':<{width}}  {'':>6}  "
                     f"{fmt(summary['overall']['DSC'])}  {fmt(summary['overall']['NSD'])}")
        return "\n".join(lines)


def _nifti_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIX) and p.is_file())


def evaluate_folders(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    specs: Sequence[LabelSpec] = FLARE22_SPECS,
    num_processes: int = 1,
    nsd_zero_below_dsc: float = NSD_ZERO_BELOW_DSC,
    progress: bool = True,
    unknown_labels_as_background: bool = False,
    skip_failed: bool = False,
) -> EvaluationResult:
    """Score every reference case against the prediction of the same file name, in parallel.

    A case that cannot be scored raises :class:`CaseError`, or with ``skip_failed`` is reported on stderr
    and listed in ``result.failed`` while the others are scored. Messages go through ``tqdm.write`` so they
    never land on the progress bar's line.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    for folder, what in ((reference_dir, "reference"), (prediction_dir, "prediction")):
        if not folder.is_dir():
            raise NsnError(f"{what} folder not found: {folder}")
    names = _nifti_names(reference_dir)
    if not names:
        raise NsnError(f"no {NIFTI_SUFFIX} files in {reference_dir}")
    predicted = set(_nifti_names(prediction_dir))
    missing = [n for n in names if n not in predicted]
    unmatched = sorted(predicted - set(names))
    jobs = [
        (reference_dir / n, prediction_dir / n if n in predicted else None, tuple(specs), nsd_zero_below_dsc,
         unknown_labels_as_background, skip_failed)
        for n in names
    ]
    from tqdm import tqdm

    num_processes = max(1, min(int(num_processes), len(jobs)))
    results: list[CaseResult] = []
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress, file=sys.stderr) as bar:

        def collect(result: CaseResult) -> None:
            for note in result.warnings:
                tqdm.write(f"nsn evaluate: warning: {note}", file=sys.stderr)
            if result.error is not None:
                tqdm.write(f"nsn evaluate: case {result.name} failed, not scored: {result.error}", file=sys.stderr)
            results.append(result)
            bar.update()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # surface-distance uses old scipy namespaces
            if num_processes == 1:
                for job in jobs:
                    collect(_evaluate_case_star(job))
            else:
                import multiprocessing

                with multiprocessing.get_context().Pool(num_processes) as pool:
                    for result in pool.imap_unordered(_evaluate_case_star, jobs):
                        collect(result)
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r.name])
    failed = {r.name: r.error for r in results if r.error is not None}
    scored = [r for r in results if r.error is None]
    return EvaluationResult(tuple(specs), scored, [n for n in missing if n not in failed], unmatched, failed)


def write_csv(result: EvaluationResult, path: str | os.PathLike) -> None:
    """The official FLARE CSV: one row per case (file name), DSC columns then NSD columns."""

    def write(handle) -> None:
        writer = csv.writer(handle)
        writer.writerow(csv_columns(result.specs))
        for row in result.rows():
            writer.writerow([row[0]] + [_csv_value(v) for v in row[1:]])

    buffer = io.StringIO()
    write(buffer)
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: float) -> str:
    return "nan" if math.isnan(value) else repr(value)


def write_summary(result: EvaluationResult, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(result.summary(), indent=2))


def read_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{case: {column: value}}`` from a CSV written by :func:`write_csv` (for comparisons)."""
    with open(path, newline="") as handle:
        return {row["Name"]: {k: float(v) for k, v in row.items() if k != "Name"} for row in csv.DictReader(handle)}


def resolve_labels(labels: str, tolerance_mm: float) -> tuple[LabelSpec, ...]:
    """``flare22`` or the path of a dataset.json."""
    if labels.lower() == "flare22":
        return FLARE22_SPECS
    return label_specs_from_dataset_json(labels, tolerance_mm)


__all__ = [
    "FLARE22_SPECS",
    "LabelSpec",
    "CaseResult",
    "EvaluationResult",
    "csv_columns",
    "evaluate_case",
    "evaluate_folders",
    "label_specs_from_dataset_json",
    "label_set",
    "load_label_image",
    "read_csv",
    "resolve_labels",
    "score_structure",
    "to_label_map",
    "write_csv",
    "write_summary",
]
