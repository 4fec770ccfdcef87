"""Large images: any output scale; tiled codec, DiT and semantics agree with the untiled path
where both fit; peak memory does not grow with the image beyond the image's own buffers."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sample
import vae
from tests.test_sample import tiny_dit

ROOT = Path(__file__).resolve().parents[1]


def _texture(h, w, seed=0):
    """A stationary smooth random texture in [0,1] (every tile has the same statistics)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(1, 3, h + 4, w + 4, generator=g), 5, stride=1)
    return (x - x.min()) / (x.max() - x.min())


class BlockCodec(vae.Codec):
    """A codec that, like the pixel codec, maps each 8×8 block on its own, but is not a PixelCodec,
    so the tiled encode/decode take the overlap-and-blend path."""

    def __init__(self):
        super().__init__()
        self.factor, self.channels = 8, 4
        g = torch.Generator().manual_seed(0)
        self.enc, self.dec = torch.randn(4, 192, generator=g) / 14, torch.randn(192, 4, generator=g) / 2

    def encode(self, img, generator=None, mode=False):
        return torch.einsum("oc,bchw->bohw", self.enc, F.pixel_unshuffle(img, 8))

    def decode(self, z):
        return F.pixel_shuffle(torch.einsum("oc,bchw->bohw", self.dec, z), 8)


class PointwiseDiT(nn.Module):
    """Stands in for the DiT: a velocity that depends on each position only (so tiling must not change
    it) and on the mean semantic token; records the semantic tokens each call receives."""
    patch_size, train_grid = 2, 4

    def __init__(self, channels):
        super().__init__()
        self.C, self.seen = channels, []

    def forward(self, x, t, c_sem=None, r=None):
        self.seen.append(c_sem)
        c_str, z = x[:, :self.C], x[:, self.C:]
        sem = 0 if c_sem is None else c_sem.mean((1, 2)).view(-1, 1, 1, 1)
        return z - torch.tanh(c_str) * (1 - t.view(-1, 1, 1, 1)) + 0.1 * sem


@pytest.fixture(scope="module")
def pixel_model():
    return tiny_dit(vae.PixelCodec().channels)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL (factor 4), saved and loaded back through vae.load_codec."""
    import diffusers
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    m.save_pretrained(str(path))
    return vae.load_codec(str(path))


# ----------------------------------------------------------------------------- output size

@pytest.mark.parametrize("h,w", [(7, 5), (13, 10)])
def test_output_size_for_any_scale(pixel_model, h, w):
    pipe = sample.VOSRPipeline(pixel_model, vae.PixelCodec())
    lr = torch.rand(1, 3, h, w)
    for scale in (1.0, 1.5, 2.7, 4.0):
        for tile in (32, 4096):  # tiled and untiled
            sr = pipe(lr, scale, steps=1, generator=torch.Generator().manual_seed(0), tile=tile, tile_overlap=16)
            assert sr.shape == (1, 3, round(h * scale), round(w * scale)), (scale, tile)
            assert sr.min() >= 0 and sr.max() <= 1


# ----------------------------------------------------------------------------- codec tiling

def test_pixel_codec_tiling_is_exact():
    img, size = torch.rand(2, 3, 50, 70), (64, 80)
    codec = vae.PixelCodec()
    padded = F.pad(img, (0, 10, 0, 14), mode="reflect")  # independent: pad the whole image, then encode
    z = sample.tiled_encode(codec, img, size, tile=24, overlap=8)
    assert torch.equal(z, codec.encode(padded * 2 - 1))
    assert torch.equal(sample.tiled_decode(codec, z, (50, 70), tile=24, overlap=8), codec.decode(z)[..., :50, :70])


def test_blended_codec_tiling_equals_untiled_for_a_blockwise_codec():
    # Overlapping tiles cross-faded with weights that sum to one reproduce a blockwise codec exactly.
    codec, img = BlockCodec(), torch.rand(1, 3, 75, 90)
    padded = F.pad(img, (0, 6, 0, 5), mode="reflect")
    z = sample.tiled_encode(codec, img, (80, 96), tile=32, overlap=16)
    assert torch.allclose(z, codec.encode(padded * 2 - 1), atol=1e-5)
    x = sample.tiled_decode(codec, z, (75, 90), tile=32, overlap=16)
    assert torch.allclose(x, codec.decode(z)[..., :75, :90], atol=1e-5)


def test_diffusers_vae_tiling_close_to_untiled(tiny_vae):
    # A conv VAE is not exactly tileable: GroupNorm statistics and the mid-block attention are per tile,
    # and a random VAE's receptive field is wide. On a stationary texture (every tile has the same
    # statistics) the cross-fade over the overlap roughly halves the difference of butt-joined tiles.
    # Relative mean |tiled − untiled| measured 2026-11-23 with this seed: encode 0.058 (overlap 0:
    # 0.122), decode 0.216 (0.403); the tolerances below are those ×1.5.
    img = _texture(128, 192)
    full = tiny_vae.encode(img * 2 - 1, mode=True)                        # (1, 4, 32, 48)
    dec_full = tiny_vae.decode(full)
    err = {}
    for overlap in (48, 0):
        z = sample.tiled_encode(tiny_vae, img, (128, 192), tile=96, overlap=overlap)
        x = sample.tiled_decode(tiny_vae, full, (128, 192), tile=96, overlap=overlap)
        err[overlap] = ((z - full).abs().mean() / full.abs().mean(), (x - dec_full).abs().mean() / dec_full.abs().mean())
    print(f"tiny VAE, relative mean |tiled - untiled| (encode, decode): overlap 48 {err[48]}, overlap 0 {err[0]}")
    assert err[48][0] < 0.09 and err[48][1] < 0.33
    assert err[48][0] < err[0][0] and err[48][1] < err[0][1]


# ----------------------------------------------------------------------------- semantic token map

@pytest.fixture(scope="module")
def semantic():
    return vae.load_semantic("random", image_size=28)  # ViT-S at 28 px: a 2×2 token grid, fast


def test_token_map_of_one_tile_is_the_untiled_semantics(semantic):
    img = torch.rand(1, 3, 40, 56)
    tmap = sample.semantic_token_map(semantic, img, tile=64, overlap=32)
    assert torch.equal(sample.crop_tokens(tmap, 0, 0, (40, 56), semantic.grid), semantic(img))


def test_token_map_blends_windows(semantic):
    # 32×96 image, tile 64, overlap 32: windows at x = 0 and 32, 2 tokens per 64 px -> a 1×3 map.
    # Column 0 is seen only by window 0, column 2 only by window 1, column 1 is their even cross-fade.
    img = torch.rand(1, 3, 32, 96)
    tmap = sample.semantic_token_map(semantic, img, tile=64, overlap=32)
    a = semantic(img[..., :, 0:64]).unflatten(1, (2, 2))   # (1, 2, 2, dim): rows = image rows (32 px)
    b = semantic(img[..., :, 32:96]).unflatten(1, (2, 2))
    assert tmap.shape == (1, 2, 3, semantic.dim)
    assert torch.allclose(tmap[:, :, 0], a[:, :, 0], atol=1e-5)
    assert torch.allclose(tmap[:, :, 2], b[:, :, 1], atol=1e-5)
    assert torch.allclose(tmap[:, :, 1], (a[:, :, 1] + b[:, :, 0]) / 2, atol=1e-5)
    # a tile at the right edge reads the last two columns
    assert torch.equal(sample.crop_tokens(tmap, 0, 32, (32, 96), 2), tmap[:, :, 1:].flatten(1, 2))


# ----------------------------------------------------------------------------- the pipeline

def test_tiled_pipeline_equals_untiled_for_a_pointwise_model():
    # One global noise draw, c_str crops aligned with the latent tiles and weights that sum to one:
    # with a per-position model the tiled sampler reproduces the untiled one.
    model = PointwiseDiT(192)
    pipe = sample.VOSRPipeline(model, vae.PixelCodec(), None)
    lr = torch.rand(1, 3, 21, 26)
    run = lambda tile: pipe(lr, 3.0, steps=3, generator=torch.Generator().manual_seed(0), tile=tile, tile_overlap=16)
    untiled, tiled = run(4096), run(32)
    assert torch.allclose(tiled, untiled, atol=1e-5)


def release_square_tiles(h, w, tile, overlap, patch):
    """The release's DiT tiles (y, x, side, side) of an h×w latent, written out from its
    description: the whole latent when both sides fit the tile, else squares of side min(tile,
    short side) on whole patches, overlap at least side/8, a window every side − overlap, the last
    one flush with the end."""
    if h <= tile and w <= tile:
        return {(0, 0, h, w)}
    side = min(tile, h, w) // patch * patch
    overlap = max(overlap, side // 8)

    def starts(n):
        found = list(range(0, n - side + 1, side - overlap))
        return found + [n - side] if found[-1] + side < n else found
    return {(y, x, side, side) for y in starts(h) for x in starts(w)}


def recorded_windows(pipe):
    """The latent windows (y, x, h, w) the DiT of `pipe` is called on, recorded as it runs."""
    seen, on_tile = [], pipe.tile_velocity

    def recording(*a, **kw):
        velocity = on_tile(*a, **kw)

        def one(zw, wins, t, r):
            seen.extend(wins)
            return velocity(zw, wins, t, r)
        return one
    pipe.tile_velocity = recording
    return seen


@pytest.mark.parametrize("lr_size,tile,overlap", [
    ((24, 100), 128, None), ((40, 70), 256, None), ((50, 30), 256, None), ((24, 40), 64, None),
    ((40, 40), 64, None), ((24, 100), 256, 0)])
def test_square_tiles_where_the_release_puts_them(lr_size, tile, overlap):
    """--tile-shape square: the DiT's windows are the release's, for wide, tall, fitting and square
    latents (pixel codec: 8 pixels per latent pixel, patch 2; overlap tile/8 by default)."""
    pipe = sample.VOSRPipeline(PointwiseDiT(192), vae.PixelCodec(), None)
    seen = recorded_windows(pipe)
    lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(0))
    sr = pipe(lr, 4.0, steps=1, generator=torch.Generator().manual_seed(0), tile=tile,
              tile_overlap=overlap, tile_blend="gaussian", tile_shape="square")
    h, w = (-(-4 * n // 16) * 2 for n in lr_size)              # latent: output padded to 16 px, / 8
    pixels = tile // 8 if overlap is None else overlap
    want = release_square_tiles(h, w, tile // 8, pixels // 8, 2)
    assert sr.shape[-2:] == (4 * lr_size[0], 4 * lr_size[1])
    assert len(seen) == len(set(seen)) and set(seen) == want
    if lr_size == (24, 100) and overlap is None:               # ours (fit) cuts 12×16 windows there
        seen.clear()
        pipe(lr, 4.0, steps=1, generator=torch.Generator().manual_seed(0), tile=tile,
             tile_blend="gaussian")
        assert {win[2:] for win in seen} == {(12, 16)}


def test_tiles_receive_their_semantics(semantic):
    model = PointwiseDiT(192)
    pipe = sample.VOSRPipeline(model, vae.PixelCodec(), semantic)
    pipe.tile_batch = 1                     # one window per DiT call: model.seen holds each window's c_sem
    lr = torch.rand(1, 3, 16, 24)           # ×2 -> 32×48 output; tile 32, overlap 16 -> tiles at x = 0, 16
    lr_up = F.interpolate(lr, size=(32, 48), mode="bicubic", align_corners=False).clamp(0, 1)
    kw = dict(steps=1, generator=torch.Generator().manual_seed(0), tile=32, tile_overlap=16, guidance=1.0)

    model.seen.clear()
    pipe(lr, 2.0, semantic_tiles="per-tile", **kw)
    assert [s.shape for s in model.seen] == [(1, 4, 384)] * 2
    for s, x in zip(model.seen, (0, 16)):   # DINOv2 on the tile's own pixels
        assert torch.allclose(s, semantic(lr_up[..., :, x:x + 32]), atol=1e-5)

    model.seen.clear()
    pipe(lr, 2.0, semantic_tiles="global", **kw)
    tmap = sample.semantic_token_map(semantic, lr_up, 32, 16)   # (1, 2, 3, dim)
    for s, cols in zip(model.seen, (slice(0, 2), slice(1, 3))):
        assert torch.allclose(s, tmap[:, :, cols].flatten(1, 2), atol=1e-5)

    model.seen.clear()
    pipe(lr, 2.0, semantic_tiles="whole", **kw)
    for s in model.seen:
        assert torch.allclose(s, semantic(lr_up), atol=1e-5)


@pytest.mark.parametrize("student,reuse", [(False, False), (True, True)])
def test_batched_windows_equal_one_window_per_call(semantic, student, reuse):
    """Windows stacked on the batch axis (teacher: both guidance branches; two images; lapped tokens;
    a last call with fewer windows) give what the DiT gives one window at a time."""
    torch.manual_seed(0)
    pipe = sample.VOSRPipeline(tiny_dit(192, enc_dim=semantic.dim), vae.PixelCodec(), semantic,
                               student=student, fast=sample.FastPaths(reuse_semantics=reuse))
    lr = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    out = {}
    for batch in (1, 4):                    # 80×112 output, tile 32, overlap 8: 4×5 windows
        pipe.tile_batch = batch
        out[batch] = pipe(lr, 4.0, steps=2, generator=torch.Generator().manual_seed(0), tile=32,
                          tile_overlap=8, guidance=0.5, lapped="on")
    torch.testing.assert_close(out[4], out[1], atol=1e-5, rtol=0)


def test_semantic_modes_agree_when_one_tile_covers(semantic):
    m = tiny_dit(192, enc_dim=semantic.dim)
    pipe = sample.VOSRPipeline(m, vae.PixelCodec(), semantic)
    lr = torch.rand(1, 3, 9, 12)
    out = {mode: pipe(lr, 4.0, steps=2, generator=torch.Generator().manual_seed(0), tile=64, semantic_tiles=mode)
           for mode in ("global", "per-tile", "whole")}
    assert torch.equal(out["global"], out["per-tile"]) and torch.equal(out["global"], out["whole"])


# ----------------------------------------------------------------------------- peak memory

MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    import dit, sample, vae
    torch.set_num_threads(1)

    class WideCodec(vae.Codec):
        # Stand-in for a conv VAE: cheap, but 64 float channels at full resolution inside encode and
        # decode (a conv VAE's large activations), so its memory grows with whatever it is given.
        def __init__(self):
            super().__init__()
            self.factor, self.channels = 8, 4
            g = torch.Generator().manual_seed(0)
            self.up, self.down = torch.randn(64, 3, generator=g), torch.randn(4, 64 * 64, generator=g) / 64

        def encode(self, img, generator=None, mode=False):
            h = torch.einsum("oc,bchw->bohw", self.up, img).relu()          # (B, 64, H, W)
            return torch.einsum("oc,bchw->bohw", self.down, F.pixel_unshuffle(h, 8))

        def decode(self, z):
            h = F.interpolate(z.repeat(1, 16, 1, 1), scale_factor=8.0)      # (B, 64, H, W)
            return torch.einsum("oc,bohw->bchw", self.up, h).tanh()

    def status():
        d = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                d[k] = int(v.split()[0]) * 1024
        return d

    torch.manual_seed(0)
    model = dit.build("tiny", latent_channels=4, enc_dim=8, train_grid=4).eval()
    pipe = sample.VOSRPipeline(model, WideCodec(), None)
    run = lambda side, tile: pipe(torch.rand(1, 3, side // 4, side // 4), 4.0, steps=1,
                                  generator=torch.Generator().manual_seed(0), tile=tile, tile_overlap=32)
    run(128, 128)                                         # warm-up: one-time allocations
    extra = {}
    for tile in (128, 4096):                              # tiled, then untiled (the negative control)
        for side in (256, 512):
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = status()["VmRSS"]
            sr = run(side, tile)
            extra[f"{tile}/{side}"] = status()["VmHWM"] - before
            del sr
    print(json.dumps(extra))
""")


def test_peak_memory_depends_on_the_tile_not_the_image(tmp_path):
    # Output area ×4 (256² -> 512²) with 128-px tiles: the extra peak RSS of a call (peak minus RSS before
    # it) grows < ×1.5. What does grow is the image's own buffers: the upscaled input and the output
    # (3 floats per pixel each) and the latents. Negative control: untiled (tile ≥ image), the codec's
    # full-resolution activations make the extra peak grow about ×4.
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    # fixed mmap threshold: large buffers go back to the OS when freed, so RSS follows live memory
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}  # the probe script lies in tmp_path: import the stage files
    r = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    extra = json.loads(r.stdout.strip().splitlines()[-1])
    print("extra peak RSS (MB):", {k: round(v / 2**20, 1) for k, v in extra.items()})
    assert extra["128/512"] < 1.5 * extra["128/256"]
    assert extra["4096/512"] > 2.5 * extra["4096/256"]


def test_lapped_tokens_with_a_vae_shift_by_latent_pixels(tiny_vae):
    # a VAE's token is p × p latent pixels: patch 2 is half-shifted by one latent pixel; patch 1 cannot be
    lr = torch.rand(1, 3, 8, 8)
    pipe = sample.VOSRPipeline(tiny_dit(4, patch_size=2), tiny_vae)
    assert (pipe.lapped_net().cells, pipe.lapped_net().unit) == (1, 2)
    off, on = (pipe(lr, 4.0, steps=1, generator=torch.Generator().manual_seed(0), tile=0, lapped=lapped)
               for lapped in ("off", "on"))
    assert on.shape == off.shape == (1, 3, 32, 32) and 0 < (on - off).abs().mean() < 0.2
    with pytest.raises(ValueError, match="even token side"):
        sample.VOSRPipeline(tiny_dit(4, patch_size=1), tiny_vae).lapped_net()
