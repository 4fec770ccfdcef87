"""The precision table of sample.py's number formats (--dtype; vosr/runtime.py): each against fp32.

    python -m tools.precision [--size 16] [--only shipped,0.5B,2.0]   # docs/precision.md

The script runs each format against fp32 on the shipped default model and on random-weight models of
the release's 0.5B shapes (SD2.1 VAE + light decoder + DINOv2-B) and VOSR 2.0's (Qwen VAE +
DINOv2-L): each stage from the fp32 inputs (c_str, c_sem, velocity, decoded image), and the whole
pipeline's 8-bit output.
"""
from __future__ import annotations

import sys
import time
import torch

from vosr.runtime import DTYPES, NonFiniteError, resolve_device


# ----------------------------------------------------------- the table (python -m tools.precision)

STAGES = ("c_str", "c_sem", "velocity", "decoded")   # each from fp32 inputs; then the pipeline


def randomize(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Random values for every all-zero or constant parameter (adaLN-zero, zero-init biases), so
    that every layer of a random model contributes and its rounding shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and p.std() == 0 or p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1 if p.abs().sum() > 0 else 0))
    return module


def random_release_pipeline(kind: str, depth: int | None = None, device="cpu"):
    """(VOSRPipeline, its settings) with random weights of a release's shapes: '0.5B' (VOSR_0.5B_os:
    SD2.1 VAE + light decoder, DINOv2-B block 8, the 0.5B DiT with r) or '2.0' (VOSR 2.0: Qwen-Image
    VAE, DINOv2-L block 17, the 1.4B DiT without r); depth: fewer DiT blocks (CPU memory, time)."""
    import dit
    import sample
    import vae
    torch.manual_seed(0)
    if kind == "0.5B":
        codec = vae.random_sd_codec(4, light_decoder=True)
        semantic = vae.load_semantic("random-b", 112, layer=8)
        preset, with_r = "0.5B", True
    else:
        from diffusers import AutoencoderKLQwenImage
        qwen = AutoencoderKLQwenImage(latents_mean=[0.0] * 16, latents_std=[1.0] * 16).eval()
        codec = vae.DiffusersCodec(qwen, "random-qwen")
        semantic = vae.load_semantic("random-l", 112, layer=17)
        preset, with_r = "1.4B", False
    extra = {} if depth is None else {"depth": depth}
    model = randomize(dit.build(preset, latent_channels=codec.channels, enc_dim=semantic.dim,
                                with_r=with_r, train_grid=16, **extra)).eval()
    # one Euler step of one branch: the 0.5B student with r = 0; VOSR 2.0 has no r, and guidance 1
    # is its one branch v(cat[c_str, z_1], t = 1, c_sem) (sample.guided_velocity)
    cfg = sample.SampleConfig(device=str(device), steps=1, guidance=1.0, color_fix="none",
                       upscale="pil", tile=0, vae_tile=0, semantic_tiles="whole", lapped="off",
                       tile_blend="linear")
    return sample.VOSRPipeline(model.to(device), codec.eval().to(device), semantic.to(device),
                               student=with_r, device=device), cfg


def shipped_pipeline(device="cpu"):
    """(VOSRPipeline, its settings) of the shipped default model (sample.py without --ckpt)."""
    import sample
    cfg = sample.SampleConfig(device=str(device))
    pipe, run = sample.load_pipeline(cfg, report=print)
    return pipe, sample.check_tiles(sample.checkpoint_defaults(cfg, pipe, run), pipe)


def photo_like(side: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, side, side) LR in 8-bit levels, smooth shapes and fine texture like a photo's."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(side, side),
                                             mode="bicubic", align_corners=False)
    img = (coarse + 0.15 * torch.randn(1, 3, side, side, generator=g)).clamp(0, 1)
    return img.mul(255).round().div(255)                   # 8-bit levels: what a PNG of it holds


def errors(got: torch.Tensor, ref: torch.Tensor, unit: float | None = None) -> dict:
    """Mean and worst |got − ref|: times `unit` (255: 8-bit levels of a [0, 1] image), else relative
    to ref's RMS."""
    d = (got.float() - ref.float()).abs()
    rms = ref.float().pow(2).mean().sqrt().clamp_min(1e-12).item()
    scale = unit if unit is not None else 1 / rms
    return {"mean": d.mean().item() * scale, "max": d.max().item() * scale,
            "finite": bool(torch.isfinite(got).all())}


@torch.no_grad()
def stage_outputs(pipe, lr: torch.Tensor, cfg, dtype: torch.dtype, ref: dict | None = None) -> dict:
    """Each stage's output in `dtype` from the fp32 inputs of `ref` (None: this is the fp32 run),
    and the pipeline's 8-bit image in that dtype."""
    import sample
    pipe.dtype = dtype
    dev, H, W = pipe.device, lr.shape[-2] * 4, lr.shape[-1] * 4
    unit = pipe.codec.factor * pipe.model.patch_size
    up = sample.upscale_lr(lr, (H, W), cfg.upscale or "torch").to(dev)
    padded = sample.reflect_crop(up, 0, 0, H + -H % unit, W + -W % unit)
    out = {}
    with pipe.autocast():
        out["c_str"] = pipe.codec.encode(padded * 2 - 1, mode=True).float()
        out["c_sem"] = pipe.semantic(up).float() if pipe.semantic is not None else None
    c_str = (ref or out)["c_str"]
    c_sem = (ref or out)["c_sem"]
    z1 = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(0)).to(dev)
    t, r = torch.ones(1, device=dev), torch.zeros(1, device=dev)
    with pipe.autocast():
        if pipe.student:
            v = sample.guided_velocity(pipe.model, z1, t, c_str, c_sem, 1.0, r=r)
        else:
            v = sample.guided_velocity(pipe.model, z1, t, c_str, c_sem, cfg.guidance,
                                       cfg.alpha or 0.15)
        out["velocity"] = v.float()
        z0 = z1 - (ref or out)["velocity"]                 # one Euler step from t = 1 to 0
        out["decoded"] = pipe.codec.decode(z0).float().add(1).div(2).clamp(0, 1)
    try:
        out["image"] = (sample.super_resolve(pipe, lr, cfg).clamp(0, 1) * 255).round().cpu()
    except NonFiniteError:
        out["image"] = torch.full((1, 3, H, W), float("nan"))
    pipe.dtype = torch.float32
    return {k: None if v is None else v.cpu() for k, v in out.items()}


def seconds(pipe, lr, cfg, dtype: torch.dtype) -> float:
    """Wall-clock seconds of one sample.super_resolve of lr in dtype."""
    import sample
    pipe.dtype = dtype
    start = time.perf_counter()
    try:
        sample.super_resolve(pipe, lr, cfg)
    except NonFiniteError:
        pass
    if pipe.device.type == "cuda":                     # the kernels it queued are part of its time
        torch.cuda.synchronize(pipe.device)
    pipe.dtype = torch.float32
    return time.perf_counter() - start


def compare(name: str, pipe, cfg, side: int, dtypes=("bf16", "fp16"), repeats: int = 2) -> list:
    """One row per (dtype, stage) of `name`: its error against fp32; and per dtype the fastest of
    `repeats` timed pipeline runs, interleaved with the other dtypes' (a busy machine slows them
    alike), after the warm-up that the error runs are."""
    lr = photo_like(side)
    ref, rows = stage_outputs(pipe, lr, cfg, torch.float32), []
    for d in dtypes:
        got = stage_outputs(pipe, lr, cfg, DTYPES[d], ref)
        for stage in (*STAGES, "image"):
            if ref[stage] is None:
                continue
            unit = 255.0 if stage == "decoded" else 1.0 if stage == "image" else None
            rows.append({"model": name, "dtype": d, "stage": stage,
                         **errors(got[stage], ref[stage], unit)})
    times = {d: [] for d in ("fp32", *dtypes)}
    for _ in range(repeats):
        for d in times:
            times[d].append(seconds(pipe, lr, cfg, DTYPES[d]))
    return rows + [{"model": name, "dtype": d, "stage": "time", "seconds": min(t)}
                   for d, t in times.items()]


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/precision.md."""
    lines = ["| model | dtype | stage | mean error | worst error | all finite |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["stage"] == "time":
            continue
        kind = "levels" if r["stage"] in ("decoded", "image") else "× RMS"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['stage']} | {r['mean']:.4g} {kind} | "
                     f"{r['max']:.4g} {kind} | {'yes' if r['finite'] else 'NO'} |")
    times = [f"{r['model']} {r['dtype']} {r['seconds']:.2f} s"
             for r in rows if r["stage"] == "time"]
    return "\n".join(lines) + "\n\nseconds per image (the fastest run): " + ", ".join(times)


def main(argv=None) -> int:
    """python -m tools.precision [--size 16] [--only shipped,0.5B,2.0] [--dtypes bf16,fp16]"""
    import argparse
    from vosr.cli import OneLineParser
    p = OneLineParser(prog="python -m tools.precision", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="LR side, the output is 4x (default: 16)")
    p.add_argument("--only", default="shipped,0.5B,2.0", help="models (default: shipped,0.5B,2.0)")
    p.add_argument("--dtypes", default="bf16,fp16", help="compared with fp32 (default: bf16,fp16)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per format; the fastest counts (default: 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--depth", type=int, default=None,
                   help="DiT blocks of the random models (default: the release's, 28 and 36)")
    a = p.parse_args(argv)
    dtypes = a.dtypes.split(",")
    if any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes: each of {', '.join(DTYPES)}")
    start, rows, device = time.perf_counter(), [], resolve_device(a.device)
    for name in a.only.split(","):
        if name == "shipped":
            pipe, cfg = shipped_pipeline(device)
        elif name in ("0.5B", "2.0"):
            pipe, cfg = random_release_pipeline(name, a.depth, device)
        else:
            p.error(f"--only: {name!r} is not one of shipped, 0.5B, 2.0")
        rows += compare(name, pipe, cfg, a.size, dtypes, a.repeats)
        print(table([r for r in rows if r["model"] == name]), flush=True)
    print(f"\npython -m tools.precision {' '.join(argv if argv is not None else sys.argv[1:])}: "
          f"{time.perf_counter() - start:.0f} s on {device}, {torch.get_num_threads()} thread(s)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
