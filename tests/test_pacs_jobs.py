"""The PACS bridge's operating guards, without a PACS: the per-study timeout, the free-disk guard (before the app
and in the SCP), retention of result folders, the SCP's calling-AE allow-list, and bearer-token credentials.

A study that fails any of these is kept under ``failed/`` with the reason in ``state.json``: nothing is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from make_study import make_study
from orthanc_fixture import PACS_CHEST, c_store, free_port
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_pacs_dicomweb import bridge, run_bridge

from deploy_app.pacs.common import BridgeError, Credentials, RetryPolicy
from deploy_app.pacs.dimse import Destination, StoreScp
from deploy_app.pacs.jobs import JobOptions, cleanup_results, process_study
from deploy_app.pacs.state import BridgeState, format_status

TOKEN = "bearer-token-for-tests"


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> tuple[str, list[Path]]:
    tmp = tmp_path_factory.mktemp("pacs_jobs")
    make_study(tmp / "study", chest=(0, 1), head=None, study_key="pacs-jobs", chest_kwargs=PACS_CHEST)
    files = sorted((tmp / "study" / "dicom").rglob("*.dcm"))
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def _received(workdir: Path, study: str, files: list[Path]) -> Path:
    """The study as the SCP leaves it for the worker: ``processing/<study>/<series>/<sop>.dcm``."""
    folder = workdir / "processing" / study
    for f in files:
        target = folder / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    return folder


def _never_store(files: list[Path]) -> list[str]:
    raise AssertionError("nothing may be stored for a failed study")


def _processes_with(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended while we looked
    return pids


def test_timeout_stops_the_app_and_keeps_the_study(tmp_path, study_files):
    study, files = study_files
    state = BridgeState(tmp_path)
    folder = _received(tmp_path, study, files)
    opts = JobOptions(tmp_path, timeout_s=3)  # the app needs more than that just to start
    start = time.monotonic()
    with pytest.raises(BridgeError) as e:
        process_study(study, folder, opts, state, _never_store)
    assert e.value.kind == "timeout"
    assert str(e.value) == "the app ran past the 3 s timeout and was stopped"
    assert time.monotonic() - start < 30
    assert _processes_with(str(tmp_path / "results")) == []  # the app was killed, not left running
    assert not folder.exists()
    assert len(list((tmp_path / "failed" / study).rglob("*.dcm"))) == len(files)  # nothing lost
    assert not list((tmp_path / "results").rglob("*.dcm"))  # nothing half-written to store later
    data = state.read()
    assert data["running"] is None and data["results"] == []
    assert [(x["study"], x["kind"]) for x in data["errors"]] == [(study, "timeout")]
    assert f"{study} [timeout] the app ran past" in format_status(data)


def test_a_killed_bridge_takes_its_app_run_with_it(tmp_path, study_files):
    """SIGKILL to ``dimse serve`` while the app runs: the app goes too (it would otherwise write results for a
    study that the restarted bridge queues again), and the study stays in processing/ for that restart."""
    study, files = study_files
    workdir, log = tmp_path / "work", tmp_path / "bridge.log"
    _received(workdir, study, files)  # left by an earlier run: queued at start
    app_marker = str(workdir / "results" / study)
    with open(log, "w") as err:
        proc = bridge(
            "dimse", "serve", "--port", str(free_port()), "--bind", "127.0.0.1", "--dest-ae", "SINK",
            "--dest-host", "127.0.0.1", "--dest-port", str(free_port()), "--workdir", str(workdir),
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _processes_with(app_marker):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _processes_with(app_marker):
        assert time.monotonic() < deadline, "the app outlived the bridge"
        time.sleep(0.1)
    assert len(list((workdir / "processing" / study).rglob("*.dcm"))) == len(files)


def test_disk_guard_refuses_before_the_app_runs(tmp_path, study_files):
    study, files = study_files
    state = BridgeState(tmp_path)
    folder = _received(tmp_path, study, files)
    with pytest.raises(BridgeError) as e:
        process_study(study, folder, JobOptions(tmp_path, min_free_gb=1e9), state, _never_store)
    assert e.value.kind == "disk"
    assert str(e.value).startswith("only ") and str(e.value).endswith("the bridge needs 1e+09 GB")
    assert not (tmp_path / "logs").exists()  # the app never started
    assert len(list((tmp_path / "failed" / study).rglob("*.dcm"))) == len(files)
    assert state.read()["errors"][0]["kind"] == "disk"


def test_retention_removes_only_old_result_folders(tmp_path):
    old, fresh = tmp_path / "results" / "1.2.3", tmp_path / "results" / "1.2.4"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "report_pdf.dcm").write_bytes(b"x")
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    cleanup_results(JobOptions(tmp_path, retention_hours=24))
    assert not old.exists() and fresh.is_dir()


@pytest.fixture
def scp(tmp_path):
    """The bridge's SCP in this process, allowing only TESTSCU, on a disk it thinks is full."""
    port = free_port()
    opts = JobOptions(tmp_path / "work", min_free_gb=1e9)
    server = StoreScp(
        "CALCIMAP", port, Destination("SINK", "127.0.0.1", free_port()), opts, RetryPolicy(1), bind="127.0.0.1",
        allow_ae=("TESTSCU",),
    )  # fmt: skip
    server.start()
    yield server
    server.stop()


def _echo(port: int, calling_ae: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CALCIMAP")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def test_scp_answers_only_allowed_ae_titles(scp):
    assert _echo(scp.port, "TESTSCU")
    assert not _echo(scp.port, "INTRUDER")


def test_scp_refuses_instances_when_the_disk_is_low(scp, study_files):
    _, files = study_files
    assert c_store(files[:2], scp.port, calling_ae="TESTSCU", called_ae="CALCIMAP") == [0xA700, 0xA700]
    assert not list((scp.opts.workdir / "incoming").rglob("*"))


class _Qido(BaseHTTPRequestHandler):
    """A DICOMweb root that knows no study and wants ``Authorization: Bearer TOKEN``."""

    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def qido_root():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Qido)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("token", [TOKEN, "a-wrong-token"])
def test_bearer_token_from_a_credentials_file(tmp_path, qido_root, token):
    creds = tmp_path / "token.json"
    creds.write_text(json.dumps({"token": token}))
    url = f"http://127.0.0.1:{qido_root.server_address[1]}/dicom-web"
    r = run_bridge(
        "dicomweb", "run", "--url", url, "--study", "1.2.3", "--credentials", str(creds), "--retries", "1",
        "--workdir", str(tmp_path / "work"), env_auth=False, timeout=120,
    )  # fmt: skip
    assert qido_root.seen and set(qido_root.seen) == {f"Bearer {token}"}
    last = r.stderr.strip().splitlines()[-1]
    if token == TOKEN:  # let in: the study is simply not there
        assert (r.returncode, last) == (4, "calcimap-pacs: error: no CT series found for study 1.2.3 in the PACS")
    else:
        assert r.returncode == 2
        assert last.startswith("calcimap-pacs: error: the PACS refused the credentials (QIDO-RS lookup of ")
    assert token not in r.stderr + r.stdout


def test_credentials_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CALCIMAP_PACS_TOKEN", TOKEN)
    assert Credentials.load(None).token == TOKEN
    (tmp_path / "bad.json").write_text('{"password": "only"}')
    with pytest.raises(BridgeError, match="needs 'user' and 'password', or 'token'") as e:
        Credentials.load(str(tmp_path / "bad.json"))
    assert e.value.kind == "usage"
