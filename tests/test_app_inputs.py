"""What hospitals send: unusual-but-valid inputs the app must read with the right geometry, and broken ones it
must refuse with one clear sentence (issue 7).

Every input is generated here from the phantoms. The valid variants are transcoded copies of one small cardiac
series (explicit VR little endian, the reference): each goes through the app's own loader, selector and volume
builder (``read_study`` -> ``select`` -> ``build_volume``) and must give the reference's HU and affine exactly.
The broken ones must raise the app's documented errors (``InputError`` for the folder, ``VolumeError`` for a
series), or become a blocking quality finding of their path (``pipeline.make_volume`` / ``pipeline.check``),
which is how a broken series inside a study with other usable series is skipped with the reason in the log and
reports. One run of the real command line on a messy study checks everything the app writes against the source.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from conftest import ROOT
from deploy_app import pipeline
from deploy_app.outputs import OUTPUT_NAMES
from deploy_app.quality import load_limits
from deploy_app.study import InputError, read_study
from deploy_app.volume import MAX_VOLUME_MB_ENV, Volume, VolumeError, build_volume, untilt
from phantoms.chest import make_chest_case
from phantoms.dicom_series import derive_uid, read_ct_series, write_ct_series
from phantoms.geometry import Grid
from phantoms.head import make_head_case
from phantoms.writers import SERIES_DESCRIPTIONS, STUDY_DESCRIPTIONS

STUDY_UID = derive_uid("test-app-inputs")
UNDECODABLE = UID("1.2.840.10008.1.2.4.100")  # MPEG2: a compressed syntax pydicom has no decoder for
SLICES = 12  # of the small cardiac phantom: enough for a volume, few enough to transcode quickly


def chest_tags(case) -> dict:
    return {
        **case.tags,
        "StudyDescription": STUDY_DESCRIPTIONS["chest"],
        "SeriesDescription": SERIES_DESCRIPTIONS["chest"],
    }


@pytest.fixture(scope="module")
def chest_case():
    return make_chest_case(0, 1, "small")


@pytest.fixture(scope="module")
def reference(chest_case, tmp_path_factory) -> Path:
    """The first ``SLICES`` slices of the small cardiac phantom, explicit VR little endian."""
    grid = chest_case.grid
    crop = Grid((SLICES, *grid.shape[1:]), grid.pixel_mm, grid.increment_mm, grid.origin)
    out = tmp_path_factory.mktemp("reference") / "chest"
    write_ct_series(
        chest_case.arrays["image"][:SLICES],
        crop,
        out,
        study_uid=STUDY_UID,
        series_uid=derive_uid(STUDY_UID, "chest"),
        series_number=2,
        tags=chest_tags(chest_case),
    )
    return out


@pytest.fixture(scope="module")
def reference_volume(reference) -> Volume:
    return build_volume(load_series(reference))


def load_series(folder: Path) -> tuple[Dataset, ...]:
    """The one series of ``folder``, through the app's loader."""
    study = read_study(folder)
    assert len(study.series) == 1, list(study.series)
    return next(iter(study.series.values()))


def transcode(src: Path, dst: Path, edit: Callable[[Dataset], Dataset], name: Callable[[int], str] | None = None):
    """Rewrite every file of ``src`` into ``dst`` as ``edit`` makes it (file ``i`` named ``name(i)``)."""
    dst.mkdir(parents=True)
    for index, path in enumerate(sorted(src.iterdir())):
        ds = edit(pydicom.dcmread(path))
        pydicom.dcmwrite(dst / (name(index) if name else path.name), ds, enforce_file_format=True)
    return dst


def _compress(syntax, plugin: str) -> Callable[[Dataset], Dataset]:
    def edit(ds: Dataset) -> Dataset:
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
        return ds

    return edit


def _jpeg_lossless(ds: Dataset) -> Dataset:
    """JPEG Lossless process 14 SV1, the usual compression of PACS exports, encoded by GDCM (pydicom has no
    encoder for it; python-gdcm is also the app's decoder)."""
    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        pydicom.dcmwrite(src, ds, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        out = pydicom.dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    return out


def _deflate(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def _big_endian(ds: Dataset) -> Dataset:
    """Explicit VR big endian: a fresh dataset (pydicom will not convert one read as little endian) whose OW pixel
    data is byte-swapped by hand, as pydicom leaves that to the caller."""
    pixels = ds.pixel_array
    out = Dataset()
    for element in ds:
        out.add(copy.deepcopy(element))
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    out.PixelData = pixels.astype(">u2").tobytes()
    return out


def _slope_half(ds: Dataset) -> Dataset:
    """Stored values twice the HU offset, RescaleSlope 0.5: the same HU from a different encoding."""
    hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    ds.PixelData = ((hu + 1024) * 2).astype("<u2").tobytes()
    return ds


def _signed(ds: Dataset) -> Dataset:
    """Signed stored values (PixelRepresentation 1) equal to HU, RescaleIntercept 0."""
    hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.PixelData = hu.astype("<i2").tobytes()
    return ds


def _latin1_name(ds: Dataset) -> Dataset:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller-Lüdenscheidt^Zoë"
    return ds


def _greek_name(ds: Dataset) -> Dataset:
    ds.SpecificCharacterSet = "ISO_IR 126"
    ds.PatientName = "Παπαδόπουλος^Ελένη"
    return ds


VALID_VARIANTS: dict[str, tuple[Callable[[Dataset], Dataset], Callable[[int], str] | None]] = {
    "reverse file order": (lambda ds: ds, lambda i: f"IM{99 - i:03d}.dcm"),
    "random file order": (lambda ds: ds, lambda i: f"{random.Random(i).getrandbits(48):012x}"),
    "jpeg2000": (_compress(JPEG2000Lossless, "pylibjpeg"), None),
    "jpeg-ls": (_compress(JPEGLSLossless, "pyjpegls"), None),
    "rle": (_compress(RLELossless, "pylibjpeg"), None),
    "jpeg lossless": (_jpeg_lossless, None),
    "deflate": (_deflate, None),
    "explicit big endian": (_big_endian, None),
    "rescale slope 0.5": (_slope_half, None),
    "signed pixels": (_signed, None),
    "latin-1 patient name": (_latin1_name, None),
    "greek patient name": (_greek_name, None),
}


def assert_same_volume(volume: Volume, reference: Volume) -> None:
    np.testing.assert_array_equal(volume.hu, reference.hu)
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps, atol=1e-6)
    assert volume.increment_mm == pytest.approx(reference.increment_mm, abs=1e-6)
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in reference.datasets]


# -- valid inputs: the same volume as the reference ---------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VALID_VARIANTS))
def test_valid_variant_gives_the_reference_volume(variant, reference, reference_volume, tmp_path):
    edit, name = VALID_VARIANTS[variant]
    folder = transcode(reference, tmp_path / "in", edit, name)
    study = read_study(folder)
    choice = pipeline.select(study)["coronary"]
    assert choice is not None and choice.series_uid == reference_volume.series_uid
    assert_same_volume(build_volume(choice.datasets), reference_volume)
    assert choice.datasets[0].PatientName == pydicom.dcmread(next(folder.iterdir())).PatientName


def test_reference_geometry_is_the_phantom_grid(chest_case, reference_volume):
    """The reference itself is right: HU and affine of the phantom the series was written from."""
    np.testing.assert_array_equal(reference_volume.hu, chest_case.arrays["image"][:SLICES])
    np.testing.assert_allclose(reference_volume.affine_ras(), chest_case.grid.affine_ras(), atol=1e-4)


def test_non_ascii_names_are_decoded_for_the_reports(reference, tmp_path):
    folder = transcode(reference, tmp_path / "in", _greek_name)
    assert read_study(folder).info()["patient_name"] == "Παπαδόπουλος^Ελένη"


def test_enhanced_multiframe_ct_gives_the_reference_volume(reference, reference_volume, tmp_path):
    single = [pydicom.dcmread(p) for p in sorted(reference.iterdir())]
    mf = LegacyConvertedEnhancedCTImage(
        single,
        series_instance_uid=derive_uid(STUDY_UID, "multiframe"),
        series_number=7,
        sop_instance_uid=derive_uid(STUDY_UID, "multiframe", "1"),
        instance_number=1,
    )
    folder = tmp_path / "in"
    folder.mkdir()
    mf.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    study = read_study(folder)
    choice = pipeline.select(study)["coronary"]
    assert choice is not None and choice.series_uid == derive_uid(STUDY_UID, "multiframe")
    volume = build_volume(choice.datasets)
    np.testing.assert_array_equal(volume.hu, reference_volume.hu)
    np.testing.assert_allclose(volume.affine_lps, reference_volume.affine_lps, atol=1e-5)


def test_extra_files_and_a_dicomdir_are_left_out(reference, reference_volume, tmp_path, caplog):
    """A media export: DICOMDIR (written by pydicom's FileSet, files renamed), a copy of it under another name,
    viewer junk and notes; hidden files are not even opened."""
    fs = FileSet()
    for path in sorted(reference.iterdir()):
        fs.add(pydicom.dcmread(path))
    folder = tmp_path / "media"
    fs.write(folder)
    assert (folder / "DICOMDIR").is_file()
    shutil.copy(folder / "DICOMDIR", folder / "index.dcm")
    (folder / "README.txt").write_text("Patient CD. Open viewer.exe")
    (folder / "viewer.exe").write_bytes(b"MZ\x90\x00" + bytes(500))
    (folder / "thumbs").mkdir()
    (folder / "thumbs" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / ".DS_Store").write_bytes(bytes(64))
    with caplog.at_level(logging.INFO, logger="deploy_app.study"):
        study = read_study(folder)
    assert sorted(study.skipped) == [
        "DICOMDIR: a DICOMDIR (media directory)",
        "README.txt: not a DICOM file (no DICOM header)",
        "index.dcm: a DICOMDIR (media directory)",
        "thumbs/1.jpg: not a DICOM file (no DICOM header)",
        "viewer.exe: not a DICOM file (no DICOM header)",
    ]
    assert "left out README.txt: not a DICOM file (no DICOM header)" in caplog.text
    choice = pipeline.select(study)["coronary"]
    assert_same_volume(build_volume(choice.datasets), reference_volume)


def test_real_jpeg2000_series_with_uids_reads_as_the_reference_reader_does(real_ct_dir, tmp_path):
    """The real scanner series (JPEG 2000, multi-valued kernel, empty UIDs as distributed) with UIDs filled in:
    the app's loader and builder give the HU and grid of the phantom package's independent reader."""
    series_uid = derive_uid(STUDY_UID, "real")

    def add_uids(ds: Dataset) -> Dataset:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        return ds

    folder = transcode(real_ct_dir, tmp_path / "real", add_uids)
    datasets = load_series(folder)
    assert datasets[0].file_meta.TransferSyntaxUID == JPEG2000Lossless
    volume = build_volume(datasets)
    hu, grid, _ = read_ct_series(real_ct_dir)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine_ras(), grid.affine_ras(), atol=1e-4)


def test_real_series_as_distributed_has_no_uids_and_is_refused_clearly(real_ct_dir):
    with pytest.raises(InputError, match="has no StudyInstanceUID or SeriesInstanceUID.*export the study again"):
        read_study(real_ct_dir, headers_only=True)


@pytest.mark.parametrize("tilt", [12.0, 30.0])
def test_tilted_head_up_to_30_degrees_is_resampled_on_the_phantom_grid(tilt, tmp_path):
    case = make_head_case(0, 1, "small", tilt_deg=tilt)
    folder = tmp_path / "head"
    write_ct_series(
        case.arrays["image"],
        case.grid,
        folder,
        study_uid=STUDY_UID,
        series_uid=derive_uid(STUDY_UID, "head", str(tilt)),
        series_number=3,
        tags={**case.tags, "StudyDescription": STUDY_DESCRIPTIONS["head"], "SeriesDescription": "Head"},
    )
    choice = pipeline.select(read_study(folder))["ica"]
    assert choice is not None
    volume = build_volume(choice.datasets)
    assert volume.tilt_deg == pytest.approx(tilt, abs=0.01)
    np.testing.assert_array_equal(volume.hu, case.arrays["image"])
    np.testing.assert_allclose(volume.affine_ras(), case.grid.affine_ras(), atol=1e-4)
    flat = untilt(volume)
    assert flat.tilt_deg == 0.0 and flat.hu.shape[0] == volume.hu.shape[0]
    # every untilted slice lies in the plane of its source slice
    normal = np.cross(flat.affine_lps[:3, 0], flat.affine_lps[:3, 1])
    normal /= np.linalg.norm(normal)
    src = volume.affine_lps @ np.array([[0, 0, k, 1] for k in range(volume.hu.shape[0])]).T
    dst = flat.affine_lps @ np.array([[0, 0, k, 1] for k in range(flat.hu.shape[0])]).T
    np.testing.assert_allclose(normal @ src[:3], normal @ dst[:3], atol=1e-6)


# -- broken inputs: one clear error ------------------------------------------------------------------------------


def test_empty_folder_and_only_non_dicom_files_are_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        read_study(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("nothing here")
    (junk / "DICOMDIR").write_bytes(bytes(10))
    with pytest.raises(InputError, match=r"no DICOM files in .*junk \(2 file\(s\), none of them DICOM: DICOMDIR"):
        read_study(junk)
    with pytest.raises(InputError, match="does not exist"):
        read_study(tmp_path / "absent")


def test_truncated_files_are_input_errors_naming_the_file(reference, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(reference, folder)
    files = sorted(folder.iterdir())
    files[4].write_bytes(files[4].read_bytes()[:700])  # cut inside a header value
    for headers_only in (True, False):
        with pytest.raises(InputError, match=rf"{files[4].name} is truncated: it ends inside \(0008,0070\)"):
            read_study(folder, headers_only=headers_only)
    files[4].write_bytes(files[4].read_bytes()[:300])  # cut between elements, before the UIDs
    with pytest.raises(InputError, match=rf"{files[4].name} has no StudyInstanceUID .*\(a truncated file"):
        read_study(folder, headers_only=True)
    shutil.copy(files[3], files[4])
    files[6].write_bytes(files[6].read_bytes()[:-1000])  # cut inside the pixel data
    assert len(read_study(folder, headers_only=True).first) > 0  # the headers are whole
    with pytest.raises(InputError, match=rf"{files[6].name} is truncated: it ends inside \(7FE0,0010\) after"):
        read_study(folder)


def test_undecodable_element_is_an_input_error_naming_it(reference, tmp_path):
    """A value pydicom cannot decode at all (here Rows, US, given 3 bytes) fails at once, named, wherever it is."""
    from pydicom.dataelem import RawDataElement

    folder = tmp_path / "in"
    shutil.copytree(reference, folder)
    victim = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds[0x00280010] = RawDataElement(pydicom.tag.Tag(0x00280010), "US", 3, b"0.0", 0, False, True, True, False)
    ds.save_as(victim)
    for headers_only in (True, False):
        with pytest.raises(InputError, match=rf"{victim.name} is not readable DICOM: Rows \(0028,0010\) cannot be"):
            read_study(folder, headers_only=headers_only)


def _series(reference: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(reference.iterdir())]


def _truncate_pixels(s: list[Dataset]) -> list[Dataset]:
    s[5].PixelData = s[5].PixelData[:-1000]
    return s


def _drop_pixels(s: list[Dataset]) -> list[Dataset]:
    del s[5].PixelData
    return s


def _drop_middle(s: list[Dataset]) -> list[Dataset]:
    return s[:6] + s[7:]


def _duplicate_instance(s: list[Dataset]) -> list[Dataset]:
    return [*s, copy.deepcopy(s[3])]


def _irregular_spacing(s: list[Dataset]) -> list[Dataset]:
    for ds in s[8:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.8]
    return s


def _other_orientation(s: list[Dataset]) -> list[Dataset]:
    s[2].ImageOrientationPatient = [1, 0, 0, 0, 0.996195, 0.087156]
    return s


def _undecodable(s: list[Dataset]) -> list[Dataset]:
    """Pixel data labelled with a compressed syntax nothing here decodes (JPEG-LS bytes under MPEG2's UID)."""
    for ds in s:
        _compress(JPEGLSLossless, "pyjpegls")(ds)
        ds.file_meta.TransferSyntaxUID = UNDECODABLE
    return s


def _nan_slope(s: list[Dataset]) -> list[Dataset]:
    s[0].RescaleSlope = "nan"
    return s


def _not_ct(s: list[Dataset]) -> list[Dataset]:
    for ds in s:
        ds.Modality = "MR"
    return s


BROKEN_SERIES = {
    "truncated pixel data": (_truncate_pixels, r"the pixel data of instance 6 cannot be decoded"),
    "missing pixel data": (_drop_pixels, r"instance 6 has no pixel data"),
    "missing slice": (_drop_middle, r"missing slice\(s\) between z=.* \(1 slice\(s\) absent\)"),
    "duplicate instance": (_duplicate_instance, r"instance 4 is in the input twice \(SOPInstanceUID"),
    "inconsistent spacing": (_irregular_spacing, r"irregular slice spacing between z="),
    "inconsistent orientation": (_other_orientation, r"ImageOrientationPatient differs between images"),
    "undecodable transfer syntax": (
        _undecodable,
        r"instance 1 is compressed as .*, which this installation cannot decode",
    ),
    "rescale slope not a number": (_nan_slope, r"instance 1 has rescale slope nan and intercept -1024, not HU"),
    "non-CT modality": (_not_ct, r"instance 1 is modality 'MR', not CT"),
    "single slice": (lambda s: s[:1], r"a volume needs at least 2 \(the slice increment cannot be known"),
}


@pytest.mark.parametrize("fault", list(BROKEN_SERIES))
def test_broken_series_is_a_volume_error_and_a_blocking_finding(fault, reference, caplog):
    breaker, message = BROKEN_SERIES[fault]
    datasets = breaker(_series(reference))
    with pytest.raises(VolumeError, match=r"^series 2 \(.*\)(:| has a single slice;) .*" + message):
        build_volume(datasets)
    # inside a study with other usable series: this path is skipped with the reason in the log and the reports
    choice = pipeline.SeriesChoice("coronary", str(datasets[0].SeriesInstanceUID), tuple(datasets), True, (), ())
    with caplog.at_level(logging.WARNING, logger="deploy_app.pipeline"):
        volume, findings = pipeline.make_volume(choice)
    assert volume is None and "coronary series is not usable" in caplog.text
    assert len(findings) == 1 and findings[0].blocking and not findings[0].passed
    assert re.search(message, findings[0].detail)
    result = pipeline.PathResult("coronary", choice, findings=findings)
    assert not pipeline.check(result, load_limits())
    assert re.search(message, result.not_scored_reason)


def test_missing_pixel_data_file_is_kept_for_the_builder_to_name(reference, tmp_path):
    """A CT image file without pixel data stays in its series (else it would read as a missing slice)."""
    folder = tmp_path / "in"
    shutil.copytree(reference, folder)
    victim = sorted(folder.iterdir())[5]
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    with pytest.raises(VolumeError, match="instance 6 has no pixel data"):
        build_volume(load_series(folder))


def _written_volume(case, grid: Grid, folder: Path, series_number: int, tags: dict) -> Volume:
    write_ct_series(
        case.arrays["image"][: grid.shape[0]],
        grid,
        folder,
        study_uid=STUDY_UID,
        series_uid=derive_uid(STUDY_UID, str(series_number)),
        series_number=series_number,
        tags=tags,
    )
    return build_volume(load_series(folder))


def test_tilted_cardiac_series_is_not_scored(chest_case, tmp_path):
    g = chest_case.grid
    grid = Grid.tilted((SLICES, *g.shape[1:]), g.pixel_mm, g.increment_mm, (0.0, 0.0, 0.0), tilt_deg=15.0)
    volume = _written_volume(chest_case, grid, tmp_path / "tilted", 5, chest_tags(chest_case))
    assert volume.tilt_deg == pytest.approx(15.0, abs=0.01)
    choice = pipeline.SeriesChoice("coronary", volume.series_uid, volume.datasets, True, (), ())
    result = pipeline.PathResult("coronary", choice, volume=volume)
    assert not pipeline.check(result, load_limits())
    assert "gantry tilt 15 deg; cardiac calcium scoring needs an untilted series" in result.not_scored_reason


def test_head_tilt_beyond_30_degrees_is_not_scored(tmp_path):
    case = make_head_case(0, 1, "small", tilt_deg=35.0)
    volume = _written_volume(case, case.grid, tmp_path / "head", 6, case.tags)
    assert volume.tilt_deg == pytest.approx(35.0, abs=0.01)
    with pytest.raises(VolumeError, match="gantry tilt of 35.0 deg exceeds the 30 deg"):
        untilt(volume)
    choice = pipeline.SeriesChoice("ica", volume.series_uid, volume.datasets, True, (), ())
    result = pipeline.PathResult("ica", choice, volume=volume)
    assert not pipeline.check(result, load_limits())
    assert "gantry tilt 35 deg is above 30 deg" in result.not_scored_reason


def test_non_ct_study_selects_nothing(reference, tmp_path):
    folder = transcode(reference, tmp_path / "mr", lambda ds: _not_ct([ds])[0])
    assert pipeline.select(read_study(folder)) == {"coronary": None, "ica": None}


def test_series_over_the_memory_budget_is_refused_before_decoding(reference, monkeypatch):
    datasets = _series(reference)
    megabytes = SLICES * 128 * 128 * 4 / 2**20  # 0.75 MB of float32 HU
    monkeypatch.setenv(MAX_VOLUME_MB_ENV, str(megabytes * 0.99))
    for ds in datasets:  # never decoded: the budget is judged from the headers
        ds.PixelData = b"\0\0"
    with pytest.raises(VolumeError, match=r"12 slices of 128 x 128 make a 1 MB volume, more than the 1 MB memory"):
        build_volume(datasets)
    monkeypatch.setenv(MAX_VOLUME_MB_ENV, "-3")
    with pytest.raises(VolumeError, match="is not a positive number of megabytes"):
        build_volume(datasets)
    monkeypatch.setenv(MAX_VOLUME_MB_ENV, str(megabytes * 1.01))
    assert build_volume(_series(reference)).hu.nbytes == SLICES * 128 * 128 * 4


def test_memory_budget_option_is_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    from deploy_app.cli import EXIT_CODES, main

    monkeypatch.delenv(MAX_VOLUME_MB_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "--max-volume-mb", "0"])
    assert stop.value.code == 2 and "'0' is not a positive number of megabytes" in capsys.readouterr().err
    monkeypatch.setenv(MAX_VOLUME_MB_ENV, "lots")
    assert main(["-i", str(tmp_path), "-o", str(tmp_path / "out")]) == EXIT_CODES["input"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["calcimap: error: CALCIMAP_MAX_VOLUME_MB='lots' is not a positive number of megabytes"]
    assert not (tmp_path / "out").exists()


# -- one run of the real command line on a messy study: everything written against the source --------------------

SENTINEL_NAME = "Zzsentinelname^Jürgen"
SENTINEL_ID = "ZZSENTINELID0042"


@pytest.fixture(scope="module")
def messy_run(chest_case, tmp_path_factory):
    """The whole small cardiac phantom as JPEG-LS, files renamed at random into nested folders, plus a DICOMDIR and
    junk; a non-ASCII sentinel patient name and a sentinel patient ID; the app at ``-l DEBUG``."""
    base = tmp_path_factory.mktemp("messy")
    explicit = base / "explicit"
    write_ct_series(
        chest_case.arrays["image"],
        chest_case.grid,
        explicit,
        study_uid=STUDY_UID,
        series_uid=derive_uid(STUDY_UID, "messy"),
        series_number=4,
        tags={**chest_tags(chest_case), "PatientName": SENTINEL_NAME, "PatientID": SENTINEL_ID},
    )
    study = base / "study"
    fs = FileSet()
    for path in sorted(explicit.iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
        fs.add(ds)
    fs.write(study)
    for path in sorted(p for p in study.rglob("*") if p.is_file() and p.name != "DICOMDIR"):
        path.rename(path.with_name(f"{random.Random(path.name).getrandbits(40):010x}"))
    (study / "notes.txt").write_text("sent from the scanner console\n")
    out = base / "out"
    r = subprocess.run(
        [sys.executable, "-m", "deploy_app", "-i", str(study), "-o", str(out), "-l", "DEBUG"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return explicit, out, r


@pytest.mark.slow
def test_sentinel_patient_name_and_id_never_reach_the_log(messy_run):
    _, out, r = messy_run
    log = r.stdout + r.stderr
    assert "DEBUG" in log and "coronary: Agatston" in r.stdout  # the run did log at DEBUG and scored
    for text in (SENTINEL_NAME, SENTINEL_ID, "Zzsentinelname", "Jürgen", "SENTINELID"):
        assert text.casefold() not in log.casefold(), [line for line in log.splitlines() if text in line][:3]
    # ... while the reports, which are for the reader, do carry them
    assert json.loads((out / "results.json").read_text())["study"]["patient_id"] == SENTINEL_ID


@pytest.mark.slow
def test_output_names_are_fixed_and_never_patient_data(messy_run):
    _, out, _ = messy_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["coronary_seg.dcm", "coronary_sr.dcm", "report.pdf", "report_pdf.dcm", "results.json"])
    assert set(names) <= set(OUTPUT_NAMES)
    assert not any(s.casefold() in n.casefold() for n in names for s in ("sentinel", "jürgen", SENTINEL_ID))


@pytest.mark.slow
def test_seg_geometry_and_calcium_positions_match_the_source(messy_run):
    explicit, out, _ = messy_run
    source = [pydicom.dcmread(p) for p in sorted(explicit.iterdir())]
    volume = build_volume(source)
    seg = pydicom.dcmread(out / "coronary_seg.dcm")
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == STUDY_UID and seg.PatientID == SENTINEL_ID
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced <= {ds.SOPInstanceUID for ds in source} and referenced
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in source[0].ImageOrientationPatient]
    )
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in source[0].PixelSpacing]
    )
    positions = {tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3)): ds.SOPInstanceUID for ds in source}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    inverse = np.linalg.inv(volume.affine_lps)
    calcium = 0
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        origin = tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        assert origin in positions  # each SEG frame lies on a source slice ...
        derivation = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID == positions[origin]  # ... and references that very slice
        for j, i in np.argwhere(frame):
            lps = np.asarray(origin) + volume.affine_lps[:3, 0] * i + volume.affine_lps[:3, 1] * j
            ii, jj, kk = np.rint(inverse @ [*lps, 1.0])[:3].astype(int)
            assert volume.hu[kk, jj, ii] >= 130  # the calcium is where the source shows >= 130 HU
            calcium += 1
    assert calcium > 0
