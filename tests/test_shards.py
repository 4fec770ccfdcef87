"""Data that outgrows a folder: WebDataset shards made by tools/make_shards.py, dataset lists mixed by
weight, streams split across ranks and workers without duplicates, exact resume, bad shards skipped."""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_teacher as tt
from vosr import shards
from vosr.files import UserError

ROOT = Path(__file__).resolve().parents[1]
from tools import make_shards  # noqa: E402


def flat_images(folder: Path, values, size=(12, 10), ext="png") -> Path:
    """One image per value, every pixel of image k equal to values[k] (so a crop tells where it came from)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, v in enumerate(values):
        Image.fromarray(np.full((*size, 3), v, np.uint8)).save(folder / f"im{k:03d}.{ext}")
    return folder


def shards_of(folder: Path, out: Path, shard_size: int) -> list[str]:
    assert make_shards.main(["-i", str(folder), "-o", str(out), "--shard-size", str(shard_size)]) == 0
    return sorted(str(p) for p in out.glob("*.tar"))


def loader_cfg(data, workers=0, size=4, seed=0):
    return tt.TrainConfig(data=str(data), size=size, workers=workers, seed=seed)


def values_of(batch: torch.Tensor) -> list[int]:
    """The pixel value of each crop of flat images (all pixels are equal)."""
    return [round(float(c.mean()) * 255) for c in batch]


def test_make_shards_round_trips_every_image_bit_for_bit(tmp_path):
    src = tmp_path / "photos"
    flat_images(src, [10, 20, 30], ext="png")
    (src / "sub").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(src / "sub" / "a.b.jpg")
    other = flat_images(tmp_path / "more", [40])
    r = subprocess.run([sys.executable, "-m", "tools.make_shards", "-i", src, other, "-o",
                        tmp_path / "shards", "--shard-size", "2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    members = {}
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:                       # read back with the standard library alone
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files = {f"photos_{'_'.join(p.relative_to(src).with_suffix('').parts).replace('.', '_')}{p.suffix}": p
             for p in src.rglob("*.*")} | {"more_im000.png": other / "im000.png"}
    assert set(members) == set(files) and len(members) == 5
    for name, path in files.items():
        assert members[name] == path.read_bytes(), name
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3            # 5 images, 2 per shard
    assert "train-{000000..000002}.tar" in r.stdout
    again = subprocess.run([sys.executable, "-m", "tools.make_shards", "-i", src, "-o", tmp_path / "shards"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "already holds 3 shard" in again.stderr and "Traceback" not in again.stderr


def test_data_specs_folder_pattern_and_list(tmp_path):
    tars = shards_of(flat_images(tmp_path / "a", range(6)), tmp_path / "sa", 2)
    flat_images(tmp_path / "b", [7, 8])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "mix.txt").write_text("# name, weight\n../sa, 2\n../b , 0.5\n\n")
    (name, units, w), = shards.parse_sources(str(tmp_path / "sa" / "train-{000000..000002}.tar"))
    assert units == tars and w == 1
    mix = shards.parse_sources(str(tmp_path / "lists" / "mix.txt"))
    assert [u for _, u, _ in mix] == [tars, [str(tmp_path / "b" / "im000.png"), str(tmp_path / "b" / "im001.png")]]
    assert [w for *_, w in mix] == [2.0, 0.5]
    (tmp_path / "bad.txt").write_text("../sa, lots\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        shards.parse_sources(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="000009"):
        shards.parse_sources(str(tmp_path / "sa" / "train-{000000..000009}.tar"))


def test_weighted_mix_follows_the_weights(tmp_path):
    shards_of(flat_images(tmp_path / "dark", [40] * 8), tmp_path / "s_dark", 2)
    flat_images(tmp_path / "bright", [200] * 8)
    (tmp_path / "mix.txt").write_text("s_dark, 1\nbright, 3\n")
    loader = shards.StreamLoader(loader_cfg(tmp_path / "mix.txt"), rank=0, world=1, micro=20, start={})
    counts = Counter(v for _ in range(20) for v in values_of(next(loader)))
    assert set(counts) == {40, 200}
    # 400 draws, P(bright) = 3/4: the standard deviation of the count is sqrt(400·3/16) ≈ 8.7
    assert abs(counts[200] - 300) < 35, counts


@pytest.mark.parametrize("shard_size", [4, 32])   # 8 shards for 4 streams (split by shard); 1 shard (by sample)
def test_two_ranks_two_workers_read_disjoint_samples_in_an_epoch(tmp_path, shard_size):
    shards_of(flat_images(tmp_path / "photos", range(10, 42)), tmp_path / "shards", shard_size)
    seen = []
    for rank in (0, 1):
        loader = shards.StreamLoader(loader_cfg(tmp_path / "shards", workers=2), rank=rank, world=2, micro=4, start={})
        for _ in range(4):                     # 4 micro-batches × 2 per stream = one epoch of each stream (8)
            seen += values_of(next(loader))
    assert sorted(seen) == list(range(10, 42))      # 32 images, each once: no duplicates, none missing


def test_resume_continues_each_stream_exactly(tmp_path):
    shards_of(flat_images(tmp_path / "photos", range(10, 40)), tmp_path / "shards", 3)
    cfg = loader_cfg(tmp_path / "shards", workers=2, size=6)
    full = shards.StreamLoader(cfg, rank=0, world=1, micro=4, start={})
    first = [next(full) for _ in range(5)]
    again = shards.StreamLoader(cfg, rank=0, world=1, micro=4, start={})
    for _ in range(3):
        next(again)
    state = again.state(world=1)
    assert state == {0: 6, 1: 6}                           # 3 micro-batches × 2 samples from each stream
    resumed = shards.StreamLoader(cfg, rank=0, world=1, micro=4, start=state)
    for k in (3, 4):
        assert torch.equal(next(resumed), first[k])


def test_bad_shards_and_members_are_named_and_skipped(tmp_path, capfd):
    tars = shards_of(flat_images(tmp_path / "photos", range(10, 22)), tmp_path / "shards", 4)
    data = Path(tars[1]).read_bytes()
    Path(tars[1]).write_bytes(data[:len(data) // 3])                   # truncated mid-member
    with tarfile.open(tmp_path / "shards" / "train-000003.tar", "w") as tar:   # a sample with no image
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    loader = shards.StreamLoader(loader_cfg(tmp_path / "shards"), rank=0, world=1, micro=4, start={})
    got = [v for _ in range(4) for v in values_of(next(loader))]
    err = capfd.readouterr().err
    assert "train-000001.tar" in err and "train-000003.tar:notes" in err and "Traceback" not in err
    assert set(got) <= set(range(10, 22)) and len(got) == 16   # the good shards go on


def test_two_node_torchrun_equals_one_process(tmp_path):
    """torchrun --nnodes 2 (one process each, gloo, on this machine) trains on shards with the same first
    losses as one process with the same global batch and the same number of data streams (ranks × workers)."""
    from tests.test_teacher import make_photos
    shards_of(make_photos(tmp_path / "photos", n=8), tmp_path / "shards", 2)
    args = ["--data", str(tmp_path / "shards"), "--preset", "tiny", "--codec", "pixel", "--semantic", "none",
            "--degradation", "bicubic", "--size", "32", "--batch", "4", "--steps", "3", "--log-every", "1",
            "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, ROOT / "train_teacher.py", *args, "--workers", "2", "--out", tmp_path / "one"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(k),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               ROOT / "train_teacher.py", *args, "--workers", "1", "--out", tmp_path / "two"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_training_on_shards_resumes_exactly(tmp_path):
    """4 steps on shards in one go == 2 steps, then --resume to 4 (2 data streams: --workers 2): the same
    weights, since each stream continues at the sample the checkpoint recorded; another stream count is refused."""
    from safetensors.torch import load_file
    from tests.test_teacher import _cfg, make_photos
    shards_of(make_photos(tmp_path / "photos", n=8), tmp_path / "shards", 2)
    kw = dict(data=str(tmp_path / "shards"), workers=2)
    full = tt.train(_cfg(tmp_path, None, out=str(tmp_path / "a"), **kw))
    tt.train(_cfg(tmp_path, None, out=str(tmp_path / "b"), steps=2, **kw))
    resumed = tt.train(_cfg(tmp_path, None, out=str(tmp_path / "b"), steps=4, resume=True, **kw))
    assert all(resumed[s] == full[s] for s in (2, 3))
    a, b = (load_file(str(tmp_path / d / "ckpt.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.")))
    with pytest.raises(UserError, match="the run read 2 streams"):
        tt.train(_cfg(tmp_path, None, out=str(tmp_path / "b"), steps=6, resume=True, data=kw["data"], workers=1))


def test_unusable_streamed_data_is_one_line_and_no_run_dir(tmp_path):
    tars = shards_of(flat_images(tmp_path / "photos", range(10, 14)), tmp_path / "shards", 4)
    Path(tars[0]).write_bytes(Path(tars[0]).read_bytes()[:700])           # the only shard, truncated
    (tmp_path / "list.txt").write_text("shards, 1\nphotos, many\n")
    for data, named in ((tars[0], "train-000000.tar"), (tmp_path / "list.txt", "list.txt:2"),
                        (tmp_path / "shards" / "x-{0..3}.tar", "x-0.tar")):
        r = subprocess.run([sys.executable, ROOT / "train_teacher.py", "--data", data, "--out", tmp_path / "run",
                            "--preset", "tiny", "--codec", "pixel", "--semantic", "none", "--size", "32",
                            "--steps", "1", "--device", "cpu"], capture_output=True, text=True)
        lines = [ln for ln in r.stderr.splitlines() if "warning" not in ln]
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
        assert named in lines[0], lines[0]
        assert not (tmp_path / "run").exists()
