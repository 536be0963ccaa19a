#!/usr/bin/env python
"""Build a MONAI datalist (with patient-level folds) from your own labelled CT, for evaluation or fine-tuning.

Two sources:

  NIfTI pairs: CT volumes in HU with a label map on the same grid beside each one.
    python scripts/make_datalist.py OUT --nifti DIR [--image-glob '**/*_ct.nii.gz'] [--label-from _ct _seg]
  DICOM: CT series (one folder each) and DICOM SEG files that reference them, anywhere under DIR.
    python scripts/make_datalist.py OUT --dicom DIR [--labels LM=1,LAD=2,LCX=3,RCA=4]

OUT gets datalist.json ("training" entries: case_id, fold, image, label); DICOM cases are converted to
OUT/<case>/image.nii.gz + label.nii.gz on the CT's grid, segments mapped to label values by their
SegmentLabel (--labels; ICA: --labels ICA=1). Then, e.g.:
    python -m monai.bundle run evaluating --config_file "[...train.yaml, ...evaluate.yaml]" --eval_dataset_dir OUT
Without a PatientID (NIfTI), each case is its own patient for the folds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantoms.datalist import patient_folds  # noqa: E402
from phantoms.dicom_series import read_ct_series  # noqa: E402
from phantoms.writers import to_nifti  # noqa: E402

logger = logging.getLogger("make_datalist")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class DatalistError(ValueError):
    """A problem with the user's data that stops the datalist from being built."""


def nifti_cases(root: Path, image_glob: str, label_from: tuple[str, str]) -> list[dict]:
    """Pairs (image, label) under ``root``: the label path is the image path with one substring replaced."""
    cases = []
    for image in sorted(root.glob(image_glob)):
        label = image.with_name(image.name.replace(*label_from)) if label_from[0] in image.name else None
        if label is None or not label.is_file():
            raise DatalistError(f"{image}: no label file (looked for {label or image.name + ' with ' + label_from[0]})")
        a, b = nib.load(image), nib.load(label)
        if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
            raise DatalistError(f"{label}: not on the grid of {image}")
        rel = image.relative_to(root)
        cases.append(
            {"case_id": str(rel).split(".nii")[0], "patient": str(rel), "image": str(image), "label": str(label)}
        )
    if not cases:
        raise DatalistError(f"no files match {image_glob!r} under {root}")
    return cases


def parse_labels(text: str) -> dict[str, int]:
    labels = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise DatalistError(f"--labels: {item!r} is not NAME=VALUE with VALUE >= 1")
        labels[name.strip().upper()] = int(value)
    return labels


def dicom_cases(root: Path, out: Path, labels: dict[str, int]) -> list[dict]:
    """Convert each CT series that a DICOM SEG references into image/label NIfTI under ``out``."""
    series_dirs: dict[str, Path] = {}
    segs: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if ds.get("SOPClassUID") == SEG_STORAGE or ds.get("Modality") == "SEG":
            segs.append(path)
        elif ds.get("Modality") == "CT" and "SeriesInstanceUID" in ds:
            folder = series_dirs.setdefault(ds.SeriesInstanceUID, path.parent)
            if folder != path.parent:
                raise DatalistError(f"series {ds.SeriesInstanceUID} is split over {folder} and {path.parent}")
    if not segs:
        raise DatalistError(f"no DICOM SEG files under {root}")
    cases = []
    for seg_path in segs:
        seg = hd.seg.segread(seg_path)
        ref = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        if ref not in series_dirs:
            raise DatalistError(f"{seg_path}: references series {ref}, which is not under {root}")
        volume, grid, datasets = read_ct_series(series_dirs[ref])
        values = {}
        for item in seg.SegmentSequence:
            name = str(item.SegmentLabel).strip().upper()
            if name not in labels:
                raise DatalistError(f"{seg_path}: segment {item.SegmentLabel!r} is not in --labels {sorted(labels)}")
            values[int(item.SegmentNumber)] = labels[name]
        numbers = sorted(values)
        masks = seg.get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in datasets], segment_numbers=numbers, assert_missing_frames_are_empty=True
        )  # (slices, rows, columns, segments), in the CT's slice order
        label = np.zeros(volume.shape, dtype=np.uint8)
        for channel, number in enumerate(numbers):
            label[masks[..., channel] > 0] = values[number]
        case_id = hashlib.sha256(ref.encode()).hexdigest()[:12]  # file names never carry patient data
        folder = out / case_id
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(to_nifti(volume.astype(np.float32), grid), folder / "image.nii.gz")
        nib.save(to_nifti(label, grid), folder / "label.nii.gz")
        patient = str(datasets[0].get("PatientID") or case_id)
        image, label_file = f"{case_id}/image.nii.gz", f"{case_id}/label.nii.gz"
        cases.append({"case_id": case_id, "patient": patient, "image": image, "label": label_file})
        logger.info("%s: %d slices, segments %s", case_id, len(datasets), {n: values[n] for n in numbers})
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="output folder: datalist.json (and converted DICOM cases)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--nifti", type=Path, help="folder of NIfTI CT volumes with label maps beside them")
    src.add_argument("--dicom", type=Path, help="folder of CT series folders and DICOM SEG files")
    p.add_argument(
        "--image-glob", default="**/image.nii.gz", help="NIfTI images under --nifti (default **/image.nii.gz)"
    )
    p.add_argument(
        "--label-from",
        nargs=2,
        default=("image", "label"),
        metavar=("OLD", "NEW"),
        help="label path = image path with OLD replaced by NEW in the file name (default image label)",
    )
    p.add_argument("--labels", default="LM=1,LAD=2,LCX=3,RCA=4", help="DICOM SEG SegmentLabel -> label value")
    p.add_argument("--folds", type=int, default=5, help="patient-level cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.nifti:
            cases = nifti_cases(args.nifti.resolve(), args.image_glob, tuple(args.label_from))
        else:
            cases = dicom_cases(args.dicom, args.out, parse_labels(args.labels))
        if len({c["patient"] for c in cases}) < args.folds:
            raise DatalistError(f"{len(cases)} cases from fewer than {args.folds} patients cannot fill the folds")
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, 99]))
        folds = patient_folds([c["patient"] for c in cases], args.folds, rng)
    except (DatalistError, ValueError, OSError) as e:
        print(f"make_datalist: error: {e}", file=sys.stderr)
        return 2
    entries = [{**{k: v for k, v in c.items() if k != "patient"}, "fold": folds[c["patient"]]} for c in cases]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "datalist.json").write_text(json.dumps({"training": entries}, indent=1) + "\n")
    logger.info("wrote %d cases in %d folds to %s", len(entries), args.folds, args.out / "datalist.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
