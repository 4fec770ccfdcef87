"""Super-resolve images with a VOSR teacher (guided Euler, paper §3.3) or a distilled student (§3.4).

    LR ──bicubic ×scale──► LR↑ ──codec.encode──► c_str          (structural condition)
    LR↑ ──semantic encoder──► c_sem                               (semantic condition)
    z_1 ~ N(0, I) ──Euler, t: 1 → 0, guided velocity (eq. 2)──► z_0 ──codec.decode──► SR

Teacher: v = v_pcond + s·(v_cond − v_pcond)   (eq. 2), both branches in one batch of 2B;
         v_cond = v(z, t | c_str, c_sem), v_pcond = v(z, t | α·c_str, ∅), α = 0.15.
Student: one branch only (guidance was baked in by ω during distillation); each step predicts
         f(z, t_i, r = t_{i+1}) and jumps z ← z − (t_i − t_{i+1})·f.

Images larger than --tile are processed as overlapping latent tiles whose velocities are blended
with Gaussian weights at every step; the noise is drawn once for the whole latent, and the
semantic tokens are computed once for the whole image, so tiles agree with each other.

    python sample.py --ckpt RUN_DIR -i LR_DIR -o OUT_DIR [--steps 25] [--guidance 0.5]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dit
import vae
from degrade import ImageError, find_images, read_image, write_image


@dataclass
class SampleConfig:
    ckpt: str | None = None          # run dir (config.json + ema.safetensors) or a release .safetensors
    input: str = ""                  # LR image or folder
    output: str = "out"
    steps: int = 25                  # 25 for the teacher, 1 (or 2, 4) for a student
    guidance: float = 0.5            # s in eq. 2; 1 = full branch, 0 = partial branch
    alpha: float | None = None       # α of the partial branch; None: 0.15 (0 for a standard-CFG run)
    scale: float = 4.0
    seed: int = 0
    tile: int = 512                  # tile side in output pixels; larger images are tiled
    tile_overlap: int = 64           # overlap between tiles in output pixels
    color_fix: str = "none"          # none | adain | wavelet
    schedule: str = "uniform"        # uniform | cosine
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    bf16: bool = False
    # needed only for a bare release checkpoint (a run dir records them in config.json)
    preset: str = "0.5B"
    codec: str = "pixel"
    light_decoder: str | None = None
    semantic: str = "none"
    semantic_size: int = 448
    student: bool | None = None      # None: decided by the checkpoint (has r_embedder ⇒ student)


# ----------------------------------------------------------------------------- guidance (eq. 2)

def guided_velocity(model, z, t, c_str, c_sem, guidance_scale=0.5, alpha=0.15, r=None):
    """v = v_pcond + s·(v_cond − v_pcond) (eq. 2); both branches run as one batch of 2B."""
    if guidance_scale == 1.0:  # pure full branch: skip the partial one
        return model(torch.cat([c_str, z], 1), t, c_sem, r)
    x = torch.cat([torch.cat([c_str, z], 1), torch.cat([alpha * c_str, z], 1)])  # (2B, 2C, h, w)
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])  # ∅ = zero tokens
    rr = None if r is None else r.repeat(2)
    v_cond, v_pcond = model(x, t.repeat(2), sem, rr).chunk(2)
    return v_pcond + guidance_scale * (v_cond - v_pcond)


def timesteps(n: int, schedule: str = "uniform") -> torch.Tensor:
    """t_0 = 1 > t_1 > … > t_n = 0 (uniform, or t_i = cos(π/2 · i/n))."""
    i = torch.arange(n + 1, dtype=torch.float64) / n
    t = 1 - i if schedule == "uniform" else torch.cos(math.pi / 2 * i)
    t[-1] = 0.0
    return t.float()


@torch.no_grad()
def euler_sample(velocity, z1: torch.Tensor, ts: torch.Tensor, progress: bool = False):
    """Integrate dz/dt = v from t = 1 to 0: z ← z − (t_i − t_{i+1})·v(z, t_i, t_{i+1})."""
    z = z1
    for i in tqdm(range(len(ts) - 1), disable=not progress, leave=False, desc="steps"):
        t, r = ts[i].item(), ts[i + 1].item()
        tt = torch.full((z.shape[0],), t, device=z.device)
        rr = torch.full((z.shape[0],), r, device=z.device)
        z = z - (t - r) * velocity(z, tt, rr).float()
    return z


# ----------------------------------------------------------------------------- latent tiling

def tile_windows(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of windows of length `tile` covering [0, size), last one flush with the end."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def gaussian_weight(h: int, w: int, device) -> torch.Tensor:
    """Separable Gaussian bump (σ = side/4), so tile centres dominate and borders fade out."""
    def bump(n):
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 4)) ** 2)
    return bump(h)[:, None] * bump(w)[None, :]  # (h, w)


def tiled(fn, z: torch.Tensor, tile: int, overlap: int, align: int = 2):
    """Apply fn(z_window, (y, x, h, w)) -> tensor of the window's shape on overlapping tiles and blend."""
    H, W = z.shape[-2:]
    ys, xs = tile_windows(H, tile, overlap, align), tile_windows(W, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(z, (0, 0, H, W))
    th, tw = min(tile, H), min(tile, W)
    out = torch.zeros_like(z, dtype=torch.float32)
    weight = gaussian_weight(th, tw, z.device)
    wsum = torch.zeros(H, W, device=z.device)
    for y in ys:
        for x in xs:
            out[..., y:y + th, x:x + tw] += fn(z[..., y:y + th, x:x + tw], (y, x, th, tw)).float() * weight
            wsum[y:y + th, x:x + tw] += weight
    return out / wsum


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


# ----------------------------------------------------------------------------- the pipeline

class VOSRPipeline:
    """LR image (B,3,h,w) in [0,1] → SR image (B,3,round(S·h),round(S·w)) in [0,1]."""

    def __init__(self, model, codec, semantic=None, student: bool = False, device="cpu", bf16=False):
        self.model, self.codec, self.semantic = model.eval(), codec, semantic
        self.student, self.device, self.bf16 = student, torch.device(device), bf16

    @torch.no_grad()
    def __call__(self, lr, scale=4.0, steps=25, guidance=0.5, alpha=0.15, generator=None,
                 tile=512, tile_overlap=64, color_fix="none", schedule="uniform", progress=False):
        lr = lr.to(self.device, torch.float32)
        H, W = round(lr.shape[-2] * scale), round(lr.shape[-1] * scale)
        # The model was trained on the resized-back LR (DESIGN §1): bicubic to the output size first.
        lr_up = F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
        unit = self.codec.factor * self.model.patch_size  # latent must hold whole patches
        ph, pw = -H % unit, -W % unit
        x = F.pad(lr_up, (0, pw, 0, ph), mode="replicate" if min(H, W) < 2 else "reflect")
        c_str = self.codec.encode(x * 2 - 1)                          # (B, C, H'/8, W'/8)
        c_sem = None if self.semantic is None else self.semantic(lr_up)  # (B, N, enc_dim), whole image
        z1 = torch.randn(c_str.shape, generator=generator, dtype=torch.float32).to(self.device)

        tile_lat = max(2, tile // self.codec.factor)
        overlap_lat = tile_overlap // self.codec.factor

        def velocity(z, t, r):
            def on_tile(zw, win):
                y, x0, h, w = win
                cw = c_str[..., y:y + h, x0:x0 + w]
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    if self.student:  # one branch, full conditioning; r = next time (DESIGN §7)
                        return self.model(torch.cat([cw, zw], 1), t, c_sem, r)
                    return guided_velocity(self.model, zw, t, cw, c_sem, guidance, alpha)
            return tiled(on_tile, z, tile_lat, overlap_lat, align=self.model.patch_size)

        z0 = euler_sample(velocity, z1, timesteps(steps, schedule), progress)
        sr = (self.codec.decode(z0.to(c_str.dtype)).float()[..., :H, :W] + 1) / 2
        return COLOR_FIX[color_fix](sr, lr_up).clamp(0, 1)


def load_pipeline(cfg: SampleConfig) -> tuple[VOSRPipeline, dict]:
    """Build the pipeline from a run dir (config.json + ema.safetensors) or a release checkpoint file."""
    if cfg.ckpt is None:
        raise SystemExit("sample.py: --ckpt is required (a run dir or a .safetensors checkpoint)")
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

def parse_args(argv=None) -> SampleConfig:
    d = SampleConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=d.ckpt, help="run dir from train_teacher.py/distill.py, or a release .safetensors")
    p.add_argument("-i", "--input", required=True, help="LR image or folder of LR images")
    p.add_argument("-o", "--output", default=d.output, help="output folder (same file names as the input)")
    p.add_argument("--steps", type=int, default=d.steps, help="Euler steps: 25 for a teacher, 1–4 for a student")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help="guidance scale s (eq. 2): 1 = full branch, 0 = partial; larger is more faithful")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="structural retention α of the partial branch (default 0.15, the middle of the "
                        "training range; 0 for a run trained with --mode cfg)")
    p.add_argument("--scale", type=float, default=d.scale, help="output size = round(scale · input size)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial noise (per image)")
    p.add_argument("--tile", type=int, default=d.tile, help="tile side in output pixels")
    p.add_argument("--tile-overlap", type=int, default=d.tile_overlap, help="tile overlap in output pixels")
    p.add_argument("--color-fix", default=d.color_fix, choices=sorted(COLOR_FIX))
    p.add_argument("--schedule", default=d.schedule, choices=["uniform", "cosine"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the DiT")
    p.add_argument("--student", type=int, choices=[0, 1], default=None,
                   help="force teacher (0) / student (1) sampling; default: from the checkpoint")
    g = p.add_argument_group("bare release checkpoints (a run dir records these itself)")
    g.add_argument("--preset", default=d.preset, choices=sorted(dit.PRESETS))
    g.add_argument("--codec", default=d.codec, help="'pixel' or a diffusers VAE folder")
    g.add_argument("--light-decoder", default=d.light_decoder, help="lightweight decoder .safetensors")
    g.add_argument("--semantic", default=d.semantic, help="'none', 'random' or a DINOv2 weights file")
    g.add_argument("--semantic-size", type=int, default=d.semantic_size)
    a = p.parse_args(argv)
    a.student = None if a.student is None else bool(a.student)
    return SampleConfig(**vars(a))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        files = find_images(cfg.input)
    except FileNotFoundError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"sample.py: no images found in {cfg.input}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.output)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"sample.py: output path {out_dir} is a file, not a folder", file=sys.stderr)
        return 2
    pipe, run = load_pipeline(cfg)
    print(f"sample.py: {cfg.ckpt} ({run['preset']}, codec {run['codec']}, "
          f"{'student' if pipe.student else 'teacher'}), {len(files)} image(s) → {out_dir}")
    if cfg.alpha is None:
        cfg.alpha = 0.0 if run.get("mode") == "cfg" else 0.15
    root = Path(cfg.input) if Path(cfg.input).is_dir() else Path(cfg.input).parent
    failed = 0
    for path in tqdm(files, desc="images"):
        try:
            lr = read_image(path)[None]
        except ImageError as e:
            print(f"sample.py: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        g = torch.Generator().manual_seed(cfg.seed)
        sr = pipe(lr, cfg.scale, cfg.steps, cfg.guidance, cfg.alpha, g, cfg.tile, cfg.tile_overlap,
                  cfg.color_fix, cfg.schedule)
        write_image(out_dir / path.relative_to(root).with_suffix(".png"), sr[0])
    print(f"sample.py: wrote {len(files) - failed} image(s), {failed} failed")
    return 1 if failed == len(files) else 0


if __name__ == "__main__":
    sys.exit(main())
