"""End-to-end latency of the sampler (sample.VOSRPipeline), split by stage, with random weights of
the real shapes.

    python -m tools.bench_sample [--preset 0.5B] [--size 512] [--batch 1,8] [--steps 1,25] [--dtypes fp32,bf16]
    python -m tools.bench_sample --preset small --size 256 --bench-json b.json       # a CPU runs this one
    python -m tools.bench_sample --shipped [--case 'CKPT WxH FLAGS' …] [--repeats 2]  # the shipped models, end to end

Nothing is downloaded: the DiT, codec and semantic encoder are randomly initialised with a release's
shapes. It times VOSRPipeline.__call__ itself: the stages are the methods it calls (STAGE_METHODS)
-- bicubic + codec encode, the semantic encoder (DINOv2), all Euler steps of the DiT, decode. Rows:
each fast path (plain, fast = sample.py --fast, compiled, graphs), dtype, batch size and step count
(1 = the one-step student, more = the guided teacher).
"""
import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dit
import sample
import vae
from vosr import reports
from vosr.cli import CLIParser, describe_defaults, listed, number, one_of
from vosr.runtime import DEFAULT_DEVICE, DTYPES


# bicubic + codec encode, DINOv2, all Euler steps, decode
STAGES = ("encode", "semantic", "dit", "decode")


class StageTimer:
    """Wall-clock seconds per stage, summed over calls: `with timer("dit"): ...`. On CUDA it
    synchronises at both ends, so the kernels a stage queued are charged to that stage and not to
    the next one."""

    def __init__(self, device):
        self.sync = (
            torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        )
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def bench_models(preset: str, size: int, device, semantic_size: int | None = None):
    """(DiT, codec, semantic encoder), randomly initialised with the shapes of a release.

    0.5B: SD2.1-shaped VAE encoder, the release's light decoder, DINOv2-B at 448² (the official
    release). 1.4B: the same VAE shape with 16 latent channels and DINOv2-L (the release's
    Qwen-Image VAE costs differently). small/tiny: the weight-free pixel codec with patch 1 and a
    ViT-S at 112², so that a CPU runs them. The DiT has the student's r_embedder; it also serves as
    the teacher (r = None)."""
    torch.manual_seed(0)
    if preset in ("tiny", "small"):
        codec, patch = vae.PixelCodec(), 1
        semantic = vae.load_semantic("random-s", semantic_size or 112, device)
    else:
        big = preset == "1.4B"
        codec = vae.random_sd_codec(latent_channels=16 if big else 4, light_decoder=not big)
        semantic = vae.load_semantic(
            "random-l" if big else "random-b", semantic_size or 448, device
        )
        patch = 2
    unit = codec.factor * patch
    if size % unit:
        raise ValueError(
            f"--size {size} must be a multiple of {unit} (codec factor × patch) for {preset}"
        )
    with torch.device(device):  # initialised where it runs (0.5 B parameters)
        model = dit.build(preset, latent_channels=codec.channels, enc_dim=semantic.dim, with_r=True,
                          train_grid=size // unit, patch_size=patch)  # one tile covers the image
    return model, codec.to(device), semantic


# The stages of VOSRPipeline.__call__, the methods it calls in order: bicubic + codec encode, the
# semantic encoder (the global token map; per-tile tokens are computed in the first DiT step), every
# Euler step, decode.
STAGE_METHODS = {"encode": "condition", "semantic": "tile_semantics", "dit": "denoise",
                 "decode": "finish"}


@contextlib.contextmanager
def timed_stages(pipe: sample.VOSRPipeline, timer: "StageTimer"):
    """Within the block, each stage method of pipe runs under timer(stage) (instance attributes,
    removed after)."""
    for stage, name in STAGE_METHODS.items():
        method = getattr(pipe, name)
        setattr(pipe, name, lambda *a, _m=method, _s=stage, **k: _call_timed(timer, _s, _m, a, k))
    try:
        yield pipe
    finally:
        for name in STAGE_METHODS.values():
            vars(pipe).pop(name, None)


def _call_timed(timer, stage, method, args, kwargs):
    with timer(stage):
        return method(*args, **kwargs)


def bench_row(pipe: sample.VOSRPipeline, lr: torch.Tensor, steps: int, repeats: int) -> dict:
    """Milliseconds per stage and in total of pipe(lr), the mean of `repeats` timed calls after a
    warm-up."""
    # one step: the distilled student (one branch); more: the teacher (2B, eq. 2)
    pipe.student = steps == 1
    pipe(lr, 4.0, steps=1)     # warm-up (and compilation); every step has the same shapes
    timer = StageTimer(pipe.device)
    for _ in range(repeats):
        with timer("total"), timed_stages(pipe, timer):
            pipe(lr, 4.0, steps, generator=torch.Generator().manual_seed(0))
    ms = {f"{k}_ms": timer.seconds[k] / repeats * 1e3 for k in (*STAGES, "total")}
    return {**ms, "img_per_s": lr.shape[0] / ms["total_ms"] * 1e3}


def bench(preset="0.5B", size=512, batches=(1,), steps=(1,), dtypes=("fp32",), paths=("plain",),
          device="cpu", repeats=1, semantic_size=None, compile_mode="default",
          verbose=False) -> list[dict]:
    """One row per (path, dtype, batch, steps): the stage times of bench_row and what was run."""
    dev = torch.device(device)
    model, codec, semantic = bench_models(preset, size, dev, semantic_size)
    path_fast = {"plain": sample.FastPaths(),
                 "fast": sample.FastPaths(reuse_semantics=True, channels_last=True),
                 "compiled": sample.FastPaths(True, True, compile=compile_mode),
                 "graphs": sample.FastPaths(True, True, compile=compile_mode, cuda_graphs=True)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    # plain first: channels_last converts the codec
    for path in sorted(paths, key=list(path_fast).index):
        pipe = sample.VOSRPipeline(model, codec, semantic, device=dev, fast=path_fast[path])
        for dtype in dtypes:
            pipe.dtype = DTYPES[dtype]  # every network under autocast, as sample.py --dtype
            for batch in batches:
                lr = torch.rand(
                    batch, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(0)
                )
                for n in steps:
                    rows.append(
                        {"device": name, "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "preset": preset, "size": size,
                         "path": path, "dtype": dtype, "batch": batch, "steps": n,
                         "sampler": "student" if n == 1 else "teacher",
                         **bench_row(pipe, lr, n, repeats)}
                    )
                    if verbose:  # each row as soon as it is measured: compiled rows take minutes
                        print(bench_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


# -------------------------------------------------------------- the shipped checkpoints, end to end

ROOT = Path(__file__).resolve().parents[1]
# (checkpoint, LR width × height, sample.py flags): the two shipped models at their target sizes
SHIPPED = (
    ("checkpoints/vosr-small-teacher", (120, 80), ""),
    ("checkpoints/vosr-small-photo", (480, 320), ""),
)


def case(text: str) -> tuple[str, tuple[int, int], str]:
    """'CKPT WxH [sample.py flags…]' → (CKPT, (W, H), flags)."""
    ckpt, size, *flags = text.split()
    w, h = (int(v) for v in size.lower().split("x"))
    return ckpt, (w, h), " ".join(flags)


def test_image(size: tuple[int, int]) -> torch.Tensor:
    """A photo of the repo's demo set (else a smooth random image) resized to `size` (W, H): an LR
    input."""
    from PIL import Image

    photos = sorted(Path("/work/shared/data/photos").glob("*.png")) or sorted(
        (ROOT / "docs").glob("*.png")
    )
    if not photos:
        return torch.nn.functional.interpolate(
            torch.rand(1, 3, 8, 8), size=size[::-1], mode="bicubic"
        ).clamp(0, 1)
    img = Image.open(photos[0]).convert("RGB").resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def bench_shipped(cases=SHIPPED, repeats: int = 2) -> list[dict]:
    """Seconds to load each checkpoint and to super-resolve one LR image of the case's size (each of
    `repeats` calls, the first one included: what `python sample.py` on one image pays), with the
    flags of the case."""
    rows = []
    for ckpt, (w, h), flags in cases:
        argv = ["--ckpt", str(ROOT / ckpt if not Path(ckpt).is_absolute() else ckpt), "-i",
                "LR.png", "-o", "SR.png", "--device", "cpu", *flags.split()]
        cfg = sample.parse_args(argv)
        t0 = time.perf_counter()
        pipe, run = sample.load_pipeline(cfg, report=lambda line: None)
        pipe.enable(sample.FastPaths.from_config(cfg))
        cfg = sample.check_tiles(
            sample.checkpoint_defaults(cfg, pipe, run), pipe, note=lambda line: None
        )
        load = time.perf_counter() - t0
        lr, times = test_image((w, h)), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sr = sample.super_resolve(pipe, lr, cfg)
            times.append(time.perf_counter() - t0)
        # --tile 0: one window
        whole = max(sr.shape[-2:]) + pipe.codec.factor * pipe.model.patch_size
        tile, overlap = pipe.tile_sizes(
            None if cfg.tile is None else cfg.tile or whole, cfg.tile_overlap
        )
        lt, lo, align = pipe.latent_tiles(tile, overlap, cfg.tile_blend)
        f, p = pipe.codec.factor, pipe.model.patch_size
        tiles = math.prod(
            len(sample.tile_windows(-(-n // (f * p)) * p, lt, lo, align)) for n in sr.shape[-2:]
        )
        rows.append(
            {"command": f"python sample.py --ckpt {ckpt} -i LR.png -o SR.png {flags}".strip(),
             "lr": f"{w}×{h}", "sr": f"{sr.shape[-1]}×{sr.shape[-2]}", "steps": cfg.steps,
             "guidance": cfg.guidance if not pipe.student else "-", "tile": tile, "tiles": tiles,
             "load_s": load, "sample_s": times, "threads": torch.get_num_threads(),
             "torch": torch.__version__}
        )
        # the row as soon as it is measured
        print(shipped_table(rows[-1:]).splitlines()[1], flush=True)
    return rows


def shipped_table(rows: list[dict]) -> str:
    """The rows of bench_shipped as an aligned table; the commands below it, numbered."""
    cells = [["#", "LR → SR", "steps", "s", "tile", "tiles", "load s", "s per image"]]
    cells += [
        [str(i + 1), f"{r['lr']} → {r['sr']}", str(r["steps"]), str(r["guidance"]), str(r["tile"]),
         str(r["tiles"]), f"{r['load_s']:.1f}", " / ".join(f"{t:.1f}" for t in r["sample_s"])]
        for i, r in enumerate(rows)
    ]
    return "\n".join(
        reports.text_table(cells) + [f"  {i + 1}: {r['command']}" for i, r in enumerate(rows)]
    )


def bench_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, times in ms."""
    cols = ["path", "dtype", "batch", "steps", "sampler", *(f"{s}_ms" for s in (*STAGES, "total")),
            "img_per_s"]
    cells = [[c.replace("_ms", " ms").replace("_per_s", "/s") for c in cols]]
    cells += [
        [
            f"{r[c]:.1f}" if c.endswith("_ms") else f"{r[c]:.2f}" if c == "img_per_s" else str(r[c])
            for c in cols
        ]
        for r in rows
    ]
    return "\n".join(reports.text_table(cells))


def main(argv=None) -> int:
    """python -m tools.bench_sample [--preset 0.5B] [--size 512] [--batch 1,8] [--steps 1,25]
    [--dtypes fp32,bf16]"""
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if a.shipped or a.case:
        rows = bench_shipped(a.case or SHIPPED, a.repeats or 2)
        lines = [
            f"bench_sample.py: shipped checkpoints end to end, cpu, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU thread(s); load, then {a.repeats or 2} call(s) on one "
            "LR image",
            shipped_table(rows),
            "wall time {:.1f} s",
        ]
    else:
        on_cuda = torch.device(a.device).type == "cuda"
        paths = a.paths + ["compiled"] * a.compile + ["graphs"] * a.cuda_graphs
        dtypes = ["bf16"] if a.bf16 else a.dtypes or (["fp32", "bf16"] if on_cuda else ["fp32"])
        if "graphs" in paths and not on_cuda:
            print(
                "bench_sample.py: error: --cuda-graphs (or --paths graphs) needs a CUDA device",
                file=sys.stderr,
            )
            return 2
        repeats = a.repeats or (3 if on_cuda else 1)
        rows = bench(a.preset, a.size, a.batch or ([1, 8] if on_cuda else [1]),
                     a.steps or ([1, 25] if on_cuda else [1, 4]), dtypes,
                     list(dict.fromkeys(paths)), a.device, repeats, a.semantic_size, a.compile_mode,
                     verbose=True)
        r = rows[0]
        lines = [
            f"bench_sample.py: {r['preset']} at {a.size}², {r['device']}, torch {r['torch']}, "
            f"{r['threads']} "
            f"CPU thread(s); mean of {repeats} timed call(s) after a warm-up",
            bench_table(rows),
            "wall time {:.1f} s (models, warm-ups and timed calls)",
        ]
    lines[-1] = lines[-1].format(time.perf_counter() - t0)
    print("\n".join(lines))
    if a.bench_json:
        Path(a.bench_json).write_text(json.dumps(rows, indent=2))
    return 0


def build_parser():
    ap = CLIParser(prog="bench_sample.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset",
        default="0.5B",
        choices=sorted(dit.PRESETS),
        help="DiT preset; small/tiny run the pixel codec (patch 1) and a ViT-S, for CPUs",
    )
    ap.add_argument("--size", type=number(int, 4, multiple=4), default=512,
                    help="output side, a multiple of 4; the LR input is size/4")
    ap.add_argument("--batch", type=listed(number(int, 1)), default=None,
                    help="comma list of batch sizes (default: 1,8 on CUDA, 1 on CPU)")
    ap.add_argument(
        "--steps",
        type=listed(number(int, 1)),
        default=None,
        help="comma list of Euler step counts; 1 = the one-step student, more = the guided teacher "
        "(default: 1,25 on CUDA, 1,4 on CPU)",
    )
    ap.add_argument("--device", default=DEFAULT_DEVICE,
                    help=f"device (default: cuda if available, else cpu; here {DEFAULT_DEVICE})")
    ap.add_argument(
        "--dtypes",
        type=listed(one_of("fp32", "bf16")),
        default=None,
        help="comma list of fp32, bf16 (bf16 = every network under autocast, as sample.py --bf16; "
        "default: fp32,bf16 on CUDA, fp32 on CPU)",
    )
    ap.add_argument("--bf16", action="store_true", help="the same as --dtypes bf16")
    paths = listed(one_of("plain", "fast", "compiled", "graphs"))
    ap.add_argument(
        "--paths",
        type=paths,
        default=["plain", "fast"],
        help="comma list: plain (no fast path), fast (sample.py --fast), compiled, graphs",
    )
    ap.add_argument(
        "--compile", action="store_true", help="add rows 'compiled': --fast + torch.compile"
    )
    ap.add_argument(
        "--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune on a GPU"
    )
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="add rows 'graphs': compiled + CUDA graphs (CUDA only)")
    ap.add_argument("--repeats", type=number(int, 1), default=None,
                    help="timed calls per row after one warm-up (default: 3 on CUDA, 1 on CPU)")
    ap.add_argument(
        "--semantic-size",
        type=number(int, 14, multiple=14),
        default=None,
        help="semantic encoder input side, a multiple of the ViT patch 14 (default: 448; 112 for "
        "small/tiny)",
    )
    ap.add_argument(
        "--shipped",
        action="store_true",
        help="time the shipped checkpoints end to end instead (load + sample.py on one LR image): "
             "the "
        "teacher on 120×80 → 480×320, the demo on 480×320 → 1920×1280, with their default flags",
    )
    ap.add_argument(
        "--case",
        action="append",
        type=case,
        default=None,
        metavar="'CKPT WxH [FLAGS]'",
        help="with or instead of --shipped: a checkpoint, an LR size and sample.py flags, e.g. "
        "'checkpoints/vosr-small-teacher 120x80 --tile 128'; repeatable (default: the shipped two)",
    )
    ap.add_argument(
        "--bench-json", default=None, help="also write the rows as JSON here (default: none)"
    )
    return describe_defaults(ap)


if __name__ == "__main__":
    sys.exit(main())
