"""Distil the multi-step teacher into a one-step student (paper §3.4; appendix A.1, eq. 5–17).

The student f_θ(z_t, t, r, κ) predicts the average velocity from time t to an earlier time r
(r = t: the instantaneous velocity). It starts as a copy of the teacher's EMA weights plus a
zero-effect r embedder (dit.py), and learns from the frozen teacher's guided velocity

    v_tea = v_pcond + ω·(v_cond − v_pcond)                                         (eq. 5)
    L_base = ‖f(z_t, t, t, κ) − v_tea‖²                                            (eq. 4/6)

plus a consistency loss for r < t — recursive consistency (rc, eq. 12–17, the paper's choice) or
the shortcut midpoint rule (shortcut, eq. 7–11, the baseline of Table 3).

One training step (the loop in main() reads in this order; its plumbing is train_teacher.py's):

    draw       (t, r) (sample_times), z_1 and κ's draws (as the teacher's) for the global batch
    condition  HR crop → z_0, c_str, c_sem (the teacher's make_condition); κ for the student (§3.3)
    loss       z_t = (1 − t)·z_0 + t·z_1;  v_tea (eq. 5);  L_base + L_rc-cons (eq. 17) or L_short-cons (eq. 11)
    step       backward → (all-reduce) → clip → AdamW → EMA → log / validate / checkpoint

    python distill.py --teacher RUN_DIR --data DIR --out STUDENT_DIR [--method rc] [--size 256] \
        [--batch 32] [--steps 50000]

The model preset, codec and semantic encoder come from the teacher's config.json. The output run
dir has the same layout as a teacher's, so `sample.py --ckpt STUDENT_DIR --steps 1` works.
Shipping a run (a student's or a teacher's) as fp16 weights: python -m tools.export RUN_DIR OUT_DIR.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from argparse import SUPPRESS
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import dit
import vae
import train_teacher as tt
from vosr import cli, files, runs
from train_teacher import TrainConfig, build_conditions, draw_teacher, interpolate

NAME = "distill.py"


@dataclass
class DistillConfig(TrainConfig):
    out: str = "runs/student"   # (the teacher's: runs/teacher)
    teacher: str = ""        # teacher run dir (config.json + ema.safetensors)
    method: str = "rc"  # rc (the paper's, appendix A.1.2) | shortcut (A.1.1)
    # distillation guidance weight ω of the teacher target (eq. 5; the release's cfg_scale 0.5)
    omega: float = 0.5
    delta: float = 0.01      # RC: teacher warm-start step Δ (eq. 13)
    n_rc: int = 2  # RC: student rollout steps from t_m to r
    # a fixed α (the released one-step models: 0.1); None: α ~ U per sample
    alpha: float | None = None


# The paper's recipe (appendix A.3 and Table 5): 50K steps, batch 32, lr 2e-5 — overridable by
# flags. (The official release's one-step configs: 100K steps at 512².) The rest as the teacher
# (appendix A.3).
DEFAULTS = dict(size=256, batch=32, steps=50_000, lr=2e-5, val_steps=1)
# --preset: recipes of defaults; the model is always the teacher's. The CPU ones are ours: 64²
# crops, lr 2e-4 and EMA 0.99 as the distillations of docs/ablations.md and docs/small_scale.md.
PRESETS = {"paper": {k: v for k, v in DEFAULTS.items() if k != "val_steps"},
           "tiny": dict(size=64, batch=4, steps=200, lr=2e-4, ema=0.99, ckpt_every=50),
           "small": dict(size=64, batch=16, steps=400, lr=2e-4, ema=0.99, ckpt_every=50)}
# What a student takes from its teacher's config.json unless a flag says otherwise.
INHERITED = ("preset", "patch_size", "codec", "light_decoder", "semantic", "semantic_size",
             "degradation", "resize_back", "mode", "p_partial", "alpha_min", "alpha_max",
             "aug_mean", "aug_std")


# ----------------------------------------------------------------------------- the flags

def build_parser() -> cli.OneLineParser:
    """distill.py's flags: its own, then the teacher's (train_teacher.add_training_flags). The
    defaults are what --help shows (the paper preset's); parse_cli builds the config."""
    usage = "%(prog)s --teacher RUN_DIR --data DIR --out STUDENT_DIR [--preset NAME] [flag ...]"
    p = cli.OneLineParser(prog=NAME, usage=usage, description=__doc__,
                          epilog=cli.presets_epilog(PRESETS), formatter_class=cli.HelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="recipe of training defaults (listed below); the model is the teacher's")
    p.add_argument("--teacher", metavar="RUN_DIR",
                   help="run dir of train_teacher.py (config.json, ema.safetensors); required")
    # not shown: parse_cli refuses it (the student starts from the teacher's weights)
    p.add_argument("--init", help=SUPPRESS)

    g = p.add_argument_group("distillation (§3.4, appendix A.1)")
    g.add_argument("--method", choices=("rc", "shortcut"), help="consistency loss for r < t: "
                   "rc (recursive consistency, eq. 12–17) or shortcut (eq. 7–11)")
    g.add_argument("--omega", type=float,
                   help="distillation guidance weight ω of the teacher target (eq. 5)")
    g.add_argument("--delta", type=float, help="RC: teacher warm-start step Δ (eq. 13), in (0, 1]")
    g.add_argument("--n-rc", type=int, help="RC: student rollout steps from t_m to r")
    g.add_argument("--alpha", type=float,
                   help="a fixed α of the partial branch, in the student's input and the teacher's "
                        "target (the release's one-step models: 0.1); unset: α ~ U per sample")
    tt.add_training_flags(p)
    # the paper preset's defaults; those of the model and of κ come from the teacher's config.json
    teachers = dict.fromkeys(INHERITED, "the teacher's")
    shown = dataclasses.asdict(DistillConfig(**DEFAULTS)) | teachers
    p.set_defaults(**shown | {"preset": "paper", "data": SUPPRESS, "teacher": SUPPRESS})  # required
    return p


# ----------------------------------------------------------------------------- times and targets

def sample_times(n: int, g: torch.Generator):
    """t = max(u1, u2) (more weight near the noise end), r = t·(1 − g), g ~ U(0, 1). Ours: the paper
    does not say how t and r are drawn."""
    t = torch.maximum(torch.rand(n, generator=g), torch.rand(n, generator=g))
    r = t * (1 - torch.rand(n, generator=g))
    return t, r


def teacher_target(teacher, z_t, t, c_str_full, c_str_partial, c_sem, omega):
    """v_tea = v_pcond + ω·(v_cond − v_pcond) (eq. 5); full: (c̃_str, c_sem), partial: (α·c_str, ∅).
    """
    # (2B, 2C, h, w)
    x = torch.cat([torch.cat([c_str_full, z_t], 1), torch.cat([c_str_partial, z_t], 1)])
    sem = None if c_sem is None else torch.cat([c_sem, torch.zeros_like(c_sem)])
    v_cond, v_pcond = teacher(x, t.repeat(2), sem).float().chunk(2)
    return v_pcond + omega * (v_cond - v_pcond)


def _b(x):
    """(B,) → (B,1,1,1) to scale latents per sample."""
    return x.view(-1, 1, 1, 1)


@torch.no_grad()
def rc_correction(student, z_t, t, r, u, v_tea, delta: float, n: int):
    """The clipped correction of recursive consistency (eq. 13–14).

    Teacher warm start to t_m = max(t − Δ, r): z_m = z_t − (t − t_m)·v_tea           (eq. 13)
    then n equal student steps t_m → r, each f(z, t_i, r = t_{i+1}); F = Σ f·(t_i − t_{i+1}).
    Consistency of the jump t → r:  u·d = (t − t_m)·v_tea + F,  d = t − r, so
        d > Δ:  corr = (u·d − F)/Δ − v_tea        (eq. 14 with u^tar = F/(t_m − r): c_l = d/Δ, c_r = (t_m − r)/Δ)
        d ≤ Δ:  corr = u − F/d − v_tea            (t_m = r: the teacher step covers the whole jump)
    clipped to [−1, 1].
    """
    t_m = torch.maximum(t - delta, r)
    z = z_t - _b(t - t_m) * v_tea
    F_sum = torch.zeros_like(z_t)
    for i in range(n):
        t_i = t_m - (t_m - r) * i / n
        t_next = t_m - (t_m - r) * (i + 1) / n
        f = student(z, t_i, t_next).float()
        F_sum += _b(t_i - t_next) * f
        z = z - _b(t_i - t_next) * f
    d = _b(t - r)
    corr = torch.where(
        d > delta, (u * d - F_sum) / delta - v_tea, u - F_sum / d.clamp_min(1e-8) - v_tea
    )
    return corr.clamp(-1, 1)


@torch.no_grad()
def shortcut_target(student, z_t, t, r):
    """ū = sg((u_{t→s} + u_{s→r}) / 2), s = (t + r)/2, z_s = z_t − (t − s)·u_{t→s}   (eq. 7–9)."""
    s = (t + r) / 2
    u_ts = student(z_t, t, s).float()
    z_s = z_t - _b(t - s) * u_ts
    u_sr = student(z_s, s, r).float()
    return (u_ts + u_sr) / 2


# --------------------------------------------------------------------------- the loss (eq. 17 / 11)

def distill_loss(cfg: DistillConfig, teacher, net, z0, c_str, c_sem, d: dict, terms=None):
    """L = L_base + L_cons, with L_cons = L_rc-cons (eq. 16–17) or L_short-cons (eq. 10–11).
    terms: a dict to receive the two terms and, for rc, the share of clipped corrections (ours)."""
    t, r = d["t"], d["r"]
    z_t = interpolate(z0, d["z1"], t)
    # κ for the student, exactly as in teacher training; the teacher target always uses both
    # branches.
    c_str_k, c_sem_k = build_conditions(
        c_str, c_sem, cfg.mode, d["aux"], d["alpha"], d["a_logit"], d["n"]
    )
    c_str_full, _ = build_conditions(
        c_str, c_sem, "full", d["aux"], d["alpha"], d["a_logit"], d["n"]
    )
    with torch.no_grad():
        v_tea = teacher_target(
            teacher, z_t, t, c_str_full, _b(d["alpha"]) * c_str, c_sem, cfg.omega
        )

    def student(z, t_, r_):  # f(z, t, r, κ) with the step's conditioning
        return net(torch.cat([c_str_k, z], 1), t_, c_sem_k, r_)

    # One batch of 2B for the two predictions that need gradients: r = t (base) and r (jump).
    sem2 = None if c_sem_k is None else c_sem_k.repeat(2, 1, 1)
    x2 = torch.cat([c_str_k, z_t], 1).repeat(2, 1, 1, 1)
    u_base, u = net(x2, t.repeat(2), sem2, torch.cat([t, r])).float().chunk(2)
    loss_base = F.mse_loss(u_base, v_tea)                                        # eq. 4/6
    if cfg.method == "rc":
        corr = rc_correction(student, z_t, t, r, u.detach(), v_tea, cfg.delta, cfg.n_rc)
        target = u.detach() - corr                                               # eq. 15
    else:
        target = shortcut_target(student, z_t, t, r)                             # eq. 9
    loss_cons = F.mse_loss(u, target)
    if terms is not None:  # logged: how much each term weighs, and how often the clip bites
        # detached tensors: read on the host only when a log line is written, no sync per step
        terms.update(loss_base=loss_base.detach(), loss_cons=loss_cons.detach())
        if cfg.method == "rc":
            terms["rc_clipped"] = (corr.abs() >= 1).float().mean()
    return loss_base + loss_cons                                                 # eq. 17 / 11


# ----------------------------------------------------------------------------- the training step

def draw_distill(cfg: DistillConfig, latent_shape, g: torch.Generator) -> dict:
    """The teacher's draws (z_1, κ) with the time pair (t, r) instead of t. A fixed --alpha (the
    official release's one-step models: 0.1) replaces the per-sample α of the partial branch in the
    student's κ and the teacher's target; the draws are made anyway, so the others stay the same."""
    d = draw_teacher(cfg, latent_shape, g)
    d["t"], d["r"] = sample_times(cfg.batch, g)
    if cfg.alpha is not None:
        d["alpha"] = torch.full_like(d["alpha"], cfg.alpha)
    return d


def main(argv=None) -> dict:
    """Distil; returns {step: loss} of the steps this call ran."""
    cfg, changes = parse_cli(argv)
    out = Path(cfg.out)
    # one run per dir (its lock); SIGINT/SIGTERM: the step is saved and the run stops (runs.Stopped)
    with runs.StopSignals(out, NAME) as stop, runs.locked(out, NAME):
        data = tt.preflight(cfg, NAME)  # before the teacher is loaded
        tconf, weights = runs.load_teacher_run(cfg.teacher)
        with runs.distributed(cfg) as (rank, world, device):
            torch.manual_seed(cfg.seed)
            codec, semantic, teacher, student, ema = build_student(cfg, tconf, weights, device)
            val_hr = tt.load_val(cfg, device) if rank == 0 else None
            opt, start = tt.open_run(
                cfg, student, ema, semantic, changes, rank, world, device, NAME
            )
            net = tt.wrap_model(cfg, student, world, device)
            loader = tt.data_loader(cfg, data, start, rank, world, device)
            log = runs.Progress(cfg, NAME, start, rank)
            latent_shape = (codec.channels, cfg.size // codec.factor, cfg.size // codec.factor)
            history, bad, saved = {}, 0, start

            stop.armed = True  # from here a signal ends the step, saves it and stops the run
            for step in range(start, cfg.steps):
                draws = draw_distill(cfg, latent_shape, tt.step_rngs(cfg.seed, step).draws)  # draw
                loss, terms = 0.0, {}
                for k in range(cfg.grad_accum):
                    hr = next(loader).to(device, non_blocking=True)               # condition
                    rng = tt.step_rngs(cfg.seed, step, rank * cfg.grad_accum + k)
                    z0, c_str, c_sem, _ = tt.make_condition(hr, cfg, codec, semantic, rng.degrade)
                    with tt.autocast(cfg, device):
                        d = tt.share(draws, cfg, rank, world, k, device)
                        # loss: eq. 17 (rc) or eq. 11 (shortcut)
                        micro_loss = distill_loss(cfg, teacher, net, z0, c_str, c_sem, d, terms)
                    (micro_loss / cfg.grad_accum).backward()                      # backward
                    loss += micro_loss.detach().float() / cfg.grad_accum
                loss = runs.mean_over_ranks(loss, world)                          # all-reduce
                if not math.isfinite(loss):  # skipped; after --skip-nonfinite of them the run stops
                    opt.zero_grad(set_to_none=True)
                    bad = tt.nonfinite_step(cfg, bad, loss, step)
                    continue
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)      # clip
                opt.step()                                                                 # AdamW
                opt.zero_grad(set_to_none=True)
                tt.ema_update(ema, student, min(cfg.ema, (1 + step) / (10 + step)))      # EMA

                done, history[step] = step + 1, loss
                record = {"step": done, "loss": loss} | terms  # terms: this rank's last micro-batch
                if val_hr is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                    record |= tt.validate(
                        cfg, ema, codec, semantic, val_hr, done, out, device, True
                    )
                log.write(record)                                     # log.jsonl, bar or line
                signum = stop.agreed(world, device)                   # the same on every rank
                if done % cfg.ckpt_every == 0 or done == cfg.steps or signum:
                    runs.checkpoint(out, student, ema, opt, done, loader, rank, world)
                    saved = done
                if signum and done < cfg.steps:  # (after the last step the run is done anyway)
                    log.close()
                    raise runs.Stopped(signum, runs.stop_line(NAME, out, signum, saved)
                                       if rank == 0 else "")
            log.close()
            return history


# ----------------------------------------------------------------------------- the models


def build_student(cfg: DistillConfig, tconf: dict, weights: Path, device):
    """Codec, semantic encoder, frozen teacher, the student (teacher weights + r embedder) and its
    EMA."""
    try:
        codec = vae.load_codec(cfg.codec, device=device)
        semantic = vae.load_semantic(cfg.semantic, image_size=cfg.semantic_size, device=device)
    except (FileNotFoundError, ValueError) as e:  # a missing or invalid folder/file: say which
        raise files.UserError(f"{e}") from None
    kw = dict(latent_channels=codec.channels, enc_dim=tconf["enc_dim"],
              train_grid=tconf["train_grid"], patch_size=tconf.get("patch_size", 2))
    teacher = dit.build(cfg.preset, **kw)
    try:
        dit.load_release_checkpoint(teacher, weights)
    except ValueError as e:  # missing keys, another preset: the loader names the key and the file
        raise files.UserError(f"--teacher {cfg.teacher}: {e}") from None
    teacher = teacher.to(device).requires_grad_(False).eval()
    student = dit.build(cfg.preset, with_r=True, grad_ckpt=cfg.grad_ckpt, **kw)
    # r_embedder stays at its init: f(·, t, t) = teacher
    dit.load_release_checkpoint(student, weights)
    ema = dit.build(cfg.preset, with_r=True, **kw)
    ema.load_state_dict(student.state_dict())
    return codec, semantic, teacher, student.to(device), ema.to(device).requires_grad_(False).eval()


def parse_cli(argv=None, check_files: bool = True) -> tuple[DistillConfig, list]:
    """Teacher's config → distillation defaults → typed flags; with --resume the student run's
    config.json instead of the first two. Returns (config, what --resume changed)."""
    p = build_parser()
    given = cli.given_flags(p, argv)
    if "init" in given:
        p.error("--init: not used by distill.py (the student starts from the --teacher's weights)")
    recipe = PRESETS[given.pop("preset", "paper")]  # the model preset: always the teacher's

    def fresh() -> DistillConfig:
        if not given.get("teacher") or not given.get("data"):
            p.error("--teacher RUN_DIR and --data DIR are required")
        tconf, _ = runs.load_teacher_run(given["teacher"])
        inherit = {k: tconf[k] for k in INHERITED if k in tconf}
        return DistillConfig(**(inherit | DEFAULTS | recipe | given))
    return cli.resolve_cli(p, DistillConfig, given, NAME, fresh, cli.DISTILL_RANGES, check_files)


def parse_args(argv=None) -> DistillConfig:
    return parse_cli(argv, check_files=False)[0]


if __name__ == "__main__":
    sys.exit(tt.run_main(NAME, main))  # one line and the exit status: a mistake, SIGINT, SIGTERM
