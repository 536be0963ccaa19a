"""Tests for phantoms.dicom_series: lossless round trips, geometry, determinism, UIDs, tags, errors, atomic writes."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from phantoms import dicom_series
from phantoms.dicom_series import TRANSFER_SYNTAXES, derive_uid, read_ct_series, write_ct_series
from phantoms.geometry import Grid

STUDY_UID = derive_uid("test-study")
SERIES_UID = derive_uid("test-study", "series-1")
SMALL = (6, 16, 20)
J2K = (6, 32, 40)  # the JPEG 2000 encoder needs at least 32 pixels per image side


def make_volume(shape: tuple[int, int, int] = SMALL) -> np.ndarray:
    """int16 HU: air background, a column gradient, negative fat, a calcification and the extremes of the range."""
    k, j, i = np.indices(shape)
    vol = (-1000 + 30 * i + 7 * j + 100 * k).astype(np.int16)
    vol[:, 2:5, 3:7] = -90  # fat
    vol[2, 8, 9] = 3071  # largest 12-bit HU
    vol[3, 0, 0] = -1024  # smallest storable HU
    vol[4, 5:7, 10:12] = 650  # calcium
    return vol


def axial_grid(shape: tuple[int, int, int] = SMALL) -> Grid:
    return Grid(shape, 0.7, 2.0, (-120.5, -98.25, 35.0))


def tilted_grid(shape: tuple[int, int, int] = SMALL) -> Grid:
    return Grid.tilted(shape, 0.7, 2.0, (5.0, -20.0, 110.0), tilt_deg=20)


def write(out: Path, vol: np.ndarray | None = None, grid: Grid | None = None, **kw) -> list[Path]:
    grid = grid or axial_grid()
    vol = make_volume(grid.shape) if vol is None else vol
    kw.setdefault("study_uid", STUDY_UID)
    kw.setdefault("series_uid", SERIES_UID)
    kw.setdefault("series_number", 3)
    kw.setdefault("tags", {})
    return write_ct_series(vol, grid, out, **kw)


def shape_for(syntax: str) -> tuple[int, int, int]:
    return J2K if syntax == "jpeg2000" else SMALL


def assert_same_grid(got: Grid, want: Grid) -> None:
    assert got.shape == want.shape
    assert got.pixel_mm == pytest.approx(want.pixel_mm, abs=1e-4)
    assert got.increment_mm == pytest.approx(want.increment_mm, abs=1e-4)
    np.testing.assert_allclose(got.origin, want.origin, atol=1e-4)
    np.testing.assert_allclose(got.row_cosine, want.row_cosine, atol=1e-4)
    np.testing.assert_allclose(got.col_cosine, want.col_cosine, atol=1e-4)
    np.testing.assert_allclose(got.slice_step_dir, want.slice_step_dir, atol=1e-4)
    np.testing.assert_allclose(got.slice_positions(), want.slice_positions(), atol=1e-4)


def test_derive_uid_is_deterministic_valid_and_unambiguous():
    uid = derive_uid("study", "series", "1")
    assert uid == derive_uid("study", "series", "1")
    assert UID(uid).is_valid and len(uid) <= 64
    assert uid.startswith("1.2.826.0.1.3680043.8.498.")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("study", "series", "2") != uid
    with pytest.raises(ValueError):
        derive_uid()


@pytest.mark.parametrize("tilted", [False, True], ids=["axial", "tilted"])
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_round_trip_is_exact(tmp_path, syntax, tilted):
    grid = (tilted_grid if tilted else axial_grid)(shape_for(syntax))
    vol = make_volume(grid.shape)
    files = write(tmp_path / "s", vol, grid, transfer_syntax=syntax)
    assert [f.name for f in files] == [f"IM{n:05d}.dcm" for n in range(1, grid.shape[0] + 1)]
    hu, got, datasets = read_ct_series(tmp_path / "s")
    assert hu.dtype == np.float32 and hu.shape == vol.shape
    np.testing.assert_array_equal(hu, vol.astype(np.float32))
    assert_same_grid(got, grid)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} == {TRANSFER_SYNTAXES[syntax]}
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, grid.shape[0] + 1))


def test_slices_are_sorted_by_position_not_by_name(tmp_path):
    files = write(tmp_path / "s", grid=tilted_grid())
    n = len(files)
    for f in files:  # IM00001 <-> IM00006 etc., through temporary names
        f.rename(f.with_suffix(".tmp"))
    for idx, f in enumerate(files):
        f.with_suffix(".tmp").rename(files[n - 1 - idx])
    by_name = [pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber for f in sorted(files)]
    assert by_name == list(range(n, 0, -1))  # reading by name order would now be reversed
    hu, grid, datasets = read_ct_series(tmp_path / "s")
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, n + 1))
    np.testing.assert_array_equal(hu, make_volume().astype(np.float32))
    assert_same_grid(grid, tilted_grid())


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_same_inputs_give_identical_bytes(tmp_path, syntax):
    grid = tilted_grid(shape_for(syntax))
    tags = {"PatientName": "Doe^Jane", "KVP": 100}
    a = write(tmp_path / "a", grid=grid, transfer_syntax=syntax, tags=tags)
    b = write(tmp_path / "b", grid=grid, transfer_syntax=syntax, tags=dict(tags))
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b, strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    c = write(tmp_path / "c", grid=grid, transfer_syntax=syntax, tags={"PatientName": "Doe^John"})
    assert a[0].read_bytes() != c[0].read_bytes()


def test_uids_are_distinct_stable_and_valid(tmp_path):
    files = write(tmp_path / "s")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sop = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(sop)) == len(sop)
    assert all(UID(u).is_valid for u in sop)
    assert sop == [derive_uid(SERIES_UID, "instance", str(n)) for n in range(1, len(files) + 1)]
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.StudyInstanceUID == STUDY_UID and ds.SeriesInstanceUID == SERIES_UID
        assert ds.FrameOfReferenceUID == derive_uid(STUDY_UID, "for")
        assert UID(ds.FrameOfReferenceUID).is_valid and UID(ds.file_meta.ImplementationClassUID).is_valid
    again = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in write(tmp_path / "again")]
    assert again == sop
    other = write(tmp_path / "other", series_uid=derive_uid("test-study", "series-2"))
    other_sop = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in other}
    assert other_sop.isdisjoint(sop)


def test_tilted_grid_tags(tmp_path):
    grid = tilted_grid()
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in write(tmp_path / "s", grid=grid)]
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(positions, grid.slice_positions(), atol=1e-4)
    np.testing.assert_allclose(np.diff(positions, axis=0), [[0.0, 0.0, 2.0]] * 5, atol=1e-4)  # table feed along z
    np.testing.assert_allclose(positions.mean(axis=0) + grid.matrix @ [9.5, 7.5, 0], (5.0, -20.0, 110.0), atol=1e-4)
    location = [float(ds.SliceLocation) for ds in datasets]
    np.testing.assert_allclose(np.diff(location), 2.0 * c, atol=1e-4)  # spacing along the slice normal
    for ds in datasets:
        assert float(ds.GantryDetectorTilt) == pytest.approx(20.0, abs=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, c, s], atol=1e-9)
    axial = pydicom.dcmread(write(tmp_path / "axial")[0], stop_before_pixels=True)
    assert float(axial.GantryDetectorTilt) == 0.0
    assert [float(v) for v in axial.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(axial.SliceLocation) == pytest.approx(35.0)


def test_defaults_and_required_attributes(tmp_path):
    files = write(tmp_path / "s", tags=None)
    ds = pydicom.dcmread(files[1])
    expected = {
        "Modality": "CT", "PatientPosition": "HFS", "StudyDate": "20260101", "StudyTime": "090000",
        "ContentDate": "20260101", "SeriesDate": "20260101", "AcquisitionDate": "20260101",
        "SpecificCharacterSet": "ISO_IR 100", "PhotometricInterpretation": "MONOCHROME2", "RescaleType": "HU",
        "SamplesPerPixel": 1, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
        "Rows": 16, "Columns": 20, "SeriesNumber": 3, "InstanceNumber": 2, "AcquisitionNumber": 1,
    }  # fmt: skip
    assert {k: ds[k].value for k in expected} == expected
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
    assert float(ds.SliceThickness) == 2.0 and float(ds.KVP) == 120
    assert ds.CTDIPhantomTypeCodeSequence[0].CodeValue == "113691"
    type_1_2 = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "ReferringPhysicianName",
        "StudyID", "AccessionNumber", "SeriesInstanceUID", "FrameOfReferenceUID", "PositionReferenceIndicator",
        "Manufacturer", "ContentTime", "KVP", "ImagePositionPatient", "ImageOrientationPatient", "PixelData",
        "WindowCenter", "WindowWidth", "ConvolutionKernel", "XRayTubeCurrent", "ExposureTime", "Exposure",
    ]  # fmt: skip
    assert [k for k in type_1_2 if k not in ds] == []


def test_tag_overrides_appear(tmp_path):
    tags = {
        "PatientName": "Smith^Anna", "PatientID": "P123", "PatientSex": "F", "PatientAge": "071Y",
        "PatientBirthDate": "19550304", "StudyDescription": "Cardiac CaScore", "SeriesDescription": "CaSc 3.0 Qr36",
        "BodyPartExamined": "HEART", "KVP": 100, "ConvolutionKernel": "Qr36", "SliceThickness": 3.0,
        "XRayTubeCurrent": 95, "Exposure": 30, "CTDIvol": 1.75, "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "SOMATOM Force", "StudyDate": "20250917", "StudyTime": "134501",
        "AccessionNumber": "ACC42", "InstitutionName": "Test Hospital", "WindowCenter": 200, "WindowWidth": 800,
    }  # fmt: skip
    ds = pydicom.dcmread(write(tmp_path / "s", tags=tags)[0], stop_before_pixels=True)
    numeric = {"KVP", "SliceThickness", "XRayTubeCurrent", "Exposure", "CTDIvol", "WindowCenter", "WindowWidth"}
    for keyword, value in tags.items():
        got = float(ds[keyword].value) if keyword in numeric else str(ds[keyword].value)
        assert got == value, keyword
    assert ds.ContentDate == "20250917" and ds.ContentTime == "134501"  # follow the study date/time
    assert ds.ExposureTime == 280  # untouched default


def test_non_ascii_name_switches_to_utf8(tmp_path):
    files = write(tmp_path / "s", tags={"PatientName": "Müller^Jürgen", "InstitutionName": "Klinikum Köln"})
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen" and ds.InstitutionName == "Klinikum Köln"
    assert "Müller".encode() in files[0].read_bytes()


@pytest.mark.parametrize(("bits", "high"), [(12, 3071), (16, 5000)])
def test_clipping_to_storable_range(tmp_path, caplog, bits, high):
    vol = make_volume()
    vol[1, 1, 1], vol[1, 1, 2] = -2048, 5000
    with caplog.at_level(logging.WARNING, logger=dicom_series.__name__):
        write(tmp_path / "s", vol, bits_stored=bits)
    hu, _, datasets = read_ct_series(tmp_path / "s")
    assert datasets[0].BitsStored == bits and datasets[0].HighBit == bits - 1
    assert hu[1, 1, 1] == -1024 and hu[1, 1, 2] == high
    mask = np.ones(vol.shape, bool)
    mask[1, 1, 1:3] = False
    np.testing.assert_array_equal(hu[mask], vol[mask])
    n_clipped = 2 if bits == 12 else 1  # 5000 HU fits in 16 bits
    assert f"clipping {n_clipped} voxels" in caplog.text


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vol": np.zeros((16, 20), np.int16)}, "3-D"),
        ({"vol": np.zeros(SMALL, np.float32)}, "integer dtype"),
        ({"vol": np.zeros((6, 16, 21), np.int16)}, "does not match grid"),
        ({"transfer_syntax": "jpeg-ls"}, "unknown transfer syntax"),
        ({"transfer_syntax": "jpeg2000"}, "at least 32"),
        ({"bits_stored": 10}, "bits_stored"),
        ({"study_uid": "not.a.uid!"}, "study_uid"),
        ({"series_uid": "1.2.03"}, "series_uid"),
        ({"series_number": -1}, "series_number"),
        ({"tags": {"NoSuchKeyword": "x"}}, "unknown DICOM keyword"),
        ({"tags": {"Rows": 32}}, "cannot be overridden"),
        ({"tags": {"SeriesInstanceUID": SERIES_UID}}, "cannot be overridden"),
        ({"tags": {"PatientAge": "71 years"}}, "PatientAge"),
        ({"tags": {"StudyDate": "2025-09-17"}}, "StudyDate"),
    ],
)
def test_bad_inputs_raise_value_error(tmp_path, change, match):
    change = dict(change)
    vol = change.pop("vol", None)
    with pytest.raises(ValueError, match=match):
        write(tmp_path / "s", vol, **change)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        write(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary sibling left behind


def test_overwrite_replaces_existing_folder(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "stale.dcm").write_bytes(b"old")
    files = write(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    np.testing.assert_array_equal(read_ct_series(out)[0], make_volume())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real = pydicom.dcmwrite
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_series.pydicom, "dcmwrite", failing)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_read_rejects_mixed_series_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CT Image Storage"):
        read_ct_series(tmp_path / "empty")
    write(tmp_path / "a")
    other = write(tmp_path / "b", series_uid=derive_uid("test-study", "series-2"))
    shutil.copy(other[0], tmp_path / "a" / "IM99999.dcm")
    with pytest.raises(ValueError, match="SeriesInstanceUID differs"):
        read_ct_series(tmp_path / "a")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_dciodvfy_reports_no_errors_or_warnings(tmp_path, syntax):
    files = write(tmp_path / "s", grid=tilted_grid(shape_for(syntax)), transfer_syntax=syntax)
    result = subprocess.run(["dciodvfy", str(files[2])], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    assert "CTImage" in report
    assert [line for line in report.splitlines() if line.startswith(("Error", "Warning"))] == []


@pytest.mark.skipif(shutil.which("dcentvfy") is None, reason="dicom3tools' dcentvfy is not installed")
def test_dcentvfy_finds_the_series_consistent(tmp_path):
    files = write(tmp_path / "s", grid=tilted_grid())
    result = subprocess.run(["dcentvfy", *map(str, files)], capture_output=True, text=True, check=False)
    assert (result.stdout + result.stderr).strip() == ""
