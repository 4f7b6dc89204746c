"""Micro-benchmark of bpr_core's vectorised steps (proposal, crop, paste) on 1000x1000 masks, and
of the networks' forward pass.

    python -m jobs.bench_core [--out bench_core.json] [--repeat 5]

Prints a table and writes the figures as JSON. Speed lives here, never in timed unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import numpy as np

from bpr_core import BPRConfig, boundary_points, crop_patches, paste_patches, propose_patches

from ._cli import prog_name, run_main


def masks() -> dict[str, np.ndarray]:
    disk = np.zeros((1000, 1000), np.uint8)
    cv2.circle(disk, (500, 500), 400, 1, -1)
    rng = np.random.default_rng(0)
    noise = cv2.blur((rng.random((1000, 1000)) < 0.5).astype(np.float32), (15, 15)) > 0.55
    ragged = disk.astype(bool) ^ noise
    return {"disk": disk.astype(bool), "ragged": ragged}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("bench_core"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_core.json")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the network timing (default 2)")
    args = ap.parse_args(argv)
    cfg = BPRConfig()
    image = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    rows = []
    for name, m in masks().items():
        boxes = propose_patches(m, cfg)
        probs = crop_patches(m.astype(np.float32), boxes, cfg)
        rows.append({
            "mask": name, "boundary_px": int(len(boundary_points(m)[0])), "patches": int(len(boxes)),
            "propose_ms": 1000 * best_of(lambda: propose_patches(m, cfg), args.repeat),
            "crop_ms": 1000 * best_of(lambda: crop_patches(image, boxes, cfg), args.repeat),
            "paste_ms": 1000 * best_of(lambda: paste_patches(m, boxes, probs, cfg), args.repeat),
        })
    print(f"{'mask':8} {'boundary px':>12} {'patches':>8} {'propose ms':>11} {'crop ms':>8} {'paste ms':>9}")
    for r in rows:
        print(f"{r['mask']:8} {r['boundary_px']:>12} {r['patches']:>8} {r['propose_ms']:>11.1f} {r['crop_ms']:>8.1f} {r['paste_ms']:>9.1f}")
    import torch

    from bpr_core.model import build_model

    torch.set_num_threads(args.threads)
    net_rows = []
    for name, size in (("hrnet_lite", 64), ("hrnet_lite", 128), ("hrnet18s", 128), ("efflite0", 64), ("efflite0", 128)):
        net = build_model(name).eval()
        x, m = torch.randn(32, 3, size, size), torch.ones(32, 1, size, size)
        with torch.inference_mode():
            net(x, m)
            sec = best_of(lambda: net(x, m), args.repeat)
        net_rows.append({"model": name, "input": size, "batch": 32, "threads": args.threads, "patches_per_s": 32 / sec})
        print(f"network {name} at {size}: {32 / sec:.0f} patches/s (batch 32, {args.threads} threads)")
    with open(args.out, "w") as f:
        json.dump({"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "results": rows, "network": net_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main)
