"""Tests of the synthetic Clean-CC-CCII stand-in (scripts/phantoms/lung.py), ``small`` size only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from phantoms.lung import CLASSES, LUNG_WINDOW_HU, make_lung_patient, write_lung_patient

SEED = 0
N_PATIENTS = 6


def _read_scan(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("cc_ccii")
    summaries = [write_lung_patient(root, SEED, i, "small") for i in range(N_PATIENTS)]
    return root, summaries


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [make_lung_patient(SEED, i, "small") for i in range(N_PATIENTS)]


def test_layout_is_class_patient_scan_slice(written: tuple[Path, list[dict]]) -> None:
    root, summaries = written
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files, "nothing written"
    for rel in files:
        assert len(rel.parts) == 4, rel
        klass, patient, scan, name = rel.parts
        assert klass in CLASSES
        assert re.fullmatch(r"[1-9][0-9]*", patient), rel  # integer-like, no leading zero
        assert re.fullmatch(r"[1-9][0-9]*", scan), rel
        assert re.fullmatch(r"[0-9]{4}\.png", name), rel
    # balanced classes: 6 patients -> 2 per class; class of index i is CLASSES[i % 3]
    for klass in CLASSES:
        assert len([d for d in (root / klass).iterdir() if d.is_dir()]) == N_PATIENTS // len(CLASSES)
    for i, s in enumerate(summaries):
        assert s["class"] == CLASSES[i % 3]
        assert 1 <= len(s["scans"]) <= 2
        for scan_id, info in s["scans"].items():
            folder = root / info["path"]
            assert folder == root / s["class"] / s["patient"] / scan_id
            names = sorted(p.name for p in folder.iterdir())
            assert names == [f"{k:04d}.png" for k in range(info["slices"])]  # contiguous from 0000
            assert 16 <= info["slices"] <= 24
    json.dumps(summaries)  # the summary is JSON-able


def test_pngs_are_8bit_grey_64(written: tuple[Path, list[dict]]) -> None:
    root, _ = written
    for f in root.rglob("*.png"):
        with Image.open(f) as im:
            assert im.format == "PNG"
            assert im.mode == "L"
            assert im.size == (64, 64)
            assert not any(k in im.info for k in ("tIME", "Creation Time", "date:create", "Software"))


def test_pixels_zero_outside_lung_positive_inside(written: tuple[Path, list[dict]], cases: list[dict]) -> None:
    root, summaries = written
    for s, case in zip(summaries, cases, strict=True):
        assert case["patient"] == s["patient"]
        for scan_id, info in s["scans"].items():
            vol = _read_scan(root / info["path"])
            assert vol.dtype == np.uint8 and vol.shape == (info["slices"], 64, 64)
            np.testing.assert_array_equal(vol, case["scans"][scan_id])  # PNG round trip is lossless
            lung = case["truth"]["lung_mask"][scan_id]
            assert lung.any()
            assert np.all(vol[~lung] == 0)
            assert np.all(vol[lung] > 0)
            assert info["lung_volume_voxels"] == int(lung.sum())


def _lesion_stats(case: dict) -> tuple[list[float], list[float], list[tuple[int, int]]]:
    """Per scan: mean distance (mm) of lesion voxels to the lung border, mean grey value, voxels per image half."""
    truth = case["truth"]
    dist, grey, halves = [], [], []
    for scan_id, vol in case["scans"].items():
        lesion, lung = truth["lesion_mask"][scan_id], truth["lung_mask"][scan_id]
        assert lesion.any() and not np.any(lesion & ~lung)
        edt = ndimage.distance_transform_edt(lung, sampling=truth["spacing_mm"][scan_id])
        dist.append(float(edt[lesion].mean()))
        grey.append(float(vol[lesion].mean()))
        w = vol.shape[2]
        halves.append((int(lesion[:, :, : w // 2].sum()), int(lesion[:, :, w // 2 :].sum())))
    return dist, grey, halves


def test_ncp_bilateral_peripheral_cp_deeper_and_denser(cases: list[dict]) -> None:
    ncp = [c for c in cases if c["class"] == "NCP"]
    cp = [c for c in cases if c["class"] == "CP"]
    assert len(ncp) == 2 and len(cp) == 2
    ncp_dist, ncp_grey, cp_dist, cp_grey = [], [], [], []
    for c in ncp:
        d, g, halves = _lesion_stats(c)
        assert all(left > 0 and right > 0 for left, right in halves), halves  # both sides of the midline
        assert {les["side"] for les in c["truth"]["lesions"]} == {"left", "right"}
        assert all(les["type"] == "ggo" for les in c["truth"]["lesions"])
        ncp_dist += d
        ncp_grey += g
    for c in cp:
        d, g, _ = _lesion_stats(c)
        assert all(les["type"] == "consolidation" for les in c["truth"]["lesions"])
        cp_dist += d
        cp_grey += g
    # peripheral: every NCP scan's lesions lie closer to the pleura than every CP scan's consolidation
    assert max(ncp_dist) < min(cp_dist), (ncp_dist, cp_dist)
    assert np.mean(ncp_dist) < 0.7 * np.mean(cp_dist)
    # denser: consolidation is brighter in the lung window than ground glass
    assert min(cp_grey) > max(ncp_grey), (cp_grey, ncp_grey)
    lo, hi = LUNG_WINDOW_HU
    ggo_grey_max = (-400.0 - lo) / (hi - lo) * 255
    assert max(ncp_grey) < ggo_grey_max + 10  # GGO stays in its HU range (plus noise and vessels)


def test_normal_has_no_lesions(cases: list[dict]) -> None:
    normals = [c for c in cases if c["class"] == "Normal"]
    assert len(normals) == 2
    for c in normals:
        assert c["truth"]["lesions"] == []
        assert all(not m.any() for m in c["truth"]["lesion_mask"].values())
        assert all(v == 0 for v in c["truth"]["lesion_volume_voxels"].values())


def test_truth_is_consistent(cases: list[dict]) -> None:
    for c in cases:
        truth = c["truth"]
        assert truth["class"] == c["class"]
        assert set(truth["lung_mask"]) == set(c["scans"]) == set(truth["lung_volume_voxels"])
        for les in truth["lesions"]:
            assert les["scan"] in c["scans"]
            assert les["side"] in ("left", "right")
            assert les["radius_mm"] > 0 and len(les["centre_mm"]) == 3 and len(les["centre_voxel"]) == 3
            lo, hi = (-700.0, -400.0) if les["type"] == "ggo" else (-100.0, 40.0)
            assert lo <= les["hu"] <= hi
        for scan_id, mask in truth["lesion_mask"].items():
            per_lesion = sum(les["voxels"] for les in truth["lesions"] if les["scan"] == scan_id)
            assert int(mask.sum()) == truth["lesion_volume_voxels"][scan_id] <= per_lesion


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for index in (0, 1):
        assert write_lung_patient(a, SEED, index, "small") == write_lung_patient(b, SEED, index, "small")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = make_lung_patient(SEED + 1, 0, "small")
    first = make_lung_patient(SEED, 0, "small")
    assert not np.array_equal(next(iter(other["scans"].values()))[:16], next(iter(first["scans"].values()))[:16])


def test_patient_and_scan_ids_unique_and_stable() -> None:
    cases = [make_lung_patient(SEED, i, "small") for i in range(12)]
    patients = [c["patient"] for c in cases]
    assert len(set(patients)) == len(patients)
    scans = [s for c in cases for s in c["scans"]]
    assert len(set(scans)) == len(scans)
    assert sum(len(c["scans"]) == 2 for c in cases) >= 1  # some patients have a follow-up scan
    assert make_lung_patient(SEED, 3, "small")["patient"] == patients[3]


def test_unknown_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        make_lung_patient(SEED, 0, "huge")
