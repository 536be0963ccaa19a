"""Phantom realism, measured the same way on the phantom and on the real CT in shared/data/real_ct."""

from __future__ import annotations

import pytest

from phantoms.chest import make_chest_case
from phantoms.dicom_series import read_ct_series
from phantoms.realism import tissue_stats

# Stated bounds: phantom tissue means within these HU of the real scan's, noise within this ratio.
MEAN_BOUNDS_HU = {"fat": 25.0, "soft_tissue": 20.0, "lung": 100.0, "bone": 200.0}
NOISE_RATIO = (0.6, 1.6)


@pytest.fixture(scope="module")
def real_stats(real_ct_dir):
    volume, grid, _ = read_ct_series(real_ct_dir)
    assert volume.shape == (20, 512, 512)
    return tissue_stats(volume)


@pytest.mark.parametrize("index", [0, 1])
def test_chest_phantom_tissues_and_noise_match_the_real_ct(real_stats, index):
    case = make_chest_case(11, index, "full", thickness=3.0, patient_size="medium")
    stats = tissue_stats(case.arrays["image"])
    for tissue, bound in MEAN_BOUNDS_HU.items():
        key = f"{tissue}_mean_hu"
        assert abs(stats[key] - real_stats[key]) <= bound, (tissue, stats[key], real_stats[key])
    ratio = stats["soft_tissue_noise_sd_hu"] / real_stats["soft_tissue_noise_sd_hu"]
    assert NOISE_RATIO[0] <= ratio <= NOISE_RATIO[1], ratio


def test_real_ct_statistics_are_what_the_bounds_were_set_against(real_stats):
    assert real_stats["fat_mean_hu"] == pytest.approx(-87, abs=5)
    assert real_stats["soft_tissue_mean_hu"] == pytest.approx(55, abs=5)
    assert real_stats["soft_tissue_noise_sd_hu"] == pytest.approx(17.6, abs=1.5)
