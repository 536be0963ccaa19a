"""Evaluation of S2CAC predictions: Agatston agreement, risk categories, Dice, lesion detection, vessel assignment.

Scores come from :func:`.scoring.score_calcium` only (DESIGN.md, "Scoring definitions"). Arrays are indexed
``[k, j, i]`` (slice, row, column), images in HU, label maps 0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA.

Per case (:func:`evaluate_case`):

- Reference scores are Agatston, volume and mass of the image on the TRUE label map ("reference Agatston on the
  true mask"); predicted scores the same on the predicted map. Comparing the two isolates the segmentation error
  from Agatston's own threshold and partial-volume bias (that bias is measured against the phantom truth, not
  here).
- Dice per vessel on the label masks (``true == v`` vs ``pred == v``); None when both are empty.
- Lesion detection (orCaScore): a lesion is a 3D 6-connected component of calcium voxels (HU >= 130 inside any
  nonzero label; components join across vessel labels). A reference lesion is detected when any of its voxels is
  predicted calcium; a predicted lesion is a false positive when none of its voxels is reference calcium.
  Counts: ``tp_ref`` of ``n_ref`` reference lesions, ``tp_pred`` of ``n_pred`` predicted lesions.
- Vessel assignment: for each detected reference lesion, the majority predicted label over the voxels where it
  overlaps predicted calcium is compared with its reference label (the majority true label over the lesion;
  ties go to the lower label value). Counts ``correct`` of ``assessed``.
- Lesion density and size: a reference lesion takes the ``density_mg_ha_cm3`` of the truth lesion whose centre
  (``centre_index_ijk`` = (i, j, k), looked up at ``[k, j, i]``) lies in it, else of the nearest truth lesion
  with the same label within ``MAX_TRUTH_MATCH_MM``; its size is its voxel count.
- Strata: slice thickness (``truth["scanner"]["thickness_mm"]``), patient size (``truth["patient_size"]``) and
  calcium-free (reference total Agatston == 0).

Over cases (:func:`summarise`): ICC(2,1) of total Agatston (and of log(1 + Agatston)), linearly weighted Cohen's
kappa and accuracy of the five risk categories, mean Dice per vessel, pooled lesion sensitivity / PPV / F1, vessel
assignment accuracy and the false-positive rate on calcium-free cases, each with a case-bootstrap percentile 95 %
interval; the same per slice thickness and patient size; lesion sensitivity per density band and lesion size.
Every statistic is a function of per-case sums, so a bootstrap resample is a vector of case counts (multinomial)
and all resamples are computed at once as matrix products.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .scoring import (
    CALCIUM_THRESHOLD_HU,
    DEFAULT_LABEL_NAMES,
    RISK_CATEGORIES,
    bounding_box,
    load_nifti_pair,
    score_calcium,
)

logger = logging.getLogger(__name__)

# Release gates: the lower bound of the bootstrap 95 % interval must reach these.
TARGETS: dict[str, tuple[str, float]] = {
    "agatston_icc": ("agatston_icc", 0.99),
    "risk_weighted_kappa": ("risk_kappa_linear", 0.95),
    "vessel_assignment": ("vessel_assignment_accuracy", 0.95),
}
DENSITY_BANDS = ("<200", "200-400", ">=400", "unknown")  # mg HA/cm^3 of the matched truth lesion
DENSITY_EDGES = (200.0, 400.0)
SIZE_BANDS = ("<=3 voxels", ">3 voxels")
SMALL_LESION_VOXELS = 3
MAX_TRUTH_MATCH_MM = 5.0  # a reference lesion takes a truth lesion's density when its centre is this close
MIN_STRATUM_CASES = 5  # strata with fewer cases get a point estimate and n, no interval
CONFIDENCE = 0.95
_STRUCTURE_6 = ndimage.generate_binary_structure(3, 1)

OVERALL_METRICS = (
    "agatston_icc",
    "log_agatston_icc",
    "risk_kappa_linear",
    "risk_accuracy",
    "lesion_sensitivity",
    "lesion_ppv",
    "lesion_f1",
    "vessel_assignment_accuracy",
    "fp_rate_calcium_free",
)
METRIC_TITLES = {
    "agatston_icc": "Agatston ICC(2,1)",
    "log_agatston_icc": "log(1 + Agatston) ICC(2,1)",
    "risk_kappa_linear": "Risk category kappa (linear weights)",
    "risk_accuracy": "Risk category accuracy",
    "lesion_sensitivity": "Lesion sensitivity",
    "lesion_ppv": "Lesion PPV",
    "lesion_f1": "Lesion F1",
    "vessel_assignment_accuracy": "Vessel assignment accuracy",
    "fp_rate_calcium_free": "False-positive rate, calcium-free cases",
}


# --- statistics -------------------------------------------------------------------------------------------------


def icc_2_1(ratings: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """ICC(2,1): two-way random effects, absolute agreement, single measure (Shrout & Fleiss 1979; ICC(A,1) of
    McGraw & Wong 1996), from the two-way ANOVA mean squares:

        ICC = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)

    with MSR (rows = targets, n - 1 df), MSC (columns = raters, k - 1 df) and MSE ((n - 1)(k - 1) df).

    Args:
        ratings: (n targets, k raters).
        weights: optional (B, n) case counts (bootstrap resamples: row b repeats target i ``weights[b, i]`` times;
            each row must sum to the resample size). None gives the plain estimate as a float.

    Returns NaN where undefined (fewer than 2 targets, or no variance at all).
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (n targets, k >= 2 raters), got shape {x.shape}")
    single = weights is None
    w = np.ones((1, x.shape[0])) if single else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    k = x.shape[1]
    n = w.sum(axis=1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = x.mean(axis=1)  # row means (n,)
        g = (w @ m) / n  # grand mean (B,)
        ssr = k * np.einsum("bi,bi->b", w, (m[None, :] - g[:, None]) ** 2)
        r = x - m[:, None]  # row-centred ratings; column effects are their weighted means
        col = (w @ r) / n[:, None]  # (B, k): column mean - grand mean
        ssc = n * np.sum(col**2, axis=1)
        sse = np.einsum("bi,bij->b", w, (r[None, :, :] - col[:, None, :]) ** 2)
        msr = ssr / (n - 1)
        msc = ssc / (k - 1)
        mse = sse / ((n - 1) * (k - 1))
        denom = msr + (k - 1) * mse + k * (msc - mse) / n
        icc = (msr - mse) / denom
    scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1.0)
    total_ss = ssr + ssc + sse
    undefined = (n < 2) | ~(denom > 0) | (total_ss <= n * k * (1e-12 * scale) ** 2)
    icc = np.where(undefined, np.nan, icc)
    return float(icc[0]) if single else icc


def weighted_kappa(
    a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, n_categories: int, weights: np.ndarray | None = None
) -> np.ndarray | float:
    """Linearly weighted Cohen's kappa of two ratings on ordinal codes 0..n_categories-1.

    kappa = 1 - sum(v * O) / sum(v * E), v_pq = |p - q| / (K - 1), O the observed table, E the table expected from
    the margins. ``weights`` (B, n) gives resampled case counts as in :func:`icc_2_1`. NaN where undefined
    (no expected disagreement: both raters use one and the same category only).
    """
    codes = _confusion_codes(a, b, n_categories)
    return _kappa_from_tables(_tables(codes, n_categories, weights), weights is None)


def _confusion_codes(a, b, n_categories: int) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.intp), np.asarray(b, dtype=np.intp)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"ratings must be two 1D sequences of the same length, got {a.shape} and {b.shape}")
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n_categories):
        raise ValueError(f"category codes must be in 0..{n_categories - 1}")
    return a * n_categories + b


def _tables(codes: np.ndarray, n_categories: int, weights: np.ndarray | None) -> np.ndarray:
    """(B, K, K) contingency tables (rows: first rating) of the resamples given by ``weights`` (B, n)."""
    onehot = np.zeros((codes.size, n_categories * n_categories))
    onehot[np.arange(codes.size), codes] = 1.0
    w = np.ones((1, codes.size)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return (w @ onehot).reshape(-1, n_categories, n_categories)


def _kappa_from_tables(tables: np.ndarray, single: bool) -> np.ndarray | float:
    n_cat = tables.shape[1]
    p, q = np.meshgrid(np.arange(n_cat), np.arange(n_cat), indexing="ij")
    v = np.abs(p - q) / (n_cat - 1)
    total = tables.sum(axis=(1, 2))
    expected = tables.sum(axis=2)[:, :, None] * tables.sum(axis=1)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        observed_d = np.einsum("pq,bpq->b", v, tables) / total
        expected_d = np.einsum("pq,bpq->b", v, expected) / total**2
        kappa = np.where(expected_d > 1e-12, 1.0 - observed_d / expected_d, np.nan)
    return float(kappa[0]) if single else kappa


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float | None, float | None, int]:
    """Percentile interval of bootstrap replicates, skipping NaN (undefined) ones: (low, high, n valid)."""
    valid = np.asarray(values, dtype=np.float64)
    valid = valid[np.isfinite(valid)]
    if valid.size == 0:
        return None, None, 0
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(valid, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high), int(valid.size)


def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) case counts of ``n_boot`` resamples with replacement of ``n`` cases (reproducible by seed)."""
    if n_boot <= 0 or n == 0:
        return np.zeros((0, n))
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


# --- per case ---------------------------------------------------------------------------------------------------


def _density_band(density: float | None) -> str:
    if density is None:
        return "unknown"
    if density < DENSITY_EDGES[0]:
        return DENSITY_BANDS[0]
    if density < DENSITY_EDGES[1]:
        return DENSITY_BANDS[1]
    return DENSITY_BANDS[2]


def _majority(component: np.ndarray, label: np.ndarray, n_comp: int, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Per component 1..n_comp: (majority label, voxel count) over the given voxels; ties go to the lower label."""
    counts = np.bincount(component * n_keys + label, minlength=(n_comp + 1) * n_keys).reshape(n_comp + 1, n_keys)
    return counts.argmax(axis=1)[1:], counts.sum(axis=1)[1:]


def _match_truth(
    truth_lesions: Sequence[Mapping[str, Any]],
    ref_cc: np.ndarray,
    ref_vox: np.ndarray,
    ref_label: np.ndarray,
    offset: np.ndarray,
    spacing_kji: np.ndarray,
    n_ref: int,
) -> list[int | None]:
    """Index (in ``truth_lesions``) of the truth lesion matched to each reference lesion, or None.

    A truth lesion whose centre voxel (rounded) lies in the reference lesion wins (the nearest such); else the
    nearest truth lesion of the same label whose centre is within ``MAX_TRUTH_MATCH_MM`` of one of its voxels.

    ``ref_vox`` (m, 3) are the [k, j, i] indices (in the cropped box; ``offset`` is the box origin) of the reference
    calcium voxels and ``ref_cc`` their component ids (1..n_ref).
    """
    match: list[int | None] = [None] * n_ref
    usable = [
        t
        for t, lesion in enumerate(truth_lesions)
        if lesion.get("centre_index_ijk") is not None and lesion.get("density_mg_ha_cm3") is not None
    ]
    if not usable or n_ref == 0:
        return match
    centres = np.array([truth_lesions[t]["centre_index_ijk"] for t in usable], dtype=np.float64)[:, ::-1]  # [k,j,i]
    labels = np.array([int(truth_lesions[t].get("label", -1)) for t in usable])
    # Distance (mm) from each truth centre to the nearest voxel of each reference lesion: (n_truth, n_ref).
    d_vox = np.linalg.norm(((ref_vox + offset)[None, :, :] - centres[:, None, :]) * spacing_kji, axis=2)
    nearest = np.full((len(usable), n_ref + 1), np.inf)
    for t in range(len(usable)):  # few truth lesions per case
        np.minimum.at(nearest[t], ref_cc, d_vox[t])
    nearest = nearest[:, 1:]
    # Centre inside a lesion: its rounded voxel is one of the lesion's voxels.
    lookup = {tuple(v): c for v, c in zip((ref_vox + offset).tolist(), ref_cc.tolist(), strict=True)}
    inside = [lookup.get(tuple(np.rint(c).astype(int).tolist())) for c in centres]
    for lesion in range(n_ref):
        hits = [t for t, c in enumerate(inside) if c == lesion + 1]
        if hits:
            match[lesion] = usable[min(hits, key=lambda t: nearest[t, lesion])]
            continue
        same = np.flatnonzero(labels == ref_label[lesion])
        if same.size:
            best = same[np.argmin(nearest[same, lesion])]
            if nearest[best, lesion] <= MAX_TRUTH_MATCH_MM:
                match[lesion] = usable[int(best)]
    return match


def _scores(score, names: Mapping[int, str]) -> dict[str, Any]:
    d = score.as_dict()
    keep = ("agatston", "volume_mm3", "mass_mg", "lesions_2d_agatston", "lesions_3d")
    return {
        "total": {k: d["total"][k] for k in keep},
        "per_vessel": {name: {k: d["per_label"][name][k] for k in keep} for name in names.values()},
        "risk_category": d["risk_category"],
    }


def evaluate_case(
    image_kji: np.ndarray,
    true_kji: np.ndarray,
    pred_kji: np.ndarray,
    spacing: Sequence[float],
    truth: Mapping[str, Any] | None = None,
    label_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Evaluate one case (see the module docstring for the definitions). Returns a JSON-friendly dict.

    Args:
        image_kji: HU image [k, j, i].
        true_kji, pred_kji: reference and predicted label maps of the same shape (values in ``label_names``).
        spacing: (row_mm, col_mm, increment_mm), as for :func:`.scoring.score_calcium`.
        truth: the phantom's ``truth.json`` (lesion densities and strata), or None.
        label_names: {value: vessel}; default 1 LM, 2 LAD, 3 LCX, 4 RCA.
    """
    names = dict(DEFAULT_LABEL_NAMES if label_names is None else label_names)
    image, true, pred = np.asarray(image_kji), np.asarray(true_kji), np.asarray(pred_kji)
    if not (image.shape == true.shape == pred.shape):
        raise ValueError(f"image, true and predicted shapes differ: {image.shape}, {true.shape}, {pred.shape}")
    ref_score = score_calcium(image, true, spacing, label_names=names)  # validates labels and spacing
    pred_score = score_calcium(image, pred, spacing, label_names=names)
    row_mm, col_mm, inc_mm = (float(v) for v in spacing)
    spacing_kji = np.array([inc_mm, row_mm, col_mm])
    n_keys = max(names) + 1

    n_ref = n_pred = tp_ref = tp_pred = 0
    dice: dict[str, float | None] = {name: None for name in names.values()}
    lesions: list[dict[str, Any]] = []
    box = bounding_box((true != 0) | (pred != 0))
    if box is not None:
        img, t_lab, p_lab = image[box], true[box].astype(np.intp), pred[box].astype(np.intp)
        conf = np.bincount((t_lab * n_keys + p_lab).ravel(), minlength=n_keys * n_keys).reshape(n_keys, n_keys)
        for value, name in names.items():
            den = conf[value, :].sum() + conf[:, value].sum()
            dice[name] = float(2.0 * conf[value, value] / den) if den > 0 else None

        is_hu = img >= CALCIUM_THRESHOLD_HU
        ref_cal, pred_cal = is_hu & (t_lab != 0), is_hu & (p_lab != 0)
        ref_cc, n_ref = ndimage.label(ref_cal, structure=_STRUCTURE_6)
        pred_cc, n_pred = ndimage.label(pred_cal, structure=_STRUCTURE_6)
        detected = np.bincount(ref_cc[pred_cal], minlength=n_ref + 1)[1:] > 0
        pred_hit = np.bincount(pred_cc[ref_cal], minlength=n_pred + 1)[1:] > 0
        tp_ref, tp_pred = int(detected.sum()), int(pred_hit.sum())

        ref_vox = np.argwhere(ref_cal)  # C order, the order of ref_cc[ref_cal]
        ref_ids = ref_cc[ref_cal]
        ref_label, size = _majority(ref_ids, t_lab[ref_cal], n_ref, n_keys)
        both = ref_cal & pred_cal
        pred_label, overlap = _majority(ref_cc[both], p_lab[both], n_ref, n_keys)
        offset = np.array([s.start for s in box])
        truth_lesions = list(truth.get("lesions", [])) if truth else []
        match = _match_truth(truth_lesions, ref_ids, ref_vox, ref_label, offset, spacing_kji, n_ref)
        for c in range(n_ref):
            t = match[c]
            density = float(truth_lesions[t]["density_mg_ha_cm3"]) if t is not None else None
            lesions.append(
                {
                    "label": int(ref_label[c]),
                    "vessel": names.get(int(ref_label[c])),
                    "voxels": int(size[c]),
                    "detected": bool(detected[c]),
                    "predicted_label": int(pred_label[c]) if overlap[c] > 0 else None,
                    "vessel_correct": bool(pred_label[c] == ref_label[c]) if overlap[c] > 0 else None,
                    "truth_index": t,
                    "density_mg_ha_cm3": density,
                }
            )

    assignment = {name: [0, 0] for name in names.values()}  # [correct, assessed] per reference vessel
    by_density = {band: [0, 0] for band in DENSITY_BANDS}  # [detected, total]
    by_size = {band: [0, 0] for band in SIZE_BANDS}
    for lesion in lesions:
        if lesion["vessel_correct"] is not None:
            assignment[lesion["vessel"]][0] += int(lesion["vessel_correct"])
            assignment[lesion["vessel"]][1] += 1
        for table, band in (
            (by_density, _density_band(lesion["density_mg_ha_cm3"])),
            (by_size, SIZE_BANDS[0] if lesion["voxels"] <= SMALL_LESION_VOXELS else SIZE_BANDS[1]),
        ):
            table[band][0] += int(lesion["detected"])
            table[band][1] += 1

    scanner = (truth or {}).get("scanner") or {}
    thickness = scanner.get("thickness_mm")
    reference, predicted = _scores(ref_score, names), _scores(pred_score, names)
    row: dict[str, Any] = {
        "reference": reference,
        "predicted": predicted,
        "dice": dice,
        "detection": {
            "n_ref": int(n_ref),
            "tp_ref": int(tp_ref),
            "n_pred": int(n_pred),
            "tp_pred": int(tp_pred),
            "assignment_correct": sum(v[0] for v in assignment.values()),
            "assignment_assessed": sum(v[1] for v in assignment.values()),
            "assignment_by_vessel": assignment,
            "by_density": by_density,
            "by_size": by_size,
        },
        "lesions": lesions,
        "strata": {
            "thickness_mm": None if thickness is None else float(thickness),
            "patient_size": (truth or {}).get("patient_size"),
            "calcium_free": reference["total"]["agatston"] == 0,
        },
    }
    if truth:
        truth_lesions = list(truth.get("lesions", []))
        row["truth"] = {
            "calcium_free": truth.get("calcium_free"),
            "n_lesions": len(truth_lesions),
            "volume_mm3": float(sum(t.get("volume_mm3", 0.0) for t in truth_lesions)),
            "mass_mg": float(sum(t.get("mass_mg", 0.0) for t in truth_lesions)),
        }
    return row


# --- over cases -------------------------------------------------------------------------------------------------


def _case_arrays(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-case vectors that every statistic is computed from."""
    vessels = list(cases[0]["dice"]) if cases else []
    code = {c: i for i, c in enumerate(RISK_CATEGORIES)}
    det = [c["detection"] for c in cases]

    def col(values) -> np.ndarray:
        return np.asarray(list(values), dtype=np.float64)

    arrays: dict[str, Any] = {
        "vessels": vessels,
        "ref_agatston": col(c["reference"]["total"]["agatston"] for c in cases),
        "pred_agatston": col(c["predicted"]["total"]["agatston"] for c in cases),
        "ref_risk": np.array([code[c["reference"]["risk_category"]] for c in cases], dtype=np.intp),
        "pred_risk": np.array([code[c["predicted"]["risk_category"]] for c in cases], dtype=np.intp),
        "n_ref": col(d["n_ref"] for d in det),
        "tp_ref": col(d["tp_ref"] for d in det),
        "n_pred": col(d["n_pred"] for d in det),
        "tp_pred": col(d["tp_pred"] for d in det),
        "correct": col(d["assignment_correct"] for d in det),
        "assessed": col(d["assignment_assessed"] for d in det),
    }
    arrays["free"] = (arrays["ref_agatston"] == 0).astype(np.float64)
    arrays["free_fp"] = arrays["free"] * (arrays["pred_agatston"] > 0)
    for v in vessels:
        d = [c["dice"][v] for c in cases]
        arrays[f"dice_def_{v}"] = col(x is not None for x in d)
        arrays[f"dice_{v}"] = col(0.0 if x is None else x for x in d)
        arrays[f"assign_correct_{v}"] = col(x["assignment_by_vessel"][v][0] for x in det)
        arrays[f"assign_assessed_{v}"] = col(x["assignment_by_vessel"][v][1] for x in det)
    for kind, bands in (("by_density", DENSITY_BANDS), ("by_size", SIZE_BANDS)):
        for band in bands:
            arrays[f"{kind}_tp_{band}"] = col(x[kind][band][0] for x in det)
            arrays[f"{kind}_n_{band}"] = col(x[kind][band][1] for x in det)
    return arrays


def _statistics(a: Mapping[str, Any], w: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every statistic for the resamples ``w`` (B, n): name -> (values (B,), contributing cases (B,), counts)."""
    n_cases = w.sum(axis=1)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    totals = np.stack([a["ref_agatston"], a["pred_agatston"]], axis=1)
    out["agatston_icc"] = (icc_2_1(totals, w), n_cases, None)
    out["log_agatston_icc"] = (icc_2_1(np.log1p(totals), w), n_cases, None)
    tables = _tables(a["ref_risk"] * len(RISK_CATEGORIES) + a["pred_risk"], len(RISK_CATEGORIES), w)
    out["risk_kappa_linear"] = (_kappa_from_tables(tables, single=False), n_cases, None)
    agree = w @ (a["ref_risk"] == a["pred_risk"]).astype(np.float64)
    out["risk_accuracy"] = (_ratio(agree, n_cases), n_cases, np.stack([agree, n_cases], axis=1))

    def ratio(num_key: str, den_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        num, den = w @ a[num_key], w @ a[den_key]
        return _ratio(num, den), w @ (a[den_key] > 0), np.stack([num, den], axis=1)

    out["lesion_sensitivity"] = ratio("tp_ref", "n_ref")
    out["lesion_ppv"] = ratio("tp_pred", "n_pred")
    sens, ppv = out["lesion_sensitivity"][0], out["lesion_ppv"][0]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(sens + ppv > 0, 2 * sens * ppv / np.where(sens + ppv > 0, sens + ppv, 1.0), 0.0)
    f1 = np.where(np.isfinite(sens) & np.isfinite(ppv), f1, np.nan)
    out["lesion_f1"] = (f1, w @ ((a["n_ref"] > 0) | (a["n_pred"] > 0)), None)
    out["vessel_assignment_accuracy"] = ratio("correct", "assessed")
    out["fp_rate_calcium_free"] = ratio("free_fp", "free")
    for v in a["vessels"]:
        out[f"dice/{v}"] = ratio(f"dice_{v}", f"dice_def_{v}")
        out[f"assignment/{v}"] = ratio(f"assign_correct_{v}", f"assign_assessed_{v}")
    for kind, bands in (("by_density", DENSITY_BANDS), ("by_size", SIZE_BANDS)):
        for band in bands:
            out[f"{kind}/{band}"] = ratio(f"{kind}_tp_{band}", f"{kind}_n_{band}")
    return out


def _clean(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars to Python, NaN / inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _block(cases: Sequence[Mapping[str, Any]], n_boot: int, seed: int, with_interval: bool) -> dict[str, Any]:
    """All statistics of a set of cases: estimate, bootstrap interval, contributing cases, counts."""
    a = _case_arrays(cases)
    n = len(cases)
    point = _statistics(a, np.ones((1, n)))
    boot = _statistics(a, bootstrap_weights(n, n_boot, seed)) if with_interval and n_boot > 0 else None
    stats: dict[str, dict[str, Any]] = {}
    for name, (values, contributing, counts) in point.items():
        entry: dict[str, Any] = {"estimate": float(values[0]), "low": None, "high": None, "n": int(contributing[0])}
        if counts is not None:
            entry["count"] = [int(round(counts[0, 0])), int(round(counts[0, 1]))]
        if boot is not None:
            low, high, n_valid = percentile_interval(boot[name][0])
            entry.update(low=low, high=high, n_boot=n_valid)
        stats[name] = entry

    def group(prefix: str) -> dict[str, Any]:
        return {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(prefix + "/")}

    return _clean(
        {
            "n_cases": n,
            "n_calcium_free": int(a["free"].sum()) if n else 0,
            "n_ref_lesions": int(a["n_ref"].sum()) if n else 0,
            "n_pred_lesions": int(a["n_pred"].sum()) if n else 0,
            "metrics": {name: stats[name] for name in OVERALL_METRICS},
            "dice": group("dice"),
            "vessel_assignment_by_vessel": group("assignment"),
            "lesion_sensitivity_by_density": group("by_density"),
            "lesion_sensitivity_by_size": group("by_size"),
        }
    )


def _stratum_key(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def summarise(
    cases: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0, min_stratum_cases: int = MIN_STRATUM_CASES
) -> dict[str, Any]:
    """Summary statistics with case-bootstrap percentile 95 % intervals (see the module docstring).

    Each statistic is ``{"estimate", "low", "high", "n", "n_boot"[, "count"]}``: ``n`` the cases it is computed
    on (e.g. cases with reference lesions for sensitivity, calcium-free cases for the FP rate), ``n_boot`` the
    resamples where it was defined (others are skipped), ``count`` [numerator, denominator] for pooled ratios.
    Strata (``by_thickness_mm``, ``by_patient_size``) with fewer than ``min_stratum_cases`` cases get no interval.
    Undefined values are None (no NaN).
    """
    if not cases:
        raise ValueError("no cases to summarise")
    overall = _block(cases, n_boot, seed, with_interval=True)
    codes = _confusion_codes(
        [RISK_CATEGORIES.index(c["reference"]["risk_category"]) for c in cases],
        [RISK_CATEGORIES.index(c["predicted"]["risk_category"]) for c in cases],
        len(RISK_CATEGORIES),
    )
    summary: dict[str, Any] = {
        "n_cases": overall["n_cases"],
        "n_calcium_free": overall["n_calcium_free"],
        "n_ref_lesions": overall["n_ref_lesions"],
        "n_pred_lesions": overall["n_pred_lesions"],
        "n_boot": int(n_boot),
        "seed": int(seed),
        "confidence": CONFIDENCE,
        "overall": overall["metrics"],
        "dice": overall["dice"],
        "vessel_assignment_by_vessel": overall["vessel_assignment_by_vessel"],
        "lesion_sensitivity_by_density": overall["lesion_sensitivity_by_density"],
        "lesion_sensitivity_by_size": overall["lesion_sensitivity_by_size"],
        "risk_confusion": {
            "categories": list(RISK_CATEGORIES),
            "rows": "reference",
            "columns": "predicted",
            "table": _tables(codes, len(RISK_CATEGORIES), None)[0].astype(int).tolist(),
        },
    }
    for key, field in (("by_thickness_mm", "thickness_mm"), ("by_patient_size", "patient_size")):
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for case in cases:
            groups.setdefault(_stratum_key(case["strata"].get(field)), []).append(case)
        strata = {}
        for name in sorted(groups, key=_sort_key):
            members = groups[name]
            block = _block(members, n_boot, seed, with_interval=len(members) >= min_stratum_cases)
            block["interval"] = len(members) >= min_stratum_cases
            strata[name] = block
        summary[key] = strata
    summary["targets_met"] = targets_met(summary)
    return summary


def _sort_key(name: str) -> tuple[int, float, str]:
    order = {"small": 0, "medium": 1, "large": 2}
    try:
        return (0, float(name), name)
    except ValueError:
        return (1 if name != "unknown" else 3, float(order.get(name, 9)), name)


def targets_met(summary: Mapping[str, Any]) -> dict[str, bool]:
    """Release gates: the lower 95 % bound of each gated statistic reaches its threshold (False when undefined)."""
    out = {}
    for gate, (metric, threshold) in TARGETS.items():
        low = summary["overall"].get(metric, {}).get("low")
        out[gate] = low is not None and low >= threshold
    return out


# --- report -----------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _digits(metric: str) -> int:
    return 4 if "icc" in metric else 3


def _interval(stat: Mapping[str, Any], digits: int = 3) -> str:
    if stat.get("low") is None:
        return "-"
    return f"[{_fmt(stat['low'], digits)}, {_fmt(stat['high'], digits)}]"


def _stat_row(label: str, stat: Mapping[str, Any], digits: int = 3) -> str:
    count = stat.get("count")
    extra = f" ({count[0]}/{count[1]})" if count else ""
    return f"| {label} | {_fmt(stat['estimate'], digits)}{extra} | {_interval(stat, digits)} | {stat['n']} |"


def to_markdown(summary: Mapping[str, Any], title: str = "S2CAC evaluation") -> str:
    """A readable Markdown report of :func:`summarise`'s result."""
    pct = int(round(100 * summary.get("confidence", CONFIDENCE)))
    lines = [
        f"# {title}",
        "",
        f"{summary['n_cases']} cases ({summary['n_calcium_free']} calcium-free), "
        f"{summary['n_ref_lesions']} reference lesions, {summary['n_pred_lesions']} predicted lesions. "
        f"Reference: scores on the true mask. Intervals: case bootstrap, {summary['n_boot']} resamples, "
        f"seed {summary['seed']}, {pct} % percentile. Lesions: 3D 6-connected calcium components (orCaScore).",
        "",
        "## Overall",
        "",
        f"| Metric | Estimate | {pct} % CI | n |",
        "|---|---|---|---|",
    ]
    for metric in OVERALL_METRICS:
        lines.append(_stat_row(METRIC_TITLES[metric], summary["overall"][metric], _digits(metric)))

    lines += ["", "## Per vessel", "", f"| Vessel | Dice | {pct} % CI | n | Assignment | {pct} % CI | n |"]
    lines.append("|---|---|---|---|---|---|---|")
    for vessel, d in summary["dice"].items():
        a = summary["vessel_assignment_by_vessel"].get(vessel, {"estimate": None, "n": 0})
        count = a.get("count")
        extra = f" ({count[0]}/{count[1]})" if count else ""
        lines.append(
            f"| {vessel} | {_fmt(d['estimate'])} | {_interval(d)} | {d['n']} | "
            f"{_fmt(a['estimate'])}{extra} | {_interval(a)} | {a['n']} |"
        )

    for key, label in (
        ("lesion_sensitivity_by_density", "Density (mg HA/cm^3)"),
        ("lesion_sensitivity_by_size", "Size"),
    ):
        lines += ["", f"## Lesion sensitivity by {label.split(' ')[0].lower()}", ""]
        lines += [f"| {label} | Sensitivity | {pct} % CI | cases |", "|---|---|---|---|"]
        for band, stat in summary[key].items():
            if stat["count"][1] > 0:
                lines.append(_stat_row(band, stat))

    columns = ("agatston_icc", "risk_kappa_linear", "lesion_sensitivity", "lesion_ppv", "vessel_assignment_accuracy")
    columns += ("fp_rate_calcium_free",)
    for key, label in (("by_thickness_mm", "Slice thickness (mm)"), ("by_patient_size", "Patient size")):
        lines += ["", f"## By {label.split(' (')[0].lower()}", ""]
        lines.append(f"| {label} | cases | " + " | ".join(METRIC_TITLES[m] for m in columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for name, block in summary[key].items():
            cells = []
            for m in columns:
                stat = block["metrics"][m]
                cell = _fmt(stat["estimate"], _digits(m))
                if stat.get("low") is not None:
                    cell += f" {_interval(stat, _digits(m))}"
                cells.append(cell)
            lines.append(f"| {name} | {block['n_cases']} | " + " | ".join(cells) + " |")

    lines += ["", "## Release targets", "", f"| Target | Threshold (lower {pct} % bound) | Lower bound | Met |"]
    lines.append("|---|---|---|---|")
    met = targets_met(summary)
    for gate, (metric, threshold) in TARGETS.items():
        low = summary["overall"][metric].get("low")
        lines.append(
            f"| {METRIC_TITLES[metric]} | >= {threshold:g} | {_fmt(low, _digits(metric))} | "
            f"{'yes' if met[gate] else 'no'} |"
        )
    table = summary["risk_confusion"]
    lines += ["", "## Risk categories (rows reference, columns predicted)", ""]
    lines.append("| | " + " | ".join(table["categories"]) + " |")
    lines.append("|---|" + "---|" * len(table["categories"]))
    for cat, row in zip(table["categories"], table["table"], strict=True):
        lines.append(f"| {cat} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# --- folders ----------------------------------------------------------------------------------------------------


def find_predictions(
    cases: Sequence[Mapping[str, Any]],
    pred_dir: str | os.PathLike,
    postfix: str = "_seg",
    data_root_dir: str | os.PathLike | None = None,
    ext: str = ".nii.gz",
    must_exist: bool = True,
) -> list[dict[str, Any]]:
    """Copies of ``cases`` with ``"pred"`` set to the label map that the bundle's inference wrote for ``"image"``.

    Mirrors MONAI ``SaveImaged(output_dir=pred_dir, output_postfix="seg", output_ext=".nii.gz",
    separate_folder=False, data_root_dir=<dataset>)`` (``monai.data.utils.create_file_basename``): the input's
    name without ``.nii.gz`` (or its one extension), its folder relative to ``data_root_dir`` kept, then
    ``"_" + output_postfix`` (here ``postfix`` includes the underscore) and ``ext``. So
    ``<dataset>/<case>/image.nii.gz`` -> ``<pred_dir>/<case>/image_seg.nii.gz``. ``data_root_dir`` defaults to
    each image's grandparent folder (the ``<dataset>`` of that layout); pass the inference's ``input_dir`` for
    other layouts. Raises FileNotFoundError listing the missing predictions when ``must_exist``.
    """
    out, missing = [], []
    for case in cases:
        image = os.fspath(case["image"])
        folder, name = os.path.split(image)
        name, extension = os.path.splitext(name)
        if extension == ".gz":
            name, _ = os.path.splitext(name)
        root = os.path.dirname(os.path.dirname(os.path.abspath(image))) if data_root_dir is None else data_root_dir
        rel = os.path.relpath(folder, root) if folder else ""
        pred = Path(os.path.normpath(os.path.join(os.fspath(pred_dir), rel, name + postfix)) + ext)
        if must_exist and not pred.is_file():
            missing.append(str(pred))
        out.append({**case, "pred": str(pred)})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} prediction(s) not found: {shown}")
    return out


def _load_prediction(pred_path: str | os.PathLike, label_path: str | os.PathLike) -> np.ndarray:
    """Predicted label map [k, j, i]; ValueError unless it is on the label's grid (shape and affine)."""
    import nibabel as nib

    path = Path(pred_path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    pred, label = nib.load(str(path)), nib.load(str(label_path))
    shape = tuple(pred.shape)
    while len(shape) > 3 and shape[-1] == 1:  # a trailing channel of size 1
        shape = shape[:-1]
    if shape != tuple(label.shape):
        raise ValueError(f"prediction {path} has shape {tuple(pred.shape)}, label {label_path} {tuple(label.shape)}")
    if not np.allclose(pred.affine, label.affine, atol=1e-3):
        raise ValueError(f"prediction {path} is not on the label's grid (affines differ); resample it first")
    data = np.asanyarray(pred.dataobj).reshape(shape)
    if data.dtype.kind == "f":
        if not np.all(data == np.round(data)):
            raise ValueError(f"prediction {path} has non-integer values; expected a label map")
        data = data.astype(np.int16)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def evaluate_folder(
    cases: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    n_boot: int = 1000,
    seed: int = 0,
    label_names: Mapping[int, str] | None = None,
    title: str = "S2CAC evaluation",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate NIfTI cases ``{"image", "label", "pred", "truth" (path or None)[, "id"]}`` and write the report.

    Writes ``out_dir/evaluation.json`` (``{"summary": ..., "cases": [per-case rows]}``) and
    ``out_dir/evaluation.md``, logs the Markdown and returns the summary. The prediction must be on the label's
    grid (shape and affine within 1e-3 mm), else ValueError.
    """
    from tqdm import tqdm

    rows = []
    for case in tqdm(list(cases), desc="evaluate", unit="case", disable=not progress):
        image, labels, spacing = load_nifti_pair(case["image"], case["label"])
        pred = _load_prediction(case["pred"], case["label"])
        truth_path = case.get("truth")
        truth = json.loads(Path(truth_path).read_text()) if truth_path else None
        row = evaluate_case(image, labels, pred, spacing, truth, label_names=label_names)
        case_id = case.get("id") or Path(case["image"]).parent.name
        paths = {k: (None if case.get(k) is None else str(case[k])) for k in ("image", "label", "pred", "truth")}
        rows.append({"id": str(case_id), **paths, **row})
    summary = summarise(rows, n_boot=n_boot, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(_clean({"summary": summary, "cases": rows}), indent=1))
    markdown = to_markdown(summary, title)
    (out / "evaluation.md").write_text(markdown)
    logger.info("%s", markdown)
    return summary
