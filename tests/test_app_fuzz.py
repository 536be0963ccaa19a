"""Bounded fuzzing of the app's input side: loader, selector and volume builder (issue 7).

A valid six-slice cardiac series is mutated the ways broken exports and transfers break files: header elements
deleted, emptied or given arbitrary bytes (written raw, so the app's reader meets them exactly as a hospital
file would bring them), pixel data cut, padded or garbled, bytes of the file flipped, the file cut short, slices
dropped or repeated. Each mutated folder goes through what the app does with an input: the pre-flight header
read and selection, the full read, selection, the strict volume and, for a tilted series the ICA path would
take, the resampling. Only the app's documented errors may escape (``InputError`` from the loader,
``VolumeError`` from the builder); a volume that is built must be finite, with a finite invertible affine.

CI runs a fixed example count with a fixed seed (deterministic, a few seconds). Release checks run it longer:

    CALCIMAP_FUZZ_EXAMPLES=20000 CALCIMAP_FUZZ_SEED=<any int> .venv/bin/python -m pytest tests/test_app_fuzz.py

(``CALCIMAP_FUZZ_SEED`` defaults to the CI seed; change it to explore new inputs.) A failure prints the
mutation list, which reproduces it with the same seed and count.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement

from deploy_app import pipeline
from deploy_app.study import InputError, read_study
from deploy_app.volume import VolumeError, build_volume, untilt
from phantoms.dicom_series import derive_uid, write_ct_series
from phantoms.geometry import Grid
from phantoms.writers import SERIES_DESCRIPTIONS, STUDY_DESCRIPTIONS

EXAMPLES = int(os.environ.get("CALCIMAP_FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("CALCIMAP_FUZZ_SEED", "20260107"))
SHAPE = (6, 32, 32)
STUDY_UID = derive_uid("test-app-fuzz")
DOCUMENTED_ERRORS = (InputError, VolumeError)

# What the loader, selector and builder read, plus identity and text attributes that only pass through.
KEYWORDS = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "NumberOfFrames", "Modality", "SOPClassUID", "SOPInstanceUID",
    "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "InstanceNumber", "SeriesNumber", "KVP",
    "ConvolutionKernel", "SeriesDescription", "StudyDescription", "BodyPartExamined", "ImageType",
    "GantryDetectorTilt", "ContrastBolusAgent", "PatientName", "PatientID", "SpecificCharacterSet", "PixelData",
)  # fmt: skip

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(min_value=-(2**40), max_value=2**40),
)
_texts = st.one_of(
    st.lists(_numbers, max_size=8).map(lambda v: "\\".join(str(x) for x in v).encode()),
    st.sampled_from([b"", b" ", b"\\", b"\\\\\\", b"nan", b"inf", b"-0", b"1e400", b"CT", b"MR", b"MONOCHROME1"]),
    st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=48),
)
_targets = st.one_of(st.none(), st.integers(min_value=0, max_value=SHAPE[0] - 1))  # None: every file

header_mutation = st.tuples(
    st.just("header"), _targets, st.sampled_from(KEYWORDS), st.sampled_from(["delete", "empty", "raw"]), _texts
)
pixel_mutation = st.tuples(
    st.just("pixels"),
    _targets,
    st.sampled_from(["cut", "pad", "garble"]),
    st.integers(min_value=0, max_value=2 * SHAPE[1] * SHAPE[2]),
    st.binary(min_size=1, max_size=16),
)
file_mutation = st.tuples(
    st.just("file"),
    st.integers(min_value=0, max_value=SHAPE[0] - 1),
    st.sampled_from(["truncate", "flip", "drop", "repeat"]),
    st.integers(min_value=0, max_value=4000),
    st.integers(min_value=1, max_value=255),
)
mutations = st.lists(st.one_of(header_mutation, pixel_mutation, file_mutation), min_size=1, max_size=4)


class Files(list):
    """The valid series' file contents; a short repr, as hypothesis prints the test's arguments on a failure."""

    def __repr__(self) -> str:
        return f"<{len(self)} valid files>"


@pytest.fixture(scope="module")
def valid_series(tmp_path_factory) -> Files:
    """Six axial 32 x 32 slices the selector takes for the coronary path, as the bytes of their files."""
    k, j, i = np.indices(SHAPE)
    hu = (-1000 + 40 * i + 9 * j + 150 * k).astype(np.int16)
    out = tmp_path_factory.mktemp("fuzz") / "chest"
    tags = {
        "StudyDescription": STUDY_DESCRIPTIONS["chest"],
        "SeriesDescription": SERIES_DESCRIPTIONS["chest"],
        "BodyPartExamined": "HEART",
        "SliceThickness": 3.0,
        "ConvolutionKernel": "Qr36",
    }
    grid = Grid(SHAPE, 0.8, 3.0, (-12.8, -12.8, 40.0))
    series_uid = derive_uid(STUDY_UID, "chest")
    paths = write_ct_series(hu, grid, out, study_uid=STUDY_UID, series_uid=series_uid, series_number=2, tags=tags)
    assert pipeline.select(read_study(out))["coronary"] is not None  # the unmutated series is taken
    return Files(p.read_bytes() for p in paths)


def _set_raw(ds: pydicom.Dataset, keyword: str, action: str, value: bytes) -> None:
    tag = tag_for_keyword(keyword)
    if action == "delete":
        if tag in ds:
            del ds[tag]
        return
    vr = dictionary_VR(tag)
    vr = "OW" if keyword == "PixelData" else vr.split(" or ")[0]
    data = b"" if action == "empty" else value
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True, True, False)


def _mutate_pixels(ds: pydicom.Dataset, how: str, at: int, junk: bytes) -> None:
    if "PixelData" not in ds:
        return
    data = bytes(ds.PixelData or b"")  # an earlier step may have emptied it
    if how == "cut":
        data = data[: min(at, len(data))]
    elif how == "pad":
        data += junk * (1 + at % 7)
    else:
        at %= max(len(data), 1)
        data = data[:at] + junk + data[at + len(junk) :]
    ds.PixelData = data


def write_mutated(series: list[bytes], plan: list[tuple], folder: Path) -> None:
    """The series with ``plan`` applied, written into ``folder`` (file-level mutations after writing)."""
    if any(step[0] != "file" for step in plan):
        datasets = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(blob)) for blob in series]
    else:
        datasets = []
    for step in plan:
        if step[0] in ("header", "pixels"):
            targets = datasets if step[1] is None else [datasets[step[1]]]
            for ds in targets:
                if step[0] == "header":
                    _set_raw(ds, step[2], step[3], step[4])
                else:
                    _mutate_pixels(ds, step[2], step[3], step[4])
    blobs = [_encode(ds) for ds in datasets] if datasets else list(series)
    for step in plan:
        if step[0] != "file":
            continue
        _, index, how, at, byte = step
        index %= max(len(blobs), 1)
        if not blobs:
            break
        if how == "truncate":
            blobs[index] = blobs[index][: at % (len(blobs[index]) + 1)]
        elif how == "flip":
            blob = bytearray(blobs[index])
            blob[at % len(blob)] ^= byte
            blobs[index] = bytes(blob)
        elif how == "drop":
            blobs.pop(index)
        else:
            blobs.append(blobs[index])
    for n, blob in enumerate(blobs):
        (folder / f"f{n:03d}.dcm").write_bytes(blob)
    (folder / "notes.txt").write_text("an export always brings something else")


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def run_input_side(folder: Path) -> None:
    """What the app does with an input folder up to the models: raises only the documented errors."""
    study = read_study(folder, headers_only=True)  # pre-flight
    study.info()
    pipeline.select(study)
    study = read_study(folder)  # the graph's load stage
    study.info()
    for choice in pipeline.select(study).values():
        if choice is None:
            continue
        volume = build_volume(choice.datasets)
        assert volume.hu.ndim == 3 and volume.hu.shape[0] >= 2 and np.isfinite(volume.hu).all()
        assert np.isfinite(volume.affine_lps).all() and abs(np.linalg.det(volume.affine_lps)) > 0
        assert volume.increment_mm > 0 and 0 <= volume.tilt_deg < 90
        if choice.selection == "ica" and 0 < volume.tilt_deg <= 30:
            flat = untilt(volume)
            assert np.isfinite(flat.hu).all()


@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(plan=mutations)
def test_mutated_series_raise_only_documented_errors(valid_series, plan):
    with tempfile.TemporaryDirectory(prefix="calcimap-fuzz-") as tmp:
        write_mutated(valid_series, plan, Path(tmp))
        try:
            run_input_side(Path(tmp))
        except DOCUMENTED_ERRORS as e:
            assert str(e) and "\n" not in str(e)  # one sentence for the user


def test_unmutated_series_passes_through(valid_series, tmp_path):
    """The fuzz harness itself: with no mutation the series is read, selected and built."""
    write_mutated(valid_series, [], tmp_path)
    study = read_study(tmp_path)
    volume = build_volume(pipeline.select(study)["coronary"].datasets)
    assert volume.hu.shape == SHAPE and volume.increment_mm == pytest.approx(3.0)
