"""Calcium scoring: Agatston, volume, mass, lesion counts and risk category, per label and in total.

This module is the project's one implementation of calcium scoring (DESIGN.md, "Scoring definitions").
Bundle evaluation, the deploy app's SR and PDF, the benchmarks and the CLI (``scripts/score_calcium.py``)
all call :func:`score_calcium`; nothing else re-implements it.

Definitions (arrays are indexed ``[k, j, i]`` = slice, row, column; values in HU):

- Calcium voxel: HU >= 130 (``CALCIUM_THRESHOLD_HU``) inside a nonzero label.
- Agatston lesion: an 8-connected 2D component of calcium voxels of ONE label in one axial slice
  (components never merge across labels). Components with area < 1 mm^2 are dropped
  (area = pixel count x row spacing x column spacing; a tolerance of 1e-9 mm^2 absorbs floating-point
  representation error, so e.g. 100 pixels of 0.1 x 0.1 mm count as 1 mm^2).
  Score per lesion = area_mm2 x weight x (slice increment / 3 mm), weight from the lesion's PEAK HU:
  1 for 130-199, 2 for 200-299, 3 for 300-399, 4 for >= 400. The slice increment (distance between
  slice centres), not the nominal thickness, is used on purpose: it keeps the score stable for
  overlapping reconstructions (e.g. 3 mm slices every 2 mm give a factor 2/3 per slice).
- ``lesions_2d_agatston``: number of Agatston lesions that count (area >= 1 mm^2).
- ``lesions_3d``: number of 3D 6-connected components of calcium voxels of one label (detection
  metrics, orCaScore); no size filter.
- Volume (mm^3): calcium voxels x voxel volume, voxel volume = row x column spacing x slice increment.
- Mass (mg): sum over calcium voxels of HU x voxel volume (mm^3) x c / 1000, with c the mass calibration
  in mg HA/cm^3 per HU. The default ``DEFAULT_MASS_CALIBRATION`` = 1.0 is the project's phantom
  calibration at 120 kVp (hydroxyapatite slope 1.00 HU per mg HA/cm^3, ``HA_SLOPE_BY_KVP`` in
  ``scripts/phantoms/physics.py``). Sites set c from their own calibration phantom and kVp
  (c = 1 / measured HU-per-mg HA/cm^3 slope). No background subtraction is applied.
- Risk category of the UNROUNDED total Agatston S: "0" if S == 0, "I" if 0 < S <= 10, "II" if
  10 < S <= 100, "III" if 100 < S <= 400, "IV" if S > 400 (:func:`risk_category`).

Every label in the name mapping appears in the result, with zeros when it has no calcium; a nonzero
label value missing from the mapping is an error. The implementation is vectorised (see
:func:`score_calcium`): it crops to the bounding box of the nonzero labels and finds the lesions of all
labels and slices at once on the sparse graph of calcium voxels; no Python loop over lesions or slices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

CALCIUM_THRESHOLD_HU = 130.0
MIN_LESION_AREA_MM2 = 1.0
AREA_TOLERANCE_MM2 = 1e-9
REFERENCE_INCREMENT_MM = 3.0
# Lower HU edges of density weights 2, 3 and 4 (weight 1 from 130 HU).
DENSITY_WEIGHT_EDGES_HU = (200.0, 300.0, 400.0)
DEFAULT_MASS_CALIBRATION = 1.0  # mg HA/cm^3 per HU: the project's phantom calibration at 120 kVp
DEFAULT_LABEL_NAMES: dict[int, str] = {1: "LM", 2: "LAD", 3: "LCX", 4: "RCA"}
RISK_CATEGORIES = ("0", "I", "II", "III", "IV")

# Standard acquisition for Agatston scoring; anything else is scored and labelled "Agatston-equivalent".
STANDARD_THICKNESS_RANGE_MM = (2.5, 3.0)
STANDARD_KVP = 120.0
# Sharp kernels: vendor words, or a Siemens-style name (letters + two digits, e.g. B46f, Br44, Qr44, I50f)
# whose number is >= 44. B35f, Br36, Qr36 and words such as STANDARD or SOFT are standard.
SHARP_KERNEL_WORDS = ("sharp", "bone", "lung", "edge", "detail", "ultra")
SHARP_KERNEL_MIN_NUMBER = 44
_KERNEL_NUMBER = re.compile(r"^[a-z]{1,2}(\d{2})", re.IGNORECASE)

# Neighbour offsets (dk, dj, di), one of each symmetric pair: 8-connectivity within a slice (never across
# slices) for Agatston lesions, 6-connectivity in 3D for detection lesions.
_OFFSETS_2D_8 = ((0, 0, 1), (0, 1, -1), (0, 1, 0), (0, 1, 1))
_OFFSETS_3D_6 = ((0, 0, 1), (0, 1, 0), (1, 0, 0))


@dataclass(frozen=True)
class LabelScore:
    """Scores of one label (or the total). Values are unrounded."""

    agatston: float = 0.0
    volume_mm3: float = 0.0
    mass_mg: float = 0.0
    lesions_2d_agatston: int = 0  # 2D 8-connected lesions >= 1 mm^2 (the ones Agatston counts)
    lesions_3d: int = 0  # 3D 6-connected components (detection / orCaScore)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "agatston": float(self.agatston),
            "volume_mm3": float(self.volume_mm3),
            "mass_mg": float(self.mass_mg),
            "lesions_2d_agatston": int(self.lesions_2d_agatston),
            "lesions_3d": int(self.lesions_3d),
        }


@dataclass(frozen=True)
class CalciumScore:
    """Result of :func:`score_calcium`. ``as_dict()`` is JSON-friendly and unrounded."""

    per_label: dict[str, LabelScore]
    total: LabelScore
    risk_category: str
    slice_increment_mm: float
    pixel_spacing_mm: tuple[float, float]  # (row, column)
    mass_calibration: float
    label_values: dict[str, int] = field(default_factory=dict)
    # None when the caller stated no acquisition facts; else True for a non-standard acquisition.
    agatston_equivalent: bool | None = None
    acquisition_note: str | None = None
    acquisition: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_label": {name: s.as_dict() for name, s in self.per_label.items()},
            "total": self.total.as_dict(),
            "risk_category": self.risk_category,
            "slice_increment_mm": float(self.slice_increment_mm),
            "pixel_spacing_mm": [float(v) for v in self.pixel_spacing_mm],
            "mass_calibration": float(self.mass_calibration),
            "label_values": dict(self.label_values),
            "agatston_equivalent": self.agatston_equivalent,
            "acquisition_note": self.acquisition_note,
            "acquisition": None if self.acquisition is None else dict(self.acquisition),
            "definitions": {
                "calcium_threshold_hu": CALCIUM_THRESHOLD_HU,
                "lesions_2d_agatston": "8-connected in-plane components per label and slice, area >= 1 mm^2",
                "lesions_3d": "6-connected 3D components per label, no size filter",
                "agatston_slice_factor": "slice increment / 3 mm",
                "mass_calibration_unit": "mg HA/cm^3 per HU",
            },
        }


def risk_category(total_agatston: float) -> str:
    """Risk category of an unrounded total Agatston score: "0", "I", "II", "III" or "IV"."""
    s = float(total_agatston)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"total Agatston score must be finite and >= 0, got {total_agatston!r}")
    if s == 0:
        return "0"
    if s <= 10:
        return "I"
    if s <= 100:
        return "II"
    if s <= 400:
        return "III"
    return "IV"


def density_weight(peak_hu: np.ndarray | float) -> np.ndarray:
    """Agatston density weight (1-4) of peak HU values >= 130 (no check of the lower bound)."""
    return np.digitize(np.asarray(peak_hu, dtype=np.float64), DENSITY_WEIGHT_EDGES_HU) + 1


def acquisition_note(thickness_mm: float | None, kvp: float | None, kernel: str | None) -> str | None:
    """None for a standard Agatston acquisition, else a short reason ("; "-joined).

    Standard: slice thickness within 2.5-3.0 mm (inclusive), exactly 120 kVp, and a kernel that is
    not sharp. Sharp: the kernel name contains one of ``SHARP_KERNEL_WORDS`` (case-insensitive), or
    starts with one or two letters and two digits >= 44 (Siemens style: B45f, B46f, B50f+, Br44+, Qr44+).
    A fact passed as None is unknown and not judged.
    """
    reasons = []
    if thickness_mm is not None:
        lo, hi = STANDARD_THICKNESS_RANGE_MM
        if not lo <= float(thickness_mm) <= hi:
            reasons.append(f"slice thickness {float(thickness_mm):g} mm (standard {lo:g}-{hi:g} mm)")
    if kvp is not None and float(kvp) != STANDARD_KVP:
        reasons.append(f"{float(kvp):g} kVp (standard {STANDARD_KVP:g} kVp)")
    if kernel is not None and is_sharp_kernel(kernel):
        reasons.append(f"sharp kernel {kernel.strip()!r}")
    return "; ".join(reasons) if reasons else None


def is_sharp_kernel(kernel: str) -> bool:
    """True for kernels named sharp by the rule in :func:`acquisition_note`."""
    name = kernel.strip().lower()
    if any(word in name for word in SHARP_KERNEL_WORDS):
        return True
    match = _KERNEL_NUMBER.match(name)
    return bool(match and int(match.group(1)) >= SHARP_KERNEL_MIN_NUMBER)


def spacing_from_affine(
    affine: np.ndarray | Sequence[Sequence[float]], axis_order: str = "ijk"
) -> tuple[float, float, float]:
    """(row_mm, col_mm, increment_mm) from a 4x4 voxel-to-world affine (RAS or LPS: signs do not matter).

    ``axis_order="ijk"`` (NIfTI): the affine maps (i, j, k) = (column, row, slice) indices, so the column
    spacing is the norm of column 0, the row spacing the norm of column 1 and the slice increment the norm
    of column 2. ``"kji"``: the affine maps (k, j, i) indices (columns 2, 1, 0 are column, row, slice).
    The increment is the distance between consecutive slice centres, which with gantry tilt is the table
    step (column 2 is then not orthogonal to the image plane), not the distance between slice planes.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape not in {(4, 4), (3, 4), (3, 3)}:
        raise ValueError(f"affine must be 4x4 (or 3x4 / 3x3), got shape {a.shape}")
    norms = np.linalg.norm(a[:3, :3], axis=0)
    if axis_order == "ijk":
        col_mm, row_mm, inc_mm = norms
    elif axis_order == "kji":
        inc_mm, row_mm, col_mm = norms
    else:
        raise ValueError(f"axis_order must be 'ijk' or 'kji', got {axis_order!r}")
    spacing = (float(row_mm), float(col_mm), float(inc_mm))
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"affine gives invalid spacing {spacing}")
    return spacing


def parse_label_names(text: str) -> dict[int, str]:
    """Parse "1:LM,2:LAD,3:LCX,4:RCA" into {1: "LM", ...}."""
    names: dict[int, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        value, sep, name = item.partition(":")
        name = name.strip()
        try:
            key = int(value.strip())
        except ValueError:
            key = None
        if not sep or key is None or not name:
            raise ValueError(f"bad label mapping item {item!r}: expected VALUE:NAME, e.g. '1:LM,2:LAD'")
        if key in names:
            raise ValueError(f"label value {key} appears twice in the mapping {text!r}")
        names[key] = name
    if not names:
        raise ValueError(f"empty label mapping {text!r}")
    return names


def _check_label_names(label_names: Mapping[int, str] | None) -> dict[int, str]:
    names = dict(DEFAULT_LABEL_NAMES if label_names is None else label_names)
    if not names:
        raise ValueError("label_names is empty")
    out: dict[int, str] = {}
    for key, name in names.items():
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or int(key) <= 0:
            raise ValueError(f"label values must be positive integers (0 is background), got {key!r}")
        out[int(key)] = str(name)
    if len(set(out.values())) != len(out):
        raise ValueError(f"label names must be unique, got {out}")
    return out


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be (row_mm, col_mm, increment_mm), got {spacing!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"spacing must be three positive finite numbers (row_mm, col_mm, increment_mm), got {spacing!r}"
        )
    return values  # type: ignore[return-value]


def bounding_box(nonzero: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of a 3D boolean array, or None when it is all False."""
    ks = np.flatnonzero(nonzero.reshape(nonzero.shape[0], -1).any(axis=1))
    if ks.size == 0:
        return None
    sub = nonzero[ks[0] : ks[-1] + 1]
    js = np.flatnonzero(sub.any(axis=(0, 2)))
    is_ = np.flatnonzero(sub.any(axis=(0, 1)))
    return slice(ks[0], ks[-1] + 1), slice(js[0], js[-1] + 1), slice(is_[0], is_[-1] + 1)


def _check_label_values(labels: np.ndarray, nonzero: np.ndarray, names: dict[int, str]) -> None:
    """Raise ValueError unless every nonzero value of ``labels`` (already cropped) is a key of ``names``."""
    kind = labels.dtype.kind
    if kind not in "biuf":
        raise ValueError(f"label map must be integer (or integer-valued float), got dtype {labels.dtype}")
    max_key = max(names)
    if kind in "biu" and len(names) == max_key:  # keys are exactly 1..max_key: a range check suffices
        if labels.size == 0 or (labels.min() >= 0 and labels.max() <= max_key):
            return
    values = labels[nonzero]
    if kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
        raise ValueError("label map has non-integer values; labels must be integers")
    if values.size == 0:
        return
    if values.min() > 0 and values.max() <= max_key:
        present = np.flatnonzero(np.bincount(values.astype(np.intp), minlength=max_key + 1))
        bad = np.array([v for v in present if v not in names], dtype=np.intp)
    else:
        bad = np.unique(values[(values <= 0) | (values > max_key)])
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
        raise ValueError(
            f"label values [{shown}] are not in the label mapping {names}; "
            "pass a mapping that names every nonzero label"
        )


def _components(lin: np.ndarray, label_of: np.ndarray, plane: int, row: int, offsets) -> tuple[int, np.ndarray]:
    """Connected components of the voxels at sorted padded linear indices ``lin``.

    Two voxels are joined when one is at a neighbour offset of the other and both have the same label, so
    components never cross labels. The padding (one empty row and column on each side) keeps offsets from
    wrapping to the next row or slice. Returns (number of components, component id of each voxel).
    """
    n = lin.size
    src, dst = [], []
    for dk, dj, di in offsets:  # 3 or 4 neighbour directions, not lesions
        neighbour = lin + (dk * plane + dj * row + di)
        pos = np.minimum(np.searchsorted(lin, neighbour), n - 1)
        hit = (lin[pos] == neighbour) & (label_of[pos] == label_of)
        src.append(np.flatnonzero(hit))
        dst.append(pos[hit])
    rows = np.concatenate(src)
    graph = coo_array((np.ones(rows.size, dtype=np.int8), (rows, np.concatenate(dst))), shape=(n, n))
    return connected_components(graph, directed=False)


def score_calcium(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    label_names: Mapping[int, str] | None = None,
    mass_calibration: float = DEFAULT_MASS_CALIBRATION,
    thickness_mm: float | None = None,
    kvp: float | None = None,
    kernel: str | None = None,
) -> CalciumScore:
    """Score calcium per label and in total.

    Args:
        image: HU array indexed [k, j, i] (slice, row, column), float or int.
        labels: integer label map of the same shape (0 = background).
        spacing: (row_mm, col_mm, increment_mm); increment = distance between slice centres.
        label_names: {label value: name}; default ``DEFAULT_LABEL_NAMES`` (1 LM, 2 LAD, 3 LCX, 4 RCA).
            Every named label is reported; a nonzero label value not in it raises ValueError.
        mass_calibration: c in mg HA/cm^3 per HU (default 1.0, the project phantoms at 120 kVp; sites
            set it from their calibration phantom and kVp).
        thickness_mm, kvp, kernel: optional acquisition facts; when any is given the result carries
            ``agatston_equivalent`` (True for a non-standard acquisition) and ``acquisition_note``.

    Implementation: crop to the bounding box of the nonzero labels, list the calcium voxels (sparse), and
    find the 2D lesions (8-connected in-plane) and 3D lesions (6-connected) of all labels at once as
    connected components of the graph that joins neighbouring calcium voxels of the same label
    (``scipy.sparse.csgraph``). This is the same partition as ``scipy.ndimage.label`` per label (tests
    check it against a slice-by-slice reference) but costs O(calcium voxels) instead of O(box voxels).
    Per-lesion area and peak, and per-label sums, are bincounts; no Python loop over lesions or slices.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or labels.ndim != 3:
        raise ValueError(f"image and labels must be 3D [k, j, i], got shapes {image.shape} and {labels.shape}")
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} and label shape {labels.shape} differ")
    if image.dtype.kind not in "iuf":
        raise ValueError(f"image must hold HU as int or float, got dtype {image.dtype}")
    row_mm, col_mm, inc_mm = _check_spacing(spacing)
    c = float(mass_calibration)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"mass_calibration must be a positive finite number (mg HA/cm^3 per HU), got {c!r}")
    names = _check_label_names(label_names)
    pixel_area = row_mm * col_mm
    voxel_volume = pixel_area * inc_mm
    n_keys = max(names) + 1

    # Per label value (index = value): weighted pixel count (sum of pixels x weight over kept 2D lesions),
    # 2D lesion count, 3D lesion count, calcium voxel count and HU sum.
    weighted_px = np.zeros(n_keys)
    n2d = np.zeros(n_keys, dtype=np.int64)
    n3d = np.zeros(n_keys, dtype=np.int64)
    n_vox = np.zeros(n_keys, dtype=np.int64)
    hu_sum = np.zeros(n_keys)

    nonzero = labels != 0
    box = bounding_box(nonzero)
    if box is not None:
        lab, nz, img = labels[box], nonzero[box], image[box]
        _check_label_values(lab, nz, names)
        calcium = (img >= CALCIUM_THRESHOLD_HU) & nz
        k, j, i = np.nonzero(calcium)
        if k.size:
            label_of = lab[k, j, i].astype(np.intp)
            hu = img[k, j, i].astype(np.float64)
            row = calcium.shape[2] + 2
            plane = (calcium.shape[1] + 2) * row
            lin = k.astype(np.int64) * plane + (j + 1) * row + (i + 1)  # sorted: np.nonzero is C order

            n2, comp2 = _components(lin, label_of, plane, row, _OFFSETS_2D_8)
            count = np.bincount(comp2, minlength=n2)
            peak = np.full(n2, -np.inf)
            np.maximum.at(peak, comp2, hu)
            comp_label = np.empty(n2, dtype=np.intp)
            comp_label[comp2] = label_of
            keep = count * pixel_area >= MIN_LESION_AREA_MM2 - AREA_TOLERANCE_MM2
            kept_label = comp_label[keep]
            weighted_px = np.bincount(kept_label, weights=count[keep] * density_weight(peak[keep]), minlength=n_keys)
            n2d = np.bincount(kept_label, minlength=n_keys)

            n3, comp3 = _components(lin, label_of, plane, row, _OFFSETS_3D_6)
            comp3_label = np.empty(n3, dtype=np.intp)
            comp3_label[comp3] = label_of
            n3d = np.bincount(comp3_label, minlength=n_keys)
            n_vox = np.bincount(label_of, minlength=n_keys)
            hu_sum = np.bincount(label_of, weights=hu, minlength=n_keys)

    slice_factor = inc_mm / REFERENCE_INCREMENT_MM
    per_label = {
        name: LabelScore(
            agatston=float(weighted_px[value]) * pixel_area * slice_factor,
            volume_mm3=int(n_vox[value]) * voxel_volume,
            mass_mg=float(hu_sum[value]) * voxel_volume * c / 1000.0,
            lesions_2d_agatston=int(n2d[value]),
            lesions_3d=int(n3d[value]),
        )
        for value, name in names.items()
    }
    total = LabelScore(
        agatston=float(sum(s.agatston for s in per_label.values())),
        volume_mm3=float(sum(s.volume_mm3 for s in per_label.values())),
        mass_mg=float(sum(s.mass_mg for s in per_label.values())),
        lesions_2d_agatston=sum(s.lesions_2d_agatston for s in per_label.values()),
        lesions_3d=sum(s.lesions_3d for s in per_label.values()),
    )
    facts = {"thickness_mm": thickness_mm, "kvp": kvp, "kernel": kernel}
    stated = any(v is not None for v in facts.values())
    note = acquisition_note(thickness_mm, kvp, kernel) if stated else None
    return CalciumScore(
        per_label=per_label,
        total=total,
        risk_category=risk_category(total.agatston),
        slice_increment_mm=inc_mm,
        pixel_spacing_mm=(row_mm, col_mm),
        mass_calibration=c,
        label_values={name: value for value, name in names.items()},
        agatston_equivalent=(note is not None) if stated else None,
        acquisition_note=note,
        acquisition={k: v for k, v in facts.items() if v is not None} if stated else None,
    )


def load_nifti_pair(
    image_path: str | Path, label_path: str | Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Load a NIfTI HU image and label map; return (image[k,j,i], labels[k,j,i], (row, col, increment) mm).

    The spacing is snapped to float32 precision (the NIfTI header's), e.g. 0.800000011920929 -> 0.8.
    Raises FileNotFoundError for a missing file and ValueError for non-3D data, a shape mismatch or
    different geometry (affines differing by more than 1e-3 mm).
    """
    import nibabel as nib

    loaded = []
    for path in (Path(image_path), Path(label_path)):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        try:
            loaded.append(nib.load(str(path)))
        except Exception as exc:  # nibabel raises several types for unreadable files
            raise ValueError(f"cannot read {path} as NIfTI: {exc}") from exc
    img, lab = loaded
    if len(img.shape) != 3 or len(lab.shape) != 3:
        raise ValueError(f"image and label must be 3D, got shapes {img.shape} and {lab.shape}")
    if img.shape != lab.shape:
        raise ValueError(f"image shape {img.shape} and label shape {lab.shape} differ")
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise ValueError("image and label have different affines (geometry); resample the label to the image")
    # NIfTI stores geometry as float32: snap each spacing to the shortest decimal with the same float32 value
    # (0.800000011920929 -> 0.8), so that scores equal those computed from the DICOM decimal spacing.
    spacing = tuple(float(str(np.float32(v))) for v in spacing_from_affine(img.affine, axis_order="ijk"))
    image = np.ascontiguousarray(np.asanyarray(img.dataobj).transpose(2, 1, 0))
    labels = np.ascontiguousarray(np.asanyarray(lab.dataobj).transpose(2, 1, 0))
    return image, labels, spacing


def score_nifti(image_path: str | Path, label_path: str | Path, **kwargs: Any) -> CalciumScore:
    """Load a NIfTI image (HU) and label map with nibabel and score them; kwargs go to :func:`score_calcium`."""
    image, labels, spacing = load_nifti_pair(image_path, label_path)
    return score_calcium(image, labels, spacing, **kwargs)
