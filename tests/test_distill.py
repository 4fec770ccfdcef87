"""Distillation: (t, r) sampling, the RC and shortcut targets against hand-written loops and an
exact flow map, and the CLI chain teacher → student → one-step sampling."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distill
import sample
import train_teacher as tt
from tests.test_teacher import make_photos

ROOT = Path(__file__).resolve().parents[1]


def test_time_sampler_statistics():
    t, r = distill.sample_times(200_000, torch.Generator().manual_seed(0))
    assert (t >= r).all() and (r >= 0).all() and (t <= 1).all()
    for x in (0.2, 0.5, 0.8):  # t = max(u1, u2) ⇒ P(t ≤ x) = x²
        assert abs((t <= x).float().mean().item() - x * x) < 0.005
    ratio = r / t  # r = t·(1 − g): r/t is uniform
    for x in (0.25, 0.5, 0.75):
        assert abs((ratio <= x).float().mean().item() - x) < 0.005


def toy_student(z, t, r):
    """A nonlinear stand-in for f(z, t, r) so the rollout order matters."""
    return torch.sin(3 * z) * t.view(-1, 1, 1, 1) + z**2 * r.view(-1, 1, 1, 1) - 0.5


def naive_rc(z_t, t, r, u, v, delta, n):
    """RC correction written per sample and per element with Python floats (DESIGN §8)."""
    out = torch.empty_like(z_t)
    for b in range(z_t.shape[0]):
        tb, rb = float(t[b]), float(r[b])
        t_m = max(tb - delta, rb)
        for idx in itertools.product(*(range(s) for s in z_t.shape[1:])):
            z = float(z_t[b][idx]) - (tb - t_m) * float(v[b][idx])
            F = 0.0
            for i in range(n):
                ti, tn = t_m - (t_m - rb) * i / n, t_m - (t_m - rb) * (i + 1) / n
                f = math.sin(3 * z) * ti + z * z * tn - 0.5
                F += f * (ti - tn)
                z -= f * (ti - tn)
            d, ub, vb = tb - rb, float(u[b][idx]), float(v[b][idx])
            c = (ub * d - F) / delta - vb if d > delta else ub - (F / d if d > 0 else 0.0) - vb
            out[b][idx] = min(1.0, max(-1.0, c))
    return out


def test_rc_correction_matches_naive_loop_both_branches_and_clip():
    g = torch.Generator().manual_seed(0)
    B = 6
    z_t, v = torch.randn(B, 2, 3, 3, generator=g), torch.randn(B, 2, 3, 3, generator=g)
    u = v + 0.05 * torch.randn(B, 2, 3, 3, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 0.05, 0.7, 0.2])
    r = torch.tensor([0.0, 0.45, 0.295, 0.045, 0.1, 0.2])  # d > Δ, d > Δ, d ≤ Δ, d ≤ Δ, d > Δ, d = 0
    for delta, n in [(0.01, 2), (0.1, 3)]:
        got = distill.rc_correction(toy_student, z_t, t, r, u, v, delta, n)
        want = naive_rc(z_t, t, r, u, v, delta, n)
        assert torch.allclose(got, want, atol=1e-5)
        assert (got.abs() == 1).any() and (got.abs() < 1).any()  # the clip is exercised


def test_rc_correction_vanishes_for_exact_flow_map():
    # dz/dt = a·z has the exact flow map z_r = z_t·exp(−a(t − r)); a student equal to it has
    # average velocity u = z(1 − e^{−a d})/d. The only error left is the teacher's Euler warm start:
    # corr = z_t·e^{−a(d−Δ)}·(1 − e^{−aΔ} − aΔ)/Δ, so |corr| ≤ |z_t|·a²·Δ/2.
    a = 1.3
    g = torch.Generator().manual_seed(1)
    z_t = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.4, 1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.39, 0.5], dtype=torch.float64)

    def exact(z, t_, r_):
        d = (t_ - r_).view(-1, 1, 1, 1)
        return torch.where(d > 0, z * (1 - torch.exp(-a * d)) / d.clamp_min(1e-12), a * z)

    for delta in (0.02, 0.01, 0.005):
        u = exact(z_t, t, r)
        corr = distill.rc_correction(exact, z_t, t, r, u, a * z_t, delta, 2)
        d = (t - r).view(-1, 1, 1, 1)
        big = d > delta
        closed = z_t * torch.exp(-a * (d - delta)) * (1 - math.exp(-a * delta) - a * delta) / delta
        assert torch.allclose(corr[big.expand_as(z_t)], closed[big.expand_as(z_t)], atol=1e-5)
        assert (corr.abs() <= z_t.abs() * a * a * delta / 2 + 1e-6).all()


def test_shortcut_target_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    z_t = torch.randn(3, 2, 2, 2, generator=g)
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.5, 0.0])
    got = distill.shortcut_target(toy_student, z_t, t, r)
    for b in range(3):
        s = (t[b] + r[b]) / 2
        u1 = torch.sin(3 * z_t[b]) * t[b] + z_t[b] ** 2 * s - 0.5
        z_s = z_t[b] - (t[b] - s) * u1
        u2 = torch.sin(3 * z_s) * s + z_s**2 * r[b] - 0.5
        assert torch.allclose(got[b], (u1 + u2) / 2, atol=1e-6)


def test_teacher_target_is_eq5():
    def teacher(x, t, c_sem):  # velocity depends on c_str and on whether semantics are present
        c = x[:, :2]
        sem = 0 if c_sem is None else c_sem.sum((1, 2)).view(-1, 1, 1, 1)
        return c * 2 + sem + x[:, 2:]

    z, cf, cp = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    c_sem = torch.ones(2, 4, 5)
    v = distill.teacher_target(teacher, z, torch.tensor([0.5, 0.5]), cf, cp, c_sem, omega=0.5)
    v_cond, v_pcond = cf * 2 + 20 + z, cp * 2 + z
    assert torch.allclose(v, v_pcond + 0.5 * (v_cond - v_pcond), atol=1e-5)


@pytest.mark.parametrize("method", ["rc", "shortcut"])
def test_distill_cli_chain(tmp_path, method):
    photos = make_photos(tmp_path / "photos", n=3)
    teacher = tmp_path / "teacher"
    tt.train(tt.TrainConfig(data=str(photos), out=str(teacher), preset="tiny", codec="pixel", semantic="none",
                            degradation="bicubic", size=32, batch=2, steps=2, workers=0, device="cpu"))
    student = tmp_path / "student"
    hist = distill.main(["--teacher", str(teacher), "--data", str(photos), "--out", str(student),
                         "--method", method, "--size", "32", "--batch", "2", "--steps", "2", "--workers", "0",
                         "--device", "cpu"])
    assert len(hist) == 2 and all(math.isfinite(v) for v in hist.values())
    conf = json.loads((student / "config.json").read_text())
    assert conf["method"] == method and conf["preset"] == "tiny" and conf["codec"] == "pixel"
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 90)).save(lr_dir / "x.png")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(student), "-i", str(lr_dir),
                        "-o", str(tmp_path / "out"), "--steps", "1", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "student" in r.stdout
    assert Image.open(tmp_path / "out" / "x.png").size == (32, 32)


def test_export_fp16_and_default_ckpt(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    photos = make_photos(tmp_path / "photos", n=3)
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    tt.train(tt.TrainConfig(data=str(photos), out=str(teacher), preset="tiny", codec="pixel", semantic="none",
                            degradation="bicubic", size=32, batch=2, steps=1, workers=0, device="cpu"))
    distill.main(["--teacher", str(teacher), "--data", str(photos), "--out", str(student), "--size", "32",
                  "--batch", "2", "--steps", "1", "--workers", "0", "--device", "cpu"])
    demo = distill.export_run(str(student), str(tmp_path / "demo"), note="test model")
    full, half = load_file(str(student / "ema.safetensors")), load_file(str(demo / "ema.safetensors"))
    assert full.keys() == half.keys()
    assert all(torch.equal(half[k], full[k].half() if full[k].is_floating_point() else full[k]) for k in full)
    assert json.loads((demo / "config.json").read_text())["note"] == "test model"
    # without --ckpt, sample.py takes the demo model (a student: 1 step by default) and says so
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (9, 7), (10, 200, 90)).save(lr_dir / "x.png")
    monkeypatch.setattr(sample, "DEMO_CKPT", demo)
    assert sample.main(["-i", str(lr_dir), "-o", str(tmp_path / "a"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "embedded demo model" in printed and "student, 1 step(s)" in printed
    # the fp16 export and the fp32 run give the same picture up to fp16 rounding of the weights
    assert sample.main(["--ckpt", str(student), "-i", str(lr_dir), "-o", str(tmp_path / "b"), "--steps", "1",
                        "--device", "cpu"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "x.png"), dtype=int) for d in "ab")
    assert a.shape == (28, 36, 3) and np.abs(a - b).max() <= 2
