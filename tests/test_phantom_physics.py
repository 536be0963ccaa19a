"""The image-formation physics: calibration, partial volume, resolution convergence and noise."""

from __future__ import annotations

import numpy as np
import pytest

from phantoms import physics
from phantoms.case import Sampler, finish_case
from phantoms.geometry import Grid
from phantoms.physics import Lesion, Scanner, render_lesion

BACKGROUND = 40.0


def sphere_peak(diameter: float, density: float, scanner: Scanner, grid: Grid, fine_xy=0.1, fine_z=0.25) -> float:
    lesion = Lesion(np.array([0.13, 0.07, 0.4]), np.full(3, diameter / 2), np.eye(3), density, 1)
    patch = render_lesion(lesion, grid, scanner, lambda xyz: np.full(len(xyz), BACKGROUND), fine_xy, fine_z)
    return BACKGROUND + float(patch.delta_hu.max())


@pytest.mark.parametrize("kvp", [100.0, 120.0])
def test_large_lesion_core_matches_density_calibration(kvp):
    scanner = Scanner(kvp=kvp, thickness_mm=1.0, psf_fwhm_mm=1.0)
    grid = Grid.tilted((15, 41, 41), 0.4, 1.0, (0.0, 0.0, 0.0))
    core = sphere_peak(8.0, 400.0, scanner, grid)
    expected = BACKGROUND + physics.ha_slope(kvp) * 400.0
    assert core == pytest.approx(expected, rel=0.02)


def test_calibration_slope_falls_with_kvp():
    slopes = [physics.ha_slope(k) for k in (80, 100, 120, 140)]
    assert slopes == sorted(slopes, reverse=True)
    assert physics.density_to_hu(200.0, 120.0, matrix_hu=0.0) == pytest.approx(200.0)


def test_partial_volume_lowers_small_lesions_peak_hu():
    scanner = Scanner(thickness_mm=3.0, psf_fwhm_mm=1.1)
    grid = Grid.tilted((11, 41, 41), 0.4, 3.0, (0.0, 0.0, 0.0))
    peaks = [sphere_peak(d, 400.0, scanner, grid) for d in (1.0, 2.0, 3.0, 5.0)]
    assert peaks == sorted(peaks)
    assert peaks[0] < 130.0, "a 1 mm lesion at 3 mm slices falls below the Agatston threshold"
    assert peaks[-1] < BACKGROUND + 400.0 * physics.ha_slope(120.0)


def test_peak_hu_curve_converges_when_fine_grid_is_doubled():
    scanner = Scanner(thickness_mm=3.0, psf_fwhm_mm=1.1)
    grid = Grid.tilted((11, 41, 41), 0.4, 3.0, (0.3, 0.1, 0.7))
    for d in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0):
        coarse = sphere_peak(d, 400.0, scanner, grid, 0.1, 0.25)
        fine = sphere_peak(d, 400.0, scanner, grid, 0.05, 0.125)
        assert abs(coarse - fine) / abs(fine) < 0.02, (d, coarse, fine)
        if d >= 1.0:  # above the noise floor the contrast itself converges too
            assert abs(coarse - fine) / (fine - BACKGROUND) < 0.02, (d, coarse, fine)


def test_occupancy_preserves_lesion_volume():
    scanner = Scanner(thickness_mm=2.5)
    grid = Grid.tilted((13, 41, 41), 0.5, 2.5, (0.0, 0.0, 0.0))
    for d in (1.0, 3.0, 5.0):
        lesion = Lesion(np.array([0.2, -0.1, 0.3]), np.array([d / 2, d / 3, d / 2.5]), np.eye(3), 300.0, 1)
        patch = render_lesion(lesion, grid, scanner, lambda xyz: np.full(len(xyz), BACKGROUND))
        measured = patch.occupancy.sum() * 0.5 * 0.5 * 2.5
        assert measured == pytest.approx(lesion.physical_volume_mm3, rel=0.03)


def flat_case(wed_mm: float, scanner: Scanner):
    grid = Grid.tilted((8, 96, 96), 0.6, scanner.thickness_mm, (0.0, 0.0, 0.0))
    rng = np.random.default_rng(5)
    return finish_case(
        kind="test",
        seed=0,
        index=0,
        rng=rng,
        sampler=Sampler(grid, scanner, wed_mm),
        anatomy_hu=np.zeros(grid.shape, np.float32),
        lesions=[],
        lesion_facts=[],
        distractors=[],
        distractor_facts=[],
        underlying_hu=lambda x: np.zeros(len(x)),
        extra_truth={},
        body_part="CHEST",
    )


def test_noise_sd_is_as_configured_and_grows_with_patient_size():
    scanner = Scanner(noise_sd_hu=20.0, thickness_mm=3.0)
    medium = flat_case(physics.REFERENCE_WED_MM, scanner)
    large = flat_case(physics.REFERENCE_WED_MM + 80.0, scanner)
    assert medium.truth["scanner"]["noise_sd_hu"] == pytest.approx(20.0)
    assert medium.arrays["image"].std() == pytest.approx(20.0, rel=0.03)
    expected_large = 20.0 * np.exp(physics.MU_WATER_PER_MM * 80.0 / 2)
    assert large.arrays["image"].std() == pytest.approx(expected_large, rel=0.03)


def test_noise_is_correlated_like_filtered_backprojection():
    scanner = Scanner(noise_sd_hu=20.0, thickness_mm=3.0)
    noise = flat_case(physics.REFERENCE_WED_MM, scanner).arrays["image"].astype(float)
    power = np.abs(np.fft.fft2(noise, axes=(1, 2))) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(96, 0.6), np.fft.fftfreq(96, 0.6)))
    low = power[:, (f > 0) & (f < 0.05)].mean()
    mid = power[:, (f > 0.2) & (f < 0.4)].mean()
    high = power[:, f > 0.75].mean()
    assert mid > 3 * low, "a ramp-filtered spectrum has little power at low frequency"
    assert mid > 3 * high, "the kernel's apodisation removes the highest frequencies"


def test_overlapping_slices_have_correlated_noise():
    scanner = Scanner(noise_sd_hu=20.0, thickness_mm=3.0)
    grid = Grid.tilted((16, 64, 64), 0.6, 1.5, (0.0, 0.0, 0.0))
    noise = physics.correlated_noise(grid.shape, grid, scanner, 20.0, np.random.default_rng(1))
    r = np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1]
    assert 0.3 < r < 0.8
