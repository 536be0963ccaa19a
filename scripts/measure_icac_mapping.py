#!/usr/bin/env python
"""Measure the error of the axial segment rule for ICA calcium against the head phantoms' centreline truth.

For each head phantom: the mid-sagittal plane is estimated from the image, and the TRUE calcium mask is mapped to
side and segment with the TRUE landmarks (or predicted ones, --landmarks DIR) by
``bundles/dst_ica_calcification/scripts/segments.py``. The truth side and segment of a calcium voxel is that of
the nearest lumen voxel in the phantom's ``segments`` map, which follows the centreline (a voxel inside the lumen
map takes its own value). The lesions' recorded segments in truth.json describe only the lesion centre; a plaque
a few mm long can straddle a boundary, hence the per-voxel truth. Both label maps are scored by the project's one
scorer, so volumes count calcium voxels (>= 130 HU in the mask) alike.

Reported: per-segment volume ICC(2,1) (two-way random, absolute agreement; rows = case x side, pooled over sides,
and per side and segment) with a case-bootstrap 95 % percentile interval, target: lower bound >= 0.95; the share of
calcium volume assigned to the wrong segment and to the wrong side (with intervals); the volume confusion of truth
vs mapped segment; the plane's error against the phantom's true head rotation (angle, and offset at the six
landmarks). ICC and bootstrap helpers come from the S2CAC evaluation module.

Examples:
  python scripts/measure_icac_mapping.py --num 100 --seed 2000 --size small --json out/icac_small.json
  python scripts/measure_icac_mapping.py --data data/head_test --landmarks predictions/ --json out/pred.json

Exit codes: 0 success (whether or not the target is met; see "target_met"), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from map_icac_segments import InputError, load_landmarks  # noqa: E402

from bundles.dst_ica_calcification.scripts.hemisphere import (  # noqa: E402
    SIDES,
    MidSagittalPlane,
    estimate_midsagittal_plane,
    lps_affine_from_nifti,
)
from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES, SEGMENTS, map_segments  # noqa: E402
from bundles.s2cac_coronary_calcium.scripts import scoring  # noqa: E402
from bundles.s2cac_coronary_calcium.scripts.evaluation import (  # noqa: E402
    bootstrap_weights,
    icc_2_1,
    percentile_interval,
)

PROG = "measure_icac_mapping"
TARGET_ICC = 0.95
N_BOOT = 2000
MARGIN_MM = 10.0  # how far around the calcium the nearest lumen voxel is looked for
log = logging.getLogger(PROG)


# --- cases ------------------------------------------------------------------------------------------------------


def generated_case(seed: int, index: int, size: str, calcium: str | None) -> dict[str, Any]:
    from phantoms.head import make_head_case

    case = make_head_case(seed, index, size, calcium=calcium)
    g = case.grid
    return {
        "case_id": case.case_id,
        "image": case.arrays["image"],
        "label": case.arrays["label"],
        "segments": case.arrays["segments"],
        "affine": g.affine_lps(),
        "spacing": (g.pixel_mm, g.pixel_mm, g.increment_mm),
        "truth": case.truth,
    }


def folder_case(folder: Path) -> dict[str, Any]:
    import nibabel as nib

    try:
        image, label, spacing = scoring.load_nifti_pair(folder / "image.nii.gz", folder / "label.nii.gz")
        seg_img = nib.load(str(folder / "segments.nii.gz"))
        truth = json.loads((folder / "truth.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: {exc}") from exc
    segments = np.ascontiguousarray(np.asanyarray(seg_img.dataobj).transpose(2, 1, 0))
    if segments.shape != image.shape:
        raise InputError(f"{folder}: segments map shape {segments.shape} differs from the image {image.shape}")
    return {
        "case_id": folder.name,
        "image": image,
        "label": label,
        "segments": segments,
        "affine": lps_affine_from_nifti(seg_img.affine),
        "spacing": spacing,
        "truth": truth,
    }


def load_prediction(folder: Path, case_id: str) -> Any:
    path = folder / f"{case_id}.json"
    if not path.is_file():
        raise InputError(f"no predicted landmarks for {case_id}: expected {path}")
    return load_landmarks(path)


# --- per case ---------------------------------------------------------------------------------------------------


def truth_labels(label: np.ndarray, segments: np.ndarray, spacing) -> tuple[np.ndarray, float]:
    """Label map (1 + side * 4 + segment) of the calcium voxels from their nearest lumen voxel; and the largest
    calcium-to-lumen distance (mm)."""
    out = np.zeros(label.shape, dtype=np.uint8)
    kji = np.argwhere(label > 0)
    if len(kji) == 0:
        return out, 0.0
    row, col, inc = spacing
    sampling = np.array([inc, row, col])
    margin = np.ceil(MARGIN_MM / sampling).astype(int)
    lo = np.maximum(kji.min(axis=0) - margin, 0)
    hi = np.minimum(kji.max(axis=0) + margin + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = segments[box]
    if not sub.any():
        raise ValueError(f"no lumen voxel within {MARGIN_MM} mm of the calcium")
    dist, nearest = ndimage.distance_transform_edt(sub == 0, sampling=sampling, return_indices=True)
    local = tuple((kji - lo).T)
    out[tuple(kji.T)] = sub[tuple(n[local] for n in nearest)]
    return out, float(dist[local].max())


def true_plane(truth: dict) -> MidSagittalPlane:
    head = truth["head"]
    return MidSagittalPlane(tuple(head["centre_mm"]), tuple(np.asarray(head["rotation"])[:, 0]))


def evaluate_case(case: dict[str, Any], landmarks: Any | None = None, use_true_plane: bool = False) -> dict:
    """Per-case numbers: volumes per label (mapped and truth), wrong segment / side volume, plane error."""
    truth = case["truth"]
    image, label, spacing = case["image"], case["label"], case["spacing"]
    reference = true_plane(truth)
    start = time.perf_counter()
    plane = reference if use_true_plane else estimate_midsagittal_plane(image, case["affine"])
    plane_s = time.perf_counter() - start
    # Every case is mapped, implausible predicted landmarks too (the app refuses those): their error is measured.
    mapping = map_segments(
        image, label, case["affine"], truth if landmarks is None else landmarks, plane, spacing=spacing,
        max_side_difference_mm=math.inf,
    )  # fmt: skip
    true_map, max_dist = truth_labels(label, case["segments"], spacing)
    true_score = scoring.score_calcium(image, true_map, spacing, label_names=LABEL_NAMES)
    names = [LABEL_NAMES[v] for v in sorted(LABEL_NAMES)]

    calcium = (label > 0) & (image >= scoring.CALCIUM_THRESHOLD_HU)
    voxel_mm3 = float(np.prod(spacing))
    mapped_v, true_v = mapping.labels[calcium].astype(int), true_map[calcium].astype(int)
    unassigned = int((true_v == 0).sum())
    ok = true_v > 0
    mapped_side, true_side = (mapped_v - 1) // 4, (true_v - 1) // 4
    mapped_seg, true_seg = (mapped_v - 1) % 4, (true_v - 1) % 4
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (true_seg[ok], mapped_seg[ok]), voxel_mm3)

    landmarks_mm = np.array([lm["position_mm"] for lm in truth["landmarks"]])
    offset = np.abs(plane.signed_distance(landmarks_mm) - reference.signed_distance(landmarks_mm))
    return {
        "case_id": case["case_id"],
        "thickness_mm": truth["scanner"]["thickness_mm"],
        "yaw_deg": truth["head"]["yaw_deg"],
        "roll_deg": truth["head"]["roll_deg"],
        "gantry_tilt_deg": truth["gantry_tilt_deg"],
        "mapped_volume_mm3": [mapping.score.per_label[n].volume_mm3 for n in names],
        "true_volume_mm3": [true_score.per_label[n].volume_mm3 for n in names],
        "calcium_volume_mm3": float(calcium.sum()) * voxel_mm3,
        "wrong_segment_mm3": float(((mapped_seg != true_seg) & ok).sum()) * voxel_mm3,
        "wrong_side_mm3": float(((mapped_side != true_side) & ok).sum()) * voxel_mm3,
        "unassigned_truth_mm3": unassigned * voxel_mm3,
        "confusion_mm3": confusion.tolist(),
        "max_calcium_to_lumen_mm": max_dist,
        "plane_angle_deg": plane.angle_deg(reference.normal),
        "plane_offset_at_icas_mm": float(offset.max()),
        "plane_seconds": plane_s,
        "warnings": mapping.warnings,
    }


# --- summary ----------------------------------------------------------------------------------------------------


def _stat(value: float, boot: np.ndarray) -> dict[str, Any]:
    low, high, n_valid = percentile_interval(boot)
    return {"value": None if not math.isfinite(value) else value, "ci95": [low, high], "n_valid_resamples": n_valid}


def summarise(cases: list[dict], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """ICC per segment (pooled sides and per side), wrong-segment / wrong-side shares, confusion, plane errors."""
    n = len(cases)
    if n < 2:
        raise ValueError(f"need at least 2 cases, got {n}")
    w = bootstrap_weights(n, n_boot, seed)  # (B, n) case counts
    mapped = np.array([c["mapped_volume_mm3"] for c in cases])  # (n, 8) in label order
    true = np.array([c["true_volume_mm3"] for c in cases])
    out: dict[str, Any] = {"cases": n, "bootstrap_resamples": n_boot, "icc_per_segment": {}, "icc_per_side": {}}
    w_sides = np.repeat(w, 2, axis=1)  # rows (case, right), (case, left): resampled by case
    for g, seg in enumerate(SEGMENTS):
        ratings = np.stack([np.stack([true[:, s * 4 + g], mapped[:, s * 4 + g]], axis=1) for s in range(2)], axis=1)
        ratings = ratings.reshape(2 * n, 2)
        stat = _stat(icc_2_1(ratings), icc_2_1(ratings, w_sides))
        nonzero = ratings.max(axis=1) > 0
        stat["rows_with_calcium"] = int(nonzero.sum())
        stat["true_volume_mm3"] = float(ratings[:, 0].sum())
        stat["mapped_volume_mm3"] = float(ratings[:, 1].sum())
        out["icc_per_segment"][seg] = stat
    for s, side in enumerate(SIDES):
        for g, seg in enumerate(SEGMENTS):
            ratings = np.stack([true[:, s * 4 + g], mapped[:, s * 4 + g]], axis=1)
            out["icc_per_side"][f"{side} {seg}"] = _stat(icc_2_1(ratings), icc_2_1(ratings, w))
    lows = [v["ci95"][0] for v in out["icc_per_segment"].values()]
    out["target"] = f"per-segment volume ICC(2,1), lower bound of the bootstrap 95 % interval >= {TARGET_ICC}"
    out["target_met"] = all(low is not None and low >= TARGET_ICC for low in lows)

    total = np.array([c["calcium_volume_mm3"] for c in cases])
    for key in ("wrong_segment", "wrong_side", "unassigned_truth"):
        part = np.array([c[f"{key}_mm3"] for c in cases])
        with np.errstate(invalid="ignore", divide="ignore"):
            value = part.sum() / total.sum() if total.sum() > 0 else math.nan
            boot = (w @ part) / (w @ total)
        out[f"{key}_share"] = _stat(float(value), boot)
    out["calcium_volume_mm3"] = float(total.sum())
    out["cases_with_calcium"] = int((total > 0).sum())
    confusion = np.sum([np.asarray(c["confusion_mm3"]) for c in cases], axis=0)
    out["confusion_mm3"] = {
        "rows_truth_columns_mapped": list(SEGMENTS),
        "matrix": confusion.tolist(),
    }
    angle = np.array([c["plane_angle_deg"] for c in cases])
    offset = np.array([c["plane_offset_at_icas_mm"] for c in cases])
    seconds = np.array([c["plane_seconds"] for c in cases])
    out["plane"] = {
        "angle_deg": {
            "median": float(np.median(angle)),
            "p95": float(np.percentile(angle, 95)),
            "max": float(angle.max()),
        },
        "offset_at_icas_mm": {
            "median": float(np.median(offset)),
            "p95": float(np.percentile(offset, 95)),
            "max": float(offset.max()),
        },
        "seconds": {"median": float(np.median(seconds)), "max": float(seconds.max())},
        "max_abs_yaw_deg": float(max(abs(c["yaw_deg"]) for c in cases)),
        "max_abs_roll_deg": float(max(abs(c["roll_deg"]) for c in cases)),
    }
    return out


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def to_markdown(summary: dict[str, Any], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"{summary['cases']} cases ({summary['cases_with_calcium']} with calcium, "
        f"{summary['calcium_volume_mm3']:.1f} mm^3 of calcium), {summary['bootstrap_resamples']} bootstrap resamples",
        "",
        "| segment | volume ICC(2,1) | 95 % CI | case-sides with calcium | truth mm^3 | mapped mm^3 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for seg, s in summary["icc_per_segment"].items():
        lo, hi = s["ci95"]
        lines.append(
            f"| {seg} | {_f(s['value'], 4)} | {_f(lo, 4)} - {_f(hi, 4)} | {s['rows_with_calcium']} | "
            f"{s['true_volume_mm3']:.1f} | {s['mapped_volume_mm3']:.1f} |"
        )
    lines += ["", "| share of calcium volume | value | 95 % CI |", "| --- | --- | --- |"]
    for key, name in (("wrong_segment_share", "wrong segment"), ("wrong_side_share", "wrong side")):
        s = summary[key]
        lines.append(f"| {name} | {_f(s['value'], 4)} | {_f(s['ci95'][0], 4)} - {_f(s['ci95'][1], 4)} |")
    m = np.asarray(summary["confusion_mm3"]["matrix"])
    lines += ["", "| truth \\ mapped (mm^3) | " + " | ".join(SEGMENTS) + " |", "| --- " * 5 + "|"]
    lines += [f"| {seg} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for seg, row in zip(SEGMENTS, m, strict=True)]
    p = summary["plane"]
    lines += [
        "",
        f"mid-sagittal plane vs truth (|yaw| <= {p['max_abs_yaw_deg']:.1f} deg, |roll| <= {p['max_abs_roll_deg']:.1f} "
        f"deg): angle median {p['angle_deg']['median']:.3f} / p95 {p['angle_deg']['p95']:.3f} / max "
        f"{p['angle_deg']['max']:.3f} deg; offset at the ICA landmarks median {p['offset_at_icas_mm']['median']:.3f} "
        f"/ max {p['offset_at_icas_mm']['max']:.3f} mm; {p['seconds']['median']:.3f} s per case (median)",
        "",
        f"target ({summary['target']}): {'met' if summary['target_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------------------------


def _job(spec: tuple) -> dict:
    kind, arg, pred_dir, use_true_plane = spec
    case = generated_case(*arg) if kind == "generate" else folder_case(Path(arg))
    landmarks = None if pred_dir is None else load_prediction(Path(pred_dir), case["case_id"])
    return evaluate_case(case, landmarks, use_true_plane)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of head phantom cases (image, label, segments, truth.json)")
    src.add_argument("--num", type=int, help="generate this many head phantoms in memory")
    p.add_argument("--seed", type=int, default=2000, help="phantom seed with --num (default 2000, a held-out seed)")
    p.add_argument("--first", type=int, default=0, help="first case index with --num (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="small", help="phantom size with --num")
    p.add_argument("--calcium", choices=("none", "right", "left", "both"), help="force the calcium pattern with --num")
    p.add_argument("--landmarks", type=Path, metavar="DIR", help="predicted landmarks: DIR/<case_id>.json per case")
    p.add_argument("--true-plane", action="store_true", help="use the phantom's true plane (isolates the rule)")
    p.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (results do not depend on it)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary and the per-case numbers as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.data is not None:
            folders = (
                sorted(d for d in args.data.iterdir() if (d / "truth.json").is_file()) if args.data.is_dir() else []
            )
            if not folders:
                raise InputError(f"no case folders with truth.json in {args.data}")
            specs = [("folder", str(d), args.landmarks, args.true_plane) for d in folders]
        else:
            if args.num < 2:
                raise InputError("--num must be at least 2")
            specs = [
                ("generate", (args.seed, i, args.size, args.calcium), args.landmarks, args.true_plane)
                for i in range(args.first, args.first + args.num)
            ]
        if args.landmarks is not None and not args.landmarks.is_dir():
            raise InputError(f"--landmarks: no such folder: {args.landmarks}")
        start = time.perf_counter()
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers) as pool:
                cases = list(pool.map(_job, specs))
        else:
            cases = [_job(s) for s in specs]
        summary = summarise(cases, n_boot=args.n_boot)
    except (InputError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    source = str(args.data) if args.data else f"{args.num} {args.size} head phantoms, seed {args.seed}"
    landmarks = f"predicted landmarks from {args.landmarks}" if args.landmarks else "true landmarks"
    plane = "true plane" if args.true_plane else "estimated plane"
    summary["setup"] = {"source": source, "landmarks": landmarks, "plane": plane, "mask": "true calcium mask"}
    summary["seconds"] = time.perf_counter() - start
    print(to_markdown(summary, f"ICA segment mapping: {source}, {landmarks}, {plane}, true mask"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1, allow_nan=False) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
