"""Tests for the DST bundle's segment-level mapping of ICA calcium and its CLI (scripts/map_icac_segments.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bundles.dst_ica_calcification.scripts.hemisphere import MidSagittalPlane
from bundles.dst_ica_calcification.scripts.segments import (
    LABEL_NAMES,
    boundary_thresholds,
    map_segments,
    parse_landmarks,
    side_disagreements,
)
from bundles.s2cac_coronary_calcium.scripts.scoring import score_calcium
from phantoms import head
from phantoms.writers import write_case

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "map_icac_segments.py"
sys.path.insert(0, str(ROOT / "scripts"))
import map_icac_segments  # noqa: E402


@cache
def rotated_case(yaw: float, roll: float, seed: int, index: int, calcium: str | None = None):
    class Rotated(head.HeadAnatomy):
        def __init__(self, rng):
            super().__init__(rng)
            self.yaw, self.roll, self.R = float(yaw), float(roll), head.rotation(yaw, roll)

    with mock.patch.object(head, "HeadAnatomy", Rotated):
        return head.make_head_case(seed, index, "small", calcium=calcium)


# --- landmarks ----------------------------------------------------------------------------------------------------


def lm(side: str, boundary: int, k: float | None, present=True) -> dict:
    out = {"side": side, "boundary": boundary, "present": present}
    if k is not None:
        out["slice_index"] = k
    return out


def test_truth_landmarks_parse_with_absent_cervical_boundary():
    case = rotated_case(0, 0, 31, 1, "right")
    parsed = parse_landmarks(case.truth)  # the whole truth.json works
    for item in case.truth["landmarks"]:
        got = parsed[item["side"]][item["boundary"] - 1]
        assert got == (item["slice_index"] if item["in_scan"] else None)


def test_names_slices_positions_and_probabilities_are_accepted():
    affine = np.array([[0.5, 0, 0, -60], [0, 0.5, 0, -50], [0, 0, 2.0, -40], [0, 0, 0, 1]])
    items = [
        {"name": "right_cervical_petrous", "present": 0.2, "slice_index": 3.0},  # probability < 0.5: absent
        {"name": "right_petrous_cavernous", "slice": 7},
        {"name": "right_cavernous_supraclinoid", "position_mm": [10.0, 5.0, -40.0 + 2.0 * 11.5]},
        {"side": "left", "boundary": 1, "in_scan": True, "slice_index": 2.5},
        {"side": "left", "boundary": 2, "present": 0.9, "slice_index": 6.0},
        {"side": "left", "boundary": 3, "slice_index": 12.0},
    ]
    parsed = parse_landmarks({"landmarks": items}, affine)
    assert parsed["right"] == [None, 7.0, pytest.approx(11.5)]
    assert parsed["left"] == [2.5, 6.0, 12.0]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ("not a list", "must be a list"),
        ([{"side": "middle", "boundary": 1, "slice_index": 1}], "side must be"),
        ([{"side": "left", "boundary": 4, "slice_index": 1}], "boundary must be 1, 2 or 3"),
        ([lm("left", 1, 1.0), lm("left", 1, 2.0)], "given twice"),
        ([{"side": "left", "boundary": 1, "present": "yes", "slice_index": 1}], "present must be"),
        ([{"side": "left", "boundary": 1}], "needs slice_index"),
        ([{"side": "left", "boundary": 1, "slice_index": "3"}], "must be a number"),
        ([{"side": "left", "boundary": 1, "position_mm": [1, 2]}], "three numbers"),
    ],
)
def test_malformed_landmarks_are_refused(items, message):
    with pytest.raises(ValueError, match=message):
        parse_landmarks(items, np.eye(4))


def test_absent_boundaries_are_placed_outside_the_scan():
    assert boundary_thresholds([None, 4.0, 9.0], "right") == ([-math.inf, 4.0, 9.0], [])
    assert boundary_thresholds([1.0, None, None], "left") == ([1.0, math.inf, math.inf], [])
    with pytest.raises(ValueError, match="both sides of it"):
        boundary_thresholds([1.0, None, 9.0], "right")
    with pytest.raises(ValueError, match="no right ICA boundary"):
        boundary_thresholds([None, None, None], "right")
    fixed, warnings = boundary_thresholds([5.0, 3.0, 9.0], "left")
    assert fixed == [5.0, 5.0, 9.0] and "out of order" in warnings[0]


# --- mapping on a constructed volume ---------------------------------------------------------------------------


def blob_volume():
    """A 20-slice volume with 2 x 2 pixel calcium blobs (400 HU) at known slices and sides; plane x = 0."""
    image = np.full((20, 40, 40), 30, dtype=np.int16)
    mask = np.zeros(image.shape, dtype=np.uint8)
    affine = np.array([[0.5, 0, 0, -10], [0, 0.5, 0, -10], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # x = 0 at i = 20
    blobs = {"right": [1, 5, 6, 15], "left": [2, 9, 10]}
    for side, ks in blobs.items():
        cols = slice(4, 6) if side == "right" else slice(34, 36)
        for k in ks:
            image[k, 10:12, cols] = 400
            mask[k, 10:12, cols] = 1
    return image, mask, affine


def test_axial_rule_assigns_segments_and_the_boundary_slice_goes_distal():
    image, mask, affine = blob_volume()
    landmarks = [lm("right", 1, 5.0), lm("right", 2, 6.5), lm("right", 3, 15.0)]
    landmarks += [lm("left", 1, None, False), lm("left", 2, 9.0), lm("left", 3, 10.0)]
    plane = MidSagittalPlane((0.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    m = map_segments(image, mask, affine, landmarks, plane)
    want = {1: 1, 5: 2, 6: 2, 15: 4}  # right: k 1 cervical, 5 and 6 petrous (b1 = 5 is distal), 15 supraclinoid
    want_left = {2: 6, 9: 7, 10: 8}  # left: no cervical boundary in the scan -> k 2 petrous; 9 cavernous; 10 supra
    for k, value in {**want}.items():
        assert set(np.unique(m.labels[k, 10:12, 4:6])) == {value}
    for k, value in want_left.items():
        assert set(np.unique(m.labels[k, 10:12, 34:36])) == {value}
    assert m.labels[mask == 0].max() == 0
    # Scores are the project's scorer on the label map: 4 pixels x 0.25 mm^2 x 3 mm = 3 mm^3 per blob.
    table = m.table()
    assert table["right"]["petrous"].volume_mm3 == pytest.approx(6.0)
    assert table["left"]["cervical"].volume_mm3 == 0.0
    reference = score_calcium(image, m.labels, (0.5, 0.5, 3.0), label_names=LABEL_NAMES)
    assert table["left"]["supraclinoid"].agatston == reference.per_label["left supraclinoid"].agatston
    assert table["right"]["total"].mass_mg == pytest.approx(
        sum(s.mass_mg for s in list(reference.per_label.values())[:4])
    )
    report = m.report()
    assert report["boundaries_slice_index"]["left"][0] == "below scan"
    assert "risk_category" not in report  # the Agatston risk categories are defined for the coronary total only
    json.dumps(report, allow_nan=False)


def test_a_side_with_calcium_but_no_landmarks_is_an_error_and_one_without_is_not():
    image, mask, affine = blob_volume()
    plane = MidSagittalPlane((0.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    right_only = [lm("right", b, 3.0 * b) for b in (1, 2, 3)]
    with pytest.raises(ValueError, match="no left ICA boundary"):
        map_segments(image, mask, affine, right_only, plane)
    mask[:, :, 20:] = 0  # no left calcium any more
    m = map_segments(image, mask, affine, right_only, plane)
    assert m.table()["left"]["total"].volume_mm3 == 0 and m.table()["right"]["total"].volume_mm3 > 0


def test_boundaries_far_apart_between_the_sides_are_named_in_mm_and_direction():
    up = np.diag([0.5, 0.5, 3.0, 1.0])  # slice k at z = 3k mm
    down = np.diag([0.5, 0.5, -2.0, 1.0])  # slices stacked from the top down
    positions = {"right": [None, 4.0, 9.0], "left": [2.0, 12.0, 17.0]}  # right cervical boundary absent
    found = side_disagreements(positions, up)  # petrous|cavernous and cavernous|supraclinoid: 8 slices = 24 mm
    assert found == []
    found = side_disagreements(positions, up, max_mm=20.0)
    assert len(found) == 2 and found[0].startswith("the left petrous-cavernous boundary lies 24 mm above the right")
    found = side_disagreements({"right": [1.0, 2.0, 3.0], "left": [1.0, 2.0, 16.0]}, down)
    assert found == [
        "the left cavernous-supraclinoid boundary lies 26 mm below the right one "
        "(the two sides' boundaries lie within 25 mm of each other)"
    ]


def test_implausible_landmarks_refuse_to_map_calcium_and_only_warn_without_it():
    image, mask, affine = blob_volume()  # 3 mm slices
    plane = MidSagittalPlane((0.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    # the left petrous|cavernous boundary 9 slices (27 mm) above the right one
    landmarks = [lm("right", b, k) for b, k in ((1, 3.0), (2, 6.0), (3, 16.0))]
    landmarks += [lm("left", b, k) for b, k in ((1, 3.0), (2, 15.0), (3, 16.0))]
    with pytest.raises(ValueError, match="implausible landmarks: the left petrous-cavernous boundary lies 27 mm above"):
        map_segments(image, mask, affine, landmarks, plane)
    m = map_segments(image, mask, affine, landmarks, plane, max_side_difference_mm=30.0)
    assert m.table()["left"]["total"].volume_mm3 > 0 and m.warnings == []
    m = map_segments(image, np.zeros_like(mask), affine, landmarks, plane)
    assert m.score.total.agatston == 0 and m.warnings == [
        "implausible landmarks (no calcium to map): the left petrous-cavernous boundary lies 27 mm above the right "
        "one (the two sides' boundaries lie within 25 mm of each other)"
    ]


# --- phantoms: right-only calcium under yaw and roll --------------------------------------------------------------


@pytest.mark.parametrize(("yaw", "roll", "index"), [(10, -10, 12), (-10, 10, 12), (10, 10, 1)])
def test_right_only_calcium_never_reports_left_calcium(yaw, roll, index):
    case = rotated_case(yaw, roll, 31, index, "right")
    image, affine = case.arrays["image"], case.grid.affine_lps()
    m = map_segments(image, case.arrays["label"], affine, case.truth)
    table = m.table()
    assert table["right"]["total"].volume_mm3 > 0
    assert all(s.volume_mm3 == 0 and s.agatston == 0 and s.mass_mg == 0 for s in table["left"].values())
    # A much larger right-sided mask (the right ICA lumen and wall) stays on the right too, with the same plane.
    right_ica = ndimage.binary_dilation((case.arrays["segments"] >= 1) & (case.arrays["segments"] <= 4))
    wide = map_segments(image, right_ica, affine, case.truth, m.plane)
    assert right_ica.sum() > 300
    assert wide.labels.max() <= 4 and wide.labels[right_ica].min() >= 1


# --- CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    return write_case(rotated_case(10, -10, 31, 12, "right"), tmp_path_factory.mktemp("icac"), dicom=False)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_writes_json_and_labels(case_dir, tmp_path):
    out, labels = tmp_path / "out" / "segments.json", tmp_path / "segments.nii.gz"
    proc = run_cli(case_dir / "image.nii.gz", case_dir / "label.nii.gz", case_dir / "truth.json", "--json", out,
                   "--label-out", labels)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["left", "total", "0.0", "0.0", "0.00", "0"] in rows
    report = json.loads(out.read_text())
    assert report["sides"]["left"]["total"]["volume_mm3"] == 0
    right = report["sides"]["right"]
    assert right["total"]["volume_mm3"] > 0
    assert right["total"]["volume_mm3"] == pytest.approx(sum(right[s]["volume_mm3"] for s in right if s != "total"))
    written = nib.load(str(labels))
    assert np.allclose(written.affine, nib.load(str(case_dir / "image.nii.gz")).affine)
    values = set(np.unique(np.asarray(written.dataobj)).tolist())
    assert values - {0} and values <= {0, 1, 2, 3, 4}


def test_cli_reports_a_missing_file_in_one_line_with_exit_2(case_dir, tmp_path):
    proc = run_cli(case_dir / "image.nii.gz", tmp_path / "nope.nii.gz", case_dir / "truth.json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("map_icac_segments: error: no such file")


def test_cli_errors_for_bad_inputs(case_dir, tmp_path, capsys):
    image, label, truth = case_dir / "image.nii.gz", case_dir / "label.nii.gz", case_dir / "truth.json"
    other = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(other.dataobj)[:, :, :-1], other.affine), tmp_path / "short.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(other.dataobj), other.affine * 1.1), tmp_path / "moved.nii.gz")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"landmarks": [{"side": "left", "boundary": 7, "slice_index": 3}]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    implausible = tmp_path / "implausible.json"
    landmarks = json.loads(truth.read_text())["landmarks"]
    for item in landmarks:
        if item["name"] == "left_petrous_cavernous":
            item["slice_index"] += 40  # >= 50 mm higher (small heads have slices of 1.25 mm or more)
    implausible.write_text(json.dumps({"landmarks": landmarks}))
    cases = [
        ((image, tmp_path / "short.nii.gz", truth), "differ"),
        ((image, tmp_path / "moved.nii.gz", truth), "different affines"),
        ((image, label, bad), "bad.json: landmark 0: boundary must be 1, 2 or 3"),
        ((image, label, broken), "not valid JSON"),
        ((image, label, implausible), "implausible.json: implausible landmarks: the left petrous-cavernous boundary"),
        ((image, label, tmp_path / "none.json"), "no such file"),
    ]
    for args, message in cases:
        assert map_icac_segments.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("map_icac_segments: error:") and message in err and err.count("\n") == 1
