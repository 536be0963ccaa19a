#!/usr/bin/env python
"""Time phantom generation on one core: median of several cases, and peak RSS.

Targets (issue 2): a `full` chest case in at most 20 s, a `small` case in at most 2 s, one core.
Each case is generated in a fresh child process pinned to one thread, so peak RSS is per case.

  python scripts/benchmark_phantoms.py --runs 5 [--markdown docs/benchmarks_phantoms.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {scripts!r})
kind, size, seed, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "chest":
    from phantoms.chest import make_chest_case as make
else:
    from phantoms.head import make_head_case as make
t = time.perf_counter()
case = make(seed, index, size)
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": dt, "peak_rss_mb": rss, "shape": list(case.grid.shape)}}))
"""


def one(kind: str, size: str, index: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-c",
        CHILD.format(scripts=str(Path(__file__).resolve().parent)),
        kind,
        size,
        "0",
        str(index),
    ]
    if hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="cases per setting (different indices) (default 5)")
    p.add_argument("--kinds", nargs="+", default=["chest", "head"], choices=["chest", "head"])
    p.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    rows = []
    for kind in args.kinds:
        for size in ("small", "full"):
            runs = [one(kind, size, i) for i in range(args.runs)]
            secs = [r["seconds"] for r in runs]
            shapes = " / ".join("x".join(map(str, r["shape"])) for r in runs[:3])
            rss = max(r["peak_rss_mb"] for r in runs)
            median = statistics.median(secs)
            rows.append(f"| {kind} | {size} | {args.runs} | {median:.2f} | {max(secs):.2f} | {rss:.0f} | {shapes} |")
            print(rows[-1], flush=True)
    cpu = platform.processor() or platform.machine()
    header = [
        f"Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; each case on one core.",
        "",
        "| kind | size | cases | median s | max s | peak RSS MB | shapes (k x j x i) |",
        "|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("# Phantom generation speed\n\n`python scripts/benchmark_phantoms.py`\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
