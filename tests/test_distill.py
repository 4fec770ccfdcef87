"""Distillation: (t, r) sampling, the RC correction as the paper writes it, by hand and against an
exact flow map, the loss of eq. 17, the shortcut target, and the CLI chain teacher → student → sampling."""
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
from tools import export  # noqa: E402


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


def rc_corr_as_in_the_paper(f, z_t, t, r, u, v_tea, dt, n_steps):
    """Appendix A.1.2 written out sample by sample (float64; f(z, t, r, b) is the student on sample b):
        t_m = max(t − Δt, r),  z_{t_m} = z_t − (t − t_m)·v_tea                       (eq. 13)
        a detached rollout of N student steps t_m → r gives u^tar_{t_m→r}, the average velocity
        (z_{t_m} − z_r)/(t_m − r) of that trajectory,
        corr = clip(c_l·u_{t→r} − c_r·u^tar − v_tea, [−1, 1])                         (eq. 14)
    The paper takes c_l, c_r from the RC formulation: the jump t → r should equal the teacher step
    t → t_m followed by the trajectory t_m → r, (t − r)·u = (t − t_m)·v_tea + (t_m − r)·u^tar; solved for
    the teacher's velocity, c_l = (t − r)/(t − t_m) and c_r = (t_m − r)/(t − t_m)."""
    out = torch.empty_like(z_t, dtype=torch.float64)
    for b in range(z_t.shape[0]):
        tb, rb = float(t[b]), float(r[b])
        tm = max(tb - dt, rb)
        z_m = z_t[b].double() - (tb - tm) * v_tea[b].double()
        grid = [tm + (rb - tm) * k / n_steps for k in range(n_steps + 1)]
        z = z_m.clone()
        for s_from, s_to in zip(grid, grid[1:]):
            step = f(z[None], torch.tensor([s_from], dtype=torch.float64), torch.tensor([s_to], dtype=torch.float64), b)
            z = z - (s_from - s_to) * step[0]
        u_tar = (z_m - z) / (tm - rb) if tm > rb else torch.zeros_like(z)
        c_l, c_r = (tb - rb) / (tb - tm), (tm - rb) / (tb - tm)
        out[b] = (c_l * u[b].double() - c_r * u_tar - v_tea[b].double()).clamp(-1, 1)
    return out


def test_rc_correction_as_the_paper_writes_it():
    g = torch.Generator().manual_seed(3)
    B = 6
    z_t = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    u = v + 0.05 * torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.05, 0.7, 0.6], dtype=torch.float64)
    r = torch.tensor([0.0, 0.45, 0.295, 0.045, 0.1, 0.55], dtype=torch.float64)  # d > Δ and d ≤ Δ for Δ = 0.01
    for dt, n in [(0.01, 2), (0.1, 3), (0.2, 1)]:
        got = distill.rc_correction(toy_student, z_t, t, r, u, v, dt, n)
        want = rc_corr_as_in_the_paper(lambda z, t_, r_, b: toy_student(z, t_, r_), z_t, t, r, u, v, dt, n)
        assert torch.allclose(got.double(), want, atol=1e-6), (dt, n)
        assert (want.abs() < 1).any() and (want.abs() == 1).any()  # the clip is exercised


def test_rc_correction_by_hand():
    """Students simple enough to roll out by hand (t = 0.9, r = 0.1, Δ = 0.1: t_m = 0.8, c_l = 8, c_r = 7)."""
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    t, r = torch.tensor([0.9], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)

    def const(z, t_, r_):  # f ≡ 0.5: the rollout's average velocity is 0.5
        return torch.full_like(z, 0.5)

    def corr(f, u, v, t=t, r=r, n=2):
        return distill.rc_correction(f, one, t, r, u * one, v * one, 0.1, n).item()

    assert corr(const, 0.5, 0.45) == pytest.approx(8 * 0.5 - 7 * 0.5 - 0.45)     # 0.05
    assert corr(const, 0.6, 0.45) == pytest.approx(8 * 0.6 - 7 * 0.5 - 0.45)     # 0.85
    assert corr(const, 1.0, 0.45) == pytest.approx(1.0)                          # 4.05, clipped
    assert corr(const, 0.3, 0.45) == pytest.approx(-1.0)                         # −1.55, clipped
    # f(z) = z from z_m = z_t − 0.1·0 = 1, two steps of 0.35: 1 → 0.65 → 0.4225; u^tar = 0.5775 / 0.7 = 0.825
    assert corr(lambda z, t_, r_: z, 0.72, 0.0) == pytest.approx(8 * 0.72 - 7 * 0.825, abs=1e-6)  # −0.015
    # d = 0.05 ≤ Δ: t_m = r, the teacher step is the whole jump: corr = u − v_tea
    assert corr(const, 0.5, 0.45, t=torch.tensor([0.5], dtype=torch.float64),
                r=torch.tensor([0.45], dtype=torch.float64)) == pytest.approx(0.05)


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


@pytest.mark.parametrize("method", ["rc", "shortcut"])
def test_distill_loss_is_base_plus_consistency(method):
    """L = ‖f(z_t, t, t, κ) − v_tea‖² + ‖u − target‖² with v_tea the guided teacher on the full and partial
    conditions (eq. 5) and the student on κ; target = sg(u) − corr (rc, eq. 14–17) or the detached
    two-half average ū (shortcut, eq. 7–11). Value and gradient: for rc the value of the second term is
    mean(corr²) whatever the sign of corr in eq. 15; its gradient 2·corr·∂u/N tells the sign apart."""
    g = torch.Generator().manual_seed(4)
    B, C = 4, 2
    z0, z1, c_str = (torch.randn(B, C, 3, 3, generator=g) for _ in range(3))
    n = torch.randn(B, C, 3, 3, generator=g)
    d = dict(t=torch.tensor([0.9, 0.6, 0.3, 0.05]), r=torch.tensor([0.2, 0.55, 0.0, 0.049]), z1=z1,
             aux=torch.tensor([False, True, False, True]), alpha=torch.tensor([0.1, 0.2, 0.15, 0.05]),
             a_logit=torch.tensor([2.0, 1.0, 3.0, 0.5]), n=n)
    w = torch.tensor(0.7, requires_grad=True)

    def net(x, t, c_sem, r=None):  # a student: any smooth function of (c_str, z, t, r) with a parameter
        c, z = x[:, :C], x[:, C:]
        return w * torch.sin(z) + 0.3 * c * t.view(-1, 1, 1, 1) - 0.2 * r.view(-1, 1, 1, 1) * z

    def teacher(x, t, c_sem):
        return torch.tanh(x[:, :C]) + x[:, C:] * t.view(-1, 1, 1, 1)

    cfg = distill.DistillConfig(mode="partial", omega=0.5, delta=0.1, n_rc=2, method=method)
    terms = {}
    loss = distill.distill_loss(cfg, teacher, net, z0, c_str, None, d, terms)
    loss.backward()
    got_grad, w.grad = w.grad.clone(), None

    t, r, bt = d["t"], d["r"], lambda v: v.view(-1, 1, 1, 1)
    z_t = bt(1 - t) * z0 + bt(t) * z1
    a = torch.sigmoid(d["a_logit"])
    full = bt(a) * c_str + bt((1 - a**2).sqrt()) * n                       # noise-augmented c_str
    weak = bt(d["alpha"]) * c_str                                          # α·c_str
    kappa = torch.where(bt(d["aux"]), weak, full)                         # the student's condition
    v_c, v_p = teacher(torch.cat([full, z_t], 1), t, None), teacher(torch.cat([weak, z_t], 1), t, None)
    v_tea = v_p + 0.5 * (v_c - v_p)

    def student(z, t_, r_):
        return net(torch.cat([kappa, z], 1), t_, None, r_)

    u_base, u = student(z_t, t, t), student(z_t, t, r)
    if method == "rc":
        def student_b(z, t_, r_, b):  # sample b alone, on its own condition
            return net(torch.cat([kappa[b:b + 1], z.float()], 1), t_.float(), None, r_.float()).detach().double()

        corr = rc_corr_as_in_the_paper(student_b, z_t.detach(), t, r, u.detach(), v_tea, 0.1, 2).float()
        miss = corr                                                        # u − (sg(u) − corr)
    else:
        s = (t + r) / 2
        u_ts = student(z_t, t, s).detach()
        u_sr = student(z_t - bt(t - s) * u_ts, s, r).detach()
        miss = u.detach() - (u_ts + u_sr) / 2                              # u − ū
    base = ((u_base - v_tea) ** 2).mean()
    assert loss.item() == pytest.approx((base + (miss**2).mean()).item(), rel=1e-5)
    assert float(terms["loss_base"]) == pytest.approx(base.item(), rel=1e-5)  # the logged terms
    assert float(terms["loss_cons"]) == pytest.approx((miss**2).mean().item(), rel=1e-5)
    if method == "rc":
        assert float(terms["rc_clipped"]) == pytest.approx((corr.abs() >= 1).float().mean().item())
    (base + 2 * (u * miss).sum() / u.numel()).backward()                  # the gradient of ‖u − target‖²
    assert got_grad.item() == pytest.approx(w.grad.item(), rel=1e-4)
    assert abs((2 * (u * miss).sum() / u.numel()).item()) > 1e-3  # the consistency term matters here


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
    demo = export.export_run(str(student), str(tmp_path / "demo"), note="test model")
    full, half = load_file(str(student / "ema.safetensors")), load_file(str(demo / "ema.safetensors"))
    assert full.keys() == half.keys()
    assert all(torch.equal(half[k], full[k].half() if full[k].is_floating_point() else full[k]) for k in full)
    assert json.loads((demo / "config.json").read_text())["note"] == "test model"
    # without --ckpt, sample.py takes the demo model (a student: 1 step by default) and says so
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (9, 7), (10, 200, 90)).save(lr_dir / "x.png")
    monkeypatch.setattr(sample, "DEFAULT_CKPT", demo)
    assert sample.main(["-i", str(lr_dir), "-o", str(tmp_path / "a"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "shipped default model" in printed and "student, 1 step(s)" in printed
    # the fp16 export and the fp32 run give the same picture up to fp16 rounding of the weights
    assert sample.main(["--ckpt", str(student), "-i", str(lr_dir), "-o", str(tmp_path / "b"), "--steps", "1",
                        "--device", "cpu"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "x.png"), dtype=int) for d in "ab")
    assert a.shape == (28, 36, 3) and np.abs(a - b).max() <= 2


def test_fixed_alpha_replaces_the_per_sample_draw_everywhere():
    """--alpha 0.1: every sample's α is 0.1 — in the student's κ (partial samples get 0.1·c_str) and in
    the teacher's partial target — while t, r, ε and the branch choice stay the draws of the seed."""
    shape = (2, 3, 3)
    drawn = distill.draw_distill(distill.DistillConfig(batch=64), shape, torch.Generator().manual_seed(0))
    fixed = distill.draw_distill(distill.DistillConfig(batch=64, alpha=0.1), shape, torch.Generator().manual_seed(0))
    assert torch.equal(fixed["alpha"], torch.full((64,), 0.1)) and drawn["alpha"].std() > 0.01
    for k in drawn.keys() - {"alpha"}:
        assert torch.equal(drawn[k], fixed[k]), k
    assert fixed["aux"].any() and (~fixed["aux"]).any()

    B = 4
    d = {k: v[:B] for k, v in fixed.items()}
    d["aux"] = torch.tensor([True, False, True, False])
    c_str, z0 = torch.randn(B, *shape), torch.randn(B, *shape)
    seen = {}

    def teacher(x, t, c_sem):
        seen.setdefault("teacher", x[:, :2].clone())
        return x[:, 2:]

    def net(x, t, c_sem, r=None):
        seen.setdefault("student", x[:, :2].clone())
        return x[:, 2:] * 0.5

    distill.distill_loss(distill.DistillConfig(batch=B, alpha=0.1, method="shortcut"), teacher, net, z0, c_str, None, d)
    partial = seen["teacher"][B:]  # the second half of the teacher's batch: the partial branch
    assert torch.allclose(partial, 0.1 * c_str, atol=1e-6)
    assert torch.allclose(seen["student"][:B][d["aux"]], 0.1 * c_str[d["aux"]], atol=1e-6)
    assert not torch.allclose(seen["student"][:B][~d["aux"]], 0.1 * c_str[~d["aux"]], atol=1e-3)
