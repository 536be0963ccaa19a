"""The calcium overlay that the PDF's key images and the Secondary Capture series both draw.

A slice in the path's display window (soft tissue for the heart, bone for the skull base) with the voxels the
score counts (HU >= 130 inside a calcium label) painted in their segment's colour; the letters of the patient
directions its edges face.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bundles.s2cac_coronary_calcium.scripts.scoring import CALCIUM_THRESHOLD_HU

# (level, width) in HU and the window's name, per path.
WINDOWS = {"coronary": (40.0, 400.0, "soft-tissue window"), "ica": (300.0, 1500.0, "bone window")}
OVERLAY_OPACITY = 0.85


def labelled_slices(labels: np.ndarray) -> np.ndarray:
    """Indices k of the slices ``labels[k]`` with any non-zero label (a per-slice maximum: a whole-volume
    ``nonzero`` of a 512 x 512 x 160 map takes 40 times longer, and calcium is on few slices)."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels.reshape(labels.shape[0], -1).max(axis=1, initial=0))


def scored_voxels(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``labels`` where the score counts the voxel (HU >= 130), else 0; [k, j, i] volumes."""
    hu, labels = np.asarray(hu), np.asarray(labels)
    scored = np.zeros_like(labels)
    ks = labelled_slices(labels)
    scored[ks] = np.where(hu[ks] >= CALCIUM_THRESHOLD_HU, labels[ks], 0)
    return scored


def windowed(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> [0, 1] grey in the window (level, width)."""
    lo = level - width / 2
    return np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)


def overlay_rgb(
    hu: np.ndarray, scored: np.ndarray, colours: Mapping[int, tuple[int, int, int]], path: str
) -> np.ndarray:
    """One slice as uint8 RGB [j, i, 3]: ``hu`` in the path's window, segment ``s`` of ``scored`` in ``colours[s]``."""
    level, width, _ = WINDOWS[path]
    grey = windowed(hu, level, width)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for segment, colour in colours.items():
        mask = scored == segment
        if mask.any():
            rgb[mask] = (1 - OVERLAY_OPACITY) * rgb[mask] + OVERLAY_OPACITY * (np.asarray(colour, np.float32) / 255.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def orientation_label(direction_lps: Sequence[float]) -> str:
    """The patient-direction letters an image edge faces (DICOM PS3.3 C.7.6.1.1.1: L/R, P/A, H/F), strongest
    first; components under 0.25 are left out, so an axial row reads "L" and an oblique one e.g. "LA"."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS axes: negative, positive
    order = np.argsort(-np.abs(np.asarray(direction_lps, dtype=float)), kind="stable")
    return "".join(letters[a][int(direction_lps[a] > 0)] for a in order if abs(direction_lps[a]) >= 0.25)
