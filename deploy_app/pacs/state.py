"""The bridge's persistent record in its work folder (``state.json``): what is queued, running, done, failed.

Read by ``python -m deploy_app.pacs status``; used by ``dicomweb watch`` to process each study once across
restarts. Written atomically (temporary file, then rename) under a lock, so a crash never leaves it half-written.
Only study UIDs, times, counts and error lines are kept: no patient data.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

KEEP_LAST = 50  # results and errors kept for `status`


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class BridgeState:
    """A small JSON document: ``queue``, ``running``, ``results`` (last first), ``errors``, ``processed``."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "state.json"
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        for key, empty in (("queue", []), ("results", []), ("errors", []), ("processed", {})):
            data.setdefault(key, empty)
        data.setdefault("running", None)
        return data

    def _update(self, change) -> None:
        with self._lock:
            data = self.read()
            change(data)
            tmp = self.path.with_name(f".state.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)

    def queued(self, study: str) -> None:
        def change(d: dict) -> None:
            if study not in d["queue"]:
                d["queue"].append(study)

        self._update(change)

    def running(self, study: str | None) -> None:
        def change(d: dict) -> None:
            d["running"] = {"study": study, "since": _now()} if study else None
            if study in d["queue"]:
                d["queue"].remove(study)

        self._update(change)

    def finished(
        self, study: str, outcome: str, stored: list[str], seconds: float, memory: dict[str, float] | None = None
    ) -> None:
        """A study whose results are in the PACS (``outcome``: scored, not scored, already done); ``memory``: the
        app run's peak RSS and the bridge's own peak so far, in MB."""

        def change(d: dict) -> None:
            item = {"study": study, "outcome": outcome, "stored": stored, "seconds": round(seconds, 1), "at": _now()}
            item.update(memory or {})
            d["results"] = [item, *d["results"]][:KEEP_LAST]
            d["processed"][study] = _now()
            d["running"] = None
            if study in d["queue"]:
                d["queue"].remove(study)

        self._update(change)

    def failed(self, study: str, kind: str, message: str) -> None:
        def change(d: dict) -> None:
            d["errors"] = [{"study": study, "kind": kind, "error": message, "at": _now()}, *d["errors"]][:KEEP_LAST]
            d["running"] = None
            if study in d["queue"]:
                d["queue"].remove(study)

        self._update(change)

    def mark_processed(self, study: str) -> None:
        self._update(lambda d: d["processed"].__setitem__(study, _now()))

    def is_processed(self, study: str) -> bool:
        return study in self.read()["processed"]


def format_status(data: dict[str, Any]) -> str:
    """``status`` for a person: queue, what runs, the last results and errors."""
    lines = [f"queue: {len(data['queue'])} stud{'y' if len(data['queue']) == 1 else 'ies'}"]
    lines += [f"  {s}" for s in data["queue"]]
    running = data.get("running")
    lines.append(f"running: {running['study']} since {running['since']}" if running else "running: nothing")
    lines.append(f"processed: {len(data['processed'])} studies")
    lines.append("last results:")
    lines += [
        f"  {r['at']} {r['study']} {r['outcome']} ({len(r['stored'])} objects, {r['seconds']} s"
        + (f", app peak {r['app_peak_rss_mb'] / 1024:.2f} GB" if "app_peak_rss_mb" in r else "")
        + ")"
        for r in data["results"][:10]
    ] or ["  none"]
    lines.append("last errors:")
    lines += [f"  {e['at']} {e['study']} [{e['kind']}] {e['error']}" for e in data["errors"][:10]] or ["  none"]
    return "\n".join(lines)
