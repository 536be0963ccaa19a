#!/usr/bin/env python
"""Score coronary (or any labelled) calcium in a NIfTI CT: Agatston, volume, mass, lesion counts, risk category.

IMAGE is a NIfTI volume in HU, LABEL a NIfTI label map on the same grid (0 = background). The scoring is
the project's one implementation (bundles/s2cac_coronary_calcium/scripts/scoring.py); see its docstring
for the definitions. The table rounds for display; --json writes the full, unrounded result.

Examples:
  python scripts/score_calcium.py case/image.nii.gz case/label.nii.gz
  python scripts/score_calcium.py image.nii.gz label.nii.gz --json score.json --mass-calibration 0.85
  python scripts/score_calcium.py head.nii.gz ica.nii.gz --labels "1:ICA_L,2:ICA_R"

Exit codes: 0 success, 2 bad input (missing file, unreadable NIfTI, shape mismatch, non-3D, unmapped label).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundles.s2cac_coronary_calcium.scripts.scoring import (  # noqa: E402
    DEFAULT_LABEL_NAMES,
    DEFAULT_MASS_CALIBRATION,
    CalciumScore,
    parse_label_names,
    score_nifti,
)

PROG = "score_calcium"
COLUMNS = (
    ("label", 8),
    ("Agatston", 10),
    ("volume (mm^3)", 14),
    ("mass (mg)", 11),
    ("2D Agatston lesions", 20),
    ("3D lesions", 11),
)


class InputError(Exception):
    """A failure the user caused; reported as one line and exit code 2."""


def format_table(score: CalciumScore) -> str:
    """Readable per-label and total table (rounded for display only)."""
    width = max(COLUMNS[0][1], *(len(name) for name in score.per_label), len("total"))
    header = [f"{COLUMNS[0][0]:<{width}}"] + [f"{name:>{w}}" for name, w in COLUMNS[1:]]
    lines = ["  ".join(header)]
    rows = [*score.per_label.items(), ("total", score.total)]
    for i, (name, s) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        cells = [
            f"{name:<{width}}",
            f"{s.agatston:>{COLUMNS[1][1]}.1f}",
            f"{s.volume_mm3:>{COLUMNS[2][1]}.1f}",
            f"{s.mass_mg:>{COLUMNS[3][1]}.2f}",
            f"{s.lesions_2d_agatston:>{COLUMNS[4][1]}d}",
            f"{s.lesions_3d:>{COLUMNS[5][1]}d}",
        ]
        lines.append("  ".join(cells))
    row_mm, col_mm = score.pixel_spacing_mm
    lines += [
        "",
        f"risk category: {score.risk_category} (from the unrounded total Agatston {score.total.agatston:.6g})",
        f"pixel spacing {row_mm:g} x {col_mm:g} mm, slice increment {score.slice_increment_mm:g} mm "
        f"(Agatston factor increment / 3 mm = {score.slice_increment_mm / 3.0:.4g}); "
        f"mass calibration {score.mass_calibration:g} mg HA/cm^3 per HU",
        "2D Agatston lesions: 8-connected in-plane components per label and slice, >= 1 mm^2; "
        "3D lesions: 6-connected components per label (detection)",
    ]
    if score.agatston_equivalent:
        lines.append(f"Agatston-equivalent (non-standard acquisition: {score.acquisition_note})")
    return "\n".join(lines)


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder so that a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda p: p.write_text(text))


def build_parser() -> argparse.ArgumentParser:
    default_labels = ",".join(f"{k}:{v}" for k, v in DEFAULT_LABEL_NAMES.items())
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("image", type=Path, help="NIfTI image in HU")
    p.add_argument("label", type=Path, help="NIfTI label map on the same grid (0 = background)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full, unrounded result as JSON")
    p.add_argument(
        "--mass-calibration",
        type=float,
        default=DEFAULT_MASS_CALIBRATION,
        metavar="F",
        help="mg HA/cm^3 per HU, from the site's calibration phantom at the scan's kVp "
        f"(default {DEFAULT_MASS_CALIBRATION:g}: the project phantoms at 120 kVp)",
    )
    p.add_argument(
        "--labels", default=default_labels, metavar="MAP", help=f"label value:name pairs (default {default_labels!r})"
    )
    p.add_argument("--thickness-mm", type=float, help="slice thickness, to flag non-standard acquisitions")
    p.add_argument("--kvp", type=float, help="tube voltage, to flag non-standard acquisitions")
    p.add_argument("--kernel", help="reconstruction kernel, to flag non-standard acquisitions")
    return p


def run(args: argparse.Namespace) -> CalciumScore:
    try:
        names = parse_label_names(args.labels)
    except ValueError as exc:
        raise InputError(f"--labels: {exc}") from exc
    try:
        return score_nifti(
            args.image,
            args.label,
            label_names=names,
            mass_calibration=args.mass_calibration,
            thickness_mm=args.thickness_mm,
            kvp=args.kvp,
            kernel=args.kernel,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        score = run(args)
        if args.json is not None:
            write_json(args.json, score.as_dict())
    except (InputError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(format_table(score))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
