"""The app's measuring tools as the README runs them: scripts/evaluate_app.py on held-out phantom studies and
scripts/benchmark.py, each told a sliding-window overlap and reporting the one the app used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def chest_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("chest_test")
    run("scripts/make_phantoms.py", "chest", "--num", "2", "--out", str(out), "--size", "small", "--seed", "1000",
        "--dicom")  # fmt: skip
    return out


def test_evaluate_app_scores_the_app_against_truth_with_the_overlap_it_was_told(chest_cases, tmp_path):
    r = run("scripts/evaluate_app.py", str(chest_cases), "--path", "coronary", "--out", str(tmp_path),
            "--sw-overlap", "0.5", "--n-boot", "50")  # fmt: skip
    summary = json.loads((tmp_path / "evaluation.json").read_text())
    assert summary["n_cases"] == 2
    assert summary["app"]["sliding_window"] == {"roi_size": [16, 160, 160], "overlap": 0.5}
    assert summary["app"]["roi"] is True and summary["app"]["cases"] == 2
    assert "App (coronary, heart/skull-base ROI, overlap 0.5) on" in r.stdout
    assert (tmp_path / "evaluation.md").read_text() in r.stdout


def test_evaluate_app_says_so_when_the_folder_holds_no_cases(tmp_path):
    r = subprocess.run([sys.executable, "scripts/evaluate_app.py", str(tmp_path), "--path", "ica", "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "evaluate_app: error: no case folders with dicom/" in r.stderr


def test_benchmark_times_each_stage_and_records_the_overlap(tmp_path):
    out = tmp_path / "bench.json"
    r = run("scripts/benchmark.py", "--size", "small", "--runs", "1", "--studies", "chest", "--no-cli",
            "--sw-overlap", "0.25", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["sw_overlap"] == 0.25 and report["runs"] == 1
    stages = report["studies"]["chest"]["median_s"]
    assert stages["coronary.model_s2cac_coronary"] > 0 and stages["writers"] > 0
    assert stages["total"] >= stages["coronary.model_s2cac_coronary"] + stages["writers"]
    assert "cli" not in report["studies"]["chest"]
    assert "| total |" in r.stdout


def test_demo_truth_scores_the_true_calcium_not_the_ica_lumen(tmp_path):
    """make demo's "truth Agatston" column: the ICA truth is the calcium voxels placed on segments, not the lumen map
    (whose petrous voxels partial-volume with bone over 130 HU and once printed a truth of 582.7 for a head whose
    one plaque labels no voxel)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import DEMO_HEAD, truth_scores
    from make_study import make_study

    from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES
    from bundles.s2cac_coronary_calcium.scripts.scoring import score_nifti

    made = make_study(tmp_path / "none", chest=None, head=(0, 1))
    truth = truth_scores(tmp_path / "none", made)
    assert set(truth) == {"ica"} and truth["ica"]["total"]["agatston"] == 0.0
    case = tmp_path / "none" / "truth" / made["head"].name.split("_", 1)[1]
    lumen = score_nifti(case / "image.nii.gz", case / "segments.nii.gz", label_names=LABEL_NAMES)
    assert lumen.total.agatston > 100

    made = make_study(tmp_path / "demo", chest=(0, 1), head=DEMO_HEAD)
    truth = truth_scores(tmp_path / "demo", made)
    ica = {name: s["agatston"] for name, s in truth["ica"]["per_label"].items() if s["agatston"] > 0}
    assert list(ica) == ["right cavernous"] and ica["right cavernous"] > 10  # the demo shows a finding, one side
    coronary = truth["coronary"]
    assert coronary["total"]["agatston"] > 0 and set(coronary["per_label"]) == {"LM", "LAD", "LCX", "RCA"}
