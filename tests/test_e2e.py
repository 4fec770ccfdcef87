"""The whole chain at toy size through the command lines a user types:
degrade → train_teacher → distill → sample → evaluate (score, sweep, grid)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.test_teacher import make_photos

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_toy_chain_through_the_clis(tmp_path):
    photos = make_photos(tmp_path / "photos", n=4, size=(72, 80))
    pairs = tmp_path / "pairs"
    run("degrade.py", "-i", photos, "-o", pairs, "--crop", "32", "--mode", "bicubic")
    assert len(list((pairs / "lr").iterdir())) == 4

    common = ["--data", photos, "--size", "32", "--batch", "2", "--steps", "2", "--workers", "0",
              "--device", "cpu"]
    run("train_teacher.py", *common, "--out", tmp_path / "teacher", "--preset", "tiny", "--codec", "pixel",
        "--semantic", "none", "--degradation", "bicubic")
    run("distill.py", *common, "--teacher", tmp_path / "teacher", "--out", tmp_path / "student")

    out = tmp_path / "sr"
    r = run("sample.py", "--ckpt", tmp_path / "student", "-i", pairs / "lr", "-o", out, "--steps", "1")
    assert "student" in r.stdout
    assert {p.name for p in out.iterdir()} == {p.name for p in (pairs / "lr").iterdir()}
    assert Image.open(next(out.iterdir())).size == (32, 32)

    run("evaluate.py", "--sr", out, "--hr", pairs / "hr", "--metrics", "psnr,ssim", "--csv", tmp_path / "m.csv")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == 5 and rows[-1]["image"] == "mean"

    run("evaluate.py", "sweep", "--ckpt", tmp_path / "teacher", "--lr", pairs / "lr", "--hr", pairs / "hr",
        "--guidance", "-0.5,1", "--steps", "2", "--metrics", "psnr", "--plot", tmp_path / "sweep.png",
        "--csv", tmp_path / "sweep.csv", "--device", "cpu", "--schedule", "cosine", "--shift", "3", "--seed", "1",
        "--out", tmp_path / "sweep_sr")
    assert [r["image"] for r in csv.DictReader(open(tmp_path / "sweep.csv"))] == ["s=-0.5", "s=1"]
    assert Image.open(tmp_path / "sweep.png").size[0] > 0
    # the sweep samples with sample.py's settings: its s = 1 images are sample.py's, file for file
    run("sample.py", "--ckpt", tmp_path / "teacher", "-i", pairs / "lr", "-o", tmp_path / "s1", "--guidance", "1",
        "--steps", "2", "--schedule", "cosine", "--shift", "3", "--seed", "1", "--device", "cpu")
    for f in (pairs / "lr").iterdir():
        assert (tmp_path / "s1" / f.name).read_bytes() == (tmp_path / "sweep_sr" / "s1" / f.name).read_bytes()

    run("evaluate.py", "grid", "--lr", pairs / "lr", "--hr", pairs / "hr", "--sr", f"student={out}",
        "--n", "2", "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (3 * 32, 2 * (32 + 32))
