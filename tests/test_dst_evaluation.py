"""DST evaluation metrics against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundles.dst_ica_calcification.scripts.evaluation import (
    accuracy,
    binary_auc,
    check_targets,
    evaluate_classification,
    evaluate_localization,
    landmark_rows,
    localization_point_stats,
    localization_stats,
    macro_auc_ovr,
    macro_f1,
    summarise_classification,
)
from bundles.dst_ica_calcification.scripts.landmarks import LANDMARKS


def prediction(slices: list[int], present: list[bool], spacing: float = 2.5, num_slices: int = 40) -> dict:
    lms = [{**lm, "slice_index": s, "present": p} for lm, s, p in zip(LANDMARKS, slices, present, strict=True)]
    return {"num_slices": num_slices, "slice_spacing_mm": spacing, "landmarks": lms}


def truth(slice_index: list[float | None], thickness: float = 2.5) -> dict:
    lms = [
        {"name": lm["name"], "slice_index": s, "in_scan": s is not None}
        for lm, s in zip(LANDMARKS, slice_index, strict=True)
    ]
    return {"scanner": {"thickness_mm": thickness}, "landmarks": lms}


def test_point_stats_of_a_hand_made_error_list():
    stats = localization_point_stats([0, 1, 2, 0], [0.0, 2.5, 5.0, 0.0])
    assert stats == {"mae_slices": 0.75, "mae_mm": 1.875, "top1": 0.5, "within1": 0.75}


def test_landmark_rows_compare_rounded_truth_with_argmax_and_score_presence_separately():
    rows = landmark_rows(
        prediction([10, 12, 20, 9, 14, 30], [True, True, True, True, True, False]),
        truth([10.4, 13.6, 20.0, 8.5, 14.0, None]),
        "c1",
    )
    errs = [r.get("error_slices") for r in rows]
    assert errs == [0, 2, 0, 0, 0, None]  # 13.6 -> 14; 8.5 rounds half up -> 9; the sixth is outside the scan
    assert rows[1]["error_mm"] == pytest.approx(5.0)
    assert [r["pred_present"] == r["present"] for r in rows] == [True] * 6


def test_case_bootstrap_interval_contains_the_estimate_and_collapses_for_identical_cases():
    rows = []
    for c in range(4):
        rows += landmark_rows(prediction([10, 12, 20, 9, 14, 30], [True] * 6), truth([10, 13, 20, 9, 14, 30]), f"c{c}")
    s = localization_stats(rows, n_boot=200)
    assert s["n_cases"] == 4 and s["mae_slices"]["n"] == 24
    assert s["mae_slices"]["estimate"] == pytest.approx(1 / 6)
    assert s["mae_slices"]["low"] == pytest.approx(1 / 6) and s["mae_slices"]["high"] == pytest.approx(1 / 6)
    assert s["top1"]["estimate"] == pytest.approx(5 / 6) and s["within1"]["estimate"] == 1.0
    assert s["presence_accuracy"]["estimate"] == 1.0


def test_targets_use_the_conservative_end_of_the_interval():
    def ci(est, low, high):
        return {"estimate": est, "low": low, "high": high, "n": 10}

    thick = {"mae_slices": ci(0.05, 0.02, 0.12), "top1": ci(0.95, 0.93, 0.97), "within1": ci(0.99, 0.97, 1.0)}
    thin = {"mae_mm": ci(0.8, 0.6, 0.95)}
    met = check_targets({"thickness >= 2 mm": thick, "thickness < 2 mm": thin})
    assert met == {"thick_mae_slices": False, "thick_top1": True, "thick_within1": True, "thin_mae_mm": True}
    assert check_targets({})["thin_mae_mm"] is None


def test_classification_metrics_by_hand():
    y, pred = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    assert accuracy(y, pred) == 0.75
    assert macro_f1(y, pred, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert binary_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.5])) == 0.75
    assert binary_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(binary_auc(np.array([1, 1]), np.array([0.1, 0.2])))
    prob = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    assert macro_auc_ovr(y, prob) == pytest.approx(1.0)  # each class ranked above the rest
    s = summarise_classification(y, prob, ["NCP", "CP", "Normal"], n_boot=50)
    assert s["accuracy"]["estimate"] == 0.75 and s["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert s["accuracy"]["low"] <= 0.75 <= s["accuracy"]["high"]


def test_reports_are_written_as_json_and_markdown(tmp_path):
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    cases = []
    for c, thickness in (("a", 3.0), ("b", 1.25)):
        (pred_dir / f"{c}.json").write_text(json.dumps(prediction([10, 12, 20, 9, 14, 30], [True] * 6)))
        (tmp_path / f"{c}_truth.json").write_text(json.dumps(truth([10, 12, 21, 9, 14, 30], thickness)))
        cases.append({"case_id": c, "truth": str(tmp_path / f"{c}_truth.json")})
    summary = evaluate_localization(cases, str(pred_dir), str(tmp_path / "loc"), n_boot=20)
    assert set(summary["by_thickness"]) == {"all", "thickness >= 2 mm", "thickness < 2 mm", "1.25 mm", "3 mm"}
    assert summary["by_thickness"]["3 mm"]["mae_mm"]["estimate"] == pytest.approx(2.5 / 6)
    assert "Release targets" in (tmp_path / "loc" / "evaluation.md").read_text()
    assert json.loads((tmp_path / "loc" / "evaluation.json").read_text())["summary"]["n_cases"] == 2

    for c, p in (("x", [0.1, 0.8, 0.1]), ("y", [0.6, 0.3, 0.1])):
        (pred_dir / f"{c}.json").write_text(json.dumps({"probabilities": p, "class": "?"}))
    cls = evaluate_classification(
        [{"case_id": "x", "label": "CP"}, {"case_id": "y", "label": 0}], str(pred_dir), str(tmp_path / "cls"),
        ["NCP", "CP", "Normal"], n_boot=20,
    )  # fmt: skip
    assert cls["accuracy"]["estimate"] == 1.0
    assert "macro F1" in (tmp_path / "cls" / "evaluation.md").read_text()
