"""Write synthetic CT volumes as realistic, reproducible DICOM CT Image Storage series, and read them back.

``write_ct_series`` turns an integer HU volume indexed ``[k, j, i]`` on a :class:`~phantoms.geometry.Grid` into one
CT Image Storage file per slice (``IM00001.dcm``, ``IM00002.dcm``, ...) carrying complete Type 1/2 modules of the CT
Image IOD (Patient, General Study, General Series, Frame of Reference, General Equipment, General Image, Image Plane,
Image Pixel, CT Image, VOI LUT, SOP Common).

Conventions
-----------
* Pixels are stored unsigned (PixelRepresentation 0) with RescaleIntercept -1024 and RescaleSlope 1, as most scanners
  do. HU below -1024 cannot be represented and is clipped to -1024. With ``bits_stored=12`` (the default, as on most
  scanners) HU above 3071 is clipped to 3071; ``bits_stored=16`` keeps HU up to 64511 ("extended CT scale"). Clipping
  is logged as a warning; values inside the range round-trip exactly for every transfer syntax (all are lossless).
* Gantry tilt: ImageOrientationPatient is taken from the grid's cosines (so a tilted series is not axial, as scanners
  write it), GantryDetectorTilt is ``grid.tilt_deg`` and ImagePositionPatient follows ``grid.slice_positions()``
  (slices step along the table, not along the slice normal). SpacingBetweenSlices is not written: it is not part of
  the CT Image IOD and with tilt the table increment differs from the perpendicular plane spacing, so readers must
  use the positions. SliceLocation is the position projected on the slice normal (``row_cosine x col_cosine``),
  which for an untilted axial series is the table z.
* Everything is deterministic: defaults are fixed strings (no wall-clock dates), UIDs are derived by
  :func:`derive_uid` from the caller's study/series UIDs, and the same inputs give byte-identical files, including
  for JPEG 2000 and RLE.
* Files are written into a hidden temporary sibling folder that is renamed to ``out_dir`` at the end, so a reader
  never sees a half-written series.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    RE_VALID_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds, validate_value

from phantoms.geometry import Grid

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
}
# Pin the encoder so that the bytes do not depend on which optional plugins happen to be installed.
_ENCODING_PLUGIN: dict[UID, str] = {JPEG2000Lossless: "pylibjpeg", RLELossless: "pylibjpeg"}

RESCALE_INTERCEPT = -1024
_MAX_STORED = {12: 4095, 16: 65535}
# pylibjpeg-openjpeg always uses 6 DWT resolutions, which needs at least 2**5 pixels along each image side.
JPEG2000_MIN_SIDE = 32
_UID_SEPARATOR = "\x1f"  # ASCII unit separator: keeps ("ab", "c") and ("a", "bc") apart

# Defaults for every caller-overridable attribute; fixed strings only, never the wall clock.
DEFAULT_TAGS: dict[str, object] = {
    "PatientName": "CalciMap^Phantom",
    "PatientID": "CMPHANTOM0001",
    "PatientBirthDate": "19660101",
    "PatientSex": "O",
    "PatientAge": "060Y",
    "StudyDate": "20260101",
    "StudyTime": "090000",
    "ReferringPhysicianName": "",
    "StudyID": "1",
    "AccessionNumber": "",
    "StudyDescription": "CalciMap synthetic CT",
    "SeriesDescription": "Synthetic calcium scoring CT",
    "BodyPartExamined": "CHEST",
    "PatientPosition": "HFS",
    "PositionReferenceIndicator": "",
    "Manufacturer": "CalciMap",
    "ManufacturerModelName": "Synthetic CT",
    "InstitutionName": "CalciMap Phantom Lab",
    "DeviceSerialNumber": "CM0001",
    "SoftwareVersions": "calcimap-phantoms 1",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "AcquisitionNumber": 1,
    "KVP": "120",
    "ConvolutionKernel": "STANDARD",
    "XRayTubeCurrent": 200,
    "ExposureTime": 280,
    "Exposure": 56,
    "CTDIvol": 3.0,
    "WindowCenter": "40",
    "WindowWidth": "400",
}
# Dates/times that, unless given, follow the (possibly overridden) study date/time.
_FOLLOWS = {
    "SeriesDate": "StudyDate",
    "AcquisitionDate": "StudyDate",
    "ContentDate": "StudyDate",
    "SeriesTime": "StudyTime",
    "AcquisitionTime": "StudyTime",
    "ContentTime": "StudyTime",
}
# Attributes derived from the inputs (UIDs, geometry, pixel module): a caller may not override them.
_MANAGED = frozenset(
    {
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
        "FrameOfReferenceUID", "SeriesNumber", "InstanceNumber", "Modality", "ImagePositionPatient",
        "ImageOrientationPatient", "PixelSpacing", "SliceLocation", "GantryDetectorTilt", "SpacingBetweenSlices",
        "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "PixelData", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberOfFrames",
    }
)  # fmt: skip
# CTDIvol refers to the 32 cm body phantom unless the caller passes its own CTDIPhantomTypeCodeSequence.
_CTDI_BODY_PHANTOM = ("113691", "DCM", "IEC Body Dosimetry Phantom")
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def derive_uid(*parts: str) -> str:
    """A deterministic UID under pydicom's root ``1.2.826.0.1.3680043.8.498.``: SHA-512 of ``parts``.

    The parts are joined with an ASCII unit separator before hashing (pydicom would otherwise concatenate them, so
    that ``("ab", "c")`` and ``("a", "bc")`` would collide).
    """
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("derive_uid needs one or more str parts")
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[_UID_SEPARATOR.join(parts)]))


IMPLEMENTATION_CLASS_UID = derive_uid("CalciMap", "phantoms.dicom_series", "implementation")
IMPLEMENTATION_VERSION_NAME = "CALCIMAP_DS_1"


def _ds(value: float, decimals: int = 6) -> str:
    """A Decimal String for ``value`` rounded to ``decimals`` (no ``-0.0``, at most 16 characters)."""
    return format_number_as_ds(round(float(value), decimals) + 0.0)


def _check_inputs(
    volume_hu: np.ndarray, grid: Grid, transfer_syntax: str, bits_stored: int, series_number: int
) -> None:
    if not isinstance(volume_hu, np.ndarray) or volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must be a 3-D numpy array [k, j, i], got {getattr(volume_hu, 'shape', None)}")
    if not np.issubdtype(volume_hu.dtype, np.integer):
        raise ValueError(f"volume_hu must have an integer dtype (HU), got {volume_hu.dtype}")
    if tuple(volume_hu.shape) != tuple(grid.shape):
        raise ValueError(f"volume shape {volume_hu.shape} does not match grid shape {tuple(grid.shape)}")
    if min(volume_hu.shape) < 1:
        raise ValueError(f"volume_hu must not be empty, got shape {volume_hu.shape}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; choose one of {sorted(TRANSFER_SYNTAXES)}")
    if transfer_syntax == "jpeg2000" and min(volume_hu.shape[1:]) < JPEG2000_MIN_SIDE:
        raise ValueError(f"jpeg2000 needs images of at least {JPEG2000_MIN_SIDE} x {JPEG2000_MIN_SIDE} pixels "
                         f"(the encoder uses 6 wavelet resolutions), got {volume_hu.shape[1:]}")  # fmt: skip
    if bits_stored not in _MAX_STORED:
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    if not (grid.pixel_mm > 0 and grid.increment_mm > 0):
        raise ValueError(f"grid spacing must be positive, got pixel {grid.pixel_mm}, increment {grid.increment_mm}")
    if isinstance(series_number, bool) or not isinstance(series_number, int | np.integer) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")


def _check_uid(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 64 or not re.match(RE_VALID_UID, value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")


def _as_decimal_text(vr: str, value: object) -> object:
    """Numbers given for DS/IS attributes as the strings pydicom validates (DS rounded to 8 decimals)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return value
    if vr == "DS":
        return _ds(value, 8)
    if vr == "IS" and float(value).is_integer():
        return str(int(value))
    return value


def _validated(keyword: str, value: object) -> object:
    """``value`` checked against the VR of ``keyword``; numbers for DS become valid Decimal Strings."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword in tags: {keyword!r}")
    if keyword in _MANAGED:
        raise ValueError(f"{keyword} is derived from the inputs and cannot be overridden through tags")
    vr = dictionary_VR(tag)
    items = [_as_decimal_text(vr, v) for v in (value if isinstance(value, list | tuple) else [value])]
    value = items if isinstance(value, list | tuple) else items[0]
    for item in items:
        try:
            validate_value(vr, item, config.RAISE)
        except ValueError as exc:
            raise ValueError(f"invalid value {item!r} for {keyword} (VR {vr}): {exc}") from exc
    return value


def _resolve_tags(tags: Mapping[str, object], grid: Grid) -> dict[str, object]:
    """Defaults, grid-derived values and date followers, overridden by the caller's ``tags`` (validated)."""
    attrs: dict[str, object] = dict(DEFAULT_TAGS)
    attrs["SliceThickness"] = _ds(grid.increment_mm)
    attrs["ReconstructionDiameter"] = _ds(grid.pixel_mm * grid.shape[2])
    attrs.update({keyword: _validated(keyword, value) for keyword, value in tags.items()})
    for keyword, source in _FOLLOWS.items():
        attrs.setdefault(keyword, attrs[source])
    return attrs


def _is_non_ascii(value: object) -> bool:
    items = value if isinstance(value, list | tuple) else [value]
    return any(not str(item).isascii() for item in items if item is not None)


def _character_set(attrs: Mapping[str, object]) -> str:
    """ISO_IR 100 for plain ASCII text, ISO_IR 192 (UTF-8) as soon as any text value is non-ASCII."""
    for keyword, value in attrs.items():
        if dictionary_VR(tag_for_keyword(keyword)) in _TEXT_VRS and _is_non_ascii(value):
            return "ISO_IR 192"
    return "ISO_IR 100"


def _stored_pixels(volume_hu: np.ndarray, bits_stored: int) -> np.ndarray:
    """HU -> stored unsigned values (HU + 1024), clipped to what ``bits_stored`` bits can hold."""
    low, high = RESCALE_INTERCEPT, _MAX_STORED[bits_stored] + RESCALE_INTERCEPT
    hu = volume_hu.astype(np.int64)
    n_clipped = int(np.count_nonzero((hu < low) | (hu > high)))
    if n_clipped:
        logger.warning("clipping %d voxels to the storable HU range [%d, %d] (bits_stored %d)",
                       n_clipped, low, high, bits_stored)  # fmt: skip
    return (np.clip(hu, low, high) - RESCALE_INTERCEPT).astype("<u2")


def _identity_attributes(study_uid: str, series_uid: str, series_number: int) -> dict[str, object]:
    """UIDs and numbers that tie the slices to their study, series and frame of reference."""
    return {
        "SOPClassUID": CTImageStorage,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": derive_uid(study_uid, "for"),
        "SeriesNumber": int(series_number),
        "Modality": "CT",
    }


def _image_attributes(grid: Grid, bits_stored: int) -> dict[str, object]:
    """Image Plane and Image Pixel attributes shared by all slices (positions are per slice)."""
    return {
        "ImageOrientationPatient": [_ds(c, 10) for c in (*grid.row_cosine, *grid.col_cosine)],
        "PixelSpacing": [_ds(grid.pixel_mm, 8), _ds(grid.pixel_mm, 8)],
        "GantryDetectorTilt": _ds(grid.tilt_deg),
        "Rows": int(grid.shape[1]),
        "Columns": int(grid.shape[2]),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": bits_stored,
        "HighBit": bits_stored - 1,
        "PixelRepresentation": 0,
        "RescaleIntercept": str(RESCALE_INTERCEPT),
        "RescaleSlope": "1",
        "RescaleType": "HU",
    }


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _slice_normal(row_cosine: Iterable[float], col_cosine: Iterable[float]) -> np.ndarray:
    return np.cross(np.asarray(list(row_cosine), dtype=float), np.asarray(list(col_cosine), dtype=float))


def _slice_dataset(common: Mapping[str, object], index: int, position: np.ndarray, normal: np.ndarray) -> Dataset:
    """The dataset of slice ``index`` (0-based) without pixel data and file meta."""
    ds = Dataset()
    for keyword, value in common.items():
        setattr(ds, keyword, copy.deepcopy(value) if dictionary_VR(tag_for_keyword(keyword)) == "SQ" else value)
    if "CTDIPhantomTypeCodeSequence" not in ds:
        ds.CTDIPhantomTypeCodeSequence = [_code_item(*_CTDI_BODY_PHANTOM)]
    ds.SOPInstanceUID = derive_uid(str(common["SeriesInstanceUID"]), "instance", str(index + 1))
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(np.dot(position, normal)))
    return ds


def _set_pixel_data(ds: Dataset, stored: np.ndarray, ts_uid: UID) -> None:
    if ts_uid == ExplicitVRLittleEndian:
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype="<u2").tobytes())
    else:
        ds.compress(ts_uid, stored, encoding_plugin=_ENCODING_PLUGIN[ts_uid], generate_instance_uid=False)


def _set_file_meta(ds: Dataset, ts_uid: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


def _temporary_sibling(out_dir: Path, tag: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to replace it")


def _commit(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp_dir`` to ``out_dir``, replacing an existing folder only when ``overwrite``."""
    _check_destination(out_dir, overwrite)
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    old = _temporary_sibling(out_dir, "old")
    out_dir.rename(old)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)


def _write_slices(
    tmp_dir: Path, stored: np.ndarray, grid: Grid, common: Mapping[str, object], ts_uid: UID
) -> list[str]:
    normal = _slice_normal(grid.row_cosine, grid.col_cosine)
    names = []
    for index, position in enumerate(grid.slice_positions()):
        ds = _slice_dataset(common, index, position, normal)
        _set_pixel_data(ds, stored[index], ts_uid)
        _set_file_meta(ds, ts_uid)
        name = f"IM{index + 1:05d}.dcm"
        pydicom.dcmwrite(tmp_dir / name, ds, enforce_file_format=True)
        names.append(name)
    return names


def write_ct_series(
    volume_hu: np.ndarray,
    grid: Grid,
    out_dir: Path,
    *,
    study_uid: str,
    series_uid: str,
    series_number: int,
    tags: Mapping[str, object] | None = None,
    transfer_syntax: str = "explicit",
    bits_stored: int = 12,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume_hu`` ([k, j, i], integer HU on ``grid``) as a CT series, one file per slice, into ``out_dir``.

    ``tags`` maps DICOM keywords to values that override :data:`DEFAULT_TAGS` (patient, study, series, equipment
    and acquisition attributes); attributes derived from the inputs (UIDs, geometry, pixel module) cannot be
    overridden. ``transfer_syntax`` is a key of :data:`TRANSFER_SYNTAXES`. ``bits_stored`` (12 or 16) sets the
    storable HU range, see the module docstring. Raises ``ValueError`` for bad inputs and ``FileExistsError`` if
    ``out_dir`` exists and ``overwrite`` is false. Returns the written files in instance order.
    """
    _check_inputs(volume_hu, grid, transfer_syntax, bits_stored, series_number)
    _check_uid("study_uid", study_uid)
    _check_uid("series_uid", series_uid)
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    attrs = _resolve_tags(tags or {}, grid)
    common = {
        "SpecificCharacterSet": _character_set(attrs),
        **attrs,
        **_identity_attributes(study_uid, series_uid, series_number),
        **_image_attributes(grid, bits_stored),
    }
    stored = _stored_pixels(volume_hu, bits_stored)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = _temporary_sibling(out_dir, "partial")
    tmp_dir.mkdir()
    try:
        names = _write_slices(tmp_dir, stored, grid, common, ts_uid)
        _commit(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %d %s slices of series %s to %s", len(names), transfer_syntax, series_number, out_dir)
    return [out_dir / name for name in names]


def _read_datasets(folder: Path) -> list[Dataset]:
    """All CT Image Storage datasets in ``folder`` (hidden files and non-DICOM files are skipped)."""
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            logger.warning("skipping %s: not a DICOM file", path)
            continue
        # Some real exports leave SOPClassUID empty and keep it only in the file meta information.
        sop_class = ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
        if sop_class != CTImageStorage:
            logger.warning("skipping %s: not CT Image Storage", path)
            continue
        datasets.append(ds)
    if not datasets:
        raise ValueError(f"no CT Image Storage files in {folder}")
    return datasets


def _check_consistent(datasets: list[Dataset]) -> None:
    first = datasets[0]
    for ds in datasets[1:]:
        for keyword in ("SeriesInstanceUID", "Rows", "Columns"):
            if ds.get(keyword) != first.get(keyword):
                raise ValueError(f"{keyword} differs between slices: {ds.get(keyword)} vs {first.get(keyword)}")
        for keyword in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose(np.asarray(ds[keyword].value, float), np.asarray(first[keyword].value, float)):
                raise ValueError(f"{keyword} differs between slices")


def _slice_step(positions: np.ndarray, first: Dataset, normal: np.ndarray) -> tuple[float, tuple[float, ...]]:
    """(increment_mm, unit slice step direction) from sorted positions; a single slice steps along the table z."""
    if len(positions) == 1:
        return float(first.get("SliceThickness") or 1.0), (0.0, 0.0, 1.0)
    steps = np.diff(positions, axis=0)
    mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.dot(mean_step, normal) <= 0 or np.abs(steps - mean_step).max() > 1e-3:
        raise ValueError("slice positions are duplicated or not evenly spaced")
    increment = float(np.linalg.norm(mean_step))
    return increment, tuple(float(v) for v in mean_step / increment)


def _grid_from_datasets(datasets: list[Dataset], positions: np.ndarray) -> Grid:
    first = datasets[0]
    iop = [float(v) for v in first.ImageOrientationPatient]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if abs(row_spacing - col_spacing) > 1e-6:
        raise ValueError(f"non-square pixels {row_spacing} x {col_spacing} are not supported by Grid")
    increment, step_dir = _slice_step(positions, first, _slice_normal(iop[:3], iop[3:]))
    return Grid(
        shape=(len(datasets), int(first.Rows), int(first.Columns)),
        pixel_mm=row_spacing,
        increment_mm=increment,
        origin=tuple(float(v) for v in positions[0]),
        row_cosine=tuple(iop[:3]),
        col_cosine=tuple(iop[3:]),
        slice_step_dir=step_dir,
    )


def _to_hu(ds: Dataset) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return (ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def read_ct_series(folder: Path) -> tuple[np.ndarray, Grid, list[pydicom.Dataset]]:
    """Read a single CT series from ``folder``: (HU float32 [k, j, i], its Grid, the datasets in slice order).

    Slices are sorted by their position along the slice normal, whatever the file names; the grid's increment and
    slice step direction come from the positions (so a tilted series gives back the table-feed step).
    """
    datasets = _read_datasets(Path(folder))
    _check_consistent(datasets)
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    normal = _slice_normal(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    grid = _grid_from_datasets(datasets, positions)
    volume = np.stack([_to_hu(ds) for ds in datasets])
    return volume, grid, datasets
