"""Train the multi-step VOSR teacher: flow matching with partial conditioning (paper §3.1–3.3).

Per training step, on the training device:
    HR crop ──degrade (resize back)──► LR↑ ──codec──► c_str,   HR ──codec──► x0,   LR↑ ──DINOv2──► c_sem
    κ per sample: full (noise-augmented c_str, c_sem) or partial (α·c_str, ∅)      (§3.3)
    t ~ U(0,1), ε ~ N(0,I), z_t = (1−t)·x0 + t·ε, loss ‖v_θ(z_t, t, κ) − (ε − x0)‖²  (eq. 1)

One GPU:      python train_teacher.py --data DIR --out RUN_DIR --preset small
Several GPUs: torchrun --nproc_per_node=8 train_teacher.py --data DIR --out RUN_DIR --preset 0.5B-stage1
CPU smoke:    python train_teacher.py --data DIR --out RUN_DIR --preset tiny --codec pixel --semantic random \
                  --size 128 --batch 8 --steps 200

Stage 2 from stage 1: --preset 0.5B-stage2 --init STAGE1_RUN_DIR (its EMA weights; a fresh optimiser, step 0).

RUN_DIR holds config.json (the resolved config), ckpt.safetensors (model, EMA, optimiser, step),
ema.safetensors (EMA weights in the release layout: what sample.py loads), log.jsonl and val_*.png.
All randomness of step k is drawn from generators seeded by (seed, k), so --resume continues exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import degrade
import dit
import vae
from sample import VOSRPipeline


@dataclass
class TrainConfig:
    data: str = ""                    # folder of HR images (recursive)
    out: str = "runs/teacher"
    val_data: str | None = None       # held-out HR folder: validation loss + LR|sample|HR grid
    preset: str = "tiny"              # model preset of dit.py
    patch_size: int = 2               # DiT patch side in latent pixels (2 in the paper)
    codec: str = "pixel"              # 'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder
    light_decoder: str | None = None  # lightweight decoder .safetensors (sampling only)
    semantic: str = "random"          # 'none', 'random' (seeded ViT-S/14) or a DINOv2 weights file
    semantic_size: int = 224          # input side of the semantic encoder (448 in the paper)
    degradation: str = "realesrgan"   # realesrgan | bicubic
    size: int = 128                   # HR crop side
    batch: int = 8                    # global batch (all ranks × accumulation)
    grad_accum: int = 1
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.9999
    mode: str = "partial"             # partial | cfg | full   (Table 7 ablations)
    p_partial: float = 0.1            # probability of the auxiliary branch per sample
    alpha_min: float = 0.05           # α ~ U[alpha_min, alpha_max] in the partial branch
    alpha_max: float = 0.25
    # Noise augmentation of c_str: a = sigmoid(N(aug_mean, aug_std)), noise std sqrt(1 − a²) ≈ 0.12 at 5.
    # The paper's 5 is for VAE latents; on raw pixels (pixel codec) that noise buries the LR's fine
    # detail and the model learns to smooth it — 8 (std ≈ 0.03) learned faster there (README).
    aug_mean: float = 5.0
    aug_std: float = 1.0
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
    init: str | None = None           # start from a run's EMA weights (stage 2 from stage 1, a fine-tune)
    skip_nonfinite: int = 0           # tolerate this many non-finite losses before stopping
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# Presets set defaults; any flag given on the command line wins. Paper recipes: appendix, Table 8.
PRESETS = {
    # CPU recipes for the 192-channel pixel codec use patch 1: with patch 2 a token would carry
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


# ----------------------------------------------------------------------------- data

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one step's draws: the RNG state *is* (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7919 + stream) % 2**63)


class HRCrops(torch.utils.data.Dataset):
    """Sample i → a random crop (and flip) of a random image; the randomness is a function of i."""

    def __init__(self, root: str, size: int, seed: int, cache: bool = False):
        self.files, self.size, self.seed = degrade.find_images(root), size, seed
        if not self.files:
            raise SystemExit(f"train_teacher.py: no images found in {root}")
        self.bad: set[int] = set()
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

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
                print(f"train_teacher.py: skipping {e}", file=sys.stderr)
                self.bad.add(k)
                if len(self.bad) == len(self.files):
                    raise SystemExit("train_teacher.py: no readable images") from e
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


@torch.no_grad()
def make_condition(hr, cfg: TrainConfig, codec, semantic, g: torch.Generator):
    """HR (B,3,S,S) in [0,1] → x0 (B,C,S/8,S/8), c_str (same), c_sem (B,N,D) or None, LR (B,3,S/4,S/4)."""
    if cfg.degradation == "bicubic":
        lr = degrade.degrade_bicubic(hr)
    else:
        lr = degrade.degrade(hr, generator=g)
    # resize back exactly as sample.py does at inference (bicubic, clamped)
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    x0 = codec.encode(hr * 2 - 1)
    c_str = codec.encode(lr_up * 2 - 1)
    c_sem = None if semantic is None else semantic(lr_up)
    return x0, c_str, c_sem, lr


# ----------------------------------------------------------------------------- conditioning (§3.3)

def noise_augment(c_str, a_logit, n):
    """Full branch: c̃ = a·c_str + sqrt(1 − a²)·n, a = sigmoid(N(5, 1)) per sample."""
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

def interpolate(x0, eps, t):
    """z_t = (1 − t)·x0 + t·ε: the straight path from data (t = 0) to noise (t = 1)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps


def flow_matching_loss(model, x0, c_str, c_sem, t, eps):
    """L_ms = ‖v_θ(z_t, t, κ) − v_t‖², v_t = ε − x0  (eq. 1)."""
    z_t = interpolate(x0, eps, t)
    v_hat = model(torch.cat([c_str, z_t], 1), t, c_sem)
    return F.mse_loss(v_hat.float(), (eps - x0).float())


def slice_rank(x, rank, world):
    """This rank's share of a tensor drawn for the whole global batch."""
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


# ----------------------------------------------------------------------------- EMA and checkpoints

@torch.no_grad()
def ema_update(ema, model, decay: float):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1 - decay)


def save_atomic(tensors: dict, path: Path, metadata: dict | None = None):
    """safetensors, written atomically: a crash never leaves a half-written file."""
    with degrade.atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json(obj: dict, path: Path):
    """config.json and the like, written atomically."""
    with degrade.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def save_checkpoint(run: Path, model, ema, opt, step: int):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        tensors |= {f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)) for k, v in st.items()}
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"])}
    save_atomic(tensors, run / "ckpt.safetensors", meta)
    save_atomic(ema.state_dict(), run / "ema.safetensors")


def load_checkpoint(path: Path, model, ema, opt) -> int:
    """Restore model, EMA and optimiser from ckpt.safetensors; returns the step to continue from."""
    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("ema.")})
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
        dit.load_release_checkpoint(model, str(f), own_rope=True)
    except ValueError as e:  # another preset or codec: the loader names the key
        raise SystemExit(f"{name}: --init {path} does not fit this model: {e}") from e
    ema.load_state_dict(model.state_dict())
    print(f"{name}: weights from {f}")


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(cfg, ema, codec, semantic, val_hr, step, run: Path, device, student=False) -> dict:
    """EMA weights on held-out crops: flow-matching loss of the full branch at fixed t, PSNR of
    samples (`val_steps` guided Euler steps; a student: its own step count) and an LR | SR | HR grid."""
    x0, c_str, c_sem, lr = make_condition(val_hr, cfg, codec, semantic, step_generator(cfg.seed, 0, 9))
    eps = torch.randn(x0.shape, generator=step_generator(cfg.seed, 0, 10)).to(device)
    losses = [flow_matching_loss(ema, x0, c_str, c_sem, torch.full((len(x0),), t, device=device), eps).item()
              for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    pipe = VOSRPipeline(ema, codec, semantic, student=student, device=device, bf16=cfg.bf16)
    guidance = 1.0 if cfg.mode == "full" else 0.5  # a full-only model has no partial branch
    alpha = 0.0 if cfg.mode == "cfg" else 0.15     # standard CFG's auxiliary branch had no c_str
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


# ----------------------------------------------------------------------------- setup and loop

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
        semantic = vae.load_semantic(cfg.semantic, image_size=cfg.semantic_size, device=device, seed=cfg.seed)
    except (FileNotFoundError, ValueError) as e:  # a missing or invalid folder/file: say which, no traceback
        raise SystemExit(f"train_teacher.py: {e}") from e
    kw = dict(latent_channels=codec.channels, patch_size=cfg.patch_size,
              enc_dim=semantic.dim if semantic is not None else 768,
              train_grid=cfg.size // codec.factor // cfg.patch_size)
    model = dit.build(cfg.preset, grad_ckpt=cfg.grad_ckpt, **kw).to(device)
    if cfg.patch_size**2 * codec.channels > model.dim:
        print(f"train_teacher.py: warning: a token carries {cfg.patch_size**2 * codec.channels} latent values, "
              f"more than the model width {model.dim}; the output cannot span the noise (use --patch-size 1)",
              file=sys.stderr)
    ema = dit.build(cfg.preset, **kw).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    return codec, semantic, model, ema


def write_run_config(cfg: TrainConfig, run: Path, model, semantic):
    """config.json: the resolved training config plus what sample.py needs to rebuild the model."""
    conf = dataclasses.asdict(cfg) | {"train_grid": model.train_grid, "enc_dim": model.enc_dim}
    if semantic is not None and cfg.semantic.startswith("random"):
        vae.save_semantic(semantic, run / "semantic.safetensors")  # random init travels with the run
        conf["semantic"] = "semantic.safetensors"
    write_json(conf, run / "config.json")


def draw_teacher(cfg: TrainConfig, latent_shape, g: torch.Generator) -> dict:
    """One step's random draws for the whole global batch: t, ε and the conditioning mode κ."""
    t = torch.rand(cfg.batch, generator=g)
    eps = torch.randn((cfg.batch, *latent_shape), generator=g)
    aux, alpha, a_logit, n = draw_conditioning_noise(cfg, eps, g)
    return dict(t=t, eps=eps, aux=aux, alpha=alpha, a_logit=a_logit, n=n)


def teacher_loss(cfg: TrainConfig, net, x0, c_str, c_sem, d: dict):
    """κ per sample (§3.3), then the flow-matching loss (eq. 1)."""
    c_str_k, c_sem_k = build_conditions(c_str, c_sem, cfg.mode, d["aux"], d["alpha"], d["a_logit"], d["n"])
    return flow_matching_loss(net, x0, c_str_k, c_sem_k, d["t"], d["eps"])


def fit(cfg, model, ema, codec, semantic, draw, loss_fn, env, student=False, name="train_teacher.py") -> dict:
    """The training loop shared by the teacher and distillation: data, accumulation, DDP, EMA,
    checkpoints, logging, validation. `draw(cfg, latent_shape, g)` returns the step's random draws
    for the global batch; `loss_fn(net, x0, c_str, c_sem, draws)` the loss of one micro-batch.
    Returns {step: loss} for the steps this call ran."""
    rank, world, device = env
    if cfg.batch % (world * cfg.grad_accum):
        raise SystemExit(f"--batch {cfg.batch} must divide by world size × grad_accum = {world * cfg.grad_accum}")
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise SystemExit(f"{name}: --out {run} is a file, not a folder")
    run.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")  # one kernel for all parameters
    start = 0
    if cfg.resume and (run / "ckpt.safetensors").exists():
        start = load_checkpoint(run / "ckpt.safetensors", model, ema, opt)
        for group in opt.param_groups:  # the flags win over the saved hyper-parameters (a cool-down)
            group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        if rank == 0:
            print(f"{name}: resumed {run} at step {start}")
    if rank == 0:
        write_run_config(cfg, run, model, semantic)
    if cfg.compile:
        dit.compile_blocks(model)  # block by block: seconds to compile, not minutes
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    micro = cfg.batch // world // cfg.grad_accum
    loader = iter(torch.utils.data.DataLoader(
        HRCrops(cfg.data, cfg.size, cfg.seed, cfg.cache_images), batch_size=micro,
        sampler=StepSampler(start, cfg.steps, cfg.batch, rank, world),
        num_workers=cfg.workers, pin_memory=device.type == "cuda"))
    val_hr = load_val(cfg, device) if rank == 0 else None
    log = open(run / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0,
               desc=name.removesuffix(".py"))
    history, bad, t0 = {}, 0, time.time()
    for step in bar:
        # Draws for the whole global batch come from (seed, step), and each rank takes the slice of
        # its images: the same samples and noise whatever the number of GPUs (only the Real-ESRGAN
        # degradation draws are per rank).
        g = step_generator(cfg.seed, step)
        draws, loss_sum = None, 0.0
        for k in range(cfg.grad_accum):
            hr = next(loader).to(device, non_blocking=True)
            x0, c_str, c_sem, _ = make_condition(hr, cfg, codec, semantic,
                                                 step_generator(cfg.seed, step, 100 + rank * cfg.grad_accum + k))
            draws = draws or draw(cfg, x0.shape[1:], g)
            lo = rank * (micro * cfg.grad_accum) + k * micro  # the same global indices as the images
            d = {key: v[lo:lo + micro].to(device) for key, v in draws.items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(net, x0, c_str, c_sem, d)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_val = float(loss_sum)
        if not math.isfinite(loss_val):
            bad += 1
            opt.zero_grad(set_to_none=True)
            if bad > cfg.skip_nonfinite:
                print(f"{name}: non-finite loss ({loss_val}) at step {step}; the last good checkpoint is kept",
                      file=sys.stderr)
                raise SystemExit(3)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # EMA warm-up keeps short runs meaningful; it reaches `cfg.ema` after ~10/(1−ema) steps.
        ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        history[step] = loss_val
        done = step + 1
        if rank == 0:
            ips = (done - start) * cfg.batch / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{ips:.1f}")
            rec = {"step": done, "loss": loss_val, "img_per_s": round(ips, 2)}
            if val_hr is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                rec |= validate(cfg, ema, codec, semantic, val_hr, done, run, device, student)
                bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("val")))
            if done % cfg.log_every == 0 or "val_psnr" in rec:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save_checkpoint(run, model, ema, opt, done)
    if log:
        log.close()
    return history


def train(cfg: TrainConfig) -> dict:
    """Train the teacher; returns {step: loss}."""
    env = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    codec, semantic, model, ema = build_models(cfg, env[2])
    if cfg.init and not (cfg.resume and (Path(cfg.out) / "ckpt.safetensors").exists()):
        init_weights(cfg.init, model, ema)
    try:
        return fit(cfg, model, ema, codec, semantic, draw_teacher, partial(teacher_loss, cfg), env)
    finally:
        if env[1] > 1:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- benchmark (--bench)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def dit_flops(model, tokens: int, sem_tokens: int) -> float:
    """Forward FLOPs of one image (2 per multiply-add). Per block and token: qkv + proj 4d², cross q +
    proj 2d², SwiGLU 3·h·d = 8d², attention scores and mixing 2·d·(N + M); per image: cross k, v
    2·d²·M. Plus the semantic projection (4·768·d-like) and patch embed / final layer."""
    d, L, N, M = model.dim, model.depth, tokens, sem_tokens
    h = int(2 / 3 * 4 * d)
    per_block = N * (6 * d * d + 3 * h * d + 2 * d * (N + M)) + 2 * d * d * M
    io = N * (2 * model.latent_channels * model.patch_size**2 * d + d * model.patch_size**2 * model.latent_channels)
    sem = M * (model.enc_dim * 3 * d + 3 * d * d)
    return 2.0 * (L * per_block + io + sem)


def bench(preset: str, size: int, batch: int, steps: int, device: str, bf16: bool, compile_: bool,
          latent_channels: int = 4, factor: int = 8, sem_tokens: int = 1024, enc_dim: int = 768) -> dict:
    """Time training steps of the DiT alone (random weights, real shapes) → images/s, TFLOP/s, MFU.
    Training FLOPs = 3 × forward (the backward pass costs twice the forward)."""
    dev = torch.device(device)
    model = dit.build(preset, latent_channels=latent_channels, enc_dim=enc_dim,
                      train_grid=size // factor // 2).to(dev)
    if compile_:
        dit.compile_blocks(model)  # in place, as --compile in training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=dev.type == "cuda")
    h = size // factor
    x0, c_str = torch.randn(batch, latent_channels, h, h, device=dev), torch.randn(batch, latent_channels, h, h, device=dev)
    c_sem, eps = torch.randn(batch, sem_tokens, enc_dim, device=dev), torch.randn_like(x0)

    def one_step():
        t = torch.rand(batch, device=dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, x0, c_str, c_sem, t, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        one_step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    flops = 3 * batch * dit_flops(model, (h // 2) ** 2, sem_tokens)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return {"device": name, "torch": torch.__version__, "preset": preset, "size": size, "batch": batch,
            "bf16": bf16, "compile": compile_, "step_s": sec, "img_per_s": batch / sec,
            "tflops": flops / sec / 1e12, "mfu": None if peak is None or not bf16 else flops / sec / 1e12 / peak}


def config_parser(config_cls, doc: str) -> argparse.ArgumentParser:
    """Every field of the config dataclass becomes a flag whose default is None (= not given)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {f.default}")
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=f"default {f.default!r}")
    return p


def parse_args(argv=None) -> TrainConfig:
    """--preset fills defaults (PRESETS, or a bare dit.py model preset); explicit flags win."""
    p = config_parser(TrainConfig, __doc__)
    a = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = a.pop("preset", "tiny")
    if preset not in PRESETS and preset not in dit.PRESETS:
        p.error(f"--preset {preset}: choose from {sorted(set(PRESETS) | set(dit.PRESETS))}")
    if a.get("mode", "partial") not in ("partial", "cfg", "full"):
        p.error("--mode must be partial, cfg or full")
    return TrainConfig(**(PRESETS.get(preset, {"preset": preset}) | a))


def bench_main(argv) -> None:
    """python train_teacher.py --bench [--preset 0.5B] [--size 512] [--batch 8] [--bf16] [--compile]"""
    p = argparse.ArgumentParser(description="training throughput of the DiT (random weights, real shapes)")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--preset", default="small", choices=sorted(dit.PRESETS))
    p.add_argument("--size", type=int, default=256, help="HR crop side (latent = size/8, SD-VAE shapes)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bench-json", default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    r = bench(a.preset, a.size, a.batch, a.steps, a.device, a.bf16, a.compile)
    print("FLOPs/image (train) = 3 × 2 × [depth·(N·(6d² + 3hd + 2d(N+M)) + 2d²M) + embed/final + semantic MLP]")
    for k, v in r.items():
        print(f"{k:>10}: {v:.4g}" if isinstance(v, float) else f"{k:>10}: {v}")
    if a.bench_json:
        Path(a.bench_json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    if "--bench" in sys.argv[1:]:
        bench_main(sys.argv[1:])
        sys.exit(0)
    cfg = parse_args()
    if not cfg.data:
        raise SystemExit("train_teacher.py: --data DIR is required")
    train(cfg)
