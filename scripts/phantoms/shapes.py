"""Anatomy primitives evaluated on the output grid: ellipsoids, elliptic cylinders and tubes.

Each returns a soft occupancy in [0, 1] (a linear ramp one voxel wide at the surface), which the
anatomy modules paint in order; the scanner blur is applied once afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.spatial import cKDTree

from .geometry import Grid


def ramp(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Occupancy from a signed distance (negative inside) with a linear edge ``width_mm`` wide."""
    return np.clip(0.5 - signed_mm / width_mm, 0.0, 1.0)


def ellipsoid(x, y, z, centre, radii, axes=None) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid; ``axes`` columns are its unit axes."""
    p = np.stack([x - centre[0], y - centre[1], z - centre[2]], axis=-1)
    if axes is not None:
        p = p @ np.asarray(axes)
    q = np.linalg.norm(p / np.asarray(radii), axis=-1)
    return (q - 1.0) * np.min(radii)


def ellipse_cylinder(x, y, cx, cy, ax, by) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned elliptic cylinder along z."""
    q = np.hypot((x - cx) / ax, (y - cy) / by)
    return (q - 1.0) * min(ax, by)


@dataclass
class Tube:
    """A vessel: centreline points (N, 3, LPS mm) every ~0.5 mm and the radius at each point."""

    points: np.ndarray
    radii: np.ndarray
    name: str = ""
    _tree: cKDTree | None = field(default=None, repr=False, compare=False)

    @classmethod
    def through(cls, control: np.ndarray, r_start: float, r_end: float, name: str = "", step_mm: float = 0.5):
        """A smooth (cubic) centreline through control points, resampled by arc length, tapering linearly."""
        control = np.asarray(control, dtype=float)
        t = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(control, axis=0), axis=1))]
        spline = make_interp_spline(t, control, k=min(3, len(control) - 1))
        dense = spline(np.linspace(0, t[-1], max(int(t[-1] / 0.1), 4)))
        s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))]
        n = max(int(s[-1] / step_mm), 2)
        target = np.linspace(0, s[-1], n)
        points = np.stack([np.interp(target, s, dense[:, a]) for a in range(3)], axis=1)
        radii = np.linspace(r_start, r_end, n)
        return cls(points, radii, name)

    @property
    def arc_mm(self) -> np.ndarray:
        return np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(self.points, axis=0), axis=1))]

    def tangents(self) -> np.ndarray:
        t = np.gradient(self.points, axis=0)
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    def nearest(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance (mm) from each point (N, 3) to the centreline, and the index of the nearest sample."""
        if self._tree is None:
            self._tree = cKDTree(self.points)
        dist, idx = self._tree.query(xyz)
        return dist, idx


def distance_to_walls(xyz: np.ndarray, tubes) -> np.ndarray:
    """Signed distance (mm, negative inside) from points (N, 3) to the wall of the nearest tube.

    Tubes whose centreline cannot come within reach of the points are skipped.
    """
    best = np.full(len(xyz), np.inf)
    centre = xyz.mean(axis=0)
    extent = float(np.linalg.norm(xyz - centre, axis=1).max())
    for tube in tubes:
        if tube.nearest(centre[None])[0][0] > extent + float(tube.radii.max()) + 1.0:
            continue
        dist, idx = tube.nearest(xyz)
        best = np.minimum(best, dist - tube.radii[idx])
    return best


def paint_tube(
    grid: Grid, tube: Tube, edge_mm: float, out_occ: np.ndarray, out_index: np.ndarray | None = None, chunk_mm=8.0
):
    """Rasterise a tube onto ``grid`` as soft occupancy (max-combined into ``out_occ``).

    Works chunk by chunk along the centreline, each over the voxel box it can touch, so the cost
    follows the vessel's length rather than the volume. ``out_index`` receives, where this tube
    is the most occupying, the index of the nearest centreline sample (+1).
    """
    arc = tube.arc_mm
    size = np.array(grid.shape[::-1])
    for start in np.arange(0.0, arc[-1] + 1e-6, chunk_mm):
        sel = np.flatnonzero((arc >= start - 1.0) & (arc <= start + chunk_mm + 1.0))
        if sel.size == 0:
            continue
        pts = tube.points[sel]
        reach = float(tube.radii[sel].max()) + edge_mm + 1.0
        lo_p, hi_p = pts.min(axis=0) - reach, pts.max(axis=0) + reach
        corners = np.array(
            [[a, b, c] for a in (lo_p[0], hi_p[0]) for b in (lo_p[1], hi_p[1]) for c in (lo_p[2], hi_p[2])]
        )
        ijk = grid.patient_to_index(corners)
        lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, size)
        if np.any(hi <= lo):
            continue
        kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
        xyz = grid.index_to_patient(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        d2 = ((xyz[:, None, :] - pts[None]) ** 2).sum(-1)
        near = d2.argmin(axis=1)
        dist = np.sqrt(d2[np.arange(len(d2)), near])
        occ = ramp(dist - tube.radii[sel][near], edge_mm).reshape(kk.shape)
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        region = out_occ[box]
        better = occ > region
        if out_index is not None:
            out_index[box][better] = (sel[near].reshape(kk.shape) + 1)[better]
        region[better] = occ[better]
