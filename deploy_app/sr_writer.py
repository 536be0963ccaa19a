"""DICOM SR writer: the scorer's result for one SEG -> a Comprehensive 3D SR with a TID 1500 Measurement Report.

Content tree: observer context (the algorithm as a device), procedure reported, then
- per segment of the set, a volumetric ROI group (TID 1411) that references its SEG segment and the source
  series (TID 1411's "Source series for segmentation"; listing every source image instead, as
  ``ReferencedSegment.from_segmentation`` does, took 1 s of a head study's 8 segments x 163 slices and adds
  nothing the SEG's own references do not hold), finding calcified atheromatous plaque at the artery
  (laterality and ICA segment as finding-site modifiers), with the Agatston score, calcium volume (mm3) and
  calcium mass (mg), 0 where the segment holds no calcium;
- one measurement group (TID 1501) for the total, with the same three measurements, the risk category
  (coronary only: the categories are defined for the coronary Agatston total) and, when the acquisition facts
  were given to the scorer, whether the score is Agatston-equivalent, and the quality checks behind the score
  (check -> passed / failed); all coded in the private scheme.
Numbers come only from ``scoring.score_calcium`` (a ``CalciumScore`` or its ``as_dict()``), written unrounded
up to what a DICOM decimal string holds (16 characters).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from deploy_app import dicom_codes as dc
from deploy_app.dicom_output import (
    MANUFACTURER,
    Algorithm,
    check_source_series,
    derive_uid,
    make_deterministic,
    source_datetime,
    write_atomic,
)
from deploy_app.segment_sets import SEGMENT_SETS, SegmentSet, SegmentSpec, default_algorithm, get_segment_set

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER_OFFSET = 2000  # SR series number = source series number + this, unless given
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def sr_uids(seg_instance_uid: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR: fixed by the SEG it reports on (itself fixed by the source)."""
    series = derive_uid(seg_instance_uid, "SR")
    return series, derive_uid(series, "instance", "1")


def _score_dict(scores: Any) -> Mapping[str, Any]:
    data = scores.as_dict() if hasattr(scores, "as_dict") else scores
    if not isinstance(data, Mapping) or "per_label" not in data or "total" not in data:
        raise ValueError("scores must be the result of scoring.score_calcium (or its as_dict())")
    return data


def _infer_segment_set(names: set[str]) -> SegmentSet:
    for seg_set in SEGMENT_SETS.values():
        if names == {s.name for s in seg_set.segments}:
            return seg_set
    raise ValueError(f"the scores' labels {sorted(names)} match no segment set; pass segment_set")


def _check_seg(seg: Dataset, seg_set: SegmentSet, source: Dataset) -> None:
    if seg.get("SOPClassUID") != SEG_STORAGE:
        raise ValueError("seg_dataset is not a Segmentation Storage object")
    referenced = {item.SeriesInstanceUID for item in seg.get("ReferencedSeriesSequence", [])}
    if referenced != {source.SeriesInstanceUID}:
        raise ValueError("the SEG does not reference the source series")
    described = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    expected = {s.number: s.label for s in seg_set.segments}
    if described != expected:
        raise ValueError(f"the SEG's segments {described} are not the {seg_set.name} set {expected}")
    if any("TrackingUID" not in item for item in seg.SegmentSequence):
        raise ValueError("the SEG's segments carry no TrackingUID for the SR's measurement groups to share")


def _measurements(values: Mapping[str, Any], seg_set: SegmentSet) -> list[hd.sr.Measurement]:
    def num(value: Any) -> float:
        return float(f"{float(value):.10g}")  # a DS holds 16 characters

    return [
        hd.sr.Measurement(seg_set.score_concept, num(values["agatston"]), dc.UNIT_NONE, method=dc.AGATSTON_METHOD),
        hd.sr.Measurement(dc.CALCIUM_VOLUME, num(values["volume_mm3"]), dc.UNIT_MM3, method=dc.VOLUME_METHOD),
        hd.sr.Measurement(dc.CALCIUM_MASS, num(values["mass_mg"]), dc.UNIT_MG, method=dc.MASS_METHOD),
    ]


def _segment_group(
    spec: SegmentSpec, values: Mapping[str, Any], seg: Dataset, seg_set: SegmentSet, algorithm: Algorithm
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    site = hd.sr.FindingSite(spec.artery, laterality=spec.laterality, topographical_modifier=spec.artery_segment)
    (segment,) = [item for item in seg.SegmentSequence if item.SegmentNumber == spec.number]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.TrackingUID, identifier=spec.label),
        referenced_segment=hd.sr.ReferencedSegment(
            seg.SOPClassUID,
            seg.SOPInstanceUID,
            spec.number,
            source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        ),
        finding_type=dc.CALCIFIED_PLAQUE,
        algorithm_id=hd.sr.AlgorithmIdentification(algorithm.name, algorithm.version),
        finding_sites=[site],
        measurements=_measurements(values, seg_set),
    )


def _quality_evaluations(quality: Sequence[Any]) -> list[hd.sr.QualitativeEvaluation]:
    """Each quality finding (``quality.Finding`` or its ``as_dict()``) as check code -> passed / failed."""
    out = []
    for finding in quality:
        f = finding if isinstance(finding, Mapping) else finding.as_dict()
        if f["check"] not in dc.QUALITY_FINDINGS:
            raise ValueError(f"unknown quality check {f['check']!r}")
        value = dc.QUALITY_PASSED if f["passed"] else dc.QUALITY_FAILED
        out.append(hd.sr.QualitativeEvaluation(dc.QUALITY_FINDINGS[f["check"]], value))
    return out


def _total_group(
    data: Mapping[str, Any], seg: Dataset, seg_set: SegmentSet, algorithm: Algorithm, quality: Sequence[Any] = ()
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = []
    if seg_set.has_risk_category:
        category = str(data["risk_category"])
        if category not in dc.RISK_CATEGORY_VALUES:
            raise ValueError(f"unknown risk category {category!r}")
        evaluations.append(hd.sr.QualitativeEvaluation(dc.RISK_CATEGORY, dc.RISK_CATEGORY_VALUES[category]))
    if data.get("agatston_equivalent") is not None:
        answer = dc.YES if data["agatston_equivalent"] else dc.NO
        evaluations.append(hd.sr.QualitativeEvaluation(dc.AGATSTON_EQUIVALENT, answer))
    evaluations += _quality_evaluations(quality)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(seg.SOPInstanceUID, "total"), identifier=f"Total {seg_set.name} calcium"
        ),
        finding_type=dc.CALCIFIED_PLAQUE,
        algorithm_id=hd.sr.AlgorithmIdentification(algorithm.name, algorithm.version),
        finding_sites=[hd.sr.FindingSite(seg_set.total_site)],
        measurements=_measurements(data["total"], seg_set),
        qualitative_evaluations=evaluations or None,
    )


def _observation_context(algorithm: Algorithm) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("CalciMap device", algorithm.name, algorithm.version),
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def build_sr(
    source_datasets: Sequence[Dataset],
    seg_dataset: Dataset,
    scores: Any,
    *,
    segment_set: str | SegmentSet | None = None,
    algorithm: Algorithm | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
    quality: Sequence[Any] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR dataset (see :func:`write_sr`), not written."""
    check_source_series(source_datasets)
    data = _score_dict(scores)
    names = set(data["per_label"])
    seg_set = _infer_segment_set(names) if segment_set is None else get_segment_set(segment_set)
    if names != {s.name for s in seg_set.segments}:
        raise ValueError(f"the scores' labels {sorted(names)} are not the {seg_set.name} set's")
    source = source_datasets[0]
    _check_seg(seg_dataset, seg_set, source)
    algorithm = algorithm or default_algorithm(seg_set)
    default_series, _ = sr_uids(seg_dataset.SOPInstanceUID)
    series_uid = series_uid or default_series
    when = content_datetime or source_datetime(source)
    if series_number is None:
        series_number = int(source.get("SeriesNumber") or 0) + SR_SERIES_NUMBER_OFFSET
    groups: list[Any] = [
        _segment_group(spec, data["per_label"][spec.name], seg_dataset, seg_set, algorithm) for spec in seg_set.segments
    ]
    groups.append(_total_group(data, seg_dataset, seg_set, algorithm, quality))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=seg_set.procedure,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, seg_dataset],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=derive_uid(series_uid, "instance", "1"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"CalciMap {seg_set.name} calcium SR (not for diagnostic use)"[:64],
        coding_schemes=[dc.PRIVATE_SCHEME_ITEM],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    make_deterministic(sr, when)
    return sr


def write_sr(
    source_datasets: Sequence[Dataset],
    seg_dataset: Dataset,
    scores: Any,
    out_path: str | os.PathLike,
    *,
    segment_set: str | SegmentSet | None = None,
    algorithm: Algorithm | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
    quality: Sequence[Any] = (),
) -> hd.sr.Comprehensive3DSR:
    """Write the TID 1500 SR of ``scores`` (for the segments of ``seg_dataset``) into ``out_path`` atomically.

    Args:
        source_datasets: the source CT series in slice order (the SEG's source); evidence and patient/study.
        seg_dataset: the SEG written by :func:`deploy_app.seg_writer.write_seg` for these scores.
        scores: ``scoring.score_calcium(...)`` on the SEG's label map (or its ``as_dict()``); its label names
            pick the segment set unless ``segment_set`` is given.
        algorithm, series_uid, series_number, content_datetime: as for ``write_seg``; the default UIDs derive
            from the SEG's SOP instance UID (so from the source series and the algorithm version); series
            number default source SeriesNumber + 2000.
        quality: the quality findings behind the score (``deploy_app.quality.Finding``s), written into the total
            group as coded evaluations (private scheme): the check -> passed / failed.

    Raises ValueError when the scores, the SEG and the source do not belong together.
    """
    sr = build_sr(
        source_datasets,
        seg_dataset,
        scores,
        segment_set=segment_set,
        algorithm=algorithm,
        series_uid=series_uid,
        series_number=series_number,
        content_datetime=content_datetime,
        quality=quality,
    )
    path = write_atomic(sr, Path(out_path))
    logger.info("wrote SR %s to %s", sr.SOPInstanceUID, path)
    return sr


__all__ = ["build_sr", "sr_uids", "write_sr"]
