"""Tests for degrade.py (kernels vs closed forms, pipeline properties), vosr/jpeg.py (torch JPEG vs Pillow) and
vosr/files.py (image I/O)."""
import dataclasses
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, special

import degrade as D  # noqa: E402
from vosr import files  # noqa: E402
from vosr.jpeg import jpeg, jpeg_tables  # noqa: E402

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- kernels

def _np_quadratic(k, sx, sy, theta):
    """Reference q = v Σ⁻¹ vᵀ on a k×k grid (x = column offset, y = row offset), via np.linalg.inv."""
    ax = np.arange(k) - (k - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cov = rot @ np.diag([sx**2, sy**2]) @ rot.T
    v = np.stack([xx, yy], -1)
    return np.einsum("...i,ij,...j->...", v, np.linalg.inv(cov), v)


def _pad21(k):
    p = (21 - k.shape[0]) // 2
    return np.pad(k / k.sum(), p)


def test_isotropic_gaussian_closed_form():
    for sigma, size in [(0.5, 7), (1.3, 13), (3.0, 21)]:
        ax = np.arange(size) - size // 2
        r2 = ax[None, :] ** 2 + ax[:, None] ** 2
        ref = _pad21(np.exp(-r2 / (2 * sigma**2)))
        got = D.gaussian_kernel(sigma, sigma, 0.0, size)[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-12)


def test_anisotropic_gaussian_matches_covariance_reference():
    for sx, sy, th, size in [(0.4, 2.5, 0.7, 21), (2.0, 0.8, -2.5, 15), (3.0, 1.0, math.pi / 2, 9)]:
        ref = _pad21(np.exp(-0.5 * _np_quadratic(size, sx, sy, th)))
        np.testing.assert_allclose(D.gaussian_kernel(sx, sy, th, size)[0].numpy(), ref, atol=1e-12)
    # rotating by 90° swaps the axes
    a = D.gaussian_kernel(0.7, 2.2, math.pi / 2, 21)
    b = D.gaussian_kernel(2.2, 0.7, 0.0, 21)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_generalized_gaussian_and_plateau():
    # BasicSR's generalized Gaussian is exp(-0.5 q^β): β = 1 is exactly the Gaussian
    torch.testing.assert_close(D.generalized_gaussian_kernel(1.1, 2.0, 0.4, 1.0, 17),
                               D.gaussian_kernel(1.1, 2.0, 0.4, 17), atol=1e-12, rtol=0)
    for beta in (0.5, 2.0, 4.0):
        q = _np_quadratic(19, 1.5, 0.9, -1.0)
        np.testing.assert_allclose(D.generalized_gaussian_kernel(1.5, 0.9, -1.0, beta, 19)[0].numpy(),
                                   _pad21(np.exp(-0.5 * q**beta)), atol=1e-12)
    for beta in (1.0, 1.7):
        q = _np_quadratic(11, 2.0, 1.2, 2.0)
        np.testing.assert_allclose(D.plateau_kernel(2.0, 1.2, 2.0, beta, 11)[0].numpy(),
                                   _pad21(1 / (1 + q**beta)), atol=1e-12)


def test_sinc_kernel_matches_scipy_jinc():
    for wc, size in [(math.pi / 3, 7), (math.pi / 2, 13), (math.pi, 21), (0.7, 21)]:
        ax = np.arange(size) - (size - 1) / 2
        r = np.sqrt(ax[None, :] ** 2 + ax[:, None] ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = wc * special.j1(wc * r) / (2 * np.pi * r)
        ref[size // 2, size // 2] = wc**2 / (4 * np.pi)
        np.testing.assert_allclose(D.sinc_kernel(wc, size)[0].numpy(), _pad21(ref), atol=1e-7)


def test_every_kernel_family_sums_to_one_and_is_padded():
    g = torch.Generator().manual_seed(0)
    n = 64
    sizes = torch.tensor([7, 9, 11, 13, 15, 17, 19, 21]).repeat(8)
    sx, sy = 0.2 + 2.8 * torch.rand(n, generator=g), 0.2 + 2.8 * torch.rand(n, generator=g)
    th, beta = (torch.rand(n, generator=g) - 0.5) * 2 * math.pi, 0.5 + 3.5 * torch.rand(n, generator=g)
    families = [D.gaussian_kernel(sx, sy, th, sizes), D.generalized_gaussian_kernel(sx, sy, th, beta, sizes),
                D.plateau_kernel(sx, sy, th, beta.clamp(1, 2), sizes),
                D.sinc_kernel(math.pi / 5 + torch.rand(n, generator=g) * 4 * math.pi / 5, sizes),
                D.delta_kernel(n)]
    cfg = D.DegradeConfig()
    families.append(D.random_kernels(n, cfg.kernel_range, cfg.kernel_list, cfg.kernel_prob, 0.3,
                                     cfg.blur_sigma, cfg.betag_range, cfg.betap_range, g))
    for k in families:
        assert k.shape == (n, 21, 21)
        torch.testing.assert_close(k.sum((1, 2)), torch.ones(n, dtype=k.dtype))
        torch.testing.assert_close(k, k.flip(1, 2))                 # point-symmetric
    for k in families[:4]:                                          # zero outside the size×size window
        for i in range(n):
            p = (21 - int(sizes[i])) // 2
            if p:
                assert k[i, :p].abs().max() == 0 and k[i, :, -p:].abs().max() == 0


def test_filter2d_per_sample_matches_scipy():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 3, 30, 25, generator=g, dtype=torch.float64)
    ker = torch.rand(3, 21, 21, generator=g, dtype=torch.float64)          # not symmetric on purpose
    got = D.filter2d(img, ker)
    for b in range(3):
        for c in range(3):
            ref = ndimage.correlate(img[b, c].numpy(), ker[b].numpy(), mode="mirror")
            np.testing.assert_allclose(got[b, c].numpy(), ref, atol=1e-10)
    tiny = D.filter2d(torch.rand(2, 3, 5, 6), ker[:2].float())              # smaller than the pad
    assert tiny.shape == (2, 3, 5, 6) and torch.isfinite(tiny).all()


# ----------------------------------------------------------------------------- JPEG

def _synthetic_photo(seed, n=128):
    """Smooth gradients + blurred discs + mild noise, 8-bit values."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * torch.sin(3 * xx + 2 * yy)])
    for _ in range(6):
        c = torch.rand(2, generator=g) * n
        r = torch.rand(1, generator=g) * n / 5 + n / 12
        disc = (((xx * n - c[0]) ** 2 + (yy * n - c[1]) ** 2) < r**2).float()
        img = img * (1 - disc) + torch.rand(3, 1, 1, generator=g) * disc
    img = D.filter2d(img[None], D.gaussian_kernel(1.5, 1.5, 0.0, 9).float())[0]
    img = img + 0.01 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round() / 255


def _psnr(a, b):
    return 10 * math.log10(1.0 / ((a - b) ** 2).mean().item())


def _pillow_jpeg(img, quality):
    arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling=2)      # 2 = 4:2:0
    return torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_jpeg_matches_pillow(quality):
    imgs = [_synthetic_photo(0), _synthetic_photo(1, 64), _synthetic_photo(2)[:, :67, :93]]
    for img in imgs:
        ours = (jpeg(img[None], torch.tensor([quality]))[0] * 255).round() / 255
        pil = _pillow_jpeg(img, quality)
        p_ours, p_orig = _psnr(ours, pil), _psnr(img, pil)
        print(f"q={quality} {tuple(img.shape[1:])}: PSNR(ours, Pillow) = {p_ours:.2f} dB, "
              f"PSNR(original, Pillow) = {p_orig:.2f} dB")
        assert p_ours >= 33.0
        assert p_ours > p_orig + 3.0          # we reproduce Pillow's artefacts, not just the input


def test_jpeg_per_sample_quality_and_tables():
    luma, chroma = jpeg_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 0, 0] == 17           # q = 50 → base tables
    assert (luma[1] == 1).all() and (chroma[1] == 1).all()           # q = 100 → all ones
    assert luma[2, 0, 0] == math.floor((16 * 500 + 50) / 100) and luma[2].max() == 255
    img = _synthetic_photo(3, 64)
    both = jpeg(torch.stack([img, img]), torch.tensor([30, 95]))
    torch.testing.assert_close(both[0], jpeg(img[None], torch.tensor([30]))[0])
    torch.testing.assert_close(both[1], jpeg(img[None], torch.tensor([95]))[0])
    assert _psnr(both[1], img) > _psnr(both[0], img) + 3


# ----------------------------------------------------------------------------- noise and pipeline

def test_noise_statistics_and_gray():
    flat = torch.full((1, 3, 96, 96), 0.5)
    out = D.add_noise(flat, True, 10.0, 1.0, False, seed=0)
    assert abs((out - flat).std().item() - 10 / 255) < 0.1 * 10 / 255
    assert not torch.equal(out[0, 0], out[0, 1])                 # colour noise: own plane per channel
    gray = D.add_noise(flat, True, 10.0, 1.0, True, seed=0)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])
    assert abs((gray - flat).std().item() - 10 / 255) < 0.1 * 10 / 255
    g = torch.rand(1, 1, 40, 40).expand(1, 3, 40, 40).contiguous()
    out = D.add_noise(g, False, 0.0, 3.0, True, seed=2)          # gray Poisson: equal shift on RGB
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2]) and not torch.equal(out, g)
    out = D.add_noise(torch.rand(1, 3, 40, 40), False, 0.0, 2.0, False, seed=1)
    assert out.min() >= 0 and out.max() <= 1


def _hr(b=3, h=64, w=64, seed=0):
    return torch.stack([_synthetic_photo(seed + i, 128)[:, :h, :w] for i in range(b)])


def test_shapes_grid_and_resize_back():
    hr = torch.rand(2, 3, 67, 93, generator=torch.Generator().manual_seed(0))
    for fn in (lambda x, **k: D.degrade(x, generator=torch.Generator().manual_seed(3), **k), D.degrade_bicubic):
        lr = fn(hr)
        assert lr.shape == (2, 3, 16, 23)           # floor(H/4) × floor(W/4)
        back = fn(hr, resize_back=True)
        assert back.shape == (2, 3, 67, 93)
        for x in (lr, back):
            assert x.min() >= 0 and x.max() <= 1
            assert (x * 255 - (x * 255).round()).abs().max() < 1e-4   # on the 8-bit grid
    assert D.degrade(hr, scale=2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 33, 46)


def test_determinism_and_independence():
    hr = _hr(2)
    hr = torch.cat([hr, hr[:1], hr[:1]])                       # samples 2 and 3 equal sample 0
    a = D.degrade(hr, generator=torch.Generator().manual_seed(7))
    b = D.degrade(hr, generator=torch.Generator().manual_seed(7))
    c = D.degrade(hr, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[2]) and not torch.equal(a[2], a[3])   # same input, own draws


def _pick(draws, i):
    """The draws of samples i (a slice) of a DegradationDraws, with its OrderDraws sliced too."""
    return type(draws)(**{f.name: (_pick(v, i) if isinstance(v, D.OrderDraws) else v[i])
                          for f in dataclasses.fields(draws) for v in [getattr(draws, f.name)]})


def test_batch_equals_per_sample_loop():
    hr = _hr(4, 64, 80, seed=5)
    p = D.sample_params(4, generator=torch.Generator().manual_seed(11))
    batched = D.apply_degradation(hr, p)
    single = torch.cat([D.apply_degradation(hr[i:i + 1], _pick(p, slice(i, i + 1)))
                        for i in range(4)])
    assert torch.equal(batched, single)


def test_param_frequencies_follow_config():
    cfg = D.DegradeConfig()
    n = 2000
    p = D.sample_params(n, cfg, torch.Generator().manual_seed(0))
    tol = lambda prob: 4 * math.sqrt(prob * (1 - prob) / n)          # noqa: E731
    for name, draws, prob in [("blur2", p.blur2, cfg.second_blur_prob), ("jpeg_first", p.jpeg_first, 0.5),
                              ("gaussian1", p.first.gaussian, 0.5), ("gray2", p.second.gray, 0.4)]:
        assert abs(draws.double().mean().item() - prob) < tol(prob), name
    not_delta = (p.sinc[:, 10, 10] < 1).double().mean().item()
    assert abs(not_delta - cfg.final_sinc_prob) < tol(cfg.final_sinc_prob)
    keep = (p.first.scale == 1).double().mean().item()
    assert abs(keep - cfg.resize_prob[2]) < tol(cfg.resize_prob[2])
    assert p.first.scale.min() >= 0.15 and p.first.scale.max() <= 1.5
    q = p.first.quality
    assert q.min() >= 30 and q.max() <= 95 and torch.equal(q, q.round())
    assert len(set(p.first.seed.tolist())) == n


# ----------------------------------------------------------------------------- image files

def _write_png16_rgb(path, arr):
    """Hand-written 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_read_image_converts_odd_formats(tmp_path):
    close = lambda a, b, tol=1.5 / 255: torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32),  # noqa
                                                                   atol=tol, rtol=0)
    Image.new("L", (5, 4), 100).save(tmp_path / "l.png")
    x = files.read_image(tmp_path / "l.png")
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    close(x, torch.full((3, 4, 5), 100 / 255))

    la = Image.new("LA", (4, 4), (0, 0))                         # fully transparent black → white
    la.putpixel((0, 0), (50, 255))
    la.save(tmp_path / "la.png")
    x = files.read_image(tmp_path / "la.png")
    close(x[:, 1, 1], [1, 1, 1]), close(x[:, 0, 0], [50 / 255] * 3)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    x = files.read_image(tmp_path / "rgba.png")
    close(x[:, 3, 3], [1, 1, 1]), close(x[:, 0, 1], [0, 0, 1]), close(x[:, 0, 2], [127 / 255] * 3)

    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png")
    x = files.read_image(tmp_path / "p.png")
    close(x[:, 1, 1], [10 / 255, 200 / 255, 30 / 255]), close(x[:, 0, 0], [0, 0, 0])
    p.save(tmp_path / "pt.png", transparency=0)                  # palette index 0 transparent → white
    close(files.read_image(tmp_path / "pt.png")[:, 0, 0], [1, 1, 1])

    a16 = np.array([[0, 32768, 65535], [1000, 20000, 65535]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = files.read_image(tmp_path / "g16.png")
    close(x[0], a16 / 65535.0, tol=1e-6)
    assert x.max() == 1.0

    rgb16 = (np.arange(3 * 4 * 3).reshape(3, 4, 3) * 7 * 257).astype(np.uint16)
    rgb16[0, 0] = 65535
    _write_png16_rgb(tmp_path / "rgb16.png", rgb16)
    close(files.read_image(tmp_path / "rgb16.png"), torch.from_numpy(rgb16 / 65535.0).permute(2, 0, 1), tol=1e-6)

    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    close(files.read_image(tmp_path / "cmyk.jpg")[:, 8, 8], [1, 0, 0], tol=0.05)

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)                                 # left half red, right half blue
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                             # orientation 6: rotate 90° clockwise
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    x = files.read_image(tmp_path / "rot.jpg")
    assert x.shape == (3, 40, 20)
    close(x[:, 5, 10], [1, 0, 0], tol=0.1), close(x[:, 35, 10], [0, 0, 1], tol=0.1)   # left edge → top

    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "w.webp", lossless=True)
    close(files.read_image(tmp_path / "w.webp"), torch.from_numpy(rgb / 255.0).permute(2, 0, 1), tol=1e-6)


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "x.png").write_text("this is not an image\n")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("empty.png", "x.png", "trunc.png", "missing.png"):
        with pytest.raises(files.ImageError) as e:
            files.read_image(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_write_image_round_trip_and_errors(tmp_path):
    vals = torch.randint(0, 256, (3, 9, 11), generator=torch.Generator().manual_seed(0)).float() / 255
    files.write_image(tmp_path / "a" / "b" / "x.png", vals)              # creates parent folders
    assert torch.equal(files.read_image(tmp_path / "a" / "b" / "x.png"), vals)
    files.write_image(tmp_path / "y.png", vals[None])                     # (1,3,H,W) accepted
    assert torch.equal(files.read_image(tmp_path / "y.png"), vals)
    files.write_image(tmp_path / "z.jpg", vals)
    assert Image.open(tmp_path / "z.jpg").format == "JPEG"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile"):
        files.write_image(tmp_path / "afile" / "out.png", vals)


def test_find_images(tmp_path):
    for rel in ("b.png", "a.JPG", "sub/c.webp", "notes.txt", ".hidden.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in files.find_images(tmp_path)] == ["a.JPG", "b.png", "sub/c.webp"]
    assert len(files.find_images(tmp_path, recursive=False)) == 2
    assert files.find_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        files.find_images(tmp_path / "nope")


# ----------------------------------------------------------------------------- CLI

def test_cli_pairs_bad_files_and_exit_codes(tmp_path, capsys):
    src = tmp_path / "hr"
    src.mkdir()
    Image.fromarray((_synthetic_photo(0, 128)[:, :72, :80].permute(1, 2, 0) * 255).byte().numpy()).save(src / "a.png")
    Image.new("L", (50, 42), 120).save(src / "small.jpg")
    (src / "bad.png").write_text("not an image")
    out = tmp_path / "out"
    assert D.main(["-i", str(src), "-o", str(out), "--crop", "64", "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert str(src / "bad.png") in err and "small.jpg" in err
    assert Image.open(out / "hr" / "a.png").size == (64, 64) and Image.open(out / "lr" / "a.png").size == (16, 16)
    assert Image.open(out / "hr" / "small.png").size == (40, 40)      # largest multiple of 4 that fits
    assert Image.open(out / "lr" / "small.png").size == (10, 10)
    assert not (out / "lr" / "bad.png").exists()
    assert Image.open(out / "contact_sheet.png").size[0] >= 64 * 2

    (tmp_path / "empty").mkdir()
    assert D.main(["-i", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert D.main(["-i", str(tmp_path / "missing"), "-o", str(out)]) == 2
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"")
    assert D.main(["-i", str(only_bad), "-o", str(tmp_path / "o2")]) == 1
    (tmp_path / "file_out").write_text("x")
    assert D.main(["-i", str(src), "-o", str(tmp_path / "file_out")]) == 2
    assert "file_out" in capsys.readouterr().err


def test_mix_gives_each_sample_one_kind_of_degradation():
    """--degradation mix: a sample drawn as clean is exactly degrade_bicubic of it; weights pick the kind;
    LIGHT is milder than the full degradation (closer to the bicubic LR); a seed reproduces the batch."""
    hr = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    clean = D.degrade_bicubic(hr)

    def mix(weights, seed=1):
        return D.degrade_mix(hr, generator=torch.Generator().manual_seed(seed), weights=weights)
    torch.testing.assert_close(mix((1, 0, 0)), clean, rtol=0, atol=0)
    light, full = mix((0, 1, 0)), mix((0, 0, 1))
    assert (light - clean).abs().mean() < (full - clean).abs().mean()
    assert not torch.equal(light, clean)
    torch.testing.assert_close(mix((1, 1, 1)), mix((1, 1, 1)), rtol=0, atol=0)
    both = mix((1, 0, 1), seed=3)
    is_clean = [torch.equal(both[i], clean[i]) for i in range(len(hr))]
    assert any(is_clean) and not all(is_clean)
