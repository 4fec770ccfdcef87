"""Super-resolve images with a VOSR teacher (guided Euler, paper §3.3) or a distilled student (§3.4).

    LR ──bicubic ×scale──► LR↑ ──codec.encode──► c_str          (structural condition)
    LR↑ ──semantic encoder──► c_sem                               (semantic condition)
    z_1 ~ N(0, I) ──Euler, t: 1 → 0, guided velocity (eq. 2)──► z_0 ──codec.decode──► SR

Teacher: v = v_pcond + s·(v_cond − v_pcond)   (eq. 2), both branches in one batch of 2B;
         v_cond = v(z, t | c_str, c_sem), v_pcond = v(z, t | α·c_str, ∅), α = 0.15.
Student: one branch only (guidance was baked in by ω during distillation); each step predicts
         f(z, t_i, r = t_{i+1}) and jumps z ← z − (t_i − t_{i+1})·f.

Images larger than --tile never pass through a network whole, so memory depends on the tile size:
the codec encodes and decodes overlapping tiles, the DiT predicts the velocity of overlapping latent
tiles, and overlaps are blended at every step. The noise is drawn once for the whole latent, and
the semantic tokens once for the whole image as one token map (DINOv2 on overlapping tile-sized
windows, blended); each tile attends to the crop of that map under it, so neighbours agree.

    python sample.py --ckpt RUN_DIR -i LR_DIR -o OUT_DIR [--steps 25] [--guidance 0.5] [--fast]
    python sample.py --ckpt preset/ckpts/VOSR_0.5B_os -i LR_DIR -o OUT_DIR     (an official release model;
        its conventions become the defaults: PIL upscale, adain colour fix, Gaussian tile blending;
        docs/official_checkpoints.md)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dit
import vae
from degrade import ImageError, find_jobs, read_image, write_image


DEMO_CKPT = Path(__file__).resolve().parent / "checkpoints" / "vosr-small-demo"  # used when --ckpt is omitted
PROGRESS_AFTER = 3.0   # seconds an image may take before its bar (steps × tiles) and its time are shown


@dataclass
class SampleConfig:
    ckpt: str | None = None          # run dir, an official release model folder, or a bare .safetensors
    input: str = ""                  # LR image or folder
    output: str = "out"
    steps: int | None = None         # None: 25 for a teacher, 1 for a student (2, 4 also work)
    guidance: float = 0.5            # s in eq. 2; 1 = full branch, 0 = partial branch
    alpha: float | None = None       # α of the partial branch; None: 0.15 (0 for a standard-CFG run)
    scale: float = 4.0
    seed: int = 0
    tile: int | None = None          # tile side in output pixels; None: the training crop (512 for the release); 0: off
    tile_overlap: int | None = None  # overlap between tiles in output pixels; None: tile / 8
    semantic_tiles: str = "global"   # global | per-tile | whole (see VOSRPipeline.tile_semantics)
    # None below: the checkpoint's convention (the official release's for a release folder, see checkpoint_defaults)
    color_fix: str | None = None     # none | adain | wavelet
    upscale: str | None = None       # torch | pil
    tile_blend: str | None = None    # linear | gaussian
    vae_tile: int | None = None      # tile side of the codec in output pixels; None: --tile; 0: the whole image
    latent: str = "mean"             # mean | sample: c_str from the codec posterior's mean or a sample
    schedule: str = "uniform"        # uniform | cosine
    shift: float = 1.0               # time shift of the schedule; > 1: larger last steps, closer to the mean
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    bf16: bool = False
    # what a run dir records in config.json and a release folder in args.json; given explicitly, they win
    preset: str = "0.5B"             # bare .safetensors only
    codec: str | None = None         # 'pixel', 'pixel4' or a diffusers VAE folder; bare file: 'pixel'
    light_decoder: str | None = None  # the light decoder file, or 'none' (the VAE's own decoder)
    semantic: str | None = None      # 'none', 'random' or a DINOv2 weights file; bare file: 'none'
    semantic_size: int | None = None  # DINOv2 input side; bare file: 448
    semantic_layer: int | None = None  # DINOv2 block of c_sem; None: the checkpoint's, else by depth (8 of 12, 17 of 24)
    student: bool | None = None      # None: decided by the checkpoint (has r_embedder ⇒ student)
    # fast paths (FastPaths); the output does not change
    fast: bool = False               # = --reuse-semantics --channels-last
    reuse_semantics: bool = False
    channels_last: bool = False
    compile: str | None = None       # torch.compile mode, e.g. "default", "max-autotune"
    cuda_graphs: bool = False


# ----------------------------------------------------------------------------- guidance (eq. 2)

def guided_velocity(model, z, t, c_str, c_sem, guidance_scale=0.5, alpha=0.15, r=None, kv=None):
    """v = v_pcond + s·(v_cond − v_pcond) (eq. 2); both branches run as one batch of 2B.

    kv: the semantic keys/values already projected for this batch layout (branch_keys), used instead of
    c_sem; the sampler's fast path computes them once per image instead of at every step."""
    proj = {} if kv is None else {"c_sem_proj": kv}                 # plain path: the model projects c_sem
    if guidance_scale == 1.0:  # pure full branch: skip the partial one
        return model(torch.cat([c_str, z], 1), t, c_sem, r, **proj)
    x = torch.cat([torch.cat([c_str, z], 1), torch.cat([alpha * c_str, z], 1)])  # (2B, 2C, h, w)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])  # ∅ = zero tokens
    rr = None if r is None else r.repeat(2)
    v_cond, v_pcond = model(x, t.repeat(2), sem, rr, **proj).chunk(2)
    return v_pcond + guidance_scale * (v_cond - v_pcond)


def branch_keys(model, c_sem, batch: int, guidance_scale: float = 0.5):
    """c_sem projected by the DiT (LayerNorm → MLP, paper Fig. 2) in guided_velocity's batch layout: (B, N, d)
    for the full branch alone (s = 1, or a student), else (2B, N, d) = [c_sem; ∅]. Depends on c_sem only,
    not on z or t, so it is the same at every step."""
    if guidance_scale == 1.0:
        return model.project_semantics(c_sem, batch)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])
    return model.project_semantics(sem, 2 * batch)


def timesteps(n: int, schedule: str = "uniform", shift: float = 1.0) -> torch.Tensor:
    """t_0 = 1 > t_1 > … > t_n = 0 (uniform, or t_i = cos(π/2 · i/n)), then shifted: t ← σt / (1 + (σ − 1)t).

    The shift σ is SD3's (Esser et al. 2024) for rectified flows. σ > 1 spends more of the n steps at high
    noise and makes the last steps larger; an Euler step to t = 0 lands on the model's mean estimate of x0
    given z_t, so a larger last step invents less fine detail: higher PSNR, softer texture."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    i = torch.arange(n + 1, dtype=torch.float64) / n
    t = 1 - i if schedule == "uniform" else torch.cos(math.pi / 2 * i)
    t = shift * t / (1 + (shift - 1) * t)
    t[-1] = 0.0
    return t.float()


@torch.no_grad()
def euler_sample(velocity, z1: torch.Tensor, ts: torch.Tensor, progress: bool = False, inplace: bool = False):
    """Integrate dz/dt = v from t = 1 to 0: z ← z − (t_i − t_{i+1})·v(z, t_i, t_{i+1}).

    inplace=True overwrites z1 (one latent-sized buffer fewer on large images)."""
    z = z1 if inplace else z1.clone()
    ts = ts.tolist()  # python floats: the loop never reads a tensor back from the device
    for i in tqdm(range(len(ts) - 1), disable=not progress, leave=False, desc="steps"):
        t, r = ts[i], ts[i + 1]
        tt = torch.full((z.shape[0],), t, device=z.device)
        rr = torch.full((z.shape[0],), r, device=z.device)
        z.sub_(velocity(z, tt, rr).float(), alpha=t - r)
    return z


# ----------------------------------------------------------------------------- tiling
# Large images never go through a network in one piece. The codec encodes and decodes tiles, the DiT
# predicts the velocity of latent tiles, and overlapping outputs are cross-faded with weights that sum to
# one at every position. What still grows with the image: the upscaled input and the output (3 floats
# per pixel each), the latents c_str, z and the blended velocity (C/f² floats per pixel each) and the
# semantic token map; everything else is the size of one tile.

def tile_windows(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of windows of length `tile` covering [0, size), last one flush with the end."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def blend_weights(starts: list[int], n: int, size: int, fade: int, device=None, kind: str = "linear") -> list[torch.Tensor]:
    """1-D weights of the windows [s, s+n) of an axis that sum to 1 at every position.

    linear:   ramps over `fade` cells at each edge shared with another window, flat elsewhere, so two
              tiles cross-fade across their overlap and an image edge is never faded;
    gaussian: the official release's window, exp(−(i − c)² / 2σ²) centred on the window, c = (n − 1)/2,
              σ = 0.1·n, whatever the overlap (gaussian_window).
    Either is divided by the sum of all windows' weights at each position. The 2-D weight of tile (i, j)
    is wy[i] ⊗ wx[j]; the grid of tiles is a product, so those also sum to 1 (no weight map)."""
    i = torch.arange(n, dtype=torch.float32)
    ws = []
    for s in starts:
        if kind == "gaussian":
            w = gaussian_window(n)
        else:
            w = torch.ones(n)
            if s > 0:
                w = torch.minimum(w, (i + 1) / (fade + 1))
            if s + n < size:
                w = torch.minimum(w, (n - i) / (fade + 1))
        ws.append(w)
    total = torch.zeros(size)
    for s, w in zip(starts, ws):
        total[s:s + n] += w
    return [(w / total[s:s + n]).to(device) for s, w in zip(starts, ws)]


def gaussian_window(n: int) -> torch.Tensor:
    """exp(−(i − (n − 1)/2)² / (2·(0.1·n)²)), i = 0 … n − 1: the official release's tile weight (unnormalised)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-(i - (n - 1) / 2) ** 2 / (2 * (0.1 * n) ** 2)).float()


@functools.lru_cache(maxsize=16)
def _tile_plan(H: int, W: int, tile: int, overlap: int, align: int, device: torch.device, blend: str = "linear"):
    """Windows and blend weights of `tiled`. Cached: the sampler asks for the same plan at every step, and
    building it copies the weights to the device, which on CUDA waits for the GPU (a host-device sync)."""
    ys, xs = tile_windows(H, tile, overlap, align), tile_windows(W, tile, overlap, align)
    th, tw = min(tile, H), min(tile, W)
    if len(ys) == 1 and len(xs) == 1:
        return ys, xs, th, tw, None, None
    return (ys, xs, th, tw, blend_weights(ys, th, H, overlap, device, blend),
            blend_weights(xs, tw, W, overlap, device, blend))


def tiled(fn, z: torch.Tensor, tile: int, overlap: int, align: int = 2, blend: str = "linear"):
    """Apply fn(z_window, (y, x, h, w)) -> tensor of the window's shape on overlapping tiles and blend."""
    H, W = z.shape[-2:]
    ys, xs, th, tw, wy, wx = _tile_plan(H, W, tile, overlap, align, z.device, blend)
    if wy is None:
        return fn(z, (0, 0, H, W))
    out = torch.zeros_like(z, dtype=torch.float32)
    for y, a in zip(ys, wy):
        for x, b in zip(xs, wx):
            out[..., y:y + th, x:x + tw] += fn(z[..., y:y + th, x:x + tw], (y, x, th, tw)).float() * (a[:, None] * b)
    return out


def tile_count(H: int, W: int, tile: int, overlap: int, align: int) -> int:
    """How many tiles `tiled` runs on an (H, W) latent."""
    return len(tile_windows(H, tile, overlap, align)) * len(tile_windows(W, tile, overlap, align))


def _crop(img: torch.Tensor, y: int, x: int, h: int, w: int) -> torch.Tensor:
    """img[..., y:y+h, x:x+w] of the image reflect-padded at the bottom and right, built for this window only."""
    H, W = img.shape[-2:]
    if y + h <= H and x + w <= W:
        return img[..., y:y + h, x:x + w]

    def index(start, n, size):  # reflect: size, size+1, … ↦ size−2, size−3, … (clamped for tiny images)
        i = torch.arange(start, start + n, device=img.device)
        return torch.where(i < size, i, 2 * (size - 1) - i).clamp(0, size - 1)
    ri, ci = index(y, h, H), index(x, w, W)
    sub = img[..., ri.min():ri.max() + 1, ci.min():ci.max() + 1]   # the rows/columns the window needs
    return sub.index_select(-2, ri - ri.min()).index_select(-1, ci - ci.min())


@torch.no_grad()
def tiled_encode(codec, img: torch.Tensor, size: tuple[int, int], tile: int = 512, overlap: int = 64, encode=None,
                 generator: torch.Generator | None = None):
    """img (B,3,H,W) in [0,1] reflect-padded to size = (H', W') → latent (B,C,H'/f,W'/f), tile by tile.

    Posterior means by default (overlapping tiles then agree); generator: posterior samples drawn from it
    instead (the official release samples). The pixel codec maps every f×f block on its own: its tiles need
    no overlap and are copied, which makes tiling exact.
    encode: what encodes one tile; default codec.encode (the pipeline passes a compiled one on its fast path)."""
    base = encode or codec.encode
    encode = lambda x: base(x, generator=generator, mode=generator is None)  # noqa: E731
    f, (Hp, Wp) = codec.factor, size
    exact = isinstance(codec, vae.PixelCodec)
    tile, overlap = max(f, tile // f * f), (0 if exact else overlap // f * f)
    ys, xs = tile_windows(Hp, tile, overlap, f), tile_windows(Wp, tile, overlap, f)
    th, tw = min(tile, Hp), min(tile, Wp)
    if len(ys) == 1 and len(xs) == 1:
        return encode(_crop(img, 0, 0, Hp, Wp) * 2 - 1)
    wy = blend_weights([y // f for y in ys], th // f, Hp // f, overlap // f, img.device)
    wx = blend_weights([x // f for x in xs], tw // f, Wp // f, overlap // f, img.device)
    z = None
    for y, a in zip(ys, wy):
        for x, b in zip(xs, wx):
            piece = encode(_crop(img, y, x, th, tw) * 2 - 1)  # (B, C, th/f, tw/f)
            if z is None:
                z = piece.new_zeros(*piece.shape[:2], Hp // f, Wp // f)
            win = z[..., y // f:(y + th) // f, x // f:(x + tw) // f]
            win.copy_(piece) if exact else win.add_(piece * (a[:, None] * b))
    return z


@torch.no_grad()
def tiled_decode(codec, z: torch.Tensor, size: tuple[int, int], tile: int = 512, overlap: int = 64, decode=None):
    """Latent (B,C,h,w) → image (B,3,H,W) in [-1,1] (H ≤ f·h, W ≤ f·w), decoded tile by tile into the output.

    decode: what decodes one tile; default codec.decode (the pipeline passes a compiled one on its fast path)."""
    decode = decode or codec.decode
    f, (H, W), (h, w) = codec.factor, size, z.shape[-2:]
    exact = isinstance(codec, vae.PixelCodec)
    tile, overlap = max(1, tile // f), (0 if exact else overlap // f)
    ys, xs = tile_windows(h, tile, overlap, 1), tile_windows(w, tile, overlap, 1)
    th, tw = min(tile, h), min(tile, w)
    if len(ys) == 1 and len(xs) == 1:
        return decode(z).float()[..., :H, :W]
    wy = blend_weights([y * f for y in ys], th * f, h * f, overlap * f, z.device)
    wx = blend_weights([x * f for x in xs], tw * f, w * f, overlap * f, z.device)
    out = z.new_zeros(z.shape[0], 3, H, W, dtype=torch.float32)
    for y, a in zip(ys, wy):
        for x, b in zip(xs, wx):
            piece = decode(z[..., y:y + th, x:x + tw]).float()  # (B, 3, f·th, f·tw)
            y0, x0 = y * f, x * f
            ph, pw = min(H - y0, f * th), min(W - x0, f * tw)      # the part inside the output
            win, piece = out[..., y0:y0 + ph, x0:x0 + pw], piece[..., :ph, :pw]
            win.copy_(piece) if exact else win.add_(piece * (a[:ph, None] * b[:pw]))
    return out


def _round(v: float) -> int:
    return math.floor(v + 0.5)


@torch.no_grad()
def semantic_token_map(semantic, img: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """c_sem of the whole image as one token map (B, Gh, Gw, dim), `semantic.grid` tokens per tile side.

    DINOv2 sees overlapping tile-sized windows, each resized to its image_size as in training, and their
    tokens are cross-faded into the map; an image that fits in one tile gets exactly semantic(img).
    Every DiT tile then reads the block of the map under it (crop_tokens), so neighbours share tokens."""
    B, _, H, W = img.shape
    g = semantic.grid
    th, tw = min(tile, H), min(tile, W)
    if th == H and tw == W:
        return semantic(img).unflatten(1, (g, g))
    Gh, Gw = _round(H * g / th), _round(W * g / tw)
    ys, xs = tile_windows(H, th, overlap, 1), tile_windows(W, tw, overlap, 1)
    oys = [min(_round(y * Gh / H), Gh - g) for y in ys[:-1]] + [Gh - g]  # token offsets of the windows
    oxs = [min(_round(x * Gw / W), Gw - g) for x in xs[:-1]] + [Gw - g]
    wy = blend_weights(oys, g, Gh, _round(overlap * g / th), img.device)
    wx = blend_weights(oxs, g, Gw, _round(overlap * g / tw), img.device)
    tmap = None
    for y, oy, a in zip(ys, oys, wy):
        for x, ox, b in zip(xs, oxs, wx):
            tokens = semantic(img[..., y:y + th, x:x + tw]).unflatten(1, (g, g)).float()  # (B, g, g, dim)
            if tmap is None:
                tmap = tokens.new_zeros(B, Gh, Gw, tokens.shape[-1])
            tmap[:, oy:oy + g, ox:ox + g] += tokens * (a[:, None] * b)[None, :, :, None]
    return tmap


def crop_tokens(tmap: torch.Tensor, y: int, x: int, size: tuple[int, int], g: int) -> torch.Tensor:
    """The g×g tokens (B, g·g, dim) of a map (B, Gh, Gw, dim) under the tile at pixel (y, x) of an image of `size`."""
    Gh, Gw = tmap.shape[1:3]
    oy, ox = min(_round(y * Gh / size[0]), Gh - g), min(_round(x * Gw / size[1]), Gw - g)
    return tmap[:, oy:oy + g, ox:ox + g].flatten(1, 2)


# ----------------------------------------------------------------------------- colour correction

# As the official release defines them (the colour fixes SR releases share, from StableSR): computed on the
# clamped 8-bit output against the upscaled LR (color_fix_of below quantises both first).

def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and std to the reference's: (sr − μ_sr)/σ_sr · σ_ref + μ_ref, where
    σ = sqrt(unbiased variance + eps) over the pixels of one channel."""
    def stats(x):
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]
    (mu_s, sd_s), (mu_r, sd_r) = stats(sr), stats(ref)
    return (sr - mu_s) / sd_s * sd_r + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Coarsest level of an à-trous wavelet decomposition: the 3×3 binomial kernel dilated by 1, 2, 4, 8, 16,
    each on the edge-replicated (replicate-padded) image."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Keep the output's high frequencies and take the low frequencies (colour, tone) from the input:
    sr − low(sr) + low(ref) (the sum of the five detail levels of sr, plus the reference's residual)."""
    return sr - _low_pass(sr) + _low_pass(ref)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the nearest of the 256 8-bit levels (what an 8-bit file of x holds)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def color_fix_of(sr: torch.Tensor, ref: torch.Tensor | None, method: str) -> torch.Tensor:
    """The colour fix `method` of the clamped 8-bit output against the 8-bit upscaled LR, clamped to [0, 1]."""
    if ref is None or method == "none":
        return sr.clamp(0, 1)
    return COLOR_FIX[method](quantize8(sr), quantize8(ref)).clamp(0, 1)


COLOR_FIX = {"none": lambda sr, ref: sr, "adain": adain_color_fix, "wavelet": wavelet_color_fix}
SEMANTIC_TILES = ("global", "per-tile", "whole")
UPSCALE = ("torch", "pil")
TILE_BLEND = ("linear", "gaussian")
LATENT = ("mean", "sample")


def upscale_lr(lr: torch.Tensor, size: tuple[int, int], how: str = "torch") -> torch.Tensor:
    """LR (B,3,h,w) in [0,1] → (B,3,H,W) in [0,1], the LR↑ that is encoded into c_str and seen by DINOv2.

    torch: bicubic (a = −0.75) in float, clamped: what our training's resize-back does (train_teacher.py).
    pil:   the official release: the 8-bit image resized with PIL's BICUBIC (a = −0.5), so LR↑ is 8-bit too."""
    if how == "torch":
        return F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False).clamp_(0, 1)
    import numpy as np
    from PIL import Image
    out = []
    for img in lr:
        arr = img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        up = Image.fromarray(arr, "RGB").resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1))
    return torch.stack(out).to(lr.device, torch.float32).div_(255)


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class FastPaths:
    """Speed-ups of VOSRPipeline, all off by default. None changes what is computed, only how: each is
    compared with the plain path in tests/test_bench.py. --fast turns on the first two."""
    reuse_semantics: bool = False      # project c_sem (DiT LayerNorm → MLP) once per image and tile, not at
                                       # every step for both branches: it does not depend on z or t
    channels_last: bool = False        # conv codecs hold NHWC weights, the layout cuDNN's fastest kernels use
    compile: str | None = None         # torch.compile mode for the DiT and the decoder ("default", "max-autotune")
    cuda_graphs: bool = False          # replay the DiT as CUDA graphs (compile "reduce-overhead"); CUDA only:
                                       # meant for fixed shapes, e.g. the one-step student at one tile size
    compile_backend: str = "inductor"  # tests use "aot_eager": the same graphs, no generated code

    @classmethod
    def from_config(cls, cfg: SampleConfig) -> "FastPaths":
        """The fast paths the sample.py flags ask for."""
        return cls(reuse_semantics=cfg.fast or cfg.reuse_semantics, channels_last=cfg.fast or cfg.channels_last,
                   compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


def _untimed(stage: str):
    """The stage clock of an untimed call: does nothing."""
    return contextlib.nullcontext()


class VOSRPipeline:
    """LR image (B,3,h,w) in [0,1] → SR image (B,3,round(S·h),round(S·w)) in [0,1]."""

    def __init__(self, model, codec, semantic=None, student: bool = False, device="cpu", bf16=False,
                 fast: FastPaths | None = None):
        self.model, self.codec, self.semantic = model.eval(), codec, semantic
        self.student, self.device, self.bf16 = student, torch.device(device), bf16
        self.enable(fast or FastPaths())

    def enable(self, fast: FastPaths):
        """Use these fast paths from now on. channels_last converts the codec in place."""
        if fast.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.fast = fast
        self.net, self.encode, self.decode = self.model, self.codec.encode, self.codec.decode  # what the sampler calls
        if fast.channels_last:
            self.codec.to(memory_format=torch.channels_last)          # 4-D (conv) weights only; no-op for pixel
        if fast.compile or fast.cuda_graphs:
            mode = None if fast.compile in (None, "default") else fast.compile
            dit_mode = mode
            if fast.cuda_graphs:                                      # the compile modes that capture CUDA graphs
                dit_mode = "max-autotune" if (mode or "").startswith("max-autotune") else "reduce-overhead"

            def compiled(fn, mode):
                """fn under torch.compile; a mode means something to the inductor backend only."""
                return torch.compile(fn, backend=fast.compile_backend,
                                     **({"mode": mode} if fast.compile_backend == "inductor" else {}))
            self.net = compiled(self.model, dit_mode)
            if any(True for _ in self.codec.parameters()):            # the pixel codec has nothing to compile
                self.encode, self.decode = compiled(self.codec.encode, mode), compiled(self.codec.decode, mode)
        return self

    def autocast(self):
        """bf16 autocast of every network (codec, semantic encoder, DiT) when bf16 is on; a no-op otherwise."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def __call__(self, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15, generator=None,
                 tile=None, tile_overlap=None, color_fix="none", schedule="uniform", shift=1.0,
                 progress=False, semantic_tiles="global", timer=None, upscale="torch", tile_blend="linear",
                 vae_tile=None, latent="mean"):
        """tile, tile_overlap in output pixels (None: see tile_sizes; tile 0: no tiling, one window).
        semantic_tiles: global | per-tile | whole, see tile_semantics. upscale: torch | pil, see upscale_lr.
        tile_blend: linear | gaussian, see velocity. vae_tile: tile side of the codec (None: tile; 0: whole).
        latent: mean | sample of the codec's posterior for c_str (sample: drawn from `generator`).
        color_fix: none | adain | wavelet, see color_fix_of.
        progress: a bar over steps × tiles, shown once the image has taken PROGRESS_AFTER seconds.
        timer: a StageTimer (evaluate.py) that gets the wall time of each stage (encode, semantic, dit, decode)."""
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        for name, value, allowed in (("semantic_tiles", semantic_tiles, SEMANTIC_TILES), ("upscale", upscale, UPSCALE),
                                     ("tile_blend", tile_blend, TILE_BLEND), ("latent", latent, LATENT),
                                     ("color_fix", color_fix, tuple(COLOR_FIX))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        stage = timer or _untimed
        unit = self.codec.factor * self.model.patch_size
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        if tile == 0:                                                  # no tiling: one window covers all
            tile = max(H + -H % unit, W + -W % unit)
        tile, tile_overlap = self.tile_sizes(tile, tile_overlap)
        vae_tile = tile if vae_tile is None else vae_tile or max(H + -H % unit, W + -W % unit)
        with stage("encode"):
            lr_up, c_str = self.condition(lr, scale, vae_tile, tile_overlap, upscale,
                                          generator if latent == "sample" else None)

        with stage("semantic"), self.autocast():
            sem_of = self.tile_semantics(lr_up, tile, semantic_tiles)  # (y, x, h, w) in pixels -> c_sem
        ref = lr_up if color_fix != "none" else None
        del lr_up                                                      # freed unless still needed

        with stage("dit"):
            z1 = torch.randn(c_str.shape, generator=generator, dtype=torch.float32).to(self.device)  # one draw
            n_tiles = tile_count(*c_str.shape[-2:], *self.latent_tiles(tile, tile_overlap, tile_blend))
            with tqdm(total=steps * n_tiles, desc="steps × tiles", unit="tile", leave=False, delay=PROGRESS_AFTER,
                      disable=not progress) as bar:
                velocity = self.velocity(c_str, sem_of, tile, tile_overlap, guidance, alpha, tile_blend,
                                         tick=bar.update if progress else None)
                z0 = euler_sample(velocity, z1, timesteps(steps, schedule, shift), inplace=True)
            del z1, c_str, sem_of, velocity

        with stage("decode"), self.autocast():
            sr = tiled_decode(self.codec, z0, (H, W), vae_tile, tile_overlap, self.decode).add_(1).div_(2)  # (B,3,H,W)
            return color_fix_of(sr, ref, color_fix)

    def tile_sizes(self, tile=None, overlap=None) -> tuple[int, int]:
        """(tile, overlap) in output pixels; None: the training crop train_grid·patch·factor (512 for the
        release: RoPE then sees integer positions) and 1/8 of the tile. Whole latent patches."""
        unit = self.codec.factor * self.model.patch_size
        tile = max(unit, (self.model.train_grid * unit if tile is None else tile) // unit * unit)
        return tile, min(tile // 8 if overlap is None else overlap, tile // 2)

    def latent_tiles(self, tile: int, overlap: int, blend: str = "linear") -> tuple[int, int, int]:
        """(tile, overlap, align) of the DiT's windows in latent pixels, from output pixels.

        linear: windows start on whole latent patches. gaussian (the official release): the overlap is raised
        to at least tile/8, windows start every tile − overlap latent pixels (range(0, size − tile + 1, stride),
        plus one flush with the end when that does not reach it; the usual sliding-window convention)."""
        f, p = self.codec.factor, self.model.patch_size
        if blend == "gaussian":
            return tile // f, max(overlap // f, tile // f // 8), 1
        return tile // f, overlap // f, p

    def condition(self, lr, scale: float, tile: int, overlap: int, upscale: str = "torch", generator=None):
        """LR (B,3,h,w) → (lr_up (B,3,H,W), c_str (B,C,H'/f,W'/f)) with H = round(scale·h), H' = H padded
        (reflect) to whole latent patches. The model was trained on the resized-back LR (paper §3.1), so the
        LR is resized to the output size (upscale_lr) before it is encoded, tile by tile (posterior means, or
        samples drawn from generator)."""
        lr = lr.to(self.device, torch.float32)
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        lr_up = upscale_lr(lr, (H, W), upscale)
        unit = self.codec.factor * self.model.patch_size
        size = (H + -H % unit, W + -W % unit)
        with self.autocast():
            return lr_up, tiled_encode(self.codec, lr_up, size, tile, overlap, self.encode, generator).float()

    def velocity(self, c_str, sem_of, tile: int, overlap: int, guidance: float, alpha: float,
                 blend: str = "linear", tick=None):
        """v(z, t, r) of the whole latent: the DiT on overlapping latent tiles (tile_velocity), blended (linear
        cross-fades, or the official release's Gaussian windows; latent_tiles). tick(): called after each tile."""
        on_tile = self.tile_velocity(c_str, sem_of, guidance, alpha)
        lt, lo, align = self.latent_tiles(tile, overlap, blend)

        def one(zw, win, t, r):
            v = on_tile(zw, win, t, r)
            if tick is not None:
                tick()
            return v
        return lambda z, t, r: tiled(lambda zw, win: one(zw, win, t, r), z, lt, lo, align=align, blend=blend)

    def tile_velocity(self, c_str, sem_of, guidance: float, alpha: float):
        """v of one latent window: a function (z_window, (y, x, h, w) in latent pixels, t, r) -> velocity.

        Teacher: guided velocity of both branches (eq. 2); student: one branch, full conditioning, r = next
        time (paper §3.4). On the reuse_semantics fast path each tile's c_sem is projected at the first step
        and kept (one (2B, N, d) tensor per tile) instead of being projected again at every step."""
        f = self.codec.factor
        s = 1.0 if self.student else guidance                          # s = 1: the full branch alone
        keys = {}                                                      # window -> projected c_sem

        def on_tile(zw, win, t, r):
            y, x, h, w = win
            cw = c_str[..., y:y + h, x:x + w]
            with self.autocast():
                if self.fast.reuse_semantics:
                    if win not in keys:
                        keys[win] = branch_keys(self.model, sem_of(y * f, x * f, h * f, w * f), zw.shape[0], s)
                    sw, kv = None, keys[win]
                else:
                    sw, kv = sem_of(y * f, x * f, h * f, w * f), None
                if self.fast.cuda_graphs:  # the previous replay's outputs are consumed: its buffers may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                if self.student:                                       # s = 1: one branch, with r
                    return guided_velocity(self.net, zw, t, cw, sw, 1.0, r=r, kv=kv)
                return guided_velocity(self.net, zw, t, cw, sw, guidance, alpha, kv=kv)
        return on_tile

    def tile_semantics(self, lr_up: torch.Tensor, tile: int, mode: str = "global"):
        """c_sem of each tile: a function (y, x, h, w) in output pixels -> (B, N, dim), or None.

        global:   one token map of the whole image, each tile reads the crop under it (semantic_token_map);
        per-tile: DINOv2 on each tile's own pixels, as a tile-by-tile run of the released code would;
        whole:    every tile attends to all tokens of the whole image resized to image_size²."""
        if self.semantic is None:
            return lambda *win: None
        if mode == "whole":
            c_sem = self.semantic(lr_up)                               # (B, grid², dim)
            return lambda *win: c_sem
        if mode == "global":
            tmap, size = semantic_token_map(self.semantic, lr_up, tile, tile // 2), tuple(lr_up.shape[-2:])
            return lambda y, x, h, w: crop_tokens(tmap, y, x, size, self.semantic.grid)
        cache = {}                                                     # computed at the first step

        def per_tile(y, x, h, w):
            if (y, x) not in cache:
                cache[(y, x)] = self.semantic(lr_up[..., y:y + h, x:x + w])
            return cache[(y, x)]
        return per_tile


# ----------------------------------------------------------------------------- loading checkpoints
# Three kinds of --ckpt: a run dir of train_teacher.py / distill.py (config.json + ema.safetensors), a model
# folder of the official release (args.json + weights, its codec and DINOv2 files beside it in the same
# parent, as its README lays them out under preset/ckpts/), or a bare .safetensors with the flags.

class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message names the file and what is wrong."""


# What the official release's inference scripts do, used as the defaults for its model folders.
RELEASE_CONVENTIONS = dict(color_fix="adain", upscale="pil", tile_blend="gaussian")
RELEASE_WEIGHT_DIRS = ("clean_weights", "checkpoints", ".")
RELEASE_WEIGHT_NAMES = ("ema_model.safetensors", "model.safetensors")
RELEASE_DINOV2 = {"dinov2b": ("dinov2_vitb14_pretrain.pth", 768), "dinov2l": ("dinov2_vitl14_pretrain.pth", 1024)}
RELEASE_LATENT_CHANNELS = {"sd2": 4, "qwen": 16}


def release_weights(folder: Path) -> Path:
    """The weights file of a release model folder, found as the official release finds it: the first of
    clean_weights/, checkpoints/, the folder itself that holds ema_model.safetensors or model.safetensors;
    else the first *.safetensors below the folder."""
    for sub in RELEASE_WEIGHT_DIRS:
        for name in RELEASE_WEIGHT_NAMES:
            if (folder / sub / name).is_file():
                return folder / sub / name
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder}: no weights (looked for {folder}/checkpoints/ema_model.safetensors, "
                              f"…/model.safetensors in clean_weights/, checkpoints/, the folder, then any *.safetensors)")
    return found[0]


def _beside(folder: Path, name: str, what: str, flag: str) -> str:
    """parent/name of a release model folder, or a CheckpointError naming the path looked for."""
    path = folder.parent / name
    if not path.exists():
        raise CheckpointError(f"{path}: not found ({what}; put it beside {folder.name}/ or give {flag})")
    return str(path)


def read_release_folder(folder: Path, cfg: SampleConfig) -> tuple[dict, Path, list[str]]:
    """(run settings, weights file, lines saying what was loaded from where) of a release model folder.

    args.json (its training arguments) gives the DiT shape, the latent channels (ae_type sd2 → 4, qwen → 16),
    the semantic encoder (enc_type, enc_dim, dinov2_size, layer_dinov2b_list), α (the mean of
    weak_cond_strength_aelq_list) and the teacher's step count (infer_steps). Explicit flags win."""
    args_path = folder / "args.json"
    try:
        args = json.loads(args_path.read_text())
        if not isinstance(args, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{args_path}: not a readable args.json ({e})") from None
    ae = args.get("ae_type")
    if ae not in RELEASE_LATENT_CHANNELS:
        raise CheckpointError(f"{args_path}: ae_type {ae!r} is not one of {sorted(RELEASE_LATENT_CHANNELS)}")
    enc = args.get("enc_type")
    if enc not in RELEASE_DINOV2:
        raise CheckpointError(f"{args_path}: enc_type {enc!r} is not one of {sorted(RELEASE_DINOV2)}")
    layers = args.get("layer_dinov2b_list", [8 if enc == "dinov2b" else 17])
    if not (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], int)):
        raise CheckpointError(f"{args_path}: layer_dinov2b_list {layers!r}: one block index expected")
    weights = release_weights(folder)
    run = dict(release=True, args=args, enc_dim=int(args.get("enc_dim", RELEASE_DINOV2[enc][1])),
               semantic_size=cfg.semantic_size or int(args.get("dinov2_size", 448)),
               semantic_layer=layers[0] if cfg.semantic_layer is None else cfg.semantic_layer,
               patch_size=int(args.get("patch_size", 2)), **RELEASE_CONVENTIONS)
    strengths = args.get("weak_cond_strength_aelq_list")
    if isinstance(strengths, list) and strengths:               # the release uses their mean, 0.15
        run["alpha"] = sum(strengths) / len(strengths)
    if isinstance(args.get("infer_steps"), int) and args["infer_steps"] >= 1:
        run["infer_steps"] = args["infer_steps"]
    if ae == "sd2":
        run["codec"] = cfg.codec or _beside(folder, "stable-diffusion-2-1-base", "the SD2.1 VAE of ae_type sd2",
                                            "--codec FOLDER")
        run["light_decoder"] = cfg.light_decoder or _beside(folder, "sd21_lwdecoder.pth",
                                                            "the light decoder of ae_type sd2",
                                                            "--light-decoder FILE or --light-decoder none")
    else:
        run["codec"] = cfg.codec or _beside(folder, "Qwen-Image-vae-2d", "the Qwen-Image VAE of ae_type qwen",
                                            "--codec FOLDER")
        run["light_decoder"] = cfg.light_decoder
    run["semantic"] = cfg.semantic or _beside(folder, f"torch_cache/checkpoints/{RELEASE_DINOV2[enc][0]}",
                                              f"the DINOv2 of enc_type {enc}", "--semantic FILE")
    return run, weights, [f"settings {args_path}"]


def read_run_dir(folder: Path, cfg: SampleConfig) -> tuple[dict, Path, list[str]]:
    """(run settings, weights file, what was loaded) of a train_teacher.py / distill.py run dir."""
    conf_path, weights = folder / "config.json", folder / "ema.safetensors"
    if not conf_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder}: neither a run dir (config.json + ema.safetensors) nor an official "
                              "release model folder (args.json + weights)")
    try:
        run = json.loads(conf_path.read_text())
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{conf_path}: not a readable config.json ({e})") from None
    missing = [k for k in ("preset", "codec", "semantic", "semantic_size", "train_grid") if k not in run]
    if missing:
        raise CheckpointError(f"{conf_path}: missing {', '.join(missing)} (not written by train_teacher.py?)")
    if (folder / run["semantic"]).is_file():  # a random encoder saved inside the run dir
        run["semantic"] = str(folder / run["semantic"])
    for key in ("codec", "light_decoder", "semantic", "semantic_size", "semantic_layer"):
        if getattr(cfg, key) is not None:
            run[key] = getattr(cfg, key)
    return run, weights, [f"settings {conf_path}"]


def weight_shapes(path: Path) -> dict[str, tuple]:
    """{name: shape} from a .safetensors header, or a CheckpointError naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError: truncated, not safetensors, a bad header
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path}: not a readable .safetensors file ({reason})") from None


def _describe_semantic(semantic) -> str:
    if semantic is None:
        return "none"
    name = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L"}.get(semantic.dim, f"{semantic.dim}-wide ViT")
    return f"{name}, block {semantic.layer} of {len(semantic.vit.blocks)}, {semantic.image_size} px"


def load_pipeline(cfg: SampleConfig, report=print) -> tuple[VOSRPipeline, dict]:
    """Build the pipeline from a run dir, an official release model folder, or a bare .safetensors.

    report: gets one line per file loaded (what, from where). Raises CheckpointError (a ValueError) or
    FileNotFoundError with a message naming the file when something cannot be used."""
    if cfg.ckpt is None:
        if not DEMO_CKPT.is_dir():
            raise CheckpointError(f"no --ckpt given and the embedded demo model {DEMO_CKPT} is missing")
        cfg.ckpt = str(DEMO_CKPT)
        report(f"sample.py: no --ckpt given: using the embedded demo model {DEMO_CKPT} (a one-step student, "
               "small preset, pixel codec, trained on 118 photos: a demo, not the paper's model; for real photos "
               "use the released VOSR weights, see README)")
    ckpt = Path(cfg.ckpt)
    if ckpt.is_dir():
        release = (ckpt / "args.json").is_file() and not (ckpt / "config.json").is_file()
        run, weights, loaded = (read_release_folder if release else read_run_dir)(ckpt, cfg)
    elif ckpt.is_file():
        weights, loaded = ckpt, []
        run = dict(preset=cfg.preset, codec=cfg.codec or "pixel", light_decoder=cfg.light_decoder,
                   semantic=cfg.semantic or "none", semantic_size=cfg.semantic_size or 448,
                   semantic_layer=cfg.semantic_layer, train_grid=32)
    else:
        raise CheckpointError(f"{ckpt}: checkpoint not found")
    shapes = weight_shapes(weights)
    light = None if run.get("light_decoder") in (None, "none") else run["light_decoder"]
    codec = vae.load_codec(run["codec"], light_decoder=light, device=cfg.device)
    if not isinstance(codec, vae.PixelCodec):
        loaded.append(f"codec {run['codec']} ({codec.channels} channels, ×{codec.factor})")
    if light:
        loaded.append(f"light decoder {light}")
    semantic = vae.load_semantic(run["semantic"], image_size=run["semantic_size"], device=cfg.device,
                                 layer=run.get("semantic_layer"))
    if semantic is not None and Path(run["semantic"]).is_file():
        loaded.append(f"DINOv2 {run['semantic']} ({_describe_semantic(semantic)})")
    with_r = any(k.startswith("r_embedder.") for k in shapes)
    enc_dim = semantic.dim if semantic is not None else run.get("enc_dim", 768)
    if run.get("release"):
        if semantic is not None and semantic.dim != run["enc_dim"]:
            raise CheckpointError(f"{run['semantic']}: a {semantic.dim}-wide DINOv2, but args.json has enc_dim "
                                  f"{run['enc_dim']}")
        expected = RELEASE_LATENT_CHANNELS[run["args"]["ae_type"]]
        if codec.channels != expected:
            raise CheckpointError(f"{run['codec']}: a {codec.channels}-channel codec, but args.json's ae_type "
                                  f"{run['args']['ae_type']} needs {expected}")
        sem_hidden = shapes.get("mlp_ca.fc1.weight", (0,))[0]
        try:
            conf = dit.release_config(run["args"], codec.channels, enc_dim, with_r, sem_hidden)
        except ValueError as e:
            raise CheckpointError(f"{ckpt / 'args.json'}: {e}") from None
        run.update(preset=conf.preset if conf.preset != "custom" else f"dim {conf.dim}, depth {conf.depth}",
                   train_grid=conf.train_grid)
    else:
        conf = dit.preset_config(run["preset"], latent_channels=codec.channels, with_r=with_r, enc_dim=enc_dim,
                                 train_grid=run["train_grid"], patch_size=run.get("patch_size", 2))
    try:
        model = dit.from_checkpoint(conf, str(weights))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    student = with_r if cfg.student is None else cfg.student
    loaded.insert(0, f"DiT {weights} (dim {model.dim}, depth {model.depth}, "
                     f"{'one-step student' if with_r else 'teacher'})")
    for line in loaded:
        report(f"sample.py: loaded {line}")
    pipe = VOSRPipeline(model.to(cfg.device), codec, semantic, student, cfg.device, cfg.bf16)
    return pipe, run


# ----------------------------------------------------------------------------- CLI

class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (the flag, the value and what is allowed), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def number(kind=float, low=None, high=None, low_open=False):
    """argparse type: a finite `kind` number in [low, high] ((low, high] with low_open); None: unbounded."""
    if low is not None and high is not None:
        need = f" in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        need = f" {'above' if low_open else 'at least'} {low}"
    else:
        need = f" at most {high}" if high is not None else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'}"
                                             f"{need}, got {text}")
        return value
    return parse


def _above(low, kind=float, strict=True):
    """argparse type: a finite `kind` number above `low` (at least `low` when not strict)."""
    return number(kind, low, low_open=strict)


def _semantic_size(text):
    value = number(int, 14)(text)
    if value % 14:
        raise argparse.ArgumentTypeError(f"must be a multiple of DINOv2's 14-pixel patch, got {text}")
    return value


def add_sampler_args(p: argparse.ArgumentParser, d: SampleConfig):
    """The sampler's settings except the guidance scale: shared with evaluate.py sweep (which takes a list of s)."""
    p.add_argument("--steps", type=number(int, 1), default=d.steps,
                   help="Euler steps, at least 1 (default: 1 for a distilled student; for a teacher 25, or a "
                        "release folder's infer_steps; a student also takes 2 or 4)")
    p.add_argument("--alpha", type=number(float, 0, 1), default=d.alpha,
                   help="structural retention α of the partial branch, in [0, 1] (default: 0.15, the middle of "
                        "the training range, or the mean of a release's weak_cond_strength_aelq_list; 0 for a "
                        "run trained with --mode cfg)")
    p.add_argument("--scale", type=number(float, 0, low_open=True), default=d.scale,
                   help=f"output size = round(scale · input size), above 0: 1 restores only, 2, 4 or any "
                        f"fraction (default: {d.scale:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initial noise, per image (default: {d.seed})")
    p.add_argument("--tile", type=number(int, 0), default=d.tile,
                   help="tile side in output pixels (default: the model's training crop, 512 for the release); "
                        "peak memory depends on it, not on the image size; at least half the training crop, rounded down to "
                        "whole latent patches; "
                        "0: no tiling, the whole image in one window (the official scripts' default)")
    p.add_argument("--tile-overlap", type=number(int, 0), default=d.tile_overlap,
                   help="overlap of neighbouring tiles in output pixels, below tile/2 (default: tile/8; "
                        "--tile-blend gaussian raises it to at least tile/8, as the official scripts)")
    p.add_argument("--tile-blend", default=d.tile_blend, choices=TILE_BLEND,
                   help="how overlapping DiT tiles are blended: linear ramps across the overlap, or the official "
                        "scripts' Gaussian window (σ = 0.1 × tile side, centred on the tile) (default: gaussian "
                        "for a release folder, linear otherwise)")
    p.add_argument("--vae-tile", type=number(int, 0), default=d.vae_tile,
                   help="tile side of the codec (VAE) in output pixels (default: --tile); 0: the whole image at "
                        "once, as the official scripts")
    p.add_argument("--semantic-tiles", default=d.semantic_tiles, choices=SEMANTIC_TILES,
                   help="global: one DINOv2 token map for the whole image, each tile attends to its crop; "
                        "per-tile: DINOv2 on each tile's LR crop (the official scripts); whole: every tile "
                        f"attends to all tokens of the whole image resized to the encoder's size (default: {d.semantic_tiles})")
    p.add_argument("--color-fix", default=d.color_fix, choices=sorted(COLOR_FIX),
                   help="colour correction of the clamped 8-bit output against the upscaled LR: per-channel "
                        "mean/std (adain) or low frequencies (wavelet) (default: adain for a release folder, "
                        "as the official scripts; none otherwise)")
    p.add_argument("--upscale", default=d.upscale, choices=UPSCALE,
                   help="how the LR is resized to the output size before encoding: pil (PIL bicubic on the 8-bit "
                        "image, the official scripts) or torch (bicubic in float, what train_teacher.py's "
                        "resize-back does) (default: pil for a release folder or a run trained with --resize-back "
                        "release, torch otherwise)")
    p.add_argument("--latent", default=d.latent, choices=LATENT,
                   help="c_str from the VAE posterior's mean or a sample of it (the official scripts sample) "
                        f"(default: {d.latent})")
    p.add_argument("--schedule", default=d.schedule, choices=["uniform", "cosine"],
                   help=f"the n timesteps from 1 to 0: uniform, or cosine (larger steps near t = 0) (default: {d.schedule})")
    p.add_argument("--shift", type=number(float, 0, low_open=True), default=d.shift,
                   help="time shift σ of the schedule, above 0, t ← σt / (1 + (σ − 1)t) (SD3); 1 = none; "
                        "σ > 1 ends on larger steps, which follow the model's mean: higher PSNR, softer detail "
                        f"(default: {d.shift:g})")


def build_parser() -> argparse.ArgumentParser:
    d = SampleConfig()
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=d.ckpt,
                   help="a run dir of train_teacher.py/distill.py, an official release model folder (e.g. "
                        "preset/ckpts/VOSR_0.5B_os, its codec and DINOv2 files beside it), or a bare .safetensors "
                        f"(default: the embedded demo model {DEMO_CKPT.name}, see README)")
    p.add_argument("-i", "--input", required=True, help="LR image or folder of LR images (required)")
    p.add_argument("-o", "--output", default=d.output,
                   help=f"output folder (same file names, .png), or FILE.png for one input (default: {d.output})")
    p.add_argument("--guidance", type=number(float), default=d.guidance,
                   help="guidance scale s (eq. 2), a finite number: 1 = full branch, 0 = partial; larger is more "
                        f"faithful; a student ignores it (default: {d.guidance:g}; the official scripts' "
                        "argparse default is 2, their README recommends 0.5)")
    add_sampler_args(p, d)
    p.add_argument("--device", default=d.device, help=f"torch device (default: {d.device})")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the codec, semantic encoder and DiT")
    p.add_argument("--student", type=int, choices=[0, 1], default=None,
                   help="force teacher (0) / student (1) sampling (default: from the checkpoint: a student has "
                        "r_embedder weights)")
    g = p.add_argument_group("model files (a run dir records these in config.json, a release folder has them "
                             "beside it; given here, they win)")
    g.add_argument("--preset", default=d.preset, choices=sorted(dit.PRESETS),
                   help=f"DiT preset of a bare .safetensors (default: {d.preset})")
    g.add_argument("--codec", default=d.codec,
                   help="'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder (also the release's "
                        "Qwen-Image-vae-2d/) (default: the checkpoint's; 'pixel' for a bare file)")
    g.add_argument("--light-decoder", default=d.light_decoder,
                   help="lightweight decoder file (.pth with config, or .safetensors), or 'none' for the VAE's own "
                        "decoder (default: the checkpoint's; for a release sd2 model sd21_lwdecoder.pth beside it)")
    g.add_argument("--semantic", default=d.semantic,
                   help="'none', 'random' or a DINOv2 weights file (default: the checkpoint's; 'none' for a bare file)")
    g.add_argument("--semantic-size", type=_semantic_size, default=d.semantic_size,
                   help="DINOv2 input side in pixels, a multiple of 14 (default: the checkpoint's; 448 for a bare file)")
    g.add_argument("--semantic-layer", type=number(int, 0), default=d.semantic_layer,
                   help="0-based DINOv2 block of c_sem (default: the checkpoint's; else by depth: 8 of 12, 17 of 24)")
    g = p.add_argument_group("fast paths (same output; python evaluate.py bench times them)")
    g.add_argument("--fast", action="store_true", help="the safe ones: --reuse-semantics --channels-last")
    g.add_argument("--reuse-semantics", action="store_true",
                   help="project the semantic tokens once per image, not at every step for both branches")
    g.add_argument("--channels-last", action="store_true", help="NHWC conv weights in the codec (faster on GPUs)")
    g.add_argument("--compile", nargs="?", const="default", default=d.compile, metavar="MODE",
                   help="torch.compile the DiT and the decoder (MODE: default, max-autotune, …); the first "
                        "image pays the compilation (default: off)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the DiT as CUDA graphs (fixed shapes: one tile size, e.g. a one-step student); CUDA only")
    return p


def parse_args(argv=None) -> SampleConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.tile and a.tile_overlap is not None and 2 * a.tile_overlap >= a.tile:
        p.error(f"argument --tile-overlap: must be below tile/2 = {a.tile / 2:g}, got {a.tile_overlap}")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        p.error(f"argument --device: {a.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        p.error(f"argument --device: {a.device} asked for, but this machine (or this torch build) has no "
                f"{device.type.upper() if device.type == 'cuda' else device.type}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"argument --device: {a.device} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    a.student = None if a.student is None else bool(a.student)
    return SampleConfig(**vars(a))


def checkpoint_defaults(cfg: SampleConfig, pipe: VOSRPipeline, run: dict) -> SampleConfig:
    """cfg with the settings left to the checkpoint filled in: 1 step for a student, 25 (or a release's
    infer_steps) for a teacher; α = 0.15 (a release's mean weak_cond_strength_aelq), or 0 for a run trained
    with --mode cfg (its auxiliary branch never saw c_str); the colour fix, LR upscaler and tile blending of
    the official scripts for a release folder, else none / torch / linear (the LR upscaler pil for a run
    trained with the release's random resize-back, train_teacher.py --resize-back release, as the release)."""
    steps = cfg.steps if cfg.steps is not None else 1 if pipe.student else run.get("infer_steps", 25)
    alpha = cfg.alpha if cfg.alpha is not None else run.get("alpha", 0.0 if run.get("mode") == "cfg" else 0.15)
    return replace(cfg, steps=steps, alpha=alpha,
                   color_fix=cfg.color_fix or run.get("color_fix", "none"),
                   upscale=cfg.upscale or run.get("upscale", "pil" if run.get("resize_back") == "release" else "torch"),
                   tile_blend=cfg.tile_blend or run.get("tile_blend", "linear"))


def check_tiles(cfg: SampleConfig, pipe: VOSRPipeline, note=print) -> SampleConfig:
    """cfg with --tile rounded down to whole latent patches (with a note); ValueError naming the flag for a tile too
    small for the model (under half its training crop: the DiT would see too few tokens to make sense of
    the image) or an overlap of half the tile or more."""
    unit = pipe.codec.factor * pipe.model.patch_size
    crop = pipe.model.train_grid * unit
    tile = cfg.tile
    if tile:
        if tile < crop // 2:
            raise ValueError(f"--tile {tile}: too small for this model (at least {crop // 2}: half its "
                             f"{crop}-pixel training crop; 0 turns tiling off)")
        if tile % unit:
            tile = tile // unit * unit                  # as VOSRPipeline.tile_sizes rounds it
            note(f"sample.py: --tile {cfg.tile} rounded down to {tile} (whole {unit}-pixel latent patches)")
    resolved = crop if tile is None else tile
    if resolved and cfg.tile_overlap is not None and 2 * cfg.tile_overlap >= resolved:
        raise ValueError(f"--tile-overlap {cfg.tile_overlap}: must be below half the {resolved}-pixel tile")
    return replace(cfg, tile=tile)


def super_resolve(pipe: VOSRPipeline, lr: torch.Tensor, cfg: SampleConfig, progress: bool = False) -> torch.Tensor:
    """pipe(lr) with every sampler setting of cfg; the noise is seeded with cfg.seed for each image."""
    return pipe(lr, cfg.scale, cfg.steps, cfg.guidance, cfg.alpha, torch.Generator().manual_seed(cfg.seed),
                cfg.tile, cfg.tile_overlap, cfg.color_fix or "none", cfg.schedule, cfg.shift, progress=progress,
                semantic_tiles=cfg.semantic_tiles, upscale=cfg.upscale or "torch",
                tile_blend=cfg.tile_blend or "linear", vae_tile=cfg.vae_tile, latent=cfg.latent)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        jobs = find_jobs(cfg.input, cfg.output)   # refuses an output that would overwrite or re-read an input
    except OSError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    try:
        pipe, run = load_pipeline(cfg)
        pipe.enable(FastPaths.from_config(cfg))
        cfg = check_tiles(checkpoint_defaults(cfg, pipe, run), pipe)
    except (OSError, ValueError) as e:            # a missing or unusable file, a setting the model cannot use
        print(f"sample.py: {_first_line(e)}", file=sys.stderr)
        return 2
    print(f"sample.py: {cfg.ckpt} ({run['preset']}, {'student' if pipe.student else 'teacher'}, "
          f"{cfg.steps} step(s), guidance {cfg.guidance:g}, colour fix {cfg.color_fix}, upscale {cfg.upscale}, "
          f"tile blend {cfg.tile_blend}), {len(jobs)} image(s) → {cfg.output}")
    failed, seconds = 0, 0.0
    for src, dst in tqdm(jobs, desc="images", disable=len(jobs) < 2):
        try:
            lr = read_image(src)[None]
        except ImageError as e:
            print(f"sample.py: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        start = time.perf_counter()
        sr = super_resolve(pipe, lr, cfg, progress=True)[0]
        write_image(dst, sr)
        took = time.perf_counter() - start
        seconds += took
        if took > PROGRESS_AFTER:                 # worth a line: the bar over steps × tiles was shown
            tqdm.write(f"sample.py: {dst} ({sr.shape[-1]}×{sr.shape[-2]}) in {took:.1f} s")
    done = len(jobs) - failed
    per = f", {seconds / done:.2f} s per image" if done else ""
    print(f"sample.py: wrote {done} image(s), {failed} failed{per}")
    return 1 if failed == len(jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
