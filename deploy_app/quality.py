"""Quality checks before scoring: is this series one the calcium score is defined for?

Each check returns a :class:`Finding`; a failed *blocking* finding means the series gets no score, and the
reports say why (:func:`suitable`). The checks, for the coronary path (chest) and the ICA path (head):

- ``acquisition``: slice thickness, increment and kVp inside what the score is defined for (blocking
  outside); a non-standard but scoreable acquisition passes with the scorer's own "Agatston-equivalent"
  note (``bundles/s2cac_coronary_calcium/scripts/scoring.acquisition_note``, the one definition).
- ``tilt``: cardiac series untilted; head series up to 30 degrees (they are resampled).
- ``geometry``: a volume that could not be built (missing slice, uneven spacing) as a blocking finding.
- ``contrast``: a large region of enhanced blood (150-600 HU, not bone, running along the body axis)
  means a contrast-enhanced series, where iodine reads as calcium.
- ``coverage``: chest, the heart from apex to base; head, the ICA course from below the carotid canal
  entry to above the supraclinoid segment.

The anatomy is found by simple image analysis (HU thresholds, connected components, distances in mm) on
a block-averaged working grid; no learned model. Arrays are ``[k, j, i]`` (slice, row, column) with
slices in increasing position along the slice normal (inferior -> superior for axial series), and
``spacing_kji`` = (slice increment, row, column) in mm. Every threshold lives in ``configs/quality.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bundles.s2cac_coronary_calcium.scripts.scoring import acquisition_note
from deploy_app.volume import NO_TILT_DEG

logger = logging.getLogger(__name__)

LIMITS_PATH = Path(__file__).resolve().parents[1] / "configs" / "quality.json"
PATHS = ("coronary", "ica")
CHECKS = ("acquisition", "tilt", "geometry", "contrast", "coverage")
LIMIT_KEYS = (
    "thickness_min_mm",
    "thickness_max_mm",
    "kvp_min",
    "kvp_max",
    "gap_tolerance_mm",
    "coronary_tilt_max_deg",
    "ica_tilt_max_deg",
    "working_pixel_mm",
    "enhanced_min_hu",
    "enhanced_max_hu",
    "bone_hu",
    "bone_margin_mm",
    "marrow_bone_border",
    "chest_vessel_min_radius_mm",
    "chest_enhanced_min_volume_mm3",
    "chest_enhanced_min_length_mm",
    "head_enhanced_min_volume_mm3",
    "head_enhanced_min_length_mm",
    "head_bone_margin_mm",
    "head_marrow_bone_border",
    "air_hu",
    "head_vessel_max_air_border",
    "soft_tissue_min_hu",
    "soft_tissue_max_hu",
    "heart_erosion_mm",
    "heart_min_volume_ml",
    "heart_margin_mm",
    "heart_top_area_fraction",
    "petrous_relative_hu",
    "petrous_min_area_mm2",
    "skull_base_below_mm",
    "head_contrast_blocking",
    "ica_above_petrous_mm",
)
_RANGES = (("thickness_min_mm", "thickness_max_mm"), ("kvp_min", "kvp_max"), ("enhanced_min_hu", "enhanced_max_hu"))
_NEGATIVE_ALLOWED = {"soft_tissue_min_hu", "air_hu"}


@dataclass(frozen=True)
class Finding:
    """One quality check's result: what was checked, whether it passed, and one sentence for the report."""

    check: str  # one of CHECKS
    passed: bool
    blocking: bool  # a failed blocking check means: no score
    detail: str  # the measured value and the limit, e.g. "aorta lumen median 312 HU; ..."
    value: float | None = None

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown quality check {self.check!r}; expected one of {CHECKS}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QualityConfigError(ValueError):
    """configs/quality.json is missing, unreadable or incomplete."""


# -- limits ---------------------------------------------------------------------------------------------


def load_limits(path: Path | None = None) -> dict[str, float]:
    """Every threshold of the checks, from ``configs/quality.json`` (or ``path``): {key: value}.

    Each key holds ``{"value": number, "_comment": "why"}``. Missing, unknown or non-numeric keys and
    inverted ranges raise :class:`QualityConfigError` naming the file and the key.
    """
    path = Path(path) if path is not None else LIMITS_PATH
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QualityConfigError(f"cannot read the quality limits {path}: {err}") from err
    if not isinstance(raw, dict):
        raise QualityConfigError(f"{path}: expected a JSON object of limits")
    entries = {k: v for k, v in raw.items() if not k.startswith("_")}
    missing = [k for k in LIMIT_KEYS if k not in entries]
    unknown = sorted(set(entries) - set(LIMIT_KEYS))
    if missing or unknown:
        raise QualityConfigError(f"{path}: missing limits {missing}, unknown limits {unknown}")
    limits = {}
    for key in LIMIT_KEYS:
        entry = entries[key]
        value = entry.get("value") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise QualityConfigError(f"{path}: {key} needs {{'value': number, '_comment': ...}}, got {entry!r}")
        if value < 0 and key not in _NEGATIVE_ALLOWED:
            raise QualityConfigError(f"{path}: {key} must not be negative, got {value}")
        if not isinstance(entry.get("_comment"), str) or not entry["_comment"].strip():
            raise QualityConfigError(f"{path}: {key} has no one-line '_comment' saying why")
        limits[key] = float(value)
    for lo, hi in _RANGES:
        if limits[lo] >= limits[hi]:
            raise QualityConfigError(f"{path}: {lo} ({limits[lo]}) must be below {hi} ({limits[hi]})")
    return limits


# -- header checks ----------------------------------------------------------------------------------------


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")


def _kernel_text(kernel: object) -> str | None:
    """ConvolutionKernel as text; pydicom gives a multi-valued one (e.g. ['Br38f', '3']) as a list."""
    if kernel is None:
        return None
    if isinstance(kernel, str):
        return kernel.strip() or None
    if isinstance(kernel, Iterable):
        return " ".join(str(part) for part in kernel).strip() or None
    return str(kernel)


def _number(name: str, value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return number


def check_acquisition(
    path: str,
    thickness_mm: float | None,
    increment_mm: float | None,
    kvp: float | None,
    kernel: str | Sequence[str] | None,
    limits: Mapping[str, float],
) -> list[Finding]:
    """Slice thickness, increment and kVp against what the score is defined for.

    Blocking: thickness outside [thickness_min_mm, thickness_max_mm], kVp outside [kvp_min, kvp_max], or
    gaps between slices (increment > thickness). Otherwise one passing finding, whose detail carries the
    scorer's Agatston-equivalent note for a non-standard acquisition (thin/thick slices, kVp other than
    120, sharp kernel). Unknown facts (None) are said, not guessed.
    """
    _check_path(path)
    thickness = _number("slice thickness", thickness_mm)
    increment = _number("slice increment", increment_mm)
    voltage = _number("kVp", kvp)
    kernel_name = _kernel_text(kernel)
    findings = []
    if thickness is not None and not limits["thickness_min_mm"] <= thickness <= limits["thickness_max_mm"]:
        findings.append(
            Finding(
                "acquisition",
                False,
                True,
                f"slice thickness {thickness:g} mm is outside {limits['thickness_min_mm']:g}-"
                f"{limits['thickness_max_mm']:g} mm, where the calcium score is defined",
                thickness,
            )
        )
    if voltage is not None and not limits["kvp_min"] <= voltage <= limits["kvp_max"]:
        findings.append(
            Finding(
                "acquisition",
                False,
                True,
                f"tube voltage {voltage:g} kVp is outside {limits['kvp_min']:g}-{limits['kvp_max']:g} kVp, "
                "where the 130 HU calcium threshold is defined",
                voltage,
            )
        )
    if thickness is not None and increment is not None and increment > thickness + limits["gap_tolerance_mm"]:
        findings.append(
            Finding(
                "acquisition",
                False,
                True,
                f"slice increment {increment:g} mm exceeds the slice thickness {thickness:g} mm: "
                "lesions in the gaps between slices would be missed",
                increment,
            )
        )
    if findings:
        return findings
    facts = ", ".join(
        [
            f"slice thickness {thickness:g} mm" if thickness is not None else "slice thickness not recorded",
            f"increment {increment:g} mm" if increment is not None else "increment not recorded",
            f"{voltage:g} kVp" if voltage is not None else "kVp not recorded",
            f"kernel {kernel_name}" if kernel_name else "kernel not recorded",
        ]
    )
    note = acquisition_note(thickness, voltage, kernel_name)
    if note is None:
        return [Finding("acquisition", True, True, f"standard acquisition ({facts})", thickness)]
    return [Finding("acquisition", True, True, f"{facts}: scored as Agatston-equivalent ({note})", thickness)]


def check_tilt(path: str, tilt_deg: float | None, limits: Mapping[str, float]) -> Finding:
    """Gantry tilt: cardiac series must be untilted; head series up to ica_tilt_max_deg are resampled."""
    _check_path(path)
    if tilt_deg is None:
        return Finding("tilt", True, True, "gantry tilt not recorded; the geometry shows none", None)
    tilt = float(tilt_deg)
    if not math.isfinite(tilt):
        raise ValueError(f"gantry tilt must be a finite number of degrees, got {tilt_deg!r}")
    size = abs(tilt)
    if path == "coronary":
        limit = limits["coronary_tilt_max_deg"]
        if size > limit:
            return Finding(
                "tilt",
                False,
                True,
                f"gantry tilt {tilt:g} deg; cardiac calcium scoring needs an untilted series (at most {limit:g} deg)",
                tilt,
            )
        return Finding("tilt", True, True, f"gantry tilt {tilt:g} deg (at most {limit:g} deg)", tilt)
    limit = limits["ica_tilt_max_deg"]
    if size > limit:
        return Finding(
            "tilt", False, True, f"gantry tilt {tilt:g} deg is above {limit:g} deg, the most that is resampled", tilt
        )
    action = "; resampled to axial before scoring" if size >= NO_TILT_DEG else ""  # as pipeline.check does
    return Finding("tilt", True, True, f"gantry tilt {tilt:g} deg (at most {limit:g} deg){action}", tilt)


def check_geometry_error(message: str) -> Finding:
    """A volume that could not be built (missing slice, uneven spacing...) as a blocking finding."""
    text = str(message).strip() or "the series' geometry could not be read"
    return Finding("geometry", False, True, f"the image volume could not be built: {text}", None)


# -- image analysis helpers ---------------------------------------------------------------------------------


def _check_volume(hu: np.ndarray, spacing_kji: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"expected a 3D HU volume [slice, row, column], got shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.number):
        raise ValueError(f"expected HU numbers, got dtype {hu.dtype}")
    spacing = tuple(float(s) for s in spacing_kji)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_kji must be three positive mm values (increment, row, column), got {spacing_kji}")
    return hu, spacing  # type: ignore[return-value]


def _working_grid(
    hu: np.ndarray, spacing: tuple[float, float, float], pixel_mm: float
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Block mean in-plane to about ``pixel_mm`` (never finer than the image), then a light in-plane blur.

    Less noise (fat, soft tissue and blood stay apart at 25 HU noise) and far less work; not for scoring.
    """
    fj = max(1, round(pixel_mm / spacing[1]))
    fi = max(1, round(pixel_mm / spacing[2]))
    k, j, i = hu.shape
    j2, i2 = (j // fj) * fj, (i // fi) * fi
    small = hu[:, :j2, :i2].astype(np.float32)
    if fj > 1 or fi > 1:
        small = small.reshape(k, j2 // fj, fj, i2 // fi, fi).mean(axis=(2, 4), dtype=np.float32)
    out_spacing = (spacing[0], spacing[1] * fj, spacing[2] * fi)
    sigma = (0.0, 1.0 / out_spacing[1], 1.0 / out_spacing[2])  # 1 mm Gaussian in-plane
    return ndimage.gaussian_filter(small, sigma, truncate=2.0), out_spacing


def _native_bone(hu: np.ndarray, shape: tuple[int, int, int], limits: Mapping[str, float]) -> np.ndarray:
    """Cortical bone on the image's own grid (thin cortex fades in the working grid), block-max to ``shape``."""
    k, j2, i2 = shape
    fj, fi = hu.shape[1] // j2, hu.shape[2] // i2
    bone = hu[:, : j2 * fj, : i2 * fi] >= limits["bone_hu"]
    return bone.reshape(k, j2, fj, i2, fi).any(axis=(2, 4))


def _distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) of each voxel outside ``mask`` to the mask."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)


def _erode(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels farther than ``radius_mm`` from outside the mask (erosion by a ball, via the distance map)."""
    return _distance_mm(~mask, spacing) > radius_mm


def _grow(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float], in_plane: bool = False):
    """Dilation by a ball of ``radius_mm`` (an in-plane disc with ``in_plane``)."""
    if in_plane:  # a small disc: a structuring element is faster than a distance map
        rj, ri = int(radius_mm / spacing[1]), int(radius_mm / spacing[2])
        jj, ii = np.ogrid[-rj : rj + 1, -ri : ri + 1]
        disc = (jj * spacing[1]) ** 2 + (ii * spacing[2]) ** 2 <= radius_mm**2 + 1e-9
        return ndimage.binary_dilation(mask, structure=disc[None])
    return _distance_mm(mask, spacing) <= radius_mm


@dataclass(frozen=True)
class _Enhanced:
    volume_mm3: float
    length_mm: float  # along the slice axis: vessels run through many slices, marrow stops at each disc
    median_hu: float
    bone_border: float  # share of the region's in-plane border that is bone (or its edge): marrow when high
    air_border: float  # share of that border that is air: the bony wall of a sinus or an air cell, never a vessel


def _enhanced_regions(
    h: np.ndarray,
    bone: np.ndarray,
    spacing: tuple[float, float, float],
    limits: Mapping[str, float],
    min_radius_mm: float = 0.0,
    bone_margin_mm: float | None = None,
) -> list[_Enhanced]:
    """Connected regions of enhanced-blood HU that are not bone, largest first (what contrast fills).

    Bone edges (voxels within bone_margin_mm of cortical bone, partial volume) are removed first. What
    remains of bone is marrow (vertebral bodies, sternum: 150-300 HU like enhanced blood), which a border
    of bone surrounds, while a vessel's border is fat or soft tissue: ``bone_border`` measures that, and
    ``air_border`` the share of air (below air_hu), which borders the thin bony walls of sinuses. With
    ``min_radius_mm`` the regions are opened by a ball of that radius first: only parts at least twice as
    thick remain (an aorta, not a rib or a plaque).
    """
    margin = limits["bone_margin_mm"] if bone_margin_mm is None else bone_margin_mm
    near_bone = _grow(bone, margin, spacing, in_plane=True)
    bright = (h >= limits["enhanced_min_hu"]) & (h <= limits["enhanced_max_hu"]) & ~near_bone
    if min_radius_mm > 0:  # in-plane opening: vessels run along the body axis, ribs and plaques are thin
        rj, ri = int(min_radius_mm / spacing[1]), int(min_radius_mm / spacing[2])
        jj, ii = np.ogrid[-rj : rj + 1, -ri : ri + 1]
        disc = (jj * spacing[1]) ** 2 + (ii * spacing[2]) ** 2 <= min_radius_mm**2 + 1e-9
        bright = ndimage.binary_opening(bright, structure=disc[None])
    labels, n = ndimage.label(bright)
    if n == 0:
        return []
    voxel = float(np.prod(spacing))
    counts = np.bincount(labels.ravel())[1:]
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 2)
    out = []
    for idx, box in enumerate(ndimage.find_objects(labels)):
        if counts[idx] * voxel < 50.0:  # noise specks and small plaques: not worth measuring
            continue
        big = tuple(slice(max(sl.start - 1, 0), sl.stop + 1) for sl in box)
        region = labels[big] == idx + 1
        border = ndimage.binary_dilation(region, structure=in_plane) & ~region
        bone_border = float(near_bone[big][border].mean()) if border.any() else 0.0
        air_border = float((h[big][border] < limits["air_hu"]).mean()) if border.any() else 0.0
        extent = float((box[0].stop - box[0].start) * spacing[0])  # along the body axis
        median = float(np.median(h[big][region]))
        out.append(_Enhanced(float(counts[idx] * voxel), extent, median, bone_border, air_border))
    return sorted(out, key=lambda r: r.volume_mm3, reverse=True)


def _contrast_finding(
    regions: list[_Enhanced],
    min_volume: float,
    min_length: float,
    limits: Mapping[str, float],
    where: str,
    max_bone_border: float | None = None,
    max_air_border: float = 1.0,
) -> Finding | None:
    """The finding for the largest region that passes for an enhanced vessel, None when none does.

    A vessel is at least ``min_volume`` mm3 and ``min_length`` mm along the body axis, with less than
    ``max_bone_border`` of its in-plane border bone (default marrow_bone_border) and at most ``max_air_border``
    of it air.
    """
    bone_limit = limits["marrow_bone_border"] if max_bone_border is None else max_bone_border
    vessels = [
        r
        for r in regions
        if r.volume_mm3 >= min_volume
        and r.length_mm >= min_length
        and r.bone_border < bone_limit
        and r.air_border <= max_air_border
    ]
    if vessels:
        best = vessels[0]
        return Finding(
            "contrast",
            False,
            True,
            f"contrast-enhanced: {where} median {best.median_hu:.0f} HU over {best.volume_mm3 / 1000:.1f} cm3 "
            f"(non-contrast blood is below {limits['enhanced_min_hu']:g} HU); iodine would be scored as calcium",
            best.median_hu,
        )
    return None


# -- chest ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heart:
    mask: np.ndarray  # on the working grid
    volume_ml: float
    area_mm2: np.ndarray  # cross-section per slice
    median_hu: float  # unenhanced heart (blood pool and myocardium) core


def _find_heart(hu: np.ndarray, spacing: tuple[float, float, float], limits: Mapping[str, float]) -> _Heart | None:
    """The heart: the largest unenhanced soft-tissue body once eroded by heart_erosion_mm, grown back.

    Found on a grid twice as coarse as the working grid: an organ-sized search needs no finer one.
    """
    h, spacing = _working_grid(hu, spacing, 2 * limits["working_pixel_mm"])
    soft = (h >= limits["soft_tissue_min_hu"]) & (h <= limits["soft_tissue_max_hu"])
    core = _erode(soft, limits["heart_erosion_mm"], spacing)
    labels, n = ndimage.label(core)
    if n == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    core = labels == largest
    mask = _grow(core, limits["heart_erosion_mm"] + max(spacing), spacing) & soft
    voxel = float(np.prod(spacing))
    area = mask.sum(axis=(1, 2)) * spacing[1] * spacing[2]
    return _Heart(mask, float(mask.sum() * voxel / 1000.0), area, float(np.median(h[core])))


def check_contrast_chest(hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float]) -> Finding:
    """Contrast in the chest: an enhanced blood region (aorta or heart chambers) blocks scoring.

    Enhanced = 150-600 HU outside bone and bone marrow, at least 4 mm thick, 2 cm3 and 30 mm long along
    the body axis (a calcified plaque is far smaller, vertebral marrow stops at each disc). Without one,
    the unenhanced heart's median HU is reported.
    """
    hu, spacing = _check_volume(hu, spacing_kji)
    return _contrast_chest(hu, spacing, limits, _find_heart(hu, spacing, limits))


def _contrast_chest(
    hu: np.ndarray, spacing: tuple[float, float, float], limits: Mapping[str, float], heart: _Heart | None
) -> Finding:
    h, sp = _working_grid(hu, spacing, limits["working_pixel_mm"])
    regions = _enhanced_regions(h, _native_bone(hu, h.shape, limits), sp, limits, limits["chest_vessel_min_radius_mm"])
    failed = _contrast_finding(
        regions,
        limits["chest_enhanced_min_volume_mm3"],
        limits["chest_enhanced_min_length_mm"],
        limits,
        "blood pool / aorta",
    )
    if failed is not None:
        return failed
    largest = regions[0].volume_mm3 if regions else 0.0
    if heart is None:
        return Finding(
            "contrast",
            True,
            True,
            f"no enhanced blood found (largest region above {limits['enhanced_min_hu']:g} HU outside bone: "
            f"{largest:.0f} mm3); no heart found to measure",
            None,
        )
    return Finding(
        "contrast",
        True,
        True,
        f"non-contrast: heart blood pool and myocardium median {heart.median_hu:.0f} HU (contrast above "
        f"{limits['enhanced_min_hu']:g} HU); largest bright region outside bone {largest:.0f} mm3",
        heart.median_hu,
    )


def check_coverage_chest(hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float]) -> Finding:
    """The heart is complete from apex to base.

    Apex: the heart ends at least heart_margin_mm above the first slice. Base: at the last slice the
    heart's cross-section is below heart_top_area_fraction of its largest, i.e. the scan reaches the base
    (atria and aortic root) rather than cutting through the ventricles.
    """
    hu, spacing = _check_volume(hu, spacing_kji)
    return _coverage_chest(_find_heart(hu, spacing, limits), spacing, limits)


def _coverage_chest(heart: _Heart | None, spacing: tuple[float, float, float], limits: Mapping[str, float]) -> Finding:
    if heart is None or heart.volume_ml < limits["heart_min_volume_ml"]:
        size = 0.0 if heart is None else heart.volume_ml
        return Finding(
            "coverage",
            False,
            True,
            f"no heart found: the largest soft-tissue body is {size:.0f} ml "
            f"(a heart is at least {limits['heart_min_volume_ml']:g} ml)",
            size,
        )
    present = np.flatnonzero(heart.area_mm2 > 0)
    below_mm = float(present[0] * spacing[0])
    top_fraction = float(heart.area_mm2[-1] / heart.area_mm2.max())
    problems = []
    if below_mm < limits["heart_margin_mm"]:
        problems.append(
            f"the heart reaches {below_mm:.0f} mm from the first slice "
            f"(apex cut; margin {limits['heart_margin_mm']:g} mm)"
        )
    if top_fraction >= limits["heart_top_area_fraction"]:
        problems.append(
            f"the last slice cuts the heart at {100 * top_fraction:.0f} % of its largest cross-section "
            f"(base cut; limit {100 * limits['heart_top_area_fraction']:.0f} %)"
        )
    if problems:
        return Finding("coverage", False, True, "; ".join(problems), heart.volume_ml)
    return Finding(
        "coverage",
        True,
        True,
        f"heart complete ({heart.volume_ml:.0f} ml): apex {below_mm:.0f} mm above the first slice, "
        f"last slice at {100 * top_fraction:.0f} % of the largest cross-section",
        heart.volume_ml,
    )


# -- head -------------------------------------------------------------------------------------------------------


def _petrous_band(
    h: np.ndarray, spacing: tuple[float, float, float], limits: Mapping[str, float]
) -> tuple[int, int] | None:
    """First and last slice holding petrous bone (the densest bone of the skull), or None."""
    bone = h[h >= limits["bone_hu"]]
    if bone.size == 0:
        return None
    dense_hu = max(limits["bone_hu"], limits["petrous_relative_hu"] * float(np.percentile(bone, 99.9)))
    area = (h >= dense_hu).sum(axis=(1, 2)) * spacing[1] * spacing[2]
    slices = np.flatnonzero(area >= limits["petrous_min_area_mm2"])
    if slices.size == 0:
        return None
    return int(slices[0]), int(slices[-1])


def check_contrast_head(hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float]) -> Finding:
    """Contrast in the head: an enhanced vessel (ICA lumen outside the carotid canal, or a sinus).

    The unenhanced ICA lumen (40 HU in 40 HU soft tissue) cannot be told apart by HU, so the check looks
    for what contrast makes, on a grid of at most 1 mm pixels whatever working_pixel_mm says (a 4-5 mm
    lumen needs them): 150-600 HU regions at least head_bone_margin_mm from bone, of at least
    200 mm3 and 15 mm along the body axis, whose in-plane border is neither bone (skull-base plates, the
    clivus) nor air (the thin bony walls of sinuses and air cells, blurred to 250-350 HU). Blocking unless
    ``head_contrast_blocking`` is 0 (then the finding is reported and the series is still scored).
    Measured on untouched non-contrast `small` heads (1.6-1.8 mm pixels): false alarms on 5 of 150 of
    seed 1000 (small skull-base bones whose thin cortex stays below bone_hu) and on none of seeds 0-119,
    nor of 90 `medium` heads (0.5 mm pixels); with +250 HU in both ICA lumens it finds 136 of 160 (of
    the 24 it misses, 23 have 5 mm slices, through which the lumen leaves too short a region).
    """
    hu, spacing = _check_volume(hu, spacing_kji)
    h, sp = _working_grid(hu, spacing, min(limits["working_pixel_mm"], 1.0))
    bone = _native_bone(hu, h.shape, limits)
    regions = _enhanced_regions(h, bone, sp, limits, bone_margin_mm=limits["head_bone_margin_mm"])
    failed = _contrast_finding(
        regions,
        limits["head_enhanced_min_volume_mm3"],
        limits["head_enhanced_min_length_mm"],
        limits,
        "vessel lumen (ICA/sinus)",
        max_bone_border=limits["head_marrow_bone_border"],
        max_air_border=limits["head_vessel_max_air_border"],
    )
    if failed is not None:
        if limits["head_contrast_blocking"]:
            return failed
        return replace(failed, blocking=False, detail=f"{failed.detail} (advisory: head_contrast_blocking is 0)")
    largest = regions[0] if regions else None
    text = f"{largest.volume_mm3:.0f} mm3, median {largest.median_hu:.0f} HU" if largest else "none"
    return Finding(
        "contrast",
        True,
        bool(limits["head_contrast_blocking"]),
        f"non-contrast: no enhanced vessel (largest region of {limits['enhanced_min_hu']:g}-"
        f"{limits['enhanced_max_hu']:g} HU outside bone: {text}; a vessel is at least "
        f"{limits['head_enhanced_min_volume_mm3']:g} mm3)",
        largest.median_hu if largest else None,
    )


def check_coverage_head(hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float]) -> Finding:
    """The ICA course is inside the scan: from below the carotid canal entry to above the supraclinoid ICA.

    The petrous bones are the landmark: the canal entry lies at their lower surface and the supraclinoid
    ICA 15-25 mm above their top. The scan must start skull_base_below_mm below the first slice with
    petrous bone and end ica_above_petrous_mm above the last.
    """
    hu, spacing = _check_volume(hu, spacing_kji)
    h, sp = _working_grid(hu, spacing, limits["working_pixel_mm"])
    band = _petrous_band(h, sp, limits)
    if band is None:
        return Finding("coverage", False, True, "no skull base found (no petrous bone in the scan)", None)
    lo, hi = band
    below_mm = lo * sp[0]
    above_mm = (h.shape[0] - 1 - hi) * sp[0]
    problems = []
    if below_mm < limits["skull_base_below_mm"]:
        problems.append(
            f"the scan starts {below_mm:.0f} mm below the petrous bone (carotid canal entry cut; "
            f"needs {limits['skull_base_below_mm']:g} mm)"
        )
    if above_mm < limits["ica_above_petrous_mm"]:
        problems.append(
            f"the scan ends {above_mm:.0f} mm above the petrous bone (supraclinoid ICA cut; "
            f"needs {limits['ica_above_petrous_mm']:g} mm)"
        )
    if problems:
        return Finding("coverage", False, True, "; ".join(problems), float(min(below_mm, above_mm)))
    return Finding(
        "coverage",
        True,
        True,
        f"ICA course covered: scan from {below_mm:.0f} mm below to {above_mm:.0f} mm above the petrous bone",
        float(min(below_mm, above_mm)),
    )


# -- regions of interest for the models --------------------------------------------------------------------------
# The calcium model's sliding window costs time in proportion to the volume it covers. On a CPU, the heart (chest)
# or the skull base (head) is a fraction of the field of view; the same anatomy the checks find bounds it.

ROI_MARGIN_MM = 15.0  # around the heart / the petrous bones: the coronary ostia sit on the aortic root
ICA_ABOVE_PETROUS_ROI_MM = 45.0  # the supraclinoid ICA ends 15-25 mm above the petrous bones (phantoms: <= 33 mm)
# In-plane around the petrous bones' dense bone. The siphon runs up to ~25 mm anterior of it; behind and beside it
# the ICA stays inside it: the carotid canal lies anteromedial to the otic capsule, the mastoids and the posterior
# petrous surface lie beyond. On 60 held-out head phantoms (seed 1000) every in-scan centreline point lay at most
# 24.4 mm anterior of the dense bone, and at least 15 mm inside its posterior and 6 mm inside its lateral edges.
ICA_ROI_ANTERIOR_MM = 35.0
ICA_ROI_POSTERIOR_LATERAL_MM = 10.0


def _native_box(
    lo: Sequence[int], hi: Sequence[int], factor: Sequence[int], margin_lo: Sequence[float], margin_hi: Sequence[float],
    shape,
):  # fmt: skip
    """A box on the working grid ([lo, hi] inclusive) back on the native grid, grown by the margins (voxels below
    ``lo`` and above ``hi`` per axis), clipped."""
    box = []
    for axis in range(3):
        start = int(math.floor(lo[axis] * factor[axis] - margin_lo[axis]))
        stop = int(math.ceil((hi[axis] + 1) * factor[axis] + margin_hi[axis]))
        box.append(slice(max(start, 0), min(stop, shape[axis])))
    return tuple(box)


def heart_box(hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float]) -> tuple[slice, ...] | None:
    """The heart's bounding box plus ROI_MARGIN_MM on the native [k, j, i] grid; None when no heart is found."""
    hu, spacing = _check_volume(hu, spacing_kji)
    heart = _find_heart(hu, spacing, limits)
    if heart is None or heart.volume_ml < limits["heart_min_volume_ml"]:
        return None
    idx = np.argwhere(heart.mask)
    factor = (1, hu.shape[1] // heart.mask.shape[1], hu.shape[2] // heart.mask.shape[2])
    margin = [ROI_MARGIN_MM / s for s in spacing]
    return _native_box(idx.min(axis=0), idx.max(axis=0), factor, margin, margin, hu.shape)


def skull_base_box(
    hu: np.ndarray, spacing_kji: Sequence[float], limits: Mapping[str, float], j_posterior: float = 1.0
) -> tuple[slice, ...] | None:
    """The ICA's region on the native [k, j, i] grid; None without a skull base.

    From the first slice to ICA_ABOVE_PETROUS_ROI_MM above the petrous bones; in-plane the petrous bones' extent
    plus ICA_ROI_ANTERIOR_MM on the anterior side and ICA_ROI_POSTERIOR_LATERAL_MM on the others.
    ``j_posterior``: the patient-posterior component of the row axis (the direction of increasing j): 1 for the
    usual axial slice, -1 for one stored front to back; when it is oblique (|value| < 0.7) both sides of j get
    the anterior margin.
    """
    hu, spacing = _check_volume(hu, spacing_kji)
    h, sp = _working_grid(hu, spacing, limits["working_pixel_mm"])
    band = _petrous_band(h, sp, limits)
    if band is None:
        return None
    dense_hu = max(
        limits["bone_hu"], limits["petrous_relative_hu"] * float(np.percentile(h[h >= limits["bone_hu"]], 99.9))
    )
    idx = np.argwhere(h[band[0] : band[1] + 1] >= dense_hu)  # the same dense bone as _petrous_band
    lo = (0, *idx.min(axis=0)[1:])
    hi = (band[1] + int(round(ICA_ABOVE_PETROUS_ROI_MM / sp[0])), *idx.max(axis=0)[1:])
    factor = (1, hu.shape[1] // h.shape[1], hu.shape[2] // h.shape[2])
    front, other = ICA_ROI_ANTERIOR_MM / spacing[1], ICA_ROI_POSTERIOR_LATERAL_MM / spacing[1]
    j_lo, j_hi = (front, other) if j_posterior >= 0.7 else (other, front) if j_posterior <= -0.7 else (front, front)
    lateral = ICA_ROI_POSTERIOR_LATERAL_MM / spacing[2]
    return _native_box(lo, hi, factor, (0.0, j_lo, lateral), (0.0, j_hi, lateral), hu.shape)


# -- all checks -------------------------------------------------------------------------------------------------


def run_checks(
    path: str,
    hu: np.ndarray,
    spacing_kji: Sequence[float],
    header_facts: Mapping[str, Any],
    limits: Mapping[str, float],
    acquired: tuple[np.ndarray, Sequence[float]] | None = None,
) -> list[Finding]:
    """All checks of one path ("coronary" or "ica"). header_facts: thickness_mm, increment_mm, kvp, kernel,
    tilt_deg (missing keys count as not recorded).

    ``acquired``: (hu, spacing_kji) of the series as acquired when ``hu`` is a tilted head resampled to axial; the
    head's contrast check reads it, because the resampling blurs bone edges into vessel-like HU (on 20 untouched
    non-contrast `small` heads tilted 20 deg: a false alarm on 1 after resampling, on none as acquired; 12 and 2
    before the check looked at air borders)."""
    _check_path(path)
    findings = check_acquisition(
        path,
        header_facts.get("thickness_mm"),
        header_facts.get("increment_mm", spacing_kji[0]),
        header_facts.get("kvp"),
        header_facts.get("kernel"),
        limits,
    )
    findings.append(check_tilt(path, header_facts.get("tilt_deg"), limits))
    if path == "coronary":
        volume, spacing = _check_volume(hu, spacing_kji)
        heart = _find_heart(volume, spacing, limits)  # shared by both chest checks
        findings += [_contrast_chest(volume, spacing, limits, heart), _coverage_chest(heart, spacing, limits)]
    else:
        contrast_hu, contrast_spacing = acquired if acquired is not None else (hu, spacing_kji)
        findings += [
            check_contrast_head(contrast_hu, contrast_spacing, limits),
            check_coverage_head(hu, spacing_kji, limits),
        ]
    for f in findings:
        logger.info("quality %s %s: %s", f.check, "passed" if f.passed else "FAILED", f.detail)
    return findings


def suitable(findings: Iterable[Finding]) -> tuple[bool, str | None]:
    """(True, None) when no blocking check failed, else (False, the failed checks' sentences for the report)."""
    failed = [f for f in findings if f.blocking and not f.passed]
    if not failed:
        return True, None
    return False, " ".join(f"{f.check}: {f.detail}." for f in failed)
