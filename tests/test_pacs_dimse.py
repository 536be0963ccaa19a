"""The DIMSE route of the PACS bridge, fed by Orthanc's auto-routing, against a real Orthanc.

Orthanc runs ``deploy/orthanc/autorouting.lua``: each stable CT series goes by C-STORE to the bridge's SCP
(``python -m deploy_app.pacs dimse serve``), which waits for a quiet time, runs the app from its one worker queue
and C-STOREs SEG, SR and PDF back to Orthanc. Three chest-only studies sent to Orthanc at once must each come
back with exactly one SEG, SR and PDF in the same study, the app having run once per study; the objects must pass
dciodvfy; the received instances must be gone once their results are stored. The app runs three times here.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pydicom
import pytest
import requests
from make_study import make_study
from orthanc_fixture import ORTHANC_AE, PACS_CHEST, c_store, orthanc_server
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_app_dicom_writers import dciodvfy
from test_pacs_dicomweb import EXPECTED, PATIENT_DATA, bridge, run_bridge, wait_for_log

from conftest import ROOT

pytestmark = pytest.mark.slow
N_STUDIES = 3
QUIET_S = 8  # longer than Orthanc's StableAge plus its routing delay, so a study's series arrive as one round


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Orthanc with the auto-routing script and the bridge's SCP running; yields (orthanc, studies, workdir, log)."""
    tmp = tmp_path_factory.mktemp("pacs_dimse")
    studies = {}
    for i in range(1, N_STUDIES + 1):
        make_study(tmp / f"s{i}", chest=(0, i), head=None, study_key=f"dimse-s{i}", chest_kwargs=PACS_CHEST)
        files = sorted((tmp / f"s{i}" / "dicom").rglob("*.dcm"))
        studies[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
    lua = [ROOT / "deploy" / "orthanc" / "autorouting.lua"]
    with orthanc_server(tmp / "orthanc", {"calcimap": ("CALCIMAP", 0)}, lua, stable_age_s=2) as orthanc:
        port = orthanc.modalities["calcimap"][1]
        workdir, log = tmp / "work", tmp / "bridge.log"
        with open(log, "w") as err:
            proc = bridge(
                "dimse", "serve", "--ae", "CALCIMAP", "--port", str(port), "--bind", "127.0.0.1",
                "--allow-ae", ORTHANC_AE, "--allow-ae", "TESTSCU",
                "--dest-ae", ORTHANC_AE, "--dest-host", "127.0.0.1", "--dest-port", str(orthanc.dicom_port),
                "--quiet", str(QUIET_S), "--retry-delay", "1", "--workdir", str(workdir),
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        try:
            wait_for_log(log, "listening on", proc, 120)
            yield orthanc, studies, workdir, log, port
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_c_echo(routed):
    orthanc, _, _, _, port = routed
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CALCIMAP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    r = requests.post(f"{orthanc.url}/modalities/calcimap/echo", data="{}", auth=orthanc.auth, timeout=30)
    assert r.status_code == 200  # Orthanc reaches the bridge under the name the Lua script routes to


def test_three_studies_at_once_each_come_back_once(routed, tmp_path):
    orthanc, studies, workdir, log, _ = routed
    statuses: dict[str, list[int]] = {}
    threads = [
        threading.Thread(target=lambda s=s, f=f: statuses.__setitem__(s, c_store(f, orthanc.dicom_port)))
        for s, f in studies.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {s: set(v) for s, v in statuses.items()} == {s: {0} for s in studies}
    want = {s: {"CT": len(f), **EXPECTED} for s, f in studies.items()}
    deadline = time.monotonic() + 1500
    while (got := {s: orthanc.modality_counts(s) for s in studies}) != want:
        assert time.monotonic() < deadline, f"results missing after 1500 s: {got}\n{log.read_text()[-3000:]}"
        assert not any(c.get("SR", 0) > 1 for c in got.values()), got
        time.sleep(2)
    time.sleep(QUIET_S + 4)  # nothing more may arrive: no second round for any study
    assert {s: orthanc.modality_counts(s) for s in studies} == want

    data = json.loads(run_bridge("status", "--json", "--workdir", str(workdir), timeout=60).stdout)
    assert sorted(r["study"] for r in data["results"]) == sorted(studies)  # the app ran once per study
    assert {r["outcome"] for r in data["results"]} == {"scored"}
    assert all(len(r["stored"]) == 3 for r in data["results"])
    assert data["errors"] == [] and data["queue"] == [] and data["running"] is None
    assert [p for kind in ("incoming", "processing", "failed") for p in (workdir / kind).glob("*")] == []
    text = log.read_text()
    assert text.count("complete after") == N_STUDIES
    assert not any(p in text for p in PATIENT_DATA)

    study = next(iter(studies))
    for item in orthanc.qido(f"studies/{study}/instances", includefield="00080060"):
        modality = item["00080060"]["Value"][0]
        if modality == "CT":
            continue
        sop = item["00080018"]["Value"][0]
        found = requests.post(f"{orthanc.url}/tools/lookup", data=sop, auth=orthanc.auth, timeout=30).json()
        raw = requests.get(f"{orthanc.url}/instances/{found[0]['ID']}/file", auth=orthanc.auth, timeout=60)
        path = tmp_path / f"{modality}.dcm"
        path.write_bytes(raw.content)
        assert pydicom.dcmread(path).StudyInstanceUID == study
        dciodvfy(path)
