"""``python -m deploy_app.pacs``: the PACS bridge's command line.

    python -m deploy_app.pacs dicomweb run --url URL --study UID [--force]
    python -m deploy_app.pacs dicomweb watch --url URL [--orthanc URL] [--days N] [--interval S] [--once]
    python -m deploy_app.pacs dimse serve --ae CALCIMAP --port 11112 --dest-ae PACS --dest-host H --dest-port P \\
        [--allow-ae PACS]
    python -m deploy_app.pacs status [--json]

Credentials come from ``--credentials FILE`` (JSON) or the environment (``CALCIMAP_PACS_USER``,
``CALCIMAP_PACS_PASSWORD``, ``CALCIMAP_PACS_TOKEN``), never from the command line. Every failure ends in one
line ``calcimap-pacs: error: ...`` and an exit code from :data:`~deploy_app.pacs.common.PACS_EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from deploy_app.pacs.common import PACS_EXIT_CODES, BridgeError, Credentials, RetryPolicy

logger = logging.getLogger("calcimap.pacs")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        default=os.environ.get("CALCIMAP_PACS_WORKDIR", "calcimap-pacs"),
        help="the bridge's work folder: received studies, results, logs, state.json (default: "
        "$CALCIMAP_PACS_WORKDIR or ./calcimap-pacs)",
    )
    p.add_argument("-l", "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _job(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("-m", "--models", help="the app's named-model folder (default: the app's own)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-study limit for the app, seconds")
    p.add_argument("--min-free-gb", type=float, default=2.0, help="refuse studies below this much free disk")
    p.add_argument("--retention-hours", type=float, default=24.0, help="keep result folders this long")
    p.add_argument("--retries", type=int, default=8, help="tries of each PACS operation before giving up")
    p.add_argument("--retry-delay", type=float, default=2.0, help="first backoff wait, seconds (doubles)")
    p.add_argument("--retry-max-delay", type=float, default=60.0, help="longest backoff wait, seconds")


def _web(p: argparse.ArgumentParser) -> None:
    _job(p)
    p.add_argument("--url", required=True, help="the PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--credentials", help="JSON file with user/password or token (else the environment)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="calcimap-pacs",
        description="Bring studies from a PACS through CalciMap and its results back (research use only).",
        epilog="Exit codes: " + ", ".join(f"{v} {k}" for k, v in PACS_EXIT_CODES.items()),
    )
    sub = p.add_subparsers(dest="route", required=True)
    web = sub.add_parser("dicomweb", help="QIDO-RS / WADO-RS in, STOW-RS out").add_subparsers(
        dest="command", required=True
    )
    run = web.add_parser("run", help="process one study")
    _web(run)
    run.add_argument("--study", required=True, help="StudyInstanceUID")
    run.add_argument("--force", action="store_true", help="reprocess even when the results are already stored")
    w = web.add_parser("watch", help="process each new study once")
    _web(w)
    w.add_argument("--orthanc", help="Orthanc's REST root: follow its /changes feed (StableStudy) instead of QIDO")
    w.add_argument("--days", type=int, default=1, help="QIDO polling: StudyDate window, days back from today")
    w.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    w.add_argument("--once", action="store_true", help="one poll, then exit")

    dimse = sub.add_parser("dimse", help="C-STORE SCP in, C-STORE SCU out").add_subparsers(
        dest="command", required=True
    )
    serve = dimse.add_parser("serve", help="receive studies, process them, send the results")
    _job(serve)
    serve.add_argument("--ae", default="CALCIMAP", help="our AE title")
    serve.add_argument("--port", type=int, default=11112, help="port to listen on")
    serve.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    serve.add_argument(
        "--allow-ae",
        action="append",
        default=[a for a in os.environ.get("CALCIMAP_PACS_ALLOW_AE", "").split(",") if a.strip()],
        metavar="AE",
        help="accept associations only from this calling AE title (repeat for more; default: "
        "$CALCIMAP_PACS_ALLOW_AE, comma-separated, else any)",
    )
    serve.add_argument("--dest-ae", required=True, help="AE title that receives the results (the PACS)")
    serve.add_argument("--dest-host", required=True)
    serve.add_argument("--dest-port", type=int, required=True)
    serve.add_argument("--quiet", type=float, default=30.0, help="seconds without a new instance: study complete")
    serve.add_argument("--requeue-after", type=float, default=300.0, help="retry a study after a PACS outage, s")

    status = sub.add_parser("status", help="queue, last results and errors")
    _common(status)
    status.add_argument("--json", action="store_true", help="the state as JSON")
    args = p.parse_args(argv)
    if getattr(args, "retries", 1) < 1 or getattr(args, "timeout", 1) <= 0:
        p.error("--retries must be at least 1 and --timeout positive")
    return args


def _options(args: argparse.Namespace):
    from deploy_app.pacs.jobs import JobOptions

    retry = RetryPolicy(args.retries, args.retry_delay, args.retry_max_delay)
    opts = JobOptions(Path(args.workdir), args.timeout, args.min_free_gb, args.retention_hours, args.models)
    return opts, retry


def _dicomweb(args: argparse.Namespace) -> int:
    from deploy_app.pacs.dicomweb import DicomwebPacs, OrthancChanges, run_study, watch
    from deploy_app.pacs.state import BridgeState

    opts, retry = _options(args)
    credentials = Credentials.load(args.credentials)
    pacs = DicomwebPacs(args.url, credentials, retry)
    state = BridgeState(opts.workdir)
    if args.command == "run":
        outcome = run_study(pacs, args.study, opts, state, force=args.force)
        print(f"study {args.study}: {outcome}")
        return PACS_EXIT_CODES["ok"]
    changes = OrthancChanges(args.orthanc, credentials, retry, state) if args.orthanc else None
    failures = watch(pacs, opts, state, orthanc=changes, days=args.days, interval_s=args.interval, once=args.once)
    if failures:
        raise BridgeError("app", f"{failures} stud{'y' if failures == 1 else 'ies'} failed; see the status command")
    return PACS_EXIT_CODES["ok"]


def _dimse(args: argparse.Namespace) -> int:
    from deploy_app.pacs.dimse import Destination, StoreScp

    opts, retry = _options(args)
    dest = Destination(args.dest_ae, args.dest_host, args.dest_port)
    allow = tuple(a.strip() for a in args.allow_ae)
    scp = StoreScp(args.ae, args.port, dest, opts, retry, args.quiet, args.requeue_after, args.bind, allow)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        scp.start()
    except OSError as e:
        raise BridgeError("usage", f"cannot listen on {args.bind}:{args.port}: {e.strerror or e}") from None
    stop.wait()
    logger.info("stopping; received studies stay in %s", opts.workdir)
    scp.stop()
    return PACS_EXIT_CODES["ok"]


def _status(args: argparse.Namespace) -> int:
    from deploy_app.pacs.state import BridgeState, format_status

    data = BridgeState(Path(args.workdir)).read()
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else format_status(data))
    return PACS_EXIT_CODES["ok"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        if args.route == "dicomweb":
            return _dicomweb(args)
        if args.route == "dimse":
            return _dimse(args)
        return _status(args)
    except BridgeError as e:
        print(f"calcimap-pacs: error: {e}", file=sys.stderr)
        return PACS_EXIT_CODES[e.kind]


if __name__ == "__main__":
    sys.exit(main())
