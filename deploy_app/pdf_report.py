"""The reader's PDF report: the app's report dict (results.json) and key images -> A4 PDF bytes.

Page 1 (and following, as the content needs): header with the patient and study, then per path (coronary on
non-contrast chest CT, ICA on head CT) the series used and its acquisition facts, "Agatston-equivalent" with the
reason when the acquisition is not standard, the per-vessel / per-segment table (Agatston, volume, mass,
lesions; total in bold), the coronary risk category with its definition, the quality findings and the series
considered; or "Not scored: <reason>" instead of the table. Then one page of key images per scored path: the
axial slices with the most calcium (one per vessel or segment with calcium, at most ``MAX_KEY_SLICES``), each
as the whole slice and a zoomed crop, the scored voxels (>= 130 HU inside a label, what the score counts)
coloured with the segment set's colours, slice position and scale bars. Every page carries a footer with the
app and model versions and "not for diagnostic use".

Numbers are rounded for the reader (1 decimal) here only; results.json keeps them unrounded and the risk
category comes from the unrounded total (the report says so). Rendering uses matplotlib's PDF backend through
``Figure`` objects (no pyplot, no display, no global backend switch) with embedded DejaVu Sans (text a PDF reader
can search and extract) and no creation date, so that the same input gives the same bytes.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import matplotlib
import matplotlib.lines
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text
from pydicom.valuerep import PersonName

from bundles.s2cac_coronary_calcium.scripts.scoring import (
    CALCIUM_THRESHOLD_HU,
    MIN_LESION_AREA_MM2,
    STANDARD_KVP,
    STANDARD_THICKNESS_RANGE_MM,
)
from deploy_app.overlay import WINDOWS, labelled_slices, orientation_label, overlay_rgb, scored_voxels
from deploy_app.segment_sets import SegmentSet, get_segment_set

logger = logging.getLogger(__name__)

PAGE_IN = (8.27, 11.69)  # A4 portrait, inches
MARGIN_IN = 0.6
FOOTER_IN = 0.75  # space kept free at the bottom of every page for the footer
MAX_KEY_SLICES = 4
NOT_FOR_DIAGNOSTIC_USE = "Research software \u2014 not for diagnostic use"
PATH_TITLES = {
    "coronary": "Coronary artery calcium \u2014 non-contrast chest CT",
    "ica": "Intracranial internal carotid artery (ICA) calcium \u2014 head CT",
}
MISSING_PATH_LINES = {
    "coronary": "No non-contrast chest CT series in this study: coronary calcium was not assessed.",
    "ica": "No head CT series in this study: ICA calcium was not assessed.",
}
CORONARY_NAMES = {
    "LM": "Left main (LM)",
    "LAD": "Left anterior descending (LAD)",
    "LCX": "Left circumflex (LCX)",
    "RCA": "Right coronary artery (RCA)",
}
# Risk categories of the unrounded total Agatston score S (DESIGN.md, "Scoring definitions").
RISK_DEFINITIONS = {
    "0": "S = 0",
    "I": "0 < S \u2264 10",
    "II": "10 < S \u2264 100",
    "III": "100 < S \u2264 400",
    "IV": "S > 400",
}
CROP_MM = {"coronary": 60.0, "ica": 50.0}

_TIMES = " \u00d7 "
_GREY = "#555555"
_LIGHT = "#e8ecf0"
_RED = "#b00020"
_AMBER = "#8a5a00"
# Type 3 fonts (matplotlib's default): glyph outlines drawn by the PDF, text searchable through a ToUnicode map.
# TrueType (Type 42) embedding subsets each font with fontTools, which parses DejaVu's large layout tables: it
# took 0.4 s of a 1.2 s report (3 fonts), Type 3 takes a tenth of that. The price: a font with characters beyond
# Latin-1 (an em dash, a ">=") goes in as two subsets of 256 glyphs, a few kB more.
_FONT = {"pdf.fonttype": 3, "ps.fonttype": 3, "font.family": "DejaVu Sans"}
NO_LIGATURES = ("-liga",)


@dataclass(frozen=True)
class KeyImages:
    """What the report draws for one path: the scored volume and its label map on the same [k, j, i] grid.

    ``labels`` holds segment numbers of the path's segment set (0 = none); the overlay shows the voxels the
    score counts (label > 0 and HU >= 130). ``slice_positions_mm``, when given, is each slice's position along
    the slice normal (from ImagePositionPatient); otherwise positions are counted from the first slice.
    """

    hu: np.ndarray
    labels: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    increment_mm: float
    slice_positions_mm: tuple[float, ...] | None = None
    # LPS unit directions of increasing column index i and row index j (DICOM ImageOrientationPatient): when
    # given, the images carry orientation letters at their edges.
    in_plane_directions_lps: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    def __post_init__(self) -> None:
        hu, labels = np.asarray(self.hu), np.asarray(self.labels)
        if hu.ndim != 3 or hu.shape != labels.shape:
            raise ValueError(f"key images need hu and labels of one 3D shape [k, j, i], got {hu.shape}, {labels.shape}")
        if labels.dtype.kind not in "iub":
            raise ValueError(f"key image labels must be integers, got dtype {labels.dtype}")
        spacing = (*self.pixel_spacing_mm, self.increment_mm)
        if len(spacing) != 3 or not all(math.isfinite(float(v)) and float(v) > 0 for v in spacing):
            raise ValueError(f"pixel spacing and increment must be positive mm, got {spacing}")
        if self.slice_positions_mm is not None and len(self.slice_positions_mm) != hu.shape[0]:
            raise ValueError(f"{len(self.slice_positions_mm)} slice positions for {hu.shape[0]} slices")
        if self.in_plane_directions_lps is not None:
            d = np.asarray(self.in_plane_directions_lps, dtype=float)
            if d.shape != (2, 3) or not np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-3):
                raise ValueError(f"in-plane directions must be two LPS unit vectors, got {d.tolist()}")

    @cached_property
    def scored(self) -> np.ndarray:
        """``labels`` where the score counts the voxel (HU >= 130), else 0."""
        return scored_voxels(self.hu, self.labels)

    def position_mm(self, k: int) -> float:
        if self.slice_positions_mm is not None:
            return float(self.slice_positions_mm[k])
        return k * float(self.increment_mm)


@dataclass(frozen=True)
class KeySlice:
    """One key image: slice ``k`` and the segment numbers with scored calcium in it (empty: no calcium)."""

    k: int
    segments: tuple[int, ...]


def select_key_slices(images: KeyImages, max_slices: int = MAX_KEY_SLICES) -> list[KeySlice]:
    """The slices to show: per segment with calcium, its slice with the most scored voxels; at most
    ``max_slices``, the segments with the most calcium first, shown in slice order. No calcium: the middle slice.
    """
    scored = images.scored
    ks = labelled_slices(scored)
    if not ks.size:
        return [KeySlice(scored.shape[0] // 2, ())]
    n_segments = int(scored[ks].max()) + 1
    counts = np.stack([np.bincount(scored[k].ravel(), minlength=n_segments) for k in ks])  # [n, s]: slice ks[n]
    totals = counts.sum(axis=0)
    chosen: list[int] = []  # rows of counts
    for s in sorted(np.flatnonzero(totals[1:]) + 1, key=lambda s: (-totals[s], s)):
        n = int(np.argmax(counts[:, s]))
        if n not in chosen and len(chosen) < max_slices:
            chosen.append(n)
    return [KeySlice(int(ks[n]), tuple(int(s) for s in np.flatnonzero(counts[n, 1:]) + 1)) for n in sorted(chosen)]


# ----------------------------------------------------------------------------------------------- formatting


def fmt_number(value: Any, digits: int = 1) -> str:
    """A score as printed in the report (1 decimal by default); '\u2014' when unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2014"
    return f"{float(value):.{digits}f}"


def _fmt_date(value: str) -> str:
    value = (value or "").strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "\u2014"


def _fmt_time(value: str) -> str:
    value = (value or "").strip().split(".")[0]
    if len(value) >= 4 and value[:4].isdigit():
        return f"{value[:2]}:{value[2:4]}"
    return value


def _fmt_name(value: str) -> str:
    if not value:
        return "\u2014"
    name = PersonName(value)
    parts = [p for p in (name.family_name, name.given_name, name.middle_name) if p]
    return (parts[0] + (", " + " ".join(parts[1:]) if len(parts) > 1 else "")) if parts else str(value)


def _fmt_sex(value: str) -> str:
    return {"M": "male", "F": "female", "O": "other"}.get((value or "").strip().upper(), value or "\u2014")


def _fmt_mm(value: Any) -> str:
    return "unknown" if value in (None, "") else f"{float(value):g} mm"


def _number(series: Mapping[str, Any]) -> str:
    value = series.get("series_number")
    return "?" if value in (None, "") else str(value)


def _segment_title(seg_set: SegmentSet, name: str) -> str:
    if seg_set.name == "coronary":
        return CORONARY_NAMES.get(name, name)
    spec = seg_set.by_name(name)
    return spec.label.removesuffix(" calcium")


def _series_line(series: Mapping[str, Any]) -> str:
    desc = series.get("series_description") or "no description"
    spacing = series.get("pixel_spacing_mm") or []
    facts = [
        f"{_fmt_mm(series.get('thickness_mm'))} slices every {_fmt_mm(series.get('increment_mm'))}",
        f"pixel {_TIMES.join(f'{float(v):.2f}' for v in spacing)} mm" if spacing else "pixel size unknown",
        f"{float(series['kvp']):g} kVp" if series.get("kvp") not in (None, "") else "kVp unknown",
        f"kernel {series.get('kernel') or 'unknown'}",
    ]
    if series.get("tilt_deg") not in (None, "") and abs(float(series["tilt_deg"])) > 0.05:
        facts.append(f"gantry tilt {float(series['tilt_deg']):.1f}\u00b0")
    if series.get("slices"):
        facts.append(f"{int(series['slices'])} slices")
    if series.get("manufacturer"):
        facts.append(str(series["manufacturer"]))
    return f"Series {_number(series)} \u201c{desc}\u201d: " + ", ".join(facts)


def _equivalent_reasons(path: Mapping[str, Any]) -> list[str] | None:
    """Why the score is Agatston-equivalent (the score's acquisition note: the scorer's, or the series
    selection's non-standard findings), or None for a standard acquisition."""
    selection = path.get("selection") or {}
    scores = path.get("scores") or {}
    flagged = selection.get("standard") is False or bool(scores.get("agatston_equivalent"))
    if not flagged:
        return None
    note = str(scores.get("acquisition_note") or "")
    return list(dict.fromkeys(r.strip() for r in note.split(";") if r.strip()))


# ----------------------------------------------------------------------------------------------- page flow


class _Pages:
    """A top-to-bottom flow of text and tables over A4 figures, in inches from the top-left corner."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.section = ""  # the heading in force: repeated as "(continued)" when the flow breaks a page
        self.fig: Figure = self.new_page()
        self.y = MARGIN_IN

    def new_page(self) -> Figure:
        fig = Figure(figsize=PAGE_IN)
        self.figures.append(fig)
        self.fig, self.y = fig, MARGIN_IN
        return fig

    @property
    def width(self) -> float:
        return PAGE_IN[0] - 2 * MARGIN_IN

    def ensure(self, height: float) -> None:
        if self.y + height > PAGE_IN[1] - FOOTER_IN and self.y > MARGIN_IN + 0.01:
            self.new_page()
            if self.section:
                self.text(MARGIN_IN, self.y, f"{self.section} (continued)", 8.5, color=_GREY, style="italic")
                self.y += 0.3

    def text(self, x: float, y: float, s: str, size: float = 9.0, **kwargs: Any) -> None:
        """Text with its top-left (or ``ha``) at (x, y) inches from the page's top-left."""
        kwargs.setdefault("va", "top")
        self.fig.text(x / PAGE_IN[0], 1 - y / PAGE_IN[1], s, fontsize=size, **kwargs)

    def rect(self, x: float, y: float, w: float, h: float, color: str) -> None:
        self.fig.add_artist(
            Rectangle(
                (x / PAGE_IN[0], 1 - (y + h) / PAGE_IN[1]),
                w / PAGE_IN[0],
                h / PAGE_IN[1],
                transform=self.fig.transFigure,
                facecolor=color,
                edgecolor="none",
                zorder=0,
            )
        )

    def hline(self, y: float, x0: float | None = None, x1: float | None = None, **kwargs: Any) -> None:
        x0 = MARGIN_IN if x0 is None else x0
        x1 = PAGE_IN[0] - MARGIN_IN if x1 is None else x1
        kwargs.setdefault("color", "#999999")
        kwargs.setdefault("linewidth", 0.5)
        self.fig.add_artist(
            matplotlib.lines.Line2D(
                [x0 / PAGE_IN[0], x1 / PAGE_IN[0]], [1 - y / PAGE_IN[1]] * 2, transform=self.fig.transFigure, **kwargs
            )
        )

    @staticmethod
    def wrap(s: str, size: float, width_in: float, bold: bool = False) -> list[str]:
        em = 0.62 if bold else 0.56  # DejaVu Sans: average character width in em (bold is wider)
        per_line = max(10, int(width_in * 72 / (size * em)))
        return textwrap.wrap(s, per_line) or [""]

    def paragraph(self, s: str, size: float = 9.0, indent: float = 0.0, gap: float = 0.04, **kwargs: Any) -> None:
        lines = self.wrap(s, size, self.width - indent, bold=kwargs.get("weight") == "bold")
        line_h = size * 1.35 / 72
        for line in lines:
            self.ensure(line_h)
            self.text(MARGIN_IN + indent, self.y, line, size, **kwargs)
            self.y += line_h
        self.y += gap

    def heading(self, s: str) -> None:
        self.section = ""
        self.ensure(0.9)  # a heading never ends a page
        self.section = s
        self.y += 0.12
        self.rect(MARGIN_IN, self.y, self.width, 0.28, _LIGHT)
        self.text(MARGIN_IN + 0.08, self.y + 0.06, s, 11.5, weight="bold")
        self.y += 0.38

    def subheading(self, s: str) -> None:
        self.ensure(0.5)
        self.text(MARGIN_IN, self.y, s, 9.5, weight="bold")
        self.y += 0.2

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        widths: Sequence[float],
        *,
        align: Sequence[str],
        bold_last: bool = False,
        size: float = 8.5,
        wrap_column: int | None = None,
        colours: Sequence[Sequence[str | None]] | None = None,
    ) -> None:
        """A ruled table; column ``wrap_column`` wraps its text, the others are one line; ``colours`` per cell."""
        line_h = size * 1.3 / 72
        pad = 0.05

        def draw_row(cells: Sequence[str], weight: str, shade: str | None, cell_colours: Sequence[str | None]) -> None:
            wrapped = [self.wrap(c, size, widths[i] - 0.1) if i == wrap_column else [c] for i, c in enumerate(cells)]
            h = max(len(w) for w in wrapped) * line_h + 2 * pad
            self.ensure(h)
            if shade:
                self.rect(MARGIN_IN, self.y, sum(widths), h, shade)
            x = MARGIN_IN
            for i, lines in enumerate(wrapped):
                right = align[i] == "right"
                tx = x + widths[i] - 0.06 if right else x + 0.06
                for n, line in enumerate(lines):
                    self.text(
                        tx,
                        self.y + pad + n * line_h,
                        line,
                        size,
                        ha="right" if right else "left",
                        weight=weight,
                        color=cell_colours[i] or "black",
                    )
                x += widths[i]
            self.y += h
            self.hline(self.y, MARGIN_IN, MARGIN_IN + sum(widths), color="#bbbbbb")

        self.hline(self.y, MARGIN_IN, MARGIN_IN + sum(widths), color="#333333", linewidth=0.8)
        draw_row(columns, "bold", _LIGHT, [None] * len(columns))
        for n, row in enumerate(rows):
            weight = "bold" if bold_last and n == len(rows) - 1 else "normal"
            draw_row(row, weight, None, colours[n] if colours else [None] * len(row))
        self.y += 0.1


# ----------------------------------------------------------------------------------------------- page 1


def _header(pages: _Pages, report: Mapping[str, Any]) -> None:
    study = report.get("study") or {}
    app = report.get("app") or {}
    pages.text(MARGIN_IN, pages.y, "Vascular calcium report", 17, weight="bold")
    pages.text(
        PAGE_IN[0] - MARGIN_IN, pages.y + 0.02, NOT_FOR_DIAGNOSTIC_USE, 9.5, ha="right", color=_RED, weight="bold"
    )
    pages.text(
        PAGE_IN[0] - MARGIN_IN,
        pages.y + 0.22,
        f"{app.get('name', 'CalciMap')} {app.get('version', '')}".strip() + " \u2014 automated calcium scoring",
        8,
        ha="right",
        color=_GREY,
    )
    pages.y += 0.45
    pages.hline(pages.y, color="#333333", linewidth=1.0)
    pages.y += 0.1
    date = _fmt_date(study.get("study_date", ""))
    if study.get("study_time"):
        date += " " + _fmt_time(study["study_time"])
    left = [
        ("Patient", _fmt_name(study.get("patient_name", ""))),
        ("Patient ID", study.get("patient_id") or "\u2014"),
        ("Sex", _fmt_sex(study.get("patient_sex", ""))),
        ("Birth date", _fmt_date(study.get("patient_birth_date", ""))),
    ]
    right = [
        ("Study date", date),
        ("Accession", study.get("accession_number") or "\u2014"),
        ("Study", study.get("study_description") or "\u2014"),
        ("Institution", study.get("institution_name") or "\u2014"),
    ]
    half = pages.width / 2
    for n, ((lk, lv), (rk, rv)) in enumerate(zip(left, right, strict=True)):
        y = pages.y + n * 0.19
        pages.text(MARGIN_IN, y, lk, 8.5, color=_GREY)
        pages.text(MARGIN_IN + 0.95, y, str(lv)[:44], 9, weight="bold" if n == 0 else "normal")
        pages.text(MARGIN_IN + half, y, rk, 8.5, color=_GREY)
        pages.text(MARGIN_IN + half + 0.95, y, str(rv)[:44], 9)
    pages.y += 4 * 0.19 + 0.05
    pages.hline(pages.y)
    pages.y += 0.05


def _score_table(pages: _Pages, path: Mapping[str, Any], seg_set: SegmentSet, equivalent: bool) -> None:
    scores = path["scores"]
    per_label = scores.get("per_label") or {}
    score_name = "Agatston-equivalent" if equivalent else "Agatston"
    columns = [
        "Vessel" if seg_set.name == "coronary" else "Segment",
        score_name,
        "Volume (mm\u00b3)",
        "Mass (mg)",
        "Lesions",
    ]
    rows = []
    for spec in seg_set.segments:
        s = per_label.get(spec.name)
        if s is None:
            raise ValueError(f"the {seg_set.name} scores have no entry for {spec.name!r}")
        rows.append(
            [
                _segment_title(seg_set, spec.name),
                fmt_number(s.get("agatston")),
                fmt_number(s.get("volume_mm3")),
                fmt_number(s.get("mass_mg")),
                str(int(s.get("lesions_2d_agatston", 0))),
            ]
        )
    total = scores.get("total") or {}
    rows.append(
        [
            "Total",
            fmt_number(total.get("agatston")),
            fmt_number(total.get("volume_mm3")),
            fmt_number(total.get("mass_mg")),
            str(int(total.get("lesions_2d_agatston", 0))),
        ]
    )
    pages.table(
        columns, rows, [2.55, 1.35, 1.1, 1.0, 0.75], align=["left", "right", "right", "right", "right"], bold_last=True
    )


def _risk(pages: _Pages, scores: Mapping[str, Any], equivalent: bool) -> None:
    category = str(scores.get("risk_category", ""))
    if category not in RISK_DEFINITIONS:
        raise ValueError(f"unknown risk category {category!r}; expected one of {list(RISK_DEFINITIONS)}")
    total = fmt_number((scores.get("total") or {}).get("agatston"))
    pages.ensure(0.6)
    pages.text(MARGIN_IN, pages.y, f"Risk category {category}", 11, weight="bold")
    pages.text(
        MARGIN_IN + 1.65,
        pages.y + 0.02,
        f"total Agatston{'-equivalent' if equivalent else ''} score S = {total}; category {category}: "
        f"{RISK_DEFINITIONS[category]}",
        9,
    )
    pages.y += 0.24
    ladder = "; ".join(f"{c}: {d}" for c, d in RISK_DEFINITIONS.items())
    pages.paragraph(
        f"Categories of the total Agatston score S: {ladder}. The category is taken from the unrounded total.",
        7.5,
        color=_GREY,
    )


def _quality(pages: _Pages, path: Mapping[str, Any]) -> None:
    findings = path.get("quality") or []
    if not findings:
        return
    pages.subheading("Quality checks")
    rows, colours = [], []
    for f in findings:
        if f.get("passed"):
            result, colour = "passed", None
        elif f.get("blocking"):
            result, colour = "FAILED (blocking)", _RED
        else:
            result, colour = "failed (advisory)", _AMBER
        rows.append([str(f.get("check", "")), result, str(f.get("detail", ""))])
        colours.append([None, colour, None])
    pages.table(
        ["Check", "Result", "Detail"],
        rows,
        [1.75, 1.25, 3.75],
        align=["left", "left", "left"],
        size=8,
        wrap_column=2,
        colours=colours,
    )


def _candidates(pages: _Pages, path: Mapping[str, Any]) -> None:
    selection = path.get("selection") or {}
    used = (path.get("series") or {}).get("series_uid")
    others = [c for c in selection.get("candidates") or [] if c.get("series_uid") != used]
    if not others:
        return
    items = []
    for c in sorted(others, key=lambda c: (c.get("rank") is None, c.get("rank") or 0)):
        why = "; ".join(str(r) for r in c.get("reasons") or []) or ("matched" if c.get("matched") else "not matched")
        items.append(f"series {_number(c)} \u201c{c.get('description') or ''}\u201d ({why})")
    pages.paragraph("Other series considered, not used: " + "; ".join(items) + ".", 7.5, color=_GREY)


def _landmarks(pages: _Pages, path: Mapping[str, Any]) -> None:
    marks = path.get("landmarks") or []
    if not marks:
        return
    items = []
    for m in marks:
        side, *segments = str(m.get("name", "")).split("_")  # e.g. right_cervical_petrous
        name = f"{side} {chr(0x2013).join(segments)} boundary"
        if m.get("present", True) and m.get("slice") is not None:
            # slices counted from 1, as in the key images' captions
            items.append(f"{name} at slice {int(m['slice']) + 1} (z {fmt_number(m.get('z_mm'))} mm)")
        else:
            items.append(f"{name} not in the scan")
    pages.paragraph(
        "ICA segment boundaries (DST landmarks; segments assigned by axial slice): " + "; ".join(items) + ".",
        7.5,
        color=_GREY,
    )


def _path_section(pages: _Pages, key: str, path: Mapping[str, Any] | None) -> None:
    pages.heading(PATH_TITLES[key])
    if path is None:
        pages.paragraph(MISSING_PATH_LINES[key], 9.5)
        return
    seg_set = get_segment_set(path.get("segment_set") or key)
    series = path.get("series") or {}
    pages.paragraph(_series_line(series), 9)
    reasons = _equivalent_reasons(path)
    equivalent = reasons is not None
    if path.get("scored"):
        if not path.get("scores"):
            raise ValueError(f"the {key} path is marked scored but has no scores")
        if equivalent:
            why = "; ".join(reasons) if reasons else "acquisition outside the Agatston standard"
            lo, hi = STANDARD_THICKNESS_RANGE_MM
            pages.paragraph(
                f"Agatston-equivalent: this acquisition is not the standard one for Agatston scoring "
                f"({lo:g}-{hi:g} mm slices, {STANDARD_KVP:g} kVp, non-sharp kernel): {why}. Compare these scores "
                "with standard Agatston scores only with caution.",
                9,
                color=_AMBER,
                weight="bold",
            )
        _score_table(pages, path, seg_set, equivalent)
        scores = path["scores"]
        if seg_set.has_risk_category:
            _risk(pages, scores, equivalent)
        else:
            pages.paragraph("No risk categories are defined for ICA calcium; the scores are reported as measured.", 8)
        inc = scores.get("slice_increment_mm")
        calib = scores.get("mass_calibration")
        pages.paragraph(
            f"Calcium: voxels \u2265 {CALCIUM_THRESHOLD_HU:g} HU in each vessel label. Lesions: 2D 8-connected "
            f"lesions per slice of \u2265 {MIN_LESION_AREA_MM2:g} mm\u00b2 (those Agatston counts). Agatston uses "
            f"the slice increment ({_fmt_mm(inc)}) / 3 mm; mass calibration {fmt_number(calib, 3)} mg HA/cm\u00b3 "
            "per HU. Values are rounded to 1 decimal.",
            7.5,
            color=_GREY,
        )
    else:
        reason = path.get("not_scored_reason") or "no reason given"
        pages.paragraph(f"Not scored: {reason}", 10, color=_RED, weight="bold", gap=0.1)
    _quality(pages, path)
    _landmarks(pages, path)
    _candidates(pages, path)


# ----------------------------------------------------------------------------------------------- key images


def _scale_bar(ax: Any, x0: float, y0: float, length_mm: float, view_mm: float) -> None:
    """A white bar of ``length_mm`` with its label above it, at (x0, y0) in the axes' mm coordinates (y down)."""
    ax.plot([x0, x0 + length_mm], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt")
    label_y = y0 - 0.025 * view_mm
    ax.text(x0 + length_mm / 2, label_y, f"{length_mm:g} mm", color="white", fontsize=7, ha="center", va="bottom")


def _orientation_marks(ax: Any, x0: float, x1: float, y0: float, y1: float, images: KeyImages) -> None:
    """Orientation letters at the middle of each edge of the view [x0, x1] x [y0, y1] (mm, y down)."""
    if images.in_plane_directions_lps is None:
        return
    along_i, along_j = (np.asarray(d, dtype=float) for d in images.in_plane_directions_lps)
    inset_x, inset_y = 0.03 * (x1 - x0), 0.03 * (y1 - y0)
    style = {"color": "white", "fontsize": 8, "fontweight": "bold"}
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    ax.text(x0 + inset_x, ym, orientation_label(-along_i), ha="left", va="center", **style)
    ax.text(x1 - inset_x, ym, orientation_label(along_i), ha="right", va="center", **style)
    ax.text(xm, y0 + inset_y, orientation_label(-along_j), ha="center", va="top", **style)
    ax.text(xm, y1 - inset_y, orientation_label(along_j), ha="center", va="bottom", **style)


def _image_axes(fig: Figure, x: float, y: float, size: float) -> Any:
    ax = fig.add_axes((x / PAGE_IN[0], 1 - (y + size) / PAGE_IN[1], size / PAGE_IN[0], size / PAGE_IN[1]))
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _key_image_page(pages: _Pages, key: str, path: Mapping[str, Any], images: KeyImages) -> None:
    """One page of key images for a scored path: title, how to read it, the colour legend, the key slices."""
    seg_set = get_segment_set(path.get("segment_set") or key)
    top_label = int(np.asarray(images.labels).max(initial=0))
    if top_label > len(seg_set.segments) or int(np.asarray(images.labels).min(initial=0)) < 0:
        raise ValueError(
            f"the {key} key-image labels hold value {top_label}; the {seg_set.name} segment set has "
            f"segments 1..{len(seg_set.segments)}"
        )
    pages.section = ""
    fig = pages.new_page()
    level, width, window_name = WINDOWS[key]
    title = PATH_TITLES[key].split(" \u2014 ")[0]
    pages.text(MARGIN_IN, pages.y, f"Key images \u2014 {title}", 14, weight="bold")
    pages.y += 0.3
    series = path.get("series") or {}
    pages.paragraph(
        f"Series {_number(series)} \u201c{series.get('series_description') or ''}\u201d. Axial "
        f"slices, {window_name} (W {width:g} / L {level:g} HU). Coloured: voxels \u2265 "
        f"{CALCIUM_THRESHOLD_HU:g} HU in a calcium label (what the score counts). Left: whole slice, the box marks "
        "the enlarged region; right: enlarged region.",
        8.5,
        color=_GREY,
    )
    handles = [
        Patch(facecolor=np.asarray(s.rgb) / 255.0, label=_segment_title(seg_set, s.name)) for s in seg_set.segments
    ]
    ncol = 4
    n_rows = math.ceil(len(handles) / ncol)
    # matplotlib fills legend columns first; reorder so that the legend reads row by row (ICA: right, then left).
    ordered = [handles[r * ncol + c] for c in range(ncol) for r in range(n_rows) if r * ncol + c < len(handles)]
    legend_h = 0.2 * n_rows
    fig.legend(
        handles=ordered,
        loc="upper left",
        bbox_to_anchor=(MARGIN_IN / PAGE_IN[0], 1 - pages.y / PAGE_IN[1]),
        ncol=ncol,
        fontsize=8,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.2,
        borderaxespad=0.0,
    )
    pages.y += legend_h + 0.1

    scored = images.scored
    slices = select_key_slices(images)
    large = len(slices) <= 2  # few key slices: bigger images, caption below instead of beside them
    size = 3.0 if large else 2.05
    for key_slice in slices:
        caption = _key_image_pair(fig, pages.y, size, key, seg_set, images, scored, key_slice)
        if large:
            cap_x, cap_y = MARGIN_IN, pages.y + size + 0.08
        else:
            cap_x, cap_y = MARGIN_IN + 2 * size + 0.35, pages.y + 0.05
        for n, line in enumerate(caption):
            pages.text(cap_x, cap_y + n * 0.17, line, 8.5, weight="bold" if n == 0 else "normal")
        pages.y += size + (0.17 * len(caption) + 0.25 if large else 0.17)


def _key_image_pair(
    fig: Figure,
    top: float,
    size: float,
    key: str,
    seg_set: SegmentSet,
    images: KeyImages,
    scored: np.ndarray,
    key_slice: KeySlice,
) -> list[str]:
    """Draw one key slice (whole slice, and an enlarged crop when it holds calcium) at ``top`` inches from the
    page top; return its caption lines."""
    k = key_slice.k
    row_mm, col_mm = (float(v) for v in images.pixel_spacing_mm)
    n_k, n_j, n_i = scored.shape
    extent = (0.0, n_i * col_mm, n_j * row_mm, 0.0)  # mm, rows downwards as the slice is stored
    rgb = overlay_rgb(np.asarray(images.hu)[k], scored[k], {s.number: s.rgb for s in seg_set.segments}, key)
    ax = _image_axes(fig, MARGIN_IN, top, size)
    ax.imshow(rgb, extent=extent, interpolation="none", aspect="equal")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    _scale_bar(ax, extent[1] * 0.06, extent[2] * 0.94, 50.0 if extent[1] > 120 else 20.0, extent[2])
    _orientation_marks(ax, extent[0], extent[1], extent[3], extent[2], images)
    where = (
        f"z = {images.position_mm(k):.1f} mm"
        if images.slice_positions_mm is not None
        else f"{images.position_mm(k):.1f} mm from the first slice"
    )
    caption = [f"Slice {k + 1} of {n_k}", where]
    if not key_slice.segments:
        ax.text(extent[1] / 2, extent[2] * 0.08, "No calcium detected", color="white", fontsize=9, ha="center")
        return [*caption, "No calcium detected in this series;", "a representative slice is shown."]
    jj, ii = np.nonzero(scored[k] > 0)
    cy, cx = (jj.mean() + 0.5) * row_mm, (ii.mean() + 0.5) * col_mm
    side = CROP_MM[key]
    x0 = min(max(cx - side / 2, 0.0), max(extent[1] - side, 0.0))
    y0 = min(max(cy - side / 2, 0.0), max(extent[2] - side, 0.0))
    ax.add_patch(Rectangle((x0, y0), side, side, fill=False, edgecolor="yellow", linewidth=0.8))
    zoom = _image_axes(fig, MARGIN_IN + size + 0.15, top, size)
    # Embed only the cropped pixels (a PDF holds an image whole, however it is clipped).
    i0, i1 = int(x0 // col_mm), min(n_i, int(math.ceil((x0 + side) / col_mm)))
    j0, j1 = int(y0 // row_mm), min(n_j, int(math.ceil((y0 + side) / row_mm)))
    crop_extent = (i0 * col_mm, i1 * col_mm, j1 * row_mm, j0 * row_mm)
    zoom.imshow(rgb[j0:j1, i0:i1], extent=crop_extent, interpolation="none", aspect="equal")
    zoom.set_xlim(x0, x0 + side)
    zoom.set_ylim(y0 + side, y0)
    _scale_bar(zoom, x0 + 0.06 * side, y0 + 0.94 * side, 10.0, side)
    _orientation_marks(zoom, x0, x0 + side, y0, y0 + side, images)
    caption.append("Calcium in this slice:")
    for segment in key_slice.segments:
        area = int((scored[k] == segment).sum()) * row_mm * col_mm
        caption.append(f"  {_segment_title(seg_set, seg_set.segments[segment - 1].name)}: {area:.1f} mm\u00b2")
    return caption


# ----------------------------------------------------------------------------------------------- document


def _models(report: Mapping[str, Any]) -> list[str]:
    seen: list[str] = []
    for path in (report.get("paths") or {}).values():
        for m in (path or {}).get("models") or []:
            text = f"{m.get('name', '?')} {m.get('version', '')}".strip()
            if m.get("sha256"):
                text += f" (sha256 {str(m['sha256'])[:12]})"
            if text not in seen:
                seen.append(text)
    return seen


def _footer(fig: Figure, report: Mapping[str, Any], page: int, pages: int) -> None:
    app = report.get("app") or {}
    models = _models(report)
    left = f"{app.get('name', 'CalciMap')} {app.get('version', '')}".strip()
    left += " \u00b7 models: " + (", ".join(models) if models else "none run")
    y = FOOTER_IN - 0.3
    fig.add_artist(
        matplotlib.lines.Line2D(
            [MARGIN_IN / PAGE_IN[0], 1 - MARGIN_IN / PAGE_IN[0]],
            [y / PAGE_IN[1]] * 2,
            transform=fig.transFigure,
            color="#999999",
            linewidth=0.5,
        )
    )
    for n, line in enumerate(_Pages.wrap(left, 7, PAGE_IN[0] - 2 * MARGIN_IN - 0.8)[:2]):
        fig.text(MARGIN_IN / PAGE_IN[0], (y - 0.06 - n * 0.13) / PAGE_IN[1], line, fontsize=7, color=_GREY, va="top")
    fig.text(
        1 - MARGIN_IN / PAGE_IN[0], (y - 0.06) / PAGE_IN[1], f"page {page}/{pages}", fontsize=7, ha="right", va="top"
    )
    fig.text(
        1 - MARGIN_IN / PAGE_IN[0],
        (y - 0.19) / PAGE_IN[1],
        NOT_FOR_DIAGNOSTIC_USE,
        fontsize=7,
        ha="right",
        va="top",
        color=_RED,
    )


def _check_report(report: Mapping[str, Any], images: Mapping[str, KeyImages]) -> dict[str, Any]:
    if not isinstance(report, Mapping) or not isinstance(report.get("paths"), Mapping):
        raise ValueError("the report must be a mapping with a 'paths' mapping ({'coronary': ..., 'ica': ...})")
    paths = dict(report["paths"])
    unknown = sorted(set(paths) - set(PATH_TITLES))
    if unknown:
        raise ValueError(f"unknown report paths {unknown}; expected {sorted(PATH_TITLES)}")
    for key, path in paths.items():
        if path is not None and path.get("scored") and key not in images:
            raise ValueError(f"the {key} path is scored but no key images were given for it")
        if key in images and not isinstance(images[key], KeyImages):
            raise ValueError(f"images[{key!r}] must be a KeyImages, got {type(images[key]).__name__}")
    return paths


def render_report_pdf(report: Mapping[str, Any], images: Mapping[str, KeyImages]) -> bytes:
    """The reader's report as A4 PDF bytes (see the module docstring); the same input gives the same bytes.

    Args:
        report: the app's report dict (what results.json holds): app, study, paths (coronary / ica, each a
            path dict or None when the study has no series for it) and warnings.
        images: key images keyed "coronary" / "ica", required for every scored path.

    Raises ValueError when the report lacks what the PDF must show (unknown paths, a scored path without
    scores or key images, a score table missing a segment of its set).
    """
    paths = _check_report(report, images)
    app = report.get("app") or {}
    with matplotlib.rc_context(_FONT):
        pages = _Pages()
        _header(pages, report)
        for key in PATH_TITLES:
            if key in paths:
                _path_section(pages, key, paths[key])
        warnings = [str(w) for w in report.get("warnings") or []]
        if warnings:
            pages.heading("Warnings")
            for w in warnings:
                pages.paragraph("\u2022 " + w, 8.5)
        pages.y += 0.1
        pages.paragraph(
            "This report was produced automatically by research software whose models were developed on synthetic "
            "CT only. It is not a medical device, not validated on patients and not for diagnostic use; a qualified "
            "reader must review the images. The DICOM SEG and SR objects of this study carry the same results in "
            "machine-readable form.",
            7.5,
            color=_GREY,
        )
        for key in PATH_TITLES:
            path = paths.get(key)
            if path is not None and path.get("scored"):
                _key_image_page(pages, key, path, images[key])
        for n, fig in enumerate(pages.figures, start=1):
            _footer(fig, report, n, len(pages.figures))
        buffer = io.BytesIO()
        metadata = {
            "Title": "CalciMap calcium report",
            "Author": str(app.get("name") or "CalciMap"),
            "Subject": NOT_FOR_DIAGNOSTIC_USE,
            "Creator": f"{app.get('name', 'CalciMap')} {app.get('version', '')}".strip(),
            "CreationDate": None,  # no wall-clock date: the same input gives the same bytes
        }
        with PdfPages(buffer, metadata=metadata) as pdf:
            for fig in pages.figures:
                for text in fig.findobj(Text):
                    text.set_fontfeatures(NO_LIGATURES)
                pdf.savefig(fig)
    data = buffer.getvalue()
    logger.info("rendered the PDF report: %d pages, %d bytes", len(pages.figures), len(data))
    return data
