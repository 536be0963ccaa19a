"""Parity: each bundle's own inference.yaml on a phantom's NIfTI and the app's model stage on the same phantom's
DICOM give the same masks, scores and landmarks.

The app runs the TorchScript export (models/<name>/model.ts, checked against the manifest) with transforms built
from the bundle's configs; the bundle runs its checkpoint through `monai.bundle run`. A cropped chest phantom keeps
the sliding window cheap; the crop is written both ways from the same array and grid.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from bundles.s2cac_coronary_calcium.scripts import scoring
from conftest import ROOT
from deploy_app.inference import CPU_SW_OVERLAP, CalciumSegmenter, LandmarkLocator
from deploy_app.models import MODELS, load_manifest, locate_models, model_dir, sha256
from deploy_app.volume import build_volume
from phantoms.chest import make_chest_case
from phantoms.dicom_series import write_ct_series
from phantoms.head import make_head_case
from phantoms.writers import to_nifti

UID = "1.2.826.0.1.3680043.8.498.7"


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    manifest = load_manifest()
    for name, entry in manifest.items():
        spec = MODELS[name]
        assert entry["weights_sha256"] == sha256(spec.bundle_root / "models" / spec.weights), (
            f"models/{name} is not the export of the bundle's current weights: run `make models`"
        )
    return locate_models(model_dir(), manifest)


def write_both(array: np.ndarray, grid, folder: Path, series: str) -> tuple[Path, list[pydicom.Dataset]]:
    folder.mkdir(parents=True)
    nib.save(to_nifti(array, grid), folder / "image.nii.gz")
    files = write_ct_series(
        np.rint(array).astype(np.int16), grid, folder / "dicom", study_uid=f"{UID}.1", series_uid=f"{UID}.{series}",
        series_number=1,
    )  # fmt: skip
    return folder, [pydicom.dcmread(f) for f in files]


def bundle_run(config: list[str], bundle: str, in_dir: Path, out_dir: Path, *overrides: str) -> None:
    cfg = [str(ROOT / "bundles" / bundle / "configs" / c) for c in config]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg[0] if len(cfg) == 1 else repr(cfg),
           "--input_dir", str(in_dir), "--output_dir", str(out_dir), "--device", "$torch.device('cpu')",
           *overrides]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(ROOT / "bundles" / bundle), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_coronary_mask_and_scores_equal_the_bundle_inference(models, tmp_path):
    case = make_chest_case(0, 1, "small")
    label = case.arrays["label"]
    nk = min(16, label.shape[0])
    k0 = int(np.clip(np.argwhere(label > 0)[:, 0].mean() - nk // 2, 0, label.shape[0] - nk))
    crop = np.s_[k0 : k0 + nk, 20:100, 20:100]
    origin = case.grid.index_to_patient(np.array([[20, 20, k0]]))[0]
    grid = dataclasses.replace(case.grid, shape=(nk, 80, 80), origin=tuple(float(v) for v in origin))
    image = case.arrays["image"][crop]
    folder, datasets = write_both(image, grid, tmp_path / "chest", "2")
    segmenter = CalciumSegmenter(MODELS["s2cac_coronary"], models["s2cac_coronary"], torch.device("cpu"))
    overlap = segmenter.sliding_window["overlap"]  # the app's CPU default; the bundle is told the same

    bundle_run(
        ["inference.yaml"], "s2cac_coronary_calcium", folder, tmp_path / "bundle_out", "--input_glob", "image.nii.gz",
        "--inferer#overlap", str(overlap),
    )  # fmt: skip
    seg = nib.load(next((tmp_path / "bundle_out").rglob("*_seg.nii.gz")))
    bundle_labels = np.asarray(seg.dataobj).transpose(2, 1, 0)

    vol = build_volume(datasets)
    app_labels = segmenter(vol.hu, vol.affine_lps)
    assert app_labels.shape == bundle_labels.shape
    assert np.array_equal(app_labels, bundle_labels), f"{int((app_labels != bundle_labels).sum())} voxels differ"
    spacing = vol.scoring_spacing
    assert (
        scoring.score_calcium(vol.hu, app_labels, spacing).as_dict()
        == scoring.score_calcium(vol.hu, bundle_labels.astype(np.uint8), spacing).as_dict()
    )


def test_landmarks_equal_the_bundle_inference(models, tmp_path):
    case = make_head_case(5, 1, "small")
    folder, datasets = write_both(case.arrays["image"], case.grid, tmp_path / "head", "3")
    bundle_run(
        ["inference.yaml"], "dst_ica_calcification", folder, tmp_path / "bundle_out", "--input_glob", "image.nii.gz"
    )
    expected = json.loads(next((tmp_path / "bundle_out").rglob("*.json")).read_text())
    vol = build_volume(datasets)
    got = LandmarkLocator(MODELS["dst_landmarks"], models["dst_landmarks"])(vol.hu, vol.affine_lps)
    keys = ("name", "slice_index", "expected_slice", "z_mm", "probability", "present")
    assert [{k: lm[k] for k in keys} for lm in got["landmarks"]] == [
        {k: lm[k] for k in keys} for lm in expected["landmarks"]
    ]


def test_the_calcium_model_reads_with_the_cpu_overlap_unless_told_otherwise(models):
    cpu = torch.device("cpu")
    default = CalciumSegmenter(MODELS["s2cac_coronary"], models["s2cac_coronary"], cpu)
    assert default.sliding_window == {"roi_size": [16, 160, 160], "overlap": CPU_SW_OVERLAP}
    told = CalciumSegmenter(MODELS["s2cac_ica"], models["s2cac_ica"], cpu, overlap=0.5)
    assert told.sliding_window == {"roi_size": [16, 128, 128], "overlap": 0.5}
