"""What both routes share: credentials, retries with backoff, the disk guard, running the app, its outputs.

Nothing here logs patient data: log lines carry UIDs, counts and paths under the bridge's work folder only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger("calcimap.pacs")

T = TypeVar("T")

PACS_EXIT_CODES = {
    "ok": 0,  # processed and stored, or already done
    "internal": 1,
    "usage": 2,  # bad arguments or credentials file
    "app": 3,  # the app failed on the study (its exit code and error line are logged and kept in status)
    "not_found": 4,  # the study or its CT series are not in the PACS
    "timeout": 5,  # the app ran past --timeout
    "disk": 6,  # not enough free disk for the study
    "pacs": 7,  # the PACS stayed unreachable through every retry
}
APP_STACK_BYTES = 32 * 1024 * 1024  # Holoscan warns below a 32 MiB stack (DESIGN.md, Known traps)


class BridgeError(Exception):
    """A failure with its exit-code kind (:data:`PACS_EXIT_CODES`) and one clear line for the user."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials for a DICOMweb root: basic (user, password) or a bearer token, or none."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    @classmethod
    def load(cls, path: str | None) -> Credentials:
        """From ``path`` (JSON ``{"user": ..., "password": ...}`` or ``{"token": ...}``), else the environment
        (``CALCIMAP_PACS_USER`` / ``CALCIMAP_PACS_PASSWORD`` or ``CALCIMAP_PACS_TOKEN``); never the command line,
        where other users of the machine could read them."""
        if path:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise BridgeError("usage", f"cannot read the credentials file {path}: {e}") from None
            if not isinstance(data, dict) or not (data.get("token") or data.get("user")):
                raise BridgeError("usage", f"the credentials file {path} needs 'user' and 'password', or 'token'")
            return cls(data.get("user"), data.get("password"), data.get("token"))
        env = os.environ
        return cls(env.get("CALCIMAP_PACS_USER"), env.get("CALCIMAP_PACS_PASSWORD"), env.get("CALCIMAP_PACS_TOKEN"))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``attempts`` tries, waiting ``delay_s`` * 2**n (at most ``max_delay_s``) between."""

    attempts: int = 8
    delay_s: float = 2.0
    max_delay_s: float = 60.0

    def call(self, what: str, fn: Callable[[], T], retriable: tuple[type[BaseException], ...]) -> T:
        """``fn()``, retried on ``retriable`` errors; after the last try a :class:`BridgeError` ("pacs")."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except retriable as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if attempt == self.attempts:
                    raise BridgeError(
                        "pacs", f"the PACS is unreachable: {what} failed {attempt} times, last: {reason}"
                    ) from None
                wait = min(self.max_delay_s, self.delay_s * 2 ** (attempt - 1))
                logger.warning(
                    "%s failed (attempt %d/%d: %s); retrying in %.1f s", what, attempt, self.attempts, reason, wait
                )
                time.sleep(wait)
        raise AssertionError("unreachable")


def check_disk(folder: Path, min_free_gb: float) -> None:
    """Refuse to take in a study when the work folder's disk has less than ``min_free_gb`` GB free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free / 1e9
    if free < min_free_gb:
        raise BridgeError("disk", f"only {free:.1f} GB free under {folder}; the bridge needs {min_free_gb:g} GB")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prepare_app_process() -> None:
    """In the app's child process before exec: die with the bridge (a bridge that is killed must not leave an app
    writing results for a study that a restarted bridge queues again), and a stack Holoscan is happy with."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < APP_STACK_BYTES:
        want = APP_STACK_BYTES if hard == resource.RLIM_INFINITY else min(APP_STACK_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


@dataclass(frozen=True)
class AppRun:
    """One run of the app: its exit code and its own peak resident memory (for ``status`` and stability)."""

    code: int
    peak_rss_mb: float


def run_app(input_dir: Path, output_dir: Path, log_file: Path, timeout_s: float, models: str | None = None) -> AppRun:
    """Run ``python -m deploy_app`` on one study folder; its stdout and stderr go to ``log_file``.

    The exit code is 0 scored, 4 not scored but reports written, others: see deploy_app.cli.
    A run past ``timeout_s`` is killed and raises a :class:`BridgeError` ("timeout").
    """
    cmd = [sys.executable, "-m", "deploy_app", "-i", str(input_dir), "-o", str(output_dir), "-l", "WARNING"]
    if models:
        cmd += ["-m", models]
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_prepare_app_process)
    deadline = time.monotonic() + timeout_s
    # os.wait4 rather than Popen.wait: it also gives this child's own resource usage (RUSAGE_CHILDREN would
    # only give the largest child so far).
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return AppRun(proc.returncode, usage.ru_maxrss / 1024.0)  # Linux: kB
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise BridgeError("timeout", f"the app ran past the {timeout_s:g} s timeout and was stopped")
        time.sleep(0.1)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def app_error_line(log_file: Path) -> str:
    """The app's ``calcimap: error: ...`` line from its log (no patient data: the app reports series numbers)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("calcimap: error:")]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


def result_files(output_dir: Path) -> list[Path]:
    """The DICOM objects the app wrote, in store order: SEGs, then SRs, then the PDF last.

    The PDF is written on every run (scored or not) and its UID is what "already done" looks up, so storing it
    last means a study counts as done only once everything else is in the PACS.
    """
    files = sorted(output_dir.glob("*.dcm"))
    rank = {"seg": 0, "sr": 1}
    return sorted(files, key=lambda p: (rank.get(p.stem.rsplit("_", 1)[-1], 2), p.name))


def report_uid(study_uid: str) -> str:
    """SOP Instance UID of the app's Encapsulated PDF report for ``study_uid``: deterministic (the study and the
    app's version), so it can be looked up in the PACS before the app runs."""
    from deploy_app import __version__
    from deploy_app.dicom_output import Algorithm
    from deploy_app.pdf_writer import pdf_uids

    return pdf_uids(study_uid, Algorithm("CalciMap", __version__))[1]  # as deploy_app.outputs.APP_ALGORITHM
