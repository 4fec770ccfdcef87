"""Tests for vae.py: codecs and the DINOv2 semantic encoder, each against an independent computation."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vae  # noqa: E402

torch.set_num_threads(2)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_scripts_import_without_diffusers_or_timm():
    """diffusers and timm (~4 s of imports) load only when a VAE folder, the light decoder or DINOv2 is
    built, so the pixel-codec CLIs and every --help start without them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; import degrade, vae, dit, sample, train_teacher, distill, evaluate; "
            "print(sorted(m for m in ('diffusers', 'timm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"   # (the tests below build the VAEs, the light decoder and DINOv2 with them)


# ----------------------------------------------------------------------------------------------------
# pixel codec
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,f", [("pixel", 8), ("pixel4", 4)])
def test_pixel_codec_exact_and_layout(spec, f):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    codec = vae.load_codec(spec)
    z = codec.encode(img)
    assert (codec.channels, codec.factor) == (3 * f * f, f) and z.shape == (2, 3 * f * f, 16 // f, 24 // f)
    naive = torch.empty_like(z)
    for c in range(3):
        for i in range(f):
            for j in range(f):
                naive[:, c * f * f + i * f + j] = img[:, c, i::f, j::f]
    assert torch.equal(z, naive)
    assert torch.equal(codec.decode(z), img)
    assert codec_spec_round_trip(codec) == {"codec": spec, "light_decoder": None}
    with pytest.raises(ValueError, match=f"multiples of {f}"):
        codec.encode(img[:, :, :f + 2])


def test_pixel_codec_rejects_odd_block_sides():
    for spec in ("pixel3", "pixel32", "pixels"):
        with pytest.raises((ValueError, FileNotFoundError), match=spec):
            vae.load_codec(spec)


def codec_spec_round_trip(codec):
    """The codec spec survives a JSON round trip (training stores it in its config)."""
    return json.loads(json.dumps(vae.codec_spec_of(codec)))


# ----------------------------------------------------------------------------------------------------
# diffusers codecs
# ----------------------------------------------------------------------------------------------------

def tiny_kl(tmp_path, name="sd", **cfg):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    kw = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
              latent_channels=4, sample_size=32)
    kw.update(cfg)
    model = AutoencoderKL(**kw).eval()
    model.save_pretrained(tmp_path / name)
    return model, str(tmp_path / name)


def test_sd_style_codec_matches_diffusers(tmp_path):
    model, folder = tiny_kl(tmp_path, scaling_factor=0.5, shift_factor=0.1)
    codec = vae.load_codec(folder)
    assert (codec.channels, codec.factor) == (4, 2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        expect = (dist.mode() - 0.1) * 0.5
    z = codec.encode(x, mode=True)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)
    # a sample: repeatable under a seeded generator, different from the mode, same as diffusers' own sample
    s1 = codec.encode(x, generator=torch.Generator().manual_seed(3))
    s2 = codec.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.allclose(s1, z)
    with torch.no_grad():
        ref = (dist.sample(generator=torch.Generator().manual_seed(3)) - 0.1) * 0.5
    torch.testing.assert_close(s1, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expect_img = model.decode(z / 0.5 + 0.1).sample
    torch.testing.assert_close(codec.decode(z), expect_img, rtol=1e-5, atol=1e-5)
    # frozen: no gradients, eval mode even after .train()
    codec.train()
    assert not codec.vae.training and not any(p.requires_grad for p in codec.parameters())
    assert codec_spec_round_trip(codec) == {"codec": folder, "light_decoder": None}


def test_16ch_per_channel_normalisation(tmp_path):
    mean = [0.1 * i - 0.7 for i in range(16)]
    std = [0.5 + 0.1 * i for i in range(16)]
    model, folder = tiny_kl(tmp_path, "c16", latent_channels=16, latents_mean=mean, latents_std=std,
                            scaling_factor=0.3)
    codec = vae.load_codec(folder)
    assert (codec.channels, codec.factor) == (16, 2)
    x = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latent = model.encode(x).latent_dist.mode()
    expect = torch.stack([(latent[:, c] - mean[c]) / std[c] for c in range(16)], dim=1)  # per channel, no scale
    z = codec.encode(x, mode=True)
    torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(z), model.decode(latent).sample, rtol=1e-4, atol=1e-5)


def test_qwen_image_codec_one_frame(tmp_path):
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(0)
    mean, std = [0.1, 0.2, -0.3, 0.4], [1.5, 2.0, 0.5, 1.0]
    model = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                   temperal_downsample=[False], latents_mean=mean, latents_std=std).eval()
    model.save_pretrained(tmp_path / "qwen")
    codec = vae.load_codec(str(tmp_path / "qwen"))
    assert (codec.channels, codec.factor) == (4, 2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        latent = model.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]      # (B,4,8,8)
    expect = (latent - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    z = codec.encode(x, mode=True)
    torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)
    assert codec.decode(z).shape == (2, 3, 16, 16)


def test_light_decoder_strict_loading(tmp_path):
    torch.manual_seed(0)
    dec = vae.build_light_decoder()
    assert 12.0e6 < sum(p.numel() for p in dec.parameters()) < 12.8e6  # the release's 12.4 M
    sd = {k: v.clone() for k, v in dec.state_dict().items()}
    path = tmp_path / "light.safetensors"
    save_file(sd, str(path))
    loaded = vae.load_light_decoder(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())

    bad = dict(sd, extra_weight=torch.zeros(1))
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors.*extra_weight"):
        vae.load_light_decoder(tmp_path / "extra.safetensors")
    bad = dict(sd)
    bad["conv_in.weight"] = torch.zeros(256, 4, 1, 1)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape\.safetensors.*conv_in\.weight"):
        vae.load_light_decoder(tmp_path / "shape.safetensors")
    bad = {k: v for k, v in sd.items() if k != "conv_out.bias"}
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors.*conv_out\.bias"):
        vae.load_light_decoder(tmp_path / "missing.safetensors")

    # a codec folder decoded by the light decoder: decode = light(z / scaling_factor), no post_quant_conv
    _, folder = tiny_kl(tmp_path, scaling_factor=0.25)
    codec = vae.load_codec(folder, light_decoder=str(path))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expect = loaded(z / 0.25)
    out = codec.decode(z)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, expect)
    assert vae.codec_spec_of(codec) == {"codec": folder, "light_decoder": str(path)}


def test_codec_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        vae.load_codec(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        vae.load_codec(str(tmp_path / "empty"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"odd.*UNet2DModel"):
        vae.load_codec(str(tmp_path / "odd"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        vae.load_light_decoder(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------------
# semantic encoder
# ----------------------------------------------------------------------------------------------------

def boost_layer_scale(encoder, value=0.5):
    """timm inits LayerScale at 1e-5, which would make the blocks near-identities; make them matter."""
    for blk in encoder.vit.blocks:
        blk.ls1.gamma.data.fill_(value)
        blk.ls2.gamma.data.fill_(value)
    return encoder


@pytest.fixture(scope="module")
def random_vit():
    """One seeded random ViT-S/14 (timm's init is slow on CPU), LayerScale boosted; tests wrap it as needed."""
    return boost_layer_scale(vae.load_semantic("random", image_size=56)).vit


def test_semantic_round_trip_and_shape(tmp_path, random_vit):
    assert vae.load_semantic("none") is None
    enc = vae.SemanticEncoder(random_vit, image_size=56)
    assert (enc.dim, enc.image_size, enc.num_tokens) == (384, 56, 16)
    img = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    tokens = enc(img)
    assert tokens.shape == (2, 16, 384)
    path = tmp_path / "dino.safetensors"
    vae.save_semantic(enc, path)
    back = vae.load_semantic(str(path), image_size=56)
    assert torch.equal(back(img), tokens)
    assert not any(p.requires_grad for p in back.parameters()) and not back.vit.training
    with pytest.raises(FileNotFoundError, match="missing_dino.pth"):
        vae.load_semantic(str(tmp_path / "missing_dino.pth"))
    with pytest.raises(ValueError, match="multiple of"):
        vae.load_semantic("random", image_size=50)


def test_random_semantic_is_seeded(random_vit):
    rng_before = torch.get_rng_state()
    again, other = vae.load_semantic("random", image_size=28), vae.load_semantic("random", image_size=28, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    for name in ("pos_embed", "blocks.3.attn.qkv.weight"):
        assert torch.equal(again.vit.state_dict()[name], random_vit.state_dict()[name])
        assert not torch.equal(other.vit.state_dict()[name], random_vit.state_dict()[name])


def test_official_dinov2_keys_load(tmp_path, random_vit):
    """A state dict in facebookresearch/dinov2 naming (.pth, mask_token, chunked blocks) loads the same."""
    enc = vae.SemanticEncoder(random_vit, image_size=42)
    official = {"mask_token": torch.zeros(1, 384)}
    for k, v in random_vit.state_dict().items():
        if k.startswith("blocks."):
            n = int(k.split(".")[1])
            k = f"blocks.{n // 4}.{n}." + k.split(".", 2)[2]   # block_chunks=3 layout: blocks.CHUNK.N.*
        official[k] = v.clone()
    torch.save(official, tmp_path / "dinov2_vits14.pth")
    back = vae.load_semantic(str(tmp_path / "dinov2_vits14.pth"), image_size=42)
    img = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(img), enc(img))


def bicubic_scale_naive(a, s):
    """Separable bicubic (Keys, A=-0.75) of a (M,M,D) grid with PyTorch's scale_factor coordinate rule."""
    def weights(t):
        A = -0.75
        t = abs(t)
        if t <= 1:
            return ((A + 2) * t - (A + 3)) * t * t + 1
        if t < 2:
            return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
        return 0.0

    M = a.shape[0]
    out_n = int(math.floor(M * s))
    mat = np.zeros((out_n, M))
    for o in range(out_n):
        src = (o + 0.5) / s - 0.5            # align_corners=False, ratio = 1/scale_factor
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            mat[o, min(max(k, 0), M - 1)] += weights(src - k)
    return np.einsum("ij,jkd,lk->ild", mat, a, mat)


def test_pos_embed_resize_matches_reference():
    M, grid, D = 37, 32, 8
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, M * M, D, generator=g)
    ours = vae.resize_pos_embed(table, grid)
    naive = bicubic_scale_naive(table[0].reshape(M, M, D).double().numpy(), (grid + 0.1) / M)
    assert ours.shape == (1, grid * grid, D)
    np.testing.assert_allclose(ours[0].reshape(grid, grid, D).numpy(), naive, rtol=1e-4, atol=1e-5)
    # the +0.1 scale factor is not the same as resizing to size=grid (which is what timm would do)
    by_size = F.interpolate(table.reshape(1, M, M, D).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic")
    assert not torch.allclose(ours, by_size.permute(0, 2, 3, 1).reshape(1, -1, D), atol=1e-3)
    assert vae.resize_pos_embed(table, M) is table  # the reference skips interpolation at the native size


def test_semantic_forward_at_other_size_matches_timm(random_vit):
    """Whole path at 70^2: equals timm run on a 70^2 model whose position table was resized independently."""
    enc = vae.SemanticEncoder(random_vit, image_size=70)
    with torch.device("meta"):
        ref = vae.build_dinov2(384, img_size=70)
    sd = dict(random_vit.state_dict())
    pos = sd["pos_embed"]
    patch = bicubic_scale_naive(pos[0, 1:].reshape(37, 37, 384).double().numpy(), (5 + 0.1) / 37)
    sd["pos_embed"] = torch.cat([pos[:, :1], torch.from_numpy(patch).float().reshape(1, 25, 384)], dim=1)
    ref.load_state_dict(sd, assign=True)
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    x = F.interpolate(img, size=(70, 70), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        expect = ref.eval().forward_intermediates((x - MEAN) / STD, indices=[8], norm=False, output_fmt="NLC",
                                                 intermediates_only=True)[0]
    torch.testing.assert_close(enc(img), expect, rtol=1e-4, atol=1e-4)
    # the layer index is honoured: block 7 is a different feature
    assert not torch.allclose(vae.SemanticEncoder(random_vit, image_size=70, layer=7)(img), expect, atol=1e-3)


def test_semantic_block8_equals_timm_at_518():
    """At 518^2 (no position resize) our manual path equals timm's forward_intermediates, block index 8."""
    torch.manual_seed(0)
    enc = boost_layer_scale(vae.SemanticEncoder(vae.build_dinov2(384, depth=9), image_size=518, layer=8))
    img = torch.rand(1, 3, 518, 518, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = enc.vit.forward_intermediates((img - MEAN) / STD, indices=[8], norm=False, output_fmt="NLC",
                                               intermediates_only=True)[0]
    ours = enc(img)
    assert ours.shape == (1, 37 * 37, 384)
    torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-5)


def test_dinov2_with_registers_official_keys(tmp_path):
    """Official register checkpoints (cls pos inside pos_embed, register_tokens) match timm's reg4 layout."""
    torch.manual_seed(0)
    timm_reg = vae.SemanticEncoder(vae.build_dinov2(384, depth=9, reg_tokens=4, img_size=42), image_size=42)
    boost_layer_scale(timm_reg)
    sd = timm_reg.vit.state_dict()
    cls_pos = torch.randn(1, 1, 384)
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - cls_pos,
                    pos_embed=torch.cat([cls_pos, sd["pos_embed"]], dim=1), mask_token=torch.zeros(1, 384))
    save_file(official, str(tmp_path / "reg.safetensors"))
    back = vae.load_semantic(str(tmp_path / "reg.safetensors"), image_size=42, layer=8)  # 9 blocks: no default 8
    img = torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(4))
    x = (img - MEAN) / STD
    with torch.no_grad():
        expect = timm_reg.vit.forward_intermediates(x, indices=[8], norm=False, output_fmt="NLC",
                                                    intermediates_only=True)[0]
    torch.testing.assert_close(back(img), expect, rtol=1e-5, atol=1e-5)
    assert back(img).shape == (1, 9, 384)
