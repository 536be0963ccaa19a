"""Bundle evaluation (bundles/s2cac_coronary_calcium/scripts/evaluation.py) on small hand-computed cases.

Arrays are [k, j, i] in HU; spacing (row, col, increment) = (1, 1, 3) mm, so one calcium pixel of 500 HU scores
Agatston 1 mm^2 x weight 4 x 3/3 = 4 (its 2D lesion must reach 1 mm^2: one pixel does).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundles.s2cac_coronary_calcium.scripts.evaluation import (
    bootstrap_weights,
    evaluate_case,
    evaluate_folder,
    find_predictions,
    icc_2_1,
    summarise,
    targets_met,
    to_markdown,
    weighted_kappa,
)

SPACING = (1.0, 1.0, 3.0)
SHAPE = (4, 24, 24)
LM, LAD, LCX, RCA = 1, 2, 3, 4


def volume() -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue image (40 HU) and an empty label map."""
    return np.full(SHAPE, 40, dtype=np.int16), np.zeros(SHAPE, dtype=np.uint8)


def put(img: np.ndarray, lab: np.ndarray | None, k: int, j: int, i: int, rows: int, cols: int, label: int, hu=500):
    """A rows x cols block of calcium at [k, j:j+rows, i:i+cols] (label None: image only)."""
    img[k, j : j + rows, i : i + cols] = hu
    if lab is not None:
        lab[k, j : j + rows, i : i + cols] = label


def truth(thickness=3.0, size="medium", lesions=()) -> dict:
    return {
        "scanner": {"thickness_mm": thickness},
        "patient_size": size,
        "calcium_free": not lesions,
        "lesions": lesions,
    }


# Total Agatston of the perfect-prediction cases: 0 (category 0), 8 (I), 20 (II), 120 (III), 448 (IV), 24 (II).
BLOCKS = [
    [],
    [(1, 2, 2, 1, 2, LAD)],  # 2 px x 4 = 8
    [(1, 2, 2, 1, 5, RCA)],  # 5 px x 4 = 20
    [(1, 2, 2, 5, 6, LCX)],  # 30 px x 4 = 120
    [(1, 2, 2, 7, 8, LM), (2, 2, 2, 7, 8, LM)],  # 2 x 56 px x 4 = 448 (one 3D lesion)
    [(1, 2, 2, 1, 3, LAD), (1, 10, 10, 1, 3, RCA)],  # 2 lesions x 3 px x 4 = 24
]


def perfect_cases(thickness=3.0) -> list[dict]:
    cases = []
    for blocks in BLOCKS:
        img, lab = volume()
        for b in blocks:
            put(img, lab, *b)
        cases.append(evaluate_case(img, lab, lab.copy(), SPACING, truth(thickness)))
    return cases


# --- ICC and kappa against hand computations -------------------------------------------------------------------


def test_icc_2_1_on_shrout_fleiss_table():
    # Shrout & Fleiss (1979), Table 2: 6 targets x 4 judges. Grand mean 29/6. Two-way ANOVA:
    # BMS (rows) = 1349/120 = 11.2417, JMS (raters) = 2339/72 = 32.4861, EMS = 367/360 = 1.0194.
    # ICC(2,1) = (BMS - EMS) / (BMS + 3 EMS + 4 (JMS - EMS) / 6) = 184/635 = 0.28976 (the paper reports .29).
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert icc_2_1(np.array(ratings)) == pytest.approx(184 / 635, rel=1e-12)


def test_icc_2_1_two_raters_with_constant_bias():
    # Rater 2 = rater 1 + 1 on (1, 2, 3): row means 1.5, 2.5, 3.5, grand mean 2.5, column means 2 and 3.
    # SSR = 2 x (1 + 0 + 1) = 4, MSR = 4/2 = 2; SSC = 3 x (0.25 + 0.25) = 1.5, MSC = 1.5; SSE = 0, MSE = 0.
    # ICC(2,1) = (2 - 0) / (2 + 0 + 2 x (1.5 - 0) / 3) = 2/3 (absolute agreement penalises the bias).
    assert icc_2_1(np.array([[1, 2], [2, 3], [3, 4]])) == pytest.approx(2 / 3, rel=1e-12)
    assert icc_2_1(np.array([[1, 1], [2, 2], [5, 5]])) == pytest.approx(1.0, rel=1e-12)
    assert np.isnan(icc_2_1(np.array([[3, 3], [3, 3]])))  # no variance: undefined
    assert np.isnan(icc_2_1(np.array([[1, 2]])))  # one target: undefined


def test_icc_with_bootstrap_weights_equals_icc_of_the_resampled_rows():
    x = np.random.default_rng(5).gamma(1.0, 100.0, size=(12, 2))
    weights = bootstrap_weights(12, 4, seed=3)
    vectorised = icc_2_1(x, weights)
    for w, value in zip(weights, vectorised, strict=True):
        assert value == pytest.approx(icc_2_1(np.repeat(x, w.astype(int), axis=0)), rel=1e-9)


def test_weighted_kappa_hand_computed():
    # 2 categories (linear = unweighted): table [[20, 5], [10, 15]], N = 50: po = 35/50 = 0.7;
    # margins rows 25, 25, columns 30, 20: pe = (25 x 30 + 25 x 20) / 2500 = 0.5; kappa = 0.2 / 0.5 = 0.4.
    a = [0] * 25 + [1] * 25
    b = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    assert weighted_kappa(a, b, 2) == pytest.approx(0.4, rel=1e-12)
    # 3 categories, linear disagreement weights v = |p - q| / 2; table [[2, 1, 0], [0, 2, 1], [0, 0, 2]], N = 8.
    # Observed disagreement: (0.5 x 1 + 0.5 x 1) / 8 = 1/8. Rows 3, 3, 2; columns 2, 3, 3; expected disagreement
    # (1/64) [0.5 (3x3 + 3x2 + 3x3 + 2x3) + 1 (3x3 + 2x2)] = 28/64. kappa = 1 - (8/64) / (28/64) = 5/7.
    a = [0, 0, 0, 1, 1, 1, 2, 2]
    b = [0, 0, 1, 1, 1, 2, 2, 2]
    assert weighted_kappa(a, b, 3) == pytest.approx(5 / 7, rel=1e-12)
    assert weighted_kappa([4, 1, 2], [4, 1, 2], 5) == pytest.approx(1.0)
    assert np.isnan(weighted_kappa([2, 2], [2, 2], 5))  # one category only: undefined


# --- per case and summary ---------------------------------------------------------------------------------------


def test_perfect_prediction_gives_perfect_agreement():
    cases = perfect_cases()
    assert [c["reference"]["total"]["agatston"] for c in cases] == pytest.approx([0, 8, 20, 120, 448, 24])
    assert [c["reference"]["risk_category"] for c in cases] == ["0", "I", "II", "III", "IV", "II"]
    assert cases[0]["dice"] == {"LM": None, "LAD": None, "LCX": None, "RCA": None}  # both empty: undefined
    assert cases[5]["dice"] == {"LM": None, "LAD": 1.0, "LCX": None, "RCA": 1.0}
    assert cases[4]["detection"]["n_ref"] == 1  # two slices of one 6-connected lesion
    s = summarise(cases, n_boot=200, seed=0)
    o = s["overall"]
    assert o["agatston_icc"]["estimate"] == pytest.approx(1.0)
    assert o["agatston_icc"]["low"] == pytest.approx(1.0)
    assert o["log_agatston_icc"]["estimate"] == pytest.approx(1.0)
    assert o["risk_kappa_linear"]["estimate"] == pytest.approx(1.0)
    assert o["risk_accuracy"]["estimate"] == 1.0
    assert o["lesion_sensitivity"]["estimate"] == 1.0 and o["lesion_sensitivity"]["count"] == [6, 6]
    assert o["lesion_ppv"]["estimate"] == 1.0 and o["lesion_f1"]["estimate"] == 1.0
    assert o["vessel_assignment_accuracy"]["estimate"] == 1.0
    assert o["fp_rate_calcium_free"]["estimate"] == 0.0 and o["fp_rate_calcium_free"]["n"] == 1
    assert {v: d["estimate"] for v, d in s["dice"].items()} == {"LM": 1.0, "LAD": 1.0, "LCX": 1.0, "RCA": 1.0}
    assert s["dice"]["LAD"]["n"] == 2 and s["dice"]["LM"]["n"] == 1  # cases where Dice is defined
    assert (s["n_cases"], s["n_calcium_free"], s["n_ref_lesions"]) == (6, 1, 6)
    assert targets_met(s) == {"agatston_icc": True, "risk_weighted_kappa": True, "vessel_assignment": True}
    json.dumps(s, allow_nan=False)  # JSON-friendly, no NaN


def test_vessel_swap_is_detected_but_wrongly_assigned():
    img, lab = volume()
    put(img, lab, 1, 4, 4, 2, 2, RCA)
    pred = lab.copy()
    pred[pred == RCA] = LAD
    case = evaluate_case(img, lab, pred, SPACING)
    det = case["detection"]
    assert (det["tp_ref"], det["n_ref"], det["tp_pred"], det["n_pred"]) == (1, 1, 1, 1)
    assert (det["assignment_correct"], det["assignment_assessed"]) == (0, 1)
    assert det["assignment_by_vessel"]["RCA"] == [0, 1]
    assert case["predicted"]["total"]["agatston"] == case["reference"]["total"]["agatston"] == pytest.approx(16)
    assert case["reference"]["per_vessel"]["RCA"]["agatston"] == pytest.approx(16)
    assert case["predicted"]["per_vessel"]["LAD"]["agatston"] == pytest.approx(16)
    assert case["dice"]["RCA"] == 0.0 and case["dice"]["LAD"] == 0.0
    assert case["lesions"][0]["predicted_label"] == LAD and case["lesions"][0]["vessel_correct"] is False
    s = summarise([case] * 3, n_boot=50)
    assert s["overall"]["vessel_assignment_accuracy"]["estimate"] == 0.0
    assert s["overall"]["lesion_sensitivity"]["estimate"] == 1.0
    assert s["overall"]["agatston_icc"]["estimate"] is None  # no variance between cases: undefined, not NaN
    assert targets_met(s)["vessel_assignment"] is False


def missed_and_false_positive_case() -> tuple[dict, tuple]:
    """Reference lesions A (LAD, 2 voxels), B (RCA, 4 voxels), C (LCX, 1 voxel). The prediction finds A fully, B by
    one voxel, misses C, and adds D and E (calcium with no reference label: e.g. valve calcification)."""
    img, lab = volume()
    put(img, lab, 1, 2, 2, 1, 2, LAD)  # A
    put(img, lab, 1, 8, 8, 2, 2, RCA)  # B
    put(img, lab, 2, 16, 16, 1, 1, LCX)  # C
    put(img, None, 2, 2, 16, 1, 1, 0)  # D, E: calcium outside the true labels
    put(img, None, 3, 20, 2, 1, 2, 0)
    pred = np.zeros_like(lab)
    pred[1, 2, 2:4] = LAD
    pred[1, 8, 8] = RCA
    pred[2, 2, 16] = LM
    pred[3, 20, 2:4] = LAD
    lesions = [  # truth: A's centre inside A, B's centre 1 voxel beside B (same label), C's 10 voxels away
        {"label": LAD, "centre_index_ijk": [2.6, 2.1, 1.0], "density_mg_ha_cm3": 150.0},
        {"label": RCA, "centre_index_ijk": [10.0, 8.5, 1.0], "density_mg_ha_cm3": 300.0},
        {"label": LCX, "centre_index_ijk": [6.0, 16.0, 2.0], "density_mg_ha_cm3": 500.0},
    ]
    return evaluate_case(img, lab, pred, SPACING, truth(lesions=lesions)), lesions


def test_missed_lesion_and_false_positives_give_hand_computed_detection_metrics():
    case, _ = missed_and_false_positive_case()
    det = case["detection"]
    # Reference: A and B detected (B by one voxel), C missed -> 2/3. Predicted: A, B hit reference calcium; D, E not
    # -> PPV 2/4. F1 = 2 x (2/3) x (1/2) / (2/3 + 1/2) = 4/7.
    assert (det["tp_ref"], det["n_ref"], det["tp_pred"], det["n_pred"]) == (2, 3, 2, 4)
    assert (det["assignment_correct"], det["assignment_assessed"]) == (2, 2)  # C is not assessed (missed)
    # Densities: A by its centre inside, B by the nearest same-label centre (1.1 mm away), C unmatched (10 mm > 5).
    assert [les["density_mg_ha_cm3"] for les in case["lesions"]] == [150.0, 300.0, None]
    assert det["by_density"] == {"<200": [1, 1], "200-400": [1, 1], ">=400": [0, 0], "unknown": [0, 1]}
    assert det["by_size"] == {"<=3 voxels": [1, 2], ">3 voxels": [1, 1]}  # A (2) found, C (1) missed; B (4) found
    s = summarise([case], n_boot=20)
    o = s["overall"]
    assert o["lesion_sensitivity"]["estimate"] == pytest.approx(2 / 3)
    assert o["lesion_ppv"]["estimate"] == pytest.approx(1 / 2)
    assert o["lesion_f1"]["estimate"] == pytest.approx(4 / 7)
    assert s["lesion_sensitivity_by_size"]["<=3 voxels"]["estimate"] == pytest.approx(0.5)
    assert s["lesion_sensitivity_by_density"]["unknown"]["count"] == [0, 1]
    assert o["agatston_icc"]["estimate"] is None  # one case
    json.dumps(s, allow_nan=False)


def test_truth_lesion_density_matches_dense_lesion():
    _, lesions = missed_and_false_positive_case()
    lesions[2]["centre_index_ijk"] = [16.4, 16.0, 2.0]  # C's centre now inside C
    img, lab = volume()
    put(img, lab, 2, 16, 16, 1, 1, LCX)
    case = evaluate_case(img, lab, np.zeros_like(lab), SPACING, truth(lesions=lesions))
    assert case["lesions"][0]["density_mg_ha_cm3"] == 500.0 and case["lesions"][0]["truth_index"] == 2
    assert case["detection"]["by_density"][">=400"] == [0, 1]
    assert case["detection"]["n_pred"] == 0


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    cases = perfect_cases()
    missed, _ = missed_and_false_positive_case()
    cases += [missed, missed, perfect_cases()[3]]
    a = summarise(cases, n_boot=300, seed=7)
    b = summarise(cases, n_boot=300, seed=7)
    c = summarise(cases, n_boot=300, seed=8)
    assert a == b
    assert a != c  # another seed, other resamples
    for name in ("agatston_icc", "risk_kappa_linear", "lesion_sensitivity", "lesion_ppv", "lesion_f1"):
        stat = a["overall"][name]
        assert stat["low"] <= stat["estimate"] <= stat["high"], name
        assert 0 < stat["n_boot"] <= 300
    # Pooled detected / reference lesions: perfect cases 6/6, missed case twice 2 x 2/3, case 3 again 1/1 -> 11/13.
    assert a["overall"]["lesion_sensitivity"]["count"] == [11, 13]
    assert a["overall"]["fp_rate_calcium_free"]["count"] == [0, 1]


def test_stratification_by_thickness_and_patient_size():
    thick = perfect_cases(thickness=3.0)  # 6 cases
    thin = perfect_cases(thickness=1.5)[1:3]  # 2 cases
    for case in thin:
        case["strata"]["patient_size"] = "large"
    s = summarise(thick + thin, n_boot=100)
    assert list(s["by_thickness_mm"]) == ["1.5", "3"]
    assert s["by_thickness_mm"]["3"]["n_cases"] == 6 and s["by_thickness_mm"]["1.5"]["n_cases"] == 2
    assert s["by_thickness_mm"]["3"]["interval"] and not s["by_thickness_mm"]["1.5"]["interval"]
    three, one_five = s["by_thickness_mm"]["3"]["metrics"], s["by_thickness_mm"]["1.5"]["metrics"]
    assert three["agatston_icc"]["low"] == pytest.approx(1.0)
    assert one_five["agatston_icc"]["estimate"] == pytest.approx(1.0) and one_five["agatston_icc"]["low"] is None
    assert one_five["lesion_sensitivity"]["count"] == [2, 2]
    assert s["by_thickness_mm"]["3"]["n_calcium_free"] == 1 and s["by_thickness_mm"]["1.5"]["n_calcium_free"] == 0
    assert list(s["by_patient_size"]) == ["medium", "large"]
    assert s["by_patient_size"]["large"]["n_cases"] == 2


def test_to_markdown_reports_numbers_and_targets():
    missed, _ = missed_and_false_positive_case()
    s = summarise(perfect_cases() + [missed], n_boot=100)
    md = to_markdown(s, "Test run")
    assert md.startswith("# Test run")
    sens = s["overall"]["lesion_sensitivity"]
    assert sens["count"] == [8, 9]
    assert f"| Lesion sensitivity | {sens['estimate']:.3f} (8/9) | [{sens['low']:.3f}, {sens['high']:.3f}] |" in md
    assert f"{s['overall']['agatston_icc']['estimate']:.4f}" in md
    assert "| Lesion PPV | 0.800 (8/10) |" in md
    # RCA Dice: 1 in perfect cases 2 and 5; missed case 2 x 1 / (4 + 1) = 0.4 (B found by one of 4 voxels) -> 0.8.
    assert s["dice"]["RCA"]["estimate"] == pytest.approx(0.8)
    assert "| RCA | 0.800 |" in md
    assert "## By slice thickness" in md and "## By patient size" in md and "| 3 | 7 |" in md
    met = targets_met(s)
    assert ("| yes |" in md) == any(met.values()) and ("| no |" in md) == (not all(met.values()))


# --- folders ----------------------------------------------------------------------------------------------------


AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def write_nifti(path: Path, data_kji: np.ndarray, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data_kji.transpose(2, 1, 0)), affine), str(path))


def make_dataset(root: Path) -> list[dict]:
    """3 cases <root>/data/case_<n>/{image,label}.nii.gz + truth.json, predictions as the bundle writes them."""
    cases = []
    for n, blocks in enumerate(BLOCKS[1:4]):
        img, lab = volume()
        for b in blocks:
            put(img, lab, *b)
        pred = lab.copy()
        if n == 2:
            pred[pred == LCX] = RCA
        case_dir = root / "data" / f"case_{n}"
        write_nifti(case_dir / "image.nii.gz", img)
        write_nifti(case_dir / "label.nii.gz", lab)
        write_nifti(root / "pred" / f"case_{n}" / "image_seg.nii.gz", pred)
        (case_dir / "truth.json").write_text(json.dumps(truth(thickness=3.0)))
        cases.append(
            {"image": case_dir / "image.nii.gz", "label": case_dir / "label.nii.gz", "truth": case_dir / "truth.json"}
        )
    return cases


def test_find_predictions_follows_monai_save_image_layout(tmp_path):
    # monai.data.utils.create_file_basename(postfix="seg", input_file_name="/foo/bar/test1/image.png",
    # folder_path="/output", data_root_dir="/foo/bar", separate_folder=False) -> "/output/test1/image_seg";
    # SaveImaged appends output_ext (".nii.gz" by default).
    found = find_predictions([{"image": "/foo/bar/test1/image.nii.gz"}], "/output", must_exist=False)
    assert found[0]["pred"] == "/output/test1/image_seg.nii.gz"
    found = find_predictions([{"image": "/foo/bar/a/b/x.nii"}], "/out", data_root_dir="/foo/bar", must_exist=False)
    assert found[0]["pred"] == "/out/a/b/x_seg.nii.gz"
    cases = make_dataset(tmp_path)
    found = find_predictions(cases, tmp_path / "pred")
    assert [Path(c["pred"]) for c in found] == [tmp_path / "pred" / f"case_{n}" / "image_seg.nii.gz" for n in range(3)]
    with pytest.raises(FileNotFoundError, match="1 prediction"):
        find_predictions(cases + [{"image": tmp_path / "data" / "case_9" / "image.nii.gz"}], tmp_path / "pred")


def test_evaluate_folder_round_trip(tmp_path):
    cases = find_predictions(make_dataset(tmp_path), tmp_path / "pred")
    out = tmp_path / "report"
    summary = evaluate_folder(cases, out, n_boot=50, progress=False)
    assert summary["n_cases"] == 3 and summary["n_ref_lesions"] == 3
    assert summary["overall"]["vessel_assignment_accuracy"]["count"] == [2, 3]  # case_2: LCX predicted as RCA
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["summary"] == summary
    assert [row["id"] for row in saved["cases"]] == ["case_0", "case_1", "case_2"]
    # 0.8 x 0.8 mm pixels, 500 HU, factor 3/3: 2 px x 0.64 x 4 = 5.12 (case_0).
    assert saved["cases"][0]["reference"]["total"]["agatston"] == pytest.approx(5.12)
    assert saved["cases"][2]["predicted"]["per_vessel"]["RCA"]["agatston"] == pytest.approx(30 * 0.64 * 4)
    assert (out / "evaluation.md").read_text().startswith("# S2CAC evaluation")


def test_evaluate_folder_rejects_prediction_off_the_label_grid(tmp_path):
    cases = find_predictions(make_dataset(tmp_path), tmp_path / "pred")
    pred = nib.load(str(cases[1]["pred"]))
    data = np.asarray(pred.dataobj)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(data, shifted), str(cases[1]["pred"]))
    with pytest.raises(ValueError, match="grid"):
        evaluate_folder(cases, tmp_path / "report", n_boot=10, progress=False)
    nib.save(nib.Nifti1Image(data[:, :, :2], AFFINE), str(cases[1]["pred"]))
    with pytest.raises(ValueError, match="shape"):
        evaluate_folder(cases, tmp_path / "report", n_boot=10, progress=False)
