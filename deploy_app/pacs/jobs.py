"""One study through the app, whatever route brought it: run, store the results, record, clean up.

Work folder layout (``--workdir``): ``incoming/<study>/`` received or retrieved instances, ``results/<study>/``
the app's outputs, ``logs/<study>.log`` the app's own log, ``failed/<study>/`` studies whose processing failed
(kept: nothing is lost), ``state.json`` (:mod:`deploy_app.pacs.state`). A study's received instances are
deleted only once its results are stored; result folders are deleted after ``retention_hours``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy_app.pacs.common import BridgeError, app_error_line, check_disk, peak_rss_mb, result_files, run_app
from deploy_app.pacs.state import BridgeState

logger = logging.getLogger("calcimap.pacs")

APP_OK, APP_NOT_SCORED = 0, 4  # deploy_app.cli.EXIT_CODES: with 4 the PDF still says why, and is stored


@dataclass(frozen=True)
class JobOptions:
    workdir: Path
    timeout_s: float = 1800.0
    min_free_gb: float = 2.0
    retention_hours: float = 24.0
    models: str | None = None

    def folder(self, kind: str, study: str) -> Path:
        return self.workdir / kind / study


def process_study(
    study: str,
    input_dir: Path,
    opts: JobOptions,
    state: BridgeState,
    store: Callable[[list[Path]], list[str]],
) -> str:
    """Run the app on ``input_dir`` and hand its DICOM outputs to ``store`` (which returns the stored SOP
    Instance UIDs); returns the outcome. On failure the study's instances move to ``failed/`` and the error is
    recorded before the :class:`BridgeError` goes on."""
    start = time.monotonic()
    state.running(study)
    try:
        check_disk(opts.workdir, opts.min_free_gb)
        out = opts.folder("results", study)
        log = opts.workdir / "logs" / f"{study}.log"
        logger.info("running the app on study %s", study)
        app = run_app(input_dir, out, log, opts.timeout_s, opts.models)
        if app.code not in (APP_OK, APP_NOT_SCORED):
            raise BridgeError("app", f"the app failed on study {study} (exit {app.code}): {app_error_line(log)}")
        files = result_files(out)
        if not files:
            raise BridgeError("app", f"the app wrote no DICOM object for study {study}")
        logger.info("storing %d objects for study %s", len(files), study)
        stored = store(files)
    except BridgeError as e:
        state.failed(study, e.kind, str(e))
        if e.kind != "pacs" and input_dir.exists():  # a PACS outage: the caller keeps the study for a retry
            failed = opts.folder("failed", study)
            shutil.rmtree(failed, ignore_errors=True)
            failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(input_dir), failed)
        raise
    outcome = "scored" if app.code == APP_OK else "not scored"
    memory = {"app_peak_rss_mb": round(app.peak_rss_mb, 1), "bridge_peak_rss_mb": round(peak_rss_mb(), 1)}
    state.finished(study, outcome, stored, time.monotonic() - start, memory)
    shutil.rmtree(input_dir, ignore_errors=True)  # results are stored: the received instances can go
    cleanup_results(opts)
    logger.info("study %s done: %s, %d objects stored", study, outcome, len(stored))
    return outcome


def cleanup_results(opts: JobOptions) -> None:
    """Delete result folders older than the retention time."""
    cutoff = time.time() - opts.retention_hours * 3600
    for folder in (opts.workdir / "results").glob("*"):
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed results of study %s (older than %g h)", folder.name, opts.retention_hours)
