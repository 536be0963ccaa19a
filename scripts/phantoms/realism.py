"""Objective realism measures that apply the same way to a phantom and to a real CT.

Tissues are found by the local mean HU (5x5 in-plane) inside the body, so texture and noise of
each tissue are measured the same way on both; noise is the median local standard deviation in
homogeneous soft tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TISSUE_WINDOWS = {
    "fat": (-150.0, -60.0),
    "soft_tissue": (20.0, 80.0),
    "lung": (-950.0, -700.0),
    "bone": (300.0, 3000.0),
}


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected region above -500 HU in each slice, holes (lungs) filled."""
    mask = np.zeros(hu.shape, dtype=bool)
    for k, sl in enumerate(hu):
        lab, n = ndimage.label(ndimage.binary_opening(sl > -500, iterations=2))
        if n:
            largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(lab), lab, range(1, n + 1))))
            mask[k] = ndimage.binary_fill_holes(lab == largest)
    return mask


def tissue_stats(hu: np.ndarray) -> dict[str, float]:
    """Mean HU per tissue class and soft-tissue noise SD of a volume [k, j, i] in HU."""
    hu = hu.astype(np.float32)
    body = ndimage.binary_erosion(body_mask(hu), iterations=3)
    local = ndimage.uniform_filter(hu, (1, 5, 5))
    out: dict[str, float] = {}
    for name, (lo, hi) in TISSUE_WINDOWS.items():
        sel = body & (local >= lo) & (local <= hi)
        out[f"{name}_mean_hu"] = float(hu[sel].mean()) if sel.sum() > 200 else float("nan")
        out[f"{name}_voxels"] = int(sel.sum())
    m1 = ndimage.uniform_filter(hu, (1, 7, 7))
    m2 = ndimage.uniform_filter(hu * hu, (1, 7, 7))
    local_sd = np.sqrt(np.maximum(m2 - m1 * m1, 0))
    homogeneous = body & (m1 > 20) & (m1 < 80) & (ndimage.uniform_filter(local_sd, (1, 15, 15)) < 60)
    out["soft_tissue_noise_sd_hu"] = float(np.median(local_sd[homogeneous])) if homogeneous.any() else float("nan")
    return out
