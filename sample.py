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
tiles, and overlaps are cross-faded at every step. The noise is drawn once for the whole latent, and
the semantic tokens once for the whole image as one token map (DINOv2 on overlapping tile-sized
windows, blended); each tile attends to the crop of that map under it, so neighbours agree.

    python sample.py --ckpt RUN_DIR -i LR_DIR -o OUT_DIR [--steps 25] [--guidance 0.5] [--fast]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dit
import vae
from degrade import ImageError, find_jobs, read_image, write_image


DEMO_CKPT = Path(__file__).resolve().parent / "checkpoints" / "vosr-small-demo"  # used when --ckpt is omitted


@dataclass
class SampleConfig:
    ckpt: str | None = None          # run dir (config.json + ema.safetensors) or a release .safetensors
    input: str = ""                  # LR image or folder
    output: str = "out"
    steps: int | None = None         # None: 25 for a teacher, 1 for a student (2, 4 also work)
    guidance: float = 0.5            # s in eq. 2; 1 = full branch, 0 = partial branch
    alpha: float | None = None       # α of the partial branch; None: 0.15 (0 for a standard-CFG run)
    scale: float = 4.0
    seed: int = 0
    tile: int | None = None          # tile side in output pixels; None: the training crop (512 for the release)
    tile_overlap: int | None = None  # overlap between tiles in output pixels; None: tile / 8
    semantic_tiles: str = "global"   # global | per-tile | whole (see VOSRPipeline.__call__)
    color_fix: str = "none"          # none | adain | wavelet
    schedule: str = "uniform"        # uniform | cosine
    shift: float = 1.0               # time shift of the schedule; > 1: larger last steps, closer to the mean
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    bf16: bool = False
    # needed only for a bare release checkpoint (a run dir records them in config.json)
    preset: str = "0.5B"
    codec: str = "pixel"
    light_decoder: str | None = None
    semantic: str = "none"
    semantic_size: int = 448
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
    """c_sem projected by the DiT (LayerNorm → MLP, DESIGN §5) in guided_velocity's batch layout: (B, N, d)
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


def blend_weights(starts: list[int], n: int, size: int, fade: int, device=None) -> list[torch.Tensor]:
    """1-D weights of the windows [s, s+n) of an axis that sum to 1 at every position.

    Linear ramps over `fade` cells at each edge shared with another window, flat elsewhere, so two
    tiles cross-fade across their overlap and an image edge is never faded. The 2-D weight of tile
    (i, j) is wy[i] ⊗ wx[j]; the grid of tiles is a product, so those also sum to 1 (no weight map)."""
    i = torch.arange(n, dtype=torch.float32)
    ws = []
    for s in starts:
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


@functools.lru_cache(maxsize=16)
def _tile_plan(H: int, W: int, tile: int, overlap: int, align: int, device: torch.device):
    """Windows and blend weights of `tiled`. Cached: the sampler asks for the same plan at every step, and
    building it copies the weights to the device, which on CUDA waits for the GPU (a host-device sync)."""
    ys, xs = tile_windows(H, tile, overlap, align), tile_windows(W, tile, overlap, align)
    th, tw = min(tile, H), min(tile, W)
    if len(ys) == 1 and len(xs) == 1:
        return ys, xs, th, tw, None, None
    return ys, xs, th, tw, blend_weights(ys, th, H, overlap, device), blend_weights(xs, tw, W, overlap, device)


def tiled(fn, z: torch.Tensor, tile: int, overlap: int, align: int = 2):
    """Apply fn(z_window, (y, x, h, w)) -> tensor of the window's shape on overlapping tiles and blend."""
    H, W = z.shape[-2:]
    ys, xs, th, tw, wy, wx = _tile_plan(H, W, tile, overlap, align, z.device)
    if wy is None:
        return fn(z, (0, 0, H, W))
    out = torch.zeros_like(z, dtype=torch.float32)
    for y, a in zip(ys, wy):
        for x, b in zip(xs, wx):
            out[..., y:y + th, x:x + tw] += fn(z[..., y:y + th, x:x + tw], (y, x, th, tw)).float() * (a[:, None] * b)
    return out


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
def tiled_encode(codec, img: torch.Tensor, size: tuple[int, int], tile: int = 512, overlap: int = 64, encode=None):
    """img (B,3,H,W) in [0,1] reflect-padded to size = (H', W') → latent (B,C,H'/f,W'/f), tile by tile.

    Posterior means (mode=True), so overlapping tiles agree. The pixel codec maps every f×f block on
    its own: its tiles need no overlap and are copied, which makes tiling exact.
    encode: what encodes one tile; default codec.encode (the pipeline passes a compiled one on its fast path)."""
    encode = encode or codec.encode
    f, (Hp, Wp) = codec.factor, size
    exact = isinstance(codec, vae.PixelCodec)
    tile, overlap = max(f, tile // f * f), (0 if exact else overlap // f * f)
    ys, xs = tile_windows(Hp, tile, overlap, f), tile_windows(Wp, tile, overlap, f)
    th, tw = min(tile, Hp), min(tile, Wp)
    if len(ys) == 1 and len(xs) == 1:
        return encode(_crop(img, 0, 0, Hp, Wp) * 2 - 1, mode=True)
    wy = blend_weights([y // f for y in ys], th // f, Hp // f, overlap // f, img.device)
    wx = blend_weights([x // f for x in xs], tw // f, Wp // f, overlap // f, img.device)
    z = None
    for y, a in zip(ys, wy):
        for x, b in zip(xs, wx):
            piece = encode(_crop(img, y, x, th, tw) * 2 - 1, mode=True)  # (B, C, th/f, tw/f)
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

def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean/std of the output to the (bicubic-upscaled) input."""
    mu_s, sd_s = sr.mean((2, 3), keepdim=True), sr.std((2, 3), keepdim=True) + 1e-6
    mu_r, sd_r = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (sr - mu_s) / sd_s * sd_r + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Coarsest level of an à-trous (dilated 3×3 binomial) wavelet decomposition."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        pad = min(d, x.shape[-2] - 1, x.shape[-1] - 1)
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate" if pad < d else "reflect"), k,
                     dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Keep the output's high frequencies and take the low frequencies (colour, tone) from the input."""
    return sr - _low_pass(sr) + _low_pass(ref)


COLOR_FIX = {"none": lambda sr, ref: sr, "adain": adain_color_fix, "wavelet": wavelet_color_fix}
SEMANTIC_TILES = ("global", "per-tile", "whole")


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
                 progress=False, semantic_tiles="global", timer=None):
        """tile, tile_overlap in output pixels (None: see tile_sizes).
        semantic_tiles: global | per-tile | whole, see tile_semantics.
        timer: a StageTimer (evaluate.py) that gets the wall time of each stage (encode, semantic, dit, decode)."""
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if semantic_tiles not in SEMANTIC_TILES:
            raise ValueError(f"semantic_tiles must be one of {SEMANTIC_TILES}, got {semantic_tiles!r}")
        stage = timer or _untimed
        tile, tile_overlap = self.tile_sizes(tile, tile_overlap)
        with stage("encode"):
            lr_up, c_str = self.condition(lr, scale, tile, tile_overlap)
            H, W = lr_up.shape[-2:]

        with stage("semantic"), self.autocast():
            sem_of = self.tile_semantics(lr_up, tile, semantic_tiles)  # (y, x, h, w) in pixels -> c_sem
        ref = lr_up if color_fix != "none" else None
        del lr_up                                                      # freed unless still needed

        with stage("dit"):
            z1 = torch.randn(c_str.shape, generator=generator, dtype=torch.float32).to(self.device)  # one draw
            velocity = self.velocity(c_str, sem_of, tile, tile_overlap, guidance, alpha)
            z0 = euler_sample(velocity, z1, timesteps(steps, schedule, shift), progress, inplace=True)
            del z1, c_str, sem_of, velocity

        with stage("decode"), self.autocast():
            sr = tiled_decode(self.codec, z0, (H, W), tile, tile_overlap, self.decode).add_(1).div_(2)  # (B,3,H,W)
            return (sr if ref is None else COLOR_FIX[color_fix](sr, ref)).clamp_(0, 1)

    def tile_sizes(self, tile=None, overlap=None) -> tuple[int, int]:
        """(tile, overlap) in output pixels; None: the training crop train_grid·patch·factor (512 for the
        release: RoPE then sees integer positions, DESIGN §5b) and 1/8 of the tile. Whole latent patches."""
        unit = self.codec.factor * self.model.patch_size
        tile = max(unit, (self.model.train_grid * unit if tile is None else tile) // unit * unit)
        return tile, min(tile // 8 if overlap is None else overlap, tile // 2)

    def condition(self, lr, scale: float, tile: int, overlap: int):
        """LR (B,3,h,w) → (lr_up (B,3,H,W), c_str (B,C,H'/f,W'/f)) with H = round(scale·h), H' = H padded
        (reflect) to whole latent patches. The model was trained on the resized-back LR (DESIGN §1), so the
        LR is resized to the output size (bicubic) before it is encoded, tile by tile."""
        lr = lr.to(self.device, torch.float32)
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        lr_up = F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False).clamp_(0, 1)
        unit = self.codec.factor * self.model.patch_size
        size = (H + -H % unit, W + -W % unit)
        with self.autocast():
            return lr_up, tiled_encode(self.codec, lr_up, size, tile, overlap, self.encode).float()

    def velocity(self, c_str, sem_of, tile: int, overlap: int, guidance: float, alpha: float):
        """v(z, t, r) of the whole latent: the DiT on overlapping latent tiles (tile_velocity), cross-faded."""
        on_tile = self.tile_velocity(c_str, sem_of, guidance, alpha)
        f, p = self.codec.factor, self.model.patch_size
        return lambda z, t, r: tiled(lambda zw, win: on_tile(zw, win, t, r), z, tile // f, overlap // f, align=p)

    def tile_velocity(self, c_str, sem_of, guidance: float, alpha: float):
        """v of one latent window: a function (z_window, (y, x, h, w) in latent pixels, t, r) -> velocity.

        Teacher: guided velocity of both branches (eq. 2); student: one branch, full conditioning, r = next
        time (DESIGN §7). On the reuse_semantics fast path each tile's c_sem is projected at the first step
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


def load_pipeline(cfg: SampleConfig) -> tuple[VOSRPipeline, dict]:
    """Build the pipeline from a run dir (config.json + ema.safetensors) or a release checkpoint file."""
    if cfg.ckpt is None:
        if not DEMO_CKPT.is_dir():
            raise SystemExit(f"sample.py: no --ckpt given and the embedded demo model {DEMO_CKPT} is missing")
        cfg.ckpt = str(DEMO_CKPT)
        print(f"sample.py: no --ckpt given: using the embedded demo model {DEMO_CKPT} (a one-step student, "
              "small preset, pixel codec, trained on 118 photos: a demo, not the paper's model; for real photos "
              "use the released VOSR weights, see README)")
    ckpt = Path(cfg.ckpt)
    if ckpt.is_dir():
        conf_path, weights = ckpt / "config.json", ckpt / "ema.safetensors"
        if not conf_path.is_file() or not weights.is_file():
            raise SystemExit(f"sample.py: {ckpt} is not a run dir (needs config.json and ema.safetensors)")
        run = json.loads(conf_path.read_text())
        if (ckpt / run["semantic"]).is_file():  # a random encoder saved inside the run dir
            run["semantic"] = str(ckpt / run["semantic"])
    elif ckpt.is_file():
        weights = ckpt
        run = dict(preset=cfg.preset, codec=cfg.codec, light_decoder=cfg.light_decoder,
                   semantic=cfg.semantic, semantic_size=cfg.semantic_size, train_grid=32)
    else:
        raise SystemExit(f"sample.py: checkpoint not found: {ckpt}")
    codec = vae.load_codec(run["codec"], light_decoder=run.get("light_decoder"), device=cfg.device)
    semantic = vae.load_semantic(run["semantic"], image_size=run["semantic_size"], device=cfg.device)
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        with_r = any(k.startswith("r_embedder.") for k in f.keys())
    model = dit.build(run["preset"], latent_channels=codec.channels, with_r=with_r,
                      enc_dim=semantic.dim if semantic is not None else run.get("enc_dim", 768),
                      train_grid=run["train_grid"], patch_size=run.get("patch_size", 2))
    dit.load_release_checkpoint(model, weights)
    student = with_r if cfg.student is None else cfg.student
    pipe = VOSRPipeline(model.to(cfg.device), codec, semantic, student, cfg.device, cfg.bf16)
    return pipe, run


# ----------------------------------------------------------------------------- CLI

def _above(low, kind=float, strict=True):
    """argparse type: a `kind` number above `low` (at least `low` when not strict)."""
    def parse(text):
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        return value
    return parse


def add_sampler_args(p: argparse.ArgumentParser, d: SampleConfig):
    """The sampler's settings except the guidance scale: shared with evaluate.py sweep (which takes a list of s)."""
    p.add_argument("--steps", type=int, default=d.steps,
                   help="Euler steps (default 25 for a teacher, 1 for a distilled student; 2 or 4 also work)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="structural retention α of the partial branch (default 0.15, the middle of the "
                        "training range; 0 for a run trained with --mode cfg)")
    p.add_argument("--scale", type=_above(0), default=d.scale,
                   help="output size = round(scale · input size): 1 restores only, 2, 4 or any fraction; "
                        "the LR image is resized bicubically to that size before encoding")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial noise (per image)")
    p.add_argument("--tile", type=_above(0, int), default=d.tile,
                   help="tile side in output pixels (default: the model's training crop, 512 for the release); "
                        "peak memory depends on it, not on the image size")
    p.add_argument("--tile-overlap", type=_above(0, int, strict=False), default=d.tile_overlap,
                   help="overlap of neighbouring tiles in output pixels (default: tile/8, at most tile/2); "
                        "they are cross-faded across it")
    p.add_argument("--semantic-tiles", default=d.semantic_tiles, choices=SEMANTIC_TILES,
                   help="global: one DINOv2 token map for the whole image, each tile attends to its crop; "
                        "per-tile: DINOv2 on each tile separately; whole: every tile attends to all tokens "
                        "of the whole image resized to the encoder's size")
    p.add_argument("--color-fix", default=d.color_fix, choices=sorted(COLOR_FIX))
    p.add_argument("--schedule", default=d.schedule, choices=["uniform", "cosine"],
                   help="the n timesteps from 1 to 0: uniform, or cosine (larger steps near t = 0)")
    p.add_argument("--shift", type=_above(0), default=d.shift,
                   help="time shift σ of the schedule, t ← σt / (1 + (σ − 1)t) (SD3); 1 = none; "
                        "σ > 1 ends on larger steps, which follow the model's mean: higher PSNR, softer detail")


def parse_args(argv=None) -> SampleConfig:
    d = SampleConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=d.ckpt, help="run dir from train_teacher.py/distill.py, or a release .safetensors "
                                                  f"(default: the embedded demo model {DEMO_CKPT.name}, see README)")
    p.add_argument("-i", "--input", required=True, help="LR image or folder of LR images")
    p.add_argument("-o", "--output", default=d.output, help="output folder (same file names as the input)")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help="guidance scale s (eq. 2): 1 = full branch, 0 = partial; larger is more faithful")
    add_sampler_args(p, d)
    p.add_argument("--device", default=d.device)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the codec, semantic encoder and DiT")
    p.add_argument("--student", type=int, choices=[0, 1], default=None,
                   help="force teacher (0) / student (1) sampling; default: from the checkpoint")
    g = p.add_argument_group("bare release checkpoints (a run dir records these itself)")
    g.add_argument("--preset", default=d.preset, choices=sorted(dit.PRESETS))
    g.add_argument("--codec", default=d.codec, help="'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder")
    g.add_argument("--light-decoder", default=d.light_decoder, help="lightweight decoder .safetensors")
    g.add_argument("--semantic", default=d.semantic, help="'none', 'random' or a DINOv2 weights file")
    g.add_argument("--semantic-size", type=int, default=d.semantic_size)
    g = p.add_argument_group("fast paths (same output; python evaluate.py bench times them)")
    g.add_argument("--fast", action="store_true", help="the safe ones: --reuse-semantics --channels-last")
    g.add_argument("--reuse-semantics", action="store_true",
                   help="project the semantic tokens once per image, not at every step for both branches")
    g.add_argument("--channels-last", action="store_true", help="NHWC conv weights in the codec (faster on GPUs)")
    g.add_argument("--compile", nargs="?", const="default", default=d.compile, metavar="MODE",
                   help="torch.compile the DiT and the decoder (MODE: default, max-autotune, …); the first "
                        "image pays the compilation")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the DiT as CUDA graphs (fixed shapes: one tile size, e.g. a one-step student); CUDA only")
    a = p.parse_args(argv)
    a.student = None if a.student is None else bool(a.student)
    return SampleConfig(**vars(a))


def checkpoint_defaults(cfg: SampleConfig, pipe: VOSRPipeline, run: dict) -> SampleConfig:
    """cfg with the settings left to the checkpoint filled in: 25 steps for a teacher, 1 for a student; α = 0.15,
    or 0 for a run trained with --mode cfg (its auxiliary branch never saw c_str)."""
    return replace(cfg, steps=cfg.steps if cfg.steps is not None else 1 if pipe.student else 25,
                   alpha=cfg.alpha if cfg.alpha is not None else 0.0 if run.get("mode") == "cfg" else 0.15)


def super_resolve(pipe: VOSRPipeline, lr: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """pipe(lr) with every sampler setting of cfg; the noise is seeded with cfg.seed for each image."""
    return pipe(lr, cfg.scale, cfg.steps, cfg.guidance, cfg.alpha, torch.Generator().manual_seed(cfg.seed),
                cfg.tile, cfg.tile_overlap, cfg.color_fix, cfg.schedule, cfg.shift, semantic_tiles=cfg.semantic_tiles)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        jobs = find_jobs(cfg.input, cfg.output)   # refuses an output that would overwrite or re-read an input
    except OSError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    pipe, run = load_pipeline(cfg)
    try:
        pipe.enable(FastPaths.from_config(cfg))
    except ValueError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    cfg = checkpoint_defaults(cfg, pipe, run)
    print(f"sample.py: {cfg.ckpt} ({run['preset']}, codec {run['codec']}, "
          f"{'student' if pipe.student else 'teacher'}, {cfg.steps} step(s)), {len(jobs)} image(s) → {cfg.output}")
    failed = 0
    for src, dst in tqdm(jobs, desc="images"):
        try:
            lr = read_image(src)[None]
        except ImageError as e:
            print(f"sample.py: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        write_image(dst, super_resolve(pipe, lr, cfg)[0])
    print(f"sample.py: wrote {len(jobs) - failed} image(s), {failed} failed")
    return 1 if failed == len(jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
