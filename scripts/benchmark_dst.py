"""Parameters, FLOPs per volume and training-step time of the DST `paper` and `small` settings.

    python scripts/benchmark_dst.py [--device cuda:0] [--runs 20] [--paper-runs 3] [--batch-size 2]

FLOPs come from torch.utils.flop_counter.FlopCounterMode (forward of one volume; a multiply-add counts 2).
Step time is the median over ``runs`` timed training steps (forward, loss, backward, AdamW step) after warm-up,
on volumes of the setting's published in-plane size and ``--depth`` slices. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundles.dst_ica_calcification.scripts.losses import total_loss  # noqa: E402
from bundles.dst_ica_calcification.scripts.network import DST, count_parameters  # noqa: E402

IN_PLANE = {"paper": 128, "small": 64}  # published 128x128 (x 64 slices); our small setting 64x64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setting: str, device: torch.device, depth: int, batch: int, runs: int, amp: bool) -> dict:
    net = DST.from_setting(setting).to(device)
    size = IN_PLANE[setting]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.rand(1, 1, depth, size, size, device=device))
    flops = counter.get_total_flops()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, depth, size, size, device=device)
    mask = torch.ones(batch, depth, dtype=torch.bool, device=device)
    target = {
        "mask": mask,
        "landmark_slice": torch.randint(0, depth, (batch, 6), device=device).float(),
        "landmark_present": torch.ones(batch, 6, device=device),
    }
    times = []
    for i in range(runs + 1):  # the first step warms up
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            loss = total_loss(net(x, mask), target, sigma=1.0)
        loss.backward()
        opt.step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "setting": setting,
        "params": count_parameters(net),
        "input": f"{depth}x{size}x{size}",
        "gflops": flops / 1e9,
        "step_s": statistics.median(times),
        "runs": runs,
        "batch": batch,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=64, help="slices per volume (published: 64)")
    p.add_argument("--batch-size", type=int, default=2, help="volumes per timed training step")
    p.add_argument("--runs", type=int, default=10, help="timed steps for the small setting")
    p.add_argument("--paper-runs", type=int, default=3, help="timed steps for the paper setting (slow on CPU)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--settings", nargs="+", default=["small", "paper"], choices=["small", "paper"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [
        measure(s, device, args.depth, args.batch_size, args.paper_runs if s == "paper" else args.runs, args.amp)
        for s in args.settings
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"DST on {name}, torch {torch.__version__}, batch {args.batch_size}, amp {args.amp and device.type == 'cuda'}"
    )
    print()
    print(
        "| setting | parameters | input (D x H x W) | GFLOPs per volume (forward) | median training step (s) | runs |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['setting']} | {r['params'] / 1e6:.2f} M | {r['input']} | {r['gflops']:.1f} | "
            f"{r['step_s']:.3f} | {r['runs']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
