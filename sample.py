"""Super-resolve images with a VOSR teacher (guided Euler, paper §3.3) or a distilled student
(§3.4).

    LR ──bicubic ×scale──► LR↑ ──codec.encode──► c_str            (structural condition, §3.1)
    LR↑ ──DINOv2──► c_sem                                         (semantic condition, §3.2)
    z_1 ~ N(0, I) ──Euler, t: 1 → 0, guided velocity (eq. 2)──► z_0 ──codec.decode──► SR (──colour fix──►)

Teacher: v = v_pcond + s·(v_cond − v_pcond) (eq. 2), v_cond = v(z_t, t | c_str, c_sem),
         v_pcond = v(z_t, t | α·c_str, ∅), α = 0.15; both branches in one batch of 2B.
Student: one branch (the guidance was distilled in, §3.4); each step predicts f(z_t, t_i, r =
t_{i+1}). Latents: z_0 = data, z_1 = noise, z_t = (1 − t)·z_0 + t·z_1, velocity v = z_1 − z_0 (eq.
1).

`sample` below is that diagram for an image that fits in one window. `VOSRPipeline` runs the same
steps on overlapping tiles (one loop, `blend_tiles`) so that memory depends on the tile, not on the
image: the noise is drawn once for the whole latent, and (ours) DINOv2 builds one token map of the
whole image from which each tile reads the tokens under it, so neighbours agree.

    python sample.py --ckpt RUN_DIR -i LR_DIR -o OUT_DIR [--steps 25] [--guidance 0.5] [--fast]
    python sample.py --ckpt preset/ckpts/VOSR_0.5B_os -i LR_DIR -o OUT_DIR     (an official release model;
        its conventions become the defaults: PIL upscale, adain colour fix, Gaussian tile blending;
        docs/official_checkpoints.md)
    python sample.py --ckpt preset/ckpts/VOSR2 -i LR_DIR -o OUT_DIR            (VOSR 2.0: one Euler step
        of one branch, no r; its args.json says so)
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import dit
import vae
from vosr import loading, runtime
from vosr.cli import OneLineParser, number
from vosr.files import (ImageError, UserError, WriteError, existing_outputs, find_jobs,
                        keep_existing, probe_output_folder, read_image, read_safetensors_header,
                        write_image)
from vosr.loading import (DEFAULT_CKPT, ONESTEP, RUN_WEIGHTS, read_release_folder,
                          read_run_dir, release_folder_of)
from vosr.runtime import FastPaths


# ------------------------------------------------------------------- the sampler (paper §3.3, §3.4)

def guided_velocity(model, z, t, c_str, c_sem, guidance_scale=0.5, alpha=0.15, r=None, kv=None):
    """v = v_pcond + s·(v_cond − v_pcond) (eq. 2); both branches run as one batch of 2B."""
    # kv: c_sem already projected in this batch layout (branch_keys), the fast path's once-per-image
    # copy
    proj = {} if kv is None else {"c_sem_proj": kv}
    if guidance_scale == 1.0:  # s = 1: the full branch alone
        return model(torch.cat([c_str, z], 1), t, c_sem, r, **proj)
    # (c_str, c_sem), (α·c_str, ∅)
    x = torch.cat([torch.cat([c_str, z], 1), torch.cat([alpha * c_str, z], 1)])
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])  # ∅ = zero tokens
    r2 = None if r is None else r.repeat(2)
    v_cond, v_pcond = model(x, t.repeat(2), sem, r2, **proj).chunk(2)
    return v_pcond + guidance_scale * (v_cond - v_pcond)


def uses_r(model, r):
    """r for a student with an r_embedder; None for a one-step model without (VOSR 2.0: v(z, t))."""
    return r if getattr(model, "with_r", True) else None


def branch_keys(model, c_sem, batch: int, guidance_scale: float = 0.5):
    """c_sem projected by the DiT (LayerNorm → MLP, Fig. 2) in guided_velocity's layout: (B | 2B, N,
    d)."""
    if guidance_scale == 1.0:  # it does not depend on z or t
        return model.project_semantics(c_sem, batch)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])
    return model.project_semantics(sem, 2 * batch)


def timesteps(
    n: int, schedule: str = "uniform", shift: float = 1.0, start: float = 1.0
) -> torch.Tensor:
    """t_0 = start > t_1 > … > t_n = 0: uniform or cos(π/2 · i/n), (ours) SD3's shift
    t ← σt / (1 + (σ − 1)t), then scaled to begin at `start` (1: the paper's)."""
    # σ > 1 spends more steps at high noise and makes the last ones larger; an Euler step to t = 0
    # lands on the model's mean estimate of z_0, so a larger last step invents less detail: higher
    # PSNR, softer texture
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    i = torch.arange(n + 1, dtype=torch.float64) / n
    t = 1 - i if schedule == "uniform" else torch.cos(math.pi / 2 * i)
    t = start * shift * t / (1 + (shift - 1) * t)
    t[-1] = 0.0
    return t.float()


def start_latent(c_str: torch.Tensor, z1: torch.Tensor, start: float = 1.0) -> torch.Tensor:
    """z at t = start: the noise z_1 at 1 (the paper); below 1 (ours, SDEdit-style) the LR↑ latent
    noised to that time, z_t = (1 − t)·c_str + t·z_1 (eq. 1 with c_str in place of z_0)."""
    # c_str lives in z_0's space (the codec's latent of LR↑), so the sampler refines the upscale
    # instead of drawing a new image from noise: lower starts keep more of the input
    if start == 1.0:
        return z1
    return z1.mul_(start).add_(c_str, alpha=1 - start)


@torch.no_grad()
def euler_sample(
    velocity, z1: torch.Tensor, ts: torch.Tensor, progress: bool = False, inplace: bool = False
):
    """Integrate dz/dt = v from t = 1 to 0: z ← z − (t_i − t_{i+1})·v(z, t_i, t_{i+1}); inplace
    overwrites z1."""
    z = z1 if inplace else z1.clone()
    ts = ts.tolist()  # python floats: the loop never reads a tensor back from the device
    for i in tqdm(range(len(ts) - 1), disable=not progress, leave=False, desc="steps"):
        t, r = ts[i], ts[i + 1]
        tt, rr = (torch.full((z.shape[0],), v, device=z.device) for v in (t, r))
        z.sub_(velocity(z, tt, rr).float(), alpha=t - r)
    return z


@torch.no_grad()
def sample(model, codec, semantic, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15,
           generator=None, student=False, schedule="uniform", shift=1.0, upscale="torch",
           latent="mean", color_fix="none", start=1.0):
    """LR (B,3,h,w) in [0,1] → SR (B,3,round(scale·h),round(scale·w)) in [0,1], every network on the
    whole image."""
    H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
    unit = codec.factor * model.patch_size  # output pixels per DiT token
    lr_up = upscale_lr(lr.float(), (H, W), upscale)  # the model sees the resized-back LR (§3.1)
    padded = reflect_crop(lr_up, 0, 0, H + -H % unit, W + -W % unit)  # whole tokens
    posterior = generator if latent == "sample" else None  # the release samples, we take the mean
    c_str = codec.encode(padded * 2 - 1, generator=posterior, mode=posterior is None).float()
    c_sem = None if semantic is None else semantic(lr_up)              # DINOv2 tokens of LR↑
    z1 = torch.randn(c_str.shape, generator=generator).to(c_str.device)   # z_1 ~ N(0, I)
    z = start_latent(c_str, z1, start)                                   # z_1, or (ours) z_start

    def velocity(z, t, r):
        if student:  # one branch, r = the next time: the guidance was distilled in (§3.4)
            return guided_velocity(model, z, t, c_str, c_sem, 1.0, r=uses_r(model, r))
        return guided_velocity(model, z, t, c_str, c_sem, guidance, alpha)  # eq. 2
    z0 = euler_sample(velocity, z, timesteps(steps, schedule, shift, start))  # t: 1 → 0
    sr = codec.decode(z0).float()[..., :H, :W].add(1).div(2)  # [-1, 1] → [0, 1], padding cropped
    return color_fix_of(sr, lr_up, color_fix)


# ----------------------------------------------------------------------------- LR↑ (§3.1)

def upscale_lr(lr: torch.Tensor, size: tuple[int, int], how: str = "torch") -> torch.Tensor:
    """LR (B,3,h,w) → LR↑ (B,3,H,W) in [0,1]: torch bicubic (a = −0.75, what train_teacher.py's
    resize-back does) or pil: the 8-bit image resized with PIL BICUBIC (a = −0.5), as the official
    release's scripts."""
    if how == "torch":
        up = F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False)
        return up.clamp_(0, 1)
    import numpy as np
    from PIL import Image
    out = []
    for img in lr:
        arr = (
            img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        )
        up = Image.fromarray(arr, "RGB").resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1))
    return torch.stack(out).to(lr.device, torch.float32).div_(255)


# ----------------------------------------------------------------------------- tiling
# Large images never pass through a network whole. The codec, DINOv2 and the DiT each run on
# overlapping windows, and the outputs are cross-faded with weights that sum to one at every
# position, all in one loop (blend_tiles). What still grows with the image: LR↑ and the output (3
# floats per pixel each), the latents c_str, z and the blended velocity, and the semantic token map;
# the rest is the size of one tile.

def tile_windows(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of windows of length `tile` covering [0, size), the last one flush with the
    end."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    return sorted(set(list(range(0, size - tile, stride)) + [size - tile]))


def gaussian_window(n: int) -> torch.Tensor:
    """exp(−(i − (n − 1)/2)² / (2·(0.1·n)²)), i < n: the official release's tile weight
    (unnormalised)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-(i - (n - 1) / 2) ** 2 / (2 * (0.1 * n) ** 2)).float()


def blend_weights(starts: list[int], n: int, size: int, fade: int, device=None,
                  kind: str = "linear") -> list[torch.Tensor]:
    """1-D weights of the windows [s, s+n) of an axis, divided by their sum at each position so they
    sum to 1."""
    # linear (ours): ramps over `fade` cells at each edge shared with another window (an image edge
    # is never faded); gaussian: the release's window whatever the overlap. Tile (i, j) weighs wy[i]
    # ⊗ wx[j].
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
def axis_plan(size: int, tile: int, overlap: int, align: int = 1, scale: int = 1,
              blend: str = "linear", device: torch.device | None = None) -> tuple[tuple, int]:
    """((start, output start, weights), …) of one axis and the window length; outputs are `scale`×
    the input."""
    # cached: the DiT asks for the same plan at every step, and copying weights to a GPU syncs with
    # it
    starts, n = tile_windows(size, tile, overlap, align), min(tile, size)
    ws = blend_weights(
        [s * scale for s in starts], n * scale, size * scale, overlap * scale, device, blend
    )
    return tuple((s, s * scale, w) for s, w in zip(starts, ws)), n


def blend_tiles(fn, out: torch.Tensor, rows, cols) -> torch.Tensor:
    """out[..., oy:oy+len(a), ox:ox+len(b)] += fn(y, x)·(a ⊗ b) for every window pair: THE tile
    loop."""
    for y, oy, a in rows:
        for x, ox, b in cols:
            out[..., oy:oy + len(a), ox:ox + len(b)] += fn(y, x).float() * (a[:, None] * b)
    return out


# windows per DiT call (ours): one call on a batch beats a call per small tile on a CPU
TILE_BATCH = 16


def tiled(fn, z: torch.Tensor, tile: int, overlap: int, align: int = 2, blend: str = "linear",
          batch: int = TILE_BATCH):
    """fn(windows of z stacked on the batch axis, [(y, x, h, w), …]) → a tensor of their shape, on
    overlapping tiles of z, `batch` windows per call, blended."""
    (rows, th), (cols, tw) = (
        axis_plan(n, tile, overlap, align, 1, blend, z.device) for n in z.shape[-2:]
    )
    plan = [(row, col) for row in rows for col in cols]
    out = torch.zeros_like(z, dtype=torch.float32)
    for i in range(0, len(plan), batch):
        chunk = plan[i:i + batch]
        wins = [(y, x, th, tw) for (y, _, _), (x, _, _) in chunk]
        v = fn(torch.cat([z[..., y:y + th, x:x + tw] for y, x, _, _ in wins]), wins)
        for ((_, oy, a), (_, ox, b)), vw in zip(chunk, v.float().chunk(len(chunk))):
            out[..., oy:oy + th, ox:ox + tw] += vw * (a[:, None] * b)
    return out


def reflect_crop(img: torch.Tensor, y: int, x: int, h: int, w: int) -> torch.Tensor:
    """img[..., y:y+h, x:x+w] of the image reflect-padded at the bottom and right, built for this
    window only."""
    H, W = img.shape[-2:]
    if y + h <= H and x + w <= W:
        return img[..., y:y + h, x:x + w]

    # reflect: size, size+1, … ↦ size−2, size−3, … (clamped for tiny images)
    def index(start, n, size):
        i = torch.arange(start, start + n, device=img.device)
        return torch.where(i < size, i, 2 * (size - 1) - i).clamp(0, size - 1)
    ri, ci = index(y, h, H), index(x, w, W)
    # the rows/columns the window needs
    sub = img[..., ri.min() : ri.max() + 1, ci.min() : ci.max() + 1]
    return sub.index_select(-2, ri - ri.min()).index_select(-1, ci - ci.min())


@torch.no_grad()
def tiled_encode(codec, img, size: tuple[int, int], tile: int = 512, overlap: int = 64, encode=None,
                 generator=None):
    """img (B,3,H,W) in [0,1], reflect-padded to `size` → c_str (B,C,H'/f,W'/f): posterior means of
    tiles (generator: posterior samples drawn from it, as the official release)."""
    encode, f = encode or codec.encode, codec.factor
    # our pixel codecs map every f×f block on its own: without overlap their blend is exact
    overlap = 0 if isinstance(codec, vae.PixelCodec) else overlap // f
    (rows, th), (cols, tw) = (
        axis_plan(n // f, max(1, tile // f), overlap, 1, 1, "linear", img.device) for n in size
    )
    out = img.new_zeros(
        img.shape[0], codec.channels, size[0] // f, size[1] // f, dtype=torch.float32
    )
    return blend_tiles(
        lambda y, x: encode(reflect_crop(img, y * f, x * f, th * f, tw * f) * 2 - 1,
                            generator=generator, mode=generator is None),
        out,
        rows,
        cols,
    )


@torch.no_grad()
def tiled_decode(
    codec, z: torch.Tensor, size: tuple[int, int], tile: int = 512, overlap: int = 64, decode=None
):
    """Latent (B,C,h,w) → image (B,3,H,W) in [-1,1] (H ≤ f·h, W ≤ f·w), decoded tile by tile."""
    decode, f = decode or codec.decode, codec.factor
    overlap = 0 if isinstance(codec, vae.PixelCodec) else overlap // f
    (rows, th), (cols, tw) = (
        axis_plan(n, max(1, tile // f), overlap, 1, f, "linear", z.device) for n in z.shape[-2:]
    )
    out = z.new_zeros(z.shape[0], 3, f * z.shape[-2], f * z.shape[-1], dtype=torch.float32)
    return blend_tiles(lambda y, x: decode(z[..., y : y + th, x : x + tw]), out, rows, cols)[
        ..., : size[0], : size[1]
    ]


def _round(v):
    """v rounded half up (Python's round() is half-to-even)."""
    return math.floor(v + 0.5)


@torch.no_grad()
def semantic_token_map(semantic, img: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """(ours) c_sem of the whole image as one token map (B, Gh, Gw, dim), `semantic.grid` tokens per
    tile side: DINOv2 on overlapping tile-sized windows (each resized to its input size, as in
    training), cross-faded."""
    g, (H, W) = semantic.grid, img.shape[-2:]

    def axis(size):  # pixel windows → token offsets: g tokens per window of min(tile, size) pixels
        n = min(tile, size)
        G, starts = _round(size * g / n), tile_windows(size, n, overlap, 1)
        offsets = [min(_round(s * G / size), G - g) for s in starts[:-1]] + [G - g]
        return (
            tuple(
                zip(starts, offsets,
                    blend_weights(offsets, g, G, _round(overlap * g / n), img.device))
            ),
            n,
            G,
        )
    (rows, th, Gh), (cols, tw, Gw) = axis(H), axis(W)
    out = img.new_zeros(img.shape[0], semantic.dim, Gh, Gw, dtype=torch.float32)

    def tokens(y, x):  # the g×g tokens of one window, as a (B, dim, g, g) map
        return semantic(img[..., y:y + th, x:x + tw]).unflatten(1, (g, g)).permute(0, 3, 1, 2)
    return blend_tiles(tokens, out, rows, cols).permute(0, 2, 3, 1).contiguous()


def crop_tokens(tmap: torch.Tensor, y: int, x: int, size: tuple[int, int], g: int) -> torch.Tensor:
    """The g×g tokens (B, g·g, dim) of a token map (B, Gh, Gw, dim) under the tile at pixel (y, x)
    of `size`."""
    Gh, Gw = tmap.shape[1:3]
    oy, ox = min(_round(y * Gh / size[0]), Gh - g), min(_round(x * Gw / size[1]), Gw - g)
    return tmap[:, oy:oy + g, ox:ox + g].flatten(1, 2)


# --------------------------------------------------------------------- token-lapped velocity (ours)
# The DiT sees each token (an f·p × f·p block of pixels with a pixel codec) as one unit, and small
# disagreements between neighbouring tokens show as a grid at token edges: a pixel codec has no
# decoder to hide them. So (ours, not the paper's) run the DiT also on its token grid shifted by
# half a token down, right and both, and cross-fade the four velocities with weights that peak at a
# token's centre: each token edge of one grid is a token centre of the other, and the weights sum to
# one at every pixel. Four DiT passes per step.

@functools.lru_cache(maxsize=64)   # the same few at every step and tile
def lap_weights(n: int, unit: int, offset: int, device=None) -> torch.Tensor:
    """w(q) = min(q + ½, unit − q − ½) / (unit / 2) of q = (i + offset) mod unit, i < n: a cell's
    weight by its place in its token; w(q) + w(q + unit/2) = 1, so the grids at offsets 0 and unit/2
    sum to one."""
    q = (torch.arange(n, device=device) + offset) % unit
    return torch.minimum(q + 0.5, unit - q - 0.5) / (unit / 2)


class LappedDiT(torch.nn.Module):
    """(ours) v(x, t, …) of a DiT averaged over its token grid and the grid shifted by half a token
    in y, x, both."""

    def __init__(self, net, cells: int, patch: int):
        # cells: grid cells per latent pixel (f for a pixel codec: shift in pixels; 1 for a VAE: in
        # latent pixels)
        super().__init__()
        # unit: grid cells per token side
        self.net, self.cells, self.unit = (net, cells, cells * patch)
        if self.unit % 2:
            raise ValueError(
                f"lapped tokens need an even token side, this model's is {self.unit} cell(s)"
            )

    def forward(self, x, t, c_sem=None, r=None, **kw):
        grid = F.pixel_shuffle(x, self.cells)            # c_str and z_t on the grid the tokens tile
        (H, W), u, v = grid.shape[-2:], self.unit, 0.0
        for dy in (0, u // 2):
            for dx in (0, u // 2):
                # whole tokens, grid moved by (dy, dx)
                pad = (dx, u - dx if dx else 0, dy, u - dy if dy else 0)
                shifted = F.pad(grid, pad, mode="reflect") if dy or dx else grid
                vs = F.pixel_shuffle(
                    self.net(F.pixel_unshuffle(shifted, self.cells), t, c_sem, r, **kw), self.cells
                )
                w = lap_weights(H, u, dy, x.device)[:, None] * lap_weights(W, u, dx, x.device)
                v = v + vs[..., dy:dy + H, dx:dx + W].float() * w
        return F.pixel_unshuffle(v, self.cells)


# --------------------------------------------------------------------- colour fix (post-processing)
# Colour fixes of the output against the LR↑, used by sample.py (post-processing, not the method).
#
# Computed on the clamped 8-bit output against the 8-bit LR↑ (color_fix_of quantises both first).
# `adain` and `wavelet` are the official release's (its inference scripts' `--align_method`, the
# default of a release folder): adain matches each channel's mean and std; wavelet, despite its
# name, is one Gaussian split that swaps in the reference's low frequencies. `adain-var` and
# `wavelet-atrous` are ours (this project's earlier definitions, as StableSR's colorfix): σ =
# sqrt(var + eps), and a 5-level à-trous low pass.

def _std(flat: torch.Tensor) -> torch.Tensor:
    """torch's unbiased std over the last axis; (ours) 0, not NaN, for one value (a 1×1 image)."""
    return flat.std(-1, correction=1 if flat.shape[-1] > 1 else 0)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and unbiased std, shaped to broadcast over (B, C, H, W)."""
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], _std(flat)[..., None, None]


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The release's adain, per channel: (sr − μ_sr)/(σ_sr + eps)·(σ_ref + eps) + μ_ref, σ the
    unbiased std."""
    (mu_s, sd_s), (mu_r, sd_r) = _moments(sr), _moments(ref)
    return (sr - mu_s) / (sd_s + eps) * (sd_r + eps) + mu_r


def adain_var_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(ours) adain with σ = sqrt(unbiased variance + eps): (sr − μ_sr)/σ_sr · σ_ref + μ_ref."""
    (mu_s, sd_s), (mu_r, sd_r) = _moments(sr), _moments(ref)
    return (sr - mu_s) / (sd_s ** 2 + eps).sqrt() * (sd_r ** 2 + eps).sqrt() + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest level of an à-trous wavelet decomposition: a 3×3 binomial dilated 1, 2, 4, 8,
    16 (replicate pad)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_atrous_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(ours) The output's high frequencies with the reference's low ones (5-level à-trous):
    sr − low(sr) + low(ref)."""
    return sr - _low_pass(sr) + _low_pass(ref)


def gaussian_low_pass(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """OpenCV's GaussianBlur(img, (0, 0), sigma) of each image of x (B,C,H,W), in float32."""
    import cv2                                 # opencv-python-headless (requirements.txt)
    imgs = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    low = [cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), sigma).reshape(img.shape)
           for img in imgs]
    return torch.from_numpy(np.stack(low)).permute(0, 3, 1, 2).to(x.device)


def resize_lanczos(ref: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ref (B,3,h,w), 8-bit levels in [0,1], resized to (H, W) with PIL LANCZOS (as it is at its
    own size: PIL returns a copy)."""
    if tuple(ref.shape[-2:]) == tuple(size):
        return ref
    out = []
    for img in ref:
        arr = img.float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        up = Image.fromarray(arr, "RGB").resize((size[1], size[0]), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1))
    return torch.stack(out).to(ref.device, torch.float32).div_(255)


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The release's 'wavelet' (one Gaussian split): clip(low(ref) + (sr − low(sr)), 0, 1), low =
    OpenCV's GaussianBlur, σ = 5; the reference first resized to the output's size (PIL LANCZOS)."""
    ref = resize_lanczos(ref, tuple(sr.shape[-2:]))
    return (gaussian_low_pass(ref, sigma) + (sr - gaussian_low_pass(sr, sigma))).clamp(0, 1)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the nearest of the 256 8-bit levels (what an 8-bit file of x holds)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def truncate8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the 8-bit level below (a uint8 cast of x·255), as the release's wavelet ends."""
    return x.clamp(0, 1).mul(255).floor().div(255)


def color_fix_of(sr: torch.Tensor, ref: torch.Tensor | None, method: str) -> torch.Tensor:
    """The colour fix `method` of the clamped 8-bit output against the 8-bit LR↑, in [0, 1]; the
    release's wavelet also truncated to 8 bits, as its function returns them."""
    if ref is None or method == "none":
        return sr.clamp(0, 1)
    fixed = COLOR_FIX[method](quantize8(sr), quantize8(ref)).clamp(0, 1)
    return truncate8(fixed) if method == "wavelet" else fixed


def no_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output as it is."""
    return sr


COLOR_FIX = {"none": no_color_fix, "adain": adain_color_fix, "wavelet": wavelet_color_fix,
             "adain-var": adain_var_color_fix, "wavelet-atrous": wavelet_atrous_color_fix}


# ----------------------------------------------------------------------------- the tiled pipeline

# seconds an image may take before its bar (steps × tiles) and its time are shown
PROGRESS_AFTER = 3.0


class VOSRPipeline:
    """`sample` on overlapping tiles: LR (B,3,h,w) in [0,1] → SR (B,3,round(S·h),round(S·w)) in
    [0,1]."""

    def __init__(self, model, codec, semantic=None, student: bool = False, device="cpu", bf16=False,
                 fast: FastPaths | None = None, dtype: torch.dtype | None = None):
        self.model, self.codec, self.semantic = model.eval(), codec, semantic
        self.student, self.device = student, torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if bf16 else torch.float32)   # autocast's format
        self.tile_batch = TILE_BATCH
        self.enable(fast or FastPaths())

    @torch.no_grad()
    def __call__(self, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15, generator=None, tile=None,
                 tile_overlap=None, color_fix="none", schedule="uniform", shift=1.0, progress=False,
                 semantic_tiles="global", upscale="torch", tile_blend="linear", vae_tile=None,
                 latent="mean", lapped="off", tile_shape="fit", start=1.0):
        """sample() with tiles: LR↑ → c_str (condition) → c_sem (tile_semantics) → z_0 (denoise) →
        SR (finish). tile, tile_overlap, vae_tile (the codec's; None: tile, 0: whole) in output
        pixels, see tile_sizes."""
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        for name, value, allowed in (("semantic_tiles", semantic_tiles, SEMANTIC_TILES),
                                     ("upscale", upscale, UPSCALE),
                                     ("tile_blend", tile_blend, TILE_BLEND),
                                     ("latent", latent, LATENT),
                                     ("color_fix", color_fix, tuple(COLOR_FIX)),
                                     ("lapped", lapped, LAPPED),
                                     ("tile_shape", tile_shape, TILE_SHAPE)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        unit = self.codec.factor * self.model.patch_size
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        whole = max(H + -H % unit, W + -W % unit)  # tile 0: one window covers all
        tile, overlap = self.tile_sizes(whole if tile == 0 else tile, tile_overlap)
        vae_tile = tile if vae_tile is None else vae_tile or whole
        lr_up, c_str = self.condition(
            lr, scale, vae_tile, overlap, upscale, generator if latent == "sample" else None
        )
        square = tuple(c_str.shape[-2:]) if tile_shape == "square" else None
        lt = self.latent_tiles(tile, overlap, tile_blend, square)
        sem_of = self.tile_semantics(lr_up, lt[0] * self.codec.factor, semantic_tiles)
        ref = lr_up if color_fix != "none" else None
        del lr_up  # freed unless the colour fix needs it
        if not 0 < start <= 1:
            raise ValueError(f"start must be in (0, 1], got {start}")
        z0 = self.denoise(c_str, sem_of, generator, timesteps(steps, schedule, shift, start),
                          guidance, alpha, lt, tile_blend, progress, lapped == "on")
        return self.finish(z0, (H, W), vae_tile, overlap, ref, color_fix)

    def condition(
        self, lr, scale: float, tile: int, overlap: int, upscale: str = "torch", generator=None
    ):
        """LR → (LR↑ (B,3,H,W), c_str of LR↑ reflect-padded to whole latent patches), encoded tile
        by tile."""
        lr = lr.to(self.device, torch.float32)
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        lr_up, unit = upscale_lr(lr, (H, W), upscale), self.codec.factor * self.model.patch_size
        with self.autocast():
            c_str = tiled_encode(self.codec, lr_up, (H + -H % unit, W + -W % unit), tile, overlap,
                                 self.encode, generator).float()
        return lr_up, runtime.finite(c_str, "codec encoder (c_str)", self.dtype)

    def tile_semantics(self, lr_up: torch.Tensor, tile: int, mode: str = "global"):
        """c_sem of each tile: a function (y, x, h, w) in output pixels → (B, N, dim), or None."""
        # global (ours): each tile reads its crop of one token map; per-tile: DINOv2 on the tile's
        # own pixels, as a tile-by-tile run of the release's code would; whole: all tokens of the
        # whole image
        if self.semantic is None:
            return lambda *win: None
        stage = "semantic encoder (c_sem)"
        with self.autocast():
            if mode == "whole":
                c_sem = runtime.finite(self.semantic(lr_up), stage, self.dtype)
                return lambda *win: c_sem
            if mode == "global":
                tmap = runtime.finite(semantic_token_map(self.semantic, lr_up, tile, tile // 2),
                                        stage, self.dtype)
                return lambda y, x, h, w: crop_tokens(
                    tmap, y, x, tuple(lr_up.shape[-2:]), self.semantic.grid
                )
        return functools.lru_cache(None)(lambda y, x, h, w: runtime.finite(
            self.semantic(lr_up[..., y:y + h, x:x + w]), stage, self.dtype))

    def denoise(self, c_str, sem_of, generator, ts, guidance, alpha, latent_tiles, blend="linear",
                progress=False, lapped=False):
        """z_1 ~ N(0, I) drawn once for the whole latent → z_0 by guided Euler (eq. 2), the DiT on
        latent tiles; ts[0] < 1 starts from the noised LR↑ latent (start_latent)."""
        z1 = torch.randn(c_str.shape, generator=generator, dtype=torch.float32).to(self.device)
        z1 = start_latent(c_str, z1, float(ts[0]))
        on_tile, (lt, lo, align) = (
            self.tile_velocity(c_str, sem_of, guidance, alpha, lapped),
            latent_tiles,
        )
        total = (len(ts) - 1) * math.prod(
            len(tile_windows(n, lt, lo, align)) for n in c_str.shape[-2:]
        )
        with tqdm(total=total, desc="steps × tiles", unit="tile", leave=False, delay=PROGRESS_AFTER,
                  disable=not progress) as bar:
            def velocity(z, t, r):
                def some_tiles(zw, wins):
                    bar.update(len(wins))
                    return on_tile(zw, wins, t, r)
                return tiled(some_tiles, z, lt, lo, align, blend, self.tile_batch)
            z0 = euler_sample(velocity, z1, ts, inplace=True)                  # z_1 → z_0, in place
        # a NaN or inf of any step's velocity stays in z_0: one check per image, no sync per step
        return runtime.finite(z0, "DiT (velocity)", self.dtype)

    def finish(self, z0, size, tile: int, overlap: int, ref, color_fix: str = "none"):
        """z_0 → SR in [0,1]: decoded tile by tile, then the colour fix against LR↑."""
        with self.autocast():
            sr = tiled_decode(self.codec, z0, size, tile, overlap, self.decode).add_(1).div_(2)
            sr = runtime.finite(sr, "codec decoder (image)", self.dtype)
            return runtime.finite(color_fix_of(sr, ref, color_fix), f"{color_fix} colour fix",
                                    self.dtype)

    def tile_velocity(self, c_str, sem_of, guidance: float, alpha: float, lapped: bool = False):
        """v of latent windows, (z_windows, [(y, x, h, w) in latent pixels, …], t, r) → velocity:
        the teacher's guided velocity (eq. 2), or the student's one branch with r = the next time
        (§3.4); lapped: LappedDiT's."""
        f = self.codec.factor
        s = 1.0 if self.student else guidance
        keys = {}  # windows → their projected c_sem
        net = self.lapped_net() if lapped else self.net

        def semantics(wins):  # c_sem of each window, stacked as the windows are
            parts = [sem_of(y * f, x * f, h * f, w * f) for y, x, h, w in wins]
            return None if parts[0] is None else torch.cat(parts)

        def on_tile(zw, wins, t, r):
            n = len(wins)
            t, r = t.repeat(n), r.repeat(n)
            with self.autocast():
                if self.fast.reuse_semantics:
                    if tuple(wins) not in keys:
                        keys[tuple(wins)] = branch_keys(self.model, semantics(wins), zw.shape[0], s)
                    sw, kv = None, keys[tuple(wins)]
                else:
                    sw, kv = semantics(wins), None
                # the previous replay's outputs are consumed: its buffers may be reused
                if self.fast.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                cw = torch.cat([c_str[..., y:y + h, x:x + w] for y, x, h, w in wins])
                if self.student:
                    return guided_velocity(net, zw, t, cw, sw, 1.0, r=uses_r(self.model, r), kv=kv)
                return guided_velocity(net, zw, t, cw, sw, guidance, alpha, kv=kv)
        return on_tile

    def lapped_net(self) -> LappedDiT:
        """The DiT as LappedDiT: shifted in pixels with a pixel codec, in latent pixels with a VAE;
        a ValueError for an odd token side."""
        cells = self.codec.factor if isinstance(self.codec, vae.PixelCodec) else 1
        return LappedDiT(self.net, cells, self.model.patch_size)

    def tile_sizes(self, tile=None, overlap=None) -> tuple[int, int]:
        """(tile, overlap) in output pixels, whole latent patches; None: the training crop (RoPE
        then sees integer positions; 512 for the release) and tile / 8."""
        unit = self.codec.factor * self.model.patch_size
        tile = max(unit, (self.model.train_grid * unit if tile is None else tile) // unit * unit)
        return tile, min(tile // 8 if overlap is None else overlap, tile // 2)

    def latent_tiles(self, tile: int, overlap: int, blend: str = "linear",
                     square: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(tile, overlap, align) of the DiT's windows in latent pixels: linear (ours) on whole
        patches; gaussian as the official release: overlap ≥ tile / 8, windows every tile − overlap
        latent pixels. square: the latent's (h, w), cut into squares as the official release
        does."""
        f, p = self.codec.factor, self.model.patch_size
        lt = tile // f
        if square is not None and max(square) > lt:
            # the release's tiling: squares of side min(tile, short side) on whole patches, unless
            # both sides fit one tile (then the whole latent in one pass); the overlap follows the
            # side
            lt = min(lt, min(square)) // p * p
        if blend == "gaussian":
            return lt, max(overlap // f, lt // 8), 1
        return lt, min(overlap // f, lt // 2), p

    def autocast(self):
        """Autocast of every network (codec, semantic encoder, DiT) to self.dtype; none for fp32."""
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)

    def enable(self, fast: FastPaths):
        """Use these fast paths from now on (vosr/runtime.py; channels_last converts the codec in
        place)."""
        # what runs
        self.net, self.encode, self.decode = fast.apply(self.model, self.codec, self.device)
        self.fast = fast
        return self


# ----------------------------------------------------------------------------- loading checkpoints

def describe_semantic(semantic) -> str:
    """e.g. 'ViT-B, block 8 of 12, 448 px': what sample.py reports it loaded."""
    name = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L"}.get(semantic.dim, f"{semantic.dim}-wide ViT")
    return f"{name}, block {semantic.layer} of {semantic.depth}, {semantic.image_size} px"


def load_model(cfg, report=print):
    """(DiT, codec, semantic encoder, student?, run settings) of the SampleConfig cfg's --ckpt;
    report gets one line per file loaded; a ValueError or FileNotFoundError names what cannot be
    used."""
    ckpt = Path(cfg.ckpt)
    if ckpt.is_file() and ckpt.name in RUN_WEIGHTS and (ckpt.parent / "config.json").is_file():
        report(f"sample.py: --ckpt {ckpt}: {RUN_WEIGHTS[ckpt.name]} of the run dir {ckpt.parent}: "
               f"using the run dir (its config.json and ema.safetensors), as --ckpt {ckpt.parent}")
        ckpt = ckpt.parent
    folder = release_folder_of(ckpt)
    if folder is not None:
        report(f"sample.py: --ckpt {ckpt}: the weights of the release model folder {folder}: using "
               f"the folder (its args.json), as --ckpt {folder}")
        ckpt = folder
    if ckpt.is_dir():
        official = (ckpt / "args.json").is_file() and not (ckpt / "config.json").is_file()
        run, weights, loaded = (read_release_folder if official else read_run_dir)(ckpt, cfg)
    elif ckpt.is_file():
        weights, loaded = ckpt, []
        run = dict(preset=cfg.preset, codec=cfg.codec or "pixel", light_decoder=cfg.light_decoder,
                   semantic=cfg.semantic or "none", semantic_size=cfg.semantic_size or 448,
                   semantic_layer=cfg.semantic_layer, train_grid=32)
    else:
        raise ValueError(f"{ckpt}: checkpoint not found")
    if run.get("kind") == loading.ONESTEP and cfg.student is False:
        raise ValueError(f"--student 0: {ckpt} is VOSR 2.0 (args.json distill_type 'onestep'), "
                         "one step of one branch: it has no teacher sampling")
    shapes = read_safetensors_header(weights)[0]
    light = None if run.get("light_decoder") in (None, "none") else run["light_decoder"]
    codec = vae.load_codec(run["codec"], light_decoder=light, device=cfg.device)
    if not isinstance(codec, vae.PixelCodec):
        loaded.append(f"codec {run['codec']} ({codec.channels} channels, ×{codec.factor})")
    if light:
        loaded.append(f"light decoder {light}")
    semantic = vae.load_semantic(run["semantic"], image_size=run["semantic_size"],
                                 device=cfg.device, layer=run.get("semantic_layer"))
    if semantic is not None and Path(run["semantic"]).is_file():
        loaded.append(f"DINOv2 {run['semantic']} ({describe_semantic(semantic)})")
    with_r = any(k.startswith("r_embedder.") for k in shapes)
    enc_dim = semantic.dim if semantic is not None else run.get("enc_dim", 768)
    if run.get("release"):
        ae = run["args"]["ae_type"]
        if semantic is not None and semantic.dim != run["enc_dim"]:
            raise ValueError(
                f"{run['semantic']}: a {semantic.dim}-wide DINOv2, but args.json has enc_dim "
                f"{run['enc_dim']}"
            )
        if codec.channels != loading.RELEASE_LATENT_CHANNELS[ae]:
            raise ValueError(
                f"{run['codec']}: a {codec.channels}-channel codec, but args.json's ae_type {ae} "
                f"needs {loading.RELEASE_LATENT_CHANNELS[ae]}"
            )
        try:
            fc1_width = shapes.get("mlp_ca.fc1.weight", (0,))[0]
            conf = dit.release_config(run["args"], codec.channels, enc_dim, with_r, fc1_width)
        except ValueError as e:
            raise ValueError(f"{ckpt / 'args.json'}: {e}") from None
        run.update(
            preset=conf.preset
            if conf.preset != "custom"
            else f"dim {conf.dim}, depth {conf.depth}",
            train_grid=conf.train_grid,
        )
        if run["kind"] == loading.ONESTEP:
            run["preset"] += ", VOSR 2.0"
    else:
        conf = dit.preset_config(run["preset"], latent_channels=codec.channels, with_r=with_r,
                                 enc_dim=enc_dim, train_grid=run["train_grid"],
                                 patch_size=run.get("patch_size", 2))
    kind = run.get("kind", loading.STUDENT if with_r else loading.TEACHER)  # a run dir: its weights
    model = dit.from_checkpoint(conf, str(weights))
    what = loading.KIND_NAMES[kind]
    loaded.insert(0, f"DiT {weights} (dim {model.dim}, depth {model.depth}, {what})")
    for line in loaded:
        report(f"sample.py: loaded {line}")
    student = kind != loading.TEACHER if cfg.student is None else cfg.student
    return model, codec, semantic, student, run


def load_pipeline(cfg: SampleConfig, report=print) -> tuple[VOSRPipeline, dict]:
    """The pipeline of a run dir, a release model folder or a bare .safetensors (vosr/loading.py),
    and its run settings; report gets one line per file loaded; a ValueError or FileNotFoundError
    names what cannot be used."""
    default = cfg.ckpt is None
    if default:
        if not DEFAULT_CKPT.is_dir():
            raise ValueError(
                f"no --ckpt given and the shipped default model {DEFAULT_CKPT} is missing"
            )
        cfg.ckpt = str(DEFAULT_CKPT)
    model, codec, semantic, student, run = load_model(cfg, report)
    check_recommended(run.get("sampler_defaults", {}), f"{cfg.ckpt}/config.json: sampler_defaults")
    if default:   # its config.json note says what it is; the first sentence is enough here
        report(f"sample.py: no --ckpt given: using the shipped default model {DEFAULT_CKPT} "
               f"({run.get('note', 'no note').split('. ')[0].rstrip('.')}; README §2)")
    name = cfg.dtype or ("bf16" if cfg.bf16 else runtime.default_dtype(cfg.device))
    pipe = VOSRPipeline(model.to(cfg.device), codec, semantic, student, cfg.device,
                        dtype=runtime.DTYPES[name])
    return pipe, run


def onestep_settings(cfg, note=print):
    """VOSR 2.0 (args.json distill_type 'onestep'): one Euler step t = 1 → 0 of one branch with full
    conditioning (guidance 1 in eq. 2). --steps above 1 is a ValueError (the model has no steps in
    between); --guidance and --alpha get a note that they are ignored (its authors: no effect)."""
    if cfg.steps not in (None, 1):
        raise ValueError(f"--steps {cfg.steps}: VOSR 2.0 (args.json distill_type 'onestep') takes "
                         "one Euler step, t = 1 → 0; leave --steps out")
    default = type(cfg).__dataclass_fields__["guidance"].default
    ignored = [flag for flag, given in (("--guidance", cfg.guidance != default),
                                        ("--alpha", cfg.alpha is not None)) if given]
    if ignored:
        note(f"sample.py: {' and '.join(ignored)} ignored: VOSR 2.0 runs one branch with full "
             "conditioning (no guidance, no weak condition)")
    return replace(cfg, steps=1, guidance=1.0)


def checkpoint_defaults(cfg, pipe, run: dict, note=print):
    """The SampleConfig cfg with the settings left to the checkpoint filled in: first a run dir's
    own (config.json "sampler_defaults", e.g. the shipped models' fastest good --tile), then 1 step
    for a student, 25 (a release's infer_steps) for a teacher; α = 0.15 (a release's mean
    weak_cond_strength_aelq), 0 for a run trained with
    --mode cfg (its auxiliary branch never saw c_str); the release's colour fix, LR upscaler and
    tile blending for a release folder, else none / torch / linear (pil for a run trained with
    --resize-back release); VOSR 2.0's one step of one branch (onestep_settings)."""
    cfg = replace(
        cfg, **{k: v for k, v in run.get("sampler_defaults", {}).items() if getattr(cfg, k) is None}
    )
    if run.get("kind") == ONESTEP:
        cfg = onestep_settings(cfg, note)
    steps = (
        cfg.steps if cfg.steps is not None else 1 if pipe.student else run.get("infer_steps", 25)
    )
    alpha = (
        cfg.alpha
        if cfg.alpha is not None
        else run.get("alpha", 0.0 if run.get("mode") == "cfg" else 0.15)
    )
    return replace(
        cfg,
        steps=steps,
        alpha=alpha,
        color_fix=cfg.color_fix or run.get("color_fix", "none"),
        upscale=cfg.upscale
        or run.get("upscale", "pil" if run.get("resize_back") == "release" else "torch"),
        tile_blend=cfg.tile_blend or run.get("tile_blend", "linear"),
        lapped=cfg.lapped or "off",
        start=cfg.start if cfg.start is not None else 1.0,
    )


def check_recommended(defaults: dict, where: str) -> None:
    """A model's sampler_defaults pass the checks of the flags they stand for; else a ValueError."""
    for name, value in defaults.items():
        kind, _ = SAMPLER_FLAGS[name]
        try:
            if isinstance(kind, tuple):
                if value not in kind:
                    raise argparse.ArgumentTypeError(f"must be one of {', '.join(kind)}")
            elif value is not None:
                kind(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: {name} {value!r}: {e}") from None


# ----------------------------------------------------------------------------- CLI

SEMANTIC_TILES, UPSCALE, TILE_BLEND, LATENT, LAPPED = (("global", "per-tile", "whole"),
                                                       ("torch", "pil"), ("linear", "gaussian"),
                                                       ("mean", "sample"), ("off", "on"))
TILE_SHAPE = ("fit", "square")


@dataclass
class SampleConfig:
    ckpt: str | None = None  # run dir, an official release model folder, or a bare .safetensors
    input: str = ""                  # LR image or folder
    output: str = "out"
    steps: int | None = None  # None: 25 for a teacher (a release's infer_steps), 1 for a student
    guidance: float = 0.5  # s in eq. 2; 1 = full branch, 0 = partial branch
    alpha: float | None = None  # α of the partial branch; None: 0.15 (0 for a standard-CFG run)
    scale: float = 4.0
    seed: int = 0
    # tile side in output pixels; None: config.json's, else the training crop; 0: off
    tile: int | None = None
    tile_overlap: int | None = None  # overlap between tiles in output pixels; None: tile / 8
    semantic_tiles: str = "global"  # global | per-tile | whole (VOSRPipeline.tile_semantics)
    # None below: the checkpoint's convention (the official release's for a release folder,
    # checkpoint_defaults)
    color_fix: str | None = None     # none | adain | wavelet (release) | adain-var | wavelet-atrous
    upscale: str | None = None       # torch | pil
    tile_blend: str | None = None    # linear | gaussian
    tile_shape: str = "fit"  # fit (ours) | square (the release's: short-side squares)
    # off | on: (ours) sample.LappedDiT, the DiT also on half-token-shifted grids
    lapped: str | None = None
    # tile side of the codec in output pixels; None: --tile; 0: the whole image
    vae_tile: int | None = None
    latent: str = "mean"  # mean | sample: c_str from the codec posterior's mean or a sample
    schedule: str = "uniform"        # uniform | cosine
    shift: float = 1.0  # (ours) SD3 time shift of the schedule; > 1: larger last steps
    start: float | None = None  # (ours) first time of the sampler; < 1 starts from the noised LR↑
    device: str = "cuda" if torch.cuda.is_available() else "cpu"   # --device auto resolves to it
    dtype: str | None = None         # fp32 | bf16 | fp16; None: runtime.default_dtype
    bf16: bool = False               # --bf16: the same as dtype "bf16"
    overwrite: bool = False          # replace existing output files
    skip_existing: bool = False  # keep existing outputs, compute only the missing ones
    # what a run dir records in config.json and a release folder in args.json; given explicitly,
    # they win
    preset: str = "0.5B"  # bare .safetensors only
    # 'pixel', 'pixel4' (ours) or a diffusers VAE folder; bare file: 'pixel'
    codec: str | None = None
    light_decoder: str | None = None  # the light decoder file, or 'none' (the VAE's own decoder)
    semantic: str | None = None      # 'none', 'random' or a DINOv2 weights file; bare file: 'none'
    semantic_size: int | None = None  # DINOv2 input side; bare file: 448
    # DINOv2 block of c_sem; None: the checkpoint's, else by depth (8 of 12, 17 of 24)
    semantic_layer: int | None = None
    student: bool | None = None  # None: decided by the checkpoint (has r_embedder ⇒ student)
    # FastPaths; the output does not change. --fast = --reuse-semantics --channels-last
    fast: bool = False
    reuse_semantics: bool = False
    channels_last: bool = False
    compile: str | None = None       # torch.compile mode, e.g. "default", "max-autotune"
    cuda_graphs: bool = False


# SampleConfig field → (argparse type, or a tuple of choices; help, {d} = the defaults)
SAMPLER_FLAGS = {
    "steps": (
        number(int, 1),
        "Euler steps, at least 1 (default: 1 for a distilled student; for a teacher 25, or a "
        "release folder's infer_steps; a student also takes 2 or 4)",
    ),
    "alpha": (
        number(float, 0, 1),
        "structural retention α of the partial branch, in [0, 1] (default: 0.15, the "
        "middle of the training range, or the mean of a release's weak_cond_strength_aelq_list; 0 "
        "for a run "
        "trained with --mode cfg)",
    ),
    "scale": (
        number(float, 0, low_open=True),
        "output size = round(scale · input size), above 0: 1 restores only, "
        "2, 4 or any fraction (default: {d.scale:g})",
    ),
    "seed": (int, "seed of the initial noise, per image (default: {d.seed})"),
    "tile": (
        number(int, 0),
        "tile side in output pixels (default: the run dir's config.json sampler_defaults, e.g. "
        "128 for the shipped demo, else the model's training crop, 512 for the release); peak "
        "memory depends "
        "on it, not on the image size; at least half the training crop, rounded down to whole "
        "latent patches; "
        "0: no tiling, the whole image in one window (the official scripts' default)",
    ),
    "tile_overlap": (
        number(int, 0),
        "overlap of neighbouring tiles in output pixels, below tile/2 (default: tile/8; "
        "--tile-blend gaussian raises it to at least tile/8, as the official scripts)",
    ),
    "tile_blend": (
        TILE_BLEND,
        "how overlapping DiT tiles are blended: linear ramps across the overlap, or the "
        "official scripts' Gaussian window (σ = 0.1 × tile side, centred on the tile) (default: "
        "gaussian "
        "for a release folder, linear otherwise)",
    ),
    "lapped": (
        LAPPED,
        "(ours) also run the DiT on its token grid shifted by half a token down, right and both, "
        "and "
        "cross-fade the four velocities: no grid at token edges, 4× the DiT's cost; needs an even "
        "token side "
        "(pixel codecs) (default: the run dir's config.json sampler_defaults, on for the shipped "
        "default "
        "model; off otherwise)",
    ),
    "tile_shape": (
        TILE_SHAPE,
        "the DiT's latent tiles: fit (ours: min(tile, side) along each "
        "axis) or square (the official scripts: squares of min(tile, the latent's short "
        "side), overlap at least side/8, unless both sides fit one tile) "
        "(default: {d.tile_shape})",
    ),
    "vae_tile": (
        number(int, 0),
        "tile side of the codec (VAE) in output pixels (default: --tile); 0: the whole "
        "image at once, as the official scripts",
    ),
    "semantic_tiles": (
        SEMANTIC_TILES,
        "global: one DINOv2 token map for the whole image, each tile attends to its "
        "crop; per-tile: DINOv2 on each tile's LR crop (the official scripts); whole: every tile "
        "attends to all tokens of the whole image resized to the encoder's size (default: "
        "{d.semantic_tiles})",
    ),
    "color_fix": (
        tuple(sorted(COLOR_FIX)),
        "colour correction of the clamped 8-bit output against the upscaled LR: "
        "the official scripts' adain (per-channel mean and std + 1e-5) and wavelet "
        "(OpenCV Gaussian low pass, sigma 5, truncated to 8 bits), or ours: adain-var "
        "(sqrt(var + 1e-5)), wavelet-atrous (5-level à-trous low pass) (default: adain "
        "for a release folder, as the official scripts; none otherwise)",
    ),
    "upscale": (
        UPSCALE,
        "how the LR is resized to the output size before encoding: pil (PIL bicubic on the 8-bit "
        "image, the official scripts) or torch (bicubic in float, what train_teacher.py's "
        "resize-back does) "
        "(default: pil for a release folder or a run trained with --resize-back release, torch "
        "otherwise)",
    ),
    "latent": (
        LATENT,
        "c_str from the VAE posterior's mean or a sample of it (the official scripts sample) "
        "(default: {d.latent})",
    ),
    "schedule": (
        ("uniform", "cosine"),
        "the n timesteps from 1 to 0: uniform, or cosine (larger steps near t = 0) "
        "(default: {d.schedule})",
    ),
    "shift": (
        number(float, 0, low_open=True),
        "time shift σ of the schedule, above 0, t ← σt / (1 + (σ − 1)t) "
        "(SD3); 1 = none; σ > 1 ends on larger steps, which follow the model's mean: higher PSNR, "
        "softer "
        "detail (default: {d.shift:g})",
    ),
    "start": (
        number(float, 0, 1, low_open=True),
        "(ours) fidelity: the time the sampler starts at, in "
        "(0, 1]; 1 starts from noise (the paper); below 1 from the upscaled LR noised to that "
        "time (SDEdit-style), so lower keeps more of the input and invents less (default: the "
        "run dir's config.json sampler_defaults, 0.4 for the shipped default model; 1 otherwise)",
    ),
}


def add_sampler_args(p: argparse.ArgumentParser, d: SampleConfig):
    """The sampler's settings except the guidance scale: shared with evaluate.py sweep (which takes
    a list of s)."""
    for name, (kind, text) in SAMPLER_FLAGS.items():
        how = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        p.add_argument(
            "--" + name.replace("_", "-"), default=getattr(d, name), help=text.format(d=d), **how
        )


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """sample.py's parser; its --help starts with `description` (sample.py's docstring)."""
    d = SampleConfig()
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt",
        default=d.ckpt,
        help="a run dir of train_teacher.py/distill.py, an official release model folder (e.g. "
        "preset/ckpts/VOSR_0.5B_os, its codec and DINOv2 files beside it), or a bare .safetensors "
        f"(default: the shipped default model {DEFAULT_CKPT.name}, see README)",
    )
    p.add_argument(
        "-i", "--input", required=True, help="LR image or folder of LR images (required)"
    )
    p.add_argument(
        "-o",
        "--output",
        default=d.output,
        help="output folder (same file names, .png), or FILE.png for one input (default: "
             f"{d.output})",
    )
    p.add_argument(
        "--guidance",
        type=number(float),
        default=d.guidance,
        help="guidance scale s (eq. 2), a finite number: 1 = full branch, 0 = partial; larger is "
             "more "
        f"faithful; a student ignores it (default: {d.guidance:g}; the official scripts' "
        "argparse default is 2, their README recommends 0.5)",
    )
    add_sampler_args(p, d)
    p.add_argument("--device", default="auto",
                   help="torch device (cpu, cuda, cuda:1, mps) or auto: CUDA, else Apple MPS, else "
                        "the CPU (default: auto)")
    p.add_argument(
        "--dtype",
        choices=tuple(runtime.DTYPES),
        default=None,
        help="number format of the codec, semantic encoder and DiT (autocast; the "
        "sampler itself stays fp32): fp32, bf16 or fp16; each one's error and speed "
        "in docs/precision.md (default: fp32, on every device: bf16 measured no "
        "faster on a CPU)",
    )
    p.add_argument("--bf16", action="store_true", help="the same as --dtype bf16")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (default: refuse to start)")
    g.add_argument("--skip-existing", action="store_true",
                   help="keep output files that already exist and compute only the missing ones: "
                        "continues a batch that was stopped")
    p.add_argument(
        "--student",
        type=int,
        choices=[0, 1],
        default=None,
        help="force teacher (0) / student (1) sampling (default: from the checkpoint: "
        "a release folder's args.json distill_type, a run dir's r_embedder weights)",
    )
    g = p.add_argument_group(
        "model files (a run dir records these in config.json, a release folder has them "
        "beside it; given here, they win)"
    )
    g.add_argument("--preset", default=d.preset, choices=sorted(dit.PRESETS),
                   help=f"DiT preset of a bare .safetensors (default: {d.preset})")
    g.add_argument(
        "--codec",
        default=d.codec,
        help="'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder (also the release's "
        "Qwen-Image-vae-2d/) (default: the checkpoint's; 'pixel' for a bare file)",
    )
    g.add_argument(
        "--light-decoder",
        default=d.light_decoder,
        help="lightweight decoder file (.pth with config, or .safetensors), or 'none' for the "
             "VAE's own "
        "decoder (default: the checkpoint's; for a release sd2 model sd21_lwdecoder.pth beside it)",
    )
    g.add_argument(
        "--semantic",
        default=d.semantic,
        help="'none', 'random' or a DINOv2 weights file (default: the checkpoint's; 'none' for a "
             "bare file)",
    )
    g.add_argument(
        "--semantic-size",
        type=number(int, 14, multiple=14),
        default=d.semantic_size,
        help="DINOv2 input side in pixels, a multiple of 14 (default: the checkpoint's; 448 for a "
             "bare file)",
    )
    g.add_argument(
        "--semantic-layer",
        type=number(int, 0),
        default=d.semantic_layer,
        help="0-based DINOv2 block of c_sem (default: the checkpoint's; else by depth: 8 of 12, 17 "
             "of 24)",
    )
    g = p.add_argument_group("fast paths (same output; python -m tools.bench_sample times them)")
    g.add_argument(
        "--fast", action="store_true", help="the safe ones: --reuse-semantics --channels-last"
    )
    g.add_argument(
        "--reuse-semantics",
        action="store_true",
        help="project the semantic tokens once per image, not at every step for both branches",
    )
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC conv weights in the codec (faster on GPUs)")
    g.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=d.compile,
        metavar="MODE",
        help="torch.compile the DiT and the decoder (MODE: default, max-autotune, …); the first "
        "image pays the compilation (default: off)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the DiT as CUDA graphs (fixed shapes: one tile size, e.g. a one-step "
             "student); CUDA only",
    )
    return p


def parse_args(argv=None) -> SampleConfig:
    """The flags as a SampleConfig (--help starts with this file's docstring); a bad --tile-overlap
    or
    --device is one line naming it."""
    p = build_parser(__doc__)
    a = p.parse_args(argv)
    if a.tile and a.tile_overlap is not None and 2 * a.tile_overlap >= a.tile:
        p.error(
            f"argument --tile-overlap: must be below tile/2 = {a.tile / 2:g}, got {a.tile_overlap}"
        )
    try:
        device = runtime.resolve_device(a.device)
    except RuntimeError:
        p.error(f"argument --device: {a.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        p.error(
            f"argument --device: {a.device} asked for, but this machine (or this torch build) has "
            "no "
            f"{device.type.upper() if device.type == 'cuda' else device.type}"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        p.error(
            f"argument --device: {a.device} asked for, but there are {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    if a.bf16 and a.dtype not in (None, "bf16"):
        p.error(f"argument --bf16: is --dtype bf16, but --dtype {a.dtype} was given too: give one")
    a.device = str(device)
    a.dtype = "bf16" if a.bf16 else a.dtype or runtime.default_dtype(device)
    a.bf16 = a.dtype == "bf16"
    a.student = None if a.student is None else bool(a.student)
    return SampleConfig(**vars(a))


def check_tiles(cfg: SampleConfig, pipe: VOSRPipeline, note=print) -> SampleConfig:
    """cfg with --tile rounded down to whole latent patches (with a note); a ValueError naming the
    flag for a tile under half the training crop (too few tokens for the DiT) or an overlap of half
    the tile or more."""
    unit = pipe.codec.factor * pipe.model.patch_size
    crop, tile = pipe.model.train_grid * unit, cfg.tile
    if tile:
        if tile < crop // 2:
            raise ValueError(
                f"--tile {tile}: too small for this model (at least {crop // 2}: half its "
                f"{crop}-pixel training crop; 0 turns tiling off)"
            )
        if tile % unit:
            tile = tile // unit * unit  # as VOSRPipeline.tile_sizes rounds it
            note(
                f"sample.py: --tile {cfg.tile} rounded down to {tile} (whole {unit}-pixel latent "
                "patches)"
            )
    resolved = crop if tile is None else tile
    if resolved and cfg.tile_overlap is not None and 2 * cfg.tile_overlap >= resolved:
        raise ValueError(
            f"--tile-overlap {cfg.tile_overlap}: must be below half the {resolved}-pixel tile"
        )
    return replace(cfg, tile=tile)


def super_resolve(
    pipe: VOSRPipeline, lr: torch.Tensor, cfg: SampleConfig, progress: bool = False
) -> torch.Tensor:
    """pipe(lr) with every sampler setting of cfg; the noise is seeded with cfg.seed for each image.
    """
    return pipe(lr, cfg.scale, cfg.steps, cfg.guidance, cfg.alpha,
                torch.Generator().manual_seed(cfg.seed), cfg.tile, cfg.tile_overlap,
                cfg.color_fix or "none", cfg.schedule, cfg.shift, progress=progress,
                semantic_tiles=cfg.semantic_tiles, upscale=cfg.upscale or "torch",
                tile_blend=cfg.tile_blend or "linear", vae_tile=cfg.vae_tile, latent=cfg.latent,
                lapped=cfg.lapped or "off", tile_shape=cfg.tile_shape, start=cfg.start or 1.0)


class Tally:
    """What a batch did so far: the one-line summary, and what to say when it is stopped."""

    def __init__(self, output: str):
        self.output, self.seconds = output, 0.0
        self.total = self.written = self.skipped = self.failed = 0

    def summary(self) -> str:
        """'wrote 3 image(s), skipped 1 existing, 1 failed, 0.52 s per image'."""
        per = f", {self.seconds / self.written:.2f} s per image" if self.written else ""
        return (f"wrote {self.written} image(s), skipped {self.skipped} existing, "
                f"{self.failed} failed{per}")

    def stopped(self) -> str:
        """What was finished when the batch stopped, and how to go on."""
        if not self.total:
            return "no image was started"
        return (f"{self.written} of {self.total} image(s) written to {self.output} "
                f"({self.skipped} kept from before); run the same command with --skip-existing "
                "to do the rest")


def main(argv=None) -> int:
    """sample.py: exit 0 when every image was written, 1 when any failed, 2 for a mistake found
    before any work, 130 on Ctrl-C; each is one line on stderr, never a traceback."""
    cfg = parse_args(argv)
    tally = Tally(cfg.output)
    try:
        return run_batch(cfg, tally)
    except UserError as e:                        # before any image: a bad or an existing output
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                     # (ours) Ctrl-C: what is done, how to continue
        print(f"sample.py: interrupted: {tally.stopped()}", file=sys.stderr)
        return 130


def run_batch(cfg: SampleConfig, tally: Tally) -> int:
    """Check the outputs, load the model, super-resolve every job; a UserError for what is wrong
    before."""
    try:
        # refuses an output that would overwrite or re-read an input
        jobs = find_jobs(cfg.input, cfg.output)
    except OSError as e:
        raise UserError(e) from None
    todo, kept = keep_existing(jobs, existing_outputs(jobs), cfg.overwrite, cfg.skip_existing)
    for folder in sorted({dst.parent for _, dst in todo}):
        probe_output_folder(folder)               # read-only or uncreatable: said before the work
    tally.skipped = len(kept)
    if not todo:                                  # --skip-existing, a finished batch: load nothing
        print(f"sample.py: all {len(kept)} output(s) are in {cfg.output} already; "
              f"{tally.summary()}")
        return 0
    try:
        pipe, run = load_pipeline(cfg)
        pipe.enable(FastPaths.from_config(cfg))
        cfg = check_tiles(checkpoint_defaults(cfg, pipe, run), pipe)
        if cfg.lapped == "on":
            pipe.lapped_net()  # a model whose tokens cannot be half-shifted: say so now
    except (OSError, ValueError) as e:  # a missing or unusable file, a setting the model cannot use
        raise UserError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    dtype = runtime.name_of(pipe.dtype)
    print(
        f"sample.py: {cfg.ckpt} ({run['preset']}, {'student' if pipe.student else 'teacher'}, "
        f"{cfg.steps} step(s), guidance {cfg.guidance:g}, colour fix {cfg.color_fix}, upscale "
        f"{cfg.upscale}, "
        f"tile blend {cfg.tile_blend}, lapped {cfg.lapped}, start {cfg.start:g}), {len(todo)} "
        f"image(s) → {cfg.output}"
        f"{f' ({len(kept)} kept from before)' if kept else ''}"
    )
    print(f"sample.py: device {pipe.device}, dtype {dtype} (the default on {pipe.device.type}: "
          f"{runtime.default_dtype(pipe.device)}, docs/precision.md)")
    warning = runtime.dtype_warning(pipe.device, dtype)
    if warning:
        print(f"sample.py: {warning}", file=sys.stderr)
    tally.total = len(todo)
    # disable None: a bar on a terminal, none in a log
    with tqdm(todo, desc="images", disable=True if len(todo) < 2 else None) as bar:
        for src, dst in bar:
            try:
                lr = read_image(src)[None]
                start = time.perf_counter()
                sr = super_resolve(pipe, lr, cfg, progress=True)[0]
            except (ImageError, runtime.NonFiniteError) as e:   # this image only; the rest go on
                named = e if isinstance(e, ImageError) else f"{src}: {e}"   # ImageError names it
                tqdm.write(f"sample.py: failed {named}", file=sys.stderr)
                tally.failed += 1
                continue
            try:
                write_image(dst, sr)
            except WriteError as e:               # a full disk: the next ones would fail too
                bar.close()
                print(f"sample.py: {e}; {tally.stopped()}", file=sys.stderr)
                return 1
            tally.written += 1
            took = time.perf_counter() - start
            tally.seconds += took
            if took > PROGRESS_AFTER:             # worth a line: the steps × tiles bar was shown
                tqdm.write(f"sample.py: {dst} ({sr.shape[-1]}×{sr.shape[-2]}) in {took:.1f} s")
    print(f"sample.py: {tally.summary()}")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
