"""A forest plot of the semi-supervised experiment's paired differences: what the summary's intervals look like.

Left: every comparison of the summary, overall (13-organ mean). Right: the headline comparison (fine-tuned student
minus the primary control) per organ. Each row is the mean over seeds with its 95 % Student-t interval;
the dots are the single seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from noisy_student_nnunet.experiment_records import (ORGANS, PRIMARY_CONTROL, comparisons_of, paired_differences,
                                                     stages_of, t_interval)
from noisy_student_nnunet.outputs import atomic_file

def headline(records: Sequence[dict]) -> tuple[str, str]:
    """Fine-tuned student minus the primary control, or minus the fold-0 control in files that predate it."""
    has_primary = any(PRIMARY_CONTROL in r["stages"] for r in records)
    return "finetuned", PRIMARY_CONTROL if has_primary else "teacher_as_long"


def _rows(ax, labels: list[str], series: list[list[float]], title: str) -> None:
    for y, values in enumerate(series):
        if not values:
            continue
        mean, low, high = t_interval(values)
        ax.plot([low, high], [y, y], color="tab:blue", lw=2)
        ax.plot([mean], [y], "o", color="tab:blue", ms=6)
        ax.plot(values, [y] * len(values), ".", color="0.5", ms=4, alpha=0.7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("DSC points (paired by seed)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def plot_differences(records: Sequence[dict], path: str | Path, metric: str = "DSC") -> Path:
    """Write the forest plot of ``records`` (one setting) to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = comparisons_of(stages_of(records))
    overall = [paired_differences(records, a, b, metric) for a, b in comparisons]
    first, baseline = headline(records)
    per_organ = [paired_differences(records, first, baseline, metric, organ=organ) for organ in ORGANS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.32 * max(len(comparisons), len(ORGANS)) + 1.5)))
    labels = [f"{a} - {b}" + (f" (n={len(values)})" if len(values) < len(records) else "")
              for (a, b), values in zip(comparisons, overall)]
    _rows(left, labels, overall, "all comparisons, 13-organ mean")
    _rows(right, list(ORGANS), per_organ, f"{first} - {baseline}, per organ")
    seeds = sorted({r["seed"] for r in records})
    fig.suptitle(f"setting {records[0]['setting']}: {len(seeds)} seeds; mean and 95 % interval over seeds "
                 f"(grey: single seeds)", fontsize=11)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
