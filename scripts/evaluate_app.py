#!/usr/bin/env python
"""The deploy app on held-out phantom studies, against the phantom truth, with the bundles' own metrics.

Each case folder of DATASET (``make_phantoms.py chest|head --dicom``) holds one DICOM series: it goes through the
app's stages as a study (read, select, volume, quality checks, models, mapping, scorer; in this process, models
loaded once), and the app's label map is scored against the truth with the S2CAC bundle's ``evaluate_case`` /
``summarise`` (Agatston ICC, risk-category kappa, vessel or segment assignment, lesion detection, false
positives on calcium-free cases, bootstrap 95 % intervals). A case the app does not score counts with an empty
prediction, and the report says how many and why. ``--no-roi`` runs the calcium model on the whole volume, to
compare with the heart / skull-base region of interest the app uses by default; ``--sw-overlap`` sets its
sliding-window overlap, to compare with the app's default.

    .venv/bin/python scripts/evaluate_app.py data/chest_test_medium --path coronary --out output/eval_app
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from measure_icac_mapping import truth_labels  # noqa: E402

from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES as ICA_LABEL_NAMES  # noqa: E402
from bundles.s2cac_coronary_calcium.scripts import evaluation, scoring  # noqa: E402
from deploy_app import models as model_files  # noqa: E402
from deploy_app import pipeline  # noqa: E402
from deploy_app.cli import sw_overlap  # noqa: E402
from deploy_app.quality import load_limits  # noqa: E402
from deploy_app.selection import load_rules  # noqa: E402
from deploy_app.study import read_study  # noqa: E402

logger = logging.getLogger("evaluate_app")


def kji(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


def reference(case: Path, path: str, spacing) -> np.ndarray:
    """The truth label map in the app's label values (coronary: vessel; ICA: side x segment of the calcium)."""
    label = kji(case / "label.nii.gz").astype(np.uint8)
    if path == "coronary":
        return label
    return truth_labels(label, kji(case / "segments.nii.gz").astype(np.uint8), spacing)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="folder of phantom cases written with --dicom")
    p.add_argument("--path", required=True, choices=pipeline.PATHS)
    p.add_argument("--out", type=Path, required=True, help="evaluation.json and evaluation.md go here")
    p.add_argument("--no-roi", action="store_true", help="the calcium model on the whole volume")
    p.add_argument("--sw-overlap", type=sw_overlap, help="the calcium model's tile overlap (default: the app's)")
    p.add_argument("--limit", type=int, default=0, help="only the first N cases (0: all)")
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    manifest = model_files.load_manifest()
    files = model_files.locate_models(model_files.model_dir(), manifest)
    models = pipeline.Models(files, roi=not args.no_roi, sw_overlap=args.sw_overlap)
    rules, limits = load_rules(), load_limits()
    names = scoring.DEFAULT_LABEL_NAMES if args.path == "coronary" else ICA_LABEL_NAMES
    cases = sorted(c for c in args.dataset.iterdir() if (c / "dicom").is_dir())[: args.limit or None]
    if not cases:
        print(f"evaluate_app: error: no case folders with dicom/ in {args.dataset}", file=sys.stderr)
        return 2
    results, not_scored, seconds = [], Counter(), []
    for case in cases:
        start = time.perf_counter()
        study = read_study(case / "dicom")
        choice = pipeline.select(study, rules)[args.path]
        result = pipeline.run_path(args.path, choice, models, limits) if choice else None
        seconds.append(time.perf_counter() - start)
        if result is None or result.volume is None:
            not_scored["no usable series"] += 1
            continue
        vol = result.volume
        pred = result.labels if result.scored else np.zeros(vol.hu.shape, np.uint8)
        if not result.scored:
            not_scored[result.not_scored_reason] += 1
        truth = json.loads((case / "truth.json").read_text())
        true = reference(case, args.path, vol.scoring_spacing)
        results.append(evaluation.evaluate_case(vol.hu, true, pred, vol.scoring_spacing, truth, names))
        got, ref = (results[-1][k]["total"]["agatston"] for k in ("predicted", "reference"))
        logger.info("%s: %.1f s, Agatston %.1f (truth %.1f)", case.name, seconds[-1], got, ref)
    summary = evaluation.summarise(results, n_boot=args.n_boot)
    summary["app"] = {
        "path": args.path,
        "roi": not args.no_roi,
        "sliding_window": models.get(f"s2cac_{args.path}").sliding_window,
        "cases": len(cases),
        "not_scored": dict(not_scored),
        "median_seconds_per_case": float(np.median(seconds)),
        "models": {k: v["sha256"][:12] for k, v in manifest.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    overlap = summary["app"]["sliding_window"]["overlap"]
    region = "heart/skull-base ROI" if not args.no_roi else "whole volume"
    title = f"App ({args.path}, {region}, overlap {overlap:g}) on {args.dataset.name}"
    md = evaluation.to_markdown(summary, title=title)
    md += f"\nNot scored by the app: {dict(not_scored) or 'none'}; median {np.median(seconds):.1f} s per case.\n"
    (args.out / "evaluation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
