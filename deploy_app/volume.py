"""CT volumes from DICOM with a strict geometry check, for single-frame series and multi-frame CT alike.

Why our own builder: the SDK's ``DICOMSeriesToVolumeOperator`` silently returns a wrong spacing when a slice is
missing, drops slices without position tags and cannot read multi-frame CT (DESIGN.md, known traps). highdicom
0.28.2 (``get_volume_from_series``, ``Image.get_volume``) checks regularity, but only for slices stacked along
their normal: a gantry-tilted series and a series with a missing slice both end in the same "Series is not a
regularly-spaced volume.", which tells a user neither what nor where. Here one implementation serves both
encodings: every slice or frame becomes a ``Frame`` (position, orientation, pixel spacing, rescale), read from
the instance (single-frame CT Image) or from the functional groups (Enhanced CT, Legacy Converted Enhanced CT),
and one check accepts or rejects the stack with a sentence naming the series and the fault.

Conventions: ``hu`` is float32 ``[k, j, i]`` (slice, row, column), slices in increasing position along the slice
normal ``n = row cosine x column cosine``. ``affine_lps`` maps ``(i, j, k, 1)`` to the LPS position of a voxel
centre; its k column is the real step between slice origins (the table feed), which for a gantry-tilted series
is not parallel to ``n`` (a sheared affine), exactly as ``phantoms.geometry.Grid`` describes it.
``increment_mm`` is the distance between slice planes along ``n`` (table feed x cos(tilt)), the spacing the
scorer's voxel volume and Agatston increment factor need. :func:`untilt` resamples a tilted volume onto an
orthogonal grid; :func:`superior_up` reverses the slices of a series whose normal points to the feet (e.g. an
orientation of 1\\0\\0\\0\\-1\\0), for the quality checks and regions of interest, which read k = 0 as the
inferior end.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from scipy import ndimage

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AIR_HU = -1024.0  # fill value outside the acquired slab after resampling
# Slice spacing tolerance: max(1 % of the increment, 0.01 mm). Positions are written with >= 3 decimals, so
# rounding moves a difference by <= 0.001 mm, and real table positions jitter by well under 0.01 mm; 1 % of the
# increment changes Agatston's increment factor and the voxel volume by 1 %, well below inter-scan variability,
# while a single missing slice is a 100 % error and overlapping reconstructions (3 mm every 2 mm) are regular.
# highdicom's default relative tolerance is the same 1 %.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.01
# Direction cosines: DICOM writers round them (often to 6 decimals, some to 4 or 5); 1e-3 accepts that rounding
# and still rejects a corrupted or hand-edited orientation. Equality between slices is checked at 1e-4, as the
# SDK's selector does for unit length.
ORTHONORMAL_TOL = 1e-3
SAME_ORIENTATION_TOL = 1e-4
NO_TILT_DEG = 0.01  # below this a series counts as untilted (positions rounded to 1e-6 give ~1e-4 deg)
TILT_TAG_MISMATCH_DEG = 0.5
# Memory budget of one series' HU volume (float32), checked from the headers before any pixel is decoded. The
# default, 1024 MB, is ~1000 slices of 512 x 512 (a 0.6 mm chest CT has ~600): enough for any series the app is
# meant for, and within the MAP's 4 GiB (app.yaml) with the study's pixel data, the model inputs and the outputs.
MAX_VOLUME_MB_ENV = "CALCIMAP_MAX_VOLUME_MB"
DEFAULT_MAX_VOLUME_MB = 1024.0


class VolumeError(ValueError):
    """A series that cannot be turned into a volume; the message names the series and the fault."""


def max_volume_mb() -> float:
    """The series memory budget in MB: ``$CALCIMAP_MAX_VOLUME_MB`` (set by ``--max-volume-mb``) or the default."""
    text = os.environ.get(MAX_VOLUME_MB_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOLUME_MB
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise VolumeError(f"{MAX_VOLUME_MB_ENV}={text!r} is not a positive number of megabytes")
    return value


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in HU with its patient geometry and source instances (see the module docstring)."""

    hu: np.ndarray  # float32 [k, j, i], HU after rescale, slices in increasing position along the normal
    affine_lps: np.ndarray  # 4x4: (i, j, k, 1) -> LPS mm of the voxel centre; k column = real slice step
    datasets: tuple[Dataset, ...]  # source instances in slice order (a multi-frame object: the one dataset)
    series_uid: str
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing) = DICOM PixelSpacing
    increment_mm: float  # distance between consecutive slice planes along the slice normal
    thickness_mm: float | None  # SliceThickness (nominal), None when absent
    tilt_deg: float  # angle between the slice step and the slice normal (gantry tilt); 0 when untilted

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """(increment, row spacing, column spacing) in mm, in the order of the array axes."""
        return (self.increment_mm, *self.pixel_spacing_mm)

    @property
    def scoring_spacing(self) -> tuple[float, float, float]:
        """(row_mm, col_mm, increment_mm): the ``spacing`` argument of ``scoring.score_calcium``."""
        return (*self.pixel_spacing_mm, self.increment_mm)

    def affine_ras(self) -> np.ndarray:
        """RAS affine of the array ``hu.transpose(2, 1, 0)`` (indexed i, j, k), as NIfTI and MONAI use it.

        Identical to ``phantoms.geometry.Grid.affine_ras`` (which ``phantoms.writers.to_nifti`` writes as the
        sform): the LPS affine with its x and y rows negated.
        """
        return LPS_TO_RAS @ self.affine_lps


@dataclass(frozen=True)
class Frame:
    """One image plane of the series, from a single-frame instance or one frame of a multi-frame object."""

    dataset_index: int  # into the datasets given to frames_in_slice_order / build_volume
    frame_index: int | None  # 0-based frame of a multi-frame object; None for a single-frame instance
    position: np.ndarray  # ImagePositionPatient (3,)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    thickness: float | None
    name: str  # for messages: "instance 12" or "frame 3 of instance 1"

    @property
    def normal(self) -> np.ndarray:
        """The unit slice normal, row cosine x column cosine."""
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        return normal / np.linalg.norm(normal)


def _fmt(mm: float) -> str:
    """A length for a message: up to 3 decimals, at least one ("6.0", "2.5", "0.625")."""
    text = f"{mm:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _series_name(ds: Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
    number = ds.get("SeriesNumber")
    return f"series {number} ({uid})" if number not in (None, "") else f"series {uid}"


def _instance_name(ds: Dataset, index: int) -> str:
    number = ds.get("InstanceNumber")
    return f"instance {number}" if number not in (None, "") else f"file {index + 1} (no InstanceNumber)"


def _floats(value: object, n: int, what: str, where: str, series: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{series}: {where} has an unreadable {what} {value!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{series}: {where} has {what} {list(arr)}, expected {n} finite numbers")
    return arr


def _rescale(item: Dataset | None, where: str, series: str) -> tuple[float, float]:
    if item is None:
        return 1.0, 0.0
    if "ModalityLUTSequence" in item:
        raise VolumeError(f"{series}: {where} uses a Modality LUT instead of rescale slope/intercept (not supported)")
    try:  # absent or empty: the identity; a recorded 0 stays 0 and is refused below
        slope, intercept = (
            float(default if item.get(key) in (None, "") else item.get(key))
            for key, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))
        )
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{series}: {where} has an unreadable rescale slope or intercept") from exc
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise VolumeError(f"{series}: {where} has rescale slope {slope:g} and intercept {intercept:g}, not HU")
    return slope, intercept


def _thickness(item: Dataset | None) -> float | None:
    value = item.get("SliceThickness") if item is not None else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _single_frame(ds: Dataset, index: int, series: str) -> Frame:
    name = _instance_name(ds, index)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if not ds.get(keyword):
            raise VolumeError(f"{series}: {name} has no {keyword}, so its place in the volume is unknown")
    slope, intercept = _rescale(ds, name, series)
    return Frame(
        dataset_index=index,
        frame_index=None,
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name, series),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name, series),
        pixel_spacing=tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing", name, series)),  # type: ignore[arg-type]
        slope=slope,
        intercept=intercept,
        thickness=_thickness(ds),
        name=name,
    )


def _group_item(frame_groups: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of functional group ``keyword``: per-frame if present there, else shared."""
    for container in (frame_groups, shared):
        if container is not None and keyword in container and len(container[keyword].value) > 0:
            return container[keyword].value[0]
    return None


def _multi_frames(ds: Dataset, index: int, series: str) -> list[Frame]:
    """The frames of an Enhanced / Legacy Converted Enhanced CT object, geometry from its functional groups."""
    instance = _instance_name(ds, index)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = _int(ds, "NumberOfFrames", 1, instance, series)
    if len(per_frame) != n_frames:
        raise VolumeError(
            f"{series}: {instance} has {n_frames} frames but {len(per_frame)} per-frame functional group items"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    frames = []
    for f, groups in enumerate(per_frame):
        name = f"frame {f + 1} of {instance}"
        plane = _group_item(groups, shared, "PlanePositionSequence")
        orient = _group_item(groups, shared, "PlaneOrientationSequence")
        measures = _group_item(groups, shared, "PixelMeasuresSequence")
        if plane is None or not plane.get("ImagePositionPatient"):
            raise VolumeError(f"{series}: {name} has no ImagePositionPatient, so its place in the volume is unknown")
        if orient is None or not orient.get("ImageOrientationPatient"):
            raise VolumeError(f"{series}: {name} has no ImageOrientationPatient")
        if measures is None or not measures.get("PixelSpacing"):
            raise VolumeError(f"{series}: {name} has no PixelSpacing")
        transform = _group_item(groups, shared, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, name, series)
        frames.append(
            Frame(
                dataset_index=index,
                frame_index=f,
                position=_floats(plane.ImagePositionPatient, 3, "ImagePositionPatient", name, series),
                orientation=_floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient", name, series),
                pixel_spacing=tuple(_floats(measures.PixelSpacing, 2, "PixelSpacing", name, series)),  # type: ignore[arg-type]
                slope=slope,
                intercept=intercept,
                thickness=_thickness(measures),
                name=name,
            )
        )
    return frames


def _is_multi_frame(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _int(ds: Dataset, keyword: str, default: int | None, where: str, series: str) -> int | None:
    """An integer attribute (``default`` when absent or empty); an unreadable value is the series' fault."""
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise VolumeError(f"{series}: {where} has an unreadable {keyword}") from exc


def _check_budget(datasets: Sequence[Dataset], series: str) -> None:
    """Refuse a series whose float32 HU volume would exceed :func:`max_volume_mb`, before decoding anything."""
    first = datasets[0]
    rows = _int(first, "Rows", 0, _instance_name(first, 0), series) or 0
    cols = _int(first, "Columns", 0, _instance_name(first, 0), series) or 0
    frames = sum(_int(ds, "NumberOfFrames", 1, _instance_name(ds, i), series) or 1 for i, ds in enumerate(datasets))
    megabytes = frames * rows * cols * 4 / 2**20
    budget = max_volume_mb()
    if megabytes > budget:
        raise VolumeError(
            f"{series}: {frames} slices of {rows} x {cols} make a {megabytes:,.0f} MB volume, more than the "
            f"{budget:,.0f} MB memory budget (raise it with --max-volume-mb or {MAX_VOLUME_MB_ENV} if the machine "
            "has the memory)"
        )


def _check_instances(datasets: Sequence[Dataset]) -> str:
    """Series-level checks (one series, CT, pixel data, one matrix size and frame of reference); returns its name."""
    if not datasets:
        raise VolumeError("no images were given: a series needs at least 2 CT slices to make a volume")
    first = datasets[0]
    series = _series_name(first)
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) > 1:
        raise VolumeError(f"the images belong to {len(uids)} different series ({', '.join(uids)}); pass one series")
    seen: dict[str, str] = {}
    for index, ds in enumerate(datasets):
        name = _instance_name(ds, index)
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if sop_uid and sop_uid in seen:
            raise VolumeError(
                f"{series}: {name} is in the input twice (SOPInstanceUID {sop_uid}, also {seen[sop_uid]}); "
                "remove the duplicate file"
            )
        seen[sop_uid] = name
        modality = str(ds.get("Modality", "") or "")
        if modality.upper() != "CT":
            raise VolumeError(f"{series}: {name} is modality {modality or '(none)'!r}, not CT")
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise VolumeError(f"{series}: {name} has no pixel data (the file holds only its header)")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if photometric != "MONOCHROME2":
            raise VolumeError(f"{series}: {name} is {photometric}; CT HU images must be MONOCHROME2")
        if not _is_multi_frame(ds) and _int(ds, "NumberOfFrames", 1, name, series) != 1:
            raise VolumeError(f"{series}: {name} has several frames but no per-frame functional groups")
        for keyword in ("Rows", "Columns"):
            size = _int(ds, keyword, None, name, series)
            if size is None or size < 1:
                raise VolumeError(f"{series}: {name} has no valid {keyword} ({ds.get(keyword)!r})")
        for keyword in ("Rows", "Columns", "FrameOfReferenceUID"):
            if ds.get(keyword) != first.get(keyword):
                raise VolumeError(
                    f"{series}: {keyword} differs between images ({first.get(keyword)} in "
                    f"{_instance_name(first, 0)}, {ds.get(keyword)} in {name})"
                )
    return series


def _check_planes(frames: list[Frame], series: str) -> np.ndarray:
    """Same orthonormal orientation and same pixel spacing everywhere; returns the unit slice normal."""
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, rtol=0.0, atol=SAME_ORIENTATION_TOL):
            raise VolumeError(
                f"{series}: ImageOrientationPatient differs between images ({list(first.orientation)} in "
                f"{first.name}, {list(frame.orientation)} in {frame.name})"
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError(
                f"{series}: PixelSpacing differs between images ({list(first.pixel_spacing)} in {first.name}, "
                f"{list(frame.pixel_spacing)} in {frame.name})"
            )
    row, col = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOL
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOL
        or abs(float(np.dot(row, col))) > ORTHONORMAL_TOL
    ):
        raise VolumeError(
            f"{series}: ImageOrientationPatient {list(first.orientation)} is not two orthogonal unit vectors"
        )
    if min(first.pixel_spacing) <= 0:
        raise VolumeError(f"{series}: PixelSpacing {list(first.pixel_spacing)} is not positive")
    return first.normal


def _check_stack(frames: list[Frame], normal: np.ndarray, series: str) -> tuple[np.ndarray, float]:
    """Check spacing and completeness of frames sorted along ``normal``; returns (step vector, increment)."""
    if len(frames) < 2:
        raise VolumeError(
            f"{series} has a single slice; a volume needs at least 2 (the slice increment cannot be known "
            "from one slice, and calcium scoring and landmark detection are 3-D)"
        )
    z = np.array([float(np.dot(f.position, normal)) for f in frames])
    steps = np.diff(z)
    increment = float(np.median(steps))
    tol = max(SPACING_RTOL * abs(increment), SPACING_ATOL_MM)
    for a, step in enumerate(steps):
        if step <= tol:
            raise VolumeError(
                f"{series}: duplicate slice position z={_fmt(z[a])} mm along the slice normal "
                f"({frames[a].name} and {frames[a + 1].name})"
            )
    faults = []
    for a, step in enumerate(steps):
        if abs(step - increment) <= tol:
            continue
        where = f"between z={_fmt(z[a])} and z={_fmt(z[a + 1])}"
        multiple = round(step / increment)
        if multiple >= 2 and abs(step - multiple * increment) <= tol * multiple:
            faults.append(
                f"missing slice(s) {where}: gap {_fmt(step)} mm where the increment is {_fmt(increment)} mm "
                f"({multiple - 1} slice(s) absent)"
            )
        else:
            faults.append(
                f"irregular slice spacing {where}: {_fmt(step)} mm where the increment is {_fmt(increment)} mm"
            )
    if faults:
        more = f" (and {len(faults) - 1} more such gap(s))" if len(faults) > 1 else ""
        raise VolumeError(f"{series}: {faults[0]}{more}")
    positions = np.stack([f.position for f in frames])
    step_vector = (positions[-1] - positions[0]) / (len(frames) - 1)
    expected = positions[0] + np.arange(len(frames))[:, None] * step_vector
    off = np.linalg.norm(positions - expected, axis=1)
    worst = int(np.argmax(off))
    if off[worst] > tol:
        raise VolumeError(
            f"{series}: the slice origins do not lie on one straight line ({frames[worst].name} is "
            f"{_fmt(float(off[worst]))} mm off it)"
        )
    return step_vector, float(np.dot(step_vector, normal))


def _check_decoder(ds: Dataset, name: str, series: str) -> None:
    """A compressed transfer syntax this installation cannot decode is named as such (pydicom's message lists
    plugins to install, which is for the app's maintainers, not its users)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax or not getattr(syntax, "is_transfer_syntax", False) or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:  # a transfer syntax pydicom has no decoder class for at all
        available = False
    if not available:
        raise VolumeError(
            f"{series}: {name} is compressed as {syntax.name}, which this installation cannot decode; "
            "send the series uncompressed or as JPEG Lossless, JPEG 2000, JPEG-LS, RLE or deflate"
        )


def _frame_pixels(datasets: Sequence[Dataset], frames: list[Frame], series: str) -> np.ndarray:
    """HU of ``frames`` in their order, float32 [k, j, i]; each instance is decoded once."""
    decoded: dict[int, np.ndarray] = {}
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    out = np.empty((len(frames), rows, cols), dtype=np.float32)
    for k, frame in enumerate(frames):
        if frame.dataset_index not in decoded:
            ds = datasets[frame.dataset_index]
            _check_decoder(ds, frame.name, series)
            try:
                pixels = ds.pixel_array
            except Exception as exc:  # pydicom raises several types for missing decoders and corrupt data
                raise VolumeError(f"{series}: the pixel data of {frame.name} cannot be decoded: {exc}") from exc
            n = len(ds.PerFrameFunctionalGroupsSequence) if _is_multi_frame(ds) else 1
            if pixels.size != n * rows * cols:
                raise VolumeError(f"{series}: {frame.name} holds {pixels.shape} pixels, expected {n} x {rows} x {cols}")
            decoded[frame.dataset_index] = pixels.reshape(n, rows, cols)
        plane = decoded[frame.dataset_index][frame.frame_index or 0]
        out[k] = (plane.astype(np.float64) * frame.slope + frame.intercept).astype(np.float32)
        if not np.isfinite(out[k]).all():  # a rescale that overflows float32
            raise VolumeError(f"{series}: {frame.name} gives non-finite HU (rescale slope {frame.slope:g})")
    return out


def frames_in_slice_order(datasets: Sequence[Dataset], series: str | None = None) -> list[Frame]:
    """The image planes of one series (each single-frame instance, each frame of a multi-frame object) in
    increasing position along the slice normal: the order of :func:`build_volume`'s k axis, which the label maps
    given to the writers follow. Raises :class:`VolumeError` unless the planes share one orthonormal orientation
    and one pixel spacing; the rest of the geometry is :func:`build_volume`'s to check.
    """
    if not datasets:
        raise VolumeError("no images were given")
    series = series or _series_name(datasets[0])
    frames: list[Frame] = []
    for index, ds in enumerate(datasets):
        frames.extend(_multi_frames(ds, index, series) if _is_multi_frame(ds) else [_single_frame(ds, index, series)])
    normal = _check_planes(frames, series)
    frames.sort(key=lambda f: float(np.dot(f.position, normal)))
    return frames


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """The CT volume of one series (single-frame slices in any order, or multi-frame CT objects).

    Raises :class:`VolumeError`, naming the series and the fault, for: no images; several series; an instance
    given twice (same SOPInstanceUID); not CT or no
    pixel data; differing Rows, Columns, PixelSpacing, ImageOrientationPatient or FrameOfReferenceUID; an
    orientation that is not orthonormal; a missing ImagePositionPatient; duplicate positions; a missing slice
    ("missing slice(s) between z=... and z=...: gap 6.0 mm where the increment is 3.0 mm") or otherwise irregular
    spacing (tolerance ``max(1 % of the increment, 0.01 mm)``, see ``SPACING_RTOL``); slice origins off one line;
    a single slice (a volume needs >= 2: the increment is unknown from one slice); a volume over the memory
    budget (:func:`max_volume_mb`, from the headers, before decoding); pixel data that cannot be decoded or is
    cut short. Gantry tilt is accepted and
    kept as a sheared affine; :func:`untilt` resamples it.
    """
    datasets = list(datasets)
    series = _check_instances(datasets)
    _check_budget(datasets, series)
    frames = frames_in_slice_order(datasets, series)
    step, increment = _check_stack(frames, frames[0].normal, series)
    hu = _frame_pixels(datasets, frames, series)

    first = frames[0]
    row_spacing, col_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = first.orientation[:3] * col_spacing  # i runs along the row cosine, one column apart
    affine[:3, 1] = first.orientation[3:] * row_spacing  # j runs along the column cosine, one row apart
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    tilt = math.degrees(math.acos(min(1.0, increment / float(np.linalg.norm(step)))))
    tilt = 0.0 if tilt < NO_TILT_DEG else tilt
    _warn_tilt_tag(datasets[0], tilt, series)
    thicknesses = {f.thickness for f in frames}
    if len(thicknesses) > 1:
        logger.warning("%s: SliceThickness differs between images (%s); reporting the first", series, thicknesses)
    order = list(dict.fromkeys(f.dataset_index for f in frames))
    logger.info(
        "%s: volume of %d x %d x %d, pixel %s x %s mm, increment %s mm, tilt %.2f deg",
        series, len(frames), hu.shape[1], hu.shape[2], _fmt(row_spacing), _fmt(col_spacing), _fmt(increment), tilt,
    )  # fmt: skip
    return Volume(
        hu=hu,
        affine_lps=affine,
        datasets=tuple(datasets[i] for i in order),
        series_uid=str(datasets[0].SeriesInstanceUID),
        pixel_spacing_mm=(float(row_spacing), float(col_spacing)),
        increment_mm=increment,
        thickness_mm=first.thickness,
        tilt_deg=tilt,
    )


def _warn_tilt_tag(ds: Dataset, measured_deg: float, series: str) -> None:
    """Log when GantryDetectorTilt disagrees with the tilt the positions show (the positions win)."""
    try:
        tag = abs(float(ds.get("GantryDetectorTilt", "nan")))
    except (TypeError, ValueError):
        return
    if math.isfinite(tag) and abs(tag - measured_deg) > TILT_TAG_MISMATCH_DEG:
        logger.warning(
            "%s: GantryDetectorTilt says %.2f deg but the slice positions give %.2f deg; using the positions",
            series, tag, measured_deg,
        )  # fmt: skip


def untilt(volume: Volume, max_tilt_deg: float = 30.0) -> Volume:
    """Resample a gantry-tilted volume onto an orthogonal grid: same in-plane spacing, slices along the normal.

    A tilted series is a stack of parallel planes whose origins step along the table rather than along the plane
    normal, so each slice k of the output (plane spacing ``increment_mm`` along the normal, starting at the first
    slice) lies exactly in the plane of input slice k, only shifted within the plane. The resampling is therefore
    an in-plane shift per slice, done with linear interpolation (``scipy.ndimage.affine_transform``, order 1):
    nothing is interpolated across slices, and linear interpolation never overshoots, so no voxel gets an HU value
    beyond its neighbours' (a cubic spline would ring around bone and create false >= 130 HU voxels). The output
    grid covers the whole sheared slab (it is wider than the input along the tilt); voxels outside the acquired
    slab are -1024 HU. Returns ``volume`` itself when its tilt is below 0.01 deg; raises :class:`VolumeError`
    when the tilt exceeds ``max_tilt_deg`` (scanners tilt at most about 30 deg, so more means wrong positions).
    """
    if volume.tilt_deg < NO_TILT_DEG:
        return volume
    series = _series_name(volume.datasets[0])
    if volume.tilt_deg > max_tilt_deg:
        raise VolumeError(
            f"{series}: gantry tilt of {volume.tilt_deg:.1f} deg exceeds the {max_tilt_deg:g} deg this "
            "application resamples"
        )
    row_spacing, col_spacing = volume.pixel_spacing_mm
    row_cos = volume.affine_lps[:3, 0] / col_spacing
    col_cos = volume.affine_lps[:3, 1] / row_spacing
    normal = np.cross(row_cos, col_cos)
    step = volume.affine_lps[:3, 2]
    origin = volume.affine_lps[:3, 3]
    n_k, n_j, n_i = volume.hu.shape
    k = np.arange(n_k, dtype=float)
    u = k * float(np.dot(step, row_cos))  # in-plane offsets of each slice origin from the first, mm
    v = k * float(np.dot(step, col_cos))
    u_lo, u_hi = u.min(), u.max() + (n_i - 1) * col_spacing
    v_lo, v_hi = v.min(), v.max() + (n_j - 1) * row_spacing
    out_i = int(math.ceil((u_hi - u_lo) / col_spacing - 1e-6)) + 1
    out_j = int(math.ceil((v_hi - v_lo) / row_spacing - 1e-6)) + 1
    hu = np.empty((n_k, out_j, out_i), dtype=np.float32)
    for kk in range(n_k):
        offset = ((v_lo - v[kk]) / row_spacing, (u_lo - u[kk]) / col_spacing)
        ndimage.affine_transform(
            volume.hu[kk], np.ones(2), offset=offset, output_shape=(out_j, out_i), output=hu[kk],
            order=1, mode="constant", cval=AIR_HU,
        )  # fmt: skip
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = normal * volume.increment_mm
    affine[:3, 3] = origin + u_lo * row_cos + v_lo * col_cos
    logger.info(
        "%s: resampled a %.2f deg gantry tilt onto an orthogonal %d x %d x %d grid (linear, in-plane only)",
        series, volume.tilt_deg, n_k, out_j, out_i,
    )  # fmt: skip
    return replace(volume, hu=hu, affine_lps=affine, tilt_deg=0.0)


def superior_up(volume: Volume) -> Volume:
    """``volume`` with its slices running from the feet to the head: itself when they already do, else the slices
    (and datasets) reversed, with the affine that keeps every voxel at its LPS position.

    Checks and regions of interest that look for the heart's apex or the skull base below read k = 0 as the
    inferior end; a series whose slice normal points to the feet (row x column cosine with negative z) comes out
    of :func:`build_volume` superior end first.
    """
    if volume.affine_lps[2, 2] >= 0:
        return volume
    n_k = volume.hu.shape[0]
    affine = volume.affine_lps.copy()
    affine[:3, 3] = volume.affine_lps[:3, 3] + (n_k - 1) * volume.affine_lps[:3, 2]
    affine[:3, 2] = -volume.affine_lps[:3, 2]
    hu = np.ascontiguousarray(volume.hu[::-1])
    return replace(volume, hu=hu, affine_lps=affine, datasets=tuple(reversed(volume.datasets)))


def read_volume(paths: Sequence[str]) -> Volume:
    """:func:`build_volume` of the DICOM files at ``paths`` (convenience for tools and tests)."""
    return build_volume([pydicom.dcmread(p) for p in paths])
