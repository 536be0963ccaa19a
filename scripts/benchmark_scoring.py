#!/usr/bin/env python
"""Time calcium scoring on one core: a 512 x 512 x 64 HU volume with ~30 calcium blobs in 4 labels.

The volume is a synthetic chest-like int16 CT (soft tissue with noise, a spine and ribs above 130 HU but
unlabelled) with calcium blobs of 0.5-2.5 mm radius and 150-900 HU peak placed in the heart region and
labelled per vessel (LM, LAD, LCX, RCA) as a calcium segmenter would. ``--spread full`` scatters the
blobs over the whole field of view instead (worst case for the crop to the labels' bounding box).
The scorer runs N times in this process, pinned to one thread (and one CPU where the OS allows);
the first call is reported separately and excluded from the median and p90. Target: median < 100 ms.
Peak RSS (getrusage) covers the whole process; the scorer's own peak allocation comes from tracemalloc.

  python scripts/benchmark_scoring.py [--runs 20] [--spread heart|full] [--json OUT]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundles.s2cac_coronary_calcium.scripts.scoring import score_calcium  # noqa: E402

SHAPE = (64, 512, 512)  # [k, j, i]
SPACING = (0.4, 0.4, 2.5)  # row, column, increment (mm): a 205 mm field of view, 160 mm along z


def build_volume(seed: int, n_blobs: int, spread: str) -> tuple[np.ndarray, np.ndarray]:
    """Int16 HU image and uint8 label map [k, j, i] with ``n_blobs`` labelled calcium blobs."""
    rng = np.random.default_rng(seed)
    k, j, i = SHAPE
    image = rng.normal(40.0, 18.0, SHAPE).astype(np.int16)  # soft tissue with noise
    jj, ii = np.ogrid[:j, :i]
    image[:, ((jj - 420) ** 2 + (ii - 256) ** 2) < 35**2] = 700  # spine: above 130 HU, never labelled
    for r in range(6):  # rib cross-sections
        ang = np.deg2rad(200 + 28 * r)
        cj, ci = 256 + 215 * np.sin(ang), 256 + 215 * np.cos(ang)
        image[:, ((jj - cj) ** 2 + (ii - ci) ** 2) < 9**2] = 500
    labels = np.zeros(SHAPE, dtype=np.uint8)
    if spread == "heart":  # heart region: about 100 x 100 mm in-plane, central 40 slices
        lo, hi = np.array([12, 180, 180]), np.array([52, 430, 430])
    else:
        lo, hi = np.array([2, 10, 10]), np.array([62, 502, 502])
    for _ in range(n_blobs):
        centre = rng.uniform(lo, hi)
        radius_mm = rng.uniform(0.5, 2.5)
        peak = rng.uniform(150, 900)
        rad_vox = np.ceil(radius_mm / np.array([SPACING[2], SPACING[0], SPACING[1]])).astype(int) + 1
        c0 = np.floor(centre).astype(int)
        box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(c0, rad_vox, SHAPE, strict=True))
        kk, jg, ig = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
        dist_mm = np.sqrt(
            ((kk - centre[0]) * SPACING[2]) ** 2
            + ((jg - centre[1]) * SPACING[0]) ** 2
            + ((ig - centre[2]) * SPACING[1]) ** 2
        )
        hu = 40 + (peak - 40) * np.exp(-0.5 * (dist_mm / radius_mm) ** 2)
        inside = dist_mm <= 1.5 * radius_mm
        region = image[box]
        region[inside] = np.maximum(region[inside], hu[inside].astype(np.int16))
        labels[box][inside] = rng.integers(1, 5)
    return image, labels


def pin_one_cpu() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


def main() -> int:
    p = argparse.ArgumentParser(prog="benchmark_scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="timed calls after the first (default 20)")
    p.add_argument("--blobs", type=int, default=30, help="number of calcium blobs (default 30)")
    p.add_argument("--spread", choices=("heart", "full"), default="heart", help="where the blobs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers as JSON")
    args = p.parse_args()

    pinned = pin_one_cpu()
    image, labels = build_volume(args.seed, args.blobs, args.spread)
    t0 = time.perf_counter()
    score = score_calcium(image, labels, SPACING)
    first_ms = 1000 * (time.perf_counter() - t0)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        score_calcium(image, labels, SPACING)
        times.append(1000 * (time.perf_counter() - t0))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the scorer's own peak allocation
    score_calcium(image, labels, SPACING)
    scorer_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    result = {
        "shape_kji": list(SHAPE),
        "spacing_mm": list(SPACING),
        "image_dtype": str(image.dtype),
        "spread": args.spread,
        "blobs": args.blobs,
        "runs": args.runs,
        "first_call_ms": first_ms,
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": float(np.min(times)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scorer_peak_alloc_mb": scorer_peak_mb,
        "input_mb": (image.nbytes + labels.nbytes) / 2**20,
        "total_agatston": score.total.agatston,
        "lesions_2d_agatston": score.total.lesions_2d_agatston,
        "lesions_3d": score.total.lesions_3d,
        "cpu_count": os.cpu_count(),
        "pinning": pinned,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(
        f"score_calcium on {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} ({args.spread}, {args.blobs} blobs, "
        f"{score.total.lesions_3d} 3D / {score.total.lesions_2d_agatston} 2D lesions, "
        f"Agatston {score.total.agatston:.1f}): median {result['median_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms "
        f"over {args.runs} runs (first call {first_ms:.1f} ms)"
    )
    print(
        f"memory: peak RSS {result['peak_rss_mb']:.0f} MB (process, incl. building the volume; input "
        f"{result['input_mb']:.0f} MB), scorer's own peak allocation {scorer_peak_mb:.1f} MB"
    )
    print(f"machine: {result['machine']}, {result['cpu_count']} CPUs ({pinned}), {result['platform']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
