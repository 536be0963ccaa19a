"""Tests for phantoms.head: segment map, side-specific calcium, landmarks, gantry tilt, bone, determinism."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from phantoms.head import SEGMENT_NAMES, make_head_case


@cache
def case(seed: int, index: int, **kw):
    return make_head_case(seed, index, "small", **kw)


def cached(seed, index, thickness=None, tilt_deg=None, calcium=None):
    return case(seed, index, thickness=thickness, tilt_deg=tilt_deg, calcium=calcium)


def local_x(c, xyz: np.ndarray) -> np.ndarray:
    """Head-local x (towards the patient's left) of patient points, undoing the head's yaw and roll."""
    head = c.truth["head"]
    return ((np.asarray(xyz) - np.asarray(head["centre_mm"])) @ np.asarray(head["rotation"]))[:, 0]


def label_points(c) -> np.ndarray:
    kji = np.argwhere(c.arrays["label"] > 0)
    return c.grid.index_to_patient(kji[:, ::-1].astype(float))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_segment_map_values_and_both_sides(index):
    c = cached(5, index, tilt_deg=0.0)
    seg = c.arrays["segments"]
    assert seg.dtype == np.uint8 and seg.shape == c.grid.shape
    values = set(np.unique(seg).tolist())
    assert values <= set(range(9))
    assert values & {1, 2, 3, 4} and values & {5, 6, 7, 8}  # right and left ICA both painted
    assert {2, 3, 4} <= values and {6, 7, 8} <= values  # petrous, cavernous, supraclinoid always scanned
    assert c.truth["segments"] == SEGMENT_NAMES and SEGMENT_NAMES["1"] == "right cervical"
    # Right-sided segments lie on the patient's right (-x in the head frame), left on the left.
    for values_side, sign in (((1, 2, 3, 4), -1), ((5, 6, 7, 8), 1)):
        kji = np.argwhere(np.isin(seg, values_side))
        xs = local_x(c, c.grid.index_to_patient(kji[:, ::-1].astype(float)))
        assert np.all(sign * xs > 5.0)


def test_segments_follow_the_centreline():
    """Boundary landmarks separate the segments: near each one both adjacent segment values occur."""
    c = cached(5, 0, thickness=1.25, tilt_deg=0.0)
    seg = c.arrays["segments"]
    for lm in c.truth["landmarks"]:
        if not lm["in_scan"]:
            continue
        side = 0 if lm["side"] == "right" else 1
        before, after = 1 + side * 4 + lm["boundary"] - 1, 1 + side * 4 + lm["boundary"]
        i, j, k = np.rint(c.grid.patient_to_index(np.array([lm["position_mm"]]))[0]).astype(int)
        box = seg[max(k - 3, 0) : k + 4, max(j - 3, 0) : j + 4, max(i - 3, 0) : i + 4]
        assert before in box and after in box, lm["name"]


def test_right_only_calcium():
    labelled = 0
    for index in (0, 1, 2):
        c = cached(11, index, thickness=1.25, calcium="right")
        lesions = c.truth["lesions"]
        assert lesions and all(les["side"] == "right" for les in lesions)
        assert not c.truth["calcium_free"]
        pts = label_points(c)
        labelled += len(pts)
        assert np.all(local_x(c, pts) < 0)  # the patient's right is -x in LPS
        # With yaw and roll within 10 degrees the right ICA stays right of the head's centre in x too.
        assert np.all(pts[:, 0] < c.truth["head"]["centre_mm"][0])
    assert labelled > 0
    left = cached(11, 1, thickness=1.25, calcium="left")
    assert left.truth["lesions"] and all(les["side"] == "left" for les in left.truth["lesions"])
    assert np.all(local_x(left, label_points(left)) > 0)


def test_no_calcium_mode():
    c = cached(11, 4, calcium="none")
    assert c.truth["calcium_free"] and c.truth["lesions"] == []
    assert not c.arrays["label"].any()


def test_calcium_facts():
    c = cached(11, 5, calcium="both")
    lesions = c.truth["lesions"]
    assert {les["side"] for les in lesions} == {"right", "left"}
    for les in lesions:
        assert les["segment"] in ("cervical", "petrous", "cavernous", "supraclinoid")
        assert les["label"] == 1 and 100 <= les["density_mg_ha_cm3"] <= 800
        assert 0.25 - 1e-6 <= les["radii_mm"][0] <= 3.0 + 1e-6
    assert c.truth["labels"] == {"1": "ICA calcium"}
    assert set(np.unique(c.arrays["label"]).tolist()) <= {0, 1}


def test_plaques_mostly_in_the_siphon():
    from phantoms.head import SEGMENT_P

    assert abs(sum(SEGMENT_P) - 1.0) < 1e-9
    assert 0.6 <= SEGMENT_P[2] + SEGMENT_P[3] <= 0.7


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_landmarks_monotonic_and_consistent(index):
    c = cached(7, index)
    lms = c.truth["landmarks"]
    assert [lm["name"] for lm in lms] == [
        f"{s}_{b}"
        for s in ("right", "left")
        for b in ("cervical_petrous", "petrous_cavernous", "cavernous_supraclinoid")
    ]
    for side in ("right", "left"):
        own = [lm for lm in lms if lm["side"] == side]
        assert [lm["boundary"] for lm in own] == [1, 2, 3]
        zs = [lm["position_mm"][2] for lm in own]
        assert zs[0] < zs[1] < zs[2]
        arcs = [lm["arc_mm"] for lm in own]
        assert arcs[0] < arcs[1] < arcs[2]
    size = np.array(c.grid.shape[::-1])
    for lm in lms:
        ijk = c.grid.patient_to_index(np.array([lm["position_mm"]]))[0]
        assert lm["slice_index"] == pytest.approx(ijk[2], abs=1e-2)
        assert lm["slice"] == round(lm["slice_index"])
        assert lm["in_scan"] == bool(np.all(ijk >= -0.5) and np.all(ijk <= size - 0.5))
        # The landmark sits on the centreline, i.e. in the lumen.
        if lm["in_scan"]:
            i, j, k = np.rint(ijk).astype(int)
            assert c.arrays["segments"][max(k - 1, 0) : k + 2, j - 1 : j + 2, i - 1 : i + 2].any()
    assert all(lm["in_scan"] for lm in lms if lm["boundary"] == 3)  # supraclinoid ICA always scanned
    assert set(c.truth["centrelines_mm"]) == {"right_ica", "left_ica"}


@pytest.mark.parametrize("index", [0, 1])
def test_tilted_case_labels_sit_on_lesions(index):
    c = cached(3, index, thickness=1.25, tilt_deg=20.0, calcium="both")
    assert c.truth["gantry_tilt_deg"] == pytest.approx(20.0)
    assert c.grid.tilt_deg == pytest.approx(20.0)
    assert {les["side"] for les in c.truth["lesions"]} == {"right", "left"}
    label = c.arrays["label"]
    checked = 0
    for les in c.truth["lesions"]:
        assert les["in_field_of_view"]
        if not les["labelled_voxels"]:
            continue
        i, j, k = np.rint(c.grid.patient_to_index(np.array([les["centre_mm"]]))[0]).astype(int)
        assert label[max(k - 1, 0) : k + 2, max(j - 1, 0) : j + 2, max(i - 1, 0) : i + 2].any(), les
        checked += 1
    assert checked > 0
    # Labels lie on the ICA lumen or its wall: next to a segment voxel.
    kji = np.argwhere(label > 0)
    seg = c.arrays["segments"]
    for k, j, i in kji:
        assert seg[max(k - 2, 0) : k + 3, max(j - 2, 0) : j + 3, max(i - 2, 0) : i + 3].any()


def test_forced_protocol():
    c = cached(4, 0, thickness=2.5, tilt_deg=0.0, calcium="none")
    assert c.truth["scanner"]["thickness_mm"] == 2.5 and c.truth["gantry_tilt_deg"] == 0.0
    assert c.grid.shape[1:] == (128, 128) and 1.6 <= c.grid.pixel_mm <= 1.8
    assert c.grid.shape[0] <= 96
    assert c.tags["BodyPartExamined"] == "HEAD"
    assert c.case_id == "head_0004_00000"
    assert 2.0 < c.truth["scanner"]["noise_sd_hu"] < 10.0


def test_petrous_bone_is_dense():
    c = cached(9, 1, thickness=1.25, tilt_deg=0.0, calcium="none")
    img = c.arrays["image"].astype(float)
    for side in ("right", "left"):
        p = np.array([c.truth["head"]["petrous_bone_mm"][side]])
        i, j, k = np.rint(c.grid.patient_to_index(p)[0]).astype(int)
        assert img[k, j - 1 : j + 2, i - 1 : i + 2].mean() > 800, side
    # Brain and CSF: the head centre region holds brain-like HU.
    centre = np.array([c.truth["head"]["centre_mm"]]) + [0, 0, 25 * c.truth["head"]["scale"]]
    i, j, k = np.rint(c.grid.patient_to_index(centre)[0]).astype(int)
    if 0 <= k < c.grid.shape[0]:
        assert -10 < img[k, j - 2 : j + 3, i - 8 : i - 3].mean() < 60


def test_same_seed_identical():
    a = make_head_case(13, 6, thickness=2.0)
    b = make_head_case(13, 6, thickness=2.0)
    assert a.arrays.keys() == b.arrays.keys() >= {"image", "label", "occupancy", "segments"}
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    assert a.truth == b.truth
    c = make_head_case(13, 7, thickness=2.0)
    assert a.arrays["image"].shape != c.arrays["image"].shape or not np.array_equal(
        a.arrays["image"], c.arrays["image"]
    )


def test_head_pose_within_limits():
    for idx in range(6):
        head = cached(13, idx, calcium="none").truth["head"]
        assert abs(head["yaw_deg"]) <= 10 and abs(head["roll_deg"]) <= 10
        assert 0.9 <= head["scale"] <= 1.1
        r = np.asarray(head["rotation"])
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_head_case(0, 0, size="huge")
    with pytest.raises(ValueError):
        make_head_case(0, 0, calcium="middle")


def test_medium_size_holds_both_icas_and_their_calcium():
    case = make_head_case(0, 3, "medium", calcium="both")
    assert case.grid.shape[1:] == (256, 256)
    assert 0.5 <= case.grid.pixel_mm <= 0.6
    assert {int(v) for v in np.unique(case.arrays["segments"]) if v} >= {2, 3, 4, 6, 7, 8}, "petrous to supraclinoid"
    assert case.arrays["label"].any()
