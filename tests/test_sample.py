"""Sampling: Euler on known fields, guidance (eq. 2), tiling, colour fixes, the CLI end to end."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dit
import sample
import vae
from tests.test_teacher import make_photos

ROOT = Path(__file__).resolve().parents[1]


def test_euler_lands_on_analytic_endpoint():
    # On the straight path z_t = (1−t)·z_0 + t·z_1 the velocity is (z − z_0)/t: Euler is exact for it.
    torch.manual_seed(0)
    z0, z1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for steps, schedule, shift in [(1, "uniform", 1), (7, "uniform", 1), (5, "cosine", 1), (6, "cosine", 3)]:
        ts = sample.timesteps(steps, schedule, shift)
        z = sample.euler_sample(lambda z, t, r: (z - z0) / t.view(-1, 1, 1, 1), z1, ts)
        assert torch.allclose(z, z0, atol=1e-5)
    # A time-dependent field dz/dt = 2t·a integrates to z0 = z1 − a; Euler with uniform steps h
    # accumulates Σ 2 t_i h = 1 + h, so the error is exactly h·a.
    a = torch.randn(2, 3, 4, 4)
    z = sample.euler_sample(lambda z, t, r: 2 * t.view(-1, 1, 1, 1) * a, z1, sample.timesteps(10))
    assert torch.allclose(z, z1 - a * 1.1, atol=1e-5)


def test_timesteps_endpoints():
    for sch in ("uniform", "cosine"):
        ts = sample.timesteps(4, sch)
        assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_timestep_shift():
    # uniform 1, 3/4, 1/2, 1/4, 0 shifted by σ = 3, by hand: 3t / (1 + 2t) = 1, 9/10, 3/4, 1/2, 0
    assert torch.allclose(sample.timesteps(4, "uniform", 3.0), torch.tensor([1, 0.9, 0.75, 0.5, 0]))
    # shifts compose by multiplying σ, so σ then 1/σ is no shift (up to float32 rounding)
    for sch in ("uniform", "cosine"):
        ts = sample.timesteps(9, sch, 2.5).double()
        back = ts / 2.5 / (1 + (1 / 2.5 - 1) * ts)
        assert torch.allclose(back.float(), sample.timesteps(9, sch), atol=1e-6)
    with pytest.raises(ValueError, match="shift"):
        sample.timesteps(4, "uniform", 0.0)
    # start (ours): the schedule scaled to begin there, by hand
    assert torch.allclose(sample.timesteps(4, start=0.5), torch.tensor([0.5, 0.375, 0.25, 0.125, 0]))


def test_start_below_one_refines_the_noised_upscale():
    """start t0 < 1 (ours, SDEdit-style): one student step from z_t0 = (1 − t0)·c_str + t0·z_1 to 0,
    against the same step written out by hand; start 1 is the paper's draw from noise."""
    codec = vae.PixelCodec()
    model = tiny_dit(codec.channels, with_r=True)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = sample.VOSRPipeline(model, codec, None, student=True)
    got = pipe(lr, 4.0, steps=1, generator=torch.Generator().manual_seed(0), tile=0, start=0.4)
    c_str = torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic").clamp(0, 1) * 2 - 1
    c_str = torch.nn.functional.pixel_unshuffle(c_str, 8)            # the pixel codec: 8×8 blocks
    z1 = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0))
    z = 0.6 * c_str + 0.4 * z1
    with torch.no_grad():
        v = model(torch.cat([c_str, z], 1), torch.full((1,), 0.4), None, torch.zeros(1))
    want = torch.nn.functional.pixel_shuffle(z - 0.4 * v, 8).add(1).div(2).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-5)
    paper = pipe(lr, 4.0, steps=1, generator=torch.Generator().manual_seed(0), tile=0)
    assert (paper - got).abs().mean() > 0.01
    with pytest.raises(ValueError, match="start"):
        pipe(lr, 4.0, steps=1, tile=0, start=0.0)


@pytest.mark.parametrize("flag,value", [("--scale", "0"), ("--shift", "-1"), ("--tile", "-1"), ("--tile-overlap", "-1")])
def test_cli_refuses_out_of_range_settings(flag, value, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["-i", "x", flag, value])
    assert flag in capsys.readouterr().err
    assert sample.parse_args(["-i", "x", "--tile-overlap", "0", "--shift", "0.5"]).tile_overlap == 0  # edges allowed


def tiny_dit(latent_channels, enc_dim=8, with_r=False, patch_size=2):
    """A seeded tiny DiT whose zero-initialised output layers got some weight, so that branches, tiles and
    fast paths give different (non-zero) velocities and a wrong one shows."""
    torch.manual_seed(0)
    m = dit.build("tiny", latent_channels=latent_channels, enc_dim=enc_dim, train_grid=4, with_r=with_r,
                  patch_size=patch_size).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_dit(4)


@pytest.fixture(scope="module")
def pixel_model():
    return tiny_dit(vae.PixelCodec().channels)


def test_guidance_endpoints_equal_single_branches(tiny_model):
    torch.manual_seed(1)
    z, c_str, c_sem = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        v_cond = tiny_model(torch.cat([c_str, z], 1), t, c_sem)
        v_pcond = tiny_model(torch.cat([0.15 * c_str, z], 1), t, torch.zeros_like(c_sem))
        g = {s: sample.guided_velocity(tiny_model, z, t, c_str, c_sem, s, 0.15) for s in (0.0, 0.5, 1.0, 2.0)}
    assert not torch.allclose(v_cond, v_pcond, atol=1e-4)
    assert torch.allclose(g[1.0], v_cond, atol=1e-5)
    assert torch.allclose(g[0.0], v_pcond, atol=1e-5)
    assert torch.allclose(g[0.5], v_pcond + 0.5 * (v_cond - v_pcond), atol=1e-5)
    assert torch.allclose(g[2.0], 2 * v_cond - v_pcond, atol=1e-5)


def test_tiles_cover_and_blend_to_identity():
    # A pointwise function is unchanged by tiling: the Gaussian weights form a partition of unity.
    z = torch.randn(1, 3, 37, 50)
    out = sample.tiled(lambda zw, win: zw * 2 + 1, z, tile=16, overlap=6, align=2)
    assert torch.allclose(out, z * 2 + 1, atol=1e-5)
    for size, tile, ov in [(37, 16, 6), (50, 16, 4), (16, 16, 4), (10, 16, 4)]:
        starts = sample.tile_windows(size, tile, ov, 2)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[-1] + min(tile, size) == size


def test_tiled_sampling_equals_untiled_when_one_tile_covers(pixel_model):
    pipe = sample.VOSRPipeline(pixel_model, vae.PixelCodec(), None, student=False)
    lr = torch.rand(1, 3, 8, 12)
    a = pipe(lr, 4.0, steps=3, generator=torch.Generator().manual_seed(0), tile=48)
    b = pipe(lr, 4.0, steps=3, generator=torch.Generator().manual_seed(0), tile=4096)
    assert torch.equal(a, b)
    c = pipe(lr, 4.0, steps=3, generator=torch.Generator().manual_seed(0), tile=32, tile_overlap=16)
    assert c.shape == a.shape and (c - a).abs().mean() < 0.2  # tiled: close but not identical


@pytest.mark.parametrize("student", [False, True])
def test_untiled_pipeline_is_the_plain_sample(student):
    # sample() is the pipeline diagram in code; VOSRPipeline with one window (--tile 0) must compute exactly it:
    # the same LR↑, reflect padding, posterior sample, noise draw, guidance, decode crop and colour fix.
    semantic = vae.load_semantic("random-s", image_size=28)
    model = tiny_dit(vae.PixelCodec().channels, enc_dim=semantic.dim, with_r=student)
    lr = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(3))  # ×4 = 28×36: padded to 32×48
    kw = dict(steps=3, guidance=0.3, alpha=0.2, schedule="cosine", shift=2.0, upscale="pil", latent="sample",
              color_fix="adain", start=0.7)
    want = sample.sample(model, vae.PixelCodec(), semantic, lr, 4.0, generator=torch.Generator().manual_seed(0),
                         student=student, **kw)
    pipe = sample.VOSRPipeline(model, vae.PixelCodec(), semantic, student)
    got = pipe(lr, 4.0, generator=torch.Generator().manual_seed(0), tile=0, **kw)
    assert got.shape == (1, 3, 28, 36) and torch.equal(got, want)
    other = sample.sample(model, vae.PixelCodec(), semantic, lr, 4.0, generator=torch.Generator().manual_seed(0),
                          student=student, **{**kw, "guidance": 0.9})
    assert student == torch.equal(other, want)            # the teacher's guidance reaches it, a student's does not


@pytest.mark.parametrize("h,w,scale", [(8, 12, 4.0), (7, 5, 4.0), (9, 11, 2.0), (6, 6, 1.5)])
def test_output_size(pixel_model, h, w, scale):
    pipe = sample.VOSRPipeline(pixel_model, vae.PixelCodec(), None, student=False)
    sr = pipe(torch.rand(1, 3, h, w), scale, steps=1, generator=torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, round(h * scale), round(w * scale))
    assert sr.min() >= 0 and sr.max() <= 1


def test_color_fixes_match_reference_statistics():
    torch.manual_seed(0)
    ref = torch.rand(1, 3, 32, 32)
    sr = ref * 0.5 + 0.3
    fixed = sample.adain_color_fix(sr, ref)
    assert torch.allclose(fixed.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(fixed.std((2, 3)), ref.std((2, 3)), atol=1e-4)
    # wavelet fix of a constant colour shift restores the reference exactly (shift is all low-frequency)
    assert torch.allclose(sample.wavelet_color_fix(ref + 0.2, ref), ref, atol=1e-5)


def test_cli_end_to_end_with_bad_file(tmp_path):
    import train_teacher as tt
    photos = make_photos(tmp_path / "photos", n=3)
    run = tmp_path / "run"
    tt.train(tt.TrainConfig(data=str(photos), out=str(run), preset="tiny", codec="pixel", semantic="random",
                            semantic_size=28, degradation="bicubic", size=32, batch=2, steps=1, workers=0,
                            device="cpu"))
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (10, 7), (120, 30, 200)).save(lr_dir / "a.png")
    Image.new("L", (9, 9), 80).save(lr_dir / "b.jpg")
    (lr_dir / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(run), "-i", str(lr_dir),
                        "-o", str(out), "--steps", "2", "--device", "cpu", "--color-fix", "wavelet"],
                       cwd=ROOT, capture_output=True, text=True)
    # one image failed: the others are written
    assert r.returncode == 1, r.stderr
    assert "broken.png" in r.stderr and "wrote 2 image(s), skipped 0 existing, 1 failed" in r.stdout
    assert Image.open(out / "a.png").size == (40, 28)
    assert Image.open(out / "b.png").size == (36, 36)
    assert not (out / "broken.png").exists()


def test_run_with_the_4x4_pixel_codec_samples(tmp_path, monkeypatch):
    """A teacher trained with --codec pixel4 (48 channels) is rebuilt with that codec by sample.py, its
    default tile is its 32-pixel training crop (4 tokens × patch 2 × block 4), and it samples a folder."""
    import train_teacher as tt
    run = tmp_path / "run"
    tt.train(tt.TrainConfig(data=str(make_photos(tmp_path / "photos", n=2)), out=str(run), preset="tiny",
                            codec="pixel4", semantic="none", degradation="bicubic", size=32, batch=2, steps=1,
                            workers=0, device="cpu"))
    pipe, conf = sample.load_pipeline(sample.SampleConfig(ckpt=str(run), device="cpu"))
    assert conf["codec"] == "pixel4" and (pipe.codec.factor, pipe.model.latent_channels) == (4, 48)
    assert pipe.tile_sizes() == (32, 4)
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (12, 9), (120, 30, 200)).save(lr_dir / "a.png")
    assert sample.main(["--ckpt", str(run), "-i", str(lr_dir), "-o", str(tmp_path / "out"), "--steps", "2",
                        "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (48, 36)
    # --schedule and --shift reach the sampler (this barely trained model's velocity hardly depends on t,
    # so its output cannot show it)
    seen, real = [], sample.timesteps
    monkeypatch.setattr(sample, "timesteps", lambda *a: seen.append(a) or real(*a))
    assert sample.main(["--ckpt", str(run), "-i", str(lr_dir), "-o", str(tmp_path / "shifted"), "--steps", "3",
                        "--schedule", "cosine", "--shift", "2.5", "--device", "cpu"]) == 0
    assert seen == [(3, "cosine", 2.5, 1.0)]


def test_shipped_default_model_runs(tmp_path, capsys):
    """The committed default checkpoint: small enough to ship, loads strictly, and upsamples a photo-like image
    4× better than a flat guess (it is a trained model: its output must follow the input's structure)."""
    ckpt = sample.DEFAULT_CKPT
    assert (ckpt / "config.json").is_file() and (ckpt / "ema.safetensors").is_file(), f"{ckpt} is missing"
    assert (ckpt / "ema.safetensors").stat().st_size <= 20e6
    # a photo-like HR at the model's 64-pixel training crop (on a smooth gradient the size of a thumbnail,
    # a real-world model trained to restore texture invents some: README §2)
    from tests.test_e2e import real_looking
    name, lr_dir = "a.png", tmp_path / "lr"
    lr_dir.mkdir()
    hr_img = Image.fromarray(real_looking(0, 64))
    hr_img.resize((16, 16), Image.BICUBIC).save(lr_dir / name)
    assert sample.main(["-i", str(lr_dir), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "shipped default model" in capsys.readouterr().out
    out = np.asarray(Image.open(tmp_path / "out" / name), dtype=float)
    ref = np.asarray(hr_img, dtype=float)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < np.abs(ref.mean((0, 1)) - ref).mean()


def test_tile_default_is_read_from_the_checkpoint(tmp_path, capsys):
    """A run dir's config.json "sampler_defaults" (the shipped models' recommended tile) fills what the flags
    leave unset; a flag wins; a key that is not a sampler setting is one line naming the file."""
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(sample.DEFAULT_CKPT, run)
    conf = json.loads((run / "config.json").read_text())
    for tile in (128, 192):
        (run / "config.json").write_text(json.dumps({**conf, "sampler_defaults": {"tile": tile}}))
        cfg = sample.parse_args(["--ckpt", str(run), "-i", "x", "--device", "cpu"])
        pipe, r = sample.load_pipeline(cfg, report=lambda line: None)
        assert sample.checkpoint_defaults(cfg, pipe, r).tile == tile
        assert sample.checkpoint_defaults(replace_tile(cfg, 64), pipe, r).tile == 64     # the flag wins
    (run / "config.json").write_text(json.dumps({**conf, "sampler_defaults": {"guidance": 1}}))
    Image.new("RGB", (8, 8)).save(tmp_path / "lr.png")
    assert sample.main(["--ckpt", str(run), "-i", str(tmp_path / "lr.png"), "-o", str(tmp_path / "out"),
                        "--device", "cpu"]) == 2
    assert "config.json: sampler_defaults" in capsys.readouterr().err
    # a known setting with a value its flag would refuse: the same one line, before any image
    for bad, named in (({"start": 2}, "start 2"), ({"lapped": "maybe"}, "lapped 'maybe'")):
        (run / "config.json").write_text(json.dumps({**conf, "sampler_defaults": bad}))
        assert sample.main(["--ckpt", str(run), "-i", str(tmp_path / "lr.png"), "-o",
                            str(tmp_path / "out"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "sampler_defaults" in err and named in err, err
        assert not (tmp_path / "out" / "lr.png").exists()
    for name, tile in SHIPPED_TILE.items():
        shipped = json.loads((ROOT / "checkpoints" / name / "config.json").read_text()).get("sampler_defaults", {})
        assert shipped.get("tile") == tile, name   # the measured choice: docs/performance_cpu.md


# None: no sampler_defaults tile, the 64-pixel training crop
SHIPPED_TILE = {"vosr-small-photo": None, "vosr-small-teacher": None, "vosr-small-realworld": None}


def replace_tile(cfg, tile):
    from dataclasses import replace
    return replace(cfg, tile=tile)


def token_means(x, t, c_sem=None, r=None, f=4):
    """A 'DiT' whose tokens do not talk: each f×f pixel token's velocity is the mean of its own c_str pixels."""
    img = torch.nn.functional.pixel_shuffle(x, f)[:, :3]
    blocky = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(img, f), scale_factor=f)
    return torch.nn.functional.pixel_unshuffle(blocky, f)


def test_lapped_velocity_is_exact_for_a_gridless_net_and_removes_a_token_grid():
    from tools.blockiness import edge_ratio
    # the weights by hand for a 4-cell token: min(q + ½, 4 − q − ½) / 2 = ¼, ¾, ¾, ¼, and shifted by 2 they fill to 1
    assert torch.allclose(sample.lap_weights(8, 4, 0), torch.tensor([.25, .75, .75, .25] * 2))
    assert torch.allclose(sample.lap_weights(8, 4, 0) + sample.lap_weights(8, 4, 2), torch.ones(8))
    # a net that acts on each pixel alone (a 1×1 conv in pixel space) does not see the grid: lapping changes nothing
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 3, 1)
    pointwise = lambda x, t, c_sem=None, r=None: torch.nn.functional.pixel_unshuffle(  # noqa: E731
        conv(torch.nn.functional.pixel_shuffle(x, 4)), 4)
    x, t = torch.randn(2, 2 * 48, 5, 7), torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(sample.LappedDiT(pointwise, 4, 1)(x, t), pointwise(x, t), atol=1e-5)
    # a net whose tokens do not talk leaves a 4-pixel mosaic on a smooth image; lapped, the grid is gone
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 2, 64), indexing="ij")
    smooth = torch.stack([torch.sin(yy + xx), torch.cos(yy - xx), torch.sin(2 * xx)])[None] * 0.5 + 0.5
    x = torch.cat([torch.nn.functional.pixel_unshuffle(smooth, 4)] * 2, 1)
    luma = lambda v: 255 * torch.nn.functional.pixel_shuffle(v, 4)[0].mean(0)  # noqa: E731
    assert edge_ratio(luma(token_means(x, t)), 4) > 10
    assert edge_ratio(luma(sample.LappedDiT(token_means, 4, 1)(x, t[:1])), 4) < 1.3
    with pytest.raises(ValueError, match="even token side"):
        sample.LappedDiT(token_means, 1, 1)


def test_pipeline_lapped_setting(pixel_model):
    pipe = sample.VOSRPipeline(pixel_model, vae.PixelCodec(), None, student=False)
    lr = torch.rand(1, 3, 8, 12)
    off, on = (pipe(lr, 4.0, steps=2, generator=torch.Generator().manual_seed(0), tile=0, lapped=lapped)
               for lapped in ("off", "on"))
    assert on.shape == off.shape and 0 < (on - off).abs().mean() < 0.2
    with pytest.raises(ValueError, match="lapped"):
        pipe(lr, 4.0, steps=1, lapped="yes")
