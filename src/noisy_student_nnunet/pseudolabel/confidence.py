"""How much to trust a pseudo-label: per-case confidence, fold agreement, organ volumes; filtering.

All statistics are computed in the preprocessed grid (where the ensemble predicts), so volumes use the
configuration's spacing. The paper trains on every pseudo-label; filtering (dropping the least
confident cases, or marking low-confidence voxels with nnU-Net's ignore label) is beyond the paper
and off by default.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Iterable, Mapping

import numpy as np

#: the max-probability threshold of the "fraction of low-confidence voxels" column, unless --ignore-below is set
DEFAULT_LOW_THRESHOLD = 0.5


def _confusion(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    pairs = a.astype(np.int64).ravel() * num_classes + b.astype(np.int64).ravel()
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_foreground_dice(confusion: np.ndarray) -> float:
    """Mean Dice over foreground labels present in either map (NaN if neither has any foreground)."""
    scores = []
    for label in range(1, confusion.shape[0]):
        intersection = confusion[label, label]
        total = confusion[label, :].sum() + confusion[:, label].sum()
        if total > 0:
            scores.append(2.0 * intersection / total)
    return float(np.mean(scores)) if scores else math.nan


def fold_agreement(fold_labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(fraction of voxels where all folds agree, among voxels any fold calls foreground;
    mean over fold pairs of the mean foreground Dice). NaN where undefined (no foreground, one fold)."""
    any_foreground = np.zeros(fold_labels.shape[1:], dtype=bool)
    all_agree = np.ones(fold_labels.shape[1:], dtype=bool)
    for labels in fold_labels:
        any_foreground |= labels > 0
        all_agree &= labels == fold_labels[0]
    n_foreground = int(any_foreground.sum())
    agreement = float((all_agree & any_foreground).sum() / n_foreground) if n_foreground else math.nan
    dices = [mean_foreground_dice(_confusion(a, b, num_classes)) for a, b in combinations(fold_labels, 2)]
    dices = [d for d in dices if not math.isnan(d)]
    return agreement, (float(np.mean(dices)) if dices else math.nan)


def case_statistics(labels: np.ndarray, max_prob: np.ndarray, fold_labels: np.ndarray,
                    label_names: Mapping[int, str], voxel_volume_ml: float,
                    low_threshold: float = DEFAULT_LOW_THRESHOLD) -> dict[str, float]:
    """The per-case CSV row (without the case id).

    ``confidence``: mean max-probability over voxels the ensemble calls foreground (NaN if none: such a
    case ranks lowest when filtering); ``mean_max_prob``: the same over all voxels of the (cropped)
    preprocessed grid; ``frac_low_confidence``: fraction of those voxels with max-probability below
    ``low_threshold``; ``fold_agreement``/``fold_dice``: see :func:`fold_agreement`;
    ``volume_ml_<name>``: predicted volume per foreground label.
    """
    num_classes = max(label_names) + 1 if label_names else int(labels.max()) + 1
    foreground = labels > 0
    n_foreground = int(foreground.sum())
    agreement, dice = fold_agreement(fold_labels, num_classes)
    row: dict[str, float] = {
        "confidence": float(max_prob[foreground].mean(dtype=np.float64)) if n_foreground else math.nan,
        "mean_max_prob": float(max_prob.mean(dtype=np.float64)),
        "frac_low_confidence": float((max_prob < low_threshold).mean(dtype=np.float64)),
        "fold_agreement": agreement,
        "fold_dice": dice,
    }
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    for label, name in sorted(label_names.items()):
        if label > 0:
            row[f"volume_ml_{name}"] = float(counts[label] * voxel_volume_ml)
    return row


def apply_ignore_label(labels: np.ndarray, max_prob: np.ndarray, threshold: float, ignore_label: int) -> np.ndarray:
    """Labels with voxels below ``threshold`` confidence set to ``ignore_label`` (nnU-Net skips them in the loss)."""
    out = labels.copy()
    out[max_prob < threshold] = ignore_label
    return out


def select_cases(confidence: Mapping[str, float], keep_top: float | None = None,
                 min_confidence: float | None = None) -> list[str]:
    """The case ids to keep, sorted. NaN confidence ranks lowest; ties broken by case id.

    ``keep_top`` keeps ``ceil(fraction * n)`` most confident cases; ``min_confidence`` keeps cases with
    confidence >= the value. Neither: every case (the paper's setting).
    """
    if keep_top is not None and min_confidence is not None:
        raise ValueError("keep_top and min_confidence are exclusive")
    cases = sorted(confidence)
    if keep_top is not None:
        def key(case: str) -> tuple[float, str]:
            value = confidence[case]
            return (-value if not math.isnan(value) else math.inf, case)

        ranked = sorted(cases, key=key)
        return sorted(ranked[:math.ceil(keep_top * len(ranked))])
    if min_confidence is not None:
        return [c for c in cases if not math.isnan(confidence[c]) and confidence[c] >= min_confidence]
    return cases


def label_names_from_dataset_json(dataset_json: Mapping) -> dict[int, str]:
    """{label value: name} of plain (non-region) labels, the ignore label left out."""
    names: dict[int, str] = {}
    for name, value in dataset_json["labels"].items():
        if name == "ignore":
            continue
        if not isinstance(value, int):
            raise ValueError(f"label '{name}' is a region; region-based datasets are not supported")
        names[value] = name
    return names


def csv_columns(label_names: Mapping[int, str], extra: Iterable[str] = ()) -> list[str]:
    """Column order of the confidence CSV."""
    columns = ["case", "confidence", "mean_max_prob", "frac_low_confidence", "fold_agreement", "fold_dice"]
    columns += [f"volume_ml_{name}" for label, name in sorted(label_names.items()) if label > 0]
    return columns + list(extra)
