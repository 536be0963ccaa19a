#!/usr/bin/env python
"""A synthetic DICOM study of one patient: a non-contrast cardiac CT series and/or a non-contrast head CT series.

Writes ``OUT/dicom/<kind>_<case>/`` (the study, the app's input) and ``OUT/truth/<case>/`` (the same volumes as
NIfTI, the truth label maps and truth.json, for checking the app against the truth and against the bundles).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms.chest import make_chest_case  # noqa: E402
from phantoms.head import make_head_case  # noqa: E402
from phantoms.writers import write_case  # noqa: E402

STUDY_TAGS = {
    "PatientName": "CALCIMAP^DEMO",
    "PatientID": "CMDEMO0001",
    "PatientBirthDate": "19580312",
    "PatientSex": "M",
    "StudyDescription": "CT Heart Calcium Score and Head",
    "AccessionNumber": "CMDEMO0001",
    "StudyID": "1",
}
SIZES = ("small", "medium", "full")


def make_study(
    out: Path,
    *,
    size: str = "small",
    chest: tuple[int, int] | None = (0, 1),
    head: tuple[int, int] | None = (0, 1),
    study_key: str = "calcimap-demo-study",
    chest_kwargs: dict | None = None,
    head_kwargs: dict | None = None,
) -> dict[str, Path]:
    """Write the study into ``out`` (replaced); returns {"chest": series folder, "head": ...} of what was made.

    ``chest_kwargs`` / ``head_kwargs`` go to ``make_chest_case`` / ``make_head_case`` (thickness, tilt_deg, ...).
    """
    case_kwargs = {"chest": chest_kwargs or {}, "head": head_kwargs or {}}
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    shutil.rmtree(out, ignore_errors=True)
    (out / "dicom").mkdir(parents=True)
    made = {}
    series_number = 1
    for kind, seeds, maker in (("chest", chest, make_chest_case), ("head", head, make_head_case)):
        if seeds is None:
            continue
        case = maker(seeds[0], seeds[1], size, **case_kwargs[kind])
        folder = write_case(
            case, out / "truth", dicom=True, study_key=study_key, series_number=series_number, study_tags=STUDY_TAGS
        )
        made[kind] = out / "dicom" / f"{kind}_{case.case_id}"
        (folder / "dicom").rename(made[kind])
        series_number += 1
    return made


def _seeds(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    seed, _, index = text.partition(":")
    return int(seed), int(index or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (replaced)")
    p.add_argument("--size", default="small", choices=SIZES, help="phantom size (see make_phantoms.py)")
    p.add_argument("--chest", default="0:1", type=_seeds, help="SEED:INDEX of the chest case, or none")
    p.add_argument("--head", default="0:1", type=_seeds, help="SEED:INDEX of the head case, or none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    made = make_study(args.out, size=args.size, chest=args.chest, head=args.head)
    for kind, folder in made.items():
        print(f"{kind}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
