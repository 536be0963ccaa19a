"""The input folder as one DICOM study: every file read once, checked, and grouped by series.

The app takes one study per run (a PACS pipeline hands it one study at a time). What a user can get wrong here
ends in :class:`InputError` with one sentence: a folder that does not exist or holds no DICOM files, a file
that is not readable DICOM, several studies in one folder, or no CT image at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

SKIPPED_NAMES = {"DICOMDIR"}  # a media directory, not an image
IMAGE_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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


def read_study(folder: str | Path, *, headers_only: bool = False) -> Study:
    """Read every DICOM file under ``folder`` (recursively; hidden files and folders are left out).

    ``headers_only`` stops before the pixel data (the quick check of the input before the app's graph runs);
    it then cannot tell images from non-image objects, and keeps every series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist or is not a folder")
    files = _candidate_files(folder)
    if not files:
        raise InputError(f"input folder {folder} is empty")
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    skipped = []
    for path in files:
        if path.name in SKIPPED_NAMES:
            skipped.append(f"{path.name}: a DICOMDIR")
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError:
            raise InputError(f"{path} is not a DICOM file (no DICOM header); remove it from the input") from None
        except Exception as e:  # truncated or otherwise corrupt: pydicom raises many types
            raise InputError(f"{path} is not readable DICOM ({type(e).__name__}: {e})") from None
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not study_uid or not series_uid:
            raise InputError(f"{path} has no StudyInstanceUID or SeriesInstanceUID")
        if not headers_only and not any(k in ds for k in IMAGE_PIXEL_KEYWORDS):
            skipped.append(f"{path.name}: no pixel data ({ds.get('Modality', '?')} {ds.get('SOPClassUID', '')})")
            continue
        by_study.setdefault(study_uid, {}).setdefault(series_uid, []).append(ds)
    if not by_study:
        raise InputError(f"no DICOM images in {folder} ({len(files)} files, none with pixel data)")
    if len(by_study) > 1:
        raise InputError(f"{folder} holds {len(by_study)} studies; give the app one study per run")
    ((study_uid, series),) = by_study.items()
    for reason in skipped:
        logger.info("left out %s", reason)
    logger.info("read %d files: study %s, %d series", len(files), study_uid, len(series))
    return Study(
        study_uid=study_uid,
        series={uid: tuple(instances) for uid, instances in series.items()},
        files=len(files),
        skipped=tuple(skipped),
    )
