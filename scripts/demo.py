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

TRUTH_LABELS = {"coronary": ("chest", "label.nii.gz"), "ica": ("head", "segments.nii.gz")}


def truth_scores(study: Path, made: dict[str, Path]) -> dict[str, dict]:
    """The phantom truth scored by the same scorer: the truth label map on the image the app read."""
    from bundles.dst_ica_calcification.scripts.segments import LABEL_NAMES
    from bundles.s2cac_coronary_calcium.scripts.scoring import score_nifti

    out = {}
    for path, (kind, labels) in TRUTH_LABELS.items():
        if kind in made:
            case = study / "truth" / made[kind].name.split("_", 1)[1]
            names = {"label_names": LABEL_NAMES} if path == "ica" else {}
            out[path] = score_nifti(case / "image.nii.gz", case / labels, **names).as_dict()
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
    made = make_study(study, size=args.size)
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
