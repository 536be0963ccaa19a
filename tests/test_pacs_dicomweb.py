"""The DICOMweb route of the PACS bridge against a real Orthanc (tests/orthanc_fixture.py).

A chest-only phantom study goes into Orthanc by C-STORE; ``python -m deploy_app.pacs dicomweb run`` finds it by
QIDO-RS, retrieves it by WADO-RS, runs the app and stores SEG, SR and PDF back by STOW-RS. The objects must be in
the same study, valid under dciodvfy, and a rerun or a watch pass must not add anything. Then Orthanc is stopped
while a forced rerun is in the app: the bridge retries, says so, and finishes once Orthanc is back, again
without duplicates. The app runs twice in this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from make_study import make_study
from orthanc_fixture import PACS_CHEST, PASSWORD, USER, Orthanc, c_store, orthanc_server
from test_app_dicom_writers import dciodvfy

from conftest import ROOT

pytestmark = pytest.mark.slow
EXPECTED = {"SEG": 1, "SR": 1, "DOC": 1}  # chest only: coronary SEG + SR, and the report
PATIENT_DATA = ("CALCIMAP^DEMO", "CMDEMO0001", "19580312")  # make_study's patient: never in a log line


def bridge(*args: str, env_auth: bool = True, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    env.pop("CALCIMAP_PACS_TOKEN", None)
    if env_auth:
        env.update(CALCIMAP_PACS_USER=USER, CALCIMAP_PACS_PASSWORD=PASSWORD)
    else:
        env.pop("CALCIMAP_PACS_USER", None)
        env.pop("CALCIMAP_PACS_PASSWORD", None)
    return subprocess.Popen([sys.executable, "-m", "deploy_app.pacs", *args], cwd=ROOT, env=env, text=True, **popen)


def run_bridge(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = bridge(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: do not leave the bridge running
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding one chest-only phantom study; yields (orthanc, study UID, number of CT instances, tmp)."""
    tmp = tmp_path_factory.mktemp("pacs_dicomweb")
    make_study(tmp / "study", chest=(0, 1), head=None, study_key="dicomweb", chest_kwargs=PACS_CHEST)
    files = sorted((tmp / "study" / "dicom").rglob("*.dcm"))
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with orthanc_server(tmp / "orthanc") as orthanc:
        assert set(c_store(files, orthanc.dicom_port)) == {0}
        yield orthanc, study, len(files), tmp


def test_orthanc_refuses_unknown_ae_and_anonymous_http(pacs):
    orthanc, study, _, tmp = pacs
    first = next((tmp / "study" / "dicom").rglob("*.dcm"))
    assert c_store([first], orthanc.dicom_port, calling_ae="INTRUDER") == [-1]  # DicomAlwaysAllowStore off
    assert requests.get(f"{orthanc.dicomweb}/studies", timeout=10).status_code == 401


def test_bad_credentials_fail_clearly(pacs):
    orthanc, study, _, tmp = pacs
    creds = tmp / "wrong.json"
    creds.write_text('{"user": "calcimap-test", "password": "wrong"}')
    r = run_bridge(
        "dicomweb",
        "run",
        "--url",
        orthanc.dicomweb,
        "--study",
        study,
        "--credentials",
        str(creds),
        "--workdir",
        str(tmp / "wrong"),
        env_auth=False,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"calcimap-pacs: error: the PACS refused the credentials (QIDO-RS lookup of {_report_uid(study)}: HTTP 401)"
    )


def _report_uid(study: str) -> str:
    from deploy_app.pacs.common import report_uid

    return report_uid(study)


@pytest.fixture(scope="module")
def stored(pacs):
    """The bridge run once on the study (the app runs); yields its CompletedProcess and workdir."""
    orthanc, study, _, tmp = pacs
    workdir = tmp / "work"
    r = run_bridge("dicomweb", "run", "--url", orthanc.dicomweb, "--study", study, "--workdir", str(workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, workdir


def test_results_in_the_same_study_and_valid(pacs, stored, tmp_path):
    orthanc, study, n_ct, _ = pacs
    r, workdir = stored
    assert r.stdout.strip() == f"study {study}: scored"
    assert orthanc.modality_counts(study) == {"CT": n_ct, **EXPECTED}
    found = orthanc.qido(f"studies/{study}/instances", includefield="00080060")
    outputs = [i for i in found if i["00080060"]["Value"][0] != "CT"]
    uids = {i["00080060"]["Value"][0]: (i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in outputs}
    assert uids["DOC"][1] == _report_uid(study)  # the UID "already done" looks up
    for modality, (series, sop) in uids.items():
        resp = requests.get(
            f"{orthanc.dicomweb}/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            auth=orthanc.auth,
            timeout=60,
        )
        assert resp.status_code == 200
        path = tmp_path / f"{modality}.dcm"
        path.write_bytes(_first_part(resp))
        ds = pydicom.dcmread(path)
        assert (ds.StudyInstanceUID, ds.Modality, ds.SOPInstanceUID) == (study, modality, sop)
        dciodvfy(path)
    assert not (workdir / "incoming" / study).exists()  # received instances go once the results are stored
    assert sorted(p.name for p in (workdir / "results" / study).glob("*.dcm")) == [
        "coronary_seg.dcm",
        "coronary_sr.dcm",
        "report_pdf.dcm",
    ]
    assert not any(p in r.stderr for p in PATIENT_DATA)


def _first_part(resp: requests.Response) -> bytes:
    """The body of the first part of a multipart/related WADO-RS answer."""
    boundary = resp.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    part = resp.content.split(b"--" + boundary)[1]
    body = part.split(b"\r\n\r\n", 1)[1]
    return body[: body.rfind(b"\r\n")]


def test_rerun_and_watch_add_nothing(pacs, stored, tmp_path):
    orthanc, study, n_ct, _ = pacs
    _, workdir = stored
    start = time.monotonic()
    r = run_bridge("dicomweb", "run", "--url", orthanc.dicomweb, "--study", study, "--workdir", str(workdir))
    assert (r.returncode, r.stdout.strip()) == (0, f"study {study}: already done"), r.stderr
    assert time.monotonic() - start < 30  # the app did not run
    modes = {"orthanc-changes": ["--orthanc", orthanc.url], "qido-polling": ["--days", "36500"]}
    for name, mode in modes.items():
        w = run_bridge(
            "dicomweb",
            "watch",
            "--url",
            orthanc.dicomweb,
            *mode,
            "--once",
            "--workdir",
            str(tmp_path / name),
            timeout=120,
        )
        assert w.returncode == 0, w.stderr
        status = run_bridge("status", "--json", "--workdir", str(tmp_path / name), timeout=60)
        data = json.loads(status.stdout)
        assert list(data["processed"]) == [study], name
        assert [(x["study"], x["outcome"]) for x in data["results"]] == [(study, "already done")], name
    assert orthanc.modality_counts(study) == {"CT": n_ct, **EXPECTED}
    status = run_bridge("status", "--workdir", str(workdir), timeout=60)
    assert f"{study} already done" in status.stdout and f"{study} scored (3 objects" in status.stdout


def test_pacs_down_from_the_start_fails_clearly(tmp_path):
    r = run_bridge(
        "dicomweb",
        "run",
        "--url",
        "http://127.0.0.1:9/dicom-web",
        "--study",
        "1.2.3",
        "--retries",
        "2",
        "--retry-delay",
        "0.1",
        "--workdir",
        str(tmp_path),
        timeout=120,
    )
    assert r.returncode == 7
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("calcimap-pacs: error: the PACS is unreachable: QIDO-RS lookup of ")
    assert "failed 2 times, last: ConnectionError" in last
    assert "retrying in 0.1 s" in r.stderr


def wait_for_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until ``text`` is in the bridge's log ``path``; fails if the bridge ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"the bridge ended early:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no '{text}' within {timeout} s:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)


def test_orthanc_down_mid_way_then_back(pacs, stored, tmp_path):
    orthanc: Orthanc = pacs[0]
    study, n_ct = pacs[1], pacs[2]
    log = tmp_path / "bridge.log"
    with open(log, "w") as err:
        proc = bridge(
            "dicomweb",
            "run",
            "--url",
            orthanc.dicomweb,
            "--study",
            study,
            "--force",
            "--retries",
            "30",
            "--retry-delay",
            "1",
            "--retry-max-delay",
            "4",
            "--workdir",
            str(tmp_path / "work"),
            stdout=subprocess.PIPE,
            stderr=err,
        )
        try:
            wait_for_log(log, "running the app on study", proc, 120)
            orthanc.stop()  # while the app runs: the STOW-RS that follows meets a dead PACS
            wait_for_log(log, "; retrying in", proc, 600)
            time.sleep(3)
            orthanc.start()
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert out.strip() == f"study {study}: scored"
    assert "STOW-RS of" in text and "failed (attempt 1/30: ConnectionError" in text
    assert orthanc.modality_counts(study) == {"CT": n_ct, **EXPECTED}  # no duplicates after the retried store
    assert not any(p in text for p in PATIENT_DATA)


def test_watch_processes_a_new_study_once(pacs, stored, tmp_path):
    """A second study arrives: one ``watch --orthanc --once`` pass runs the app on it alone (the first is done)."""
    orthanc: Orthanc = pacs[0]
    first = pacs[1]
    make_study(tmp_path / "second", chest=(0, 2), head=None, study_key="dicomweb-second", chest_kwargs=PACS_CHEST)
    files = sorted((tmp_path / "second" / "dicom").rglob("*.dcm"))
    second = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert set(c_store(files, orthanc.dicom_port)) == {0}
    deadline = time.monotonic() + 60
    while not _is_stable(orthanc, second):  # watch takes a study once Orthanc calls it stable
        assert time.monotonic() < deadline, "Orthanc did not call the study stable within 60 s"
        time.sleep(0.5)
    workdir = tmp_path / "work"
    r = run_bridge("dicomweb", "watch", "--url", orthanc.dicomweb, "--orthanc", orthanc.url, "--once",
                   "--workdir", str(workdir))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert orthanc.modality_counts(second) == {"CT": len(files), **EXPECTED}
    data = json.loads(run_bridge("status", "--json", "--workdir", str(workdir), timeout=60).stdout)
    outcomes = {x["study"]: x["outcome"] for x in data["results"]}
    assert outcomes == {first: "already done", second: "scored"}
    assert sorted(data["processed"]) == sorted([first, second])
    again = run_bridge("dicomweb", "watch", "--url", orthanc.dicomweb, "--orthanc", orthanc.url, "--once",
                       "--workdir", str(workdir), timeout=120)  # fmt: skip
    assert again.returncode == 0 and "running the app" not in again.stderr  # nothing new in the feed
    assert orthanc.modality_counts(second) == {"CT": len(files), **EXPECTED}


def _is_stable(orthanc: Orthanc, study_uid: str) -> bool:
    found = requests.post(f"{orthanc.url}/tools/lookup", data=study_uid, auth=orthanc.auth, timeout=30).json()
    return bool(found) and orthanc.get(f"/studies/{found[0]['ID']}")["IsStable"]
