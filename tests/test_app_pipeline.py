"""Pipeline pieces that the end-to-end tests reach only indirectly: the region of interest and the way back from
an untilted grid to the source series' tilted grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from deploy_app import quality
from deploy_app.pipeline import _to_source_grid
from deploy_app.volume import build_volume, untilt
from phantoms.chest import make_chest_case
from phantoms.dicom_series import write_ct_series
from phantoms.head import make_head_case

LIMITS = quality.load_limits()


def volume_of(case, tmp_path):
    files = write_ct_series(
        case.arrays["image"].astype(np.int16), case.grid, tmp_path / "s", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
        series_number=1,
    )  # fmt: skip
    return build_volume([pydicom.dcmread(f) for f in files])


def test_labels_found_on_the_untilted_grid_come_back_onto_the_tilted_source_slices(tmp_path):
    case = make_head_case(0, 6, "small", calcium="right", tilt_deg=20.0)
    source = volume_of(case, tmp_path)
    scored = untilt(source)
    truth = (case.arrays["label"] > 0).astype(np.uint8)
    assert truth.sum() > 0
    # the truth carried to the untilted grid by a plain full-grid nearest-neighbour lookup (the reference)
    k, j, i = np.meshgrid(*(np.arange(n) for n in scored.hu.shape), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    coords = (np.linalg.inv(source.affine_lps) @ scored.affine_lps @ ijk1)[[2, 1, 0]]
    on_scored = ndimage.map_coordinates(truth, coords, order=0).reshape(scored.hu.shape).astype(np.uint8)
    back = _to_source_grid(on_scored, scored, source)
    assert back.shape == truth.shape
    overlap = (back & truth).sum() / truth.sum()
    assert overlap >= 0.9 and (back & ~truth.astype(bool)).sum() <= 0.1 * truth.sum()


@pytest.mark.parametrize("index", [0, 1, 4])
def test_heart_box_holds_every_coronary_lesion(index):
    case = make_chest_case(0, index, "medium")
    spacing = (case.grid.increment_mm, case.grid.pixel_mm, case.grid.pixel_mm)
    box = quality.heart_box(case.arrays["image"], spacing, LIMITS)
    assert box is not None
    labelled = np.argwhere(case.arrays["label"] > 0)
    for axis, s in enumerate(box):
        assert (labelled[:, axis] >= s.start).all() and (labelled[:, axis] < s.stop).all()


@pytest.mark.parametrize("index", [1, 2, 6])
def test_skull_base_box_holds_every_ica_lesion(index):
    case = make_head_case(0, index, "medium", calcium="both", tilt_deg=0.0)
    spacing = (case.grid.increment_mm, case.grid.pixel_mm, case.grid.pixel_mm)
    box = quality.skull_base_box(case.arrays["image"], spacing, LIMITS)
    assert box is not None
    labelled = np.argwhere(case.arrays["label"] > 0)
    assert len(labelled)
    for axis, s in enumerate(box):
        assert (labelled[:, axis] >= s.start).all() and (labelled[:, axis] < s.stop).all()
