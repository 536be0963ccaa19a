"""Writing a generated case to disk: NIfTI volumes, truth.json and (optionally) a DICOM CT series."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from .case import Case
from .dicom_series import derive_uid, write_ct_series
from .geometry import Grid

SERIES_DESCRIPTIONS = {"chest": "Cardiac Ca Score 3.0 non-contrast", "head": "Head non-contrast"}
STUDY_DESCRIPTIONS = {"chest": "CT Heart Calcium Score", "head": "CT Head without contrast"}


def to_nifti(array: np.ndarray, grid: Grid) -> nib.Nifti1Image:
    """Array [k, j, i] on ``grid`` -> NIfTI (i, j, k) with the RAS affine (sheared for gantry tilt)."""
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), grid.affine_ras())
    img.header.set_xyzt_units("mm")
    img.set_sform(grid.affine_ras(), code=1)
    if abs(grid.tilt_deg) < 1e-6:
        img.set_qform(grid.affine_ras(), code=1)
    else:  # a qform cannot hold a shear: only the sform describes tilted geometry
        img.set_qform(None, code=0)
    return img


def study_uids(case: Case, study_key: str | None = None) -> tuple[str, str]:
    """Study and series UIDs derived from the case (and an optional shared study key)."""
    study = derive_uid("calcimap-phantom", study_key or case.case_id, "study")
    return study, derive_uid(study, case.case_id, "series")


def write_case(
    case: Case,
    out_dir: Path,
    *,
    dicom: bool,
    transfer_syntax: str = "explicit",
    study_key: str | None = None,
    series_number: int = 1,
    study_tags: Mapping[str, object] | None = None,
) -> Path:
    """Write one case into ``out_dir/<case_id>/`` atomically (a temporary folder renamed at the end).

    ``study_key`` and ``study_tags`` (patient and study attributes overriding the case's) put several cases into
    one study, e.g. a chest and a head series of one patient (``scripts/make_study.py``).
    """
    final = out_dir / case.case_id
    tmp = out_dir / f".{case.case_id}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, array in case.arrays.items():
            nib.save(to_nifti(array, case.grid), tmp / f"{name}.nii.gz")
        truth = dict(case.truth)
        if dicom:
            study_uid, series_uid = study_uids(case, study_key)
            tags = {
                **case.tags,
                "StudyDescription": STUDY_DESCRIPTIONS.get(case.kind, "CT"),
                "SeriesDescription": SERIES_DESCRIPTIONS.get(case.kind, "CT"),
                "AccessionNumber": case.case_id.replace("_", "")[-16:],
                **(study_tags or {}),
            }
            write_ct_series(
                case.arrays["image"],
                case.grid,
                tmp / "dicom",
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series_number,
                tags=tags,
                transfer_syntax=transfer_syntax,
            )
            truth["dicom"] = {"study_uid": study_uid, "series_uid": series_uid, "transfer_syntax": transfer_syntax}
        (tmp / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
