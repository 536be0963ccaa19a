"""The input folder as one DICOM study: every file read once, checked, and grouped by series.

The app takes one study per run (a PACS pipeline hands it one study at a time). Hospitals send everything, so
files that are not DICOM at all (no "DICM" header: notes, viewers, thumbnails) and media directories (DICOMDIR,
by name or by SOP class) are left out and logged, never fatal. What a user can get wrong here ends in
:class:`InputError` with one sentence: a folder that does not exist, is empty or holds no DICOM file; a file that
starts as DICOM but cannot be read, is cut short, or holds an element whose value cannot be decoded (it may hold a
slice of the series to score, so it is not silently dropped); an image without its study or series UID; several
studies in one folder; no image at all. A CT image file without pixel data is kept in its series for the volume
builder to name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.datadict
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

SKIPPED_NAMES = {"DICOMDIR"}  # a media directory, not an image
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR by another name)
IMAGE_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image Storage: an instance of these without pixel data
# is a broken slice, kept so that the volume builder names it (dropping it would read as a missing slice).
CT_IMAGE_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)


class InputError(ValueError):
    """The input folder cannot be used as a study; the message says why."""


@dataclass(frozen=True)
class Study:
    study_uid: str
    series: Mapping[str, tuple[Dataset, ...]]  # series UID -> its instances (file order)
    files: int
    skipped: tuple[str, ...] = field(default_factory=tuple)  # files left out, and why

    @property
    def first(self) -> Dataset:
        return next(iter(self.series.values()))[0]

    def info(self) -> dict[str, str]:
        """Patient and study facts for the reports (strings, "" where absent)."""
        ds = self.first
        keys = {
            "patient_name": "PatientName",
            "patient_id": "PatientID",
            "patient_sex": "PatientSex",
            "patient_birth_date": "PatientBirthDate",
            "study_date": "StudyDate",
            "study_time": "StudyTime",
            "accession_number": "AccessionNumber",
            "study_description": "StudyDescription",
            "institution_name": "InstitutionName",
        }
        return {"study_uid": self.study_uid, **{k: str(ds.get(kw, "") or "") for k, kw in keys.items()}}


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _uid(ds: Dataset, keyword: str, path: Path) -> str:
    """A UID of ``ds`` as text ("" when absent); a value pydicom cannot even convert makes the file unreadable."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception as e:  # a malformed raw element is converted (and fails) only when accessed
        raise InputError(f"{path} is not readable DICOM ({keyword}: {type(e).__name__}: {e})") from None


def _check_complete(ds: Dataset, path: Path) -> None:
    """Raise when the last element read is shorter than its declared length: the file was cut short.

    pydicom reads a truncated file without complaint, keeping what it got; a cut inside a value (usually the pixel
    data, the last element) is visible as a value shorter than its length field. A cut between elements only loses
    the rest, which the checks of what is missing (UIDs, pixel data) then report.
    """
    if not len(ds):
        return
    tag = next(reversed(ds.keys()))
    raw = ds.get_item(tag)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
        raise InputError(
            f"{path} is truncated: it ends inside {raw.tag} after {len(value)} of {length} bytes; copy it again"
        )


def _check_elements(ds: Dataset, path: Path) -> None:
    """Decode every element now (recursing into sequences), so that a malformed one is an :class:`InputError`
    naming the file and the element here, instead of an obscure failure wherever it is first read.

    pydicom decodes lazily, on first access; values merely out of the standard's rules (an over-long IS) only warn,
    but a value it cannot decode at all (a US element of 3 bytes) raises, of many types.
    """
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            items = element.value if element.VR == "SQ" else ()
        except Exception as e:  # pydicom raises many types for undecodable values
            keyword = ds.get_item(tag).tag
            name = pydicom.datadict.keyword_for_tag(keyword) or "private element"
            raise InputError(
                f"{path} is not readable DICOM: {name} {keyword} cannot be decoded ({type(e).__name__}); "
                "export the file again"
            ) from None
        for item in items:
            _check_elements(item, path)


def _is_media_directory(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    classes = {str(ds.get("SOPClassUID", "") or ""), str(meta.get("MediaStorageSOPClassUID", "") or "") if meta else ""}
    return MEDIA_DIRECTORY_SOP_CLASS in classes or "DirectoryRecordSequence" in ds


def read_study(folder: str | Path, *, headers_only: bool = False) -> Study:
    """Read every DICOM file under ``folder`` (recursively; hidden files and folders are left out).

    Files that are not DICOM and DICOMDIRs are left out (listed in ``Study.skipped`` and logged at INFO); see
    the module docstring for what raises :class:`InputError`. ``headers_only`` stops before the pixel data (the
    quick check of the input before the app's graph runs); it then cannot tell images from non-image objects,
    and keeps every series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist or is not a folder")
    files = _candidate_files(folder)
    if not files:
        raise InputError(f"input folder {folder} is empty")
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    skipped = []
    dicom_files = images = 0
    for path in files:
        name = str(path.relative_to(folder))
        if path.name.upper() in SKIPPED_NAMES:
            skipped.append(f"{name}: a DICOMDIR (media directory)")
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError:
            skipped.append(f"{name}: not a DICOM file (no DICOM header)")
            continue
        except Exception as e:  # truncated or otherwise corrupt: pydicom raises many types
            raise InputError(f"{path} is not readable DICOM ({type(e).__name__}: {e}); remove or replace it") from None
        dicom_files += 1
        _check_complete(ds, path)
        _check_elements(ds, path)
        if _is_media_directory(ds):
            skipped.append(f"{name}: a DICOMDIR (media directory)")
            continue
        study_uid = _uid(ds, "StudyInstanceUID", path)
        series_uid = _uid(ds, "SeriesInstanceUID", path)
        if not study_uid or not series_uid:
            raise InputError(
                f"{path} has no StudyInstanceUID or SeriesInstanceUID, so its study and series are unknown "
                "(a truncated file, or an export that removed the UIDs); export the study again"
            )
        has_pixels = any(k in ds for k in IMAGE_PIXEL_KEYWORDS)
        images += has_pixels
        if not headers_only and not has_pixels and _uid(ds, "SOPClassUID", path) not in CT_IMAGE_SOP_CLASSES:
            skipped.append(f"{name}: no pixel data ({ds.get('Modality', '?')} {ds.get('SOPClassUID', '')})")
            continue
        by_study.setdefault(study_uid, {}).setdefault(series_uid, []).append(ds)
    for reason in skipped:
        logger.info("left out %s", reason)
    if not dicom_files:
        raise InputError(
            f"no DICOM files in {folder} ({len(files)} file(s), none of them DICOM: "
            f"{', '.join(s.split(':')[0] for s in skipped[:3])}{', ...' if len(skipped) > 3 else ''})"
        )
    if not by_study or (not headers_only and not images):
        raise InputError(f"no DICOM images in {folder} ({len(files)} files, none with pixel data)")
    if len(by_study) > 1:
        raise InputError(f"{folder} holds {len(by_study)} studies; give the app one study per run")
    ((study_uid, series),) = by_study.items()
    logger.info(
        "read %d files: study %s, %d series, %d file(s) left out", len(files), study_uid, len(series), len(skipped)
    )
    return Study(
        study_uid=study_uid,
        series={uid: tuple(instances) for uid, instances in series.items()},
        files=len(files),
        skipped=tuple(skipped),
    )
