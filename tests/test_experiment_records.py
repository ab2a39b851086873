"""The semi-supervised experiment's per-seed files and paired statistics, on records made by hand."""

from __future__ import annotations

import json
import statistics

import pytest
from scipy import stats

from noisy_student_nnunet.experiment_records import (ORGANS, load_records, markdown_table, organ_means,
                                                     paired_differences, per_cohort, setting_difference,
                                                     summary_table, t_interval, welch_interval, write_record)


def stage(dsc: float, liver: float | None = None) -> dict:
    organs = {organ: {"DSC": dsc, "NSD": dsc} for organ in ORGANS}
    if liver is not None:
        organs["liver"] = {"DSC": liver, "NSD": liver}
    return organs


def record(seed: int, teacher: float, finetuned: float, fingerprint: str = "f") -> dict:
    return {"setting": "shift", "seed": seed, "fingerprint": fingerprint,
            "stages": {"teacher": stage(teacher), "finetuned": stage(finetuned, liver=finetuned + 0.1)},
            "per_cohort": {"kidney_native": {"cases": 2, "stages": {"teacher": stage(teacher),
                                                                   "finetuned": stage(finetuned + 0.05)}}}}


def test_t_interval_is_students_and_paired_differences_are_per_seed_in_points():
    records = [record(0, 0.60, 0.63), record(1, 0.50, 0.51), record(2, 0.70, 0.75)]
    overall = paired_differences(records, "finetuned", "teacher")
    # 12 organs at the stage value and the liver 10 points above it
    expected = [100 * (f + 0.1 / 13 - t) for t, f in ((0.60, 0.63), (0.50, 0.51), (0.70, 0.75))]
    assert overall == pytest.approx(expected)
    assert paired_differences(records, "finetuned", "teacher", organ="liver") == pytest.approx([13, 11, 15])
    assert paired_differences(records, "finetuned", "teacher", cohort="kidney_native") == pytest.approx([8, 6, 10])
    assert paired_differences(records, "finetuned", "teacher", cohort="spleen_lowdose") == []
    mean, low, high = t_interval([8.0, 6.0, 10.0])
    half = stats.t.ppf(0.975, 2) * statistics.stdev([8, 6, 10]) / 3 ** 0.5
    assert (mean, low, high) == pytest.approx((8.0, 8.0 - half, 8.0 + half))
    assert t_interval([3.0]) == (3.0, 3.0, 3.0)


def test_files_round_trip_and_the_summary_names_every_comparison_and_cohort(tmp_path):
    for r in (record(1, 0.5, 0.6), record(0, 0.6, 0.7), record(2, 0.6, 0.6, fingerprint="old")):
        write_record(tmp_path / f"seed{r['seed']}.json", r)
    assert [r["seed"] for r in load_records(tmp_path)] == [0, 1, 2]
    assert [r["seed"] for r in load_records(tmp_path, fingerprint="f")] == [0, 1]
    assert json.loads((tmp_path / "seed0.json").read_text())["stages"]["teacher"]["liver"]["DSC"] == 0.6
    text = summary_table(load_records(tmp_path, fingerprint="f"))
    assert "finetuned - teacher" in text and "kidney_native" in text and "2 seeds (0, 1)" in text
    liver = next(line for line in text.splitlines() if line.startswith("liver "))
    assert liver.split()[1:] == ["+20.00", "[+20.00,", "+20.00]"], liver  # both seeds: fine-tuned 0.2 above
    assert max(len(line) for line in text.splitlines()[2:]) <= 140  # tables of at most 4 comparisons
    from noisy_student_nnunet.experiment_plot import plot_differences

    png = plot_differences(load_records(tmp_path, fingerprint="f"), tmp_path / "summary.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*partial*"))
    markdown = markdown_table(load_records(tmp_path, fingerprint="f"))
    # 0.1 + 0.1/13 each
    assert markdown.splitlines()[2] == "| `finetuned` − `teacher` | +10.77 [+10.77, +10.77] | 2 | +10.8 +10.8 |"


def test_organ_means_leave_out_undefined_values_and_group_by_cohort():
    scores = {"a": {o: {"DSC": 1.0, "NSD": 0.5} for o in ORGANS}, "b": {o: {"DSC": 0.0, "NSD": None} for o in ORGANS}}
    means = organ_means(scores)
    assert means["liver"] == {"DSC": 0.5, "NSD": 0.5}
    grouped = per_cohort({"teacher": scores}, {"a": "x", "b": "y"})
    assert grouped["x"]["cases"] == 1 and grouped["y"]["stages"]["teacher"]["liver"]["DSC"] == 0.0


def test_welch_interval_is_scipys_and_settings_are_compared_unpaired():
    a, b = [2.0, 3.5, 1.0, 2.5], [0.5, 1.0, -1.0, 2.0, 0.0]
    mean, low, high = welch_interval(a, b)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(0.95)
    assert (mean, low, high) == pytest.approx((statistics.fmean(a) - statistics.fmean(b), ci.low, ci.high))
    with pytest.raises(ValueError):
        welch_interval([1.0], b)
    shifted = [record(s, 0.60, 0.63 + 0.01 * s) for s in range(3)]
    iid = [record(s, 0.60, 0.60 + 0.01 * s) for s in range(3)]
    text = setting_difference(shifted, iid, baseline="teacher")
    assert text.splitlines()[0].startswith("shift  finetuned - teacher:") and "(3 seeds)" in text
    # unpaired: the two settings' spreads add up, although every shifted seed is exactly 3 points above its iid seed
    mean, low, high = welch_interval(paired_differences(shifted, "finetuned", "teacher"),
                                     paired_differences(iid, "finetuned", "teacher"))
    assert mean == pytest.approx(3.0) and low < 3.0 < high
    assert f"shift - iid of that difference: {mean:+.2f} [{low:+.2f}, {high:+.2f}]" in text
    assert "shift - iid" not in setting_difference(shifted[:1], iid, baseline="teacher")


def test_endpoints_pair_settings_by_seed_and_take_the_larger_organs_apart():
    from noisy_student_nnunet.experiment_records import LARGER_ORGANS, PRIMARY_CONTROL, endpoints, paired_by_seed

    def arm(seed: int, control: float, finetuned: float, setting: str) -> dict:
        organs = stage(finetuned)
        organs["esophagus"] = {"DSC": finetuned + 0.13, "NSD": finetuned}  # the small organ carries 1 point
        return {"setting": setting, "seed": seed, "stages": {PRIMARY_CONTROL: stage(control), "finetuned": organs,
                                                             "teacher": stage(control), "student": stage(control)},
                "unseen": {PRIMARY_CONTROL: stage(control), "finetuned": stage(control + 0.02)}}

    shifted = [arm(1000, 0.60, 0.62, "shift"), arm(1001, 0.50, 0.53, "shift"), arm(1002, 0.5, 0.5, "shift")]
    iid = [arm(1000, 0.60, 0.61, "iid"), arm(1001, 0.50, 0.50, "iid")]
    assert len(LARGER_ORGANS) == 9 and "esophagus" not in LARGER_ORGANS
    assert paired_differences(shifted, "finetuned", PRIMARY_CONTROL) == pytest.approx([3, 4, 1])
    assert paired_differences(shifted, "finetuned", PRIMARY_CONTROL, subset=LARGER_ORGANS) == pytest.approx([2, 3, 0])
    assert paired_differences(shifted, "finetuned", PRIMARY_CONTROL, test_set="unseen") == pytest.approx([2, 2, 2])
    # seed 1002 has no iid partner: left out, not paired with another seed
    assert paired_by_seed(shifted, iid, "finetuned", PRIMARY_CONTROL) == pytest.approx([1, 3])
    text = endpoints(shifted, iid)
    primary = next(line for line in text.splitlines() if line.startswith("PRIMARY"))
    mean, low, high = t_interval([3.0, 4.0, 1.0])
    assert primary.replace("[ ", "[").split()[-4:] == [f"{mean:+.2f}", f"[{low:+.2f},", f"{high:+.2f}]", "3"]
    assert "paired by seed" in text and "unseen" in text and "9 larger organs" in text
