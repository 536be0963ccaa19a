"""DICOM SEG writer: a label map on the source CT grid -> one BINARY Segmentation with a fixed segment set.

Frames: every segment of the set is described in the SegmentSequence and has frames, whatever the label map
holds (a calcium-free study still carries LM, LAD, LCX and RCA). The frames cover the contiguous slab of source
slices from the first to the last slice with any label, one frame per slice and segment, empty ones included;
a label map with no voxels at all gets one empty frame per segment on the first slice. Why not highdicom's
``omit_empty_frames=True`` alone: the standard allows a segment without frames (only NumberOfFrames > 0 is
required), but then a segment with no calcium has no frame, and readers that rebuild a volume from the frame
positions (dcmqi, hence 3D Slicer) take the spacing from the gaps between the remaining frames: two frames
20 mm apart came back as a 2-slice volume with 20 mm spacing. A contiguous slab reads back with the source's
spacing and origin shifted to the slab. Why not every slice (``full_stack=True``, available for viewers
that need the whole stack): 8 ICA segments x 200 slices x 512 x 512 bits would be 52 MB of mostly zeros.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DS

from deploy_app.dicom_codes import ABNORMAL_STRUCTURE, CALCIFIED_PLAQUE, PRIVATE_SCHEME_ITEM
from deploy_app.dicom_output import (
    MANUFACTURER,
    Algorithm,
    check_source_series,
    derive_uid,
    make_deterministic,
    source_datetime,
    write_atomic,
)
from deploy_app.overlay import labelled_slices
from deploy_app.segment_sets import SegmentSet, SegmentSpec, default_algorithm, get_segment_set
from deploy_app.volume import Frame

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER_OFFSET = 1000  # SEG series number = source series number + this, unless given


def seg_uids(source_series_uid: str, segment_set: str, algorithm: Algorithm) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SEG: fixed by the source series, the segment set and the algorithm."""
    series = derive_uid(source_series_uid, "SEG", segment_set, algorithm.name, algorithm.version)
    return series, derive_uid(series, "instance", "1")


def _description(spec: SegmentSpec, algorithm: Algorithm, sop_instance_uid: str) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=spec.number,
        segment_label=spec.label,
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=CALCIFIED_PLAQUE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.DCM.ArtificialIntelligence, version=algorithm.version
        ),
        # this SEG's finding (the SR's measurement group for the segment carries the same UID), not a global one
        tracking_uid=derive_uid(sop_instance_uid, "segment", str(spec.number)),
        tracking_id=spec.label,
        anatomic_regions=[spec.artery],
        primary_anatomic_structures=[spec.artery_segment] if spec.artery_segment is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
    )
    if spec.laterality is not None:
        laterality = hd.sr.CodedConcept.from_code(spec.laterality)
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [laterality]
        if "PrimaryAnatomicStructureSequence" in desc:
            desc.PrimaryAnatomicStructureSequence[0].PrimaryAnatomicStructureModifierSequence = [
                hd.sr.CodedConcept.from_code(spec.laterality)
            ]
    return desc


def _check_label_map(label_kji: np.ndarray, source: Dataset, n_frames: int, n_segments: int) -> np.ndarray:
    labels = np.asarray(label_kji)
    expected = (n_frames, int(source.Rows), int(source.Columns))
    if labels.shape != expected:
        raise ValueError(f"label map shape {labels.shape} does not match the source series {expected} [k, j, i]")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"label map must be integer, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > n_segments):
        bad = np.unique(labels[(labels < 0) | (labels > n_segments)])[:10].tolist()
        raise ValueError(f"label values {bad} are outside the segment set's 0..{n_segments}")
    return labels.astype(np.uint8 if n_segments < 256 else np.uint16, copy=False)


def _slab(labels: np.ndarray) -> tuple[int, int]:
    """First and last slice index holding any label; (0, 0) when there is none."""
    ks = labelled_slices(labels)
    return (int(ks[0]), int(ks[-1])) if ks.size else (0, 0)


def _increment(frames: Sequence[Frame]) -> float | None:
    """Distance between consecutive slice planes (mm) of the source; None for a single slice."""
    if len(frames) < 2:
        return None
    return float(np.dot(frames[-1].position - frames[0].position, frames[0].normal)) / (len(frames) - 1)


def build_seg(
    source_datasets: Sequence[Dataset],
    label_kji: np.ndarray,
    segment_set: str | SegmentSet,
    *,
    algorithm: Algorithm | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
    full_stack: bool = False,
) -> hd.seg.Segmentation:
    """The SEG dataset (see :func:`write_seg`), not written."""
    seg_set = get_segment_set(segment_set)
    frames = check_source_series(source_datasets)
    source = source_datasets[0]
    labels = _check_label_map(label_kji, source, len(frames), len(seg_set.segments))
    algorithm = algorithm or default_algorithm(seg_set)
    default_series, _ = seg_uids(source.SeriesInstanceUID, seg_set.name, algorithm)
    series_uid = series_uid or default_series
    when = content_datetime or source_datetime(source)
    if series_number is None:
        series_number = int(source.get("SeriesNumber") or 0) + SEG_SERIES_NUMBER_OFFSET
    first, last = (0, len(frames) - 1) if full_stack else _slab(labels)
    labels = labels[first : last + 1]
    images: Sequence[Dataset] = source_datasets
    positions = None
    if frames[0].frame_index is not None:  # one multi-frame object: highdicom finds its frames by their positions
        positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, f.position) for f in frames]
        positions = positions[first : last + 1]
    else:
        images = source_datasets[first : last + 1]
    uses_private = any(spec.artery_segment is not None for spec in seg_set.segments)
    sop_instance_uid = derive_uid(series_uid, "instance", "1")
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(spec, algorithm, sop_instance_uid) for spec in seg_set.segments],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.version,
        plane_positions=positions,
        omit_empty_frames=False,
        content_label="CALCIUM",
        content_description=f"{seg_set.name} calcium by {algorithm.name} {algorithm.version}"[:64],
        series_description=f"CalciMap {seg_set.name} calcium SEG (not for diagnostic use)"[:64],
        coding_schemes=[PRIVATE_SCHEME_ITEM] if uses_private else None,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    increment = _increment(frames)
    if increment is not None:  # highdicom measures it on the slab's frames, and says 1 mm for a slab of one slice
        seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = DS(
            increment, auto_format=True
        )
    seg.ContentCreatorName = None  # Type 2: present and empty for an algorithm's content
    make_deterministic(seg, when)
    # highdicom draws a random DimensionOrganizationUID; derive it so that a re-run writes the same bytes.
    dimension_uid = derive_uid(seg.SOPInstanceUID, "dimension organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    return seg


def write_seg(
    source_datasets: Sequence[Dataset],
    label_kji: np.ndarray,
    segment_set: str | SegmentSet,
    out_path: str | os.PathLike,
    *,
    algorithm: Algorithm | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
    full_stack: bool = False,
) -> hd.seg.Segmentation:
    """Write a BINARY DICOM SEG of ``label_kji`` into ``out_path`` (atomically) and return the dataset.

    Args:
        source_datasets: the source CT series, single-frame slices in slice order (as ``read_ct_series``
            returns them) or one multi-frame CT object; the SEG joins their study and copies their patient module.
        label_kji: integer label map [k, j, i] on the source grid (k in increasing position along the slice
            normal, as ``build_volume`` orders slices and frames); value v is segment v of the set (0 = none).
        segment_set: "coronary" (1 LM, 2 LAD, 3 LCX, 4 RCA) or "ica" (1 + side * 4 + segment, side 0 right;
            segments cervical, petrous, cavernous, supraclinoid), or a :class:`SegmentSet`.
        algorithm: name and version written as Algorithm Identification; default from the bundles' versions.
        series_uid: the SEG series UID; default derived from the source series, segment set and algorithm,
            so that a re-run writes the same UIDs (and the same bytes) and replaces rather than duplicates.
        series_number: default source SeriesNumber + 1000.
        content_datetime: ContentDate/Time and SeriesDate/Time; default the source series' date and time.
        full_stack: frames on every source slice instead of the slab holding labels (module docstring).

    Raises ValueError for input that does not fit (shape, label values, unordered or mixed series).
    """
    seg = build_seg(
        source_datasets,
        label_kji,
        segment_set,
        algorithm=algorithm,
        series_uid=series_uid,
        series_number=series_number,
        content_datetime=content_datetime,
        full_stack=full_stack,
    )
    path = write_atomic(seg, Path(out_path))
    logger.info("wrote SEG %s (%d frames) to %s", seg.SOPInstanceUID, int(seg.NumberOfFrames), path)
    return seg
