"""Segment-level mapping of ICA calcium: side from the mid-sagittal plane, segment from the boundary landmarks.

Every calcium voxel (nonzero in the calcium mask) gets a side and one of four ICA segments, coded like the head
phantoms' ``segments`` truth: label = 1 + side * 4 + segment, side 0 right / 1 left, segment 0 cervical,
1 petrous, 2 cavernous, 3 supraclinoid (values 1..8, ``LABEL_NAMES``). Volume, Agatston and mass per label then
come from the project's one scorer (``s2cac_coronary_calcium/scripts/scoring.py``), so the ICA numbers follow
the same definitions as coronary ones (130 HU threshold, 2D lesions per label and slice, increment / 3 mm).

Side: the sign of the voxel centre's distance to the mid-sagittal plane (:mod:`.hemisphere`), never the image
centre.

Segment (the "axial rule", DST's reading of the landmarks): the six landmarks are slice positions of the three
boundaries per side (1 cervical|petrous, 2 petrous|cavernous, 3 cavernous|supraclinoid). A voxel in slice k of a
side with boundary positions b1 <= b2 <= b3 (slice indices, fractional allowed) is cervical when k < b1,
petrous when b1 <= k < b2, cavernous when b2 <= k < b3 and supraclinoid when k >= b3: a boundary slice itself
belongs to the distal segment. "Axial" means the acquisition's slice axis (with gantry tilt the slices are
tilted), because the landmarks are slice positions. The true segments follow the centreline and the siphon's
segments overlap in z, so this rule has an error; ``scripts/measure_icac_mapping.py`` measures it. Whole-slice
landmarks cost accuracy: on 100 small held-out heads 0.45 % of the calcium volume fell into a wrong segment with
the true fractional slice positions, 3.4 % with the same landmarks rounded to whole slices (the boundary slice is
all-or-nothing). Pass fractional positions (e.g. the expected value of the predicted distribution) when available.

Absent landmarks (``present`` / ``in_scan`` false; typically the cervical boundary below a head scan): an absent
boundary lower than every present boundary of its side lies below the scan (no calcium of that side is
assigned to the segments below it); one higher than every present boundary lies above the scan. An absent
boundary between two present ones, or a side with calcium but no present boundary, cannot be placed and raises
ValueError. Present boundaries out of order (a prediction may give b2 < b1) are made non-decreasing (running
maximum), with a warning in the result.

Implausible landmarks: the two ICAs run nearly mirror-symmetric, so a boundary present on both sides lies at about
the same height on each. A pair more than ``max_side_difference_mm`` apart is not anatomy but a landmark model
reading a scan unlike its training data; the segment split it gives would be wrong, so with calcium to map it
raises ValueError (without calcium every segment is 0 whatever the landmarks say: a warning only).

Landmarks come as the head phantoms' ``truth["landmarks"]`` list (or the whole truth.json), or as predictions with
the same keys: ``side`` ("right"/"left") and ``boundary`` (1..3), or a ``name`` such as
"right_cervical_petrous"; the position as ``slice_index`` (fractional k), ``slice`` (integer k) or
``position_mm`` (LPS, converted with the affine); presence as ``present`` (bool, or a probability: >= 0.5 means
present) or ``in_scan``, default present.

Arrays are indexed ``[k, j, i]``; ``affine`` maps (i, j, k) voxel indices to LPS mm (see :mod:`.hemisphere`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bundles.s2cac_coronary_calcium.scripts import scoring  # importable: see this package's __init__

from .hemisphere import SIDES, MidSagittalPlane, estimate_midsagittal_plane

SEGMENTS = ("cervical", "petrous", "cavernous", "supraclinoid")
BOUNDARIES = ("cervical_petrous", "petrous_cavernous", "cavernous_supraclinoid")
LABEL_NAMES: dict[int, str] = {
    1 + s * 4 + g: f"{side} {seg}" for s, side in enumerate(SIDES) for g, seg in enumerate(SEGMENTS)
}
PRESENCE_THRESHOLD = 0.5
# On 150 head phantoms (seed 7, head roll up to 10 degrees) each boundary's left and right heights differed by at most
# 11.3 mm. The demo DST weights, trained on `small` heads, put them 41 and 82 mm apart on 2 of 8 `medium` heads.
# 25 mm leaves room for a head rolled by about 25 degrees (the ICAs are ~55 mm apart at the skull base).
MAX_SIDE_DIFFERENCE_MM = 25.0
RULE = (
    "side: sign of the distance to the mid-sagittal plane; segment: slice index k against the side's boundary "
    "slices b1 <= b2 <= b3 (cervical k < b1, petrous b1 <= k < b2, cavernous b2 <= k < b3, supraclinoid k >= b3)"
)


def label_value(side: int, segment: int) -> int:
    return 1 + side * 4 + segment


@dataclass(frozen=True)
class SegmentMapping:
    """Result of :func:`map_segments`: the label map [k, j, i] (uint8, 0 and 1..8), scores and what produced them."""

    labels: np.ndarray
    score: scoring.CalciumScore
    plane: MidSagittalPlane
    boundaries: dict[str, list[float]]  # per side, b1..b3 in slice index; -inf below / +inf above the scan
    warnings: list[str] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, scoring.LabelScore]]:
        """{side: {segment: LabelScore, ..., "total": LabelScore}}."""
        out: dict[str, dict[str, scoring.LabelScore]] = {}
        for s, side in enumerate(SIDES):
            rows = {seg: self.score.per_label[LABEL_NAMES[label_value(s, g)]] for g, seg in enumerate(SEGMENTS)}
            rows["total"] = scoring.LabelScore(
                agatston=sum(r.agatston for r in rows.values()),
                volume_mm3=sum(r.volume_mm3 for r in rows.values()),
                mass_mg=sum(r.mass_mg for r in rows.values()),
                lesions_2d_agatston=sum(r.lesions_2d_agatston for r in rows.values()),
                lesions_3d=sum(r.lesions_3d for r in rows.values()),
            )
            out[side] = rows
        return out

    def report(self) -> dict[str, Any]:
        """JSON-friendly, unrounded."""

        def place(b: float) -> float | str | None:
            if math.isnan(b):
                return None  # no landmarks for a side without calcium
            return "below scan" if b == -math.inf else "above scan" if b == math.inf else float(b)

        return {
            "sides": {side: {k: v.as_dict() for k, v in rows.items()} for side, rows in self.table().items()},
            "total": self.score.total.as_dict(),
            "boundaries_slice_index": {side: [place(b) for b in bs] for side, bs in self.boundaries.items()},
            "plane": self.plane.as_dict(),
            "label_values": {name: value for value, name in LABEL_NAMES.items()},
            "slice_increment_mm": self.score.slice_increment_mm,
            "pixel_spacing_mm": list(self.score.pixel_spacing_mm),
            "mass_calibration": self.score.mass_calibration,
            "rule": RULE,
            "warnings": list(self.warnings),
        }


def _side_and_boundary(item: Mapping[str, Any], n: int) -> tuple[str, int]:
    side, boundary = item.get("side"), item.get("boundary")
    name = item.get("name")
    if (side is None or boundary is None) and isinstance(name, str):
        prefix, _, rest = name.partition("_")
        side = side if side is not None else prefix
        if boundary is None and rest in BOUNDARIES:
            boundary = BOUNDARIES.index(rest) + 1
    if side not in SIDES:
        raise ValueError(f"landmark {n}: side must be 'right' or 'left' (or a name like 'right_cervical_petrous')")
    if isinstance(boundary, bool) or not isinstance(boundary, int | float) or boundary not in (1, 2, 3):
        raise ValueError(f"landmark {n}: boundary must be 1, 2 or 3, got {boundary!r}")
    return side, int(boundary)


def _present(item: Mapping[str, Any], n: int) -> bool:
    value = item.get("present", item.get("in_scan", True))
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1:
        return value >= PRESENCE_THRESHOLD
    raise ValueError(f"landmark {n}: present must be true/false or a probability in [0, 1], got {value!r}")


def _slice_position(item: Mapping[str, Any], n: int, affine: np.ndarray | None) -> float:
    for key in ("slice_index", "slice"):
        value = item.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"landmark {n}: {key} must be a number, got {value!r}")
            return float(value)
    position = item.get("position_mm")
    if position is not None:
        p = np.asarray(position, dtype=np.float64) if _is_number_list(position, 3) else None
        if p is None:
            raise ValueError(f"landmark {n}: position_mm must be three numbers (LPS mm), got {position!r}")
        if affine is None:
            raise ValueError(f"landmark {n}: position_mm needs the image affine")
        a = np.asarray(affine, dtype=np.float64)
        return float(np.linalg.solve(a[:3, :3], p - a[:3, 3])[2])
    raise ValueError(f"landmark {n}: a present landmark needs slice_index, slice or position_mm")


def _is_number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == length
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def parse_landmarks(data: Any, affine: np.ndarray | None = None) -> dict[str, list[float | None]]:
    """{side: [b1, b2, b3]} slice positions, None where absent. ``data``: a list of landmark dicts or a dict with
    "landmarks" (e.g. a head phantom's truth.json). Raises ValueError on malformed input."""
    items = data.get("landmarks") if isinstance(data, Mapping) else data
    if not isinstance(items, list) or not all(isinstance(x, Mapping) for x in items):
        raise ValueError("landmarks must be a list of objects (or an object with a 'landmarks' list)")
    out: dict[str, list[float | None]] = {side: [None, None, None] for side in SIDES}
    seen: set[tuple[str, int]] = set()
    for n, item in enumerate(items):
        side, boundary = _side_and_boundary(item, n)
        if (side, boundary) in seen:
            raise ValueError(f"landmark {n}: {side} boundary {boundary} is given twice")
        seen.add((side, boundary))
        if _present(item, n):
            out[side][boundary - 1] = _slice_position(item, n, affine)
    return out


def boundary_thresholds(positions: Sequence[float | None], side: str) -> tuple[list[float], list[str]]:
    """b1..b3 of one side with absent boundaries placed below (-inf) or above (+inf) the scan; see the docstring.

    Returns (thresholds, warnings). Raises ValueError when an absent boundary lies between present ones or no
    boundary is present.
    """
    present = [i for i, b in enumerate(positions) if b is not None]
    if not present:
        raise ValueError(f"no {side} ICA boundary landmark is present: cannot map {side} calcium to segments")
    out: list[float] = []
    for i, b in enumerate(positions):
        if b is not None:
            out.append(float(b))
        elif i < present[0]:
            out.append(-math.inf)
        elif i > present[-1]:
            out.append(math.inf)
        else:
            raise ValueError(f"{side} boundary {i + 1} is absent while boundaries on both sides of it are present")
    warnings = []
    fixed = np.maximum.accumulate(out).tolist()
    if fixed != out:
        warnings.append(f"{side} boundaries out of order {out}; used their running maximum {fixed}")
    return fixed, warnings


def side_disagreements(
    positions: Mapping[str, Sequence[float | None]], affine: np.ndarray, max_mm: float = MAX_SIDE_DIFFERENCE_MM
) -> list[str]:
    """One sentence per boundary whose left and right heights differ by more than ``max_mm`` (see the docstring).

    ``positions``: :func:`parse_landmarks`'s slice positions; the height of slice k is the LPS z of the affine.
    """
    dz_per_slice = float(np.asarray(affine, dtype=np.float64)[2, 2])
    problems = []
    for b, name in enumerate(BOUNDARIES):
        right, left = positions["right"][b], positions["left"][b]
        if right is None or left is None:
            continue
        dz = (left - right) * dz_per_slice
        if abs(dz) > max_mm:
            problems.append(
                f"the left {name.replace('_', '-')} boundary lies {abs(dz):.0f} mm {'above' if dz > 0 else 'below'} "
                f"the right one (the two sides' boundaries lie within {max_mm:g} mm of each other)"
            )
    return problems


def map_segments(
    image: np.ndarray,
    calcium_mask: np.ndarray,
    affine: np.ndarray,
    landmarks: Any,
    plane: MidSagittalPlane | None = None,
    *,
    spacing: Sequence[float] | None = None,
    mass_calibration: float = scoring.DEFAULT_MASS_CALIBRATION,
    max_side_difference_mm: float = MAX_SIDE_DIFFERENCE_MM,
) -> SegmentMapping:
    """Assign every calcium voxel to side and segment and score each (see the module docstring).

    Args:
        image: HU array [k, j, i].
        calcium_mask: ICA calcium mask of the same shape (nonzero = calcium candidate; the scorer applies 130 HU).
        affine: 4x4 LPS affine of (i, j, k).
        landmarks: see :func:`parse_landmarks`.
        plane: the mid-sagittal plane; estimated from the image when None.
        spacing: (row, col, increment) mm for the scorer; from the affine when None.
        mass_calibration: mg HA/cm^3 per HU (see ``scoring``).
        max_side_difference_mm: the largest plausible height difference of a boundary between the sides.
    """
    image, mask = np.asarray(image), np.asarray(calcium_mask)
    if image.ndim != 3 or image.shape != mask.shape:
        raise ValueError(f"image and calcium mask must be 3D of one shape, got {image.shape} and {mask.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    positions = parse_landmarks(landmarks, affine)
    implausible = side_disagreements(positions, affine, max_side_difference_mm)
    if implausible and mask.any():
        raise ValueError("implausible landmarks: " + "; ".join(implausible))
    if plane is None:
        plane = estimate_midsagittal_plane(image, affine)
    if spacing is None:
        spacing = scoring.spacing_from_affine(affine, axis_order="ijk")

    kji = np.argwhere(mask != 0)
    side = plane.side_of_voxels(kji, affine) if len(kji) else np.zeros(0, dtype=np.uint8)
    labels = np.zeros(mask.shape, dtype=np.uint8)
    boundaries: dict[str, list[float]] = {}
    warnings = [f"implausible landmarks (no calcium to map): {text}" for text in implausible]
    for s, name in enumerate(SIDES):
        on_side = side == s
        try:
            thresholds, notes = boundary_thresholds(positions[name], name)
        except ValueError:
            if on_side.any():
                raise
            thresholds, notes = [math.nan] * 3, [f"no {name} boundary landmarks (no {name} calcium to map)"]
        boundaries[name], warnings = thresholds, warnings + notes
        if on_side.any():
            segment = np.searchsorted(np.asarray(thresholds), kji[on_side, 0].astype(np.float64), side="right")
            labels[tuple(kji[on_side].T)] = label_value(s, 0) + segment
    score = scoring.score_calcium(image, labels, spacing, label_names=LABEL_NAMES, mass_calibration=mass_calibration)
    return SegmentMapping(labels=labels, score=score, plane=plane, boundaries=boundaries, warnings=warnings)
