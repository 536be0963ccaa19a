"""Calcium scoring (bundles/s2cac_coronary_calcium/scripts/scoring.py) and its CLI, on hand-computed cases.

Arrays are [k, j, i] in HU; spacing is (row_mm, col_mm, increment_mm). Expected values are worked out by hand
in the comments; floats are compared with a relative tolerance of 1e-12 (floating-point rounding only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bundles.s2cac_coronary_calcium.scripts.scoring import (
    DEFAULT_LABEL_NAMES,
    acquisition_note,
    parse_label_names,
    risk_category,
    score_calcium,
    score_nifti,
    spacing_from_affine,
)

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "score_calcium.py"


def exact(value: float):
    return pytest.approx(value, rel=1e-12, abs=1e-12)


def volume(shape=(4, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue image (40 HU) and an empty label map."""
    return np.full(shape, 40, dtype=np.int16), np.zeros(shape, dtype=np.uint8)


# --- lesion size ---------------------------------------------------------------------------------


def test_single_voxel_of_1p2_mm_counts_with_all_measures():
    img, lab = volume()
    img[1, 5, 5], lab[1, 5, 5] = 500, 2
    s = score_calcium(img, lab, (1.2, 1.2, 3.0))
    lad = s.per_label["LAD"]
    # area 1.44 mm^2 >= 1, weight 4, factor 3/3: 5.76; volume 1.44 x 3 = 4.32 mm^3; mass 500 x 4.32 / 1000
    assert lad.agatston == exact(5.76)
    assert lad.volume_mm3 == exact(4.32)
    assert lad.mass_mg == exact(2.16)
    assert (lad.lesions_2d_agatston, lad.lesions_3d) == (1, 1)
    assert s.total.agatston == exact(5.76)
    assert s.risk_category == "I"


def test_sub_1_mm2_lesions_are_dropped_from_agatston_but_not_from_volume_mass_or_3d_count():
    img, lab = volume()
    img[1, 2, 2], lab[1, 2, 2] = 500, 1  # one 0.7 x 0.7 pixel: 0.49 mm^2, dropped
    img[1, 6, 6:8], lab[1, 6, 6:8] = 500, 1  # two pixels: 0.98 mm^2, dropped
    img[2, 9, 2:5], lab[2, 9, 2:5] = 250, 1  # three pixels: 1.47 mm^2, kept with weight 2
    s = score_calcium(img, lab, (0.7, 0.7, 3.0))
    lm = s.per_label["LM"]
    assert lm.agatston == exact(3 * 0.49 * 2)
    assert lm.lesions_2d_agatston == 1
    assert lm.lesions_3d == 3
    assert lm.volume_mm3 == exact(6 * 0.49 * 3.0)
    assert lm.mass_mg == exact((500 * 3 + 250 * 3) * 0.49 * 3.0 / 1000)


def test_lesion_of_exactly_1_mm2_is_kept():
    img, lab = volume()
    img[1, 3:5, 3:5], lab[1, 3:5, 3:5] = 130, 4  # 4 pixels of 0.5 x 0.5 mm = 1.0 mm^2
    s = score_calcium(img, lab, (0.5, 0.5, 3.0))
    assert s.per_label["RCA"].agatston == exact(1.0)
    assert s.per_label["RCA"].lesions_2d_agatston == 1


# --- density weights -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hu", "weight"),
    [(129, 0), (130, 1), (199, 1), (200, 2), (299, 2), (300, 3), (399, 3), (400, 4), (1500, 4)],
)
def test_density_band_edges(hu, weight):
    img, lab = volume()
    img[1, 4, 4], lab[1, 4, 4] = hu, 3  # one 1 x 1 mm pixel: 1 mm^2
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    lcx = s.per_label["LCX"]
    assert lcx.agatston == exact(float(weight))
    assert lcx.volume_mm3 == exact(3.0 if weight else 0.0)
    assert lcx.lesions_2d_agatston == (1 if weight else 0)


def test_band_edges_with_float_hu():
    img, lab = volume()
    img = img.astype(np.float32)
    img[1, 1, 1], lab[1, 1, 1] = 129.9, 1  # below threshold
    img[1, 4, 4], lab[1, 4, 4] = 199.9, 2  # weight 1
    img[1, 7, 7], lab[1, 7, 7] = 399.5, 3  # weight 3
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert [s.per_label[n].agatston for n in ("LM", "LAD", "LCX")] == [0.0, 1.0, 3.0]


def test_weight_comes_from_the_lesion_peak_and_applies_to_its_whole_area():
    img, lab = volume()
    img[1, 4, 4:8], lab[1, 4, 4:8] = 150, 2  # 4 pixels
    img[1, 4, 6] = 420  # peak 420 -> weight 4 for all 4 pixels
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert s.per_label["LAD"].agatston == exact(16.0)
    assert s.per_label["LAD"].mass_mg == exact((150 * 3 + 420) * 3.0 / 1000)


def test_diagonal_pixels_are_one_8_connected_agatston_lesion_but_two_3d_6_connected_lesions():
    img, lab = volume()
    img[1, 4, 4], img[1, 5, 5] = 450, 150
    lab[1, 4, 4] = lab[1, 5, 5] = 1
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    lm = s.per_label["LM"]
    assert lm.lesions_2d_agatston == 1
    assert lm.lesions_3d == 2
    assert lm.agatston == exact(2 * 4.0)  # one lesion of 2 mm^2, peak 450


# --- geometry ------------------------------------------------------------------------------------


def test_anisotropic_spacing():
    img, lab = volume()
    img[1, 2:5, 2:6], lab[1, 2:5, 2:6] = 250, 1  # 3 x 4 = 12 pixels of 0.5 x 0.8 = 0.4 mm^2 -> 4.8 mm^2
    img[2, 8, 8:10], lab[2, 8, 8:10] = 450, 1  # 2 pixels: 0.8 mm^2, dropped
    s = score_calcium(img, lab, (0.5, 0.8, 2.5))
    lm = s.per_label["LM"]
    assert lm.agatston == exact(4.8 * 2 * 2.5 / 3)
    assert lm.lesions_2d_agatston == 1
    assert lm.volume_mm3 == exact(14 * 0.4 * 2.5)
    assert s.pixel_spacing_mm == (0.5, 0.8)


def test_1p5_mm_slices_scale_by_half_and_match_3_mm_when_the_lesion_spans_two_slices():
    # The same 10 mm^2, 300 HU lesion: one 3 mm slice, or two 1.5 mm slices.
    img3, lab3 = volume()
    img3[1, 2, 0:10], lab3[1, 2, 0:10] = 300, 2
    img15, lab15 = volume()
    img15[1:3, 2, 0:10], lab15[1:3, 2, 0:10] = 300, 2
    s3 = score_calcium(img3, lab3, (1.0, 1.0, 3.0))
    s15 = score_calcium(img15, lab15, (1.0, 1.0, 1.5))
    assert s3.total.agatston == exact(30.0)  # 10 x 3 x 3/3
    assert s15.total.agatston == exact(30.0)  # 2 x 10 x 3 x 1.5/3
    assert s15.total.volume_mm3 == exact(s3.total.volume_mm3)  # 30 mm^3 either way
    single = score_calcium(img3, lab3, (1.0, 1.0, 1.5))
    assert single.total.agatston == exact(15.0)


def test_overlapping_reconstruction_uses_the_increment_factor_two_thirds():
    # 3 mm slices every 2 mm: a lesion seen on 3 consecutive slices, 9 pixels of 1 x 1 mm each, 400 HU.
    img, lab = volume(shape=(5, 12, 12))
    img[1:4, 3:6, 3:6], lab[1:4, 3:6, 3:6] = 400, 4
    s = score_calcium(img, lab, (1.0, 1.0, 2.0), thickness_mm=3.0, kvp=120, kernel="B35f")
    rca = s.per_label["RCA"]
    assert rca.agatston == exact(3 * 9 * 4 * 2 / 3)  # 72, not 108 (thickness) nor 36 (one slice)
    assert rca.volume_mm3 == exact(27 * 2.0)
    assert (rca.lesions_2d_agatston, rca.lesions_3d) == (3, 1)
    assert s.slice_increment_mm == 2.0
    assert s.agatston_equivalent is False
    assert s.acquisition_note is None


# --- labels --------------------------------------------------------------------------------------


def test_lesions_touching_across_labels_stay_separate_with_each_labels_peak():
    img, lab = volume()
    img[1, 4, 2:5], lab[1, 4, 2:5] = 450, 1  # LM: 3 pixels, peak 450 -> weight 4
    img[1, 4, 5:9], lab[1, 4, 5:9] = 180, 2  # LAD, touching LM: 4 pixels, peak 180 -> weight 1 (not 4)
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert s.per_label["LM"].agatston == exact(12.0)
    assert s.per_label["LAD"].agatston == exact(4.0)
    assert s.total.agatston == exact(16.0)
    assert (s.total.lesions_2d_agatston, s.total.lesions_3d) == (2, 2)


def test_calcium_outside_labels_and_below_threshold_is_ignored():
    img, lab = volume()
    img[1, 1:4, 1:4] = 900  # bone-like, no label
    img[2, 6:8, 6:8], lab[2, 6:8, 6:8] = 120, 3  # labelled, below 130 HU
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert s.total.agatston == 0.0
    assert s.total.volume_mm3 == 0.0
    assert s.risk_category == "0"


def test_empty_label_gives_zeros_for_every_named_label_and_category_0():
    img, lab = volume()
    img[1, 3, 3] = 1000
    s = score_calcium(img, lab, (0.5, 0.5, 3.0))
    assert list(s.per_label) == ["LM", "LAD", "LCX", "RCA"]
    for ls in [*s.per_label.values(), s.total]:
        assert (ls.agatston, ls.volume_mm3, ls.mass_mg, ls.lesions_2d_agatston, ls.lesions_3d) == (0, 0, 0, 0, 0)
    assert s.risk_category == "0"
    d = s.as_dict()
    assert d["per_label"]["RCA"] == {
        "agatston": 0.0,
        "volume_mm3": 0.0,
        "mass_mg": 0.0,
        "lesions_2d_agatston": 0,
        "lesions_3d": 0,
    }
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("bad", [5, 255])
def test_label_not_in_mapping_raises(bad):
    img, lab = volume()
    lab[1, 1, 1] = bad  # no calcium needed: any unmapped label is an error
    with pytest.raises(ValueError, match=rf"label values \[{bad}\] are not in the label mapping"):
        score_calcium(img, lab, (1.0, 1.0, 3.0))


def test_custom_mapping_names_and_unmapped_gap():
    img, lab = volume()
    img[1, 1, 1], lab[1, 1, 1] = 300, 7
    s = score_calcium(img, lab, (1.0, 1.0, 3.0), label_names={7: "ICA_L", 8: "ICA_R"})
    assert list(s.per_label) == ["ICA_L", "ICA_R"]
    assert s.per_label["ICA_L"].agatston == exact(3.0)
    assert s.label_values == {"ICA_L": 7, "ICA_R": 8}
    lab[2, 2, 2] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        score_calcium(img, lab, (1.0, 1.0, 3.0), label_names={7: "ICA_L", 8: "ICA_R"})


def test_non_integer_or_negative_labels_raise():
    img, lab = volume()
    flab = lab.astype(np.float32)
    flab[1, 1, 1] = 1.5
    with pytest.raises(ValueError, match="non-integer"):
        score_calcium(img, flab, (1.0, 1.0, 3.0))
    ilab = lab.astype(np.int16)
    ilab[1, 1, 1] = -1
    with pytest.raises(ValueError, match=r"\[-1\]"):
        score_calcium(img, ilab, (1.0, 1.0, 3.0))


def test_integer_valued_float_labels_are_accepted():
    img, lab = volume()
    img[1, 1, 1], lab[1, 1, 1] = 300, 2
    s = score_calcium(img, lab.astype(np.float64), (1.0, 1.0, 3.0))
    assert s.per_label["LAD"].agatston == exact(3.0)


@pytest.mark.parametrize(
    ("shape_img", "shape_lab", "match"),
    [((4, 12, 12), (4, 12, 11), "differ"), ((12, 12), (12, 12), "3D")],
)
def test_shape_mismatch_and_non_3d_raise(shape_img, shape_lab, match):
    with pytest.raises(ValueError, match=match):
        score_calcium(np.zeros(shape_img), np.zeros(shape_lab, np.uint8), (1.0, 1.0, 3.0))


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.0, 1.0, 3.0), (1.0, float("nan"), 3.0), (1.0, 1.0, -3.0)])
def test_bad_spacing_raises(spacing):
    img, lab = volume()
    with pytest.raises(ValueError, match="spacing"):
        score_calcium(img, lab, spacing)


def test_lesions_at_the_crop_edges_do_not_wrap_to_the_next_row_or_slice():
    # Crop to the labels' bounding box is columns 0..3: (row 0, col 3) and (row 1, col 0) are 3 columns apart,
    # as are (slice 0, last row/col) and (slice 1, first row/col).
    img, lab = volume(shape=(3, 4, 4))
    for kji in [(0, 0, 3), (0, 1, 0), (0, 3, 3), (1, 0, 0)]:
        img[kji], lab[kji] = 450, 1
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert (s.per_label["LM"].lesions_2d_agatston, s.per_label["LM"].lesions_3d) == (4, 4)
    assert s.per_label["LM"].agatston == exact(16.0)


# --- mass and volume -----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 0.8])
def test_mass_and_volume_values(c):
    img, lab = volume()
    img[1, 2, 2], img[1, 2, 3], img[2, 2, 2] = 130, 200, 1000
    lab[1, 2, 2:4] = lab[2, 2, 2] = 2
    img[1, 8, 8], lab[1, 8, 8] = 129, 2  # not calcium
    s = score_calcium(img, lab, (0.5, 0.5, 2.0), mass_calibration=c)
    lad = s.per_label["LAD"]
    voxel = 0.5 * 0.5 * 2.0  # 0.5 mm^3
    assert lad.volume_mm3 == exact(3 * voxel)
    assert lad.mass_mg == exact((130 + 200 + 1000) * voxel * c / 1000)  # 0.665 mg at c = 1
    assert s.mass_calibration == c
    assert s.as_dict()["mass_calibration"] == c


def test_2d_and_3d_lesion_counts_differ_for_a_lesion_spanning_two_slices():
    img, lab = volume()
    img[1:3, 4:6, 4:6], lab[1:3, 4:6, 4:6] = 260, 3  # 2 x 2 pixels on 2 slices, 1 mm pixels
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    lcx = s.per_label["LCX"]
    assert lcx.lesions_2d_agatston == 2
    assert lcx.lesions_3d == 1
    assert lcx.agatston == exact(2 * 4 * 2.0)


# --- risk category -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "category"),
    [
        (0.0, "0"),
        (1e-9, "I"),
        (10.0, "I"),
        (10.0001, "II"),
        (100.0, "II"),
        (100.0001, "III"),
        (400.0, "III"),
        (400.01, "IV"),
        (5000.0, "IV"),
    ],
)
def test_risk_category_boundaries(total, category):
    assert risk_category(total) == category


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_risk_category_rejects_negative_and_non_finite(bad):
    with pytest.raises(ValueError):
        risk_category(bad)


def test_risk_category_uses_the_unrounded_total():
    # 0.7 x 0.7 mm pixels, 21 pixels of weight 1 at 3 mm: 10.29 -> II although it displays as "10.3"; and a
    # total of 10.0 exactly (10 pixels of 1 mm^2, weight 1) stays I.
    img, lab = volume()
    img[1, 0:3, 0:7], lab[1, 0:3, 0:7] = 150, 1
    assert score_calcium(img, lab, (0.7, 0.7, 3.0)).risk_category == "II"
    img, lab = volume()
    img[1, 0, 0:10], lab[1, 0, 0:10] = 150, 1
    s = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert s.total.agatston == 10.0
    assert s.risk_category == "I"


# --- acquisition ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thickness", "kvp", "kernel", "standard"),
    [
        (3.0, 120, "B35f", True),
        (2.5, 120, "Qr36", True),
        (3.0, 120, "STANDARD", True),
        (3.0, 120.0, None, True),
        (1.0, 120, "B35f", False),
        (3.2, 120, "B35f", False),
        (3.0, 100, "B35f", False),
        (3.0, 120, "B46f", False),
        (3.0, 120, "Br44d", False),
        (3.0, 120, "Qr44", False),
        (3.0, 120, "B50f", False),
        (3.0, 120, "SHARP", False),
        (3.0, 120, "BONE", False),
    ],
)
def test_acquisition_note(thickness, kvp, kernel, standard):
    note = acquisition_note(thickness, kvp, kernel)
    assert (note is None) == standard


def test_acquisition_note_names_every_reason_and_result_carries_it():
    note = acquisition_note(1.0, 100, "B46f")
    assert "1 mm" in note and "100 kVp" in note and "B46f" in note
    img, lab = volume()
    s = score_calcium(img, lab, (1.0, 1.0, 1.0), thickness_mm=1.0, kvp=100, kernel="B46f")
    assert s.agatston_equivalent is True
    assert s.acquisition_note == note
    assert s.as_dict()["acquisition"] == {"thickness_mm": 1.0, "kvp": 100, "kernel": "B46f"}
    plain = score_calcium(img, lab, (1.0, 1.0, 3.0))
    assert plain.agatston_equivalent is None and plain.acquisition_note is None


# --- affine --------------------------------------------------------------------------------------


def test_spacing_from_affine_returns_the_table_increment_for_a_tilted_sheared_affine():
    # Gantry tilt 20 deg: image rows tilt in the y-z plane, slice centres step 3 mm along the table (z).
    t = np.deg2rad(20.0)
    affine = np.eye(4)
    affine[:3, 0] = [-0.6, 0.0, 0.0]  # i: columns, 0.6 mm (LPS -> RAS sign flip must not matter)
    affine[:3, 1] = [0.0, -0.7 * np.cos(t), 0.7 * np.sin(t)]  # j: rows, 0.7 mm
    affine[:3, 2] = [0.0, 0.0, 3.0]  # k: table step
    row, col, inc = spacing_from_affine(affine)
    assert (row, col) == (exact(0.7), exact(0.6))
    assert inc == exact(3.0)  # not the 3 cos(20 deg) = 2.82 mm between slice planes
    assert spacing_from_affine(affine[:, [2, 1, 0, 3]], axis_order="kji") == (exact(0.7), exact(0.6), exact(3.0))
    with pytest.raises(ValueError):
        spacing_from_affine(affine, axis_order="xyz")


def test_parse_label_names():
    assert parse_label_names("1:LM, 2:LAD,3:LCX,4:RCA") == DEFAULT_LABEL_NAMES
    for bad in ["", "1-LM", "x:LM", "1:", "1:A,1:B"]:
        with pytest.raises(ValueError):
            parse_label_names(bad)


# --- vectorised implementation against a slice-by-slice reference ----------------------------------


def reference_score(img, lab, spacing, names):
    """Slow, obvious implementation: loop over labels, slices and lesions."""
    row, col, inc = spacing
    out = {}
    for value, name in names.items():
        m = (lab == value) & (img >= 130)
        agatston, n2 = 0.0, 0
        for k in range(img.shape[0]):
            comp, n = ndimage.label(m[k], structure=np.ones((3, 3)))
            for c in range(1, n + 1):
                px = comp == c
                area = px.sum() * row * col
                if area < 1.0 - 1e-9:
                    continue
                peak = img[k][px].max()
                w = 1 if peak < 200 else 2 if peak < 300 else 3 if peak < 400 else 4
                agatston += area * w * inc / 3
                n2 += 1
        n3 = ndimage.label(m)[1]
        vox = row * col * inc
        out[name] = (agatston, m.sum() * vox, img[m].astype(float).sum() * vox / 1000, n2, n3)
    return out


def test_vectorised_scorer_matches_slice_by_slice_reference_on_random_volumes():
    rng = np.random.default_rng(1234)
    names = {1: "A", 2: "B", 3: "C"}
    for _ in range(5):
        shape = (6, 40, 40)
        img = rng.normal(120, 120, shape).astype(np.float32)
        img = ndimage.uniform_filter(img, size=(1, 2, 2)) * 1.6
        # 4 x 4 pixel blocks of random labels: calcium often touches across labels at block edges
        blocks = rng.integers(0, 4, (6, 10, 10)).astype(np.uint8)
        lab = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)
        spacing = (0.45, 0.6, 2.0)
        got = score_calcium(img, lab, spacing, label_names=names)
        want = reference_score(img, lab, spacing, names)
        for name, (agatston, vol, mass, n2, n3) in want.items():
            s = got.per_label[name]
            assert s.agatston == pytest.approx(agatston, rel=1e-9)
            assert s.volume_mm3 == pytest.approx(vol, rel=1e-9)
            assert s.mass_mg == pytest.approx(mass, rel=1e-9)
            assert (s.lesions_2d_agatston, s.lesions_3d) == (n2, n3)
        assert got.total.lesions_2d_agatston > 10  # the random case really has many lesions


# --- NIfTI loading and the CLI --------------------------------------------------------------------


def write_case(folder: Path, label_shape=None) -> tuple[Path, Path]:
    """A NIfTI pair in (i, j, k) order: columns 0.5 mm, rows 0.8 mm, increment 2.5 mm."""
    img_kji, lab_kji = volume(shape=(4, 12, 10))
    img_kji[1:3, 5, 2:6], lab_kji[1:3, 5, 2:6] = 420, 2  # 4 pixels of 0.4 mm^2 on 2 slices, weight 4
    img_kji[2, 9, 8], lab_kji[2, 9, 8] = 300, 4  # one pixel, 0.4 mm^2: dropped from Agatston
    affine = np.diag([-0.5, -0.8, 2.5, 1.0])
    image = folder / "image.nii.gz"
    label = folder / "label.nii.gz"
    nib.save(nib.Nifti1Image(img_kji.transpose(2, 1, 0), affine), image)
    lab_ijk = lab_kji.transpose(2, 1, 0)
    if label_shape is not None:
        lab_ijk = np.zeros(label_shape, np.uint8)
    nib.save(nib.Nifti1Image(lab_ijk, affine), label)
    return image, label


# LAD: 2 slices x 4 pixels x 0.4 mm^2 x weight 4 x 2.5/3 = 10.666...; volume 8 x 1.0 mm^3; mass 8 x 420 / 1000.
# RCA: Agatston 0 (0.4 mm^2), volume 1.0 mm^3, mass 0.3 mg, one 3D lesion.
EXPECTED_LAD = {"agatston": 2 * 4 * 0.4 * 4 * 2.5 / 3, "volume_mm3": 8.0, "mass_mg": 3.36}


def test_score_nifti_transposes_ijk_and_reads_spacing(tmp_path):
    image, label = write_case(tmp_path)
    s = score_nifti(image, label)
    assert s.pixel_spacing_mm == (exact(0.8), exact(0.5))
    assert s.slice_increment_mm == exact(2.5)
    lad = s.per_label["LAD"]
    assert lad.agatston == exact(EXPECTED_LAD["agatston"])
    assert lad.volume_mm3 == exact(8.0)
    assert (lad.lesions_2d_agatston, lad.lesions_3d) == (2, 1)  # k is the slice axis after transposing
    assert s.per_label["RCA"].lesions_3d == 1 and s.per_label["RCA"].agatston == 0.0
    assert s.risk_category == "II"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_table_and_writes_unrounded_json(tmp_path):
    image, label = write_case(tmp_path)
    out = tmp_path / "out" / "score.json"
    proc = run_cli(str(image), str(label), "--json", str(out), "--mass-calibration", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "2D Agatston lesions" in proc.stdout and "3D lesions" in proc.stdout
    assert "risk category: II" in proc.stdout
    data = json.loads(out.read_text())
    lad = data["per_label"]["LAD"]
    assert lad["agatston"] == exact(EXPECTED_LAD["agatston"])  # 10.666..., unrounded
    assert lad["volume_mm3"] == exact(8.0)
    assert lad["mass_mg"] == exact(3.36 * 0.5)
    assert (lad["lesions_2d_agatston"], lad["lesions_3d"]) == (2, 1)
    assert data["per_label"]["RCA"] == {
        "agatston": 0.0,
        "volume_mm3": exact(1.0),
        "mass_mg": exact(0.15),
        "lesions_2d_agatston": 0,
        "lesions_3d": 1,
    }
    assert data["per_label"]["LM"]["agatston"] == 0.0
    assert data["total"]["lesions_3d"] == 2
    assert data["risk_category"] == "II"
    assert data["slice_increment_mm"] == exact(2.5)
    assert data["mass_calibration"] == 0.5


def test_cli_shape_mismatch_is_one_error_line_and_exit_2(tmp_path):
    image, label = write_case(tmp_path, label_shape=(10, 12, 3))
    out = tmp_path / "score.json"
    proc = run_cli(str(image), str(label), "--json", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("score_calcium: error: ") and "differ" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "bad_labels", "unmapped"])
def test_cli_bad_input_exits_2_without_traceback(tmp_path, case):
    image, label = write_case(tmp_path)
    args = {
        "missing": [str(tmp_path / "nope.nii.gz"), str(label)],
        "bad_labels": [str(image), str(label), "--labels", "1-LM"],
        "unmapped": [str(image), str(label), "--labels", "1:LM,2:LAD"],
    }[case]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("score_calcium: error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_bundle_package_imports_as_scripts_from_the_bundle_root():
    bundle = ROOT / "bundles" / "s2cac_coronary_calcium"
    code = "import sys; sys.path.insert(0, sys.argv[1]); from scripts.scoring import score_calcium; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, cwd=bundle)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
