"""The app's stages as plain functions over plain data: read -> select -> volume -> score each path -> write.

The Holoscan operators (:mod:`deploy_app.operators`) call these, one stage per operator; the benchmark and the
tests call them directly. Each path (coronary, ICA) goes: the selected series -> a strict volume (a geometry
fault becomes a blocking quality finding) -> the quality checks -> if suitable, the models and the one scorer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundles.dst_ica_calcification.scripts.hemisphere import voxel_to_patient
from bundles.dst_ica_calcification.scripts.segments import map_segments
from bundles.s2cac_coronary_calcium.scripts import scoring
from deploy_app import quality
from deploy_app.dicom_output import check_source_series
from deploy_app.inference import CalciumSegmenter, LandmarkLocator
from deploy_app.models import MODELS
from deploy_app.selection import SeriesChoice, acquisition_facts, load_rules, select_series
from deploy_app.study import Study
from deploy_app.volume import Volume, VolumeError, build_volume, superior_up, untilt

logger = logging.getLogger(__name__)

PATHS = ("coronary", "ica")
NO_SERIES = {
    "coronary": "No non-contrast chest/cardiac CT series in this study.",
    "ica": "No non-contrast head CT series in this study.",
}


@dataclass
class PathResult:
    """What one path (coronary or ICA) found for the study; ``labels`` are on ``volume``'s grid."""

    path: str
    choice: SeriesChoice
    volume: Volume | None = None  # None when the series could not be built into a volume
    scored_volume: Volume | None = None  # the grid the models and the scorer saw (untilted, feet to head)
    findings: list[quality.Finding] = field(default_factory=list)
    not_scored_reason: str | None = None
    labels: np.ndarray | None = None  # segment numbers on the source volume's grid (for the SEG)
    scored_labels: np.ndarray | None = None  # the same on scored_volume's grid (what the scorer counted)
    score: scoring.CalciumScore | None = None
    landmarks: dict | None = None  # DST prediction (ICA)
    mapping: dict | None = None  # segment-mapping report (ICA)
    roi: list[list[int]] | None = None  # [[k0, k1], [j0, j1], [i0, i1]] the calcium model read, the DST its slices
    sliding_window: dict | None = None  # the calcium model's tile and overlap
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.score is not None


class Timer:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 4)


class Models:
    """The loaded networks, each made once per process (a warm app scores many studies).

    ``roi``: run the calcium model on the heart / skull-base region the quality checks locate (the default; the
    sliding window's cost scales with the volume it covers) instead of the whole field of view. ``sw_overlap``:
    the calcium model's sliding-window overlap (None: the device's default, see :class:`CalciumSegmenter`).
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        device: torch.device | None = None,
        roi: bool = True,
        sw_overlap: float | None = None,
    ):
        self.files = dict(files)
        self.device = device
        self.roi = roi
        self.sw_overlap = sw_overlap
        self._loaded: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self._loaded:
            if name not in self.files:
                raise KeyError(f"model {name!r} is not available (run `make models`)")
            if name == "dst_landmarks":
                model = LandmarkLocator(MODELS[name], self.files[name], self.device)
            else:
                model = CalciumSegmenter(MODELS[name], self.files[name], self.device, overlap=self.sw_overlap)
            self._loaded[name] = model
        return self._loaded[name]

    def available(self, path: str) -> list[str]:
        """The models a path needs that are missing."""
        return [name for name, spec in MODELS.items() if spec.path == path and name not in self.files]


def select(study: Study, rules: dict | None = None) -> dict[str, SeriesChoice | None]:
    return select_series(study.series, rules if rules is not None else load_rules())


def make_volume(choice: SeriesChoice) -> tuple[Volume | None, list[quality.Finding]]:
    try:
        return build_volume(choice.datasets), []
    except VolumeError as e:
        logger.warning("%s series is not usable: %s", choice.selection, e)
        return None, [quality.check_geometry_error(str(e))]


def _header_facts(volume: Volume) -> dict[str, Any]:
    facts = acquisition_facts(volume.datasets[0])
    return {**facts, "increment_mm": volume.increment_mm, "tilt_deg": volume.tilt_deg}


def check(result: PathResult, limits: Mapping[str, float]) -> bool:
    """Run the quality checks of the path on its volume; False (with the reason set) when it cannot be scored."""
    if result.volume is not None:
        vol = result.volume
        facts = _header_facts(vol)
        acquired = None
        if result.path == "ica" and 0 < vol.tilt_deg <= limits["ica_tilt_max_deg"]:
            acquired = (vol.hu, vol.spacing_kji)  # the head contrast check does not depend on the slice order
            vol = untilt(vol, limits["ica_tilt_max_deg"])
        vol = superior_up(vol)
        result.scored_volume = vol
        result.findings += quality.run_checks(result.path, vol.hu, vol.spacing_kji, facts, limits, acquired)
    ok, reason = quality.suitable(result.findings)
    if not ok:
        result.not_scored_reason = reason
    return ok


def _score(
    volume: Volume, labels: np.ndarray, label_names: Mapping[int, str], choice: SeriesChoice
) -> scoring.CalciumScore:
    """The one scorer, told the acquisition facts; a series the selection took only as a fallback (e.g. facts
    not recorded, which the scorer does not judge) is labelled Agatston-equivalent too."""
    facts = acquisition_facts(volume.datasets[0])
    score = scoring.score_calcium(
        volume.hu,
        labels,
        volume.scoring_spacing,
        label_names=label_names,
        thickness_mm=facts["thickness_mm"],
        kvp=facts["kvp"],
        kernel=facts["kernel"],
    )
    if not choice.standard and not score.agatston_equivalent:
        why = "; ".join(r.removeprefix("non-standard acquisition: ") for r in choice.reasons if "non-standard" in r)
        score = dataclasses.replace(score, agatston_equivalent=True, acquisition_note=why or "non-standard series")
    return score


def _to_source_grid(labels: np.ndarray, scored: Volume, source: Volume) -> np.ndarray:
    """Labels of the scored grid (untilted, slices feet to head), nearest-neighbour on the source grid, for the SEG.

    Only the source voxels whose position can fall in the labelled box of the scored grid are looked up (a full
    grid of coordinates would take gigabytes for a 512 x 512 x 160 head).
    """
    if scored is source:
        return labels
    out = np.zeros(source.hu.shape, dtype=np.uint8)
    found = np.argwhere(labels)
    if len(found) == 0:
        return out
    from scipy import ndimage

    lo, hi = found.min(axis=0) - 1, found.max(axis=0) + 1  # (k, j, i) in the scored grid
    corners = np.array([[i, j, k, 1.0] for k in (lo[0], hi[0]) for j in (lo[1], hi[1]) for i in (lo[2], hi[2])])
    in_source = (np.linalg.inv(source.affine_lps) @ scored.affine_lps @ corners.T)[:3]  # (i, j, k) rows
    start = np.maximum(np.floor(in_source.min(axis=1)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(in_source.max(axis=1)).astype(int) + 2, source.hu.shape[::-1])
    i, j, k = np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    to_scored = np.linalg.inv(scored.affine_lps) @ source.affine_lps @ ijk1
    values = ndimage.map_coordinates(labels, to_scored[[2, 1, 0]], order=0, mode="constant", cval=0)
    out[k.ravel(), j.ravel(), i.ravel()] = values
    return out


def _box_affine(affine_lps: np.ndarray, start_kji: tuple[int, int, int]) -> np.ndarray:
    """The affine of a sub-volume whose first voxel is ``start_kji`` of the volume with ``affine_lps``."""
    affine = affine_lps.copy()
    affine[:3, 3] = voxel_to_patient(np.array([start_kji]), affine_lps)[0]
    return affine


def segment_calcium(name: str, result: PathResult, models: Models, box: tuple[slice, ...] | None) -> np.ndarray:
    """The calcium model on ``box`` of the scored volume (the whole volume when None); labels on the whole grid."""
    vol, model = result.scored_volume, models.get(name)
    result.sliding_window = model.sliding_window
    if box is None:
        return model(vol.hu, vol.affine_lps)
    labels = np.zeros(vol.hu.shape, dtype=np.uint8)
    affine = _box_affine(vol.affine_lps, (box[0].start, box[1].start, box[2].start))
    labels[box] = model(np.ascontiguousarray(vol.hu[box]), affine)
    return labels


def _roi(result: PathResult, models: Models, limits: Mapping[str, float]) -> tuple[slice, ...] | None:
    if not models.roi:
        return None
    vol = result.scored_volume
    with Timer(result.timings, "roi"):
        if result.path == "coronary":
            box = quality.heart_box(vol.hu, vol.spacing_kji, limits)
        else:
            row_axis = vol.affine_lps[:3, 1] / np.linalg.norm(vol.affine_lps[:3, 1])
            box = quality.skull_base_box(vol.hu, vol.spacing_kji, limits, j_posterior=float(row_axis[1]))
    if box is None:
        logger.warning("%s: no region of interest found; the model reads the whole volume", result.path)
    else:
        result.roi = [[s.start, s.stop] for s in box]
    return box


def score_coronary(result: PathResult, models: Models, limits: Mapping[str, float]) -> None:
    vol = result.scored_volume
    box = _roi(result, models, limits)
    with Timer(result.timings, "model_s2cac_coronary"):
        labels = segment_calcium("s2cac_coronary", result, models, box)
    with Timer(result.timings, "scoring"):
        result.score = _score(vol, labels, scoring.DEFAULT_LABEL_NAMES, result.choice)
    result.labels = result.scored_labels = labels


def locate_landmarks(locator, vol: Volume, box: tuple[slice, ...] | None) -> dict:
    """DST on the slices of the skull-base region (all slices when ``box`` is None), indices on the whole volume.

    The DST was trained on heads covering the skull base and the siphon, not the vault: on whole-head scans up to
    the vertex it put a landmark in the vault (left petrous-cavernous boundary at slice 149 of 163, 107 slices
    above its place). The region's slices (from the first to 45 mm above the petrous bones) are what it learned;
    each slice keeps its whole field of view.
    """
    if box is None:
        return locator(vol.hu, vol.affine_lps)
    k0, k1 = box[0].start, min(box[0].stop, vol.hu.shape[0])
    found = locator(np.ascontiguousarray(vol.hu[k0:k1]), _box_affine(vol.affine_lps, (k0, 0, 0)))
    for lm in found["landmarks"]:
        lm["slice_index"] += k0
        lm["expected_slice"] = round(lm["expected_slice"] + k0, 3)
    return {**found, "num_slices": vol.hu.shape[0]}


def score_ica(result: PathResult, models: Models, limits: Mapping[str, float]) -> None:
    from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES

    vol = result.scored_volume
    box = _roi(result, models, limits)
    with Timer(result.timings, "model_s2cac_ica"):
        calcium = segment_calcium("s2cac_ica", result, models, box)
    with Timer(result.timings, "model_dst"):
        result.landmarks = locate_landmarks(models.get("dst_landmarks"), vol, box)
    with Timer(result.timings, "scoring"):
        try:
            mapping = map_segments(vol.hu, calcium, vol.affine_lps, result.landmarks, spacing=vol.scoring_spacing)
        except ValueError as e:  # calcium on a side whose boundaries the model could not place
            result.not_scored_reason = f"Calcium could not be mapped to ICA segments: {e}"
            return
        result.mapping = mapping.report()
        result.score = _score(vol, mapping.labels, LABEL_NAMES, result.choice)
    result.scored_labels = mapping.labels
    result.labels = _to_source_grid(mapping.labels, vol, result.volume)


def run_path(path: str, choice: SeriesChoice | None, models: Models, limits: Mapping[str, float]) -> PathResult | None:
    """One path from its selected series to its scores (None: the study holds no series for it)."""
    if choice is None:
        return None
    result = PathResult(path=path, choice=choice)
    with Timer(result.timings, "volume"):
        result.volume, result.findings = make_volume(choice)
    with Timer(result.timings, "quality"):
        ok = check(result, limits)
    missing = models.available(path)
    if ok and missing:
        result.not_scored_reason = f"model(s) {', '.join(missing)} not installed"
        ok = False
    if ok:
        try:  # what the writers will reference: single-frame slices or one multi-frame object
            check_source_series(result.volume.datasets)
        except ValueError as e:
            result.not_scored_reason = f"The reports cannot reference this series: {e}."
            ok = False
    if ok:
        (score_coronary if path == "coronary" else score_ica)(result, models, limits)
    if result.scored:
        category = f" (category {result.score.risk_category})" if path == "coronary" else ""
        logger.info("%s: total Agatston %.1f%s", path, result.score.total.agatston, category)
    else:
        logger.warning("%s: not scored: %s", path, result.not_scored_reason)
    return result
