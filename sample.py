"""Super-resolve images with a VOSR teacher (guided Euler, paper §3.3) or a distilled student (§3.4).

    LR ──bicubic ×scale──► LR↑ ──codec.encode──► c_str            (structural condition, §3.1)
    LR↑ ──DINOv2──► c_sem                                         (semantic condition, §3.2)
    z_1 ~ N(0, I) ──Euler, t: 1 → 0, guided velocity (eq. 2)──► z_0 ──codec.decode──► SR (──colour fix──►)

Teacher: v = v_pcond + s·(v_cond − v_pcond) (eq. 2), v_cond = v(z_t, t | c_str, c_sem),
         v_pcond = v(z_t, t | α·c_str, ∅), α = 0.15; both branches in one batch of 2B.
Student: one branch (the guidance was distilled in, §3.4); each step predicts f(z_t, t_i, r = t_{i+1}).
Latents: z_0 = data, z_1 = noise, z_t = (1 − t)·z_0 + t·z_1, velocity v = z_1 − z_0 (eq. 1).

`sample` below is that diagram for an image that fits in one window. `VOSRPipeline` runs the same steps on
overlapping tiles (one loop, `blend_tiles`) so that memory depends on the tile, not on the image: the noise
is drawn once for the whole latent, and (ours) DINOv2 builds one token map of the whole image from which each
tile reads the tokens under it, so neighbours agree.

    python sample.py --ckpt RUN_DIR -i LR_DIR -o OUT_DIR [--steps 25] [--guidance 0.5] [--fast]
    python sample.py --ckpt preset/ckpts/VOSR_0.5B_os -i LR_DIR -o OUT_DIR     (an official release model;
        its conventions become the defaults: PIL upscale, adain colour fix, Gaussian tile blending;
        docs/official_checkpoints.md)
"""
from __future__ import annotations

import argparse
import functools
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
from degrade import OneLineParser
from tools.files import ImageError, find_jobs, read_image, write_image


# ----------------------------------------------------------------------------- the sampler (paper §3.3, §3.4)

def guided_velocity(model, z, t, c_str, c_sem, guidance_scale=0.5, alpha=0.15, r=None, kv=None):
    """v = v_pcond + s·(v_cond − v_pcond) (eq. 2); both branches run as one batch of 2B."""
    # kv: c_sem already projected in this batch layout (branch_keys), the fast path's once-per-image copy
    proj = {} if kv is None else {"c_sem_proj": kv}
    if guidance_scale == 1.0:                                          # s = 1: the full branch alone
        return model(torch.cat([c_str, z], 1), t, c_sem, r, **proj)
    x = torch.cat([torch.cat([c_str, z], 1), torch.cat([alpha * c_str, z], 1)])  # (c_str, c_sem), (α·c_str, ∅)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])  # ∅ = zero tokens
    v_cond, v_pcond = model(x, t.repeat(2), sem, None if r is None else r.repeat(2), **proj).chunk(2)
    return v_pcond + guidance_scale * (v_cond - v_pcond)


def branch_keys(model, c_sem, batch: int, guidance_scale: float = 0.5):
    """c_sem projected by the DiT (LayerNorm → MLP, Fig. 2) in guided_velocity's layout: (B | 2B, N, d)."""
    if guidance_scale == 1.0:                                          # it does not depend on z or t
        return model.project_semantics(c_sem, batch)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])
    return model.project_semantics(sem, 2 * batch)


def timesteps(n: int, schedule: str = "uniform", shift: float = 1.0) -> torch.Tensor:
    """t_0 = 1 > t_1 > … > t_n = 0, uniform or cos(π/2 · i/n), then (ours) SD3's shift t ← σt / (1 + (σ − 1)t)."""
    # σ > 1 spends more steps at high noise and makes the last ones larger; an Euler step to t = 0 lands on
    # the model's mean estimate of z_0, so a larger last step invents less detail: higher PSNR, softer texture
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    i = torch.arange(n + 1, dtype=torch.float64) / n
    t = 1 - i if schedule == "uniform" else torch.cos(math.pi / 2 * i)
    t = shift * t / (1 + (shift - 1) * t)
    t[-1] = 0.0
    return t.float()


@torch.no_grad()
def euler_sample(velocity, z1: torch.Tensor, ts: torch.Tensor, progress: bool = False, inplace: bool = False):
    """Integrate dz/dt = v from t = 1 to 0: z ← z − (t_i − t_{i+1})·v(z, t_i, t_{i+1}); inplace overwrites z1."""
    z = z1 if inplace else z1.clone()
    ts = ts.tolist()                       # python floats: the loop never reads a tensor back from the device
    for i in tqdm(range(len(ts) - 1), disable=not progress, leave=False, desc="steps"):
        t, r = ts[i], ts[i + 1]
        tt, rr = (torch.full((z.shape[0],), v, device=z.device) for v in (t, r))
        z.sub_(velocity(z, tt, rr).float(), alpha=t - r)
    return z


@torch.no_grad()
def sample(model, codec, semantic, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15, generator=None,
           student=False, schedule="uniform", shift=1.0, upscale="torch", latent="mean", color_fix="none"):
    """LR (B,3,h,w) in [0,1] → SR (B,3,round(scale·h),round(scale·w)) in [0,1], every network on the whole image."""
    H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
    unit = codec.factor * model.patch_size                             # output pixels per DiT token
    lr_up = upscale_lr(lr.float(), (H, W), upscale)                    # the model sees the resized-back LR (§3.1)
    padded = reflect_crop(lr_up, 0, 0, H + -H % unit, W + -W % unit)   # whole tokens
    posterior = generator if latent == "sample" else None              # the release samples, we take the mean
    c_str = codec.encode(padded * 2 - 1, generator=posterior, mode=posterior is None).float()
    c_sem = None if semantic is None else semantic(lr_up)              # DINOv2 tokens of LR↑
    z1 = torch.randn(c_str.shape, generator=generator).to(c_str.device)   # z_1 ~ N(0, I)
    if student:      # one branch, r = the next time: the guidance was distilled in (§3.4)
        velocity = lambda z, t, r: guided_velocity(model, z, t, c_str, c_sem, 1.0, r=r)  # noqa: E731
    else:            # restoration-oriented guidance (eq. 2)
        velocity = lambda z, t, r: guided_velocity(model, z, t, c_str, c_sem, guidance, alpha)  # noqa: E731
    z0 = euler_sample(velocity, z1, timesteps(steps, schedule, shift))  # t: 1 → 0
    sr = codec.decode(z0).float()[..., :H, :W].add(1).div(2)           # [-1, 1] → [0, 1], padding cropped
    return color_fix_of(sr, lr_up, color_fix)


# ----------------------------------------------------------------------------- LR↑ and colour fixes

def upscale_lr(lr: torch.Tensor, size: tuple[int, int], how: str = "torch") -> torch.Tensor:
    """LR (B,3,h,w) → LR↑ (B,3,H,W) in [0,1]: torch bicubic (a = −0.75, what train_teacher.py's resize-back
    does) or pil: the 8-bit image resized with PIL BICUBIC (a = −0.5), as the official release's scripts."""
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


# The colour fixes of the official release (those SR releases share, from StableSR), applied to the clamped
# 8-bit output against the 8-bit LR↑ (color_fix_of quantises both first).

def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel's mean and std matched to the reference's: (sr − μ_sr)/σ_sr · σ_ref + μ_ref."""
    def stats(x):                                                      # σ = sqrt(unbiased variance + eps)
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]
    (mu_s, sd_s), (mu_r, sd_r) = stats(sr), stats(ref)
    return (sr - mu_s) / sd_s * sd_r + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest level of an à-trous wavelet decomposition: a 3×3 binomial dilated 1, 2, 4, 8, 16 (replicate pad)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output's high frequencies with the reference's low ones (colour, tone): sr − low(sr) + low(ref)."""
    return sr - _low_pass(sr) + _low_pass(ref)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the nearest of the 256 8-bit levels (what an 8-bit file of x holds)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def color_fix_of(sr: torch.Tensor, ref: torch.Tensor | None, method: str) -> torch.Tensor:
    """The colour fix `method` of the clamped 8-bit output against the 8-bit LR↑, clamped to [0, 1]."""
    if ref is None or method == "none":
        return sr.clamp(0, 1)
    return COLOR_FIX[method](quantize8(sr), quantize8(ref)).clamp(0, 1)


COLOR_FIX = {"none": lambda sr, ref: sr, "adain": adain_color_fix, "wavelet": wavelet_color_fix}


# ----------------------------------------------------------------------------- tiling
# Large images never pass through a network whole. The codec, DINOv2 and the DiT each run on overlapping
# windows, and the outputs are cross-faded with weights that sum to one at every position, all in one loop
# (blend_tiles). What still grows with the image: LR↑ and the output (3 floats per pixel each), the latents
# c_str, z and the blended velocity, and the semantic token map; the rest is the size of one tile.

def tile_windows(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of windows of length `tile` covering [0, size), the last one flush with the end."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    return sorted(set(list(range(0, size - tile, stride)) + [size - tile]))


def gaussian_window(n: int) -> torch.Tensor:
    """exp(−(i − (n − 1)/2)² / (2·(0.1·n)²)), i < n: the official release's tile weight (unnormalised)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-(i - (n - 1) / 2) ** 2 / (2 * (0.1 * n) ** 2)).float()


def blend_weights(starts: list[int], n: int, size: int, fade: int, device=None, kind: str = "linear") -> list[torch.Tensor]:
    """1-D weights of the windows [s, s+n) of an axis, divided by their sum at each position so they sum to 1."""
    # linear (ours): ramps over `fade` cells at each edge shared with another window (an image edge is never
    # faded); gaussian: the release's window whatever the overlap. Tile (i, j) weighs wy[i] ⊗ wx[j].
    i, ws = torch.arange(n, dtype=torch.float32), []
    for s in starts:
        w = gaussian_window(n) if kind == "gaussian" else torch.ones(n)
        if kind != "gaussian" and s > 0:
            w = torch.minimum(w, (i + 1) / (fade + 1))
        if kind != "gaussian" and s + n < size:
            w = torch.minimum(w, (n - i) / (fade + 1))
        ws.append(w)
    total = torch.zeros(size)
    for s, w in zip(starts, ws):
        total[s:s + n] += w
    return [(w / total[s:s + n]).to(device) for s, w in zip(starts, ws)]


@functools.lru_cache(maxsize=32)
def axis_plan(size: int, tile: int, overlap: int, align: int = 1, scale: int = 1, blend: str = "linear",
              device: torch.device | None = None) -> tuple[tuple, int]:
    """((start, output start, weights), …) of one axis and the window length; outputs are `scale`× the input."""
    # cached: the DiT asks for the same plan at every step, and copying weights to a GPU syncs with it
    starts, n = tile_windows(size, tile, overlap, align), min(tile, size)
    ws = blend_weights([s * scale for s in starts], n * scale, size * scale, overlap * scale, device, blend)
    return tuple((s, s * scale, w) for s, w in zip(starts, ws)), n


def blend_tiles(fn, out: torch.Tensor, rows, cols) -> torch.Tensor:
    """out[..., oy:oy+len(a), ox:ox+len(b)] += fn(y, x)·(a ⊗ b) for every window pair: THE tile loop."""
    for y, oy, a in rows:
        for x, ox, b in cols:
            out[..., oy:oy + len(a), ox:ox + len(b)] += fn(y, x).float() * (a[:, None] * b)
    return out


def tiled(fn, z: torch.Tensor, tile: int, overlap: int, align: int = 2, blend: str = "linear"):
    """fn(z_window, (y, x, h, w)) → a tensor of the window's shape, on overlapping tiles of z, blended."""
    (rows, th), (cols, tw) = (axis_plan(n, tile, overlap, align, 1, blend, z.device) for n in z.shape[-2:])
    return blend_tiles(lambda y, x: fn(z[..., y:y + th, x:x + tw], (y, x, th, tw)),
                       torch.zeros_like(z, dtype=torch.float32), rows, cols)


def reflect_crop(img: torch.Tensor, y: int, x: int, h: int, w: int) -> torch.Tensor:
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
def tiled_encode(codec, img, size: tuple[int, int], tile: int = 512, overlap: int = 64, encode=None, generator=None):
    """img (B,3,H,W) in [0,1], reflect-padded to `size` → c_str (B,C,H'/f,W'/f): posterior means of tiles
    (generator: posterior samples drawn from it, as the official release)."""
    encode, f = encode or codec.encode, codec.factor
    # our pixel codecs map every f×f block on its own: without overlap their blend is exact
    overlap = 0 if isinstance(codec, vae.PixelCodec) else overlap // f
    (rows, th), (cols, tw) = (axis_plan(n // f, max(1, tile // f), overlap, 1, 1, "linear", img.device) for n in size)
    out = img.new_zeros(img.shape[0], codec.channels, size[0] // f, size[1] // f, dtype=torch.float32)
    return blend_tiles(lambda y, x: encode(reflect_crop(img, y * f, x * f, th * f, tw * f) * 2 - 1,
                                           generator=generator, mode=generator is None), out, rows, cols)


@torch.no_grad()
def tiled_decode(codec, z: torch.Tensor, size: tuple[int, int], tile: int = 512, overlap: int = 64, decode=None):
    """Latent (B,C,h,w) → image (B,3,H,W) in [-1,1] (H ≤ f·h, W ≤ f·w), decoded tile by tile."""
    decode, f = decode or codec.decode, codec.factor
    overlap = 0 if isinstance(codec, vae.PixelCodec) else overlap // f
    (rows, th), (cols, tw) = (axis_plan(n, max(1, tile // f), overlap, 1, f, "linear", z.device) for n in z.shape[-2:])
    out = z.new_zeros(z.shape[0], 3, f * z.shape[-2], f * z.shape[-1], dtype=torch.float32)
    return blend_tiles(lambda y, x: decode(z[..., y:y + th, x:x + tw]), out, rows, cols)[..., :size[0], :size[1]]


_round = lambda v: math.floor(v + 0.5)  # noqa: E731 (half up; Python's round() is half-to-even)

@torch.no_grad()
def semantic_token_map(semantic, img: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """(ours) c_sem of the whole image as one token map (B, Gh, Gw, dim), `semantic.grid` tokens per tile side:
    DINOv2 on overlapping tile-sized windows (each resized to its input size, as in training), cross-faded."""
    g, (H, W) = semantic.grid, img.shape[-2:]

    def axis(size):  # pixel windows → token offsets: g tokens per window of min(tile, size) pixels
        n = min(tile, size)
        G, starts = _round(size * g / n), tile_windows(size, n, overlap, 1)
        offsets = [min(_round(s * G / size), G - g) for s in starts[:-1]] + [G - g]
        return tuple(zip(starts, offsets, blend_weights(offsets, g, G, _round(overlap * g / n), img.device))), n, G
    (rows, th, Gh), (cols, tw, Gw) = axis(H), axis(W)
    out = img.new_zeros(img.shape[0], semantic.dim, Gh, Gw, dtype=torch.float32)
    tokens = lambda y, x: semantic(img[..., y:y + th, x:x + tw]).unflatten(1, (g, g)).permute(0, 3, 1, 2)  # noqa: E731
    return blend_tiles(tokens, out, rows, cols).permute(0, 2, 3, 1).contiguous()


def crop_tokens(tmap: torch.Tensor, y: int, x: int, size: tuple[int, int], g: int) -> torch.Tensor:
    """The g×g tokens (B, g·g, dim) of a token map (B, Gh, Gw, dim) under the tile at pixel (y, x) of `size`."""
    Gh, Gw = tmap.shape[1:3]
    oy, ox = min(_round(y * Gh / size[0]), Gh - g), min(_round(x * Gw / size[1]), Gw - g)
    return tmap[:, oy:oy + g, ox:ox + g].flatten(1, 2)


# ----------------------------------------------------------------------------- the tiled pipeline

PROGRESS_AFTER = 3.0   # seconds an image may take before its bar (steps × tiles) and its time are shown


@dataclass
class FastPaths:
    """Speed-ups of VOSRPipeline, off by default; none changes what is computed (tests/test_bench.py)."""
    reuse_semantics: bool = False      # project c_sem once per image and tile: it does not depend on z or t
    channels_last: bool = False        # NHWC conv weights in the codec, the layout of cuDNN's fastest kernels
    compile: str | None = None         # torch.compile mode of the DiT and the codec ("default", "max-autotune")
    cuda_graphs: bool = False          # replay the DiT as CUDA graphs (fixed shapes, e.g. the one-step student)
    compile_backend: str = "inductor"  # tests use "aot_eager": the same graphs, no generated code

    @classmethod
    def from_config(cls, cfg: "SampleConfig") -> "FastPaths":
        """The fast paths the sample.py flags ask for (--fast = --reuse-semantics --channels-last)."""
        return cls(reuse_semantics=cfg.fast or cfg.reuse_semantics, channels_last=cfg.fast or cfg.channels_last,
                   compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


class VOSRPipeline:
    """`sample` on overlapping tiles: LR (B,3,h,w) in [0,1] → SR (B,3,round(S·h),round(S·w)) in [0,1]."""

    def __init__(self, model, codec, semantic=None, student: bool = False, device="cpu", bf16=False,
                 fast: FastPaths | None = None):
        self.model, self.codec, self.semantic = model.eval(), codec, semantic
        self.student, self.device, self.bf16 = student, torch.device(device), bf16
        self.enable(fast or FastPaths())

    @torch.no_grad()
    def __call__(self, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15, generator=None, tile=None,
                 tile_overlap=None, color_fix="none", schedule="uniform", shift=1.0, progress=False,
                 semantic_tiles="global", upscale="torch", tile_blend="linear", vae_tile=None, latent="mean"):
        """sample() with tiles: LR↑ → c_str (condition) → c_sem (tile_semantics) → z_0 (denoise) → SR (finish).
        tile, tile_overlap, vae_tile (the codec's; None: tile, 0: whole) in output pixels, see tile_sizes."""
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        for name, value, allowed in (("semantic_tiles", semantic_tiles, SEMANTIC_TILES), ("upscale", upscale, UPSCALE),
                                     ("tile_blend", tile_blend, TILE_BLEND), ("latent", latent, LATENT),
                                     ("color_fix", color_fix, tuple(COLOR_FIX))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        unit = self.codec.factor * self.model.patch_size
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        whole = max(H + -H % unit, W + -W % unit)                      # tile 0: one window covers all
        tile, overlap = self.tile_sizes(whole if tile == 0 else tile, tile_overlap)
        vae_tile = tile if vae_tile is None else vae_tile or whole
        lr_up, c_str = self.condition(lr, scale, vae_tile, overlap, upscale, generator if latent == "sample" else None)
        sem_of = self.tile_semantics(lr_up, tile, semantic_tiles)
        ref = lr_up if color_fix != "none" else None
        del lr_up                                                      # freed unless the colour fix needs it
        z0 = self.denoise(c_str, sem_of, generator, timesteps(steps, schedule, shift), guidance, alpha,
                          self.latent_tiles(tile, overlap, tile_blend), tile_blend, progress)
        return self.finish(z0, (H, W), vae_tile, overlap, ref, color_fix)

    def condition(self, lr, scale: float, tile: int, overlap: int, upscale: str = "torch", generator=None):
        """LR → (LR↑ (B,3,H,W), c_str of LR↑ reflect-padded to whole latent patches), encoded tile by tile."""
        lr = lr.to(self.device, torch.float32)
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        lr_up, unit = upscale_lr(lr, (H, W), upscale), self.codec.factor * self.model.patch_size
        with self.autocast():
            return lr_up, tiled_encode(self.codec, lr_up, (H + -H % unit, W + -W % unit), tile, overlap,
                                       self.encode, generator).float()

    def tile_semantics(self, lr_up: torch.Tensor, tile: int, mode: str = "global"):
        """c_sem of each tile: a function (y, x, h, w) in output pixels → (B, N, dim), or None."""
        # global (ours): each tile reads its crop of one token map; per-tile: DINOv2 on the tile's own pixels,
        # as a tile-by-tile run of the release's code would; whole: all tokens of the whole image
        if self.semantic is None:
            return lambda *win: None
        with self.autocast():
            if mode == "whole":
                c_sem = self.semantic(lr_up)
                return lambda *win: c_sem
            if mode == "global":
                tmap = semantic_token_map(self.semantic, lr_up, tile, tile // 2)
                return lambda y, x, h, w: crop_tokens(tmap, y, x, tuple(lr_up.shape[-2:]), self.semantic.grid)
        return functools.lru_cache(None)(lambda y, x, h, w: self.semantic(lr_up[..., y:y + h, x:x + w]))

    def denoise(self, c_str, sem_of, generator, ts, guidance, alpha, latent_tiles, blend="linear", progress=False):
        """z_1 ~ N(0, I) drawn once for the whole latent → z_0 by guided Euler (eq. 2), the DiT on latent tiles."""
        z1 = torch.randn(c_str.shape, generator=generator, dtype=torch.float32).to(self.device)
        on_tile, (lt, lo, align) = self.tile_velocity(c_str, sem_of, guidance, alpha), latent_tiles
        total = (len(ts) - 1) * math.prod(len(tile_windows(n, lt, lo, align)) for n in c_str.shape[-2:])
        with tqdm(total=total, desc="steps × tiles", unit="tile", leave=False, delay=PROGRESS_AFTER,
                  disable=not progress) as bar:
            def one_tile(zw, win, t, r):
                bar.update()
                return on_tile(zw, win, t, r)
            velocity = lambda z, t, r: tiled(lambda zw, win: one_tile(zw, win, t, r), z, lt, lo, align, blend)  # noqa: E731
            return euler_sample(velocity, z1, ts, inplace=True)                # z_1 → z_0, in place

    def finish(self, z0, size, tile: int, overlap: int, ref, color_fix: str = "none"):
        """z_0 → SR in [0,1]: decoded tile by tile, then the colour fix against LR↑."""
        with self.autocast():
            sr = tiled_decode(self.codec, z0, size, tile, overlap, self.decode).add_(1).div_(2)
            return color_fix_of(sr, ref, color_fix)

    def tile_velocity(self, c_str, sem_of, guidance: float, alpha: float):
        """v of one latent window, (z_window, (y, x, h, w) in latent pixels, t, r) → velocity: the teacher's
        guided velocity (eq. 2), or the student's one branch with r = the next time (§3.4)."""
        f, s, keys = self.codec.factor, 1.0 if self.student else guidance, {}   # keys: window → projected c_sem

        def on_tile(zw, win, t, r):
            y, x, h, w = win
            with self.autocast():
                if self.fast.reuse_semantics:
                    if win not in keys:
                        keys[win] = branch_keys(self.model, sem_of(y * f, x * f, h * f, w * f), zw.shape[0], s)
                    sw, kv = None, keys[win]
                else:
                    sw, kv = sem_of(y * f, x * f, h * f, w * f), None
                if self.fast.cuda_graphs:  # the previous replay's outputs are consumed: its buffers may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                cw = c_str[..., y:y + h, x:x + w]
                if self.student:
                    return guided_velocity(self.net, zw, t, cw, sw, 1.0, r=r, kv=kv)
                return guided_velocity(self.net, zw, t, cw, sw, guidance, alpha, kv=kv)
        return on_tile

    def tile_sizes(self, tile=None, overlap=None) -> tuple[int, int]:
        """(tile, overlap) in output pixels, whole latent patches; None: the training crop (RoPE then sees
        integer positions; 512 for the release) and tile / 8."""
        unit = self.codec.factor * self.model.patch_size
        tile = max(unit, (self.model.train_grid * unit if tile is None else tile) // unit * unit)
        return tile, min(tile // 8 if overlap is None else overlap, tile // 2)

    def latent_tiles(self, tile: int, overlap: int, blend: str = "linear") -> tuple[int, int, int]:
        """(tile, overlap, align) of the DiT's windows in latent pixels: linear (ours) on whole patches;
        gaussian as the official release: overlap ≥ tile / 8, windows every tile − overlap latent pixels."""
        f, p = self.codec.factor, self.model.patch_size
        if blend == "gaussian":
            return tile // f, max(overlap // f, tile // f // 8), 1
        return tile // f, overlap // f, p

    def autocast(self):
        """bf16 autocast of every network (codec, semantic encoder, DiT) when bf16 is on; a no-op otherwise."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def enable(self, fast: FastPaths):
        """Use these fast paths from now on (channels_last converts the codec in place)."""
        if fast.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.fast = fast
        self.net, self.encode, self.decode = self.model, self.codec.encode, self.codec.decode  # what runs
        if fast.channels_last:
            self.codec.to(memory_format=torch.channels_last)          # 4-D (conv) weights only; no-op for pixel
        if fast.compile or fast.cuda_graphs:
            mode = None if fast.compile in (None, "default") else fast.compile
            dit_mode = mode if not fast.cuda_graphs else (      # the compile modes that capture CUDA graphs
                "max-autotune" if (mode or "").startswith("max-autotune") else "reduce-overhead")
            opts = lambda m: {"mode": m} if fast.compile_backend == "inductor" else {}  # noqa: E731 (inductor's)
            self.net = torch.compile(self.model, backend=fast.compile_backend, **opts(dit_mode))
            if any(True for _ in self.codec.parameters()):            # the pixel codec has nothing to compile
                self.encode, self.decode = (torch.compile(fn, backend=fast.compile_backend, **opts(mode))
                                            for fn in (self.codec.encode, self.codec.decode))
        return self


# ----------------------------------------------------------------------------- plumbing: flags and files
# Everything below is what a command line needs around the sampler above: its flags (range-checked), the
# files a --ckpt names (a run dir, an official release model folder: dit.py reads args.json and its weights).

COLOR_FIXES, SEMANTIC_TILES, UPSCALE, TILE_BLEND, LATENT = (
    ("none", "adain", "wavelet"), ("global", "per-tile", "whole"), ("torch", "pil"), ("linear", "gaussian"), ("mean", "sample"))


# ----------------------------------------------------------------------------- the files a --ckpt names

DEMO_CKPT = Path(__file__).resolve().parent / "checkpoints" / "vosr-small-demo"  # used when --ckpt is omitted
SAMPLER_DEFAULTS = ("steps", "alpha", "tile", "tile_overlap", "color_fix", "upscale", "tile_blend", "vae_tile")  # config.json may set
RELEASE_CONVENTIONS = dict(color_fix="adain", upscale="pil", tile_blend="gaussian")   # the release's scripts
RELEASE_FILES = {  # ae_type / enc_type → (file beside the model folder, what it is, the flag that replaces it)
    "sd2": ("stable-diffusion-2-1-base", "the SD2.1 VAE of ae_type sd2", "--codec FOLDER"),
    "sd2-light": ("sd21_lwdecoder.pth", "the light decoder of ae_type sd2", "--light-decoder FILE or --light-decoder none"),
    "qwen": ("Qwen-Image-vae-2d", "the Qwen-Image VAE of ae_type qwen", "--codec FOLDER"),
    **{enc: (f"torch_cache/checkpoints/{name}", f"the DINOv2 of enc_type {enc}", "--semantic FILE")
       for enc, (name, _) in dit.RELEASE_DINOV2.items()}}


def read_release_folder(folder: Path, cfg: SampleConfig) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a release model folder (dit.release_settings); flags win."""
    def beside(key):
        name, what, flag = RELEASE_FILES[key]
        if not (folder.parent / name).exists():
            raise ValueError(f"{folder.parent / name}: not found ({what}; put it beside {folder.name}/ or give {flag})")
        return str(folder.parent / name)
    run = {**dit.release_settings(folder), **RELEASE_CONVENTIONS}
    weights, ae = dit.release_weights(folder), run["args"]["ae_type"]
    run.update(semantic_size=cfg.semantic_size or run["semantic_size"], codec=cfg.codec or beside(ae),
               semantic_layer=run["semantic_layer"] if cfg.semantic_layer is None else cfg.semantic_layer,
               light_decoder=cfg.light_decoder or (beside("sd2-light") if ae == "sd2" else None),
               semantic=cfg.semantic or beside(run["args"]["enc_type"]))
    return run, weights, [f"settings {folder / 'args.json'}"]


def read_run_dir(folder: Path, cfg: SampleConfig) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a train_teacher.py / distill.py run dir; flags win."""
    conf_path, weights = folder / "config.json", folder / "ema.safetensors"
    if not conf_path.is_file() or not weights.is_file():
        raise ValueError(f"{folder}: neither a run dir (config.json + ema.safetensors) nor an official "
                         "release model folder (args.json + weights)")
    run = dit.read_json(conf_path)
    missing = [k for k in ("preset", "codec", "semantic", "semantic_size", "train_grid") if k not in run]
    if missing:
        raise ValueError(f"{conf_path}: missing {', '.join(missing)} (not written by train_teacher.py?)")
    own = run.get("sampler_defaults", {})                              # what the model recommends (ours)
    if not isinstance(own, dict) or not set(own) <= set(SAMPLER_DEFAULTS):
        raise ValueError(f"{conf_path}: sampler_defaults {own!r}: a JSON object of some of {', '.join(SAMPLER_DEFAULTS)}")
    if (folder / run["semantic"]).is_file():                           # a random encoder saved in the run dir
        run["semantic"] = str(folder / run["semantic"])
    run.update({k: getattr(cfg, k) for k in ("codec", "light_decoder", "semantic", "semantic_size", "semantic_layer")
                if getattr(cfg, k) is not None})
    return run, weights, [f"settings {conf_path}"]



def describe_semantic(semantic) -> str:
    """e.g. 'ViT-B, block 8 of 12, 448 px': what sample.py reports it loaded."""
    name = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L"}.get(semantic.dim, f"{semantic.dim}-wide ViT")
    return f"{name}, block {semantic.layer} of {len(semantic.vit.blocks)}, {semantic.image_size} px"


# ----------------------------------------------------------------------------- flags

@dataclass
class SampleConfig:
    ckpt: str | None = None          # run dir, an official release model folder, or a bare .safetensors
    input: str = ""                  # LR image or folder
    output: str = "out"
    steps: int | None = None         # None: 25 for a teacher (a release's infer_steps), 1 for a student
    guidance: float = 0.5            # s in eq. 2; 1 = full branch, 0 = partial branch
    alpha: float | None = None       # α of the partial branch; None: 0.15 (0 for a standard-CFG run)
    scale: float = 4.0
    seed: int = 0
    tile: int | None = None          # tile side in output pixels; None: config.json's, else the training crop; 0: off
    tile_overlap: int | None = None  # overlap between tiles in output pixels; None: tile / 8
    semantic_tiles: str = "global"   # global | per-tile | whole (VOSRPipeline.tile_semantics)
    # None below: the checkpoint's convention (the official release's for a release folder, checkpoint_defaults)
    color_fix: str | None = None     # none | adain | wavelet
    upscale: str | None = None       # torch | pil
    tile_blend: str | None = None    # linear | gaussian
    vae_tile: int | None = None      # tile side of the codec in output pixels; None: --tile; 0: the whole image
    latent: str = "mean"             # mean | sample: c_str from the codec posterior's mean or a sample
    schedule: str = "uniform"        # uniform | cosine
    shift: float = 1.0               # (ours) SD3 time shift of the schedule; > 1: larger last steps
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    bf16: bool = False
    # what a run dir records in config.json and a release folder in args.json; given explicitly, they win
    preset: str = "0.5B"             # bare .safetensors only
    codec: str | None = None         # 'pixel', 'pixel4' (ours) or a diffusers VAE folder; bare file: 'pixel'
    light_decoder: str | None = None  # the light decoder file, or 'none' (the VAE's own decoder)
    semantic: str | None = None      # 'none', 'random' or a DINOv2 weights file; bare file: 'none'
    semantic_size: int | None = None  # DINOv2 input side; bare file: 448
    semantic_layer: int | None = None  # DINOv2 block of c_sem; None: the checkpoint's, else by depth (8 of 12, 17 of 24)
    student: bool | None = None      # None: decided by the checkpoint (has r_embedder ⇒ student)
    fast: bool = False               # FastPaths; the output does not change. --fast = --reuse-semantics --channels-last
    reuse_semantics: bool = False
    channels_last: bool = False
    compile: str | None = None       # torch.compile mode, e.g. "default", "max-autotune"
    cuda_graphs: bool = False


def number(kind=float, low=None, high=None, low_open=False, multiple=None):
    """argparse type: a finite `kind` number in [low, high] ((low, high] with low_open); None: unbounded."""
    name = "an integer" if kind is int else "a number"
    need = (f" in {'(' if low_open else '['}{low}, {high}]" if low is not None and high is not None else
            f" {'above' if low_open else 'at least'} {low}" if low is not None else
            f" at most {high}" if high is not None else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'}{need}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of DINOv2's {multiple}-pixel patch, got {text}")
        return value
    return parse


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
                   help="tile side in output pixels (default: the run dir's config.json sampler_defaults, e.g. 128 "
                        "for the shipped demo, else the model's training crop, 512 for the release); "
                        "peak memory depends on it, not on the image size; at least half the training crop, "
                        "rounded down to whole latent patches; 0: no tiling, the whole image in one window (the "
                        "official scripts' default)")
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
    p.add_argument("--color-fix", default=d.color_fix, choices=sorted(COLOR_FIXES),
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
    g.add_argument("--semantic-size", type=number(int, 14, multiple=14), default=d.semantic_size,
                   help="DINOv2 input side in pixels, a multiple of 14 (default: the checkpoint's; 448 for a bare file)")
    g.add_argument("--semantic-layer", type=number(int, 0), default=d.semantic_layer,
                   help="0-based DINOv2 block of c_sem (default: the checkpoint's; else by depth: 8 of 12, 17 of 24)")
    g = p.add_argument_group("fast paths (same output; python tools/bench_sample.py times them)")
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


# ----------------------------------------------------------------------------- loading checkpoints

def load_pipeline(cfg: SampleConfig, report=print) -> tuple[VOSRPipeline, dict]:
    """The pipeline of a run dir, a release model folder or a bare .safetensors, and its run settings.
    report gets one line per file loaded; a ValueError or FileNotFoundError names what cannot be used."""
    if cfg.ckpt is None:
        if not DEMO_CKPT.is_dir():
            raise ValueError(f"no --ckpt given and the embedded demo model {DEMO_CKPT} is missing")
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
        raise ValueError(f"{ckpt}: checkpoint not found")
    shapes = dit.weight_shapes(weights)
    light = None if run.get("light_decoder") in (None, "none") else run["light_decoder"]
    codec = vae.load_codec(run["codec"], light_decoder=light, device=cfg.device)
    if not isinstance(codec, vae.PixelCodec):
        loaded.append(f"codec {run['codec']} ({codec.channels} channels, ×{codec.factor})")
    if light:
        loaded.append(f"light decoder {light}")
    semantic = vae.load_semantic(run["semantic"], image_size=run["semantic_size"], device=cfg.device,
                                 layer=run.get("semantic_layer"))
    if semantic is not None and Path(run["semantic"]).is_file():
        loaded.append(f"DINOv2 {run['semantic']} ({describe_semantic(semantic)})")
    with_r = any(k.startswith("r_embedder.") for k in shapes)
    enc_dim = semantic.dim if semantic is not None else run.get("enc_dim", 768)
    if run.get("release"):
        ae = run["args"]["ae_type"]
        if semantic is not None and semantic.dim != run["enc_dim"]:
            raise ValueError(f"{run['semantic']}: a {semantic.dim}-wide DINOv2, but args.json has enc_dim {run['enc_dim']}")
        if codec.channels != dit.RELEASE_LATENT_CHANNELS[ae]:
            raise ValueError(f"{run['codec']}: a {codec.channels}-channel codec, but args.json's ae_type {ae} "
                             f"needs {dit.RELEASE_LATENT_CHANNELS[ae]}")
        try:
            conf = dit.release_config(run["args"], codec.channels, enc_dim, with_r, shapes.get("mlp_ca.fc1.weight", (0,))[0])
        except ValueError as e:
            raise ValueError(f"{ckpt / 'args.json'}: {e}") from None
        run.update(preset=conf.preset if conf.preset != "custom" else f"dim {conf.dim}, depth {conf.depth}",
                   train_grid=conf.train_grid)
    else:
        conf = dit.preset_config(run["preset"], latent_channels=codec.channels, with_r=with_r, enc_dim=enc_dim,
                                 train_grid=run["train_grid"], patch_size=run.get("patch_size", 2))
    model = dit.from_checkpoint(conf, str(weights))
    loaded.insert(0, f"DiT {weights} (dim {model.dim}, depth {model.depth}, {'one-step student' if with_r else 'teacher'})")
    for line in loaded:
        report(f"sample.py: loaded {line}")
    student = with_r if cfg.student is None else cfg.student
    return VOSRPipeline(model.to(cfg.device), codec, semantic, student, cfg.device, cfg.bf16), run


# ----------------------------------------------------------------------------- CLI

def checkpoint_defaults(cfg: SampleConfig, pipe: VOSRPipeline, run: dict) -> SampleConfig:
    """cfg with the settings left to the checkpoint filled in: first a run dir's own (config.json
    "sampler_defaults", e.g. the shipped models' fastest good --tile), then 1 step for a student, 25 (a release's
    infer_steps) for a teacher; α = 0.15 (a release's mean weak_cond_strength_aelq), 0 for a run trained with
    --mode cfg (its auxiliary branch never saw c_str); the release's colour fix, LR upscaler and tile blending
    for a release folder, else none / torch / linear (pil for a run trained with --resize-back release)."""
    cfg = replace(cfg, **{k: v for k, v in run.get("sampler_defaults", {}).items() if getattr(cfg, k) is None})
    steps = cfg.steps if cfg.steps is not None else 1 if pipe.student else run.get("infer_steps", 25)
    alpha = cfg.alpha if cfg.alpha is not None else run.get("alpha", 0.0 if run.get("mode") == "cfg" else 0.15)
    return replace(cfg, steps=steps, alpha=alpha, color_fix=cfg.color_fix or run.get("color_fix", "none"),
                   upscale=cfg.upscale or run.get("upscale", "pil" if run.get("resize_back") == "release" else "torch"),
                   tile_blend=cfg.tile_blend or run.get("tile_blend", "linear"))


def check_tiles(cfg: SampleConfig, pipe: VOSRPipeline, note=print) -> SampleConfig:
    """cfg with --tile rounded down to whole latent patches (with a note); a ValueError naming the flag for a
    tile under half the training crop (too few tokens for the DiT) or an overlap of half the tile or more."""
    unit = pipe.codec.factor * pipe.model.patch_size
    crop, tile = pipe.model.train_grid * unit, cfg.tile
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
        print(f"sample.py: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
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
    print(f"sample.py: wrote {done} image(s), {failed} failed{f', {seconds / done:.2f} s per image' if done else ''}")
    return 1 if failed == len(jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
