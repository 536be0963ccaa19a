"""Tests for scripts/measure_icac_mapping.py: truth segments of wall calcium, the summary, predicted landmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import measure_icac_mapping as measure  # noqa: E402

CASES = [(2000, i, "small", "both") for i in (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def cases():
    return [measure.generated_case(*spec) for spec in CASES]


@pytest.fixture(scope="module")
def results(cases):
    return [measure.evaluate_case(c) for c in cases]


def test_wall_calcium_takes_the_segment_of_the_nearest_lumen_voxel():
    segments = np.zeros((6, 10, 10), dtype=np.uint8)
    segments[:3, 4:6, 2:4] = 3  # right cavernous lumen below, right supraclinoid above
    segments[3:, 4:6, 2:4] = 4
    segments[:, 4:6, 7:9] = 7  # a left cavernous lumen
    label = np.zeros_like(segments)
    label[1, 4, 4] = label[4, 6, 3] = label[2, 5, 6] = label[4, 4, 3] = 1
    out, dist = measure.truth_labels(label, segments, (0.5, 0.5, 2.0))
    assert out[1, 4, 4] == 3 and out[4, 6, 3] == 4 and out[2, 5, 6] == 7
    assert out[4, 4, 3] == 4  # inside the lumen map: its own value
    assert dist == pytest.approx(0.5) and out[label == 0].max() == 0


def test_true_landmarks_map_nearly_all_calcium_correctly(results):
    summary = measure.summarise(results, n_boot=200)
    assert summary["cases_with_calcium"] >= 2 and summary["calcium_volume_mm3"] > 0
    assert summary["wrong_side_share"]["value"] == 0.0
    assert summary["wrong_segment_share"]["value"] < 0.1
    assert summary["unassigned_truth_share"]["value"] == 0.0
    confusion = np.asarray(summary["confusion_mm3"]["matrix"])
    assert confusion.sum() == pytest.approx(summary["calcium_volume_mm3"])
    assert np.trace(confusion) / confusion.sum() == pytest.approx(1 - summary["wrong_segment_share"]["value"])
    for r in results:  # per case the mapped and the true volumes are the same calcium split differently
        assert sum(r["mapped_volume_mm3"]) == pytest.approx(sum(r["true_volume_mm3"]))
        assert r["plane_angle_deg"] < 1.0 and r["plane_offset_at_icas_mm"] < 1.0
    markdown = measure.to_markdown(summary, "test")
    assert "| cavernous |" in markdown and "wrong segment" in markdown


def test_predicted_landmarks_from_a_folder_are_used(cases, results, tmp_path, capsys):
    """Predictions placing every boundary above the scan make all calcium cervical: the wrong-segment share must be
    exactly the share of calcium that is not truly cervical."""
    folder = tmp_path / "pred"
    folder.mkdir()
    for c in cases[:2]:
        top = c["image"].shape[0] + 10
        preds = [{"name": lm["name"], "slice": top + lm["boundary"], "present": True} for lm in c["truth"]["landmarks"]]
        (folder / f"{c['case_id']}.json").write_text(json.dumps({"landmarks": preds}))
    out = tmp_path / "pred.json"
    args = ["--num", "2", "--seed", "2000", "--calcium", "both", "--n-boot", "100", "--landmarks", str(folder)]
    assert measure.main([*args, "--json", str(out)]) == 0
    predicted = json.loads(out.read_text())["summary"]
    assert "predicted landmarks" in predicted["setup"]["landmarks"]
    baseline = measure.summarise(results[:2], n_boot=100)
    confusion = np.asarray(baseline["confusion_mm3"]["matrix"])
    assert baseline["calcium_volume_mm3"] > 0 and confusion[1:].sum() > 0
    expected = confusion[1:].sum() / confusion.sum()
    assert predicted["wrong_segment_share"]["value"] == pytest.approx(expected)
    assert predicted["icc_per_segment"]["cervical"]["mapped_volume_mm3"] == pytest.approx(confusion.sum())
    assert "### ICA segment mapping" in capsys.readouterr().out


def test_missing_predictions_are_a_one_line_error(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert measure.main(["--num", "2", "--landmarks", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("measure_icac_mapping: error: no predicted landmarks for head_2000_00000")
