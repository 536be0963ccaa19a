"""Synthetic stand-in for Clean-CC-CCII (COVID-19 chest CT, 3 classes), written in the real download's layout.

This is a *pipeline test*, not a benchmark: the phantoms exist so that the dataset-preparation code is exercised
on the real folder layout and image format without the real data. Accuracy measured on them says nothing about
performance on patients.

Layout (as the real dataset)::

    <out_root>/<class>/<patient>/<scan>/<slice>.png      e.g.  NCP/100034/1000341/0000.png

* ``class`` is one of :data:`CLASSES`; patient ``index`` gets ``CLASSES[index % 3]`` (balanced).
* ``patient`` and ``scan`` are integer-like strings without leading zeros:
  ``patient = f"{1 + seed % 9}{index:05d}"`` and ``scan = f"{patient}{k + 1}"`` for the patient's k-th scan
  (k = 0, or 0 and 1 for the ~30 % of patients with a follow-up scan). Both are unique over indices for one seed.
* Slices are ``0000.png``, ``0001.png``, ... (4-digit zero-padded, the naming Clean-CC-CCII's own cleaning code
  uses, ``f"{idx:04d}"``), slice 0 the most superior (lung apex), increasing towards the feet.
* Each PNG is 8-bit greyscale ("L"), no metadata chunks, so the same ``(seed, index, size)`` gives identical bytes.

Image model. Everything is built in millimetres and Hounsfield units (HU), then sampled on the scan's grid:
two lungs (smooth superellipse-like cross-sections, lobed by low-order harmonics, tapering to the apex and the
base, a cardiac notch in the left lung) of ~-880..-780 HU parenchyma with a gravity-dependent posterior density
gradient; pulmonary vessels as a branching tube tree from each hilum (-200..+40 HU at the centre of a thick vessel,
partial-volume dimmed when pixels are coarse); CT-like noise (15-40 HU Gaussian, slightly blurred in-plane).
Then the lung window :data:`LUNG_WINDOW_HU` = (-1200, 0) HU maps HU linearly to 0..255
(``round((HU + 1200) / 1200 * 255)``) and the lung mask is applied: outside the lungs every pixel is 0, inside the
lungs values are clipped to 1..255 so that the mask can be read back as ``pixel > 0``.

Classes:

* ``NCP``: 3-7 ground-glass opacities (-700..-400 HU, soft edges, 15-35 mm, flattened against the pleura), on both
  lungs (sides alternate), subpleural, biased to posterior and lower zones.
* ``CP``: one lobar consolidation (-100..+40 HU, sharp edge, one flat fissure-like border, air bronchograms),
  30-60 mm radius, deep in one lung; in ~35 % a second, segmental one (20-35 mm), 70 % of the time on the same side.
* ``Normal``: no lesion.

Follow-up scans (second scan of a patient) keep the anatomy, shift the patient by up to 8 mm in-plane, change the
slice count and z coverage, and grow/shrink each lesion by up to 25 % with a +-50 HU density change.

What separates the classes (honestly): lesion *density*, *size*, *location* and *laterality*. NCP lesions are
faint, peripheral and bilateral; CP lesions are dense, large, deeper and mostly one-sided. Global mean intensity is
a poor cue on purpose: lung volume varies (in-plane scale 0.85-1.15, field of view 320-380 mm, lung height
~205-290 mm) and so does the parenchyma density (-880..-780 HU plus a 0-60 HU posterior gradient), which swamps the
few per cent of lung volume that lesions occupy; over 4 seeds x 45 small patients the volume means of the three
classes overlap completely (about 6-17 grey levels each). Lung-only statistics are much stronger cues: the
fraction of lung voxels above -100 HU is ~0 for NCP and Normal (vessels: 0 in ``small``, where they are
partial-volumed, ~0.1-0.3 % in ``full``) against 0.5-9 % for CP, so CP is easy; NCP vs Normal needs the
-700..-400 HU fraction, whose ranges overlap, or the shape and position of the patches, which a 3D CNN can use.

Truth: a lesion's mask is where its soft-edge weight is >= 0.5, inside its own lung (a lesion never crosses into
the other lung); lung masks are the exact geometric lung shapes, i.e. ``pixel > 0`` of the written PNGs.

Anatomy (lungs, vessels, lesions) in mm depends only on ``(seed, index)``, not on ``size``: ``small`` and ``full``
render the same patient at two resolutions (the noise differs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import expit

__all__ = ["CLASSES", "LUNG_WINDOW_HU", "SIZES", "make_lung_patient", "write_lung_patient"]

log = logging.getLogger(__name__)

CLASSES = ("NCP", "CP", "Normal")
LUNG_WINDOW_HU = (-1200.0, 0.0)  # lung window: HU -1200 -> 0, HU 0 -> 255, linear in between
SIZES: dict[str, tuple[int, tuple[int, int]]] = {"small": (64, (16, 24)), "full": (512, (60, 100))}

_TWO_SCANS_P = 0.3
_PARENCHYMA_HU = (-880.0, -780.0)
_GRAVITY_HU = (0.0, 60.0)  # extra density of the most posterior (dependent) lung
_VESSEL_HU = (-60.0, 40.0)  # centre of a thick vessel; thin ones and partial volume reach down to ~-200
_GGO_HU = (-700.0, -400.0)
_CONSOLIDATION_HU = (-100.0, 40.0)
_AIR_HU = -950.0
_NOISE_HU = (15.0, 40.0)
_STEP_MM = 0.5  # sampling step along vessel centrelines
_GENERATIONS = 9  # vessel tree depth
_THICK_VESSEL_MM, _THIN_VESSEL_MM, _AIRWAY_MM = 2.0, 0.9, 1.2  # tube radii (Gaussian sigma)
_THICK_GENERATIONS = 3  # generations 0-2 are thick vessels, the rest thin
_TAPER = 0.85  # centre contrast of a vessel falls by this factor per generation


def _profile_shape(t: np.ndarray) -> np.ndarray:
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(t) * np.sqrt(1.0 - t**8)


_PROFILE_PEAK = float(_profile_shape(np.linspace(0.0, 1.0, 2001)).max())


def _profile(t: np.ndarray) -> np.ndarray:
    """Relative lung cross-section scale along the cranio-caudal fraction t (0 apex, 1 base), peak 1 near t=0.8."""
    return _profile_shape(t) / _PROFILE_PEAK


@dataclass(frozen=True)
class _Lung:
    """One lung: cross-section ``rho(x, y) < profile(t) * (1 + sum_k a_k cos(k theta + phi_k + omega_k t))``."""

    side: int  # -1: patient right (image left, x < 0); +1: patient left (image right)
    cx: float  # centre (mm); cy is the centre at the apex, moving posteriorly by ``drift`` towards the base
    cy: float
    ax: float  # semi-axes (mm) at the widest level
    ay: float
    drift: float  # posterior shift of the centre at the base (mm)
    amp: np.ndarray  # harmonic amplitudes, k = 2, 3, 4
    phase: np.ndarray
    omega: np.ndarray

    def radius(self, theta: float, t: float) -> float:
        """Boundary in normalised rho units at angle theta and level t."""
        k = np.arange(2, 5)
        lobes = float(np.sum(self.amp * np.cos(k * theta + self.phase + self.omega * t)))
        return float(_profile(t)) * (1.0 + lobes)


@dataclass(frozen=True)
class _Lesion:
    kind: str  # "ggo" | "consolidation"
    side: int
    centre: tuple[float, float, float]  # (x, y, z) mm
    radii: tuple[float, float, float]  # (across, along, z) mm; "across" lies along ``angle`` in-plane
    angle: float  # rad, in-plane direction of the first axis (the pleural normal for GGO)
    hu: float
    soft: float  # edge width as a fraction of the radius
    cut: tuple[float, float, float, float] | None = None  # fissure plane: unit normal (x, y, z), offset mm
    bronchi: np.ndarray | None = None  # (P, 3) mm centreline points of the air bronchograms (consolidation)


@dataclass(frozen=True)
class _Scan:
    scan_id: str
    u_slices: float  # position in the size's slice-count range
    top_mm: float  # z of the top of the first slice (lung apex at z = 0)
    extent_mm: float
    shift: tuple[float, float]  # patient position in-plane (mm)
    lesions: tuple[_Lesion, ...]


@dataclass(frozen=True)
class _Patient:
    klass: str
    patient: str
    fov_mm: float
    height_mm: float
    lungs: tuple[_Lung, _Lung]
    heart: tuple[float, float, float, float]  # cx, cy, ax, ay (mm)
    parenchyma_hu: float
    gravity_hu: float
    vessel_hu: float
    noise_hu: float
    vessels: tuple[tuple[np.ndarray, np.ndarray], ...]  # (centreline points (P, 3) mm, contrast (P,)): thick, thin
    scans: tuple[_Scan, ...]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _tree(rng: np.random.Generator, root: np.ndarray, dirs: np.ndarray, length: float, generations: int) -> list:
    """Centreline points (P, 3) of each generation of a binary tree grown from ``root`` along ``dirs``.

    Each branch is two straight halves with a small kink; lengths shrink by 0.75 per generation.
    """
    starts = np.repeat(root[None], len(dirs), axis=0)
    dirs = _unit(dirs)
    out = []
    for g in range(generations):
        half = 0.5 * length * 0.75**g * rng.uniform(0.7, 1.3, size=len(starts))
        f = np.linspace(0.0, 1.0, max(2, int(np.ceil(half.max() / _STEP_MM)) + 1))[None, :, None]
        kinked = _unit(dirs + 0.3 * rng.normal(size=dirs.shape))
        mids = starts + dirs * half[:, None]
        ends = mids + kinked * half[:, None]
        first = starts[:, None, :] + dirs[:, None, :] * (half[:, None, None] * f)
        second = mids[:, None, :] + kinked[:, None, :] * (half[:, None, None] * f)
        out.append(np.concatenate([first, second], axis=1).reshape(-1, 3))
        starts = np.repeat(ends, 2, axis=0)
        dirs = _unit(np.repeat(kinked, 2, axis=0) + 0.5 * rng.normal(size=(len(starts), 3)))
    return out


def _hilum(lung: _Lung, height: float) -> np.ndarray:
    return np.array([lung.cx - lung.side * 0.5 * lung.ax, lung.cy + lung.drift * 0.42, 0.42 * height])


def _vessel_trees(rng: np.random.Generator, lungs: tuple[_Lung, _Lung], height: float) -> list:
    """Per-generation centreline points of both lungs' vessel trees, grown from each hilum."""
    gens: list[list[np.ndarray]] = [[] for _ in range(_GENERATIONS)]
    for lung in lungs:
        s = lung.side
        hilum = _hilum(lung, height)
        base = np.array(
            [
                [0, 0, -1],
                [0, 0, 1],
                [s, 0, 0],
                [0.6 * s, -0.8, 0],
                [0.5 * s, 0.7, 0.5],
                [0.7 * s, 0.2, -0.7],
                [0.7 * s, -0.3, 0.7],
                [0.2 * s, 0.8, -0.4],
            ],
            dtype=float,
        )
        tree = _tree(rng, hilum, base + 0.3 * rng.normal(size=base.shape), 0.17 * height, _GENERATIONS)
        for g, pts in enumerate(tree):
            gens[g].append(pts)
    return [np.concatenate(g) for g in gens]


def _sample_patient(rng: np.random.Generator, seed: int, index: int) -> _Patient:
    """Draw every size-independent parameter of patient ``index`` from ``rng`` (its noise is drawn after)."""
    klass = CLASSES[index % len(CLASSES)]
    patient = f"{1 + seed % 9}{index:05d}"
    scale = rng.uniform(0.85, 1.15)
    height = rng.uniform(220.0, 270.0) * (0.5 + 0.5 * scale)
    lungs = []
    for side in (-1, 1):
        ax = rng.uniform(50.0, 60.0) * scale * (1.0 if side < 0 else 0.92)
        ay = rng.uniform(82.0, 98.0) * scale
        cx = side * (1.2 * ax + rng.uniform(6.0, 14.0) * scale)
        lungs.append(
            _Lung(
                side=side,
                cx=cx,
                cy=rng.uniform(0.0, 12.0),
                ax=ax,
                ay=ay,
                drift=rng.uniform(5.0, 20.0),
                amp=rng.uniform(0.015, 0.06, size=3),
                phase=rng.uniform(0.0, 2 * np.pi, size=3),
                omega=rng.uniform(-3.0, 3.0, size=3),
            )
        )
    lungs_t = (lungs[0], lungs[1])
    extent = max(abs(lungs[0].cx) + 1.2 * lungs[0].ax, lungs[1].cx + 1.2 * lungs[1].ax, 32.0 + 1.2 * 98 * scale)
    fov = max(rng.uniform(320.0, 380.0), 2.0 * extent + 20.0)
    heart = (
        rng.uniform(5.0, 15.0),
        -rng.uniform(25.0, 40.0),
        rng.uniform(50.0, 60.0) * scale,
        rng.uniform(35.0, 45.0) * scale,
    )
    parenchyma = rng.uniform(*_PARENCHYMA_HU)
    gravity = rng.uniform(*_GRAVITY_HU)
    vessel_hu = rng.uniform(*_VESSEL_HU)
    noise = rng.uniform(*_NOISE_HU)
    gens = _vessel_trees(rng, lungs_t, height)
    amps = [np.full(len(pts), _TAPER**gen) for gen, pts in enumerate(gens)]
    n = _THICK_GENERATIONS
    vessels = (
        (np.concatenate(gens[:n]), np.concatenate(amps[:n])),
        (np.concatenate(gens[n:]), np.concatenate(amps[n:])),
    )

    lesions = _sample_lesions(rng, klass, lungs_t, height)
    n_scans = 2 if rng.random() < _TWO_SCANS_P else 1
    scans = []
    for k in range(n_scans):
        if k > 0:  # follow-up: lesions grow or shrink a little and change density
            lesions = tuple(_evolve(rng, les) for les in lesions)
        top = -rng.uniform(0.02, 0.06) * height
        extent_z = height * (1.0 + rng.uniform(0.04, 0.12))
        shift = (0.0, 0.0) if k == 0 else (rng.uniform(-8.0, 8.0), rng.uniform(-8.0, 8.0))
        scans.append(_Scan(f"{patient}{k + 1}", rng.random(), top, extent_z, shift, lesions))
    return _Patient(
        klass,
        patient,
        fov,
        height,
        lungs_t,
        heart,
        parenchyma,
        gravity,
        vessel_hu,
        noise,
        vessels,
        tuple(scans),
    )


def _sample_lesions(rng: np.random.Generator, klass: str, lungs: tuple[_Lung, _Lung], height: float) -> tuple:
    """NCP: subpleural bilateral GGO; CP: lobar consolidation(s), mostly one side; Normal: none."""
    lesions: list[_Lesion] = []
    if klass == "NCP":
        n = int(rng.integers(3, 8))
        first = int(rng.integers(0, 2))
        for i in range(n):
            lung = lungs[(first + i) % 2]
            t = 0.2 + 0.7 * rng.beta(2.2, 1.6)  # lower zones more often
            mu = 0.75 * np.pi if lung.side < 0 else 0.25 * np.pi  # postero-lateral
            theta = float(rng.vonmises(mu, 1.5))
            r = rng.uniform(15.0, 35.0)
            radii = (r * rng.uniform(0.45, 0.65), r, r * rng.uniform(0.7, 1.0))
            boundary = lung.radius(theta, t)
            a_eff = np.hypot(lung.ax * np.cos(theta), lung.ay * np.sin(theta))
            rho = max(boundary - radii[0] * rng.uniform(0.3, 0.7) / a_eff, 0.2 * boundary)
            centre = (
                lung.cx + lung.ax * rho * np.cos(theta),
                lung.cy + lung.drift * t + lung.ay * rho * np.sin(theta),
                t * height,
            )
            normal = float(np.arctan2(np.sin(theta) / lung.ay, np.cos(theta) / lung.ax))
            lesions.append(
                _Lesion(
                    "ggo",
                    lung.side,
                    _floats(centre),
                    _floats(radii),
                    normal,
                    rng.uniform(*_GGO_HU),
                    rng.uniform(0.12, 0.25),
                )
            )
    elif klass == "CP":
        main = int(rng.integers(0, 2))
        n = 2 if rng.random() < 0.35 else 1
        for i in range(n):
            lung = lungs[main] if i == 0 or rng.random() < 0.7 else lungs[1 - main]
            t = rng.uniform(0.3, 0.85)
            theta = rng.uniform(0.0, 2 * np.pi)
            rho = rng.uniform(0.3, 0.55) * lung.radius(theta, t)
            r = rng.uniform(30.0, 60.0) if i == 0 else rng.uniform(20.0, 35.0)
            radii = (r * rng.uniform(0.75, 1.0), r, r * rng.uniform(0.75, 1.0))
            centre = (
                lung.cx + lung.ax * rho * np.cos(theta),
                lung.cy + lung.drift * t + lung.ay * rho * np.sin(theta),
                t * height,
            )
            normal = _unit(rng.normal(size=3))
            cut = (*_floats(normal), float(r * rng.uniform(0.2, 0.5))) if i == 0 else None
            # air bronchograms: a small airway tree entering the consolidation from the hilum side
            toward = _unit(np.asarray(centre) - _hilum(lung, height))
            root = np.asarray(centre) - toward * 0.8 * r
            bronchi = np.concatenate(_tree(rng, root, toward + 0.35 * rng.normal(size=(3, 3)), 0.7 * r, 4))
            lesions.append(
                _Lesion(
                    "consolidation",
                    lung.side,
                    _floats(centre),
                    _floats(radii),
                    rng.uniform(0.0, np.pi),
                    rng.uniform(*_CONSOLIDATION_HU),
                    rng.uniform(0.02, 0.04),
                    cut,
                    bronchi,
                )
            )
    return tuple(lesions)


def _floats(v) -> tuple:
    return tuple(float(x) for x in v)


def _evolve(rng: np.random.Generator, les: _Lesion) -> _Lesion:
    lo, hi = _GGO_HU if les.kind == "ggo" else _CONSOLIDATION_HU
    return replace(
        les,
        radii=_floats(np.asarray(les.radii) * rng.uniform(0.75, 1.25)),
        hu=float(np.clip(les.hu + rng.uniform(-50.0, 50.0), lo, hi)),
    )


@dataclass(frozen=True)
class _Grid:
    """Voxel centres in mm: z (slices), y (rows, anterior -> posterior), x (columns, patient right -> left)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return float(self.z[1] - self.z[0]), float(self.y[1] - self.y[0]), float(self.x[1] - self.x[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.z), len(self.y), len(self.x)

    def index(self, pts: np.ndarray) -> np.ndarray:
        """(P, 3) (x, y, z) mm -> (P, 3) fractional (k, j, i)."""
        sz, sy, sx = self.spacing
        return np.stack([(pts[:, 2] - self.z[0]) / sz, (pts[:, 1] - self.y[0]) / sy, (pts[:, 0] - self.x[0]) / sx], 1)


def _make_grid(p: _Patient, scan: _Scan, size: str) -> _Grid:
    n_px, (lo, hi) = SIZES[size]
    n_sl = lo + min(int(scan.u_slices * (hi - lo + 1)), hi - lo)
    dz = scan.extent_mm / n_sl
    px = p.fov_mm / n_px
    inplane = (np.arange(n_px) + 0.5 - n_px / 2) * px
    return _Grid(scan.top_mm + (np.arange(n_sl) + 0.5) * dz, inplane + scan.shift[1], inplane + scan.shift[0])


def _lung_masks(p: _Patient, g: _Grid) -> list[np.ndarray]:
    """Boolean masks (Z, H, W) of the right and the left lung (heart excluded), each computed in its own box."""
    t = g.z / p.height_mm
    prof = _profile(t).astype(np.float32)
    hx, hy, hax, hay = p.heart
    heart_t = np.clip(1.0 - ((t - 0.8) / 0.38) ** 2, 0.0, None).astype(np.float32)  # squared relative size
    heart_x2 = (((g.x - hx) / hax) ** 2).astype(np.float32)
    heart_y2 = (((g.y - hy) / hay) ** 2).astype(np.float32)
    heart2 = heart_y2[:, None] + heart_x2[None, :]  # (H, W) squared normalised distance from the heart axis
    masks = []
    for lung in p.lungs:
        m = np.zeros(g.shape, dtype=bool)
        reach = 1.0 + float(lung.amp.sum())
        ks = np.flatnonzero((t > 0.0) & (t < 1.0))
        rows = np.flatnonzero(
            (g.y > lung.cy - reach * lung.ay - 1.0) & (g.y < lung.cy + lung.drift + reach * lung.ay + 1.0)
        )
        cols = np.flatnonzero(np.abs(g.x - lung.cx) < reach * lung.ax + 1.0)
        if len(cols) and len(rows) and len(ks):
            box = (slice(ks[0], ks[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            tb = t[box[0]]
            xn = ((g.x[box[2]] - lung.cx) / lung.ax).astype(np.float32)[None, None, :]
            yn = ((g.y[None, box[1]] - lung.cy - lung.drift * tb[:, None]) / lung.ay).astype(np.float32)[:, :, None]
            rho = np.sqrt(xn**2 + yn**2)
            e1 = (xn + 1j * yn) / np.maximum(rho, 1e-6)  # exp(i theta), complex64
            e2 = e1 * e1
            lobes = 1.0 + sum(
                lung.amp[j] * (ek * np.exp(1j * (lung.phase[j] + lung.omega[j] * tb))[:, None, None]).real
                for j, ek in enumerate((e2, e2 * e1, e2 * e2))
            )
            inside = rho < prof[box[0], None, None] * lobes
            inside &= ~(heart2[None, box[1], box[2]] < heart_t[box[0], None, None])
            m[box] = inside
        masks.append(m)
    return masks


def _box(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped to the array)."""
    out = []
    for axis, grow in enumerate(margin):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = (hit[0], hit[-1] + 1) if len(hit) else (0, 0)
        out.append(slice(max(0, lo - grow), min(mask.shape[axis], hi + grow)))
    return out[0], out[1], out[2]


def _tube_weight(points: np.ndarray, amp: np.ndarray, g: _Grid, box: tuple, radius_mm: float) -> np.ndarray:
    """Tube map over ``box`` (centreline value ``amp`` of each point, Gaussian cross-section of sigma ``radius_mm``).

    A tube much thinner than a voxel is averaged with its background: its peak is scaled by the fraction of a
    pixel (and, more weakly, of the slice thickness) that it fills. Values lie in 0..1.
    """
    shape = tuple(b.stop - b.start for b in box)
    w = np.zeros(shape, dtype=np.float32)
    idx = np.rint(g.index(points)).astype(np.int64) - np.array([b.start for b in box])
    ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
    if not ok.any():
        return w
    flat = np.ravel_multi_index(tuple(idx[ok].T), shape)
    np.maximum.at(w.ravel(), flat, amp[ok].astype(np.float32))
    centre = w.ravel()[flat]
    w = ndimage.gaussian_filter(w, [radius_mm / s for s in g.spacing], truncate=3.0)
    peak = float(np.median(w.ravel()[flat] / centre))  # blurred centreline relative to its drawn value
    partial = min(1.0, 2.0 * radius_mm / g.spacing[2]) * min(1.0, 2.0 * radius_mm / g.spacing[0]) ** 0.5
    np.multiply(w, partial / max(peak, 1e-6), out=w)
    return np.minimum(w, partial, out=w)


def _lesion_weight(les: _Lesion, g: _Grid) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Soft ellipsoid (optionally cut by a fissure plane) in its bounding box: (box, weight 0..1)."""
    cx, cy, cz = les.centre
    reach = max(les.radii) * (1.0 + 5.0 * les.soft)
    box = []
    for axis, c in ((g.z, cz), (g.y, cy), (g.x, cx)):
        lo, hi = np.searchsorted(axis, [c - reach, c + reach])
        if hi <= lo:
            return None
        box.append(slice(int(lo), int(hi)))
    zz = (g.z[box[0]] - cz)[:, None, None]
    yy = (g.y[box[1]] - cy)[None, :, None]
    xx = (g.x[box[2]] - cx)[None, None, :]
    ca, sa = np.cos(les.angle), np.sin(les.angle)
    ra, rb, rz = les.radii
    d = np.sqrt(((xx * ca + yy * sa) / ra) ** 2 + ((yy * ca - xx * sa) / rb) ** 2 + (zz / rz) ** 2)
    w = expit((1.0 - d) / les.soft)
    if les.cut is not None:
        nx, ny, nz, off = les.cut
        w = w * expit((xx * nx + yy * ny + zz * nz + off) / 2.0)
    return (box[0], box[1], box[2]), w.astype(np.float32)


def _side_name(side: int) -> str:
    return "right" if side < 0 else "left"


def _render_scan(p: _Patient, scan: _Scan, size: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    g = _make_grid(p, scan, size)
    masks = _lung_masks(p, g)
    lung = masks[0] | masks[1]
    posterior = np.clip((g.y + 100.0) / 200.0, 0.0, 1.0).astype(np.float32)
    hu = np.broadcast_to((p.parenchyma_hu + p.gravity_hu * posterior)[None, :, None], g.shape).astype(np.float32)
    box = _box(lung, tuple(int(np.ceil(3.0 * _THICK_VESSEL_MM / s)) + 1 for s in g.spacing))
    sub = hu[box]
    for (pts, amp), radius in zip(p.vessels, (_THICK_VESSEL_MM, _THIN_VESSEL_MM), strict=True):
        w = _tube_weight(pts, amp, g, box, radius)
        sub = np.maximum(sub, sub + w * (np.float32(p.vessel_hu) - sub))
    hu[box] = sub

    lesion_mask = np.zeros(g.shape, dtype=bool)
    facts = []
    for les in scan.lesions:
        fact = {
            "type": les.kind,
            "side": _side_name(les.side),
            "centre_mm": list(les.centre),
            "centre_voxel": [float(v) for v in g.index(np.array([les.centre]))[0]],
            "radius_mm": float(max(les.radii)),
            "radii_mm": list(les.radii),
            "hu": float(les.hu),
            "voxels": 0,
        }
        facts.append(fact)
        found = _lesion_weight(les, g)
        if found is None:
            continue
        box, w = found
        w *= masks[0 if les.side < 0 else 1][box]  # a lesion stays in its own lung
        sub = hu[box]
        sub = np.maximum(sub, sub + w * (np.float32(les.hu) - sub))
        if les.bronchi is not None:  # air-filled bronchi show only where the consolidation surrounds them
            a = np.float32(0.9) * _tube_weight(les.bronchi, np.ones(len(les.bronchi)), g, box, _AIRWAY_MM) * w
            sub = sub + a * (np.float32(_AIR_HU) - sub)
        hu[box] = sub
        inside = w >= 0.5
        lesion_mask[box] |= inside
        fact["voxels"] = int(inside.sum())

    noise = rng.standard_normal(g.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7), truncate=3.0)
    hu += noise * np.float32(p.noise_hu / max(float(noise.std()), 1e-6))

    lo, hi = LUNG_WINDOW_HU
    img = np.clip(np.rint((hu - lo) * np.float32(255.0 / (hi - lo))), 1, 255).astype(np.uint8)
    img[~lung] = 0
    truth = {
        "lesions": facts,
        "lung_mask": lung,
        "lesion_mask": lesion_mask,
        "spacing_mm": g.spacing,
        "lung_volume_voxels": int(lung.sum()),
        "lesion_volume_voxels": int(lesion_mask.sum()),
    }
    return img, truth


def make_lung_patient(seed: int, index: int, size: str) -> dict:
    """Synthesise patient ``index`` of dataset ``seed`` at ``size`` ("small": 64x64, "full": 512x512).

    Returns ``{"class", "patient", "scans": {scan_id: uint8 [slices, H, W]}, "truth"}``. ``truth`` holds
    ``class``, ``lesions`` (one dict per lesion and scan: ``scan``, ``type`` "ggo"/"consolidation", ``side``
    "right"/"left" (patient side; patient right is image left), ``centre_mm`` (x, y, z), ``centre_voxel``
    (slice, row, column), ``radius_mm``, ``radii_mm``, ``hu``, ``voxels`` in the lesion mask),
    ``lung_volume_voxels`` / ``lesion_volume_voxels`` / ``spacing_mm`` (z, y, x) per scan, and the boolean
    ``lung_mask`` / ``lesion_mask`` arrays per scan (lesion = soft-edge weight >= 0.5, inside its lung).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    start = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 3]))  # the patient's one RNG
    p = _sample_patient(rng, seed, index)
    scans: dict[str, np.ndarray] = {}
    truth: dict = {
        "class": p.klass,
        "window_hu": LUNG_WINDOW_HU,
        "lesions": [],
        "lung_volume_voxels": {},
        "lesion_volume_voxels": {},
        "spacing_mm": {},
        "lung_mask": {},
        "lesion_mask": {},
    }
    for scan in p.scans:
        img, t = _render_scan(p, scan, size, rng)
        scans[scan.scan_id] = img
        truth["lesions"] += [{"scan": scan.scan_id, **f} for f in t["lesions"]]
        for key in ("lung_volume_voxels", "lesion_volume_voxels", "spacing_mm", "lung_mask", "lesion_mask"):
            truth[key][scan.scan_id] = t[key]
    log.debug(
        "lung phantom %s/%s (%s): %d scan(s), %.2f s", p.klass, p.patient, size, len(scans), time.perf_counter() - start
    )
    return {"class": p.klass, "patient": p.patient, "scans": scans, "truth": truth}


def write_lung_patient(out_root: Path, seed: int, index: int, size: str) -> dict:
    """Write patient ``index`` as ``<out_root>/<class>/<patient>/<scan>/0000.png ...``; return a JSON-able summary.

    Existing slices of the same scan are overwritten (and surplus ones from an earlier run removed).

    The summary: ``class``, ``patient``, ``size`` and ``scans`` = {scan_id: {``path`` (relative to out_root),
    ``slices``, ``shape``, ``spacing_mm``, ``lung_volume_voxels``, ``lesion_volume_voxels``, ``lesions``}}.
    """
    case = make_lung_patient(seed, index, size)
    truth = case["truth"]
    summary: dict = {"class": case["class"], "patient": case["patient"], "size": size, "scans": {}}
    for scan_id, vol in case["scans"].items():
        rel = Path(case["class"]) / case["patient"] / scan_id
        folder = Path(out_root) / rel
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"{k:04d}.png" for k in range(len(vol))]
        for stale in sorted({f.name for f in folder.glob("*.png")} - set(names)):  # from an earlier, longer run
            (folder / stale).unlink()
        for name, sl in zip(names, vol, strict=True):
            Image.fromarray(np.ascontiguousarray(sl)).save(folder / name, format="PNG", compress_level=6)
        summary["scans"][scan_id] = {
            "path": rel.as_posix(),
            "slices": int(vol.shape[0]),
            "shape": [int(s) for s in vol.shape],
            "spacing_mm": [float(s) for s in truth["spacing_mm"][scan_id]],
            "lung_volume_voxels": truth["lung_volume_voxels"][scan_id],
            "lesion_volume_voxels": truth["lesion_volume_voxels"][scan_id],
            "lesions": [
                {k: v for k, v in les.items() if k != "scan"} for les in truth["lesions"] if les["scan"] == scan_id
            ],
        }
    log.info(
        "wrote %s/%s: %s",
        case["class"],
        case["patient"],
        ", ".join(f"{s} ({v['slices']} slices)" for s, v in summary["scans"].items()),
    )
    return summary
