"""Everything the app writes for a study, written all-or-nothing.

Per scored path one DICOM SEG and one TID 1500 SR (and, when asked for, a Secondary Capture series with the
overlay); per study the PDF report (as a file and as DICOM Encapsulated PDF) and ``results.json``. All objects
are first written into a hidden staging folder inside the output folder; only when every one of them is complete
are they moved into place (a rename each), so a failure leaves no partial object behind, and a re-run replaces the
previous run's files (fixed names, deterministic UIDs) instead of adding to them. Output files of an earlier run
that this run does not produce (a path no longer scored, a Secondary Capture series not asked for) are removed,
after the new ones are in place, and so is the staging folder of an earlier run that was killed before it could
clean up (its name carries the process id: a folder of a process still running is left alone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploy_app import __version__
from deploy_app.dicom_output import Algorithm
from deploy_app.pdf_report import KeyImages, render_report_pdf
from deploy_app.pdf_writer import write_pdf
from deploy_app.pipeline import PATHS, PathResult, Timer
from deploy_app.sc_writer import SC_FILE_PATTERN, write_sc_series
from deploy_app.seg_writer import write_seg
from deploy_app.sr_writer import write_sr
from deploy_app.study import Study

logger = logging.getLogger(__name__)

APP_ALGORITHM = Algorithm("CalciMap", __version__)
REPORT_TITLE = "CalciMap vascular calcium report"
OUTPUT_NAMES = (
    *(f"{p}_{kind}.dcm" for p in PATHS for kind in ("seg", "sr")),
    "report.pdf",
    "report_pdf.dcm",
    "results.json",
)


def key_images(result: PathResult) -> KeyImages:
    vol = result.scored_volume
    a = vol.affine_lps[:3]
    normal = np.cross(a[:, 0], a[:, 1])
    normal /= np.linalg.norm(normal)
    positions = tuple(float((a[:, 3] + k * a[:, 2]) @ normal) for k in range(vol.hu.shape[0]))
    return KeyImages(
        hu=vol.hu,
        labels=result.scored_labels,
        pixel_spacing_mm=vol.pixel_spacing_mm,
        increment_mm=vol.increment_mm,
        slice_positions_mm=positions,
        in_plane_directions_lps=tuple(tuple(float(v) for v in a[:, n] / np.linalg.norm(a[:, n])) for n in (0, 1)),
    )


def _write_all(
    stage: Path,
    study: Study,
    results: Mapping[str, PathResult | None],
    report: dict[str, Any],
    secondary_capture: bool,
) -> None:
    timings = report["timings_s"]
    scored = {p: r for p, r in results.items() if r is not None and r.scored}
    for path, r in scored.items():
        with Timer(timings, f"write_seg_{path}"):
            seg = write_seg(r.volume.datasets, r.labels, path, stage / f"{path}_seg.dcm")
        with Timer(timings, f"write_sr_{path}"):
            write_sr(r.volume.datasets, seg, r.score, stage / f"{path}_sr.dcm", quality=r.findings)
        if secondary_capture:
            with Timer(timings, f"write_sc_{path}"):
                series_uid, images = write_sc_series(
                    r.volume.datasets,
                    r.volume.hu,
                    r.labels,
                    path,
                    stage,
                    app_name=f"{APP_ALGORITHM.name} {__version__}",
                )
            report["paths"][path]["secondary_capture"] = {
                "series_uid": series_uid,
                "images": len(images),
            }
    with Timer(timings, "write_pdf"):
        pdf = render_report_pdf(report, {p: key_images(r) for p, r in scored.items()})
        (stage / "report.pdf").write_bytes(pdf)
        used = [r for r in results.values() if r is not None]
        source = used[0].choice.datasets[0] if used else study.first
        write_pdf(
            source,
            pdf,
            stage / "report_pdf.dcm",
            title=REPORT_TITLE,
            algorithm=APP_ALGORITHM,
            referenced_series=[(r.choice.series_uid, r.choice.datasets) for r in used],
        )
    (stage / "results.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")


STAGING_PREFIX = ".calcimap-partial-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of runs that were killed (SIGKILL, out of memory) before their ``finally`` ran."""
    for folder in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid_text = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that process is alive: perhaps another run writing here
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, under another user
        logger.info("removing %s, left by a run that did not finish", folder.name)
        shutil.rmtree(folder, ignore_errors=True)


def _ours(name: str) -> bool:
    """A file name this app writes into an output folder."""
    return name in OUTPUT_NAMES or SC_FILE_PATTERN.match(name) is not None


def write_outputs(
    out_dir: str | os.PathLike,
    study: Study,
    results: Mapping[str, PathResult | None],
    report: dict[str, Any],
    secondary_capture: bool = False,
) -> list[Path]:
    """Write the study's objects into ``out_dir`` all-or-nothing; return the written paths.

    ``secondary_capture``: also a Secondary Capture series with the overlay per scored path (``sc_writer``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        _write_all(stage, study, results, report, secondary_capture)
        # results.json was written before the writers' timings were complete: write it again with them.
        (stage / "results.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
        written = sorted(p.name for p in stage.iterdir())
        for name in written:
            os.replace(stage / name, out_dir / name)
        for old in out_dir.iterdir():
            if _ours(old.name) and old.name not in written:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    paths = [out_dir / name for name in written]
    logger.info("wrote %s", ", ".join(describe_written(paths, names_only=True)))
    return paths


def describe_written(paths: list[Path], names_only: bool = False) -> list[str]:
    """The written files, a Secondary Capture series as one entry ("first .. last (N images)")."""
    lines, series = [], {}
    for p in paths:
        if SC_FILE_PATTERN.match(p.name):
            series.setdefault(p.name.split("_sc_")[0], []).append(p)
        else:
            lines.append(p.name if names_only else str(p))
    for files in series.values():
        first, last = (f.name if names_only else str(f) for f in (files[0], files[-1]))
        lines.append(f"{first} .. {last} ({len(files)} Secondary Capture images)" if len(files) > 1 else first)
    return lines
