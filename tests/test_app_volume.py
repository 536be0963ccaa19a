"""deploy_app/volume.py: strict volume building from single-frame and multi-frame CT, and gantry-tilt removal.

References: the phantom writer's own reader (``read_ct_series``) and grid, the NIfTI the phantom writer saves next
to the DICOM (read by MONAI's LoadImage), the real scanner series, and highdicom's legacy conversion for a real
multi-frame CT object. Error cases edit a tiny written series in memory.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage

from deploy_app.volume import Volume, VolumeError, build_volume, untilt
from phantoms.dicom_series import derive_uid, read_ct_series, write_ct_series
from phantoms.geometry import Grid
from phantoms.head import make_head_case
from phantoms.writers import write_case

STUDY_UID = derive_uid("test-app-volume")
SMALL = (8, 16, 20)  # slices, rows, columns
INCREMENT = 2.0


def read_all(folder: Path, *, shuffle_seed: int | None = None) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.suffix == ".dcm"]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(datasets)
    return datasets


def small_volume(shape: tuple[int, int, int] = SMALL) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (-1000 + 30 * i + 7 * j + 100 * k).astype(np.int16)


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> list[pydicom.Dataset]:
    """8 axial slices, 2 mm apart, series number 3."""
    out = tmp_path_factory.mktemp("small") / "dicom"
    grid = Grid(SMALL, 0.7, INCREMENT, (-120.5, -98.25, 35.0))
    write_ct_series(
        small_volume(), grid, out, study_uid=STUDY_UID, series_uid=derive_uid(STUDY_UID, "3"), series_number=3
    )
    return read_all(out)


@pytest.fixture
def series(small_series) -> list[pydicom.Dataset]:
    """A fresh copy of the small series to edit."""
    return copy.deepcopy(small_series)


@pytest.fixture(scope="module")
def chest_written(chest_case, tmp_path_factory) -> Path:
    return write_case(chest_case, tmp_path_factory.mktemp("chest"), dicom=True)


@pytest.fixture(scope="module")
def head_tilted():
    return make_head_case(0, 1, "small", tilt_deg=20, calcium="both")


@pytest.fixture(scope="module")
def head_written(head_tilted, tmp_path_factory) -> Path:
    return write_case(head_tilted, tmp_path_factory.mktemp("head"), dicom=True)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(str(path))
    return np.asarray(img), np.asarray(img.affine, dtype=float)


# ------------------------------------------------------------------------------------------------------------------
# Geometry and values against the references
# ------------------------------------------------------------------------------------------------------------------


def test_chest_phantom_volume_equals_reader_grid_and_nifti_in_any_file_order(chest_case, chest_written):
    folder = chest_written / "dicom"
    volume = build_volume(read_all(folder, shuffle_seed=7))
    hu, grid, ordered = read_ct_series(folder)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.affine_lps, grid.affine_lps(), atol=1e-4)
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in ordered]
    assert volume.increment_mm == pytest.approx(chest_case.grid.increment_mm, abs=1e-4)
    assert volume.pixel_spacing_mm == pytest.approx((chest_case.grid.pixel_mm,) * 2, abs=1e-6)
    assert volume.scoring_spacing == pytest.approx((grid.pixel_mm, grid.pixel_mm, grid.increment_mm), abs=1e-4)
    assert volume.spacing_kji == pytest.approx((grid.increment_mm, grid.pixel_mm, grid.pixel_mm), abs=1e-4)
    assert volume.thickness_mm == pytest.approx(float(chest_case.tags["SliceThickness"]))
    assert volume.tilt_deg == 0.0
    assert volume.series_uid == ordered[0].SeriesInstanceUID

    nifti, nifti_affine = load_nifti(chest_written / "image.nii.gz")
    np.testing.assert_array_equal(volume.hu.transpose(2, 1, 0), nifti)
    np.testing.assert_allclose(volume.affine_ras(), nifti_affine, atol=1e-4)


def test_tilted_head_volume_keeps_the_sheared_table_step_like_the_grid_and_nifti(head_tilted, head_written):
    volume = build_volume(read_all(head_written / "dicom", shuffle_seed=3))
    grid = head_tilted.grid
    np.testing.assert_array_equal(volume.hu, head_tilted.arrays["image"].astype(np.float32))
    np.testing.assert_allclose(volume.affine_lps, grid.affine_lps(), atol=1e-4)
    np.testing.assert_allclose(volume.affine_lps[:3, 2], [0.0, 0.0, grid.increment_mm], atol=1e-4)  # table feed
    assert volume.tilt_deg == pytest.approx(20.0, abs=1e-3)
    assert volume.increment_mm == pytest.approx(grid.increment_mm * np.cos(np.deg2rad(20)), abs=1e-4)

    nifti, nifti_affine = load_nifti(head_written / "image.nii.gz")
    np.testing.assert_array_equal(volume.hu.transpose(2, 1, 0), nifti)
    np.testing.assert_allclose(volume.affine_ras(), nifti_affine, atol=1e-4)


def test_real_ct_volume_equals_reader(real_ct_dir):
    volume = build_volume(read_all(real_ct_dir, shuffle_seed=1))
    hu, grid, _ = read_ct_series(real_ct_dir)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine_lps, grid.affine_lps(), atol=1e-6)
    assert volume.hu.shape == (20, 512, 512)
    assert volume.increment_mm == pytest.approx(2.0)  # 3 mm slices every 2 mm
    assert volume.thickness_mm == pytest.approx(3.0)
    assert volume.pixel_spacing_mm == pytest.approx((0.9765625, 0.9765625))
    assert volume.tilt_deg == 0.0
    assert -1100 < float(volume.hu.min()) and float(volume.hu.max()) > 1000  # air and bone in HU after rescale


def test_rescale_is_applied_per_slice(series):
    reference = build_volume(series)
    series[4].RescaleIntercept = "-1000"
    series[4].RescaleSlope = "2"
    volume = build_volume(series)
    stored = series[4].pixel_array.astype(np.float64)
    k = [ds.SOPInstanceUID for ds in volume.datasets].index(series[4].SOPInstanceUID)
    np.testing.assert_array_equal(volume.hu[k], (stored * 2 - 1000).astype(np.float32))
    others = [i for i in range(len(series)) if i != k]
    np.testing.assert_array_equal(volume.hu[others], reference.hu[others])


def test_a_rescale_slope_of_zero_is_refused_not_read_as_one(series):
    series[4].RescaleSlope = "0"
    with pytest.raises(VolumeError, match="rescale slope 0 and intercept .*, not HU"):
        build_volume(series)
    series[4].RescaleSlope = ""  # empty (absent) is the identity
    series[4].RescaleIntercept = ""
    volume = build_volume(series)
    k = [ds.SOPInstanceUID for ds in volume.datasets].index(series[4].SOPInstanceUID)
    np.testing.assert_array_equal(volume.hu[k], series[4].pixel_array.astype(np.float32))


def test_position_jitter_within_tolerance_is_accepted(series):
    """0.005 mm of jitter (rounding in real exports) is regular: tolerance is max(1 % of 2 mm, 0.01 mm) = 0.02."""
    position = [float(v) for v in series[3].ImagePositionPatient]
    series[3].ImagePositionPatient = [position[0], position[1], position[2] + 0.015]
    assert build_volume(series).increment_mm == pytest.approx(INCREMENT, abs=1e-3)


# ------------------------------------------------------------------------------------------------------------------
# Strict checks: one VolumeError naming the series and the fault
# ------------------------------------------------------------------------------------------------------------------


def _drop_middle(s):
    del s[4]


def _duplicate(s):
    extra = copy.deepcopy(s[2])
    extra.SOPInstanceUID = derive_uid("duplicate")
    extra.InstanceNumber = 99
    s.append(extra)


def _irregular(s):
    p = [float(v) for v in s[5].ImagePositionPatient]
    s[5].ImagePositionPatient = [p[0], p[1], p[2] + 0.5]


def _mixed_series(s):
    s[1].SeriesInstanceUID = derive_uid("another series")


def _one_bad_orientation(s):
    s[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9848078, 0.1736482]


def _not_orthonormal(s):
    for ds in s:
        ds.ImageOrientationPatient = [1, 0, 0, 0.2, 1, 0]


def _no_position(s):
    del s[6].ImagePositionPatient


def _not_ct(s):
    s[0].Modality = "MR"


def _no_pixels(s):
    del s[3].PixelData


def _rows(s):
    s[2].Rows = 17


def _pixel_spacing(s):
    s[2].PixelSpacing = [0.8, 0.8]


def _frame_of_reference(s):
    s[2].FrameOfReferenceUID = derive_uid("another frame of reference")


def _single_slice(s):
    del s[1:]


def _off_line(s):
    p = [float(v) for v in s[3].ImagePositionPatient]
    s[3].ImagePositionPatient = [p[0] + 1.0, p[1], p[2]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_middle, "missing slice(s) between z=41.0 and z=45.0: gap 4.0 mm where the increment is 2.0 mm"),
        (_duplicate, "duplicate slice position z=39.0"),
        (_irregular, "irregular slice spacing between z=43.0 and z=45.5: 2.5 mm where the increment is 2.0 mm"),
        (_mixed_series, "2 different series"),
        (_one_bad_orientation, "ImageOrientationPatient differs between images"),
        (_not_orthonormal, "is not two orthogonal unit vectors"),
        (_no_position, "instance 7 has no ImagePositionPatient"),
        (_not_ct, "instance 1 is modality 'MR', not CT"),
        (_no_pixels, "instance 4 has no pixel data"),
        (_rows, "Rows differs between images"),
        (_pixel_spacing, "PixelSpacing differs between images"),
        (_frame_of_reference, "FrameOfReferenceUID differs"),
        (_single_slice, "has a single slice; a volume needs at least 2"),
        (_off_line, "do not lie on one straight line"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_bad_series_raise_one_volume_error_naming_series_and_fault(series, edit, message):
    edit(series)
    with pytest.raises(VolumeError) as info:
        build_volume(series)
    assert message in str(info.value)
    if edit is not _mixed_series:
        assert str(info.value).startswith("series 3 (")


def test_empty_series_raises_volume_error():
    with pytest.raises(VolumeError, match="no images"):
        build_volume([])
    assert issubclass(VolumeError, ValueError)


# ------------------------------------------------------------------------------------------------------------------
# Multi-frame CT through the same path
# ------------------------------------------------------------------------------------------------------------------


def legacy_multiframe(datasets: list[pydicom.Dataset], tmp_path: Path) -> pydicom.Dataset:
    """A Legacy Converted Enhanced CT object of ``datasets``, written to disk and read back."""
    uid = datasets[0].SeriesInstanceUID
    mf = LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=derive_uid(uid, "multiframe"),
        series_number=40,
        sop_instance_uid=derive_uid(uid, "multiframe", "1"),
        instance_number=1,
    )
    path = tmp_path / "multiframe.dcm"
    mf.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_multiframe_ct_gives_the_same_volume_as_its_single_frame_series(head_written, tmp_path):
    single = read_all(head_written / "dicom")
    mf = legacy_multiframe(single, tmp_path)
    assert int(mf.NumberOfFrames) == len(single) and "PerFrameFunctionalGroupsSequence" in mf
    from_frames = build_volume([mf])
    from_slices = build_volume(single)
    np.testing.assert_array_equal(from_frames.hu, from_slices.hu)
    np.testing.assert_allclose(from_frames.affine_lps, from_slices.affine_lps, atol=1e-5)
    assert from_frames.tilt_deg == pytest.approx(from_slices.tilt_deg, abs=1e-4)  # tilted: a sheared multi-frame
    assert from_frames.increment_mm == pytest.approx(from_slices.increment_mm, abs=1e-5)
    assert from_frames.thickness_mm == from_slices.thickness_mm
    assert from_frames.datasets == (mf,)


def test_multiframe_per_frame_rescale_and_checks(small_series, tmp_path):
    mf = legacy_multiframe(copy.deepcopy(small_series), tmp_path)
    reference = build_volume([mf])
    shared = mf.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    for f, groups in enumerate(mf.PerFrameFunctionalGroupsSequence):
        groups.PixelValueTransformationSequence = copy.deepcopy(transform)
        if f == 0:
            groups.PixelValueTransformationSequence[0].RescaleIntercept = "-1000"
    volume = build_volume([mf])
    z = [float(g.PlanePositionSequence[0].ImagePositionPatient[2]) for g in mf.PerFrameFunctionalGroupsSequence]
    k = int(np.argsort(np.argsort(z))[0])  # the volume slice that holds frame 1 (slices sorted by position)
    np.testing.assert_array_equal(volume.hu[k], reference.hu[k] + 24)
    others = [i for i in range(len(z)) if i != k]
    np.testing.assert_array_equal(volume.hu[others], reference.hu[others])

    groups = mf.PerFrameFunctionalGroupsSequence
    groups[3].PlanePositionSequence[0].ImagePositionPatient = list(
        groups[4].PlanePositionSequence[0].ImagePositionPatient
    )
    with pytest.raises(VolumeError, match=r"series 40 .*duplicate slice position .*frame \d of instance 1"):
        build_volume([mf])


# ------------------------------------------------------------------------------------------------------------------
# Gantry tilt
# ------------------------------------------------------------------------------------------------------------------


def lps_of(volume: Volume, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices (i, j, k) -> (N, 3) LPS mm."""
    return np.asarray(ijk, dtype=float) @ volume.affine_lps[:3, :3].T + volume.affine_lps[:3, 3]


def centroid_near(volume: Volume, weights: np.ndarray, position: np.ndarray, radius_mm: float) -> np.ndarray:
    """LPS centroid of ``weights`` [k, j, i] over the voxels within ``radius_mm`` of ``position``."""
    kji = np.argwhere(weights > 0)
    lps = lps_of(volume, kji[:, ::-1])
    near = np.linalg.norm(lps - position, axis=1) < radius_mm
    w = weights[tuple(kji[near].T)].astype(float)
    return (lps[near] * w[:, None]).sum(axis=0) / w.sum()


def test_untilt_keeps_lesions_and_landmarks_where_they_were(head_tilted, head_written):
    tilted = build_volume(read_all(head_written / "dicom"))
    flat = untilt(tilted)
    assert flat.tilt_deg == 0.0 and tilted.tilt_deg == pytest.approx(20.0, abs=1e-3)
    m = flat.affine_lps[:3, :3]  # orthogonal: columns are the row and column cosines and the normal, scaled
    spacing_ijk = np.array([flat.pixel_spacing_mm[1], flat.pixel_spacing_mm[0], flat.increment_mm])
    np.testing.assert_allclose(m.T @ m, np.diag(spacing_ijk**2), atol=1e-9)
    assert flat.increment_mm == tilted.increment_mm and flat.hu.shape[0] == tilted.hu.shape[0]
    assert flat.hu.shape[1] > tilted.hu.shape[1]  # the sheared slab is wider than one slice along the tilt
    assert float(flat.hu.min()) >= -1024.0
    # Nothing is lost: HU above air summed over voxels of equal volume is kept.
    assert float((flat.hu + 1024.0).sum(dtype=np.float64)) == pytest.approx(
        float((tilted.hu + 1024.0).sum(dtype=np.float64)), rel=2e-3
    )
    half_voxel = 0.5 * min(flat.pixel_spacing_mm)

    # Lesion centres and ICA landmarks, painted as single bright voxels into the tilted grid, come back at the
    # same LPS position (the centroid of the in-plane interpolated spot).
    points = [lesion["centre_mm"] for lesion in head_tilted.truth["lesions"]]
    points += [mark["position_mm"] for mark in head_tilted.truth["landmarks"]]
    marks = np.full(tilted.hu.shape, -1024.0, dtype=np.float32)
    expected = []
    for point in points:
        ijk = np.rint(head_tilted.grid.patient_to_index(np.array([point]))[0]).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < np.array(tilted.hu.shape[::-1])):
            marks[ijk[2], ijk[1], ijk[0]] = 1000.0
            expected.append(lps_of(tilted, ijk[None])[0])
    assert len(expected) >= 6
    flat_marks = untilt(replace(tilted, hu=marks)).hu + 1024
    for position in expected:
        error = np.linalg.norm(centroid_near(flat, flat_marks, position, radius_mm=3.0) - position)
        assert error < 0.05 * half_voxel  # required: half a voxel; a linear in-plane shift keeps centroids exactly


def test_untilt_returns_an_untilted_volume_unchanged(series):
    volume = build_volume(series)
    assert untilt(volume) is volume


def test_tilt_beyond_the_limit_raises(tmp_path):
    grid = Grid.tilted(SMALL, 0.7, INCREMENT, (5.0, -20.0, 110.0), tilt_deg=35)
    out = tmp_path / "tilt35"
    write_ct_series(
        small_volume(), grid, out, study_uid=STUDY_UID, series_uid=derive_uid(STUDY_UID, "35"), series_number=35
    )
    volume = build_volume(read_all(out))
    assert volume.tilt_deg == pytest.approx(35.0, abs=1e-3)
    with pytest.raises(VolumeError, match=r"series 35 .*gantry tilt of 35.0 deg exceeds the 30 deg"):
        untilt(volume)
    assert untilt(volume, max_tilt_deg=40).tilt_deg == 0.0
