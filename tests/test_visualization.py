"""Slice pictures: orientation-independent, the slice with the most organs, a PNG with one column per model."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from noisy_student_nnunet.phantoms import make_phantom
from noisy_student_nnunet.visualization import ORGAN_COLOURS, choose_slices, overlay, plot_segmentation_slices, read_lps

FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # feet-first slice order, as some scanners store it


def _phantom(tmp_path, direction=None, name="case"):
    phantom = make_phantom(3, (16, 48, 48), (2.5, 1.0, 1.0), direction=direction)
    image, label = tmp_path / f"{name}_0000.nii.gz", tmp_path / f"{name}.nii.gz"
    phantom.write(image, label)
    return image, label


def test_scanner_orientation_does_not_change_what_is_shown(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, standard = _phantom(tmp_path / "a")
    _, flipped = _phantom(tmp_path / "b", direction=FLIPPED_Z)
    stored_a = sitk.GetArrayFromImage(sitk.ReadImage(str(standard)))
    stored_b = sitk.GetArrayFromImage(sitk.ReadImage(str(flipped)))
    assert not np.array_equal(stored_a, stored_b)  # the files differ ...
    np.testing.assert_array_equal(read_lps(standard).array, read_lps(flipped).array)  # ... the pictures do not


def test_chosen_slices_show_the_most_organs():
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[1, 2:4, 2:4] = 1  # one organ, many voxels
    reference[1, 5:7, 5:7] = 1
    reference[4, 7, 0], reference[4, 7, 7] = 2, 3  # two organs, two voxels: win both choices
    assert choose_slices(reference) == (4, 7)
    reference[4, 7, 7] = 0  # now one organ everywhere: the most labelled voxels win
    assert choose_slices(reference)[0] == 1


def test_overlay_colours_labels_and_keeps_the_ct_elsewhere():
    ct = np.full((4, 4), 40.0)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    rgb = overlay(ct, labels, alpha=1.0)
    np.testing.assert_allclose(rgb[0, 0], np.asarray(ORGAN_COLOURS[1]) / 255)
    assert np.allclose(rgb[1, 1], rgb[1, 1, 0]) and 0 < rgb[1, 1, 0] < 1  # grey, inside the window


def test_plot_writes_a_png_with_a_column_per_label_map(tmp_path):
    image, label = _phantom(tmp_path)
    out = plot_segmentation_slices(image, label, {"model a": label, "model b": label}, tmp_path / "s.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".s.png.partial*"))
    from matplotlib.image import imread

    height, width = imread(out).shape[:2]
    assert width > 1.2 * height  # three columns side by side, two rows


def test_plot_refuses_a_label_map_of_another_shape(tmp_path):
    image, label = _phantom(tmp_path)
    other = make_phantom(4, (12, 40, 40), (2.5, 1.0, 1.0))
    other.write(tmp_path / "o_0000.nii.gz", tmp_path / "o.nii.gz")
    with pytest.raises(ValueError, match="model"):
        plot_segmentation_slices(image, label, {"model": tmp_path / "o.nii.gz"}, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
