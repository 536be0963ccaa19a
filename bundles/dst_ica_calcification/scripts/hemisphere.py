"""Deterministic hemisphere separation: the mid-sagittal plane of a head CT from its bilateral symmetry.

The paper (DST, arXiv 2507.08214) names a "deterministic hemisphere separation" as its anatomical prior but does
not publish it; this is our reconstruction. The plane is NOT the image centre: heads lie off-centre, yawed and
rolled in the scanner.

Method (reflect the head across candidate planes and make it match itself):

1. Subsample the volume to about ``SAMPLE_MM`` in-plane (and along the slices when they are thin), clip HU to
   ``HU_RANGE`` and smooth lightly. The sample points are the bone voxels (>= ``BONE_HU``): skull, skull base,
   face and spine carry the symmetry; soft tissue would add little but time.
2. Cost of a plane: mean squared difference between each point's value and the trilinearly interpolated value
   at its mirror image, each term capped at ``CAP_HU`` squared (a robust loss: calcium, pathology, a head holder
   have no mirror image). Points whose mirror image falls outside the volume do not count, so a slab cut
   axially through a rolled head does not pull the plane upright. Interpolation, not nearest-neighbour
   matching, keeps the cost smooth across thick slices (point matching on a 5 mm slice grid prefers planes that
   map slices onto slices, i.e. no roll).
3. Coarse search over normals within +-``SEARCH_DEG`` of the patient's left-right axis (yaw about z, then roll
   about y) through the bone centroid, on a subset of the points; then Gauss-Newton on (yaw, roll, offset) with
   the interpolated image gradient, Levenberg-damped, to convergence.

Everything is deterministic: no random sampling, a fixed search grid, a fixed number of points.

Conventions: points and planes in DICOM patient coordinates (LPS mm; +x is the patient's LEFT). The normal points
to the patient's left, so a positive signed distance means left. Arrays are indexed ``[k, j, i]`` (slice, row,
column) and ``affine`` maps (i, j, k) voxel indices to LPS mm (``Grid.affine_lps()``, ``truth["affine_lps"]``;
for a NIfTI use :func:`lps_affine_from_nifti`). Sides are coded 0 = right, 1 = left (``SIDES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIDES = ("right", "left")
BONE_HU = 300.0
HU_RANGE = (-200.0, 1500.0)
CAP_HU = 600.0  # robust loss: a mirror mismatch counts at most this much
SAMPLE_MM = 2.0  # sampling of the subsampled volume
SMOOTH_VOXELS = 0.7  # Gaussian sigma on the subsampled volume
SEARCH_DEG = 20.0  # coarse search range of yaw and roll
SEARCH_STEP_DEG = 5.0
MAX_POINTS = 20000
COARSE_POINTS = 3000
MAX_ITERATIONS = 30
MIN_BONE_POINTS = 200
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine_from_nifti(affine_ras: np.ndarray) -> np.ndarray:
    """LPS affine of (i, j, k) from a NIfTI (RAS) affine of the same indices."""
    return RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)


def voxel_to_patient(kji: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices [k, j, i] -> (N, 3) LPS mm."""
    a = np.asarray(affine, dtype=np.float64)
    ijk = np.asarray(kji, dtype=np.float64)[:, ::-1]
    return ijk @ a[:3, :3].T + a[:3, 3]


@dataclass(frozen=True)
class MidSagittalPlane:
    """A plane through ``point_mm`` with unit ``normal`` towards the patient's left (LPS)."""

    point_mm: tuple[float, float, float]
    normal: tuple[float, float, float]
    residual_hu: float = float("nan")  # robust RMS mirror mismatch of the bone points (a quality measure)
    iterations: int = 0

    def __post_init__(self):
        n = np.asarray(self.normal, dtype=np.float64)
        norm = float(np.linalg.norm(n))
        if n.shape != (3,) or not math.isfinite(norm) or norm == 0:
            raise ValueError(f"normal must be a nonzero 3-vector, got {self.normal!r}")
        if n[0] < 0:  # keep the normal pointing to the patient's left (+x in LPS)
            n = -n
        object.__setattr__(self, "normal", tuple(float(v) for v in n / norm))
        object.__setattr__(self, "point_mm", tuple(float(v) for v in np.asarray(self.point_mm, dtype=np.float64)))

    def signed_distance(self, points_mm: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of (N, 3) LPS points: > 0 on the patient's left, < 0 on the right."""
        return (np.asarray(points_mm, dtype=np.float64) - self.point_mm) @ np.asarray(self.normal)

    def side_of_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Side code per LPS point: 0 right, 1 left (a point exactly on the plane counts as right)."""
        return (self.signed_distance(np.atleast_2d(points_mm)) > 0).astype(np.uint8)

    def side_of_voxels(self, kji: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Side code (0 right, 1 left) per voxel index [k, j, i]."""
        return self.side_of_points(voxel_to_patient(np.atleast_2d(kji), affine))

    def side_map(self, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
        """uint8 array [k, j, i] of side codes (0 right, 1 left) for every voxel of a grid."""
        a = np.asarray(affine, dtype=np.float64)
        n = np.asarray(self.normal)
        step = n @ a[:3, :3]  # signed-distance change per (i, j, k) index step
        d0 = float(n @ (a[:3, 3] - np.asarray(self.point_mm)))
        k, j, i = (np.arange(s, dtype=np.float64) for s in shape)
        dist = d0 + step[2] * k[:, None, None] + step[1] * j[None, :, None] + step[0] * i[None, None, :]
        return (dist > 0).astype(np.uint8)

    def angle_deg(self, normal: np.ndarray) -> float:
        """Angle (degrees) between this plane's normal and another normal (orientation ignored)."""
        n = np.asarray(normal, dtype=np.float64)
        c = abs(float(np.dot(self.normal, n / np.linalg.norm(n))))
        return math.degrees(math.acos(min(c, 1.0)))

    def as_dict(self) -> dict:
        return {
            "point_mm": list(self.point_mm),
            "normal": list(self.normal),
            "residual_hu": self.residual_hu if math.isfinite(self.residual_hu) else None,
            "iterations": self.iterations,
            "frame": "LPS mm; normal towards the patient's left",
        }

    @classmethod
    def from_dict(cls, data: dict) -> MidSagittalPlane:
        return cls(point_mm=tuple(data["point_mm"]), normal=tuple(data["normal"]))


def _normal(yaw_deg: float, roll_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patient x axis yawed about z, then rolled about y (the head phantoms' convention), and its
    derivatives per radian of yaw and of roll."""
    a, b = math.radians(yaw_deg), math.radians(roll_deg)
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    n = np.array([ca * cb, sa * cb, -sb])
    return n, np.array([-sa * cb, ca * cb, 0.0]), np.array([-ca * sb, -sa * sb, -cb])


class _Symmetry:
    """The subsampled volume, its bone points and the mirror cost of planes (yaw, roll, offset from the centroid)."""

    def __init__(self, image: np.ndarray, affine: np.ndarray, bone_hu: float):
        a = np.asarray(affine, dtype=np.float64)
        col_mm, row_mm, inc_mm = np.linalg.norm(a[:3, :3], axis=0)
        steps = np.array([max(1, round(SAMPLE_MM / s)) for s in (inc_mm, row_mm, col_mm)])  # k, j, i
        vol = np.asarray(image)[:: steps[0], :: steps[1], :: steps[2]].astype(np.float32)
        np.clip(vol, *HU_RANGE, out=vol)
        self.vol = ndimage.gaussian_filter(vol, SMOOTH_VOXELS)
        self.grad = np.gradient(self.vol)  # per index step along k, j, i
        sub = a.copy()
        sub[:3, :3] = a[:3, :3] * steps[::-1]
        self.to_index = np.linalg.inv(sub)[:3]  # LPS -> (i, j, k)
        kji = np.argwhere(self.vol >= bone_hu)
        if len(kji) > MAX_POINTS:  # an even, deterministic thinning
            kji = kji[np.linspace(0, len(kji) - 1, MAX_POINTS).astype(np.intp)]
        self.values = self.vol[tuple(kji.T)].astype(np.float64)
        self.points = voxel_to_patient(kji, sub)
        self.centroid = self.points.mean(axis=0) if len(kji) else np.zeros(3)
        self.rel = self.points - self.centroid
        self.upper = np.array(self.vol.shape, dtype=np.float64) - 1.0

    def _mirror(self, params, subset=slice(None)):
        n, dn_yaw, dn_roll = _normal(params[0], params[1])
        rel = self.rel[subset]
        h = rel @ n - params[2]  # signed distance to the plane
        mirrored = self.points[subset] - 2.0 * h[:, None] * n[None, :]
        kji = (mirrored @ self.to_index[:, :3].T + self.to_index[:, 3])[:, ::-1]
        inside = np.all((kji >= 0.0) & (kji <= self.upper), axis=1)
        return n, dn_yaw, dn_roll, rel, h, kji, inside

    def cost(self, params, subset=slice(None)) -> float:
        *_, kji, inside = self._mirror(params, subset)
        if inside.sum() < MIN_BONE_POINTS // 4:
            return math.inf
        mirrored_values = ndimage.map_coordinates(self.vol, kji[inside].T, order=1, prefilter=False)
        diff = self.values[subset][inside] - mirrored_values
        return float(np.mean(np.minimum(diff * diff, CAP_HU * CAP_HU)))

    def gauss_newton_step(self, params, damping: float) -> tuple[np.ndarray, float]:
        """One Levenberg-damped Gauss-Newton step on (yaw deg, roll deg, offset mm); returns (step, cost)."""
        n, dn_yaw, dn_roll, rel, h, kji, inside = self._mirror(params)
        at = kji[inside].T
        mirrored_values = ndimage.map_coordinates(self.vol, at, order=1, prefilter=False)
        diff = self.values[inside] - mirrored_values
        cost = float(np.mean(np.minimum(diff * diff, CAP_HU * CAP_HU)))
        use = np.abs(diff) < CAP_HU  # capped terms have zero gradient
        if use.sum() < 3:
            return np.zeros(3), cost
        g_kji = np.stack([ndimage.map_coordinates(g, at[:, use], order=1, prefilter=False) for g in self.grad], 1)
        g_mm = g_kji[:, ::-1] @ self.to_index[:, :3]  # image gradient in LPS mm at the mirror points
        rel, h = rel[inside][use], h[inside][use]
        deg = math.pi / 180.0
        # Mirror point m = p - 2 h n with h = (p - centroid) . n - offset.
        dm = [-2.0 * ((rel @ dn)[:, None] * n[None, :] + h[:, None] * dn[None, :]) * deg for dn in (dn_yaw, dn_roll)]
        dm.append(np.broadcast_to(2.0 * n, rel.shape))
        jac = -np.stack([np.einsum("ij,ij->i", g_mm, d) for d in dm], axis=1)  # d(diff)/d(params)
        jtj = jac.T @ jac
        step = -np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-9), jac.T @ diff[use])
        return step, cost


def estimate_midsagittal_plane(
    image: np.ndarray, affine: np.ndarray, *, bone_hu: float = BONE_HU, tolerance_deg: float = 0.005
) -> MidSagittalPlane:
    """Mid-sagittal plane of a head CT (HU array [k, j, i], LPS affine of (i, j, k)); see the module docstring.

    Raises ValueError when the image holds too little bone to be a head CT.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D [k, j, i], got shape {image.shape}")
    sym = _Symmetry(image, affine, bone_hu)
    if len(sym.points) < MIN_BONE_POINTS:
        raise ValueError(
            f"only {len(sym.points)} bone voxels (>= {bone_hu:g} HU) found: cannot estimate the mid-sagittal plane"
        )
    subset = np.linspace(0, len(sym.points) - 1, min(COARSE_POINTS, len(sym.points))).astype(np.intp)
    angles = np.arange(-SEARCH_DEG, SEARCH_DEG + 1e-9, SEARCH_STEP_DEG)
    grid = [(sym.cost((yaw, roll, 0.0), subset), yaw, roll) for yaw in angles for roll in angles]
    _, yaw, roll = min(grid)  # ties: the smaller yaw, then roll
    params = np.array([yaw, roll, 0.0])
    damping, cost, iterations = 1e-3, math.inf, 0
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007 (the count is reported)
        step, cost = sym.gauss_newton_step(params, damping)
        trial_cost = sym.cost(params + step)
        if trial_cost <= cost:
            params, damping = params + step, max(damping / 3.0, 1e-6)
            if max(abs(step[0]), abs(step[1])) < tolerance_deg and abs(step[2]) < 0.01:
                cost = trial_cost
                break
        else:
            damping *= 10.0
            if damping > 1e6:
                break
    n, _, _ = _normal(params[0], params[1])
    point = sym.centroid + params[2] * n
    return MidSagittalPlane(tuple(point), tuple(n), residual_hu=math.sqrt(cost), iterations=iterations)
