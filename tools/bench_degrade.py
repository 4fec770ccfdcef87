"""Degradation throughput: images/s of the Real-ESRGAN (or bicubic) pipeline at 512² on a device.

    python -m tools.bench_degrade [--device cuda] [--batch 8] [--mode realesrgan|bicubic]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import degrade


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if present")
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument(
        "--mode", choices=("realesrgan", "bicubic"), default="realesrgan", help="default realesrgan"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="time to measure for (default 5)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.seconds <= 0:
        p.error("--batch must be at least 1 and --seconds positive")
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    # smooth random images (noise upsampled) so JPEG/Poisson see photo-like statistics
    hr = (
        F.interpolate(torch.rand(a.batch, 3, 32, 32, generator=gen), size=512, mode="bicubic")
        .clamp(0, 1)
        .to(device)
    )
    run = (
        (lambda: degrade.degrade(hr, generator=gen))
        if a.mode == "realesrgan"
        else (lambda: degrade.degrade_bicubic(hr))
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):                                   # warm-up
        run()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < a.seconds:
        run()
        n += 1
    sync()
    dt = time.perf_counter() - t0
    print(
        f"{a.mode} degradation on {device} ({torch.get_num_threads()} threads, torch "
        f"{torch.__version__}), "
        f"batch {a.batch} at 512²: {n * a.batch / dt:.1f} images/s ({dt / n * 1000:.0f} ms/batch, "
        f"{n} batches)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
