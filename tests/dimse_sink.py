"""A C-STORE SCP for tests: the destination AE the bridge sends its results to, without a PACS.

Every received object is written to ``folder/<SOPInstanceUID>.dcm``; ``received`` counts each SOP Instance UID,
so a test sees duplicates as counts above 1.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from orthanc_fixture import free_port
from pynetdicom import AE, AllStoragePresentationContexts, evt

SINK_AE = "SINK"


class StoreSink:
    def __init__(self, folder: Path, ae_title: str = SINK_AE):
        self.folder, self.ae_title = folder, ae_title
        self.port = free_port()
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            self.received[str(ds.SOPInstanceUID)] += 1
        return 0x0000

    def __enter__(self) -> StoreSink:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()

    def total(self) -> int:
        with self._lock:
            return sum(self.received.values())
