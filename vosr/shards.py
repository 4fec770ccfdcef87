"""Streamed training data of train_teacher.py and distill.py: WebDataset shards and dataset lists.

--data can also be a dataset list (the official release's format: one `path, weight` per line) or a
shard pattern. Such data is streamed: every (rank, DataLoader worker) is one *data stream* with its
own share of each dataset's shards (or image files), read in a reshuffled order each epoch through a
shuffle buffer (WebDataset), and mixed across datasets by weight. Each stream gives an equal part of
every micro-batch, so the global batch depends on the number of streams (ranks × workers), not on
how they are split into ranks and workers; every draw of stream j at its n-th sample is seeded by
(seed, j, n), so a resume that skips the samples each stream had consumed (recorded in the
checkpoint) continues exactly.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vosr import files
from vosr.files import UserError
from vosr.crops import SHARD_CROPS, random_crop, step_generator

# WebDataset shuffle buffer (samples); the first `SHARD_BUFFER // 10` start the stream
SHARD_BUFFER = 1000


def parse_sources(spec: str) -> list[tuple[str, list[str], float]]:
    """--data → [(name, units, weight)], units being .tar shards or image files, sorted.

    A folder: its .tar shards if it holds any, else its images. `dir/train-{000000..000127}.tar`:
    those shards. A .txt file: one `path, weight` line per dataset, paths relative to the list's
    folder (# comments)."""
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        sources = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            where, _, weight = line.rpartition(",")
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            if not where.strip() or not (w > 0 and math.isfinite(w)):
                raise ValueError(
                    f"{path}:{n}: expected `path, weight` with a positive weight, got {line!r}"
                )
            sub = Path(where.strip())
            # as written, or relative to the list
            ((name, units, _),) = parse_sources(os.path.normpath(path.parent / sub))
            sources.append((name, units, w))
        if not sources:
            raise ValueError(f"{path}: no `path, weight` lines")
        return sources
    if "{" in spec:
        import braceexpand
        units = sorted(braceexpand.braceexpand(spec))
        missing = [u for u in units if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(units)} shards of {spec} do not exist, e.g. "
                f"{missing[0]}"
            )
        return [(spec, units, 1.0)]
    if path.is_dir():
        units = sorted(str(p) for p in path.rglob("*.tar")) or [
            str(p) for p in files.find_images(path)
        ]
        if not units:
            raise FileNotFoundError(f"no images or .tar shards in {path}")
        return [(spec, units, 1.0)]
    if path.suffix == ".tar" and path.is_file():
        return [(spec, [spec], 1.0)]
    raise FileNotFoundError(
        f"--data {spec}: not a folder, a .txt dataset list or a .tar shard pattern"
    )


def read_units(units: list[str], report):
    """(name, file bytes or None) of every sample of these shards / image files, in order.

    Image files are read later (None): a resume skips samples without reading them. A shard that
    cannot be read (missing, truncated) is reported once through `report` and the stream goes on
    with the next one."""
    import webdataset as wds
    for u in units:
        if not u.endswith(".tar"):
            yield u, None
            continue

        def handler(e, shard=u, seen=[]):  # noqa: B006 (webdataset may call it twice for one error)
            if not seen:
                seen.append(e)
                why = str(e.args[0] if e.args else type(e).__name__).split(" @ ")[0]
                report(f"skipping the rest of shard {shard}: {why}")
            return True
        for s in wds.tarfile_to_samples(handler=handler)([{"url": u}]):
            ext = next(
                (k for k in s if not k.startswith("__") and "." + k.lower() in files.IMAGE_EXTS),
                None,
            )
            yield f"{u}:{s['__key__']}" + (f".{ext}" if ext else ""), (s[ext] if ext else b"")


def readable(name: str, data: bytes | None) -> bool:
    """Does this sample of read_units decode as an image?"""
    try:
        return data != b"" and files.read_image(name, data) is not None
    except files.ImageError:
        return False


def dataset_stream(units: list[str], stream: int, streams: int, key: str, report):
    """The endless samples of one dataset for data stream `stream` of `streams`: its share of the
    units (every streams-th shard; or, with fewer shards than streams, every streams-th sample of
    all of them), in a fresh order each epoch, through a shuffle buffer. No sample repeats within an
    epoch of a stream."""
    import webdataset as wds
    by_unit = len(units) >= streams
    share = units[stream::streams] if by_unit else units
    for epoch in itertools.count():
        # seeded by a string: the same in every process
        rng = random.Random(f"{key}/{stream}/{epoch}")
        order = rng.sample(share, len(share))
        samples = read_units(order, report)
        if not by_unit:
            samples = (s for i, s in enumerate(samples) if i % streams == stream)
        n = 0
        for s in wds.shuffle(SHARD_BUFFER, SHARD_BUFFER // 10, rng=rng)(samples):
            n += 1
            yield s
        if n == 0:
            raise files.ImageError(
                f"no readable samples in {units[0]}{' …' if len(units) > 1 else ''}"
            )


class HRStream(torch.utils.data.IterableDataset):
    """Crops from datasets mixed by weight, for one rank's data streams (one per DataLoader worker).

    Yields (crop (3,S,S), position): position n = the stream's n-th sample drawn, counting
    unreadable ones."""

    def __init__(
        self, sources, size: int, seed: int, rank: int, workers: int, streams: int, start: dict
    ):
        self.sources, self.size, self.seed = sources, size, seed
        self.rank, self.workers, self.streams, self.start = rank, workers, streams, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = self.rank * self.workers + (info.id if info else 0)
        reported = set()

        def report(msg):
            if msg not in reported:
                reported.add(msg)
                print(f"train_teacher.py: {msg}", file=sys.stderr)
        per_set = [dataset_stream(u, stream, self.streams, f"{self.seed}/{name}", report)
                   for name, u, _ in self.sources]
        weights = [w for *_, w in self.sources]
        mix = random.Random(f"{self.seed}/mix/{stream}")
        skip = self.start.get(stream, 0)
        for pos in itertools.count(1):
            name, data = next(per_set[mix.choices(range(len(per_set)), weights)[0]])
            if pos <= skip:  # consumed before the resume: not decoded
                continue
            try:
                if data == b"":
                    raise files.ImageError(f"{name}: no image member in this sample")
                img = files.read_image(name, data)
            except files.ImageError as e:
                report(f"skipping {e}")
                continue
            yield (
                random_crop(img, self.size, step_generator(self.seed, pos, SHARD_CROPS + stream)),
                pos,
            )


class StreamLoader:
    """Micro-batches of this rank's HRStream: each of its `workers` streams gives an equal part of
    each. `positions` holds, per stream, how many samples it has drawn so far (saved in the
    checkpoint)."""

    def __init__(self, cfg, rank: int, world: int, micro: int, start: dict):
        self.workers = max(1, cfg.workers)
        if micro % self.workers:
            raise UserError(f"with streamed data the micro-batch ({micro} per rank) must "
                            f"divide by --workers {self.workers}")
        self.rank, self.streams = rank, world * self.workers
        ds = HRStream(
            parse_sources(cfg.data), cfg.size, cfg.seed, rank, self.workers, self.streams, start
        )
        self.loader = iter(torch.utils.data.DataLoader(ds, batch_size=micro // self.workers,
                                                       num_workers=cfg.workers))
        self.positions = {
            rank * self.workers + w: start.get(rank * self.workers + w, 0)
            for w in range(self.workers)
        }

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        parts = []
        for w in range(self.workers):  # the DataLoader visits its workers in turn
            try:
                crops, pos = next(self.loader)
            except files.ImageError as e:  # from a worker it comes wrapped in its traceback
                raise UserError(
                    f"--data: {str(e).splitlines()[-1].split('ImageError: ')[-1]}"
                ) from None
            self.positions[self.rank * self.workers + w] = int(pos[-1])
            parts.append(crops)
        return torch.cat(parts)

    def state(self, world: int) -> dict:
        """{stream: samples drawn} of all ranks (a collective call under torchrun: every rank must
        call it)."""
        if world == 1:
            return dict(self.positions)
        parts = [None] * world
        dist.all_gather_object(parts, self.positions)
        return {k: v for p in parts for k, v in p.items()}


def streamed(data: str) -> bool:
    """Is --data read as streams (a dataset list, a shard pattern, shards) rather than a folder of
    images?"""
    path = Path(data)
    return (path.suffix in (".txt", ".tar") or "{" in data
            or (path.is_dir() and next(path.rglob("*.tar"), None) is not None))


def check_sources(data: str) -> list[tuple[str, list[str], float]]:
    """Streamed --data, before a run starts: parsed, and each dataset with one readable image (the
    first usually is); one line if not."""
    try:
        sources = parse_sources(data)
    except (OSError, ValueError) as e:
        raise UserError(f"--data {data}: {e}") from None
    for source, units, _ in sources:
        if not any(readable(*sample) for sample in read_units(units, lambda msg: None)):
            raise UserError(f"--data {data}: no readable image in {source}")
    return sources


def resume_streams(ckpt: Path | None, world: int, cfg) -> dict:
    """{stream: samples drawn} saved in the checkpoint ({} for a new run). The streams are ranks ×
    workers; a resume with another number of them cannot continue each stream, so it is refused with
    one line."""
    if ckpt is None:
        return {}
    saved = files.read_safetensors_header(ckpt)[1].get("data_streams")
    if saved is None:
        return {}
    positions = {int(k): v for k, v in json.loads(saved).items()}
    if len(positions) != world * max(1, cfg.workers):
        raise UserError(f"cannot resume the data streams: the run read {len(positions)} streams "
                        f"(ranks × --workers), this one would read {world * max(1, cfg.workers)}; "
                        "resume with the same number of ranks and --workers")
    return positions
