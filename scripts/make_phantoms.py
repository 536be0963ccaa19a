#!/usr/bin/env python
"""Make physically modelled synthetic CT phantoms with their truth.

  chest  non-contrast cardiac CT with coronary calcium (labels 1 LM, 2 LAD, 3 LCX, 4 RCA)
  head   non-contrast head CT with ICA calcium, ICA segments and the six segment-boundary landmarks
  lung   3-class stand-in for Clean-CC-CCII as 8-bit lung-masked PNG slices (a pipeline test, not a benchmark)

Each chest/head case goes to OUT/<case_id>/ (image.nii.gz, label.nii.gz, occupancy.nii.gz,
segments.nii.gz for head, truth.json, and dicom/ with --dicom), and OUT/datalist.json lists them
with patient-level folds. The same --seed gives the same bytes whatever --workers is.

Examples:
  python scripts/make_phantoms.py chest --num 20 --out data/chest --size small --dicom
  python scripts/make_phantoms.py head --num 10 --out data/head --seed 7 --size full --workers 2
  python scripts/make_phantoms.py lung --num 30 --out data/lung_raw
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms.datalist import build_datalist  # noqa: E402
from phantoms.dicom_series import TRANSFER_SYNTAXES  # noqa: E402

log = logging.getLogger("make_phantoms")


def make_volume_case(index: int, args: argparse.Namespace) -> dict:
    if args.kind == "chest":
        from phantoms.chest import make_chest_case

        case = make_chest_case(args.seed, index, args.size, thickness=args.thickness, patient_size=args.patient_size)
    else:
        from phantoms.head import make_head_case

        case = make_head_case(args.seed, index, args.size, thickness=args.thickness, tilt_deg=args.tilt)
    from phantoms.writers import write_case

    folder = write_case(case, args.out, dicom=args.dicom, transfer_syntax=args.transfer_syntax)
    files = {name: f"{case.case_id}/{name}.nii.gz" for name in case.arrays if name != "occupancy"}
    if args.dicom:
        files["dicom"] = f"{case.case_id}/dicom"
    files["truth"] = f"{case.case_id}/truth.json"
    return {"case_id": case.case_id, "files": files, "folder": str(folder)}


def make_lung_patient(index: int, args: argparse.Namespace) -> dict:
    from phantoms.lung import write_lung_patient

    return write_lung_patient(args.out, args.seed, index, args.size)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    work = make_lung_patient if args.kind == "lung" else make_volume_case
    job = partial(work, args=args)
    indices = range(args.first, args.first + args.num)
    bar = dict(total=args.num, desc=f"{args.kind} phantoms", unit="case", disable=None)
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(tqdm(pool.map(job, indices), **bar))
    else:
        results = [job(i) for i in tqdm(indices, **bar)]
    if args.kind == "lung":
        summary = {"seed": args.seed, "size": args.size, "patients": results}
        (args.out / "phantom_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        log.info("wrote %d lung patients to %s", len(results), args.out)
        return 0
    datalist = build_datalist(
        [r["case_id"] for r in results],
        {r["case_id"]: r["files"] for r in results},
        folds=args.folds,
        unlabeled_fraction=args.unlabeled_fraction,
        seed=args.seed,
    )
    (args.out / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
    log.info(
        "wrote %d %s cases (%d labeled, %d unlabeled) and datalist.json to %s",
        len(results),
        args.kind,
        len(datalist["training"]),
        len(datalist["unlabeled"]),
        args.out,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="{chest,head,lung}")
    helps = {
        "chest": "non-contrast cardiac CT with coronary calcium",
        "head": "non-contrast head CT with ICA calcium and landmarks",
        "lung": "Clean-CC-CCII-like PNG slices in <class>/<patient>/<scan>/<slice>.png",
    }
    for kind, text in helps.items():
        s = sub.add_parser(kind, help=text, description=text)
        s.add_argument("--num", type=int, default=10, help="number of cases (patients for lung) (default 10)")
        s.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
        s.add_argument("--seed", type=int, default=0, help="dataset seed; held-out sets use another seed (default 0)")
        s.add_argument("--first", type=int, default=0, help="index of the first case, to extend a dataset (default 0)")
        s.add_argument(
            "--size",
            choices=["small", "full"] if kind == "lung" else ["small", "medium", "full"],
            default="small",
            help="small: 128x128 (64x64 for lung), quick, for tests and CPU training; medium: 256x256 around the "
            "heart or the ICAs, for GPU training; full: 512x512 (default small)",
        )
        s.add_argument("--workers", type=int, default=1, help="parallel processes; output does not depend on it")
        if kind == "lung":
            continue
        s.add_argument("--dicom", action="store_true", help="also write each case as a DICOM CT series in dicom/")
        s.add_argument(
            "--transfer-syntax",
            choices=sorted(TRANSFER_SYNTAXES),
            default="explicit",
            help="DICOM encoding: explicit VR little endian, JPEG 2000 lossless or RLE lossless (default explicit)",
        )
        s.add_argument("--thickness", type=float, help="force one slice thickness in mm (default: sampled per case)")
        s.add_argument("--folds", type=int, default=5, help="patient-level cross-validation folds (default 5)")
        s.add_argument(
            "--unlabeled-fraction",
            type=float,
            default=0.0,
            help="share of training cases listed without label, for semi-supervised training (default 0)",
        )
        if kind == "chest":
            s.add_argument("--patient-size", choices=["small", "medium", "large"], help="force a body habitus")
        else:
            s.add_argument("--tilt", type=float, help="force a gantry tilt in degrees (default: 0 or up to 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    logging.getLogger("phantoms").setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    if args.num < 1:
        parser().error("--num must be at least 1")
    if args.kind != "lung":
        args.patient_size = getattr(args, "patient_size", None)
        args.tilt = getattr(args, "tilt", None)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
