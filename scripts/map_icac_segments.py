#!/usr/bin/env python
"""Map ICA calcium to side and segment and score each: volume, Agatston and mass per side and segment.

IMAGE is a head CT as NIfTI (HU), CALCIUM_MASK a NIfTI ICA calcium mask on the same grid (nonzero = calcium),
LANDMARKS_JSON the six ICA segment-boundary landmarks: a head phantom's truth.json, a list of landmark objects or
an object with a "landmarks" list (keys: side, boundary 1..3 or name; slice_index, slice or position_mm (LPS);
present / in_scan). The side comes from the estimated mid-sagittal plane, the segment from the boundary slices
(bundles/dst_ica_calcification/scripts/segments.py explains the rule and how absent landmarks are handled); the
scores from the project's one scorer. The table rounds for display; --json writes the full, unrounded result.

Examples:
  python scripts/map_icac_segments.py case/image.nii.gz case/label.nii.gz case/truth.json
  python scripts/map_icac_segments.py head.nii.gz ica.nii.gz landmarks.json --json segments.json \\
      --label-out segments.nii.gz --mass-calibration 0.85

Exit codes: 0 success, 2 bad input (missing or unreadable file, shapes or affines differ, malformed landmarks,
no bone to find the mid-sagittal plane in).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from score_calcium import InputError, write_atomic, write_json  # noqa: E402  (the scorer CLI beside this one)

from bundles.dst_ica_calcification.scripts.hemisphere import lps_affine_from_nifti  # noqa: E402
from bundles.dst_ica_calcification.scripts.segments import SEGMENTS, SegmentMapping, map_segments  # noqa: E402
from bundles.s2cac_coronary_calcium.scripts.scoring import DEFAULT_MASS_CALIBRATION, load_nifti_pair  # noqa: E402

PROG = "map_icac_segments"
COLUMNS = (("side", 6), ("segment", 13), ("Agatston", 10), ("volume (mm^3)", 14), ("mass (mg)", 11), ("lesions", 8))


def format_table(mapping: SegmentMapping) -> str:
    header = "  ".join(f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))
    lines = [header]
    widths = [w for _, w in COLUMNS]
    for side, rows in mapping.table().items():
        for seg in (*SEGMENTS, "total"):
            s = rows[seg]
            if seg == "total":
                lines.append("-" * len(header))
            lines.append(
                "  ".join(
                    [
                        f"{side:<{widths[0]}}",
                        f"{seg:<{widths[1]}}",
                        f"{s.agatston:>{widths[2]}.1f}",
                        f"{s.volume_mm3:>{widths[3]}.1f}",
                        f"{s.mass_mg:>{widths[4]}.2f}",
                        f"{s.lesions_2d_agatston:>{widths[5]}d}",
                    ]
                )
            )
        lines.append("")
    report = mapping.report()
    total = mapping.score.total
    place = ", ".join(
        f"{side} " + " / ".join(v if isinstance(v, str) else f"{v:.2f}" for v in bs)
        for side, bs in report["boundaries_slice_index"].items()
    )
    plane = mapping.plane
    lines += [
        f"both sides: Agatston {total.agatston:.1f}, volume {total.volume_mm3:.1f} mm^3, mass {total.mass_mg:.2f} mg",
        f"boundary slices (b1 / b2 / b3): {place}",
        "mid-sagittal plane: point ("
        + ", ".join(f"{v:.1f}" for v in plane.point_mm)
        + ") mm, normal ("
        + ", ".join(f"{v:.4f}" for v in plane.normal)
        + ") LPS",
        "lesions: 2D Agatston lesions (8-connected in-plane, >= 1 mm^2) per side and segment",
    ]
    lines += [f"warning: {w}" for w in mapping.warnings]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("image", type=Path, help="NIfTI head CT in HU")
    p.add_argument("calcium_mask", type=Path, help="NIfTI ICA calcium mask on the same grid (nonzero = calcium)")
    p.add_argument("landmarks", type=Path, help="JSON with the six boundary landmarks (e.g. a phantom's truth.json)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full, unrounded result as JSON")
    p.add_argument("--label-out", type=Path, metavar="NII", help="write the side/segment label map (values 1..8)")
    p.add_argument(
        "--mass-calibration",
        type=float,
        default=DEFAULT_MASS_CALIBRATION,
        metavar="F",
        help=f"mg HA/cm^3 per HU (default {DEFAULT_MASS_CALIBRATION:g}: the project phantoms at 120 kVp)",
    )
    return p


def load_landmarks(path: Path):
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def run(args: argparse.Namespace) -> tuple[SegmentMapping, object]:
    import nibabel as nib

    try:
        image, mask, spacing = load_nifti_pair(args.image, args.calcium_mask)
        nifti = nib.load(str(args.image))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    landmarks = load_landmarks(args.landmarks)
    try:
        mapping = map_segments(
            image,
            mask,
            lps_affine_from_nifti(nifti.affine),
            landmarks,
            spacing=spacing,
            mass_calibration=args.mass_calibration,
        )
    except ValueError as exc:
        raise InputError(f"{args.landmarks.name}: {exc}" if "landmark" in str(exc) else str(exc)) from exc
    return mapping, nifti


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mapping, nifti = run(args)
        if args.json is not None:
            write_json(args.json, mapping.report())
        if args.label_out is not None:
            import nibabel as nib

            out = nib.Nifti1Image(mapping.labels.transpose(2, 1, 0), nifti.affine, nifti.header)
            out.set_data_dtype("uint8")
            out.header.set_slope_inter(1, 0)
            write_atomic(args.label_out, lambda p: nib.save(out, str(p)))
    except (InputError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(format_table(mapping))
    for flag, path in (("--json", args.json), ("--label-out", args.label_out)):
        if path is not None:
            print(f"wrote {path} ({flag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
