"""sample.py's settings and command line: SampleConfig, its flags with their range checks, parse_args.

Plumbing of sample.py, not the paper's method; evaluate.py sweep shares the sampler's flags (add_sampler_args)
and tools/bench_sample.py the parser. The sampler itself (sample.sample, sample.VOSRPipeline) takes plain
arguments; sample.super_resolve passes it a SampleConfig's.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import dit
from tools import dtypes
from tools.cli import OneLineParser, number
from tools.color_fix import COLOR_FIX
from tools.loading import DEFAULT_CKPT

SEMANTIC_TILES, UPSCALE, TILE_BLEND, LATENT, LAPPED = (
    ("global", "per-tile", "whole"), ("torch", "pil"), ("linear", "gaussian"), ("mean", "sample"), ("off", "on"))
TILE_SHAPE = ("fit", "square")


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
    color_fix: str | None = None     # none | adain | wavelet (release) | adain-var | wavelet-atrous
    upscale: str | None = None       # torch | pil
    tile_blend: str | None = None    # linear | gaussian
    tile_shape: str = "fit"          # fit (ours) | square (the release's: short-side squares)
    lapped: str | None = None        # off | on: (ours) sample.LappedDiT, the DiT also on half-token-shifted grids
    vae_tile: int | None = None      # tile side of the codec in output pixels; None: --tile; 0: the whole image
    latent: str = "mean"             # mean | sample: c_str from the codec posterior's mean or a sample
    schedule: str = "uniform"        # uniform | cosine
    shift: float = 1.0               # (ours) SD3 time shift of the schedule; > 1: larger last steps
    start: float | None = None       # (ours) first time of the sampler; < 1 starts from the noised LR↑
    device: str = "cuda" if torch.cuda.is_available() else "cpu"   # --device auto resolves to it
    dtype: str | None = None         # fp32 | bf16 | fp16; None: dtypes.default_dtype
    bf16: bool = False               # --bf16: the same as dtype "bf16"
    overwrite: bool = False          # replace existing output files
    skip_existing: bool = False      # keep existing outputs, compute only the missing ones
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


SAMPLER_FLAGS = {  # SampleConfig field → (argparse type, or a tuple of choices; help, {d} = the defaults)
    "steps": (number(int, 1), "Euler steps, at least 1 (default: 1 for a distilled student; for a teacher 25, or a "
              "release folder's infer_steps; a student also takes 2 or 4)"),
    "alpha": (number(float, 0, 1), "structural retention α of the partial branch, in [0, 1] (default: 0.15, the "
              "middle of the training range, or the mean of a release's weak_cond_strength_aelq_list; 0 for a run "
              "trained with --mode cfg)"),
    "scale": (number(float, 0, low_open=True), "output size = round(scale · input size), above 0: 1 restores only, "
              "2, 4 or any fraction (default: {d.scale:g})"),
    "seed": (int, "seed of the initial noise, per image (default: {d.seed})"),
    "tile": (number(int, 0), "tile side in output pixels (default: the run dir's config.json sampler_defaults, e.g. "
             "128 for the shipped demo, else the model's training crop, 512 for the release); peak memory depends "
             "on it, not on the image size; at least half the training crop, rounded down to whole latent patches; "
             "0: no tiling, the whole image in one window (the official scripts' default)"),
    "tile_overlap": (number(int, 0), "overlap of neighbouring tiles in output pixels, below tile/2 (default: tile/8; "
                     "--tile-blend gaussian raises it to at least tile/8, as the official scripts)"),
    "tile_blend": (TILE_BLEND, "how overlapping DiT tiles are blended: linear ramps across the overlap, or the "
                   "official scripts' Gaussian window (σ = 0.1 × tile side, centred on the tile) (default: gaussian "
                   "for a release folder, linear otherwise)"),
    "lapped": (LAPPED, "(ours) also run the DiT on its token grid shifted by half a token down, right and both, and "
               "cross-fade the four velocities: no grid at token edges, 4× the DiT's cost; needs an even token side "
               "(pixel codecs) (default: the run dir's config.json sampler_defaults, on for the shipped default "
               "model; off otherwise)"),
    "tile_shape": (TILE_SHAPE, "the DiT's latent tiles: fit (ours: min(tile, side) along each "
                   "axis) or square (the official scripts: squares of min(tile, the latent's short "
                   "side), overlap at least side/8, unless both sides fit one tile) "
                   "(default: {d.tile_shape})"),
    "vae_tile": (number(int, 0), "tile side of the codec (VAE) in output pixels (default: --tile); 0: the whole "
                 "image at once, as the official scripts"),
    "semantic_tiles": (SEMANTIC_TILES, "global: one DINOv2 token map for the whole image, each tile attends to its "
                       "crop; per-tile: DINOv2 on each tile's LR crop (the official scripts); whole: every tile "
                       "attends to all tokens of the whole image resized to the encoder's size (default: "
                       "{d.semantic_tiles})"),
    "color_fix": (tuple(sorted(COLOR_FIX)), "colour correction of the clamped 8-bit output against the upscaled LR: "
                  "the official scripts' adain (per-channel mean and std + 1e-5) and wavelet "
                  "(OpenCV Gaussian low pass, sigma 5, truncated to 8 bits), or ours: adain-var "
                  "(sqrt(var + 1e-5)), wavelet-atrous (5-level à-trous low pass) (default: adain "
                  "for a release folder, as the official scripts; none otherwise)"),
    "upscale": (UPSCALE, "how the LR is resized to the output size before encoding: pil (PIL bicubic on the 8-bit "
                "image, the official scripts) or torch (bicubic in float, what train_teacher.py's resize-back does) "
                "(default: pil for a release folder or a run trained with --resize-back release, torch otherwise)"),
    "latent": (LATENT, "c_str from the VAE posterior's mean or a sample of it (the official scripts sample) "
               "(default: {d.latent})"),
    "schedule": (("uniform", "cosine"), "the n timesteps from 1 to 0: uniform, or cosine (larger steps near t = 0) "
                 "(default: {d.schedule})"),
    "shift": (number(float, 0, low_open=True), "time shift σ of the schedule, above 0, t ← σt / (1 + (σ − 1)t) "
              "(SD3); 1 = none; σ > 1 ends on larger steps, which follow the model's mean: higher PSNR, softer "
              "detail (default: {d.shift:g})"),
    "start": (number(float, 0, 1, low_open=True), "(ours) fidelity: the time the sampler starts at, in "
              "(0, 1]; 1 starts from noise (the paper); below 1 from the upscaled LR noised to that "
              "time (SDEdit-style), so lower keeps more of the input and invents less (default: the "
              "run dir's config.json sampler_defaults, 0.4 for the shipped default model; 1 otherwise)"),
}


def add_sampler_args(p: argparse.ArgumentParser, d: SampleConfig):
    """The sampler's settings except the guidance scale: shared with evaluate.py sweep (which takes a list of s)."""
    for name, (kind, text) in SAMPLER_FLAGS.items():
        how = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        p.add_argument("--" + name.replace("_", "-"), default=getattr(d, name), help=text.format(d=d), **how)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """sample.py's parser; its --help starts with `description` (sample.py's docstring)."""
    d = SampleConfig()
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=d.ckpt,
                   help="a run dir of train_teacher.py/distill.py, an official release model folder (e.g. "
                        "preset/ckpts/VOSR_0.5B_os, its codec and DINOv2 files beside it), or a bare .safetensors "
                        f"(default: the shipped default model {DEFAULT_CKPT.name}, see README)")
    p.add_argument("-i", "--input", required=True, help="LR image or folder of LR images (required)")
    p.add_argument("-o", "--output", default=d.output,
                   help=f"output folder (same file names, .png), or FILE.png for one input (default: {d.output})")
    p.add_argument("--guidance", type=number(float), default=d.guidance,
                   help="guidance scale s (eq. 2), a finite number: 1 = full branch, 0 = partial; larger is more "
                        f"faithful; a student ignores it (default: {d.guidance:g}; the official scripts' "
                        "argparse default is 2, their README recommends 0.5)")
    add_sampler_args(p, d)
    p.add_argument("--device", default="auto",
                   help="torch device (cpu, cuda, cuda:1, mps) or auto: CUDA, else Apple MPS, else "
                        "the CPU (default: auto)")
    p.add_argument("--dtype", choices=tuple(dtypes.DTYPES), default=None,
                   help="number format of the codec, semantic encoder and DiT (autocast; the "
                        "sampler itself stays fp32): fp32, bf16 or fp16; each one's error and speed "
                        "in docs/precision.md (default: fp32, on every device: bf16 measured no "
                        "faster on a CPU)")
    p.add_argument("--bf16", action="store_true", help="the same as --dtype bf16")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (default: refuse to start)")
    g.add_argument("--skip-existing", action="store_true",
                   help="keep output files that already exist and compute only the missing ones: "
                        "continues a batch that was stopped")
    p.add_argument("--student", type=int, choices=[0, 1], default=None,
                   help="force teacher (0) / student (1) sampling (default: from the checkpoint: "
                        "a release folder's args.json distill_type, a run dir's r_embedder weights)")
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


def parse_args(argv=None, description: str | None = None) -> SampleConfig:
    """The flags as a SampleConfig; a bad --tile-overlap or --device is one line naming it."""
    p = build_parser(description)
    a = p.parse_args(argv)
    if a.tile and a.tile_overlap is not None and 2 * a.tile_overlap >= a.tile:
        p.error(f"argument --tile-overlap: must be below tile/2 = {a.tile / 2:g}, got {a.tile_overlap}")
    try:
        device = dtypes.resolve_device(a.device)
    except RuntimeError:
        p.error(f"argument --device: {a.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        p.error(f"argument --device: {a.device} asked for, but this machine (or this torch build) has no "
                f"{device.type.upper() if device.type == 'cuda' else device.type}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"argument --device: {a.device} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    if a.bf16 and a.dtype not in (None, "bf16"):
        p.error(f"argument --bf16: is --dtype bf16, but --dtype {a.dtype} was given too: give one")
    a.device = str(device)
    a.dtype = "bf16" if a.bf16 else a.dtype or dtypes.default_dtype(device)
    a.bf16 = a.dtype == "bf16"
    a.student = None if a.student is None else bool(a.student)
    return SampleConfig(**vars(a))
