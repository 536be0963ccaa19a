#!/usr/bin/env python
"""`make demo`: a synthetic study (cardiac + head CT of one patient) through the app on this machine.

Makes the study with ``scripts/make_study.py``, runs ``python -m deploy_app`` on it (CPU unless a GPU is present),
then prints the per-vessel and per-segment table beside the phantom truth and where the SEG, SR and PDF are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from make_study import make_study  # noqa: E402

# The demo's head: a standard 3 mm series with calcium in the right cavernous ICA (Agatston 50.9 on the truth). At
# the demo's `small` size the default case (0:1) has one plaque too small to label a voxel, so it shows nothing.
DEMO_HEAD = (0, 15)


def truth_scores(study: Path, made: dict[str, Path]) -> dict[str, dict]:
    """The phantom truth scored by the same scorer: the true calcium labels on the image the app read.

    Coronary: the label map is the vessel of each calcium voxel. ICA: the label map is binary calcium, and each
    calcium voxel takes the side and segment of its nearest lumen voxel in the ``segments`` map (as
    ``scripts/evaluate_app.py`` does); the ``segments`` map itself is the lumen, not calcium.
    """
    from measure_icac_mapping import truth_labels

    from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES
    from bundles.s2cac_coronary_calcium.scripts.scoring import load_nifti_pair, score_calcium

    out = {}
    for path, kind in (("coronary", "chest"), ("ica", "head")):
        if kind not in made:
            continue
        case = study / "truth" / made[kind].name.split("_", 1)[1]
        image, label, spacing = load_nifti_pair(case / "image.nii.gz", case / "label.nii.gz")
        names = None  # the scorer's default: the coronary vessels
        if path == "ica":
            _, segments, _ = load_nifti_pair(case / "image.nii.gz", case / "segments.nii.gz")
            label, names = truth_labels(label, segments, spacing)[0], LABEL_NAMES
        out[path] = score_calcium(image, label, spacing, label_names=names).as_dict()
    return out


def _table(path: str, report: dict, truth: dict | None) -> list[str]:
    r = report["paths"][path]
    if r is None:
        return [f"{path}: {report['absent'][path]}"]
    title = f"{path} (series {r['series']['series_number']}, {r['series']['series_description']})"
    if not r["scored"]:
        return [title, f"  not scored: {r['not_scored_reason']}"]
    s = r["scores"]
    lines = [title, f"  {'':22} {'Agatston':>9} {'volume mm3':>11} {'mass mg':>8} {'truth Agatston':>15}"]
    for name, v in s["per_label"].items():
        ref = f"{truth['per_label'][name]['agatston']:15.1f}" if truth else ""
        lines.append(f"  {name:22} {v['agatston']:9.1f} {v['volume_mm3']:11.1f} {v['mass_mg']:8.1f} {ref}")
    t = s["total"]
    ref = f"{truth['total']['agatston']:15.1f}" if truth else ""
    category = f"   risk category {s['risk_category']}" if path == "coronary" else ""
    lines.append(f"  {'total':22} {t['agatston']:9.1f} {t['volume_mm3']:11.1f} {t['mass_mg']:8.1f} {ref}{category}")
    if s.get("agatston_equivalent"):
        lines.append(f"  Agatston-equivalent: {s.get('acquisition_note')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("output/demo"), help="output folder (replaced)")
    p.add_argument("--size", default="small", choices=("small", "medium", "full"), help="phantom size")
    args = p.parse_args(argv)
    study = args.out / "study"
    results = args.out / "results"
    made = make_study(study, size=args.size, head=DEMO_HEAD)
    print(f"synthetic study: {study / 'dicom'} ({', '.join(made)})")
    cmd = [sys.executable, "-m", "deploy_app", "-i", str(study / "dicom"), "-o", str(results), "-l", "WARNING"]
    print("$ " + " ".join(cmd))
    run = subprocess.run(cmd, cwd=ROOT)
    if run.returncode not in (0, 4):
        return run.returncode
    report = json.loads((results / "results.json").read_text())
    truth = truth_scores(study, made)
    print()
    for path in ("coronary", "ica"):
        print("\n".join(_table(path, report, truth.get(path))))
    print("(truth: the same scorer on the phantom's true calcium labels; research software, not for diagnostic use)")
    print("The shipped S2CAC weights are CPU demo weights far from the release targets (bundle docs, Performance).")
    print()
    for name in ("coronary_seg.dcm", "coronary_sr.dcm", "ica_seg.dcm", "ica_sr.dcm", "report_pdf.dcm", "report.pdf"):
        if (results / name).exists():
            print(f"{name:16} {results / name}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
