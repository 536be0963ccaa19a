"""What every DICOM object the app writes shares: the algorithm's identity, deterministic UIDs, content dates
taken from the source, the source series checks and the atomic file write."""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from deploy_app.volume import Frame, frames_in_slice_order

REPO_ROOT = Path(__file__).resolve().parents[1]
MANUFACTURER = "CalciMap"
_UID_SEPARATOR = "\x1f"  # keeps ("ab", "c") and ("a", "bc") apart, as in scripts/phantoms/dicom_series.py


@dataclass(frozen=True)
class Algorithm:
    """The algorithm that made the result, as written into SEG (Algorithm Identification) and SR (device)."""

    name: str  # DICOM LO: at most 64 characters
    version: str

    def __post_init__(self) -> None:
        for field_name in ("name", "version"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(f"algorithm {field_name} must be a non-empty LO string (<= 64 chars), got {value!r}")


def derive_uid(*parts: str) -> str:
    """A deterministic UID under pydicom's root: SHA-512 of the parts (the same parts give the same UID)."""
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError("derive_uid needs one or more non-empty str parts")
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[_UID_SEPARATOR.join(parts)]))


def check_source_series(datasets: Sequence[Dataset]) -> list[Frame]:
    """The planes of the source series in slice order, the order of the label map's k axis (ValueError otherwise).

    The source is either single-frame images of one series, given in slice order (increasing position along the
    slice normal, the order ``read_ct_series`` returns), or one multi-frame CT object, whose frames may be
    stored in any order: the label map follows :func:`deploy_app.volume.build_volume`'s k axis either way.
    """
    if not datasets:
        raise ValueError("no source datasets: pass the source series' datasets in slice order")
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword not in datasets[0]:
            raise ValueError(f"the source images have no {keyword}")
    series = {ds.SeriesInstanceUID for ds in datasets}
    if len(series) != 1:
        raise ValueError(f"the source images belong to {len(series)} series; pass one series")
    framed = [int(ds.get("NumberOfFrames", 1) or 1) != 1 or "PerFrameFunctionalGroupsSequence" in ds for ds in datasets]
    if any(framed) and (len(datasets) > 1 or "PerFrameFunctionalGroupsSequence" not in datasets[0]):
        raise ValueError(
            f"the series is {len(datasets)} object(s), {sum(framed)} of them multi-frame; the SEG, SR and Secondary "
            "Capture writers take single-frame slices or one multi-frame object with per-frame functional groups"
        )
    if any(framed):
        _check_multi_frame_groups(datasets[0])
    if len({ds.SOPInstanceUID for ds in datasets}) != len(datasets):
        raise ValueError("a source instance appears twice")
    frames = frames_in_slice_order(datasets)
    if len(datasets) > 1 and [f.dataset_index for f in frames] != list(range(len(datasets))):
        raise ValueError("the source images are not in slice order (increasing position along the slice normal)")
    normal = frames[0].normal  # one orientation: frames_in_slice_order checked it
    along = [float(f.position @ normal) for f in frames]
    if any(b <= a for a, b in zip(along, along[1:], strict=False)):
        raise ValueError("two source images lie at the same position along the slice normal")
    return frames


def _check_multi_frame_groups(ds: Dataset) -> None:
    """What highdicom's SEG needs of a multi-frame source: orientation and pixel spacing shared by every frame
    (Shared Functional Groups) and each frame's position in its own (Per-Frame) group."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    for keyword, what in (("PlaneOrientationSequence", "orientation"), ("PixelMeasuresSequence", "pixel spacing")):
        if keyword not in shared:
            raise ValueError(
                f"the multi-frame object gives its {what} per frame; the SEG writer needs it in the shared "
                "functional groups (export the series as single-frame CT images)"
            )
    if not all("PlanePositionSequence" in item for item in ds.PerFrameFunctionalGroupsSequence):
        raise ValueError("the multi-frame object gives no per-frame position (PlanePositionSequence) for some frames")


def source_datetime(source: Dataset) -> datetime.datetime:
    """Content date and time of an output, taken from the source series (series, else study date and time).

    Using the source's own date keeps a re-run byte-identical; the date of the output's creation is not
    recorded anywhere (InstanceCreationDate/Time, optional, are removed by :func:`make_deterministic`).
    """
    for date_kw, time_kw in (("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        date = str(source.get(date_kw) or "")
        if date:
            time = str(source.get(time_kw) or "000000").split(".")[0].ljust(6, "0")[:6]
            return datetime.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    raise ValueError("the source images have neither SeriesDate nor StudyDate; pass content_datetime")


def make_deterministic(ds: Dataset, when: datetime.datetime) -> None:
    """Replace what highdicom fills from the wall clock: drop InstanceCreationDate/Time (Type 3) and date
    highdicom's own Contributing Equipment item at ``when`` (the content date)."""
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def write_atomic(ds: Dataset, out_path: str | os.PathLike) -> Path:
    """Write ``ds`` as a DICOM file: into a hidden temporary sibling, fsync'ed, then renamed over ``out_path``.

    A reader never sees a half-written file and a failure leaves no partial file; an existing file at
    ``out_path`` is replaced (a re-run with the same UIDs overwrites instead of duplicating).
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"{out_path} is a directory; pass the path of the file to write")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(tmp, "wb") as fh:
            pydicom.dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path
