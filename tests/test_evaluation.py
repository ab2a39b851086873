"""FLARE22 DSC/NSD on hand-built cases, each special rule checked against an independent computation.

The reference computation below is written from the rules in docs/flare-evaluation.md
(tolerances typed in here, spacing given, not read back); like the official FLARE script it calls
DeepMind's surface_distance directly. It never calls noisy_student_nnunet.evaluation.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import surface_distance

from noisy_student_nnunet.cli import main
from noisy_student_nnunet.errors import NsnError
from noisy_student_nnunet.evaluation import evaluate_case, evaluate_folders, write_csv

# surface-distance 0.1 calls scipy.ndimage.filters/morphology, deprecated namespaces
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ORGANS = [  # (label, CSV prefix, tolerance mm, z-range rule), from the notes
    (1, "Liver", 5, False),
    (2, "RK", 3, False),
    (3, "Spleen", 3, False),
    (4, "Pancreas", 5, False),
    (5, "Aorta", 2, True),
    (6, "IVC", 2, True),
    (7, "RAG", 2, False),
    (8, "LAG", 2, False),
    (9, "Gallbladder", 2, False),
    (10, "Esophagus", 3, True),
    (11, "Stomach", 5, False),
    (12, "Duodenum", 7, False),
    (13, "LK", 3, False),
]
COLUMNS = ["Name"] + [f"{c}_DSC" for _, c, _, _ in ORGANS] + [f"{c}_NSD" for _, c, _, _ in ORGANS]
SPACING = (2.5, 1.0, 3.0)  # anisotropic: x voxels are 2.5 mm
SHAPE = (48, 40, 36)


def reference_metrics(gt, seg, label, spacing, tolerance, z_range, inclusive_top=False, dsc_rule=True):
    """FLARE22 rules, unrounded: both empty 1; one empty 0; z-crop [min, max) of gt; NSD 0 if DSC < 0.2."""
    g, s = gt == label, seg == label
    if not g.any() and not s.any():
        return 1.0, 1.0
    if not g.any() or not s.any():
        return 0.0, 0.0
    if z_range:
        z = np.where(g)[2]
        top = z.max() + 1 if inclusive_top else z.max()
        g, s = g[:, :, z.min() : top], s[:, :, z.min() : top]
    dsc = 2.0 * np.sum(g & s) / (np.sum(g) + np.sum(s))
    if dsc_rule and dsc < 0.2:
        return dsc, 0.0
    distances = surface_distance.compute_surface_distances(g, s, spacing)
    return dsc, surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)


def save(path, data, spacing=SPACING, origin=(-10.0, 20.0, 5.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))


def box(data, label, x, y, z):
    data[x[0] : x[1], y[0] : y[1], z[0] : z[1]] = label


def rules_case():
    """A reference and a prediction that exercise every rule, one organ per rule."""
    gt, seg = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    # liver and aorta: the prediction is shifted by one x voxel = 2.5 mm, inside liver's 5 mm
    # tolerance but outside aorta's 2 mm (and inside 2 mm if the spacing were taken as 1 mm)
    box(gt, 1, (4, 16), (4, 16), (4, 12))
    box(seg, 1, (5, 17), (4, 16), (4, 12))
    box(gt, 5, (20, 24), (20, 24), (5, 20))
    box(seg, 5, (21, 25), (20, 24), (5, 20))
    # RK (2), LK (13): empty in both. Spleen (3): only predicted. Pancreas (4): only in the reference.
    box(seg, 3, (10, 14), (20, 24), (28, 32))
    box(gt, 4, (20, 24), (30, 34), (28, 32))
    # IVC: reference on z 10..19; prediction equal on z 10..18, missing z 19 (the excluded top slice)
    # and with extra voxels above the reference's range (ignored)
    box(gt, 6, (30, 34), (4, 8), (10, 20))
    box(seg, 6, (30, 34), (4, 8), (10, 19))
    box(seg, 6, (30, 34), (4, 8), (24, 29))
    # esophagus: z-range rule with a partial, shifted prediction that runs past both ends
    box(gt, 10, (36, 40), (30, 35), (6, 26))
    box(seg, 10, (36, 40), (31, 35), (2, 30))
    # gallbladder: one slab of overlap, DSC = 1/6 < 0.2 while the surfaces touch (NSD would be > 0)
    box(gt, 9, (4, 10), (28, 34), (20, 26))
    box(seg, 9, (9, 15), (28, 34), (20, 26))
    # adrenals: small, odd-sized differences giving values with more than 4 decimals
    box(gt, 7, (40, 44), (30, 36), (20, 24))
    box(seg, 7, (40, 45), (31, 36), (20, 24))
    box(gt, 8, (40, 46), (10, 16), (30, 34))
    box(seg, 8, (41, 46), (10, 17), (29, 34))
    # duodenum: shifted 2 y voxels = 2 mm, within its 7 mm tolerance
    box(gt, 12, (20, 26), (8, 12), (24, 30))
    box(seg, 12, (20, 26), (10, 14), (24, 30))
    # stomach: ellipsoids of different radii
    xx, yy, zz = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    r = ((xx - 10) / 3.2) ** 2 + ((yy - 22) / 4.3) ** 2 + ((zz - 18) / 3.1) ** 2
    gt[(r <= 1) & (gt == 0)] = 11
    seg[(r <= 1.4) & (seg == 0)] = 11
    return gt, seg


@pytest.fixture()
def folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt, seg = rules_case()
    save(gt_dir / "case_rules.nii.gz", gt)
    save(pred_dir / "case_rules.nii.gz", seg)
    missing = np.zeros(SHAPE, np.uint8)
    box(missing, 1, (4, 16), (4, 16), (4, 12))
    box(missing, 5, (20, 24), (20, 24), (5, 20))
    save(gt_dir / "case_missing.nii.gz", missing)
    save(pred_dir / "case_extra.nii.gz", missing)  # a prediction without reference
    return gt_dir, pred_dir, gt, seg, missing


def test_each_rule_matches_independent_computation(folders):
    gt_dir, pred_dir, gt, seg, _ = folders
    result = evaluate_case(gt_dir / "case_rules.nii.gz", pred_dir / "case_rules.nii.gz")
    ours = dict(zip([c for _, c, _, _ in ORGANS], zip(result.dsc, result.nsd)))
    more_decimals = 0
    for label, column, tolerance, z_range in ORGANS:
        dsc, nsd = reference_metrics(gt, seg, label, SPACING, tolerance, z_range)
        assert ours[column][0] == pytest.approx(dsc, abs=1e-4), column
        assert ours[column][1] == pytest.approx(nsd, abs=1e-4), column
        # rounded to 4 decimals, exactly
        assert ours[column] == (round(float(dsc), 4), round(float(nsd), 4)), column
        more_decimals += (round(dsc, 4) != dsc) + (round(nsd, 4) != nsd)
    assert more_decimals >= 4  # the rounding was exercised

    # both empty -> 1, one empty -> 0
    assert ours["RK"] == (1.0, 1.0) and ours["LK"] == (1.0, 1.0)
    assert ours["Spleen"] == (0.0, 0.0) and ours["Pancreas"] == (0.0, 0.0)
    # per-organ tolerance: the same 2.5 mm shift is inside liver's 5 mm, outside aorta's 2 mm
    assert ours["Liver"][1] == 1.0
    assert 0.2 < ours["Aorta"][1] < 1.0
    assert reference_metrics(gt, seg, 1, SPACING, 2, False)[1] < 1.0  # liver at aorta's tolerance
    # spacing from the header: with 1 mm voxels the shift would be inside the aorta's tolerance
    assert reference_metrics(gt, seg, 5, (1.0, 1.0, 1.0), 2, True)[1] == 1.0
    # duodenum: 2 mm shift inside 7 mm
    assert ours["Duodenum"][1] == 1.0 and ours["Duodenum"][0] == 0.5
    # DSC < 0.2 -> NSD 0, although the surfaces touch
    assert ours["Gallbladder"][0] == round(1 / 6, 4) and ours["Gallbladder"][1] == 0.0
    assert reference_metrics(gt, seg, 9, SPACING, 2, False, dsc_rule=False)[1] > 0.1
    # z-range, upper bound exclusive: the prediction differs only on the top slice and outside the range
    assert ours["IVC"] == (1.0, 1.0)
    inclusive = reference_metrics(gt, seg, 6, SPACING, 2, True, inclusive_top=True)
    assert round(inclusive[0], 4) != 1.0
    uncropped = reference_metrics(gt, seg, 6, SPACING, 2, False)
    assert round(uncropped[0], 4) != 1.0
    # esophagus: cropped value differs from the uncropped one
    assert ours["Esophagus"][0] != round(reference_metrics(gt, seg, 10, SPACING, 3, False)[0], 4)


def test_folder_csv_summary_missing_and_parallel(folders, tmp_path, capsys):
    gt_dir, pred_dir, gt, seg, missing = folders
    csv_path, summary_path = tmp_path / "out" / "results.csv", tmp_path / "summary.json"
    code = main(["evaluate", str(gt_dir), str(pred_dir), "-o", str(csv_path), "--summary", str(summary_path),
                 "-np", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "case_missing.nii.gz" in captured.err and "case_extra.nii.gz" in captured.err
    assert "Liver" in captured.out and "Overall" in captured.out

    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == COLUMNS
    assert [r[0] for r in rows[1:]] == ["case_missing.nii.gz", "case_rules.nii.gz"]
    table = {r[0]: dict(zip(COLUMNS[1:], map(float, r[1:]))) for r in rows[1:]}
    # the missing prediction counts as empty: organs in the reference score 0, absent ones 1
    for label, column, tolerance, z_range in ORGANS:
        expected = reference_metrics(missing, np.zeros_like(missing), label, SPACING, tolerance, z_range)
        assert table["case_missing.nii.gz"][f"{column}_DSC"] == expected[0]
        assert table["case_missing.nii.gz"][f"{column}_NSD"] == expected[1]
        expected = reference_metrics(gt, seg, label, SPACING, tolerance, z_range)
        assert table["case_rules.nii.gz"][f"{column}_NSD"] == pytest.approx(expected[1], abs=1e-4)
    assert table["case_missing.nii.gz"]["Liver_DSC"] == 0.0 and table["case_missing.nii.gz"]["RK_DSC"] == 1.0

    summary = json.loads(summary_path.read_text())
    assert summary["missing_predictions"] == ["case_missing.nii.gz"]
    assert summary["unmatched_predictions"] == ["case_extra.nii.gz"]
    assert summary["n_cases"] == 2
    dsc = np.array([[table[c][f"{col}_DSC"] for _, col, _, _ in ORGANS] for c in table])
    nsd = np.array([[table[c][f"{col}_NSD"] for _, col, _, _ in ORGANS] for c in table])
    assert summary["overall"]["DSC"]["mean"] == pytest.approx(dsc.mean(), abs=1e-4)
    assert summary["overall"]["NSD"]["mean"] == pytest.approx(nsd.mean(), abs=1e-4)
    assert summary["overall"]["NSD"]["std"] == pytest.approx(nsd.std(), abs=1e-4)
    assert summary["per_structure"]["Aorta"]["NSD"]["mean"] == pytest.approx(nsd[:, 4].mean(), abs=1e-4)
    assert summary["per_structure"]["Aorta"]["nsd_tolerance_mm"] == 2

    # one process gives the same CSV
    serial = evaluate_folders(gt_dir, pred_dir, num_processes=1, progress=False)
    write_csv(serial, tmp_path / "serial.csv")
    assert (tmp_path / "serial.csv").read_text() == csv_path.read_text()


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(shape=(48, 40, 35)), "shape"),
        (dict(spacing=(2.5, 1.0, 2.0)), "spacing"),
        (dict(origin=(0.0, 0.0, 0.0)), "affine"),
    ],
)
def test_geometry_mismatch_is_an_error_naming_the_case(tmp_path, capsys, change, word):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt, seg = rules_case()
    save(gt_dir / "case_ok.nii.gz", gt)
    save(pred_dir / "case_ok.nii.gz", seg)
    save(gt_dir / "case_bad.nii.gz", gt)
    shape = change.get("shape", SHAPE)
    save(pred_dir / "case_bad.nii.gz", seg[: shape[0], : shape[1], : shape[2]],
         spacing=change.get("spacing", SPACING), origin=change.get("origin", (-10.0, 20.0, 5.0)))
    with pytest.raises(NsnError, match=rf"case_bad\.nii\.gz.*{word}"):
        evaluate_folders(gt_dir, pred_dir, progress=False)
    # the command names the case, scores the others and exits 1 (docs/errors.md)
    out = tmp_path / "results.csv"
    assert main(["evaluate", str(gt_dir), str(pred_dir), "-o", str(out), "-np", "1"]) == 1
    err = capsys.readouterr().err
    assert "case case_bad.nii.gz failed" in err and word in err
    assert [row[0] for row in csv.reader(out.open())][1:] == ["case_ok.nii.gz"]
    assert not list(tmp_path.glob(".results.csv*"))


def test_single_slice_reference_is_undefined_and_reported(tmp_path, capsys):
    """The z-range [min, max) of a one-slice reference is empty: the official code divides 0 by 0."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = np.zeros(SHAPE, np.uint8)
    box(gt, 5, (20, 24), (20, 24), (7, 8))
    box(gt, 1, (4, 16), (4, 16), (4, 12))
    save(gt_dir / "thin.nii.gz", gt)
    save(pred_dir / "thin.nii.gz", gt)
    summary = tmp_path / "s.json"
    assert main(["evaluate", str(gt_dir), str(pred_dir), "--summary", str(summary), "-np", "1"]) == 0
    data = json.loads(summary.read_text())
    assert data["undefined_values"] == ["thin.nii.gz/Aorta"]
    assert data["per_structure"]["Aorta"]["DSC"]["mean"] is None
    assert data["overall"]["DSC"]["mean"] == 1.0  # the undefined value is left out, the rest is perfect
    assert "thin.nii.gz/Aorta" in capsys.readouterr().err


def test_dataset_json_labels_take_their_names_and_tolerance(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt, seg = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    box(gt, 1, (4, 16), (4, 16), (4, 12))
    box(seg, 1, (5, 17), (4, 16), (4, 12))
    box(gt, 2, (20, 24), (20, 24), (5, 20))  # "blob": not a FLARE organ, shifted 2.5 mm
    box(seg, 2, (21, 25), (20, 24), (5, 20))
    save(gt_dir / "c.nii.gz", gt)
    save(pred_dir / "c.nii.gz", seg)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "blob": 2}}))
    values = {}
    for tolerance in (1.0, 3.0):
        out = tmp_path / f"r{tolerance}.csv"
        assert main(["evaluate", str(gt_dir), str(pred_dir), "--labels", str(dataset),
                     "--tolerance", str(tolerance), "-o", str(out), "-np", "1"]) == 0
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["Name", "Liver_DSC", "blob_DSC", "Liver_NSD", "blob_NSD"]
        values[tolerance] = {k: float(v) for k, v in rows[0].items() if k != "Name"}
    assert values[3.0]["blob_NSD"] == 1.0
    expected = reference_metrics(gt, seg, 2, SPACING, 1.0, False)[1]
    assert values[1.0]["blob_NSD"] == round(float(expected), 4) and expected < 1.0
    # liver keeps FLARE's 5 mm whatever --tolerance says
    assert values[1.0]["Liver_NSD"] == values[3.0]["Liver_NSD"] == 1.0


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), str(tmp_path / "empty"), "-np", "1"]) == 2
    assert "no .nii.gz files" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope"), str(tmp_path / "empty"), "-np", "1"]) == 2
    assert "reference folder not found" in capsys.readouterr().err
    bad_json = tmp_path / "d.json"
    bad_json.write_text("{}")
    assert main(["evaluate", str(tmp_path / "empty"), str(tmp_path / "empty"), "--labels", str(bad_json)]) == 2
    assert "'labels'" in capsys.readouterr().err


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_label_maps_read_as_nibabel_reads_them(tmp_path, image_class, suffix):
    """A .nii.gz is decompressed once and parsed from memory (NIfTI-1 and -2); the result is nibabel's own read."""
    from noisy_student_nnunet.evaluation import load_label_image

    data = np.random.default_rng(3).integers(0, 14, (9, 11, 7), dtype=np.uint8)
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 30.0)
    path = tmp_path / f"case{suffix}"
    nib.save(image_class(data, affine), path)
    labels, zooms, read_affine = load_label_image(path)
    stock = nib.load(path)
    assert np.array_equal(labels, np.asanyarray(stock.dataobj)) and labels.dtype == np.uint8
    assert zooms == pytest.approx((0.8, 0.7, 2.5)) and np.allclose(read_affine, stock.affine)


@pytest.mark.parametrize("dtype,scaled", [("<i2", False), (">i2", False), ("<f4", False), ("<u1", True)])
def test_compressed_label_maps_of_any_type_read_as_nibabel_reads_them(tmp_path, dtype, scaled):
    """The array comes straight out of the decompressed bytes (one copy of the file in memory, not two): other
    types, big-endian data and a rotated affine read as nibabel reads them; scaled data goes through nibabel."""
    from noisy_student_nnunet.evaluation import _array_in_bytes, load_label_image
    from noisy_student_nnunet.io_checks import read_gzip_stream

    data = np.random.default_rng(5).integers(0, 14, (9, 11, 7)).astype(np.dtype(dtype))
    a = np.deg2rad(20)
    affine = np.array([[0.8 * np.cos(a), -0.7 * np.sin(a), 0, -10], [0.8 * np.sin(a), 0.7 * np.cos(a), 0, 4],
                       [0, 0, 2.5, 30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(np.dtype(dtype))
    if scaled:
        image.header.set_slope_inter(1.0, 1.0)  # every stored value + 1
    path = tmp_path / "case.nii.gz"
    nib.save(image, path)
    in_bytes = _array_in_bytes(read_gzip_stream(path))
    assert (in_bytes is None) == scaled
    assert in_bytes is None or not in_bytes[0].flags.owndata  # a view of the decompressed bytes, not a copy
    labels, zooms, read_affine = load_label_image(path)
    stock = nib.load(path)
    assert np.array_equal(labels, np.asanyarray(stock.dataobj).astype(np.uint8))
    assert zooms == pytest.approx(stock.header.get_zooms()) and np.allclose(read_affine, stock.affine)
