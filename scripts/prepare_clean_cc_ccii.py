#!/usr/bin/env python
"""Turn the Clean-CC-CCII download into NIfTI volumes and a MONAI datalist with patient-level folds.

RAW is the download's layout, ``<class>/<patient>/<scan>/<slice>.png`` with classes NCP, CP and Normal (8-bit,
lung-masked slices). Each scan becomes one volume ``OUT/volumes/<class>/<patient>/<scan>.nii.gz`` (uint8, array
(column, row, slice) = NIfTI (i, j, k); slices in numeric order of their file names, slice 0 = the first file;
the PNGs carry no spacing, so the affine is the identity (1 mm voxels) unless --spacing is given). ``--size N``
resizes every slice to N x N (Lanczos, as the published preprocessing); the slice count is kept, since the DST
reads a variable-length slice sequence.

``OUT/datalist.json`` lists every usable scan as ``{"case_id", "image", "label", "class", "patient", "scan",
"fold", "slices"}`` under "training"; ``image`` is relative to OUT, ``case_id`` is ``<class>_<patient>_<scan>``.
``label`` is the class index in the DST bundle's order (``class_names`` NCP 0, CP 1, Normal 2; listed under
"labels"; the published code used CP 0, NCP 1, Normal 2). Folds are patient-level: every scan of a patient (a patient id
that appears under two classes counts as one patient) is in one fold, so no patient is in two folds (the
published preprocessing splits by scan, which leaks); patients are dealt class by class into the fold with the
fewest scans of that class so far, in a seeded random order, so folds are stratified by class and deterministic
given --seed.

A scan is skipped, and listed in the report, when a slice cannot be read, the slices differ in size, a file name
is not a number, two names have the same number, or it has no slices. The report has one line per class with
the counts of patients, scans and slices kept.

Example:
  python scripts/prepare_clean_cc_ccii.py --raw-root data/lung_small_raw --out data/lung_small --folds 5 --size 128

Exit codes: 0 success (even with skipped scans), 2 bad input or nothing usable (no raw root, no class folder, no
readable scan, fewer patients than folds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROG = "prepare_clean_cc_ccii"
CLASSES = ("NCP", "CP", "Normal")  # label index = position: the DST bundle's class_names and the lung phantoms
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(Exception):
    """A failure the user caused; reported as one line and exit code 2."""


@dataclass(frozen=True)
class Scan:
    klass: str
    patient: str
    scan: str
    folder: Path

    @property
    def rel_image(self) -> str:
        return f"volumes/{self.klass}/{self.patient}/{self.scan}.nii.gz"


def find_scans(raw_root: Path) -> list[Scan]:
    """Every ``<class>/<patient>/<scan>/`` folder under the raw root, sorted."""
    if not raw_root.is_dir():
        raise InputError(f"--raw-root: no such folder: {raw_root}")
    classes = [c for c in CLASSES if (raw_root / c).is_dir()]
    if not classes:
        raise InputError(f"--raw-root {raw_root} has none of the class folders {', '.join(CLASSES)}")
    scans = []
    for klass in classes:
        for patient in sorted(p for p in (raw_root / klass).iterdir() if p.is_dir()):
            for scan in sorted(s for s in patient.iterdir() if s.is_dir()):
                scans.append(Scan(klass, patient.name, scan.name, scan))
    return scans


def slice_files(folder: Path) -> list[Path]:
    """Slice files in numeric order of their names; ValueError for a non-numeric or repeated number."""
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SLICE_SUFFIXES]
    if not files:
        raise ValueError("no slice images")
    numbered = {}
    for f in files:
        if not f.stem.isdigit():
            raise ValueError(f"slice file name {f.name!r} is not a number")
        number = int(f.stem)
        if number in numbered:
            raise ValueError(f"slice files {numbered[number].name!r} and {f.name!r} have the same number")
        numbered[number] = f
    return [numbered[k] for k in sorted(numbered)]


def read_volume(folder: Path, size: int | None) -> np.ndarray:
    """uint8 [slices, rows, columns] of one scan folder; ValueError if a slice is unreadable or sizes differ."""
    from PIL import Image, UnidentifiedImageError

    slices, first_shape = [], None
    for f in slice_files(folder):
        try:
            with Image.open(f) as im:
                im.load()
                arr = np.asarray(im.convert("L") if im.mode != "L" else im)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise ValueError(f"cannot read {f.name}: {' '.join(str(exc).split())}") from exc
        if first_shape is None:
            first_shape = arr.shape
        elif arr.shape != first_shape:
            raise ValueError(
                f"{f.name} is {arr.shape[1]}x{arr.shape[0]}, the first slice {first_shape[1]}x{first_shape[0]}"
            )
        if size is not None and arr.shape != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
        slices.append(arr)
    return np.stack(slices).astype(np.uint8)


def write_nifti(volume: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    """[k, j, i] -> NIfTI (i, j, k) with a diagonal affine; written through a temporary file."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(job: tuple[Scan, Path, int | None, tuple[float, float, float]]) -> tuple[Scan, int | None, str | None]:
    """Convert one scan; (scan, slices, None) or (scan, None, reason)."""
    scan, out, size, spacing = job
    try:
        volume = read_volume(scan.folder, size)
    except (ValueError, OSError) as exc:
        return scan, None, str(exc)
    write_nifti(volume, out / scan.rel_image, spacing)
    return scan, int(volume.shape[0]), None


def assign_folds(kept: list[tuple[Scan, int]], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold: class by class, patients in a seeded random order, each into the fold with the fewest
    scans of that class so far (ties: fewest scans overall, then the lowest fold)."""
    scans_of: dict[str, list[Scan]] = defaultdict(list)
    for scan, _ in kept:
        scans_of[scan.patient].append(scan)
    # A patient under two classes (should not happen) is dealt with the class of most of its scans.
    main_class = {
        p: max(CLASSES, key=lambda c, s=s: (sum(x.klass == c for x in s), -CLASSES.index(c)))
        for p, s in scans_of.items()
    }
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    fold_of: dict[str, int] = {}
    total = np.zeros(folds, dtype=int)
    for klass in CLASSES:
        patients = sorted(p for p, c in main_class.items() if c == klass)
        per_class = np.zeros(folds, dtype=int)
        for i in rng.permutation(len(patients)):
            p = patients[i]
            fold = min(range(folds), key=lambda f: (per_class[f], total[f], f))
            fold_of[p] = fold
            per_class[fold] += len(scans_of[p])
            total[fold] += len(scans_of[p])
    return fold_of


def build_datalist(kept: list[tuple[Scan, int]], fold_of: dict[str, int], folds: int, args) -> dict:
    entries = [
        {
            "case_id": f"{scan.klass}_{scan.patient}_{scan.scan}",
            "image": scan.rel_image,
            "label": CLASSES.index(scan.klass),
            "class": scan.klass,
            "patient": scan.patient,
            "scan": scan.scan,
            "fold": fold_of[scan.patient],
            "slices": slices,
        }
        for scan, slices in kept
    ]
    return {
        "description": "Clean-CC-CCII scans as NIfTI volumes; fold = patient-level cross-validation fold",
        "labels": {str(i): c for i, c in enumerate(CLASSES)},
        "num_folds": folds,
        "seed": args.seed,
        "slice_size": args.size,
        "spacing_mm": list(args.spacing),
        "raw_root": str(args.raw_root),
        "training": entries,
    }


def report_lines(kept: list[tuple[Scan, int]], skipped: list[tuple[Scan, str]], fold_of: dict[str, int]) -> list[str]:
    lines = []
    for klass in CLASSES:
        mine = [(s, n) for s, n in kept if s.klass == klass]
        bad = sum(s.klass == klass for s, _ in skipped)
        lines.append(
            f"{klass:<7} patients {len({s.patient for s, _ in mine}):>5}  scans {len(mine):>5}  "
            f"slices {sum(n for _, n in mine):>7}  skipped scans {bad}"
        )
    folds = sorted(set(fold_of.values()))
    per_fold = [sum(fold_of[s.patient] == f for s, _ in kept) for f in folds]
    lines.append("scans per fold: " + ", ".join(f"{f}: {n}" for f, n in zip(folds, per_fold, strict=True)))
    classes_of = defaultdict(set)
    for s, _ in kept:
        classes_of[s.patient].add(s.klass)
    two_classes = {p for p, c in classes_of.items() if len(c) > 1}
    if two_classes:
        lines.append(f"patient ids under more than one class (kept in one fold): {', '.join(sorted(two_classes))}")
    lines += [f"skipped {s.klass}/{s.patient}/{s.scan}: {reason}" for s, reason in skipped]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--raw-root", type=Path, required=True, help="the download: <class>/<patient>/<scan>/<slice>.png")
    p.add_argument("--out", type=Path, required=True, help="output folder (volumes/ and datalist.json)")
    p.add_argument("--folds", type=int, default=5, help="patient-level cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--size", type=int, help="resize slices to SIZE x SIZE (default: keep the stored size)")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(1.0, 1.0, 1.0),
        metavar=("COL", "ROW", "SLICE"),
        help="voxel size written into the NIfTI affine, mm (default 1 1 1: the PNGs carry none)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel processes (the output does not depend on it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.folds < 2:
            raise InputError(f"--folds must be at least 2, got {args.folds}")
        if args.size is not None and args.size < 8:
            raise InputError(f"--size must be at least 8, got {args.size}")
        if not all(s > 0 for s in args.spacing):
            raise InputError(f"--spacing must be positive, got {args.spacing}")
        scans = find_scans(args.raw_root)
        jobs = [(s, args.out, args.size, tuple(args.spacing)) for s in scans]
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers) as pool:
                results = list(pool.map(convert, jobs, chunksize=4))
        else:
            results = [convert(j) for j in jobs]
        kept = [(s, n) for s, n, _ in results if n is not None]
        skipped = [(s, reason) for s, _, reason in results if reason is not None]
        if not kept:
            raise InputError(f"no usable scan under {args.raw_root} ({len(skipped)} skipped)")
        patients = len({s.patient for s, _ in kept})
        if patients < args.folds:
            raise InputError(f"{patients} usable patients cannot fill {args.folds} folds")
        fold_of = assign_folds(kept, args.folds, args.seed)
        datalist = build_datalist(kept, fold_of, args.folds, args)
        text = json.dumps(datalist, indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".datalist.json.", dir=args.out)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.out / "datalist.json")
    except (InputError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(kept, skipped, fold_of)))
    print(f"wrote {len(kept)} volumes and {args.out / 'datalist.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
