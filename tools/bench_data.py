"""Data-loader throughput: HR crops decoded + cropped per second, a folder vs its shards, 0-4
workers.

    python -m tools.bench_data --data FOLDER [--size 64] [--batch 16] [--workers 0,1,2,4] [--batches
    20]

Packs FOLDER into shards in a temporary folder (tools/make_shards.py), then reads `--batches`
batches of `--batch` crops of `--size`² through train_teacher.py's loaders: HRCrops (a folder,
map-style) and StreamLoader (shards). The first batch of each row is not timed (worker start-up).
Compare with the training step time (train_teacher.py prints img/s): the loader must deliver more.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import train_teacher as tt
from tools import make_shards
from vosr import shards


def folder_batches(cfg: tt.TrainConfig):
    """The teacher's folder loader, as train_teacher.py builds it."""
    return iter(torch.utils.data.DataLoader(
        tt.HRCrops(cfg.data, cfg.size, cfg.seed), batch_size=cfg.batch,
        sampler=tt.StepSampler(0, 10**6, cfg.batch, 0, 1), num_workers=cfg.workers))


def images_per_s(batches, n: int, batch: int) -> float:
    next(batches)  # start-up: worker processes, first decode
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--size", type=int, default=64, help="crop side (default 64)")
    p.add_argument("--batch", type=int, default=16, help="crops per batch (default 16)")
    p.add_argument(
        "--workers", default="0,1,2,4", help="DataLoader worker counts to try (default 0,1,2,4)"
    )
    p.add_argument("--batches", type=int, default=20, help="timed batches per row (default 20)")
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.data}, crops {a.size}², "
        f"batch {a.batch}"
    )
    print("| data | workers | images/s |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        make_shards.write_shards(make_shards.sample_keys([Path(a.data)]), Path(tmp), shard_size=16)
        for w in workers:
            if a.batch % max(1, w):
                continue
            cfg = tt.TrainConfig(data=a.data, size=a.size, batch=a.batch, workers=w)
            print(
                f"| folder | {w} | {images_per_s(folder_batches(cfg), a.batches, a.batch):.1f} |",
                flush=True,
            )
            cfg = tt.TrainConfig(data=tmp, size=a.size, batch=a.batch, workers=w)
            rate = images_per_s(shards.StreamLoader(cfg, 0, 1, a.batch, {}), a.batches, a.batch)
            print(f"| shards | {w} | {rate:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
