"""Per-seed result files of the semi-supervised experiment, and the paired statistics computed from them.

Why files per seed: one seed of ``benchmarks/semi_supervised_experiment.py`` takes about a quarter of an hour on
two CPU cores, so eight seeds per setting outlast a working session. Each finished seed writes one JSON file
(committed under ``docs/experiments/SETTING/seedN.json``); the summary is recomputed from whatever files exist,
and a rerun skips a seed whose file has the same fingerprint (code version, recipe, cohorts, demo arguments).

A file holds at least ``setting``, ``seed`` and ``stages: {STAGE: {ORGAN: {"DSC": x, "NSD": y}}}`` with STAGE
one of :data:`STAGES` (plus ablation stages), ORGAN a FLARE22 name of ``dataset.json`` and each value the mean
over the seed's test cases, as a fraction. ``cases`` keeps every test case's scores and cohort, so that
the per-cohort table (and anything else) can be recomputed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from noisy_student_nnunet.flare import FLARE22_ORGANS
from noisy_student_nnunet.outputs import atomic_write_text

ORGANS = tuple(organ.name for organ in FLARE22_ORGANS)
METRICS = ("DSC", "NSD")
STAGES = ("teacher", "teacher_ensemble", "student", "finetuned", "teacher_all_as_long", "teacher_as_long")
#: the control a user without unlabeled scans would train: one teacher on every labeled case (fold ``all``), as many
#: iterations as the student and its fine-tune together
PRIMARY_CONTROL = "teacher_all_as_long"
#: the paired differences the summary reports, (stage, baseline)
COMPARISONS = (("finetuned", PRIMARY_CONTROL), ("finetuned", "teacher_as_long"), ("finetuned", "teacher"),
               ("finetuned", "teacher_ensemble"), ("student", "teacher"))
#: the 13 organs less the four smallest (both adrenal glands, gallbladder, oesophagus), whose few voxels make
#: their DSC swing most from seed to seed
LARGER_ORGANS = tuple(o for o in ORGANS if o not in ("right_adrenal_gland", "left_adrenal_gland", "gallbladder",
                                                     "esophagus"))

CaseScores = dict[str, dict[str, dict[str, float | None]]]  # case -> organ -> metric -> value


def case_scores(result) -> CaseScores:
    """An :class:`~noisy_student_nnunet.evaluation.EvaluationResult` as case -> organ -> {DSC, NSD}."""
    scores: CaseScores = {}
    for case in result.cases:
        name = case.name[: -len(".nii.gz")] if case.name.endswith(".nii.gz") else case.name
        scores[name] = {spec.name: {"DSC": _finite(d), "NSD": _finite(n)}
                        for spec, d, n in zip(result.specs, case.dsc, case.nsd)}
    return scores


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def organ_means(scores: CaseScores, cases: Iterable[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Mean over ``cases`` (default: all) per organ and metric; undefined values are left out."""
    chosen = list(scores) if cases is None else [c for c in cases if c in scores]
    means: dict[str, dict[str, float | None]] = {}
    for organ in ORGANS:
        means[organ] = {}
        for metric in METRICS:
            values = [scores[c][organ][metric] for c in chosen if organ in scores[c]]
            values = [v for v in values if v is not None]
            means[organ][metric] = round(statistics.fmean(values), 6) if values else None
    return means


def overall(organs: Mapping[str, Mapping[str, float | None]], metric: str = "DSC",
            subset: Sequence[str] = ORGANS) -> float | None:
    """The mean over ``subset`` (default the 13 organs) of one stage's organ means (FLARE's score: mean over organs
    and cases)."""
    values = [organs[o][metric] for o in subset if o in organs and organs[o][metric] is not None]
    return statistics.fmean(values) if values else None


def write_record(path: Path, record: dict) -> None:
    """One seed's file, whole or not at all."""
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def load_records(folder: Path, fingerprint: str | None = None) -> list[dict]:
    """Every ``seed*.json`` in ``folder`` (with ``fingerprint`` only, when given), in seed order."""
    records = []
    for path in sorted(folder.glob("seed*.json")):
        record = json.loads(path.read_text())
        if fingerprint is None or record.get("fingerprint") == fingerprint:
            records.append(record)
    return sorted(records, key=lambda r: r["seed"])


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean (n >= 2; else the mean three times)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its two-sided Welch interval (two independent samples, unequal variances; n >= 2
    each). For two settings: their seeds draw different phantoms, so nothing pairs them."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Welch interval needs at least 2 values in each sample")
    from scipy.stats import t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return difference, difference, difference
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t.ppf(0.5 + confidence / 2, dof) * math.sqrt(va + vb)
    return difference, difference - half, difference + half


def setting_difference(shifted: Sequence[dict], iid: Sequence[dict], stage: str = "finetuned",
                       baseline: str = PRIMARY_CONTROL, metric: str = "DSC") -> str:
    """One line per setting with ``stage - baseline`` over its seeds, and the line that decides whether the cohort
    shift is what makes the difference: shift minus iid, Welch interval."""
    lines = []
    values = {}
    for name, records in (("shift", shifted), ("iid", iid)):
        values[name] = paired_differences(records, stage, baseline, metric)
        lines.append(f"{name:<6} {stage} - {baseline}: {_interval_text(values[name]).strip()} "
                     f"({len(values[name])} seeds)")
    if min(len(v) for v in values.values()) >= 2:
        mean, low, high = welch_interval(values["shift"], values["iid"])
        lines.append(f"shift - iid of that difference: {mean:+.2f} [{low:+.2f}, {high:+.2f}] (Welch, 95 %; the "
                     "settings' seeds are independent)")
    return "\n".join(lines)


def paired_differences(records: Sequence[dict], stage: str, baseline: str, metric: str = "DSC",
                       organ: str | None = None, cohort: str | None = None, subset: Sequence[str] = ORGANS,
                       test_set: str = "stages") -> list[float]:
    """Per seed, ``stage`` minus ``baseline`` in points (x100): the mean over ``subset`` (the 13 organs), or one
    organ; over the test cases of one cohort when given; ``test_set`` ``unseen`` for the unseen cohort's test cases.
    Seeds lacking either stage (or any case of the cohort) are left out."""
    differences = []
    for record in records:
        stages = record.get(test_set) if cohort is None else record.get("per_cohort", {}).get(cohort, {}).get("stages")
        if not stages or stage not in stages or baseline not in stages:
            continue
        if organ is None:
            a, b = overall(stages[stage], metric, subset), overall(stages[baseline], metric, subset)
        else:
            a, b = stages[stage][organ][metric], stages[baseline][organ][metric]
        if a is not None and b is not None:
            differences.append(100.0 * (a - b))
    return differences


def _interval_text(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:  # one seed has no interval: say so rather than print [x, x]
        return f"{values[0]:+6.2f} (n=1, no CI)"
    mean, low, high = t_interval(values)
    return f"{mean:+6.2f} [{low:+6.2f}, {high:+6.2f}]"


def stages_of(records: Sequence[dict]) -> list[str]:
    """The stages any file has: :data:`STAGES` first, then the ablations' (sorted)."""
    return [s for s in (*STAGES, *sorted({s for r in records for s in r["stages"]} - set(STAGES)))
            if any(s in r["stages"] for r in records)]


def comparisons_of(stages: Sequence[str]) -> list[tuple[str, str]]:
    """:data:`COMPARISONS` where both stages exist, then each ablation against the demo's own stage of its kind
    (``student_NAME - student``, ``finetuned_NAME - finetuned``) and each fine-tuned ablation against the teacher
    trained as long."""
    comparisons = [c for c in COMPARISONS if c[0] in stages and c[1] in stages]
    for ablation in (s for s in stages if s not in STAGES):
        kind = ablation.split("_")[0]
        comparisons += [(ablation, b) for b in (kind, PRIMARY_CONTROL, "teacher_as_long")
                        if b in stages and (b == kind or kind == "finetuned")]
    return comparisons


def markdown_table(records: Sequence[dict], metric: str = "DSC") -> str:
    """The paired differences as a Markdown table (for the README and docs, pasted from this output): overall
    mean [95 % CI] over seeds, the number of seeds and each seed's value."""
    lines = [f"| paired difference ({metric} points, 13-organ mean) | mean [95 % CI] | seeds | per seed |",
             "|---|---|---|---|"]
    for stage, baseline in comparisons_of(stages_of(records)):
        values = paired_differences(records, stage, baseline, metric)
        if values:
            cell = re.sub(r"\[\s+", "[", re.sub(r"\s+", " ", _interval_text(values).strip()))
            lines.append(f"| `{stage}` − `{baseline}` | {cell} | {len(values)} | "
                         + " ".join(f"{v:+.1f}" for v in values) + " |")
    return "\n".join(lines)


def summary_table(records: Sequence[dict], metric: str = "DSC") -> str:
    """The summary: each stage's mean, then every comparison's paired difference with its 95 % interval, overall,
    per organ and (where the files have cohorts) per cohort of the test set."""
    if not records:
        return "no result files"
    setting = records[0]["setting"]
    seeds = [r["seed"] for r in records]
    stages = stages_of(records)
    comparisons = comparisons_of(stages)
    lines = [f"setting {setting}: {len(records)} seeds ({', '.join(map(str, seeds))}); {metric} in points, mean over "
             f"the 13 organs and each seed's test cases; intervals: 95 % Student t over seeds, paired by seed", ""]
    lines.append(f"{'stage':<32}{'mean':>8}{'sd':>7}   per seed")
    for stage in stages:
        values = [100 * overall(r["stages"][stage], metric) for r in records if stage in r["stages"]]
        sd = f"{statistics.stdev(values):7.2f}" if len(values) > 1 else f"{'n/a':>7}"
        lines.append(f"{stage:<32}{statistics.fmean(values):8.2f}{sd}   " + " ".join(f"{v:.1f}" for v in values))
    if any("pseudo_labels" in r for r in records):
        values = [100 * overall(r["pseudo_labels"], metric) for r in records if "pseudo_labels" in r]
        lines.append(f"{'(pseudo-labels vs truth)':<32}{statistics.fmean(values):8.2f}")
    lines += ["", f"{'paired difference':<52}{'mean [95 % CI]':>26}   n"]
    for stage, baseline in comparisons:
        values = paired_differences(records, stage, baseline, metric)
        lines.append(f"{stage + ' - ' + baseline:<52}{_interval_text(values):>26}   {len(values)}")
    lines += ["", "per organ: paired difference, mean [95 % CI] over seeds"]
    lines += _comparison_tables("organ", {organ: "" for organ in ORGANS}, comparisons,
                                lambda organ, a, b: paired_differences(records, a, b, metric, organ=organ))
    cohorts = sorted({c for r in records for c in r.get("per_cohort", {})})
    if cohorts and cohorts != ["iid"]:
        lines += ["", "per cohort of the test set: paired difference, mean [95 % CI] over the seeds with such cases "
                      "(cases: test cases over all seeds)"]
        cases = {cohort: str(sum(r["per_cohort"][cohort]["cases"] for r in records
                                 if cohort in r.get("per_cohort", {}))) for cohort in cohorts}
        lines += _comparison_tables("cohort", cases, comparisons,
                                    lambda cohort, a, b: paired_differences(records, a, b, metric, cohort=cohort),
                                    extra="cases")
    return "\n".join(lines)


def _comparison_tables(row_title: str, rows: Mapping[str, str], comparisons: Sequence[tuple[str, str]],
                       differences, extra: str = "", per_table: int = 4) -> list[str]:
    """Rows x comparisons, at most ``per_table`` comparisons side by side (a line stays readable), each headed by
    its stage over ``- baseline``; ``rows``: row name -> the ``extra`` column's text."""
    lines: list[str] = []
    for start in range(0, len(comparisons), per_table):
        chunk = comparisons[start:start + per_table]
        cell = max(26, *(2 + max(len(a), len(b) + 2) for a, b in chunk))
        lead = f"{'':<24}{'':>6}" if extra else f"{'':<24}"
        lines.append(lead + "".join(f"{a:>{cell}}" for a, _ in chunk))
        lead = f"{row_title:<24}{extra:>6}" if extra else f"{row_title:<24}"
        lines.append(lead + "".join(f"{'- ' + b:>{cell}}" for _, b in chunk))
        for row, extra_text in rows.items():
            lead = f"{row:<24}{extra_text:>6}" if extra else f"{row:<24}"
            lines.append(lead + "".join(f"{_interval_text(differences(row, a, b)):>{cell}}" for a, b in chunk))
        lines.append("")
    return lines[:-1]


def per_cohort(scores_by_stage: Mapping[str, CaseScores], case_cohorts: Mapping[str, str]) -> dict:
    """cohort -> {cases, stages: {stage: organ means over that cohort's test cases}}."""
    table = {}
    for cohort in sorted(set(case_cohorts.values())):
        cases = [c for c, k in case_cohorts.items() if k == cohort]
        table[cohort] = {"cases": len(cases),
                         "stages": {stage: organ_means(scores, cases) for stage, scores in scores_by_stage.items()}}
    return table


def paired_by_seed(shifted: Sequence[dict], iid: Sequence[dict], stage: str, baseline: str,
                   metric: str = "DSC") -> list[float]:
    """Per seed present in both settings: (shift's ``stage - baseline``) minus (iid's), in points. The settings share
    each seed's anatomy, so the seed pairs them."""
    by_seed = {r["seed"]: r for r in iid}
    values = []
    for record in shifted:
        other = by_seed.get(record["seed"])
        if other is None:
            continue
        a, b = paired_differences([record], stage, baseline, metric), paired_differences([other], stage, baseline,
                                                                                          metric)
        if a and b:
            values.append(a[0] - b[0])
    return values


def endpoints(shifted: Sequence[dict], iid: Sequence[dict]) -> str:
    """The fair test's endpoints as fixed before its evaluation seeds ran: the primary (fine-tuned student minus
    :data:`PRIMARY_CONTROL`, 13-organ mean DSC, shift) and the secondary ones (iid; shift minus iid paired by seed;
    the 9 larger organs; NSD; the unseen cohort; student minus teacher fold 0). Per organ and per cohort: the
    summary tables."""
    rows = [("PRIMARY  shift  finetuned - teacher_all_as_long, DSC, 13 organs",
             paired_differences(shifted, "finetuned", PRIMARY_CONTROL))]
    for name, records in (("shift", shifted), ("iid", iid)):
        if name == "iid":
            rows.append(("iid    finetuned - teacher_all_as_long, DSC, 13 organs",
                         paired_differences(records, "finetuned", PRIMARY_CONTROL)))
        rows += [(f"{name:<6} finetuned - teacher_all_as_long, DSC, 9 larger organs",
                  paired_differences(records, "finetuned", PRIMARY_CONTROL, subset=LARGER_ORGANS)),
                 (f"{name:<6} finetuned - teacher_all_as_long, NSD, 13 organs",
                  paired_differences(records, "finetuned", PRIMARY_CONTROL, metric="NSD")),
                 (f"{name:<6} finetuned - teacher_all_as_long, DSC, unseen cohort",
                  paired_differences(records, "finetuned", PRIMARY_CONTROL, test_set="unseen")),
                 (f"{name:<6} student - teacher (fold 0), DSC, 13 organs",
                  paired_differences(records, "student", "teacher"))]
    rows.append(("shift - iid of finetuned - teacher_all_as_long, paired by seed",
                 paired_by_seed(shifted, iid, "finetuned", PRIMARY_CONTROL)))
    lines = [f"{'endpoint (points; 95 % Student t over seeds)':<68}{'mean [95 % CI]':>26}   n"]
    lines += [f"{title:<68}{_interval_text(values):>26}   {len(values)}" for title, values in rows]
    return "\n".join(lines)
