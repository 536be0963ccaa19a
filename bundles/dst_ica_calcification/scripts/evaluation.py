"""Held-out evaluation of the DST: landmark localization and 3D classification, with bootstrap 95 % intervals.

Localization compares the predicted slice (argmax of each landmark's distribution) with the true slice (the
truth's ``slice_index`` rounded), both as indices of the input file's slice axis. Errors count over landmarks
present in the truth, whatever the presence output says; presence accuracy is scored separately over all six
landmarks. Errors in mm are slice errors times the slice spacing. Cases are stratified by slice thickness
(truth scanner thickness, else the spacing). Intervals resample cases (patients), not landmarks, because the
six landmarks of one scan are not independent.

Release targets (issue 4), met by the conservative end of the 95 % interval: for slices of 2 mm or more,
MAE <= 0.1 slice (upper bound), top-1 >= 93 % and within +-1 slice >= 97 % (lower bounds); for thinner slices
MAE <= 1 mm (upper bound).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from bundles.s2cac_coronary_calcium.scripts.evaluation import bootstrap_weights, percentile_interval

from .landmarks import LANDMARK_NAMES

logger = logging.getLogger(__name__)

THICK_MM = 2.0
TARGETS = {
    "thick": {"mae_slices": ("<=", 0.1), "top1": (">=", 0.93), "within1": (">=", 0.97)},
    "thin": {"mae_mm": ("<=", 1.0)},
}
LOCALIZATION_STATS = ("mae_slices", "mae_mm", "top1", "within1")


# --- bootstrap -------------------------------------------------------------------------------------------------


def interval(estimate: float | None, samples: np.ndarray, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """{"estimate", "low", "high", "n"}: percentile interval of the finite bootstrap samples."""
    low, high, _ = percentile_interval(samples, confidence)
    est = None if estimate is None or not np.isfinite(estimate) else float(estimate)
    return {"estimate": est, "low": low, "high": high, "n": int(n)}


def ratio_with_interval(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """sum(num) / sum(den) over cases, with its case-bootstrap interval; ``num``/``den`` are per-case sums."""
    total = float(den.sum())
    est = float(num.sum()) / total if total else None
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = (weights @ num) / (weights @ den) if weights.size else np.zeros(0)
    return interval(est, samples, int(total))


# --- localization ------------------------------------------------------------------------------------------------


def landmark_rows(prediction: Mapping[str, Any], truth: Mapping[str, Any], case_id: str) -> list[dict[str, Any]]:
    """One row per landmark: truth and prediction side by side (file slice indices), errors where present."""
    thickness = truth.get("scanner", {}).get("thickness_mm") or prediction["slice_spacing_mm"]
    spacing = float(prediction["slice_spacing_mm"])
    by_name = {lm["name"]: lm for lm in truth.get("landmarks", [])}
    rows = []
    for pred in prediction["landmarks"]:
        t = by_name.get(pred["name"])
        present = bool(t is not None and t.get("in_scan", True) and t.get("slice_index") is not None)
        if present:
            true_slice = int(np.floor(float(t["slice_index"]) + 0.5))
            present = 0 <= true_slice < int(prediction["num_slices"])
        row = {
            "case_id": case_id,
            "name": pred["name"],
            "thickness_mm": float(thickness),
            "spacing_mm": spacing,
            "present": present,
            "pred_present": bool(pred["present"]),
        }
        if present:
            err = abs(int(pred["slice_index"]) - true_slice)
            row.update(true_slice=true_slice, pred_slice=int(pred["slice_index"]), error_slices=err)
            row["error_mm"] = err * spacing
        rows.append(row)
    return rows


def localization_point_stats(errors_slices: Sequence[float], errors_mm: Sequence[float]) -> dict[str, float]:
    """MAE (slices, mm), exact-slice (top-1) and within +-1 slice accuracy of a list of errors (no interval)."""
    e = np.asarray(errors_slices, dtype=float)
    if e.size == 0:
        return {k: float("nan") for k in LOCALIZATION_STATS}
    return {
        "mae_slices": float(e.mean()),
        "mae_mm": float(np.mean(errors_mm)),
        "top1": float(np.mean(e == 0)),
        "within1": float(np.mean(e <= 1)),
    }


def _per_case_sums(rows: Sequence[Mapping[str, Any]], case_ids: Sequence[str]) -> dict[str, np.ndarray]:
    index = {c: i for i, c in enumerate(case_ids)}
    sums = {k: np.zeros(len(case_ids)) for k in ("n", "abs", "mm", "top1", "within1", "n_all", "presence_ok")}
    for r in rows:
        i = index[r["case_id"]]
        sums["n_all"][i] += 1
        sums["presence_ok"][i] += r["pred_present"] == r["present"]
        if r["present"]:
            sums["n"][i] += 1
            sums["abs"][i] += r["error_slices"]
            sums["mm"][i] += r["error_mm"]
            sums["top1"][i] += r["error_slices"] == 0
            sums["within1"][i] += r["error_slices"] <= 1
    return sums


def localization_stats(rows: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The four localization metrics and presence accuracy of ``rows``, each with a case-bootstrap interval."""
    case_ids = sorted({r["case_id"] for r in rows})
    sums = _per_case_sums(rows, case_ids)
    w = bootstrap_weights(len(case_ids), n_boot, seed)
    return {
        "n_cases": len(case_ids),
        "mae_slices": ratio_with_interval(sums["abs"], sums["n"], w),
        "mae_mm": ratio_with_interval(sums["mm"], sums["n"], w),
        "top1": ratio_with_interval(sums["top1"], sums["n"], w),
        "within1": ratio_with_interval(sums["within1"], sums["n"], w),
        "presence_accuracy": ratio_with_interval(sums["presence_ok"], sums["n_all"], w),
    }


def check_targets(strata: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per target: True/False by the conservative end of the interval, None when the stratum has no landmark."""
    out: dict[str, Any] = {}
    for group, name in (("thick", f"thickness >= {THICK_MM:g} mm"), ("thin", f"thickness < {THICK_MM:g} mm")):
        stats = strata.get(name)
        for metric, (op, bound) in TARGETS[group].items():
            key = f"{group}_{metric}"
            ci = None if stats is None else stats[metric]
            if ci is None or ci["n"] == 0 or ci["low"] is None:
                out[key] = None
            elif op == "<=":
                out[key] = bool(ci["high"] <= bound)
            else:
                out[key] = bool(ci["low"] >= bound)
    return out


def summarise_localization(rows: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    strata = {"all": list(rows)}
    strata[f"thickness >= {THICK_MM:g} mm"] = [r for r in rows if r["thickness_mm"] >= THICK_MM]
    strata[f"thickness < {THICK_MM:g} mm"] = [r for r in rows if r["thickness_mm"] < THICK_MM]
    for t in sorted({r["thickness_mm"] for r in rows}):
        strata[f"{t:g} mm"] = [r for r in rows if r["thickness_mm"] == t]
    by_stratum = {k: localization_stats(v, n_boot, seed) for k, v in strata.items() if v}
    names = [n for n in LANDMARK_NAMES if any(r["name"] == n for r in rows)]
    per_landmark = {n: localization_stats([r for r in rows if r["name"] == n], n_boot, seed) for n in names}
    return {
        "n_cases": len({r["case_id"] for r in rows}),
        "by_thickness": by_stratum,
        "per_landmark": per_landmark,
        "targets": {g: {m: f"{op} {b}" for m, (op, b) in t.items()} for g, t in TARGETS.items()},
        "targets_met": check_targets(by_stratum),
    }


# --- classification ------------------------------------------------------------------------------------------------


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else float("nan")


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over classes that occur in the truth or the prediction (F1 = 2TP / (2TP + FP + FN))."""
    y, pred = np.asarray(y), np.asarray(pred)
    scores = []
    for k in range(num_classes):
        tp = np.sum((y == k) & (pred == k))
        denom = 2 * tp + np.sum((y != k) & (pred == k)) + np.sum((y == k) & (pred != k))
        if denom:
            scores.append(2 * tp / denom)
    return float(np.mean(scores)) if scores else float("nan")


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); nan without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc_ovr(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have positives and negatives."""
    aucs = [binary_auc(np.asarray(y) == k, np.asarray(prob)[:, k]) for k in range(np.asarray(prob).shape[1])]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _resampled(fn: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([fn(rng.integers(0, n, n)) for _ in range(max(n_boot, 0))], dtype=float)


def summarise_classification(
    y: Sequence[int], prob: Sequence[Sequence[float]], class_names: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    y_arr, p_arr = np.asarray(y, dtype=int), np.asarray(prob, dtype=float)
    k = len(class_names)
    pred = p_arr.argmax(axis=1)
    metrics = {
        "accuracy": lambda i: accuracy(y_arr[i], pred[i]),
        "macro_f1": lambda i: macro_f1(y_arr[i], pred[i], k),
        "auc_ovr": lambda i: macro_auc_ovr(y_arr[i], p_arr[i]),
    }
    n = len(y_arr)
    every = np.arange(n)
    out: dict[str, Any] = {"n_cases": n, "class_names": list(class_names)}
    for name, fn in metrics.items():
        out[name] = interval(fn(every), _resampled(fn, n, n_boot, seed), n)
    out["confusion"] = [[int(np.sum((y_arr == a) & (pred == b))) for b in range(k)] for a in range(k)]
    return out


# --- reports -------------------------------------------------------------------------------------------------------


def _fmt(ci: Mapping[str, Any] | None, pct: bool = False) -> str:
    if ci is None or ci["estimate"] is None:
        return "n/a"
    s = 100.0 if pct else 1.0
    unit = " %" if pct else ""
    if ci["low"] is None:
        return f"{s * ci['estimate']:.2f}{unit}"
    return f"{s * ci['estimate']:.2f}{unit} [{s * ci['low']:.2f}, {s * ci['high']:.2f}]"


def localization_markdown(summary: Mapping[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Cases: {summary['n_cases']}. Values: estimate [95 % bootstrap interval over cases].",
        "",
    ]
    head = "| {} | landmarks | MAE (slices) | MAE (mm) | top-1 | within +-1 | presence accuracy |"
    rule = "| --- | --- | --- | --- | --- | --- | --- |"
    for section, key, label in (
        ("By slice thickness", "by_thickness", "stratum"),
        ("Per landmark", "per_landmark", "landmark"),
    ):
        lines += [f"## {section}", "", head.format(label), rule]
        for name, s in summary[key].items():
            lines.append(
                f"| {name} | {s['mae_slices']['n']} | {_fmt(s['mae_slices'])} | {_fmt(s['mae_mm'])} | "
                f"{_fmt(s['top1'], True)} | {_fmt(s['within1'], True)} | {_fmt(s['presence_accuracy'], True)} |"
            )
        lines.append("")
    lines += ["## Release targets (conservative end of the interval)", "", "| target | met |", "| --- | --- |"]
    for key, met in summary["targets_met"].items():
        group, metric = key.split("_", 1)
        op, bound = TARGETS[group][metric]
        lines.append(
            f"| {group} slices: {metric} {op} {bound} | {'n/a' if met is None else ('yes' if met else 'no')} |"
        )
    return "\n".join(lines) + "\n"


def classification_markdown(summary: Mapping[str, Any], title: str) -> str:
    names = summary["class_names"]
    lines = [
        f"# {title}",
        "",
        f"Cases: {summary['n_cases']}. Values: estimate [95 % bootstrap interval over cases].",
        "",
        "| accuracy | macro F1 | one-vs-rest AUC (macro) |",
        "| --- | --- | --- |",
        f"| {_fmt(summary['accuracy'], True)} | {_fmt(summary['macro_f1'])} | {_fmt(summary['auc_ovr'])} |",
        "",
        "Confusion (rows truth, columns prediction):",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- " * (len(names) + 1) + "|",
    ]
    lines += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(summary["confusion"])]
    return "\n".join(lines) + "\n"


def _write(out_dir: str | os.PathLike, payload: dict, markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(payload, indent=1))
    (out / "evaluation.md").write_text(markdown)
    logger.info("\n%s", markdown)


def prediction_path(pred_dir: str | os.PathLike, case_id: str) -> Path:
    return Path(pred_dir) / f"{case_id}.json"


def evaluate_localization(
    cases: Sequence[Mapping[str, Any]],
    pred_dir: str,
    out_dir: str,
    n_boot: int = 1000,
    seed: int = 0,
    title: str = "DST landmark localization",
) -> dict[str, Any]:
    """Score the prediction JSONs in ``pred_dir`` (one per ``case_id``) against each case's ``truth`` JSON;
    write evaluation.json / evaluation.md to ``out_dir`` and return the summary."""
    rows = []
    for case in cases:
        prediction = json.loads(prediction_path(pred_dir, case["case_id"]).read_text())
        truth = json.loads(Path(case["truth"]).read_text())
        rows += landmark_rows(prediction, truth, case["case_id"])
    summary = summarise_localization(rows, n_boot, seed)
    _write(out_dir, {"summary": summary, "rows": rows}, localization_markdown(summary, title))
    return summary


def evaluate_classification(
    cases: Sequence[Mapping[str, Any]],
    pred_dir: str,
    out_dir: str,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    title: str = "DST classification",
) -> dict[str, Any]:
    """Score the prediction JSONs (``probabilities``) against each case's ``label`` (index or class name)."""
    y, prob, rows = [], [], []
    for case in cases:
        prediction = json.loads(prediction_path(pred_dir, case["case_id"]).read_text())
        label = case["label"]
        label = class_names.index(label) if isinstance(label, str) and not label.isdigit() else int(label)
        y.append(label)
        prob.append(prediction["probabilities"])
        rows.append({"case_id": case["case_id"], "label": class_names[label], "pred": prediction["class"]})
    summary = summarise_classification(y, prob, class_names, n_boot, seed)
    _write(out_dir, {"summary": summary, "rows": rows}, classification_markdown(summary, title))
    return summary


def evaluate(
    task: str,
    cases: Sequence[Mapping[str, Any]],
    pred_dir: str,
    out_dir: str,
    class_names: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
    title: str | None = None,
) -> dict[str, Any]:
    """The report of ``task``: :func:`evaluate_localization` or :func:`evaluate_classification`."""
    if task == "classification":
        return evaluate_classification(
            cases, pred_dir, out_dir, list(class_names), n_boot, seed, title or "DST classification"
        )
    return evaluate_localization(cases, pred_dir, out_dir, n_boot, seed, title or "DST landmark localization")
