#!/usr/bin/env python
"""Speed and memory of the deploy app per study: warm (models loaded) per stage, cold start, and the whole CLI.

Studies (made with ``scripts/make_study.py``): a ``full`` chest (512 x 512, 3 mm slices) and a ``full`` head
(512 x 512, 1 mm slices), each alone in its study. Per study, ``--runs`` warm runs in this process of the same
stages the app's operators call (read -> select -> each path: volume, quality, models, scoring -> report and
writers), median per stage; peak RSS of this process; then the CLI once as a user runs it (wall time including
imports and model load) in a child process, with its peak RSS. Cold start (imports + model load) is timed here
before the first study. Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from deploy_app.cli import sw_overlap  # noqa: E402  (argparse only: the timed imports come later)

STUDIES = {
    "chest": {"chest": (0, 1), "head": None, "chest_kwargs": {"thickness": 3.0}},
    "head": {"chest": None, "head": (0, 1), "head_kwargs": {"thickness": 1.0, "tilt_deg": 0.0}},
}


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kB


def warm_run(folder: Path, out: Path, models, manifest, rules, limits, sc: bool = False) -> dict[str, float]:
    from deploy_app import pipeline
    from deploy_app.outputs import write_outputs
    from deploy_app.report import build_report
    from deploy_app.study import read_study

    t: dict[str, float] = {}
    start = time.perf_counter()
    with pipeline.Timer(t, "load"):
        study = read_study(folder)
    with pipeline.Timer(t, "select"):
        choices = pipeline.select(study, rules)
    results = {p: pipeline.run_path(p, choices[p], models, limits) for p in pipeline.PATHS}
    for r in results.values():
        if r is not None:
            for k, v in r.timings.items():
                t[f"{r.path}.{k}"] = v
    report = build_report(study, results, manifest, {})
    write_start = time.perf_counter()
    write_outputs(out, study, results, report, secondary_capture=sc)
    t["writers"] = round(time.perf_counter() - write_start, 4)
    for k, v in report["timings_s"].items():
        t[f"writers.{k}"] = v
    t["total"] = round(time.perf_counter() - start, 4)
    scored = [r.path for r in results.values() if r is not None and r.scored]
    if not scored:
        raise RuntimeError(f"nothing was scored in {folder}: the benchmark would time an error path")
    return t


def cli_run(folder: Path, out: Path, extra: list[str]) -> dict[str, float]:
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        f"r = subprocess.run([sys.executable, '-m', 'deploy_app', '-i', {str(folder)!r}, '-o', {str(out)!r}, "
        f"'-l', 'WARNING', *{extra!r}], capture_output=True);"
        "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    code, wall, rss = r.stdout.split()
    if code != "0":
        raise RuntimeError(f"the app failed on {folder} with exit code {code}")
    return {"wall_s": round(float(wall), 2), "peak_rss_mb": round(float(rss), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="full", choices=("small", "medium", "full"), help="phantom size")
    p.add_argument("--runs", type=int, default=5, help="warm runs per study (median reported)")
    p.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, default=Path("output/benchmark.json"), help="where the numbers go")
    p.add_argument("--no-cli", action="store_true", help="skip the whole-CLI run")
    p.add_argument("--no-roi", action="store_true", help="models on the whole volume (to compare with the ROI)")
    p.add_argument("--secondary-capture", action="store_true", help="also write the Secondary Capture series")
    p.add_argument("--sw-overlap", type=sw_overlap, help="the calcium models' tile overlap (default: the app's)")
    args = p.parse_args(argv)

    import torch
    from make_study import make_study

    from deploy_app import models as model_files
    from deploy_app.pipeline import Models
    from deploy_app.quality import load_limits
    from deploy_app.selection import load_rules

    device = None if args.device == "auto" else torch.device("cuda:0" if args.device == "cuda" else "cpu")
    manifest = model_files.load_manifest()
    files = model_files.locate_models(model_files.model_dir(), manifest)
    models = Models(files, device, roi=not args.no_roi, sw_overlap=args.sw_overlap)
    imported = time.perf_counter() - T0
    for name in manifest:
        models.get(name)
    cold = {"imports_s": round(imported, 2), "model_load_s": round(time.perf_counter() - T0 - imported, 2)}
    rules, limits = load_rules(), load_limits()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    overlap = models.get("s2cac_coronary").sliding_window["overlap"]
    report = {"machine": machine, "size": args.size, "runs": args.runs, "roi": not args.no_roi, "cold_start": cold}
    report["sw_overlap"] = overlap
    report["secondary_capture"] = args.secondary_capture
    cli_extra = ["--no-roi"] * args.no_roi + ["--secondary-capture"] * args.secondary_capture
    cli_extra += ["--sw-overlap", str(overlap)]
    report["studies"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.studies:
            spec = dict(STUDIES[name])
            folder = make_study(Path(tmp) / name, size=args.size, **spec)[name]
            out = Path(tmp) / f"out_{name}"
            runs = [warm_run(folder.parent, out, models, manifest, rules, limits, args.secondary_capture)
                    for _ in range(args.runs)]  # fmt: skip
            stages = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
            entry = {"median_s": stages, "peak_rss_mb_after": round(peak_rss_mb(), 1)}
            if not args.no_cli:
                entry["cli"] = cli_run(folder.parent, Path(tmp) / f"cli_{name}", cli_extra)
            report["studies"][name] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"machine: {machine}; cold start: {cold}")
    for name, entry in report["studies"].items():
        print(f"\n{name} ({args.size}), median of {args.runs} warm runs; peak RSS {entry['peak_rss_mb_after']} MB")
        print("| stage | s |\n| --- | --- |")
        for k, v in entry["median_s"].items():
            print(f"| {k} | {v:.3f} |")
        if "cli" in entry:
            print(f"CLI: {entry['cli']['wall_s']} s wall, peak RSS {entry['cli']['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
