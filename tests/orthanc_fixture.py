"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS bridge's tests.

Orthanc 1.10 cannot bind to loopback only, so where the machine allows (root, ``unshare``) the test process's
main thread moves into a private network namespace for the module's duration: Orthanc, the bridge and the
test's clients then share a loopback nobody else can reach, and the original namespace is restored afterwards.
Elsewhere Orthanc listens on high free ports. Either way it runs with HTTP authentication on,
``DicomAlwaysAllowStore`` off, ``DicomCheckModalityHost`` on and only our AE titles in ``DicomModalities``;
``StableAge`` is 1-2 s. It is a child process with a generated JSON config, stopped by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from conftest import need_tool

logger = logging.getLogger(__name__)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CLONE_NEWNET = 0x40000000
USER, PASSWORD = "calcimap-test", "orthanc-fixture-password"
ORTHANC_AE = "ORTHANC"
TEST_AE = "TESTSCU"
# The chest phantom of the PACS tests, which are about moving studies, not scoring them: a small patient at 3 mm
# (the standard calcium-scoring protocol) is the cheapest study the app scores, a smaller heart region to tile.
PACS_CHEST = {"thickness": 3.0, "patient_size": "small"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_up() -> None:
    """``ip link set lo up`` without iproute2: SIOCSIFFLAGS with IFF_UP | IFF_LOOPBACK | IFF_RUNNING."""
    siocsifflags, flags = 0x8914, 0x1 | 0x8 | 0x40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14s", b"lo", flags, b"\0" * 14))


@contextlib.contextmanager
def private_network() -> Iterator[bool]:
    """This thread (and the threads and processes it starts) in a new network namespace; yields whether it
    worked. Network namespaces are per thread in Linux, so the rest of the process is not affected."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if os.geteuid() != 0 or libc.unshare(CLONE_NEWNET) != 0:
            yield False
            return
        try:
            _loopback_up()
            yield True
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the original network namespace")
    finally:
        os.close(original)


@dataclass
class Orthanc:
    """One Orthanc child process; ``stop()`` / ``start()`` may be called again (its storage persists)."""

    folder: Path
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (AE title, port)
    lua: list[Path] = field(default_factory=list)
    stable_age_s: int = 1
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    def config(self) -> dict:
        modalities = {
            name: {"AET": aet, "Host": "127.0.0.1", "Port": port} for name, (aet, port) in self.modalities.items()
        }
        modalities["testscu"] = {"AET": TEST_AE, "Host": "127.0.0.1", "Port": free_port()}
        return {
            "Name": "calcimap-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": modalities,
            "StableAge": self.stable_age_s,
            "OverwriteInstances": True,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "LuaScripts": [str(p) for p in self.lua],
            "ConcurrentJobs": 2,
        }

    def start(self) -> None:
        """Start (or restart) the child and wait until its REST API answers; ports are chosen on first start
        (a modality registered with port 0 gets a free one, see ``modalities``)."""
        if not self.http_port:
            self.http_port, self.dicom_port = free_port(), free_port()
            self.modalities = {n: (aet, port or free_port()) for n, (aet, port) in self.modalities.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=1))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [need_tool("Orthanc"), str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        lines = (self.folder / "orthanc.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def get(self, path: str) -> dict | list:
        r = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def qido(self, path: str, **params: str) -> list[dict]:
        r = requests.get(f"{self.dicomweb}/{path}", params=params, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []

    def modality_counts(self, study_uid: str) -> dict[str, int]:
        """Instances per modality in the study (QIDO-RS)."""
        counts: dict[str, int] = {}
        for item in self.qido(f"studies/{study_uid}/instances", includefield="00080060"):
            modality = item["00080060"]["Value"][0]
            counts[modality] = counts.get(modality, 0) + 1
        return counts


def c_store(files: list[Path], port: int, calling_ae: str = TEST_AE, called_ae: str = ORTHANC_AE) -> list[int]:
    """C-STORE ``files`` to 127.0.0.1:``port`` in one association; returns each status (0 = success)."""
    import pydicom
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return [-1] * len(files)
    try:
        return [int(getattr(assoc.send_c_store(pydicom.dcmread(p)), "Status", -1)) for p in files]
    finally:
        assoc.release()


@contextlib.contextmanager
def orthanc_server(
    folder: Path,
    modalities: dict[str, tuple[str, int]] | None = None,
    lua: list[Path] | None = None,
    stable_age_s: int = 1,
) -> Iterator[Orthanc]:
    """Orthanc in a private network when possible; skips (locally) or fails (CI) when it is not installed."""
    need_tool("Orthanc")
    if not DICOMWEB_PLUGIN.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{DICOMWEB_PLUGIN} is missing; .ci/run installs orthanc-dicomweb")
        pytest.skip(f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)")
    with private_network() as private:
        logger.info("Orthanc in %s", "a private network namespace" if private else "the host network, high ports")
        server = Orthanc(folder, dict(modalities or {}), list(lua or []), stable_age_s)
        server.start()
        try:
            yield server
        finally:
            server.stop()
