"""The two fixed segment sets of the app's SEGs: coronary (LM, LAD, LCX, RCA) and ICA (side x segment).

Segment numbers equal the label values of the models' label maps and never change, so a calcium-free study
still carries every segment. Each segment's ``name`` is the key the scorer reports it under
(``scoring.DEFAULT_LABEL_NAMES`` for the coronaries, ``segments.LABEL_NAMES`` of the DST bundle for the ICA).
Display colours (RGB, stored as CIELab): coronaries in distinct hues; right ICA warm, left ICA cool, darker
distally.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code

from deploy_app import dicom_codes as dc
from deploy_app.dicom_output import Algorithm
from deploy_app.models import MODELS


@dataclass(frozen=True)
class SegmentSpec:
    number: int
    name: str  # the scorer's label name
    label: str  # SegmentLabel shown by viewers
    artery: Code
    rgb: tuple[int, int, int]
    laterality: Code | None = None
    artery_segment: Code | None = None  # part of the artery (ICA segments; private codes)


@dataclass(frozen=True)
class SegmentSet:
    name: str
    segments: tuple[SegmentSpec, ...]
    score_concept: Code  # Agatston measurement name
    total_site: Code  # finding site of the total
    procedure: Code  # SR procedure reported
    has_risk_category: bool  # the risk categories are defined for the coronary total only
    body_part: str  # BodyPartExamined (PS3.16 Annex L) of an image derived from a source that does not name one

    def __post_init__(self) -> None:
        numbers = [s.number for s in self.segments]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"segment numbers must be 1..N without gaps, got {numbers}")

    def by_name(self, name: str) -> SegmentSpec:
        for spec in self.segments:
            if spec.name == name:
                return spec
        raise KeyError(name)


CORONARY = SegmentSet(
    name="coronary",
    segments=(
        SegmentSpec(1, "LM", "LM calcium", dc.LEFT_MAIN, (255, 215, 0)),
        SegmentSpec(2, "LAD", "LAD calcium", dc.LAD, (230, 40, 40)),
        SegmentSpec(3, "LCX", "LCX calcium", dc.LCX, (40, 180, 60)),
        SegmentSpec(4, "RCA", "RCA calcium", dc.RCA, (40, 110, 235)),
    ),
    score_concept=dc.CORONARY_CALCIUM_SCORE,
    total_site=dc.CORONARY_ARTERY,
    procedure=dc.CT_UNSPECIFIED,
    has_risk_category=True,
    body_part="HEART",
)

_ICA_SIDES = (("right", dc.RIGHT), ("left", dc.LEFT))  # side 0 right, 1 left (label = 1 + side * 4 + segment)
_ICA_RGB = {
    "right": ((255, 190, 60), (255, 130, 0), (225, 50, 30), (170, 0, 60)),
    "left": ((90, 220, 220), (0, 150, 255), (50, 70, 230), (110, 30, 180)),
}
ICA = SegmentSet(
    name="ica",
    segments=tuple(
        SegmentSpec(
            number=1 + side_index * 4 + seg_index,
            name=f"{side} {segment}",
            label=f"{side.capitalize()} ICA {segment} calcium",
            artery=dc.ICA,
            rgb=_ICA_RGB[side][seg_index],
            laterality=laterality,
            artery_segment=code,
        )
        for side_index, (side, laterality) in enumerate(_ICA_SIDES)
        for seg_index, (segment, code) in enumerate(dc.ICA_SEGMENTS.items())
    ),
    score_concept=dc.CALCIUM_SCORE,
    total_site=dc.ICA,
    procedure=dc.CT_UNSPECIFIED,
    has_risk_category=False,
    body_part="HEAD",
)

SEGMENT_SETS = {s.name: s for s in (CORONARY, ICA)}


def get_segment_set(segment_set: str | SegmentSet) -> SegmentSet:
    if isinstance(segment_set, SegmentSet):
        return segment_set
    try:
        return SEGMENT_SETS[segment_set]
    except KeyError:
        raise ValueError(f"unknown segment set {segment_set!r}; choose one of {sorted(SEGMENT_SETS)}") from None


def default_algorithm(segment_set: str | SegmentSet) -> Algorithm:
    """The algorithm behind a segment set, versioned by its models' bundle metadata."""
    if get_segment_set(segment_set).name == "coronary":
        return Algorithm("CalciMap S2CAC", MODELS["s2cac_coronary"].version)
    return Algorithm("CalciMap S2CAC+DST", f"{MODELS['s2cac_ica'].version}+{MODELS['dst_landmarks'].version}")
