"""Pipeline pieces that the end-to-end tests reach only indirectly: the region of interest and the way back from
an untilted grid to the source series' tilted grid."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from deploy_app import quality
from deploy_app.pipeline import PathResult, _to_source_grid, check, locate_landmarks, score_ica, segment_calcium
from deploy_app.volume import build_volume, superior_up, untilt
from phantoms.chest import make_chest_case
from phantoms.dicom_series import write_ct_series
from phantoms.head import make_head_case

LIMITS = quality.load_limits()


def volume_of(case, tmp_path):
    files = write_ct_series(
        case.arrays["image"].astype(np.int16), case.grid, tmp_path / "s", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
        series_number=1,
    )  # fmt: skip
    return build_volume([pydicom.dcmread(f) for f in files])


def test_labels_found_on_the_untilted_grid_come_back_onto_the_tilted_source_slices(tmp_path):
    case = make_head_case(0, 6, "small", calcium="right", tilt_deg=20.0)
    source = volume_of(case, tmp_path)
    scored = untilt(source)
    truth = (case.arrays["label"] > 0).astype(np.uint8)
    assert truth.sum() > 0
    # the truth carried to the untilted grid by a plain full-grid nearest-neighbour lookup (the reference)
    k, j, i = np.meshgrid(*(np.arange(n) for n in scored.hu.shape), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    coords = (np.linalg.inv(source.affine_lps) @ scored.affine_lps @ ijk1)[[2, 1, 0]]
    on_scored = ndimage.map_coordinates(truth, coords, order=0).reshape(scored.hu.shape).astype(np.uint8)
    back = _to_source_grid(on_scored, scored, source)
    assert back.shape == truth.shape
    overlap = (back & truth).sum() / truth.sum()
    assert overlap >= 0.9 and (back & ~truth.astype(bool)).sum() <= 0.1 * truth.sum()


def _stored_bottom_up(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The same anatomy with each image's rows stored bottom-up: orientation 1\\0\\0\\0\\-1\\0, whose slice
    normal (row x column cosine) points to the feet, so the volume comes out superior end first."""
    out = []
    for ds in datasets:
        ds = ds.copy()
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[1] += (int(ds.Rows) - 1) * float(ds.PixelSpacing[0])
        ds.ImagePositionPatient, ds.ImageOrientationPatient = ipp, [1, 0, 0, 0, -1, 0]
        out.append(ds)
    return out


def test_a_series_whose_normal_points_to_the_feet_is_checked_feet_to_head_and_its_labels_go_back(tmp_path):
    case = make_head_case(0, 1, "small")
    files = write_ct_series(case.arrays["image"].astype(np.int16), case.grid, tmp_path / "s", study_uid="1.2.3.4",
                            series_uid="1.2.3.4.5", series_number=1)  # fmt: skip
    datasets = [pydicom.dcmread(f) for f in files]
    usual, bottom_up = build_volume(datasets), build_volume(_stored_bottom_up(datasets))
    assert usual.affine_lps[2, 2] > 0 > bottom_up.affine_lps[2, 2]  # k = 0 is the top slice of the second
    up = superior_up(bottom_up)
    assert superior_up(usual) is usual
    np.testing.assert_array_equal(up.hu, usual.hu[:, ::-1, :])  # same voxels, rows still stored bottom-up
    for kji in ([0, 0, 0], [3, 10, 20], [usual.hu.shape[0] - 1, 5, 7]):
        k, j, i = kji
        at = (up.affine_lps @ [i, usual.hu.shape[1] - 1 - j, k, 1])[:3]
        np.testing.assert_allclose(at, (usual.affine_lps @ [i, j, k, 1])[:3], atol=1e-4)

    findings = {}
    for name, vol in (("usual", usual), ("bottom up", bottom_up)):
        result = PathResult(path="ica", choice=None, volume=vol)
        assert check(result, LIMITS), result.not_scored_reason
        assert result.scored_volume.affine_lps[2, 2] > 0
        findings[name] = [(f.check, f.passed, f.detail) for f in result.findings if f.check != "acquisition"]
    assert findings["bottom up"] == findings["usual"]  # coverage below / above the petrous bone not swapped

    labels = np.zeros(up.hu.shape, dtype=np.uint8)
    labels[2, 30, 40] = 5
    back = _to_source_grid(labels, up, bottom_up)
    assert np.argwhere(back).tolist() == [[bottom_up.hu.shape[0] - 1 - 2, 30, 40]] and back.max() == 5


@pytest.mark.parametrize("index", [0, 1, 4])
def test_heart_box_holds_every_coronary_lesion(index):
    case = make_chest_case(0, index, "medium")
    spacing = (case.grid.increment_mm, case.grid.pixel_mm, case.grid.pixel_mm)
    box = quality.heart_box(case.arrays["image"], spacing, LIMITS)
    assert box is not None
    labelled = np.argwhere(case.arrays["label"] > 0)
    for axis, s in enumerate(box):
        assert (labelled[:, axis] >= s.start).all() and (labelled[:, axis] < s.stop).all()


def _in_scan_centreline_kji(case) -> np.ndarray:
    """The ICA centreline points (both sides) inside the scan, as fractional [k, j, i] indices."""
    points = np.concatenate([np.asarray(p) for p in case.truth["centrelines_mm"].values()])
    ijk = case.grid.patient_to_index(points)
    inside = (ijk[:, 2] >= 0) & (ijk[:, 2] <= case.grid.shape[0] - 1)
    return ijk[inside][:, ::-1]


@pytest.mark.parametrize("index", [1, 2, 6])
def test_skull_base_box_holds_every_ica_lesion_and_the_ica_course(index):
    case = make_head_case(0, index, "medium", calcium="both", tilt_deg=0.0)
    spacing = (case.grid.increment_mm, case.grid.pixel_mm, case.grid.pixel_mm)
    box = quality.skull_base_box(case.arrays["image"], spacing, LIMITS)
    assert box is not None
    labelled = np.argwhere(case.arrays["label"] > 0)
    assert len(labelled)
    for axis, s in enumerate(box):
        assert (labelled[:, axis] >= s.start).all() and (labelled[:, axis] < s.stop).all()
    # the whole in-scan ICA course, with room for the vessel wall around it (5 mm in-plane)
    course = _in_scan_centreline_kji(case)
    assert len(course) > 10
    clearance = 5.0 / case.grid.pixel_mm
    for axis in (1, 2):
        assert (course[:, axis] >= box[axis].start + clearance).all()
        assert (course[:, axis] <= box[axis].stop - 1 - clearance).all()
    # tighter than the field of view in-plane: that is what the box is for
    assert (box[1].stop - box[1].start) * (box[2].stop - box[2].start) < 0.6 * case.grid.shape[1] * case.grid.shape[2]
    # the DST reads the box's slices: every boundary landmark inside the scan lies among them
    inside = [lm["slice_index"] for lm in case.truth["landmarks"] if lm["in_scan"]]
    assert box[0].start == 0 and max(inside) <= box[0].stop - 1


def test_skull_base_box_puts_its_anterior_margin_in_front_when_the_rows_run_front_to_back():
    case = make_head_case(0, 2, "medium", calcium="both", tilt_deg=0.0)
    spacing = (case.grid.increment_mm, case.grid.pixel_mm, case.grid.pixel_mm)
    image, rows = case.arrays["image"], case.grid.shape[1]
    course = _in_scan_centreline_kji(case)
    flipped_course_j = rows - 1 - course[:, 1]

    def holds(box, j) -> bool:
        return bool(((j >= box[1].start) & (j <= box[1].stop - 1)).all())

    usual = quality.skull_base_box(image, spacing, LIMITS, j_posterior=1.0)
    flipped = quality.skull_base_box(image[:, ::-1], spacing, LIMITS, j_posterior=-1.0)
    block = round(LIMITS["working_pixel_mm"] / case.grid.pixel_mm)  # the flip shifts the analysis grid's blocks
    assert abs(flipped[1].start - (rows - usual[1].stop)) <= block
    assert abs(flipped[1].stop - (rows - usual[1].start)) <= block
    assert flipped[0] == usual[0] and flipped[2] == usual[2]
    assert holds(usual, course[:, 1]) and holds(flipped, flipped_course_j)
    # told the wrong way round, the box cuts off the siphon in front of the petrous bones
    wrong = quality.skull_base_box(image[:, ::-1], spacing, LIMITS, j_posterior=1.0)
    assert not holds(wrong, flipped_course_j)
    # an oblique row axis gets the anterior margin on both sides
    oblique = quality.skull_base_box(image, spacing, LIMITS, j_posterior=0.0)
    assert oblique[1].start <= usual[1].start and oblique[1].stop > usual[1].stop


class _Given:
    """A model stub that returns what it was given (the phantom's truth), in the models' calling convention."""

    sliding_window = {"roi_size": [16, 128, 128], "overlap": 0.25}

    def __init__(self, output):
        self.output = output

    def __call__(self, hu, affine):
        return self.output


class _Models:
    roi = False

    def __init__(self, **models):
        self.models = models

    def get(self, name):
        return self.models[name]


def test_ica_is_not_scored_when_the_landmarks_put_one_side_far_above_the_other(tmp_path):
    """A landmark model reading a scan unlike its training data put the boundaries of the two sides 41-110 mm apart
    (demo weights on `medium` and `full` heads); the segment split would be wrong, so the ICA path says why instead."""
    case = make_head_case(0, 6, "small", calcium="both", tilt_deg=0.0)
    vol = volume_of(case, tmp_path)
    calcium = (case.arrays["label"] > 0).astype(np.uint8)
    truth = [dict(item, present=item["in_scan"]) for item in case.truth["landmarks"]]
    shifted = [dict(item) for item in truth]
    moved = next(item for item in shifted if item["name"] == "left_petrous_cavernous")
    moved["slice_index"] += 40.0 / case.grid.increment_mm  # 40 mm above the right one

    def run(landmarks):
        choice = SimpleNamespace(standard=True, reasons=[])  # a standard series: no Agatston-equivalent note
        result = PathResult(path="ica", choice=choice, volume=vol, scored_volume=vol)
        score_ica(result, _Models(s2cac_ica=_Given(calcium), dst_landmarks=_Given({"landmarks": landmarks})), LIMITS)
        return result

    assert run(truth).scored
    result = run(shifted)
    assert not result.scored and result.labels is None
    reason = "Calcium could not be mapped to ICA segments: implausible landmarks: the left petrous-cavernous boundary"
    assert re.fullmatch(re.escape(reason) + r" lies \d\d mm above the right one \(.*\)", result.not_scored_reason)


def test_the_dst_reads_the_regions_slices_and_its_slice_indices_come_back_on_the_whole_volume():
    seen = {}

    def locator(hu, affine):
        seen.update(shape=hu.shape, affine=affine)
        return {"num_slices": hu.shape[0], "landmarks": [{"name": "right_cervical_petrous", "slice_index": 3,
                                                          "expected_slice": 3.25, "z_mm": 1.0}]}  # fmt: skip

    affine = np.array([[0.5, 0, 0, -10.0], [0, 0.5, 0, -20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
    vol = SimpleNamespace(hu=np.zeros((40, 8, 8), dtype=np.int16), affine_lps=affine)
    found = locate_landmarks(locator, vol, (slice(5, 25), slice(2, 6), slice(1, 7)))
    assert seen["shape"] == (20, 8, 8)  # the region's slices, each with its whole field of view
    np.testing.assert_allclose(seen["affine"][:, 3], [-10.0, -20.0, -30.0 + 5 * 2.0, 1.0])
    assert found["landmarks"][0]["slice_index"] == 8 and found["landmarks"][0]["expected_slice"] == 8.25
    assert found["num_slices"] == 40
    assert locate_landmarks(locator, vol, None)["num_slices"] == 40 and seen["shape"] == (40, 8, 8)


def test_the_calcium_model_reads_the_box_with_its_affine_and_its_labels_land_in_the_box():
    seen = {}

    def model(hu, affine):
        seen.update(shape=hu.shape, affine=affine)
        return np.ones(hu.shape, dtype=np.uint8)

    model.sliding_window = {"roi_size": [16, 128, 128], "overlap": 0.25}
    affine = np.array([[0.5, 0, 0, -10.0], [0, 0.5, 0, -20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
    vol = SimpleNamespace(hu=np.zeros((40, 8, 8), dtype=np.int16), affine_lps=affine)
    result = PathResult(path="coronary", choice=None, volume=vol, scored_volume=vol)
    box = (slice(5, 25), slice(2, 6), slice(1, 7))
    labels = segment_calcium("s2cac_coronary", result, _Models(s2cac_coronary=model), box)
    assert seen["shape"] == (20, 4, 6)
    np.testing.assert_allclose(seen["affine"][:, 3], [-10.0 + 1 * 0.5, -20.0 + 2 * 0.5, -30.0 + 5 * 2.0, 1.0])
    assert labels.shape == (40, 8, 8) and labels.sum() == 20 * 4 * 6 and labels[box].all()
    assert result.sliding_window["overlap"] == 0.25
