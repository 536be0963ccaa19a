"""The make_phantoms command line, as a user runs it: files, datalist, DICOM, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from phantoms.dicom_series import read_ct_series
from phantoms.geometry import LPS_TO_RAS

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "scripts" / "make_phantoms.py")]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def chest_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chest")
    r = run_cli("chest", "--num", "5", "--out", str(out), "--seed", "3", "--dicom", "--unlabeled-fraction", "0.4")
    assert r.returncode == 0, r.stderr
    return out


def test_help_explains_each_option():
    r = run_cli("chest", "--help")
    assert r.returncode == 0
    for option in ("--num", "--out", "--seed", "--size", "--dicom", "--workers", "--transfer-syntax"):
        assert option in r.stdout


def test_case_folders_hold_volumes_truth_and_dicom(chest_dataset):
    cases = sorted(p for p in chest_dataset.iterdir() if p.is_dir())
    assert len(cases) == 5
    for case in cases:
        names = {p.name for p in case.iterdir()}
        assert {"image.nii.gz", "label.nii.gz", "occupancy.nii.gz", "truth.json", "dicom"} <= names
    assert not list(chest_dataset.glob(".*partial")), "no half-written case folders"


def test_datalist_has_patient_level_folds_and_unlabeled_share(chest_dataset):
    dl = json.loads((chest_dataset / "datalist.json").read_text())
    entries = dl["training"] + dl["unlabeled"]
    assert sorted(e["case_id"] for e in entries) == sorted(p.name for p in chest_dataset.iterdir() if p.is_dir())
    assert len(dl["unlabeled"]) == 2
    assert all("label" not in e for e in dl["unlabeled"])
    assert all((chest_dataset / e["label"]).is_file() for e in dl["training"])
    assert {e["fold"] for e in entries} <= set(range(5))


def test_dicom_reads_back_to_the_nifti_volume_and_geometry(chest_dataset):
    case = sorted(p for p in chest_dataset.iterdir() if p.is_dir())[0]
    nii = nib.load(case / "image.nii.gz")
    volume, grid, datasets = read_ct_series(case / "dicom")
    assert np.array_equal(volume, np.asarray(nii.dataobj).transpose(2, 1, 0).astype(np.float32))
    ras = grid.affine_lps()
    ras[:3] = LPS_TO_RAS @ ras[:3]
    np.testing.assert_allclose(ras, nii.affine, atol=1e-4)
    truth = json.loads((case / "truth.json").read_text())
    assert datasets[0].SeriesInstanceUID == truth["dicom"]["series_uid"]
    assert float(datasets[0].KVP) == truth["scanner"]["kvp"]


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--num", "2", "--seed", "9", "--dicom", "--transfer-syntax", "rle"]
    assert run_cli("chest", "--out", str(a), *common).returncode == 0
    assert run_cli("chest", "--out", str(b), *common, "--workers", "2").returncode == 0
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_bad_arguments_fail_with_one_message(tmp_path):
    r = run_cli("chest", "--num", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "--num must be at least 1" in r.stderr
