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
