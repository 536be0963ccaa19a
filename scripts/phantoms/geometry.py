"""Voxel grids in DICOM patient coordinates (LPS) and their NIfTI (RAS) affines.

Arrays are indexed ``[k, j, i]``: k is the slice, j the row, i the column, as DICOM stores a
series. Column i runs along ``row_cosine``, row j along ``col_cosine``, and slice k steps by
``slice_step`` (the table feed, which with gantry tilt is not perpendicular to the slice plane).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (slices, rows, columns)
    pixel_mm: float  # square in-plane pixels
    increment_mm: float  # distance between slice centres along the table
    origin: tuple[float, float, float]  # patient position (mm, LPS) of voxel [0, 0, 0]
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_step_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)

    @classmethod
    def tilted(
        cls, shape: tuple[int, int, int], pixel_mm: float, increment_mm: float, centre_mm, tilt_deg: float = 0.0
    ) -> Grid:
        """An axial grid centred on ``centre_mm`` whose slice plane is tilted about the patient x axis."""
        t = np.deg2rad(tilt_deg)
        col = (0.0, float(np.cos(t)), float(np.sin(t)))
        g = cls(shape, pixel_mm, increment_mm, (0.0, 0.0, 0.0), col_cosine=col)
        centre_index = (np.array(shape[::-1], dtype=float) - 1) / 2  # (i, j, k)
        offset = np.asarray(centre_mm, dtype=float) - g.index_to_patient(centre_index[None])[0]
        return cls(shape, pixel_mm, increment_mm, tuple(float(v) for v in offset), col_cosine=col)

    @property
    def tilt_deg(self) -> float:
        return float(np.rad2deg(np.arctan2(self.col_cosine[2], self.col_cosine[1])))

    @property
    def spacing_ijk(self) -> np.ndarray:
        return np.array([self.pixel_mm, self.pixel_mm, self.increment_mm])

    @property
    def matrix(self) -> np.ndarray:
        """3x3 matrix taking (i, j, k) index steps to LPS mm."""
        return np.stack(
            [
                np.asarray(self.row_cosine) * self.pixel_mm,
                np.asarray(self.col_cosine) * self.pixel_mm,
                np.asarray(self.slice_step_dir) * self.increment_mm,
            ],
            axis=1,
        )

    def affine_lps(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] = self.matrix
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """NIfTI affine for the array transposed to (i, j, k)."""
        a = self.affine_lps()
        a[:3] = LPS_TO_RAS @ a[:3]
        return a

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) fractional (i, j, k) -> (N, 3) LPS mm."""
        return np.asarray(ijk, dtype=float) @ self.matrix.T + np.asarray(self.origin)

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) fractional (i, j, k)."""
        return (np.asarray(xyz, dtype=float) - np.asarray(self.origin)) @ np.linalg.inv(self.matrix).T

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of each slice, (K, 3)."""
        k = np.arange(self.shape[0], dtype=float)
        ijk = np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1)
        return self.index_to_patient(ijk)

    def slice_coordinates(self, k: float, rows=None, cols=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient x, y, z (each rows x cols) of the pixel centres of (fractional) slice k."""
        rows = np.arange(self.shape[1]) if rows is None else np.asarray(rows)
        cols = np.arange(self.shape[2]) if cols is None else np.asarray(cols)
        m = self.matrix
        o = np.asarray(self.origin) + m[:, 2] * k
        jj = rows[:, None].astype(float)
        ii = cols[None, :].astype(float)
        return tuple(o[a] + m[a, 0] * ii + m[a, 1] * jj for a in range(3))
