"""Pack folders of images into WebDataset .tar shards for train_teacher.py / distill.py --data.

    python -m tools.make_shards -i FOLDER [FOLDER ...] -o OUT_DIR [--shard-size 1000] [--prefix
    train]

Each image is stored as it is (its file's bytes, nothing re-encoded) as one sample: key = the file's
path relative to its folder, without the extension (dots and path separators become '_'; with
several folders the key starts with the folder's name), member `KEY.EXT`. Shards are
OUT_DIR/PREFIX-000000.tar, … and the line to give --data is printed at the end, e.g.
`OUT_DIR/train-{000000..000127}.tar`. Each shard is written to a temporary name and renamed when
complete; existing shards are never overwritten (use another -o).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vosr import files
from vosr.cli import run_script


def sample_keys(folders: list[Path]) -> list[tuple[Path, str]]:
    """(image file, key) for every image of every folder, in a stable order; raises ValueError on a
    clash."""
    jobs, seen = [], {}
    for folder in folders:
        prefix = (folder.resolve().name + "_") if len(folders) > 1 else ""
        for f in files.find_images(folder):
            rel = f.relative_to(folder) if folder.is_dir() else Path(f.name)
            key = prefix + "_".join(rel.with_suffix("").parts).replace(".", "_")
            if key in seen:
                raise ValueError(
                    f"{f} and {seen[key]} would get the same key {key!r}: rename one of them"
                )
            seen[key] = f
            jobs.append((f, key))
    return jobs


def write_shards(
    jobs: list[tuple[Path, str]], out: Path, shard_size: int, prefix: str = "train"
) -> list[Path]:
    """Write the samples into shards of `shard_size` images; returns the shard paths."""
    n = (len(jobs) + shard_size - 1) // shard_size
    paths = [out / f"{prefix}-{i:06d}.tar" for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(jobs), desc="make_shards", unit="img")
    for i, path in enumerate(paths):
        with files.atomic_path(path) as tmp:
            with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False) as sink:
                for f, key in jobs[i * shard_size:(i + 1) * shard_size]:
                    # the file as it is
                    sink.write({"__key__": key, f.suffix[1:].lower(): f.read_bytes()})
                    bar.update()
    bar.close()
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-i", "--input", nargs="+", required=True, help="folder(s) of images, searched recursively"
    )
    p.add_argument(
        "-o", "--output", required=True, help="folder for the shards (must not hold shards already)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard file name prefix (default train)")
    a = p.parse_args(argv)
    out = Path(a.output)
    if a.shard_size < 1:
        print(f"make_shards.py: --shard-size {a.shard_size}: must be at least 1", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"make_shards.py: -o {out} is a file, not a folder", file=sys.stderr)
        return 2
    existing = sorted(out.glob(f"{a.prefix}-*.tar")) if out.is_dir() else []
    if existing:
        print(
            f"make_shards.py: {out} already holds {len(existing)} shard(s) ({existing[0].name}, "
            "…): "
            "choose another -o or --prefix",
            file=sys.stderr,
        )
        return 2
    folders = [Path(f) for f in a.input]
    try:
        for folder in folders:
            if folder.is_dir() and (
                out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents
            ):
                raise ValueError(f"-o {out} is inside the input folder {folder}: choose another -o")
        jobs = sample_keys(folders)
    except (OSError, ValueError) as e:
        print(f"make_shards.py: {e}", file=sys.stderr)
        return 2
    if not jobs:
        print(
            f"make_shards.py: no images ({', '.join(files.IMAGE_EXTS)}) in {', '.join(a.input)}",
            file=sys.stderr,
        )
        return 2
    paths = write_shards(jobs, out, a.shard_size, a.prefix)
    pattern = (
        paths[0] if len(paths) == 1 else out / f"{a.prefix}-{{000000..{len(paths) - 1:06d}}}.tar"
    )
    print(
        f"make_shards.py: {len(jobs)} images in {len(paths)} shard(s); train with --data "
        f"'{pattern}'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "make_shards.py"))
