#!/usr/bin/env python
"""`make demo`: make a small synthetic chest study (NIfTI + DICOM), print its truth, write a montage PNG."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms.chest import make_chest_case  # noqa: E402
from phantoms.montage import write_montage  # noqa: E402
from phantoms.writers import write_case  # noqa: E402

DEMO_SEED, DEMO_INDEX = 0, 1  # a case with calcium in several coronary arteries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("output/demo"), help="output folder (replaced)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    case = make_chest_case(DEMO_SEED, DEMO_INDEX, "small")
    folder = write_case(case, args.out, dicom=True)
    print(f"synthetic chest study: {folder} ({case.grid.shape[0]} slices, {case.grid.pixel_mm:.2f} mm pixels)")
    print(f"{'vessel':6} {'diameter mm':>11} {'mg HA/cm3':>9} {'volume mm3':>10} {'peak HU':>8}")
    for les in case.truth["lesions"]:
        print(
            f"{les['vessel']:6} {2 * max(les['radii_mm']):11.1f} {les['density_mg_ha_cm3']:9.0f} "
            f"{les['volume_mm3']:10.2f} {les['peak_hu'] if les['peak_hu'] is not None else '-':>8}"
        )
    png = write_montage([folder], args.out / "montage.png")
    print(f"DICOM series: {folder / 'dicom'}")
    print(f"montage: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
