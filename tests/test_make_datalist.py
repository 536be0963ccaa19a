"""scripts/make_datalist.py: the user's own NIfTI pairs or DICOM CT + DICOM SEG into an evaluation datalist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT
from phantoms.dicom_series import read_ct_series

VESSELS = ("LM", "LAD", "LCX", "RCA")
CODE = hd.sr.CodedConcept("113343008", "SCT", "Calcium deposit")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_datalist.py"), *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own_data")
    cmd = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py"), "chest", "--num", "3", "--out", str(out)]
    subprocess.run([*cmd, "--seed", "21", "--dicom"], check=True, capture_output=True, timeout=300)
    return out


def write_seg(case: Path, out: Path, names=VESSELS) -> None:
    """A DICOM SEG of the phantom's label map, one segment per vessel, as a viewer or dcmqi would store it."""
    volume, grid, datasets = read_ct_series(case / "dicom")
    label = np.asarray(nib.load(case / "label.nii.gz").dataobj).transpose(2, 1, 0)  # NIfTI (i, j, k) -> [k, j, i]
    algorithm = hd.AlgorithmIdentificationSequence(name="test", version="1", family=CODE)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=CODE, segmented_property_type=CODE,
            algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        )
        for n, name in enumerate(names, 1)
    ]  # fmt: skip
    masks = np.stack([label == n for n in range(1, len(names) + 1)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks, segmentation_type="BINARY", segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        omit_empty_frames=False,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    seg.save_as(out / f"{case.name}_seg.dcm")


def test_nifti_pairs_give_a_datalist_with_one_fold_per_case(phantoms, tmp_path):
    r = run(str(tmp_path), "--nifti", str(phantoms), "--folds", "3")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "datalist.json").read_text())["training"]
    assert sorted(e["fold"] for e in data) == [0, 1, 2]
    for e in data:
        assert Path(e["image"]).name == "image.nii.gz" and Path(e["label"]).name == "label.nii.gz"
        assert Path(e["label"]).parent == Path(e["image"]).parent


def test_dicom_with_seg_round_trips_to_the_phantom_labels(phantoms, tmp_path):
    source = tmp_path / "pacs_export"
    for case in sorted(p for p in phantoms.iterdir() if p.is_dir()):
        shutil.copytree(case / "dicom", source / case.name)
        write_seg(case, source / "segs")
    out = tmp_path / "out"
    r = run(str(out), "--dicom", str(source), "--folds", "3")
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "datalist.json").read_text())["training"]
    assert len(data) == 3
    by_series = {}
    for case in (p for p in phantoms.iterdir() if p.is_dir()):
        by_series[json.loads((case / "truth.json").read_text())["dicom"]["series_uid"]] = case
    for e in data:
        image, label = nib.load(out / e["image"]), nib.load(out / e["label"])
        matches = [c for c in by_series.values() if nib.load(c / "image.nii.gz").shape == image.shape]
        phantom = next(c for c in matches if np.allclose(nib.load(c / "image.nii.gz").affine, image.affine, atol=1e-3))
        truth_label = np.asarray(nib.load(phantom / "label.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asarray(label.dataobj), truth_label)
        np.testing.assert_allclose(label.affine, nib.load(phantom / "label.nii.gz").affine, atol=1e-3)
        assert "chest" not in e["case_id"], "file names come from hashed UIDs, not from the source"


def test_unknown_segment_names_and_missing_seg_fail_in_one_line(phantoms, tmp_path):
    case = sorted(p for p in phantoms.iterdir() if p.is_dir())[0]
    source = tmp_path / "src"
    shutil.copytree(case / "dicom", source / "ct")
    r = run(str(tmp_path / "a"), "--dicom", str(source))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "no DICOM SEG files" in r.stderr
    write_seg(case, source / "segs", names=("Left main", "LAD", "LCX", "RCA"))
    r = run(str(tmp_path / "b"), "--dicom", str(source), "--folds", "1")
    assert r.returncode == 2 and "segment 'Left main' is not in --labels" in r.stderr
    assert not (tmp_path / "b" / "datalist.json").exists()
