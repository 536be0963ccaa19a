"""The DICOMweb route: QIDO-RS finds, WADO-RS retrieves, the app runs, STOW-RS stores into the same study.

``run_study`` processes one study; ``watch`` processes each new study once, through Orthanc's ``/changes`` feed
(``--orthanc URL``: StableStudy events) or, for any PACS, by polling QIDO-RS over a date window, with the set
of processed studies kept in ``state.json``. Every PACS request is retried with backoff
(:class:`~deploy_app.pacs.common.RetryPolicy`); a study counts as done when the app's report (stored last, with
a deterministic UID) is found in it.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from deploy_app.pacs.common import BridgeError, Credentials, RetryPolicy, check_disk, report_uid
from deploy_app.pacs.jobs import JobOptions, process_study
from deploy_app.pacs.state import BridgeState

logger = logging.getLogger("calcimap.pacs")

RETRIABLE = (requests.ConnectionError, requests.Timeout)
RETRIABLE_STATUS = {429, 500, 502, 503, 504}
CANDIDATE_MODALITY = "CT"


class _Retriable(Exception):
    """An HTTP answer worth retrying (the PACS is starting, overloaded or failing)."""


@dataclass
class DicomwebPacs:
    """A DICOMweb root with its credentials and retry policy."""

    url: str
    credentials: Credentials
    retry: RetryPolicy
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.session = session_for(self.credentials)
        self.client = DICOMwebClient(self.url.rstrip("/"), session=self.session)
        self.client.set_http_retry_params(retry=False)  # ours retries connection errors too, with a clear end

    def _call(self, what: str, fn):
        def attempt():
            try:
                return fn()
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status in RETRIABLE_STATUS:
                    raise _Retriable(f"HTTP {status}") from None
                if status in (401, 403):
                    raise BridgeError("usage", f"the PACS refused the credentials ({what}: HTTP {status})") from None
                raise

        return self.retry.call(what, attempt, (*RETRIABLE, _Retriable))

    def search(self, what: str, search, key: str, page: int = 100, **kwargs) -> list[dict]:
        """All results of a QIDO-RS search, page by page (``limit``/``offset``). dicomweb-client's own
        ``get_remaining`` never ends against Orthanc's study search, so paging stops on a short page or on a
        page that brings nothing new."""
        results: dict[str, dict] = {}
        offset = 0
        while True:
            found = self._call(what, lambda at=offset: search(limit=page, offset=at, **kwargs))
            new = {r[key]["Value"][0]: r for r in found if r.get(key, {}).get("Value")}
            if not new.keys() - results.keys():
                break
            results.update(new)
            offset += len(found)
            if len(found) < page:
                break
        return list(results.values())

    def ct_series(self, study: str) -> list[str]:
        """Series UIDs of the study's candidate (CT) series; the app chooses among them."""
        found = self.search(
            f"QIDO-RS series of {study}", self.client.search_for_series, "0020000E", study_instance_uid=study
        )
        return [
            s["0020000E"]["Value"][0]
            for s in found
            if s.get("00080060", {}).get("Value", [None])[0] == CANDIDATE_MODALITY
        ]

    def has_instance(self, study: str, sop_uid: str) -> bool:
        found = self._call(
            f"QIDO-RS lookup of {sop_uid}",
            lambda: self.client.search_for_instances(
                study_instance_uid=study, search_filters={"SOPInstanceUID": sop_uid}
            ),
        )
        return any(i.get("00080018", {}).get("Value", [None])[0] == sop_uid for i in found)

    def retrieve_series(self, study: str, series: str, folder: Path) -> int:
        """WADO-RS: every instance of the series into ``folder``; a retry starts the series over."""

        def fetch() -> int:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            n = 0
            for ds in self.client.iter_series(study_instance_uid=study, series_instance_uid=series):
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                n += 1
            return n

        return self._call(f"WADO-RS retrieval of series {series}", fetch)

    def store(self, study: str, files: list[Path]) -> list[str]:
        """STOW-RS, one object per request in the given order; a retry sends the same UIDs again (the PACS
        replaces or keeps them: never a duplicate)."""
        stored = []
        for path in files:
            ds = pydicom.dcmread(path)

            def stow(ds: pydicom.Dataset = ds) -> None:
                answer = self.client.store_instances([ds], study_instance_uid=study)
                if answer is not None and len(answer.get("FailedSOPSequence", [])):
                    reason = answer.FailedSOPSequence[0].get("FailureReason", "?")
                    raise BridgeError("pacs", f"the PACS refused {ds.SOPInstanceUID} (failure reason {reason})")

            self._call(f"STOW-RS of {ds.SOPInstanceUID}", stow)
            stored.append(str(ds.SOPInstanceUID))
        return stored


def session_for(credentials: Credentials) -> requests.Session:
    session = requests.Session()
    if credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials.user:
        session.auth = (credentials.user, credentials.password or "")
    return session


def run_study(pacs: DicomwebPacs, study: str, opts: JobOptions, state: BridgeState, force: bool = False) -> str:
    """Process one study: skip it when its report is already in the PACS (unless ``force``)."""
    if not force and pacs.has_instance(study, report_uid(study)):
        logger.info("study %s already has CalciMap results; skipping (use --force to reprocess)", study)
        state.finished(study, "already done", [], 0.0)
        return "already done"
    series = pacs.ct_series(study)
    if not series:
        raise BridgeError("not_found", f"no CT series found for study {study} in the PACS")
    state.queued(study)
    incoming = opts.folder("incoming", study)
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        check_disk(opts.workdir, opts.min_free_gb)
        total = sum(pacs.retrieve_series(study, s, incoming / s) for s in series)
    except BridgeError as e:
        state.failed(study, e.kind, str(e))
        raise
    logger.info("retrieved %d instances in %d CT series of study %s", total, len(series), study)
    return process_study(study, incoming, opts, state, lambda files: pacs.store(study, files))


def new_studies_qido(pacs: DicomwebPacs, days: int) -> list[str]:
    """Studies with a CT series and a StudyDate within the last ``days`` days (QIDO-RS)."""
    today = datetime.date.today()
    window = f"{(today - datetime.timedelta(days=days)):%Y%m%d}-{today:%Y%m%d}"
    found = pacs.search(
        "QIDO-RS study search",
        pacs.client.search_for_studies,
        "0020000D",
        search_filters={"StudyDate": window, "ModalitiesInStudy": CANDIDATE_MODALITY},
    )
    return [s["0020000D"]["Value"][0] for s in found]


class OrthancChanges:
    """Orthanc's ``/changes`` feed: StableStudy events since the last one seen (kept in ``state.json``)."""

    def __init__(self, url: str, credentials: Credentials, retry: RetryPolicy, state: BridgeState):
        self.url, self.retry, self.state = url.rstrip("/"), retry, state
        self.session = session_for(credentials)

    def _get(self, path: str) -> dict:
        def get() -> dict:
            r = self.session.get(f"{self.url}{path}", timeout=30)
            if r.status_code in RETRIABLE_STATUS:
                raise _Retriable(f"HTTP {r.status_code}")
            r.raise_for_status()
            return r.json()

        return self.retry.call(f"Orthanc {path.split('?')[0]}", get, (*RETRIABLE, _Retriable))

    def new_studies(self) -> list[str]:
        since = int(self.state.read().get("orthanc_since", 0))
        studies: list[str] = []
        while True:
            page = self._get(f"/changes?since={since}&limit=100")
            for change in page["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    tags = self._get(f"/studies/{change['ID']}")["MainDicomTags"]
                    studies.append(tags["StudyInstanceUID"])
            since = int(page["Last"])
            if page["Done"]:
                break
        self.state._update(lambda d: d.__setitem__("orthanc_since", since))
        return studies


def watch(
    pacs: DicomwebPacs,
    opts: JobOptions,
    state: BridgeState,
    *,
    orthanc: OrthancChanges | None,
    days: int,
    interval_s: float,
    once: bool,
) -> int:
    """Process each new study once; returns how many studies failed (in ``--once`` mode the exit status)."""
    failures = 0
    while True:
        studies = orthanc.new_studies() if orthanc else new_studies_qido(pacs, days)
        for study in dict.fromkeys(studies):
            if state.is_processed(study):
                continue
            try:
                run_study(pacs, study, opts, state)
            except BridgeError as e:
                failures += 1
                logger.error("study %s: %s", study, e)
                if e.kind == "pacs":
                    break  # the PACS is down: try again next round
                state.mark_processed(study)  # the error is in `status`; --force with `dicomweb run` retries it
        if once:
            return failures
        time.sleep(interval_s)
