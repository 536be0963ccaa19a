"""DST data path: orientation without resampling keeps landmark slices consistent; depth crops; padding collate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from bundles.dst_ica_calcification.scripts.data import pad_collate
from bundles.dst_ica_calcification.scripts.landmarks import LANDMARK_NAMES
from bundles.dst_ica_calcification.scripts.transforms import (
    RandDepthCropd,
    ResizeInPlaned,
    SliceSequenced,
    Targetsd,
    crop_depth,
    file_slice,
)

D = 12


def write_case(tmp_path, name: str, flip_slices: bool) -> dict:
    """A (x, y, z) volume whose voxel value encodes its z (superior) position; the landmark sits at one z."""
    vol = np.zeros((8, 6, D), dtype=np.float32)
    vol += np.arange(D, dtype=np.float32)[None, None, :] * 10  # value = 10 x (index from the inferior end)
    vol[2, 1, :] += np.arange(D)  # an in-plane marker that changes along z
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    from_inferior = [4.4 + i for i in range(len(LANDMARK_NAMES))]  # landmark slice indices from the inferior end
    if flip_slices:
        vol = vol[:, :, ::-1]
        affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, D - 1], [0, 0, 0, 1]])
    file_index = [D - 1 - s if flip_slices else s for s in from_inferior]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), affine), tmp_path / f"{name}.nii.gz")
    lms = [{"name": n, "slice_index": s, "in_scan": True} for n, s in zip(LANDMARK_NAMES, file_index, strict=True)]
    lms[-1]["in_scan"] = False
    (tmp_path / f"{name}.json").write_text(json.dumps({"landmarks": lms, "scanner": {"thickness_mm": 3.0}}))
    return {"image": str(tmp_path / f"{name}.nii.gz"), "truth": str(tmp_path / f"{name}.json")}


PIPELINE = Compose(
    [
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        SliceSequenced("image"),
        ResizeInPlaned("image", (4, 4)),
        Targetsd("localization"),
    ]
)


def test_slice_order_and_targets_do_not_depend_on_how_the_file_stores_its_slices(tmp_path):
    up = PIPELINE(write_case(tmp_path, "up", flip_slices=False))
    down = PIPELINE(write_case(tmp_path, "down", flip_slices=True))
    assert up["image"].shape == (1, D, 4, 4)  # no slice resampled
    torch.testing.assert_close(up["image"], down["image"])
    assert up["image"][0, :, 0, 0].tolist() == [10.0 * k for k in range(D)]  # inferior -> superior
    torch.testing.assert_close(up["landmark_slice"], down["landmark_slice"])
    assert up["landmark_slice"][0].item() == np.float32(4.4)
    assert up["landmark_present"].tolist() == [1, 1, 1, 1, 1, 0]
    assert not up["geometry"]["slice_flipped"] and down["geometry"]["slice_flipped"]
    # predictions map back to each file's own slice index
    assert file_slice(up["geometry"], 4) == 4
    assert file_slice(down["geometry"], 4) == D - 1 - 4
    assert up["geometry"]["z_mm"] == down["geometry"]["z_mm"] == [3.0 * k for k in range(D)]
    assert up["thickness_mm"] == 3.0


def test_a_field_of_view_in_mm_keeps_the_anatomy_one_size_whatever_the_scans_field(tmp_path):
    """A 60 mm disc in a 140 mm skull-base field (0.5 mm pixels) and in a 230 mm head field (1.8 mm pixels) comes
    out the same size at the same place; resizing the whole slice makes the first 1.6 times wider."""

    def disc(pixel_mm: float, n: int, name: str) -> dict:
        c = (np.arange(n) - (n - 1) / 2) * pixel_mm
        vol = np.where(np.hypot(*np.meshgrid(c, c, indexing="ij")) <= 30.0, 1000.0, -1000.0).astype(np.float32)
        affine = np.diag([-pixel_mm, -pixel_mm, 2.0, 1.0])
        nib.save(nib.Nifti1Image(np.repeat(vol[:, :, None], 3, axis=2), affine), tmp_path / f"{name}.nii.gz")
        return {"image": str(tmp_path / f"{name}.nii.gz")}

    def widths(field_of_view_mm):
        load = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), SliceSequenced("image")]
        chain = Compose([*load, ResizeInPlaned("image", (64, 64), field_of_view_mm=field_of_view_mm)])
        out = [chain(disc(0.5, 280, "skull_base"))["image"], chain(disc(1.8, 128, "head"))["image"]]
        return out, [float((x[0, 1] > 0).sum(dim=1).max()) for x in out]

    (small_field, large_field), (a, b) = widths(218.0)
    assert abs(a - b) <= 1 and abs(a - 64 * 60 / 218) <= 1.5  # 60 mm at 3.4 mm per pixel: 17.6 pixels
    share = [float((x[0, 1] > 0).float().mean()) for x in (small_field, large_field)]
    assert share[0] == pytest.approx(share[1], abs=0.01)
    assert small_field.min() == -1000.0  # padded with the image's air, not zeros
    _, (a, b) = widths(None)
    assert a / b == pytest.approx(230.4 / 140, rel=0.08)


def test_depth_crop_shifts_targets_and_turns_landmarks_outside_absent(tmp_path):
    d = PIPELINE(write_case(tmp_path, "up", flip_slices=False))
    c = crop_depth(d, 5, 10)
    assert c["image"].shape[1] == 5 and c["geometry"]["offset"] == 5
    assert c["landmark_slice"].tolist()[:3] == [np.float32(4.4) - 5, np.float32(5.4) - 5, np.float32(6.4) - 5]
    assert c["landmark_present"].tolist() == [0, 1, 1, 1, 1, 0]  # 4.4 -> -0.6 is outside
    assert file_slice(c["geometry"], 0) == 5
    crop = RandDepthCropd(prob=1.0, min_fraction=0.5)
    crop.set_random_state(0)
    r = crop(d)
    start = r["geometry"]["offset"]
    torch.testing.assert_close(r["image"], d["image"][:, start : start + r["image"].shape[1]])
    torch.testing.assert_close(r["landmark_slice"], d["landmark_slice"] - start)


def test_pad_collate_pads_depth_and_masks_padding():
    items = [{"image": torch.ones(1, d, 4, 4), "case_id": f"c{d}", "x": torch.tensor([d])} for d in (3, 5)]
    b = pad_collate(items)
    assert b["image"].shape == (2, 1, 5, 4, 4)
    assert b["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert b["image"][0, 0, 3:].abs().sum() == 0
    assert b["case_id"] == ["c3", "c5"] and b["x"].tolist() == [[3], [5]]
