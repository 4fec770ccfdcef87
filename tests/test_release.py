"""The official release's files in, its conventions out: sample.py --ckpt preset/ckpts/VOSR_*.

Every file is built here with random weights in the release's on-disk format (small widths, the real key
structure): args.json, checkpoints/ema_model.safetensors, stable-diffusion-2-1-base/vae/, sd21_lwdecoder.pth
({"config", "model_state_dict"}), Qwen-Image-vae-2d/ (one-frame reduction of diffusers' Qwen-Image VAE),
torch_cache/checkpoints/dinov2_vit{b,l}14_pretrain.pth (facebookresearch keys). The expected images are
computed step by step with diffusers' and timm's own classes and PIL, not with sample.py's helpers.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import dit
import sample
import vae
from vosr.loading import release_weights
from vae import load_light_decoder

ROOT = Path(__file__).resolve().parents[1]
KEYS_2D = Path("/work/shared/release_qwen_vae2d_keys.txt")   # the real folder's key list, where present
MEAN = torch.tensor(vae.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(vae.IMAGENET_STD).view(1, 3, 1, 1)
SEM_SIZE = 28          # DINOv2 input side of the test models (2×2 tokens); the release uses 448
QWEN = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True])     # the release's structure, base_dim 96 → 8


def randomize(module, std=0.05):
    """Give every zero or constant parameter random values, so a wrong weight or branch shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and p.std() == 0 or p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1 if p.abs().sum() > 0 else 0))
    return module


def release_args(**kw):
    """args.json of a released model with the real keys, small dims."""
    return dict(dim=64, depth=2, num_heads=2, patch_size=2, mlp_ratio=4.0, encdim_ratio=3, use_qknorm=True,
                use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, resolution=128,
                cfg_scale=0.5, weak_cond_strength_aelq_list=[0.05, 0.25], time_dist="uniform", t_start=1.0,
                t_end=0.0, seed=0, dinov2_size=SEM_SIZE, **kw)


def vosr2_args(**kw):
    """VOSR 2.0's args.json keys (as published), small dims: one step, no r embedder."""
    return release_args(ae_type="qwen", enc_type="dinov2l", enc_dim=64, layer_dinov2b_list=[17],
                        auxiliary_time_cond=False, distill_type="onestep", **kw)


def official_dinov2(path, dim, depth):
    """A random DINOv2 .pth in the facebookresearch key layout (timm's names + mask_token), 2×2 patch table.
    Returns the timm model it was made from (the reference)."""
    torch.manual_seed(depth)
    vit = vae.build_dinov2(dim, depth=depth, img_size=SEM_SIZE).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(0.5)                      # layer scale 1e-5 would make every block near identity
    sd = {**vit.state_dict(), "mask_token": torch.zeros(1, dim)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return vit


def tiny_sd_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, scaling_factor=0.18215).eval()


def light_decoder_pth(path, config):
    from diffusers.models.autoencoders.vae import Decoder
    torch.manual_seed(3)
    dec = Decoder(in_channels=config["in_channels"], out_channels=config["out_channels"],
                  up_block_types=("UpDecoderBlock2D",) * len(config["block_out_channels"]),
                  block_out_channels=tuple(config["block_out_channels"]),
                  layers_per_block=config["layers_per_block"], norm_num_groups=32, act_fn="silu").eval()
    torch.save({"config": config, "model_state_dict": dec.state_dict()}, path)
    return dec


def qwen_3d():
    """diffusers' Qwen-Image VAE, random weights in every temporal tap of every causal conv."""
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(5)
    mean, std = torch.randn(16, generator=g).tolist(), (torch.rand(16, generator=g) + 0.5).tolist()
    m = AutoencoderKLQwenImage(**QWEN, latents_mean=mean, latents_std=std).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return m


def reduce_to_2d(sd3d: dict) -> dict:
    """The release's 2-D folder state dict: last temporal tap, gammas without the time axis, no time_conv."""
    out = {}
    for k, v in sd3d.items():
        if ".time_conv." in k:
            continue
        if v.ndim == 5:
            v = v[:, :, -1]
        elif k.endswith(".gamma") and v.ndim == 4:
            v = v[..., 0]
        out[k] = v.contiguous()
    return out


def qwen_2d_folder(folder, model):
    folder.mkdir(parents=True, exist_ok=True)
    conf = {"_class_name": "AutoencoderKLQwenImage2D", **QWEN, "latents_mean": model.config.latents_mean,
            "latents_std": model.config.latents_std}
    (folder / "config.json").write_text(json.dumps(conf))
    save_file(reduce_to_2d(model.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))


def release_dit(folder, args, channels, enc_dim, student):
    torch.manual_seed(6)
    model = randomize(dit.build("tiny", dim=args["dim"], depth=args["depth"], num_heads=args["num_heads"],
                                latent_channels=channels, enc_dim=enc_dim, with_r=student,
                                train_grid=args["resolution"] // 16)).eval()
    (folder / "checkpoints").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "checkpoints" / "ema_model.safetensors"))
    (folder / "args.json").write_text(json.dumps(args))
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """preset/ckpts/ as the release's README lays it out: VOSR_0.5B_os (student, SD2.1 + light decoder,
    DINOv2-B block 8) and VOSR_1.4B_ms (teacher, Qwen 2-D VAE, DINOv2-L block 17), with their references."""
    ckpts = tmp_path_factory.mktemp("preset") / "ckpts"
    ref = {}
    sd_vae = tiny_sd_vae()
    sd_vae.save_pretrained(str(ckpts / "stable-diffusion-2-1-base" / "vae"))
    (ckpts / "stable-diffusion-2-1-base" / "model_index.json").write_text("{}")
    ref["sd_vae"] = sd_vae
    ref["light"] = light_decoder_pth(ckpts / "sd21_lwdecoder.pth", dict(in_channels=4, out_channels=3,
                                                                       block_out_channels=[32, 32, 32, 32],
                                                                       layers_per_block=1))
    ref["qwen"] = qwen_3d()
    qwen_2d_folder(ckpts / "Qwen-Image-vae-2d", ref["qwen"])
    cache = ckpts / "torch_cache" / "checkpoints"
    ref["dino_b"] = official_dinov2(cache / "dinov2_vitb14_pretrain.pth", 64, depth=9)    # block 8 must exist
    ref["dino_l"] = official_dinov2(cache / "dinov2_vitl14_pretrain.pth", 64, depth=18)   # block 17 must exist
    ref["dit_os"] = release_dit(ckpts / "VOSR_0.5B_os", release_args(
        ae_type="sd2", ae_path="preset/ckpts/stable-diffusion-2-1-base", enc_type="dinov2b", enc_dim=64,
        layer_dinov2b_list=[8], infer_steps=1, distill_type="rcgm", auxiliary_time_cond=True),
        4, 64, student=True)
    ref["dit_ms"] = release_dit(ckpts / "VOSR_1.4B_ms", release_args(
        ae_type="qwen", ae_path="preset/ckpts/Qwen-Image-vae-2d", enc_type="dinov2l", enc_dim=64,
        layer_dinov2b_list=[17], infer_steps=2), 16, 64, student=False)
    ref["dit_v2"] = release_dit(ckpts / "VOSR2", vosr2_args(), 16, 64, student=False)
    lr_dir = ckpts.parent / "lr"
    lr_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(lr_dir / "a.png")  # 12×8 → 48×32
    return ckpts, lr_dir, ref


def dino_tokens(vit, up, layer):
    x = F.interpolate(up, size=(SEM_SIZE, SEM_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return vit.forward_intermediates((x - MEAN) / STD, indices=[layer], norm=False, output_fmt="NLC",
                                     intermediates_only=True)[0]


def adain_8bit(sr, ref, release=True):
    """adain on the clamped 8-bit output, written out per channel: the release's (x − μ)/(σ + 1e-5)
    ·(σ_ref + 1e-5) + μ_ref with numpy's unbiased std, or (release=False) ours, sqrt(var + eps)."""
    sr = (sr.clamp(0, 1) * 255).round() / 255
    out = torch.empty_like(sr)
    for c in range(3):
        a, b = sr[0, c].double().numpy(), ref[0, c].double().numpy()
        if release:
            sa, sb = a.std(ddof=1) + 1e-5, b.std(ddof=1) + 1e-5
        else:
            sa, sb = math.sqrt(a.var(ddof=1) + 1e-5), math.sqrt(b.var(ddof=1) + 1e-5)
        out[0, c] = torch.from_numpy((a - a.mean()) / sa * sb + b.mean())
    return out.clamp(0, 1)


def pil_up(path, scale=4):
    im = Image.open(path).convert("RGB")
    up = im.resize((im.width * scale, im.height * scale), Image.BICUBIC)
    return torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1)[None].float() / 255


def assert_same_image(got, expect):
    """Equal up to float rounding: an output level that lands on a rounding edge before the adain can move a
    few levels after it (adain multiplies by σ_ref/σ_sr), so a handful of pixels may differ by more than one."""
    d = (got - expect).abs()
    assert d.mean() < 0.01 and (d > 1).sum() <= 4, (d.max(), d.mean(), (d > 1).sum())


def read_png(path):
    return torch.from_numpy(np.asarray(Image.open(path)).copy()).permute(2, 0, 1)[None].float()


# ----------------------------------------------------------------------------- the released layouts through the CLI

@torch.no_grad()
def test_release_0_5B_student_through_the_cli(release, tmp_path, capsys):
    """VOSR_0.5B_os: args.json → DiT shape, 4 channels, DINOv2-B block 8; SD2.1 VAE (posterior mean ×
    0.18215) and the .pth light decoder found beside the folder; PIL-bicubic LR; one student step;
    adain on the 8-bit output. The PNG equals the same computation done by hand with diffusers/timm/PIL."""
    ckpts, lr_dir, ref = release
    out = tmp_path / "out"
    assert sample.main(["--ckpt", str(ckpts / "VOSR_0.5B_os"), "-i", str(lr_dir), "-o", str(out),
                        "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for line in (f"loaded DiT {ckpts}/VOSR_0.5B_os/checkpoints/ema_model.safetensors",
                 f"loaded codec {ckpts}/stable-diffusion-2-1-base (4 channels",
                 f"loaded light decoder {ckpts}/sd21_lwdecoder.pth",
                 f"loaded DINOv2 {ckpts}/torch_cache/checkpoints/dinov2_vitb14_pretrain.pth (64-wide ViT, block 8 of 9",
                 "student, 1 step(s)", "colour fix adain, upscale pil"):
        assert line in printed, printed

    up = pil_up(lr_dir / "a.png")                                       # (1, 3, 32, 48), 8-bit levels
    c_str = ref["sd_vae"].encode(up * 2 - 1).latent_dist.mode() * 0.18215
    c_sem = dino_tokens(ref["dino_b"], up, 8)
    z1 = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0))
    f = ref["dit_os"](torch.cat([c_str, z1], 1), torch.ones(1), c_sem, torch.zeros(1))
    img = (ref["light"](((z1 - f) / 0.18215)).clamp(-1, 1) + 1) / 2
    expect = (adain_8bit(img, up) * 255).round()
    got = read_png(out / "a.png")
    assert got.shape == expect.shape == (1, 3, 32, 48)
    assert_same_image(got, expect)


@torch.no_grad()
def test_release_1_4B_teacher_through_the_cli(release, tmp_path, capsys):
    """VOSR_1.4B_ms: 16 channels from the Qwen 2-D VAE ((z − mean)/std of its config), DINOv2-L block 17,
    α = mean of weak_cond_strength_aelq_list, infer_steps Euler steps of the guided velocity (eq. 2)."""
    ckpts, lr_dir, ref = release
    out = tmp_path / "out"
    assert sample.main(["--ckpt", str(ckpts / "VOSR_1.4B_ms"), "-i", str(lr_dir), "-o", str(out),
                        "--device", "cpu", "--guidance", "0.7"]) == 0
    printed = capsys.readouterr().out
    for line in (f"loaded DiT {ckpts}/VOSR_1.4B_ms/checkpoints/ema_model.safetensors (dim 64, depth 2, teacher)",
                 f"loaded codec {ckpts}/Qwen-Image-vae-2d (16 channels",
                 "dinov2_vitl14_pretrain.pth (64-wide ViT, block 17 of 18", "teacher, 2 step(s), guidance 0.7"):
        assert line in printed, printed
    assert "light decoder" not in printed

    q = ref["qwen"]
    mean, std = torch.tensor(q.config.latents_mean).view(1, -1, 1, 1), torch.tensor(q.config.latents_std).view(1, -1, 1, 1)
    up = pil_up(lr_dir / "a.png")
    c_str = (q.encode((up * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0] - mean) / std
    c_sem = dino_tokens(ref["dino_l"], up, 17)
    z = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0))
    m, s, alpha = ref["dit_ms"], 0.7, 0.15
    for t, r in ((1.0, 0.5), (0.5, 0.0)):
        tt = torch.full((1,), t)
        v_c = m(torch.cat([c_str, z], 1), tt, c_sem)
        v_p = m(torch.cat([alpha * c_str, z], 1), tt, torch.zeros_like(c_sem))
        z = z - (t - r) * (v_p + s * (v_c - v_p))
    img = (q.decode((z * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1) + 1) / 2
    expect = (adain_8bit(img, up) * 255).round()
    got = read_png(out / "a.png")
    assert got.shape == (1, 3, 32, 48)
    assert_same_image(got, expect)


@torch.no_grad()
def test_vosr2_one_step_one_branch_through_the_cli(release, tmp_path, capsys):
    """VOSR2/ (distill_type onestep, auxiliary_time_cond false, no r_embedder): the Qwen 2-D VAE's
    posterior mode, DINOv2-L block 17 of the PIL-bicubic LR↑, one DiT call of the full branch at
    t = 1 without r, z0 = z1 − v, decoded, the release's adain against LR↑: the PNG equals it by
    hand."""
    ckpts, lr_dir, ref = release
    out, model = tmp_path / "out", str(ckpts / "VOSR2")
    assert sample.main(["--ckpt", model, "-i", str(lr_dir), "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for line in (f"loaded DiT {model}/checkpoints/ema_model.safetensors (dim 64, depth 2, VOSR 2.0",
                 f"loaded codec {ckpts}/Qwen-Image-vae-2d (16 channels", "block 17 of 18",
                 "VOSR2 (tiny, VOSR 2.0, student, 1 step(s), guidance 1,",
                 "colour fix adain, upscale pil"):
        assert line in printed, printed
    q = ref["qwen"]
    mean = torch.tensor(q.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(q.config.latents_std).view(1, -1, 1, 1)
    up = pil_up(lr_dir / "a.png")
    c_str = (q.encode((up * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0] - mean) / std
    c_sem = dino_tokens(ref["dino_l"], up, 17)
    z1 = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0))
    v = ref["dit_v2"](torch.cat([c_str, z1], 1), torch.ones(1), c_sem)    # one branch, t = 1, no r
    img = (q.decode(((z1 - v) * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1) + 1) / 2
    expect = (adain_8bit(img, up) * 255).round()
    got = read_png(out / "a.png")
    assert got.shape == (1, 3, 32, 48)
    assert_same_image(got, expect)
    # --guidance and --alpha have no effect on it: a note, the same image; --steps 2 is refused
    argv = ["--ckpt", model, "-i", str(lr_dir), "--device", "cpu"]
    assert sample.main([*argv, "-o", str(tmp_path / "g"), "--guidance", "2", "--alpha", "0.5"]) == 0
    assert "--guidance and --alpha ignored: VOSR 2.0 runs one branch" in capsys.readouterr().out
    assert torch.equal(read_png(tmp_path / "g" / "a.png"), got)
    err = one_line_error(capsys, [*argv, "-o", str(tmp_path / "s"), "--steps", "2"])
    assert "--steps 2: VOSR 2.0 (args.json distill_type 'onestep') takes one Euler step" in err, err
    err = one_line_error(capsys, [*argv, "-o", str(tmp_path / "s"), "--student", "0"])
    assert "--student 0" in err and "no teacher sampling" in err, err


def test_ckpt_weights_file_of_a_release_folder_uses_the_folder(release, tmp_path, capsys):
    """--ckpt preset/ckpts/VOSR2/checkpoints/ema_model.safetensors: a note, then the folder's args.json
    (not a bare file of the default preset): the same PNG as --ckpt preset/ckpts/VOSR2."""
    ckpts, lr_dir, _ = release
    weights = ckpts / "VOSR2" / "checkpoints" / "ema_model.safetensors"
    argv = ["-i", str(lr_dir), "--device", "cpu"]
    assert sample.main(["--ckpt", str(ckpts / "VOSR2"), "-o", str(tmp_path / "dir"), *argv]) == 0
    assert sample.main(["--ckpt", str(weights), "-o", str(tmp_path / "file"), *argv]) == 0
    assert (f"sample.py: --ckpt {weights}: the weights of the release model folder {ckpts / 'VOSR2'}: "
            f"using the folder (its args.json), as --ckpt {ckpts / 'VOSR2'}") in capsys.readouterr().out
    assert torch.equal(read_png(tmp_path / "file" / "a.png"), read_png(tmp_path / "dir" / "a.png"))


@torch.no_grad()
def test_vosr2_is_tiled_above_its_training_crop(release):
    """Above the training crop (args.json resolution: 512 for the release, 128 here) VOSR 2.0 is
    tiled by default: the DiT sees windows of the crop, never the whole latent."""
    ckpts, _, _ = release
    cfg = sample.SampleConfig(ckpt=str(ckpts / "VOSR2"), device="cpu")
    pipe, run = sample.load_pipeline(cfg, report=lambda s: None)
    cfg = sample.check_tiles(sample.checkpoint_defaults(cfg, pipe, run), pipe)
    from tests.test_tiling import recorded_windows
    seen = recorded_windows(pipe)
    lr = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    sr = sample.super_resolve(pipe, lr, cfg)
    assert sr.shape == (1, 3, 160, 144) and cfg.steps == 1
    assert len(seen) > 1 and {(h, w) for _, _, h, w in seen} == {(16, 16)}    # 128-px tiles, 8× VAE


QWEN_L, SD_B = dict(ae_type="qwen", enc_type="dinov2l"), dict(ae_type="sd2", enc_type="dinov2b")
@torch.no_grad()
def test_vosr2_tiled_as_released(release, tmp_path):
    """--semantic-tiles per-tile --vae-tile 0 --tile-shape square: the release's tiled run, written out
    by hand on a 48×160 output (latent 6×20, 128-px tiles = 16 latent pixels): the VAE on the whole image,
    one noise field, the DiT on 6×6 squares every 4 latent pixels (overlap 2 = tile/8) plus one flush
    with the end, DINOv2 on each square's LR↑ crop, velocities blended with the Gaussian window
    (σ = 0.1 × side), one Euler step."""
    ckpts, _, ref = release
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)).save(tmp_path / "in" / "w.png")
    assert sample.main(["--ckpt", str(ckpts / "VOSR2"), "-i", str(tmp_path / "in"), "-o",
                        str(tmp_path / "out"), "--device", "cpu", "--semantic-tiles", "per-tile",
                        "--vae-tile", "0", "--tile-shape", "square"]) == 0
    q, m = ref["qwen"], ref["dit_v2"]
    mean = torch.tensor(q.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(q.config.latents_std).view(1, -1, 1, 1)
    up = pil_up(tmp_path / "in" / "w.png")                                   # (1, 3, 48, 160)
    c_str = (q.encode((up * 2 - 1)[:, :, None]).latent_dist.mode()[:, :, 0] - mean) / std
    z1 = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0))
    assert c_str.shape[-2:] == (6, 20)
    i = torch.arange(6, dtype=torch.float64)
    g = torch.exp(-(i - 2.5) ** 2 / (2 * 0.6 ** 2)).float()
    num, den = torch.zeros_like(z1), torch.zeros(6, 20)
    for x in (0, 4, 8, 12, 14):
        tokens = dino_tokens(ref["dino_l"], up[..., :, 8 * x:8 * x + 48], 17)
        v = m(torch.cat([c_str, z1], 1)[..., x:x + 6], torch.ones(1), tokens)
        num[..., x:x + 6] += v * (g[:, None] * g)
        den[:, x:x + 6] += g[:, None] * g
    z0 = z1 - num / den
    img = (q.decode((z0 * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1) + 1) / 2
    expect = (adain_8bit(img, up) * 255).round()
    got = read_png(tmp_path / "out" / "w.png")
    assert got.shape == (1, 3, 48, 160)
    assert_same_image(got, expect)


# (args.json keys, weights with r_embedder?) → kind, of VOSR_0.5B_ms, _os, VOSR_1.4B_ms, _os, VOSR2
RELEASE_KINDS = [
    (SD_B, False, "teacher"),
    ({**SD_B, "distill_type": "rcgm", "auxiliary_time_cond": True}, True, "student"),
    ({**QWEN_L, "auxiliary_time_cond": False}, False, "teacher"),
    ({**QWEN_L, "distill_type": "rcgm"}, True, "student"),
    ({**QWEN_L, "distill_type": "onestep", "auxiliary_time_cond": False}, False, "onestep"),
]


def kind_folder(ckpts, name, args, with_r):
    """A release model folder beside the fixture's codec and DINOv2 files: args.json and a weights
    file that has (or lacks) the r embedder's keys (only the keys tell the kinds apart)."""
    folder = ckpts / name
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(args))
    tensors = {"x_embedder.proj.weight": torch.zeros(1)}
    if with_r:
        tensors["r_embedder.mlp.0.weight"] = torch.zeros(1)
    save_file(tensors, str(folder / "checkpoints" / "ema_model.safetensors"))
    return folder


@pytest.mark.parametrize("keys,with_r,kind", RELEASE_KINDS)
def test_release_kind_from_args_json(release, keys, with_r, kind):
    """The five kinds (0.5B/1.4B × ms/os, VOSR 2.0) from args.json's distill_type and
    auxiliary_time_cond."""
    from vosr.loading import read_release_folder
    ckpts, _, _ = release
    layer = 8 if keys["enc_type"] == "dinov2b" else 17
    args = release_args(enc_dim=64, layer_dinov2b_list=[layer], **keys)
    folder = kind_folder(ckpts, f"kind_{kind}_{with_r}_{len(keys)}", args, with_r)
    run, _, _ = read_release_folder(folder, sample.SampleConfig())
    assert run["kind"] == kind


ONESTEP = dict(distill_type="onestep", auxiliary_time_cond=False)


@pytest.mark.parametrize("change,with_r,named", [
    (ONESTEP, True,
     "'distill_type' 'onestep' (VOSR 2.0, no r embedder), but {w} has r_embedder.* keys"),
    (dict(distill_type="rcgm"), False,
     "'distill_type' 'rcgm' (a one-step student with the r embedder), but {w} has no r_embedder"),
    (dict(), True, "no 'distill_type' (a teacher), but {w} has r_embedder.* keys"),
    (dict(distill_type="rcgm", auxiliary_time_cond=False), True,
     "'auxiliary_time_cond' is false, but {w} has r_embedder.* keys"),
    (dict(auxiliary_time_cond=True), False,
     "'auxiliary_time_cond' is true, but {w} has no r_embedder.* keys"),
    ({**ONESTEP, "auxiliary_time_cond": True}, False,
     "'auxiliary_time_cond' true contradicts distill_type 'onestep'"),
    ({**ONESTEP, "auxiliary_time_cond": "no"}, False,
     "'auxiliary_time_cond' is 'no', expected true or false"),
    (dict(distill_type="meanflow"), False,
     "'distill_type' 'meanflow' is not one of ['onestep', 'rcgm']"),
    ({**ONESTEP, "drop": "use_rope"}, False, "'use_rope' missing (VOSR 2.0's args.json"),
    ({**ONESTEP, "num_heads": 3}, False, "'num_heads' 3 does not divide dim 64"),
    ({**ONESTEP, "layer_dinov2b_list": [24]}, False,
     "'layer_dinov2b_list' [24] names a block that enc_type 'dinov2l' (24 blocks) does not have"),
])
def test_release_kind_contradiction_is_one_line(release, tmp_path, capsys, change, with_r, named):
    """args.json against itself or against the weights' r_embedder keys: one line naming the key,
    before any network is built."""
    ckpts, lr_dir, _ = release
    change = dict(change)
    drop = change.pop("drop", None)
    args = {**release_args(**QWEN_L, enc_dim=64, layer_dinov2b_list=[17]), **change}
    args.pop(drop, None)
    folder = kind_folder(ckpts, f"bad_{tmp_path.name}", args, with_r)
    argv = ["--ckpt", str(folder), "-i", str(lr_dir), "-o", str(tmp_path / "o")]
    err = one_line_error(capsys, argv)
    assert err.startswith(f"sample.py: {folder}/args.json: "), err
    assert named.format(w=folder / "checkpoints" / "ema_model.safetensors") in err, err


@torch.no_grad()
def test_latent_sample_is_the_releases_posterior_sample(release):
    """--latent sample draws c_str from the VAE posterior (as the official scripts do): the image changes,
    and the same seed gives the same image; the default is the posterior mean."""
    ckpts, lr_dir, _ = release
    pipe, run = sample.load_pipeline(sample.SampleConfig(ckpt=str(ckpts / "VOSR_0.5B_os"), device="cpu"),
                                     report=lambda s: None)
    lr = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    base = sample.SampleConfig(steps=1, color_fix="none")
    mean = sample.super_resolve(pipe, lr, base)
    drawn = sample.super_resolve(pipe, lr, sample.SampleConfig(steps=1, color_fix="none", latent="sample"))
    again = sample.super_resolve(pipe, lr, sample.SampleConfig(steps=1, color_fix="none", latent="sample"))
    assert torch.equal(drawn, again) and not torch.allclose(drawn, mean, atol=1e-4)
    assert torch.equal(mean, sample.super_resolve(pipe, lr, base))


def test_every_released_model_name_loads(release, tmp_path):
    """_os and _ms of both sizes: the folder name does not matter, args.json and the weights decide."""
    ckpts, lr_dir, _ = release
    import shutil
    for src, name in (("VOSR_0.5B_os", "VOSR_0.5B_ms"), ("VOSR_1.4B_ms", "VOSR_1.4B_os")):
        shutil.copytree(ckpts / src, ckpts / name, dirs_exist_ok=True)
        pipe, run = sample.load_pipeline(sample.SampleConfig(ckpt=str(ckpts / name), device="cpu"), report=lambda s: None)
        assert run["release"] and pipe.model.depth == 2
        shutil.rmtree(ckpts / name)


# ----------------------------------------------------------------------------- loaders

@torch.no_grad()
def test_qwen_2d_folder_equals_diffusers_on_one_frame(release):
    """The 2-D folder (last temporal tap) loads into a codec that equals diffusers' AutoencoderKLQwenImage
    whose causal kernels have random values in ALL taps: only the last one meets a single frame."""
    ckpts, _, ref = release
    codec = vae.load_codec(str(ckpts / "Qwen-Image-vae-2d"))
    q = ref["qwen"]
    assert codec.channels == 16 and codec.factor == 8 and codec.per_channel
    assert any(p.ndim == 5 and p[:, :, 0].abs().sum() > 0 for p in q.parameters())   # the taps really differ
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mean, std = torch.tensor(q.config.latents_mean).view(1, -1, 1, 1), torch.tensor(q.config.latents_std).view(1, -1, 1, 1)
    want = (q.encode(img[:, :, None]).latent_dist.mode()[:, :, 0] - mean) / std
    torch.testing.assert_close(codec.encode(img, mode=True), want, rtol=1e-4, atol=1e-5)
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(codec.decode(z), q.decode((z * std + mean)[:, :, None]).sample[:, :, 0],
                               rtol=1e-4, atol=1e-5)
    # the posterior can still be sampled (the release samples it): repeatable, and not the mean
    a = codec.encode(img, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, codec.encode(img, generator=torch.Generator().manual_seed(0))) and not torch.allclose(a, want)


def test_qwen_2d_keys_strict(release, tmp_path):
    """Only time_conv may be absent from a 2-D folder; another missing key is named. The fixture has the real
    folder's key structure (release_qwen_vae2d_keys.txt, where present)."""
    ckpts, _, ref = release
    sd = reduce_to_2d(ref["qwen"].state_dict())
    if KEYS_2D.is_file():
        real = {line.split(" | ")[0]: line.split(" | ")[1] for line in KEYS_2D.read_text().splitlines()
                if " | " in line and not line.startswith("#")}
        assert set(sd) == {k for k, shape in real.items() if shape != "-"}
        assert all(sd[k].ndim == real[k].count(",") + (0 if real[k].endswith(",)") else 1) for k in sd)
    for drop in ("decoder.up_blocks.0.resnets.1.conv2.weight", "encoder.mid_block.resnets.0.norm1.gamma"):
        bad = tmp_path / drop
        qwen_2d_folder(bad, ref["qwen"])
        save_file({k: v for k, v in sd.items() if k != drop}, str(bad / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(ValueError, match=f"missing key '{drop}'"):
            vae.load_codec(str(bad))


@torch.no_grad()
def test_light_decoder_pth_takes_its_shape_from_config(tmp_path):
    """sd21_lwdecoder.pth: {"config", "model_state_dict"}; the config decides the decoder's widths and depth."""
    config = dict(in_channels=4, out_channels=3, block_out_channels=[32, 64], layers_per_block=1)
    ref = light_decoder_pth(tmp_path / "lw.pth", config)
    dec = load_light_decoder(tmp_path / "lw.pth")
    z = torch.randn(1, 4, 5, 6)
    torch.testing.assert_close(dec(z), ref(z))
    assert dec(z).shape == (1, 3, 10, 12)                        # two blocks: ×2
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="bad.pth"):
        load_light_decoder(tmp_path / "bad.pth")


def test_semantic_block_follows_depth(tmp_path):
    """c_sem is block 8 of 12 (ViT-S/B) and block 17 of 24 (ViT-L) unless a checkpoint says otherwise."""
    assert [vae.default_semantic_layer(d) for d in (12, 24)] == [8, 17]
    with torch.device("meta"):
        assert vae.SemanticEncoder(vae.build_dinov2(1024), image_size=28).layer == 17
        assert vae.SemanticEncoder(vae.build_dinov2(768), image_size=28).layer == 8
        assert vae.SemanticEncoder(vae.build_dinov2(768), image_size=28, layer=3).layer == 3


@torch.no_grad()
def test_official_vit_l_file_loads(tmp_path):
    """A ViT-L/14 (1024 wide, 16 heads) in the facebookresearch layout, 37×37 position table as published
    (two of its 24 blocks): our tokens equal timm's own at a 518-pixel input."""
    torch.manual_seed(0)
    vit = vae.build_dinov2(1024, depth=2).eval()
    for name, p in vit.named_parameters():
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            p.fill_(0.5)
    torch.save({**vit.state_dict(), "mask_token": torch.zeros(1, 1024)}, tmp_path / "dinov2_vitl14_pretrain.pth")
    enc = vae.load_semantic(str(tmp_path / "dinov2_vitl14_pretrain.pth"), image_size=518, layer=1)
    assert enc.vit.blocks[0].attn.num_heads == 16
    img = torch.rand(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    want = vit.forward_intermediates((img - MEAN) / STD, indices=[1], norm=False, output_fmt="NLC",
                                     intermediates_only=True)[0]
    torch.testing.assert_close(enc(img), want, rtol=1e-4, atol=1e-4)


def test_weights_found_as_the_release_finds_them(tmp_path):
    for files, want in ((["model.safetensors", "checkpoints/ema_model.safetensors", "clean_weights/model.safetensors"],
                         "clean_weights/model.safetensors"),
                        (["model.safetensors", "checkpoints/model.safetensors"], "checkpoints/model.safetensors"),
                        (["ema_model.safetensors", "model.safetensors"], "ema_model.safetensors"),
                        (["b/x.safetensors", "a/y.safetensors"], "a/y.safetensors")):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_bytes(b"")
        assert release_weights(d) == d / want


# ----------------------------------------------------------------------------- conventions

def release_wavelet(sr, ref):
    """The release's 'wavelet' fix written out with PIL, numpy and OpenCV: the 8-bit reference
    resized to the output size with LANCZOS, both as float32 [0, 1] from 8 bits,
    clip(ref_low + (out − out_low)), low = GaussianBlur(σ = 5), then truncated to 8 bits by a
    uint8 cast: (the float result, the 8-bit one)."""
    import cv2
    out8 = (sr[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    ref8 = Image.fromarray((ref[0] * 255).round().byte().permute(1, 2, 0).numpy())
    ref8 = ref8.resize((out8.shape[1], out8.shape[0]), Image.LANCZOS)
    out, r = out8.astype(np.float32) / 255, np.asarray(ref8).astype(np.float32) / 255
    res = np.clip(cv2.GaussianBlur(r, (0, 0), 5) + (out - cv2.GaussianBlur(out, (0, 0), 5)), 0, 1)
    return res, torch.from_numpy((res * 255).astype(np.uint8)).permute(2, 0, 1)[None].float() / 255


def test_color_fixes_by_hand():
    """The release's adain (std + 1e-5) and wavelet (one OpenCV Gaussian split) on the clamped
    8-bit output against the LR↑, and ours by their own names: adain-var (sqrt(var + 1e-5)) and
    wavelet-atrous."""
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(1, 3, 37, 43, generator=g) * 1.4 - 0.2        # out of range, off the 8-bit grid
    ref = torch.randint(0, 256, (1, 3, 37, 43), generator=g).float() / 255
    ours = adain_8bit(sr, ref, release=False)
    torch.testing.assert_close(sample.color_fix_of(sr, ref, "adain"), adain_8bit(sr, ref), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(sample.color_fix_of(sr, ref, "adain-var"), ours, rtol=0, atol=1e-6)
    assert not torch.allclose(adain_8bit(sr, ref), ours, rtol=0, atol=1e-6)
    q = (sr.clamp(0, 1) * 255).round() / 255

    def low(x):                                                     # five à-trous levels, edges replicated
        k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
        for i in range(5):
            d = 2 ** i
            p = F.pad(x, (d, d, d, d), mode="replicate")
            x = sum(k[a, b] * p[..., a * d:a * d + x.shape[-2], b * d:b * d + x.shape[-1]]
                    for a in range(3) for b in range(3))
        return x
    torch.testing.assert_close(sample.color_fix_of(sr, ref, "wavelet-atrous"),
                               (q - low(q) + low(ref)).clamp(0, 1), rtol=0, atol=1e-6)
    assert torch.equal(sample.color_fix_of(sr, ref, "wavelet"), release_wavelet(sr, ref)[1])
    assert torch.equal(sample.color_fix_of(sr, ref, "none"), sr.clamp(0, 1))
    # a reference of another size (the release's odd sizes) is resized with LANCZOS first
    small = ref[..., :29, :31]
    want = torch.from_numpy(release_wavelet(q, small)[0]).permute(2, 0, 1)[None]
    torch.testing.assert_close(sample.wavelet_color_fix(q, small), want, rtol=0, atol=1e-6)


def test_pil_upscale_is_pil_bicubic_on_8_bit():
    lr = torch.randint(0, 256, (1, 3, 5, 7)).float() / 255
    im = Image.fromarray((lr[0].permute(1, 2, 0) * 255).round().byte().numpy())
    want = torch.from_numpy(np.asarray(im.resize((21, 15), Image.BICUBIC)).copy()).permute(2, 0, 1)[None] / 255
    assert torch.equal(sample.upscale_lr(lr, (15, 21), "pil"), want.float())
    assert not torch.allclose(sample.upscale_lr(lr, (15, 21), "torch"), want.float(), atol=1e-3)


def test_gaussian_window_formula():
    for n in (8, 13):
        w = sample.gaussian_window(n)
        want = torch.tensor([math.exp(-(i - (n - 1) / 2) ** 2 / (2 * (0.1 * n) ** 2)) for i in range(n)])
        torch.testing.assert_close(w, want.float())
        assert torch.allclose(w, w.flip(0))                                     # centred on the tile


def test_tile_starts_formula():
    """Sliding windows: stride = tile − overlap, starts range(0, size − tile + 1, stride), plus one flush
    with the end when the stride does not land there."""
    for size, tile, overlap in [(100, 32, 4), (96, 32, 0), (64, 32, 8), (37, 16, 3), (20, 32, 4), (33, 32, 4)]:
        stride = tile - overlap
        want = list(range(0, size - tile + 1, stride)) if size > tile else [0]
        if want[-1] + tile < size:
            want.append(size - tile)
        assert sample.tile_windows(size, tile, overlap, 1) == want, (size, tile, overlap)


def test_gaussian_blend_of_tiles_by_hand():
    """Each latent pixel gets Σ_k g_k(pos)·v_k / Σ_k g_k(pos) over the tiles k covering it, with g the
    separable Gaussian window of each tile; the release's overlap is at least tile/8."""
    z = torch.zeros(1, 1, 20, 27)
    def level(zw, wins):  # each window's constant, stacked as the windows are
        return torch.cat([torch.full_like(zw[:1], 1 + y * 100 + x) for y, x, _, _ in wins])
    out = sample.tiled(level, z, 12, 3, align=1, blend="gaussian", batch=5)
    ys, xs = sample.tile_windows(20, 12, 3, 1), sample.tile_windows(27, 12, 3, 1)
    g = sample.gaussian_window(12)
    num, den = torch.zeros(20, 27), torch.zeros(20, 27)
    for y in ys:
        for x in xs:
            w = g[:, None] * g[None, :]
            num[y:y + 12, x:x + 12] += w * (1 + y * 100 + x)
            den[y:y + 12, x:x + 12] += w
    torch.testing.assert_close(out[0, 0], num / den)
    pipe = sample.VOSRPipeline(dit.build("tiny", latent_channels=4, train_grid=4), vae.PixelCodec(2))
    assert pipe.latent_tiles(64, 0, "gaussian") == (32, 4, 1) and pipe.latent_tiles(64, 0, "linear") == (32, 0, 2)


@torch.no_grad()
def test_tiled_vae_equals_untiled_when_one_tile_covers(release):
    ckpts, _, ref = release
    codec = vae.load_codec(str(ckpts / "stable-diffusion-2-1-base"))
    img = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    z = sample.tiled_encode(codec, img, (48, 64), tile=64, overlap=8)
    want = ref["sd_vae"].encode(sample.reflect_crop(img, 0, 0, 48, 64) * 2 - 1).latent_dist.mode() * 0.18215
    torch.testing.assert_close(z, want)
    torch.testing.assert_close(sample.tiled_decode(codec, z, (40, 56), tile=64, overlap=8),
                               ref["sd_vae"].decode(z / 0.18215).sample[..., :40, :56])


# ----------------------------------------------------------------------------- user errors: one line, no traceback

def one_line_error(capsys, argv):
    code = sample.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name,looked_for", [("sd21_lwdecoder.pth", "sd21_lwdecoder.pth"),
                                             ("stable-diffusion-2-1-base", "stable-diffusion-2-1-base"),
                                             ("torch_cache", "torch_cache/checkpoints/dinov2_vitb14_pretrain.pth")])
def test_missing_release_file_names_the_path(release, tmp_path, capsys, name, looked_for):
    import shutil
    ckpts, lr_dir, _ = release
    copy = tmp_path / "ckpts"
    shutil.copytree(ckpts, copy, ignore=shutil.ignore_patterns(name, "VOSR_1.4B_ms", "Qwen-Image-vae-2d"))
    err = one_line_error(capsys, ["--ckpt", str(copy / "VOSR_0.5B_os"), "-i", str(lr_dir), "-o", str(tmp_path / "o")])
    assert f"{copy}/{looked_for}: not found" in err, err


def test_broken_release_files_name_the_file(release, tmp_path, capsys):
    """A truncated light decoder, DiT weights that are not safetensors, an args.json that is not JSON."""
    import shutil
    ckpts, lr_dir, _ = release
    copy = tmp_path / "ckpts"
    shutil.copytree(ckpts, copy, ignore=shutil.ignore_patterns("VOSR_1.4B_ms", "Qwen-Image-vae-2d"))
    model = copy / "VOSR_0.5B_os"
    argv = ["--ckpt", str(model), "-i", str(lr_dir), "-o", str(tmp_path / "o")]
    lw = (copy / "sd21_lwdecoder.pth").read_bytes()
    (copy / "sd21_lwdecoder.pth").write_bytes(lw[:len(lw) // 2])
    assert f"{copy}/sd21_lwdecoder.pth: not a readable" in one_line_error(capsys, argv)
    (copy / "sd21_lwdecoder.pth").write_bytes(lw)
    weights = model / "checkpoints" / "ema_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 100])
    assert f"{weights}: not a readable .safetensors file" in one_line_error(capsys, argv)
    weights.write_bytes(b"not safetensors at all")
    assert f"{weights}: not a readable .safetensors file" in one_line_error(capsys, argv)
    weights.write_bytes(data)
    weights.rename(model / "stored.bin")                               # no *.safetensors anywhere below
    assert f"{model}: no weights (looked for {model}/checkpoints/ema_model.safetensors" in one_line_error(capsys, argv)
    (model / "stored.bin").rename(weights)
    (model / "args.json").write_text("{dim: 64")
    assert f"{model}/args.json: not a readable args.json" in one_line_error(capsys, argv)
    (model / "args.json").write_text(json.dumps(release_args(ae_type="sd3", enc_type="dinov2b", enc_dim=64)))
    assert "ae_type 'sd3'" in one_line_error(capsys, argv)


@torch.no_grad()
def test_light_decoder_none_decodes_with_the_sd_vae(release):
    """--light-decoder none: the SD2.1 VAE's own decoder (post_quant_conv + decoder) instead of the light one."""
    ckpts, _, ref = release
    cfg = sample.SampleConfig(ckpt=str(ckpts / "VOSR_0.5B_os"), device="cpu", light_decoder="none")
    pipe, _ = sample.load_pipeline(cfg, report=lambda s: None)
    z = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pipe.codec.decode(z), ref["sd_vae"].decode(z / 0.18215).sample)


def test_run_dir_semantic_layer_from_config(tmp_path):
    """A run dir's config.json key semantic_layer picks the DINOv2 block; without it, the block by depth."""
    run = tmp_path / "run"
    run.mkdir()
    model = dit.build("tiny", latent_channels=192, enc_dim=384, train_grid=4)
    dit.save_checkpoint(model, str(run / "ema.safetensors"))
    conf = dict(preset="tiny", patch_size=2, codec="pixel", light_decoder=None, semantic="random",
                semantic_size=28, train_grid=4, enc_dim=384)
    for extra, layer in (({"semantic_layer": 3}, 3), ({}, 8)):
        (run / "config.json").write_text(json.dumps({**conf, **extra}))
        pipe, _ = sample.load_pipeline(sample.SampleConfig(ckpt=str(run), device="cpu"), report=lambda s: None)
        assert pipe.semantic.layer == layer
    pipe, _ = sample.load_pipeline(sample.SampleConfig(ckpt=str(run), device="cpu", semantic_layer=5),
                                   report=lambda s: None)
    assert pipe.semantic.layer == 5                                      # the flag wins
    # the LR upscaler follows the run's resize-back: the release's random one is met by PIL bicubic, as there
    for resize_back, upscale in (("bicubic", "torch"), ("release", "pil")):
        (run / "config.json").write_text(json.dumps({**conf, "resize_back": resize_back}))
        pipe, r = sample.load_pipeline(sample.SampleConfig(ckpt=str(run), device="cpu"), report=lambda s: None)
        assert sample.checkpoint_defaults(sample.SampleConfig(), pipe, r).upscale == upscale
        assert sample.checkpoint_defaults(sample.SampleConfig(upscale="torch"), pipe, r).upscale == "torch"


# ----------------------------------------------------------------------------- sample.py flags: one line each

PHOTO = str(ROOT / "checkpoints" / "vosr-small-photo")   # the default one-step student: 64-pixel crop, 4-pixel latents


@pytest.fixture(scope="module")
def lr_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lr_in")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / "a.png")
    return d


@pytest.mark.parametrize("flags,named", [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", "2.5"], "--steps"),
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"),
    (["--scale", "0"], "--scale"), (["--scale", "nan"], "--scale"), (["--shift", "-1"], "--shift"),
    (["--shift", "nan"], "--shift"), (["--alpha", "1.5"], "--alpha"), (["--alpha", "nan"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"), (["--tile", "-1"], "--tile"), (["--tile-overlap", "-1"], "--tile-overlap"),
    (["--tile", "64", "--tile-overlap", "32"], "--tile-overlap"), (["--semantic-size", "30"], "--semantic-size"),
    (["--vae-tile", "-8"], "--vae-tile"), (["--device", "gpu0"], "--device"), (["--color-fix", "auto"], "--color-fix"),
    (["--upscale", "lanczos"], "--upscale"),
])
def test_out_of_range_flag_is_one_line(flags, named, lr_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["-i", str(lr_folder), "-o", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and named in err and flags[-1] in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(lr_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["-i", str(lr_folder), "-o", str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--device" in err and "no CUDA" in err, err


def test_tile_the_model_cannot_use(lr_folder, tmp_path, capsys):
    """The default model (64-pixel training crop, 4-pixel patches): --tile 7 is refused, --tile 62 is
    rounded down to 60 with a note (as VOSRPipeline.tile_sizes rounds), an overlap of half the default
    tile (64, its training crop) is refused."""
    out = tmp_path / "o"
    err = one_line_error(capsys, ["--ckpt", PHOTO, "-i", str(lr_folder), "-o", str(out), "--tile", "7", "--device", "cpu"])
    assert "--tile 7: too small" in err and "at least 32" in err
    err = one_line_error(capsys, ["--ckpt", PHOTO, "-i", str(lr_folder), "-o", str(out), "--tile-overlap", "32",
                                  "--device", "cpu"])
    assert "--tile-overlap 32" in err and "64-pixel tile" in err
    assert sample.main(["--ckpt", PHOTO, "-i", str(lr_folder), "-o", str(out), "--tile", "62", "--device", "cpu"]) == 0
    assert "--tile 62 rounded down to 60" in capsys.readouterr().out
    assert Image.open(out / "a.png").size == (96, 80)


def test_broken_ckpt_is_one_line(tmp_path, lr_folder, capsys):
    import shutil
    argv = lambda ckpt: ["--ckpt", str(ckpt), "-i", str(lr_folder), "-o", str(tmp_path / "o")]  # noqa: E731
    run = tmp_path / "run"
    shutil.copytree(sample.DEFAULT_CKPT, run)
    data = (run / "ema.safetensors").read_bytes()
    (run / "ema.safetensors").write_bytes(data[:len(data) // 2])
    assert f"{run}/ema.safetensors: not a readable .safetensors file" in one_line_error(capsys, argv(run))
    (tmp_path / "x.safetensors").write_text("hello")
    assert f"{tmp_path}/x.safetensors: not a readable" in one_line_error(capsys, argv(tmp_path / "x.safetensors"))
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path}/empty: neither a run dir" in one_line_error(capsys, argv(tmp_path / "empty"))
    assert f"{tmp_path}/nothing: checkpoint not found" in one_line_error(capsys, argv(tmp_path / "nothing"))


def test_ckpt_file_of_a_run_dir_uses_the_run_dir(tmp_path, lr_folder, capsys):
    """--ckpt RUN/ema.safetensors or RUN/ckpt.safetensors (model, EMA, optimiser) with a config.json
    beside it: a note, then the run dir's model and settings; the same PNG as --ckpt RUN."""
    import shutil
    from safetensors.torch import load_file
    run = tmp_path / "run"
    shutil.copytree(PHOTO, run)
    ema = load_file(str(run / "ema.safetensors"))
    save_file({**{k: v + 1 for k, v in ema.items()}, **{f"ema.{k}": v for k, v in ema.items()},
               "opt.step": torch.zeros(1)}, str(run / "ckpt.safetensors"))
    argv = ["-i", str(lr_folder), "--device", "cpu", "--steps", "1"]
    assert sample.main(["--ckpt", str(run), "-o", str(tmp_path / "dir"), *argv]) == 0
    want = read_png(tmp_path / "dir" / "a.png")
    for name, what in (("ema.safetensors", "the EMA weights"),
                       ("ckpt.safetensors", "the training state")):
        out = tmp_path / name
        code = sample.main(["--ckpt", str(run / name), "-o", str(out), *argv])
        assert code == 0, capsys.readouterr().err
        note = (f"sample.py: --ckpt {run / name}: {what} of the run dir {run}: using the run dir "
                f"(its config.json and ema.safetensors), as --ckpt {run}")
        assert note in capsys.readouterr().out
        assert torch.equal(read_png(out / "a.png"), want)


@pytest.mark.parametrize("fix", ["adain", "adain-var", "wavelet", "wavelet-atrous"])
def test_one_pixel_colour_fix_is_the_lr_colour(tmp_path, capsys, recwarn, fix):
    """A 1×1 image at --scale 1: one pixel has no spread (the unbiased std of one value is NaN);
    each colour fix gives the LR↑'s colour (one pixel is all low frequency), no NaN, no warning."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (1, 1), (200, 40, 90)).save(tmp_path / "in" / "p.png")
    code = sample.main(["--ckpt", PHOTO, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                        "--scale", "1", "--color-fix", fix, "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    got = np.asarray(Image.open(tmp_path / "o" / "p.png")).astype(int)
    assert got.shape == (1, 1, 3)
    off = np.abs(got[0, 0] - [200, 40, 90]).max()
    assert off <= (1 if fix == "wavelet" else 0), got             # the release's wavelet truncates
    assert not [w for w in recwarn if "degrees of freedom" in str(w.message)]


def test_user_errors_through_the_real_cli(tmp_path, lr_folder):
    """The same one line from `python sample.py` itself: exit 2, no traceback."""
    (tmp_path / "x.safetensors").write_text("hello")
    for flags, named in ((["--steps", "0"], "--steps"), (["--ckpt", str(tmp_path / "x.safetensors")], "x.safetensors")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "-i", str(lr_folder), "-o", str(tmp_path / "o"),
                            "--device", "cpu", *flags], cwd=ROOT, capture_output=True, text=True)
        err = r.stderr.strip()
        assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and named in err, err


def test_progress_bar_over_steps_and_tiles(lr_folder, tmp_path, capsys, monkeypatch):
    """An image that takes long shows a bar over steps × tiles, and its time; the run ends with s per image."""
    monkeypatch.setattr(sample, "PROGRESS_AFTER", 0.0)
    assert sample.main(["--ckpt", PHOTO, "-i", str(lr_folder), "-o", str(tmp_path / "o"), "--tile", "48",
                        "--tile-overlap", "16", "--steps", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    tiles = len(sample.tile_windows(20, 12, 4, 1)) * len(sample.tile_windows(24, 12, 4, 1))  # 80×96 px, 4-px latents
    assert tiles > 1 and f"0/{2 * tiles}" in captured.err and "steps × tiles" in captured.err
    assert "s per image" in captured.out and f"{tmp_path / 'o' / 'a.png'} (96×80) in " in captured.out


def test_help_describes_every_flag_with_its_default():
    for action in sample.build_parser()._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[-1]
        assert action.help and len(action.help) > 20, flag
        if action.required or isinstance(action, type(sample.build_parser()._actions[0])) or action.const is True:
            continue                                                     # -i (required), store_true flags
        d = action.default
        shown = f"{d:g}" if isinstance(d, float) else str(d)
        assert "default" in action.help and (d is None or f"default: {shown}" in action.help), (flag, action.help)
