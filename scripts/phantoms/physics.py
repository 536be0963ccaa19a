"""Image formation for the phantoms: calibration, resolution, partial volume and noise.

The recipe (DESIGN.md, Data): smooth anatomy is evaluated on the output grid; each lesion is
rendered on a local fine grid (default 0.1 mm in-plane, 0.25 mm along the slice axis), its
hydroxyapatite density turned into HU through a kVp-dependent calibration, blurred by the
in-plane PSF and the slice-sensitivity profile, then averaged down to the output voxels. That
averaging is where partial volume comes from: small lesions lose peak HU and can fall below the
130 HU Agatston threshold, as on real scanners. Noise is added last, correlated in-plane (an
FBP-like noise power spectrum) and along z where slices overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .geometry import Grid

# HU per mg HA/cm^3 in a soft-tissue matrix, as a simulated 200 mg HA/cm^3 calibration rod reads at
# each tube voltage (effective energy falls with kVp, so calcium brightens at low kVp).
HA_SLOPE_BY_KVP = {80: 1.42, 100: 1.18, 120: 1.00, 140: 0.88}
# Linear attenuation of water at the effective energy of a 120 kVp beam (1/mm), used for the
# noise-versus-patient-size law: quantum noise scales with exp(mu * extra path / 2).
MU_WATER_PER_MM = 0.019
BLUR_STEP_MM = 0.25  # in-plane step of the grid on which lesion patches are blurred
REFERENCE_WED_MM = 250.0  # water-equivalent diameter (a typical adult chest) at which `Scanner.noise_sd_hu` holds

TISSUE_HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "water": 0.0,
    "csf": 8.0,
    "white_matter": 28.0,
    "grey_matter": 38.0,
    "blood": 40.0,
    "soft_tissue": 40.0,
    "myocardium": 45.0,
    "muscle": 50.0,
}
# Bone is expressed as hydroxyapatite density so that it follows the same kVp calibration.
BONE_HA_MG_CM3 = {"trabecular": 180.0, "cortical": 1100.0, "petrous": 1350.0}


def ha_slope(kvp: float) -> float:
    """HU per mg HA/cm^3 at tube voltage ``kvp`` (linear interpolation of the calibration table)."""
    k = sorted(HA_SLOPE_BY_KVP)
    return float(np.interp(kvp, k, [HA_SLOPE_BY_KVP[v] for v in k]))


def density_to_hu(density_mg_cm3, kvp: float, matrix_hu: float = TISSUE_HU["soft_tissue"]):
    """HU of hydroxyapatite at ``density_mg_cm3`` embedded in a matrix of ``matrix_hu``."""
    return matrix_hu + ha_slope(kvp) * np.asarray(density_mg_cm3, dtype=float)


def bone_hu(kind: str, kvp: float) -> float:
    return float(density_to_hu(BONE_HA_MG_CM3[kind], kvp))


@dataclass(frozen=True)
class Scanner:
    """Acquisition and reconstruction parameters of one simulated series."""

    kvp: float = 120.0
    kernel: str = "B30f"
    psf_fwhm_mm: float = 1.1  # in-plane resolution of the reconstruction kernel
    thickness_mm: float = 3.0  # nominal slice thickness (FWHM of the slice-sensitivity profile)
    noise_sd_hu: float = 18.0  # quantum noise at REFERENCE_WED_MM and reference dose
    mas: float = 80.0
    manufacturer: str = "CalciMap Phantom"
    model: str = "Synthetic CT"

    @property
    def psf_sigma_mm(self) -> float:
        return self.psf_fwhm_mm / 2.3548

    @property
    def ssp_sigma_mm(self) -> float:
        """Gaussian edge of the slice-sensitivity profile (rect of the thickness convolved with it)."""
        return 0.15 * self.thickness_mm + 0.1

    def as_dict(self) -> dict:
        return asdict(self)


def noise_sd_for(scanner: Scanner, wed_mm: float) -> float:
    """Noise standard deviation for a patient of water-equivalent diameter ``wed_mm`` (mm)."""
    size = np.exp(MU_WATER_PER_MM * (wed_mm - REFERENCE_WED_MM) / 2)
    thickness = np.sqrt(3.0 / scanner.thickness_mm)
    return float(scanner.noise_sd_hu * size * thickness)


def blur_anatomy(volume: np.ndarray, grid: Grid, scanner: Scanner) -> np.ndarray:
    """In-plane PSF and the part of the slice profile wider than the slice spacing, on the output grid."""
    sigma_xy = scanner.psf_sigma_mm / grid.pixel_mm
    extra_z = max(scanner.thickness_mm**2 - grid.increment_mm**2, 0.0) / 12.0
    sigma_z = np.sqrt(extra_z + scanner.ssp_sigma_mm**2) / grid.increment_mm
    return ndimage.gaussian_filter(volume, (sigma_z, sigma_xy, sigma_xy), mode="nearest", truncate=3.0)


@dataclass
class Lesion:
    """An ellipsoid of hydroxyapatite. ``axes`` columns are unit vectors for the three radii (LPS)."""

    centre: np.ndarray
    radii: np.ndarray
    axes: np.ndarray
    density_mg_cm3: float
    label: int  # label value written into the mask; 0 for distractors that are not target calcium

    @property
    def physical_volume_mm3(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.radii))

    @property
    def mass_mg(self) -> float:
        return self.physical_volume_mm3 * self.density_mg_cm3 / 1000.0

    def occupancy(self, xyz: np.ndarray, ramp_mm: float) -> np.ndarray:
        """Fraction of a fine sample inside the ellipsoid, ramped over about ``ramp_mm`` at the surface.

        The ramp is linear in q^3 (q: normalised radius) and centred on the surface, so along every
        ray it preserves the enclosed volume exactly; a ramp linear in distance would inflate small
        lesions through surface curvature.
        """
        p = (xyz - self.centre) @ self.axes
        q = np.linalg.norm(p / self.radii, axis=-1)
        ray_radius = np.linalg.norm(p, axis=-1) / np.maximum(q, 1e-12)  # centre-to-surface along the ray
        ray_radius = np.where(q > 1e-12, ray_radius, self.radii.min())
        return np.clip(0.5 - (q**3 - 1.0) * ray_radius / (3.0 * ramp_mm), 0.0, 1.0)


@dataclass
class Patch:
    """What one lesion adds to the output grid, over a box of voxels."""

    box: tuple[slice, slice, slice]
    delta_hu: np.ndarray  # noise-free HU change in the box
    occupancy: np.ndarray  # fraction of each output voxel the lesion fills


def render_lesion(
    lesion: Lesion,
    grid: Grid,
    scanner: Scanner,
    underlying_hu: Callable[[np.ndarray], np.ndarray],
    fine_xy_mm: float = 0.1,
    fine_z_mm: float = 0.25,
) -> Patch | None:
    """Supersample one lesion on a local fine grid, blur it and average it down to ``grid``.

    ``underlying_hu`` gives the HU of the tissue that the calcium displaces at fine points (N, 3):
    the lesion adds ``(HU_lesion - HU_underlying) * occupancy`` to the image, which is exact for a
    linear imaging chain. Occupancy is sampled at ``fine_xy_mm`` x ``fine_z_mm`` or finer; the in-plane
    PSF is applied after averaging to an intermediate grid of at most BLUR_STEP_MM, which is exact up
    to sampling the Gaussian (sigma >= 0.25 mm) at that step. Returns None outside the grid.
    """
    n_mid = int(np.ceil(grid.pixel_mm / BLUR_STEP_MM))  # intermediate cells per output pixel
    r = int(np.ceil(grid.pixel_mm / (n_mid * fine_xy_mm)))  # fine samples per intermediate cell
    n_z = int(np.ceil(grid.increment_mm / fine_z_mm))
    reach = float(np.max(lesion.radii))
    margin_xy = reach + 3 * scanner.psf_sigma_mm + grid.pixel_mm
    margin_z = reach + scanner.thickness_mm / 2 + 3 * scanner.ssp_sigma_mm + grid.increment_mm
    unit_cube = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    ijk = grid.patient_to_index(lesion.centre + unit_cube * np.array([margin_xy, margin_xy, margin_z]))
    lo = np.floor(ijk.min(axis=0)).astype(int)
    hi = np.ceil(ijk.max(axis=0)).astype(int) + 1
    size = np.array(grid.shape[::-1])
    lo_c, hi_c = np.maximum(lo, 0), np.minimum(hi, size)
    if np.any(hi_c <= lo_c):
        return None
    (i0, j0, k0), (i1, j1, k1) = lo, hi
    ni, nj, nk = i1 - i0, j1 - j0, k1 - k0

    # Intermediate cells partition each output pixel; fine samples partition each cell (centred).
    n_xy = n_mid * r
    ramp = float(np.cbrt((grid.pixel_mm / n_xy) ** 2 * (grid.increment_mm / n_z)))
    mid_i = np.arange(ni * n_mid) / n_mid + i0 + 0.5 / n_mid - 0.5  # cell centres in index units
    mid_j = np.arange(nj * n_mid) / n_mid + j0 + 0.5 / n_mid - 0.5
    fk = (np.arange(k0, k1)[:, None] + (np.arange(n_z) + 0.5) / n_z - 0.5).ravel()
    shape_mid = (nk * n_z, nj * n_mid, ni * n_mid)
    occ = np.zeros(shape_mid)
    obj = np.zeros(shape_mid)
    # Only cells within the lesion's own bounding box can be occupied: sample just those finely.
    near = grid.patient_to_index(lesion.centre + unit_cube * (reach + 2 * ramp))
    half = 0.5 / n_mid
    ck = slice(int(np.searchsorted(fk, near[:, 2].min())), int(np.searchsorted(fk, near[:, 2].max(), side="right")))
    cj = slice(
        int(np.searchsorted(mid_j + half, near[:, 1].min())), int(np.searchsorted(mid_j - half, near[:, 1].max()))
    )
    ci = slice(
        int(np.searchsorted(mid_i + half, near[:, 0].min())), int(np.searchsorted(mid_i - half, near[:, 0].max()))
    )
    offsets = ((np.arange(r) + 0.5) / r - 0.5) / n_mid
    fi = (mid_i[ci][:, None] + offsets[None]).ravel()
    fj = (mid_j[cj][:, None] + offsets[None]).ravel()
    if fi.size and fj.size and fk[ck].size:
        kk, jj, ii = np.meshgrid(fk[ck], fj, fi, indexing="ij")
        xyz = grid.index_to_patient(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        local = lesion.occupancy(xyz, ramp)
        inside = local > 0
        contrast = np.zeros(local.shape)
        if inside.any():
            hu = density_to_hu(lesion.density_mg_cm3, scanner.kvp)
            contrast[inside] = (hu - underlying_hu(xyz[inside])) * local[inside]
        cells = (kk.shape[0], len(fj) // r, r, len(fi) // r, r)
        occ[ck, cj, ci] = local.reshape(cells).mean(axis=(2, 4))
        obj[ck, cj, ci] = contrast.reshape(cells).mean(axis=(2, 4))

    # Resolution: Gaussian PSF in-plane; slice profile = rect(thickness) convolved with a Gaussian.
    dz_f = grid.increment_mm / n_z
    sig_xy = scanner.psf_sigma_mm / (grid.pixel_mm / n_mid)
    obj = ndimage.gaussian_filter(obj, (scanner.ssp_sigma_mm / dz_f, sig_xy, sig_xy), mode="constant", truncate=3.5)
    obj = ndimage.convolve1d(obj, rect_kernel(scanner.thickness_mm / dz_f), axis=0, mode="constant")

    # Average down: pixel aperture in-plane; in z the profile is read at the slice centre.
    def to_cells(a: np.ndarray) -> np.ndarray:
        return a.reshape(nk, n_z, nj, n_mid, ni, n_mid).mean(axis=(3, 5))

    blurred = to_cells(obj)
    mid = n_z // 2
    delta = blurred[:, mid] if n_z % 2 else 0.5 * (blurred[:, mid - 1] + blurred[:, mid])
    occupancy = to_cells(occ).mean(axis=1)

    crop = tuple(slice(c0 - o, c1 - o) for c0, c1, o in zip(lo_c[::-1], hi_c[::-1], lo[::-1], strict=True))
    box = tuple(slice(int(c0), int(c1)) for c0, c1 in zip(lo_c[::-1], hi_c[::-1], strict=True))
    return Patch(box=box, delta_hu=delta[crop], occupancy=occupancy[crop])


def rect_kernel(width_samples: float) -> np.ndarray:
    """A centred box of ``width_samples`` (odd length, half weights at the ends): a symmetric rect."""
    n = max(int(round(width_samples)), 1)
    kernel = np.ones(n + 1)
    kernel[[0, -1]] = 0.5
    return kernel / kernel.sum()


def correlated_noise(shape: tuple[int, int, int], grid: Grid, scanner: Scanner, sd: float, rng) -> np.ndarray:
    """Zero-mean noise with an FBP-like in-plane spectrum and slice-overlap correlation, std ``sd``."""
    k, rows, cols = shape
    white = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(rows, d=grid.pixel_mm)[:, None]
    fx = np.fft.rfftfreq(cols, d=grid.pixel_mm)[None, :]
    f = np.hypot(fx, fy)
    cutoff = 0.6 / scanner.psf_fwhm_mm  # cycles/mm where the kernel's apodisation takes over
    nps = f * np.exp(-((f / cutoff) ** 2))  # ramp filter times apodisation
    noise = np.fft.irfft2(np.fft.rfft2(white, axes=(1, 2)) * np.sqrt(nps).astype(np.float32), s=(rows, cols))
    overlap = scanner.thickness_mm / grid.increment_mm
    if overlap > 1.0 and k > 1:
        width = min(int(round(overlap)), k)
        noise = ndimage.uniform_filter1d(noise, width, axis=0, mode="wrap")
    noise /= max(float(noise.std()), 1e-12)
    return (noise * sd).astype(np.float32)
