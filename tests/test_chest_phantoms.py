"""Chest phantoms: labels where the truth says, vessel assignment, distractors, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from phantoms.chest import VESSELS, ChestAnatomy, coronary_lesions, make_chest_case


def test_labels_sit_at_the_lesion_centres_given_in_truth(chest_case):
    labelled = [les for les in chest_case.truth["lesions"] if les["labelled_voxels"] > 0]
    assert labelled, "the fixture case must hold labelled calcium"
    label = chest_case.arrays["label"]
    for les in labelled:
        i, j, k = np.rint(les["centre_index_ijk"]).astype(int)
        window = label[max(k - 1, 0) : k + 2, max(j - 2, 0) : j + 3, max(i - 2, 0) : i + 3]
        assert les["label"] in window, les
        assert VESSELS[les["label"]] == les["vessel"]


def test_label_voxel_counts_match_truth_and_occupancy_rule(chest_case):
    label, occ = chest_case.arrays["label"], chest_case.arrays["occupancy"]
    total = sum(les["labelled_voxels"] for les in chest_case.truth["lesions"])
    assert (label > 0).sum() <= total  # overlapping lesions share voxels
    assert (label > 0).sum() >= 0.9 * total
    assert occ[label > 0].min() >= 0.5 - 1e-6
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}


def test_occupied_volume_matches_physical_volume(chest_case):
    for les in chest_case.truth["lesions"]:
        if les["in_field_of_view"]:
            assert les["occupied_volume_mm3"] == pytest.approx(les["volume_mm3"], rel=0.05, abs=0.02)
            expected_mass = les["volume_mm3"] * les["density_mg_ha_cm3"] / 1000
            assert les["mass_mg"] == pytest.approx(expected_mass, rel=1e-3, abs=2e-4)


def test_lesion_peak_hu_reflects_partial_volume(chest_case):
    for les in chest_case.truth["lesions"]:
        if les["in_field_of_view"] and les["peak_hu"] is not None:
            assert les["peak_hu"] <= les["hu_at_full_density"] + 5.0


def test_about_30_percent_of_cases_are_calcium_free_and_some_one_vessel():
    free, single, vessels_seen = 0, 0, set()
    n = 300
    for i in range(n):
        rng = np.random.default_rng(i)
        tubes = ChestAnatomy(rng, None).coronary_tree(rng)
        lesions, facts = coronary_lesions(rng, tubes)
        free += not lesions
        names = {f["vessel"] for f in facts}
        single += len(names) == 1
        vessels_seen |= names
    assert 0.22 < free / n < 0.38
    assert single / n > 0.1
    assert vessels_seen == set(VESSELS.values())


def test_sizes_and_densities_cover_hard_cases():
    facts = []
    for i in range(80):
        rng = np.random.default_rng(1000 + i)
        tubes = ChestAnatomy(rng, None).coronary_tree(rng)
        lesions, _ = coronary_lesions(rng, tubes)
        facts += [(2 * les.radii.max(), les.density_mg_cm3) for les in lesions]
    d, rho = np.array(facts).T
    assert d.min() < 1.0 and d.max() > 4.0
    assert rho.min() < 150 and rho.max() > 600
    assert ((d <= 1.2) | (rho < 150)).mean() > 0.15, "small or faint lesions that Agatston misses"


def test_distractors_are_bright_but_unlabelled():
    case = next(c for i in range(12) if (c := make_chest_case(3, i, "small")).truth["distractors"])
    label = case.arrays["label"]
    bright = [d for d in case.truth["distractors"] if d["in_field_of_view"] and (d["peak_hu"] or 0) > 130]
    assert bright
    for d in bright:
        i, j, k = np.rint(d["centre_index_ijk"]).astype(int)
        assert label[k, j, i] == 0


def test_same_seed_gives_identical_arrays_and_other_seed_differs(chest_case):
    again = make_chest_case(0, 1, "small")
    for name, array in chest_case.arrays.items():
        assert np.array_equal(array, again.arrays[name]), name
    assert chest_case.truth == again.truth
    other = make_chest_case(1, 1, "small")
    assert not np.array_equal(other.arrays["image"][:5], chest_case.arrays["image"][:5])


@pytest.mark.parametrize("thickness", [3.0, 2.5, 1.5])
def test_forced_thickness_and_coverage_of_the_heart(thickness):
    case = make_chest_case(4, 0, "small", thickness=thickness)
    assert case.truth["scanner"]["thickness_mm"] == thickness
    extent = case.grid.shape[0] * case.grid.increment_mm
    assert extent > 150.0, "the scan covers the heart from base to apex with margins"


def test_medium_size_is_a_cardiac_field_of_view_holding_every_lesion():
    for index in range(3):
        case = make_chest_case(0, index, "medium")
        assert case.grid.shape[1:] == (256, 256)
        assert 0.55 <= case.grid.pixel_mm <= 0.7
        assert all(lesion["in_field_of_view"] for lesion in case.truth["lesions"])
        labelled = {int(v) for v in np.unique(case.arrays["label"]) if v}
        assert labelled == {les["label"] for les in case.truth["lesions"] if les["labelled_voxels"]}
