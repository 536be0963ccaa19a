"""``python -m deploy_app -i DICOM_DIR -o OUT [-m MODELS]``: check everything a user can get wrong, then run the graph.

Options follow the MONAI Deploy App SDK (``-i/-o/-m/-l``, defaults from ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``). Every failure a user can cause ends in one line
``calcimap: error: ...`` and its own exit code (:data:`EXIT_CODES`), with nothing half-written in the output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_CODES = {
    "ok": 0,
    "internal": 1,  # a bug: please report it with the log (-l DEBUG)
    "input": 2,  # the input folder or a file in it cannot be used; bad arguments
    "nothing_to_score": 3,  # no chest or head CT series the app can score in the study
    "not_scored": 4,  # series were found but none was suitable; the reports (written) say why
    "model": 5,  # models missing, corrupt or not the shipped ones
    "output": 6,  # the output folder cannot be written
}
SECONDARY_CAPTURE_ENV = "CALCIMAP_SECONDARY_CAPTURE"
logger = logging.getLogger("calcimap")


class CliError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="calcimap",
        description="Coronary and ICA calcium scoring of a non-contrast CT study (research use only).",
        epilog="Exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("-i", "--input", help="DICOM study folder (default: $HOLOSCAN_INPUT_PATH or ./input)")
    p.add_argument("-o", "--output", help="output folder (default: $HOLOSCAN_OUTPUT_PATH or ./output)")
    p.add_argument("-m", "--model", help="named-model folder (default: $HOLOSCAN_MODEL_PATH or the repo's models/)")
    p.add_argument("-w", "--workdir", help="accepted for MONAI Deploy compatibility; unused")
    p.add_argument("-l", "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    p.add_argument(
        "--no-roi", action="store_true", help="run the calcium models on the whole volume, not the heart / skull base"
    )
    p.add_argument(
        "--sw-overlap",
        type=sw_overlap,
        metavar="F",
        help="sliding-window overlap of the calcium models, 0 <= F < 1 (default: 0.25 on a CPU, the bundles' 0.5 "
        "on a GPU)",
    )
    p.add_argument(
        "--secondary-capture",
        action="store_true",
        help="also write a Secondary Capture series with the calcium overlay per scored series, for PACS viewers "
        f"that show neither SEG nor SR (default: ${SECONDARY_CAPTURE_ENV}=1 or off)",
    )
    p.add_argument(
        "--max-volume-mb",
        type=_positive_mb,
        metavar="MB",
        help="memory budget of one series' volume; a larger series is not scored "
        "(default: $CALCIMAP_MAX_VOLUME_MB or 1024)",
    )
    return p.parse_args(argv)


def _as_float(text: str) -> float:
    """``text`` as a number; NaN, which fails every range check below, when it is none."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _positive_mb(text: str) -> float:
    value = _as_float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of megabytes")
    return value


def sw_overlap(text: str) -> float:
    """A sliding-window overlap argument (the app's, the benchmark's and evaluate_app's): 0 <= F < 1."""
    value = _as_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an overlap from 0 up to (not including) 1")
    return value


def _secondary_capture(args: argparse.Namespace) -> bool:
    if args.secondary_capture:
        return True
    text = os.environ.get(SECONDARY_CAPTURE_ENV, "").strip().lower()
    if text in ("", "0", "no", "false", "off"):
        return False
    if text in ("1", "yes", "true", "on"):
        return True
    raise CliError("input", f"{SECONDARY_CAPTURE_ENV}={text!r} is neither on (1, yes, true) nor off (0, no, false)")


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    inp = args.input or os.environ.get("HOLOSCAN_INPUT_PATH") or "input"
    out = args.output or os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output"
    return Path(inp), Path(out)


def _check_output(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError("output", f"cannot create the output folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError("output", f"the output folder {folder} is not writable by this user (uid {os.getuid()})")


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CliError("input", "--device cuda was asked for, but no CUDA GPU is available")
    if choice == "auto":
        return None  # the models pick cuda when present, else the CPU
    return torch.device("cuda:0" if choice == "cuda" else "cpu")


def preflight(args: argparse.Namespace) -> dict:
    """Everything checkable before the graph runs; returns what the app is built from."""
    from deploy_app import models as model_files
    from deploy_app.pipeline import Models, select
    from deploy_app.quality import load_limits
    from deploy_app.selection import load_rules
    from deploy_app.study import InputError, read_study
    from deploy_app.volume import MAX_VOLUME_MB_ENV, VolumeError, max_volume_mb

    if args.max_volume_mb is not None:  # the volume builder reads the budget from the environment
        os.environ[MAX_VOLUME_MB_ENV] = repr(args.max_volume_mb)
    try:
        max_volume_mb()
    except VolumeError as e:
        raise CliError("input", str(e)) from None
    input_folder, output_folder = _paths(args)
    secondary_capture = _secondary_capture(args)
    try:
        study = read_study(input_folder, headers_only=True)
    except InputError as e:
        raise CliError("input", str(e)) from None
    try:
        rules, limits = load_rules(), load_limits()
    except ValueError as e:
        raise CliError("internal", f"the app's configuration is broken: {e}") from None
    choices = select(study, rules)
    if all(c is None for c in choices.values()):
        described = "; ".join(
            f"series {ds[0].get('SeriesNumber', '?')} {ds[0].get('Modality', '?')} "
            f"'{ds[0].get('SeriesDescription', '')}'"
            for ds in study.series.values()
        )
        raise CliError("nothing_to_score", f"no chest or head CT series to score in {input_folder} ({described})")
    try:
        manifest = model_files.load_manifest()
        files = model_files.locate_models(model_files.model_dir(args.model), manifest)
    except model_files.ModelError as e:
        raise CliError("model", str(e)) from None
    device = _device(args.device)  # before the output folder is made: a refused run creates nothing
    _check_output(output_folder)
    return {
        "input_folder": input_folder,
        "output_folder": output_folder,
        "models": Models(files, device, roi=not args.no_roi, sw_overlap=args.sw_overlap),
        "manifest": manifest,
        "rules": rules,
        "limits": limits,
        "secondary_capture": secondary_capture,
    }


def _exit_kind(error: BaseException) -> str:
    from deploy_app.study import InputError

    if isinstance(error, InputError):
        return "input"
    if isinstance(error, OSError):
        return "output"
    return "internal"


def _summary(report: dict, written: list[Path]) -> str:
    from deploy_app.outputs import describe_written

    lines = []
    for path, r in report["paths"].items():
        if r is None:
            lines.append(f"{path}: {report['absent'][path]}")
        elif not r["scored"]:
            lines.append(f"{path}: series {r['series']['series_number']} not scored: {r['not_scored_reason']}")
        else:
            s = r["scores"]
            equivalent = " (Agatston-equivalent)" if s.get("agatston_equivalent") else ""
            per = ", ".join(f"{k} {v['agatston']:.1f}" for k, v in s["per_label"].items())
            category = f", category {s['risk_category']}" if path == "coronary" else ""
            lines.append(f"{path}: Agatston {s['total']['agatston']:.1f}{category}{equivalent} [{per}]")
    lines += [f"wrote {line}" for line in describe_written(written)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Holoscan's own (C++) log follows -l unless the user set HOLOSCAN_LOG_LEVEL; read when Holoscan loads.
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", {"WARNING": "WARN"}.get(args.log_level, args.log_level))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        setup = preflight(args)
        from deploy_app.app import CalciMapApp

        app = CalciMapApp([sys.argv[0]], **setup)
        app.run()
        state = app.state
        if state.error is not None:
            kind = _exit_kind(state.error)
            logger.debug("failed in stage %s", state.failed_stage, exc_info=state.error)
            raise CliError(kind, f"{state.failed_stage}: {state.error}")
        if state.report is None:
            raise CliError("internal", "the graph ended without writing a report")
    except CliError as e:  # one line, whatever the message (a decoder's text may span several)
        print(f"calcimap: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_CODES[e.kind]
    print(_summary(state.report, state.written))
    if not any(r and r["scored"] for r in state.report["paths"].values()):
        print("calcimap: error: no series could be scored; see report.pdf / results.json for why", file=sys.stderr)
        return EXIT_CODES["not_scored"]
    return EXIT_CODES["ok"]
