"""Training throughput of the VOSR DiT: random weights, the real shapes, the teacher's loss (eq. 1).

    python -m tools.bench_train --preset 0.5B --size 512 --batch 16 --bf16 --compile

Times AdamW steps of the DiT alone (no data, codec or DINOv2) and reports images/s, TFLOP/s and, in
bf16 on a known GPU, the model FLOPs utilisation (MFU) against the dense bf16 peak. The FLOPs are
counted by formula (dit_flops), checked against PyTorch's FLOP counter in tests/test_teacher.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dit
from vosr.cli import OneLineParser
from train_teacher import flow_matching_loss


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def dit_flops(model, tokens: int, sem_tokens: int) -> float:
    """Forward FLOPs of one image (2 per multiply-add). Per block and token: qkv + proj 4d², cross q
    + proj 2d², SwiGLU 3·h·d = 8d², attention scores and mixing 2·d·(N + M); per image: cross k, v
    2·d²·M. Plus the semantic projection (4·768·d-like) and patch embed / final layer."""
    d, L, N, M = model.dim, model.depth, tokens, sem_tokens
    h = int(2 / 3 * 4 * d)
    per_block = N * (6 * d * d + 3 * h * d + 2 * d * (N + M)) + 2 * d * d * M
    io = N * (
        2 * model.latent_channels * model.patch_size**2 * d
        + d * model.patch_size**2 * model.latent_channels
    )
    sem = M * (model.enc_dim * 3 * d + 3 * d * d)
    return 2.0 * (L * per_block + io + sem)


def bench(preset: str, size: int, batch: int, steps: int, device: str, bf16: bool, compile_: bool,
          latent_channels: int = 4, factor: int = 8, sem_tokens: int = 1024,
          enc_dim: int = 768) -> dict:
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
    z0, c_str = (
        torch.randn(batch, latent_channels, h, h, device=dev),
        torch.randn(batch, latent_channels, h, h, device=dev),
    )
    c_sem, z1 = torch.randn(batch, sem_tokens, enc_dim, device=dev), torch.randn_like(z0)

    def one_step():
        t = torch.rand(batch, device=dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, z0, c_str, c_sem, t, z1)
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
    return {"device": name, "torch": torch.__version__, "preset": preset, "size": size,
            "batch": batch, "bf16": bf16, "compile": compile_, "step_s": sec,
            "img_per_s": batch / sec, "tflops": flops / sec / 1e12,
            "mfu": None if peak is None or not bf16 else flops / sec / 1e12 / peak}


def _checked(typ, lo):
    """An argparse type: `typ` of at least `lo` (argparse's one-line error names the flag)."""
    def parse(text):
        v = typ(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v}: must be at least {lo}")
        return v
    return parse


def main(argv=None) -> None:
    """python -m tools.bench_train [--preset 0.5B] [--size 512] [--batch 8] [--bf16] [--compile]"""
    p = OneLineParser(prog="bench_train.py",
                      description="training throughput of the DiT (random weights, real shapes)",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--preset", default="small", choices=sorted(dit.PRESETS), help="model preset of dit.py"
    )
    p.add_argument("--size", type=_checked(int, 16), default=256,
                   help="HR crop side (latent = size/8, SD-VAE shapes)")
    p.add_argument("--batch", type=_checked(int, 1), default=4, help="images per step")
    p.add_argument(
        "--steps", type=_checked(int, 1), default=3, help="timed steps (after 3 warm-up steps)"
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    p.add_argument("--bench-json", default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    r = bench(a.preset, a.size, a.batch, a.steps, a.device, a.bf16, a.compile)
    print(
        "FLOPs/image (train) = 3 × 2 × [depth·(N·(6d² + 3hd + 2d(N+M)) + 2d²M) + embed/final + "
        "semantic MLP]"
    )
    for k, v in r.items():
        print(f"{k:>10}: {v:.4g}" if isinstance(v, float) else f"{k:>10}: {v}")
    if a.bench_json:
        Path(a.bench_json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
