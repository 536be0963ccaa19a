"""The DIMSE route: a C-STORE SCP that collects pushed studies and C-STOREs the app's results to a destination.

Instances are written to ``incoming/<study>/<series>/<sop>.dcm`` as they arrive. A study with no new instance
for ``quiet_s`` seconds is complete: it moves to ``processing/<study>/`` and joins the one worker queue (one app
run at a time). Its results go to the destination AE by C-STORE with retries; only then are its instances
deleted. Instances that arrive later for the same study start a new round (the results' UIDs are deterministic,
so the PACS receives the same objects again, never duplicates). Studies left on disk by an earlier run (a crash,
a PACS outage) are queued again at start. C-ECHO is answered. With an allow-list (``--allow-ae``) associations from
other calling AE titles are rejected.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from deploy_app.pacs.common import BridgeError, RetryPolicy, check_disk
from deploy_app.pacs.jobs import JobOptions, process_study
from deploy_app.pacs.state import BridgeState

logger = logging.getLogger("calcimap.pacs")

UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")  # also keeps received UIDs from naming paths outside the work folder
STATUS_OK, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


class _StoreFailed(Exception):
    """An association or C-STORE that did not succeed (worth retrying)."""


def store_files(calling_ae: str, dest: Destination, files: list[Path], retry: RetryPolicy) -> list[str]:
    """C-STORE ``files`` to ``dest`` in one association, retried as a whole; returns the stored SOP UIDs."""
    datasets = [pydicom.dcmread(p) for p in files]

    def send() -> list[str]:
        ae = AE(ae_title=calling_ae)
        for ds in datasets:
            syntaxes = list(dict.fromkeys([str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian]))
            ae.add_requested_context(ds.SOPClassUID, syntaxes)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise _StoreFailed(f"no association with {dest.ae_title}@{dest.host}:{dest.port}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise _StoreFailed(f"no C-STORE answer for {ds.SOPInstanceUID} (connection lost)")
                if code not in (STATUS_OK, 0xB000, 0xB007, 0xB006):  # success, or success with a warning
                    raise _StoreFailed(f"C-STORE of {ds.SOPInstanceUID} answered 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return [str(ds.SOPInstanceUID) for ds in datasets]

    return retry.call(f"C-STORE to {dest.ae_title}", send, (_StoreFailed, OSError))


class StoreScp:
    """The SCP, its quiet-time monitor and its single worker; ``start()`` returns once it listens."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        dest: Destination,
        opts: JobOptions,
        retry: RetryPolicy,
        quiet_s: float = 30.0,
        requeue_s: float = 300.0,
        bind: str = "0.0.0.0",
        allow_ae: tuple[str, ...] = (),
    ):
        self.ae_title, self.port, self.bind, self.dest = ae_title, port, bind, dest
        self.allow_ae = allow_ae  # calling AE titles accepted; empty: any
        self.opts, self.retry, self.quiet_s, self.requeue_s = opts, retry, quiet_s, requeue_s
        self.state = BridgeState(opts.workdir)
        self.incoming, self.processing = opts.workdir / "incoming", opts.workdir / "processing"
        self._lock = threading.Lock()
        self._last_seen: dict[str, float] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._server = None

    # -- receiving
    def _on_echo(self, event: evt.Event) -> int:
        logger.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_OK

    def _on_store(self, event: evt.Event) -> int:
        try:
            check_disk(self.opts.workdir, self.opts.min_free_gb)
        except BridgeError as e:
            logger.error("refusing an instance: %s", e)
            return STATUS_OUT_OF_RESOURCES
        ds = event.dataset
        ds.file_meta = event.file_meta
        uids = [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(UID_RE.match(u) for u in uids):
            logger.error("refusing an instance without valid study/series/instance UIDs")
            return STATUS_CANNOT_UNDERSTAND
        study, series, sop = uids
        with self._lock:
            folder = self.incoming / study / series
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{sop}.partial"
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(folder / f"{sop}.dcm")
            if study not in self._last_seen:
                logger.info("receiving study %s from %s", study, event.assoc.requestor.ae_title)
            self._last_seen[study] = time.monotonic()
        return STATUS_OK

    # -- deciding a study is complete
    def _monitor(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                ready = [s for s, t in self._last_seen.items() if now - t >= self.quiet_s]
                for study in ready:
                    del self._last_seen[study]
                    if not self._take(study):
                        self._last_seen[study] = now  # still being processed: try again after another quiet time

    def _take(self, study: str) -> bool:
        """Move a complete study from incoming/ to processing/ and queue it (under the lock)."""
        target = self.processing / study
        if not (self.incoming / study).is_dir():
            return True  # nothing left to take
        if target.exists():
            return False  # the previous round of this study is still queued or running
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.incoming / study).rename(target)
        n = sum(1 for _ in target.rglob("*.dcm"))
        logger.info("study %s complete after %g s quiet (%d instances); queued", study, self.quiet_s, n)
        self.state.queued(study)
        self._queue.put(study)
        return True

    # -- processing
    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                study = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            folder = self.processing / study
            try:
                process_study(study, folder, self.opts, self.state, self._store)
            except BridgeError as e:
                logger.error("study %s: %s", study, e)
                if e.kind == "pacs" and not self._stop.is_set():
                    logger.warning("study %s stays on disk; trying again in %g s", study, self.requeue_s)
                    timer = threading.Timer(self.requeue_s, self._queue.put, [study])
                    timer.daemon = True
                    timer.start()
            except Exception:  # a bug must not stop the worker: record it, keep the study
                logger.exception("study %s: internal error", study)
                self.state.failed(study, "internal", "internal error; see the bridge log")

    def _store(self, files: list[Path]) -> list[str]:
        return store_files(self.ae_title, self.dest, files, self.retry)

    def _recover(self) -> None:
        """Queue what an earlier run left: processing/ at once, incoming/ after a quiet time."""
        for folder in sorted(self.processing.glob("*")):
            if folder.is_dir() and UID_RE.match(folder.name):
                logger.info("study %s left from an earlier run; queued", folder.name)
                self.state.queued(folder.name)
                self._queue.put(folder.name)
        for folder in sorted(self.incoming.glob("*")):
            if folder.is_dir() and UID_RE.match(folder.name):
                self._last_seen[folder.name] = time.monotonic()

    def start(self) -> None:
        self.opts.workdir.mkdir(parents=True, exist_ok=True)
        self._recover()
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        if self.allow_ae:
            ae.require_calling_aet = list(self.allow_ae)  # others are rejected at association
        else:
            logger.warning("accepting associations from any calling AE title (--allow-ae limits them)")
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        for target in (self._monitor, self._worker):
            threading.Thread(target=target, daemon=True, name=f"calcimap-{target.__name__.strip('_')}").start()
        logger.info(
            "%s listening on %s:%d; results go to %s@%s:%d",
            self.ae_title,
            self.bind,
            self.port,
            self.dest.ae_title,
            self.dest.host,
            self.dest.port,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
