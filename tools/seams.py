"""Do neighbouring DiT tiles see the same thing where they overlap? A diagnostic of sample.py's
tiling.

    python -m tools.seams --image LR.png [--blur-half] [--tile 256] [--tile-overlap 64] [--ckpt
    RUN_DIR]

For each --semantic-tiles mode (global: one token map for the whole image; per-tile: DINOv2 on each
tile's own pixels) it runs the sampler's own conditioning and tiles at t = 1 and reports, over every
overlap of two neighbouring tiles, how much their velocities and their semantic tokens differ (0:
both tiles see the same thing there, so the cross-fade cannot leave a seam). Without --ckpt the
model is a random small DiT with a random ViT-S, every weight non-zero, so that the semantic tokens
reach the velocity.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import sample
import vae
from tools.bench_sample import bench_models
from vosr import reports
from vosr.cli import CLIParser, describe_defaults, number, run_script
from vosr.files import ImageError, read_image


def tile_disagreement(
    pipe, lr, tile: int, overlap: int, mode: str, scale=4.0, guidance=0.5, alpha=0.15, seed=0
) -> dict:
    """How much neighbouring DiT tiles disagree on the latent pixels they share (sample.py
    --semantic-tiles).

    The sampler's own conditioning and tiles (VOSRPipeline.condition, tile_velocity, sample.tiled)
    at t = 1 with one global noise draw. Over every overlap of two neighbours: velocity = mean |v_A
    − v_B| / mean |v_A|, and tokens = mean ‖c_A − c_B‖ / mean ‖c_A‖ for the semantic token each tile
    assigns to the same pixel (nearest token). 0 means both tiles see the same thing there, so
    blending cannot leave a visible seam. Global tokens give exactly 0 when the tile stride is whole
    tokens; otherwise each tile's token offset is rounded (crop_tokens), so neighbours may read
    tokens up to one token apart (tests/test_evaluate.py)."""
    f, p = pipe.codec.factor, pipe.model.patch_size
    tile, overlap = pipe.tile_sizes(tile, overlap)
    lr_up, c_str = pipe.condition(lr, scale, tile, overlap)  # c_str (1, C, H/f, W/f)
    sem_of = pipe.tile_semantics(lr_up, tile, mode)
    on_tile, t = pipe.tile_velocity(c_str, sem_of, guidance, alpha), torch.ones(1)
    z = torch.randn(c_str.shape, generator=torch.Generator().manual_seed(seed))
    v = {}  # window -> its velocity
    sample.tiled(lambda zw, wins: v.setdefault(wins[0], on_tile(zw, wins, t, t)), z, tile // f,
                 overlap // f, align=p, batch=1)

    dv, nv, dc, nc = [], [], [], []
    for (y, x, th, tw), (y2, x2, _, _) in [
        (a, b)
        for a in v
        for b in v  # right / lower neighbours
        if (b[0] == a[0] and b[1] > a[1]) or (b[1] == a[1] and b[0] > a[0])
    ]:
        # shared latent box
        oy, ox = (
            slice(max(y, y2), min(y, y2) + th),
            slice(max(x, x2), min(x, x2) + tw),
        )
        if oy.start >= oy.stop or ox.start >= ox.stop:
            continue
        crop = lambda a, y0, x0: a[..., oy.start - y0:oy.stop - y0, ox.start - x0:ox.stop - x0]
        a, b = crop(v[y, x, th, tw], y, x), crop(v[y2, x2, th, tw], y2, x2)
        dv.append((a - b).abs().mean().item())
        nv.append(a.abs().mean().item())
        if pipe.semantic is not None:
            g = pipe.semantic.grid

            def token_at(y0, x0):  # the token each shared latent pixel falls in: (1, h, w, dim)
                iy = (torch.arange(oy.start, oy.stop) - y0) * g // th
                ix = (torch.arange(ox.start, ox.stop) - x0) * g // tw
                return sem_of(y0 * f, x0 * f, th * f, tw * f).unflatten(1, (g, g))[:, iy][:, :, ix]
            ta, tb = token_at(y, x), token_at(y2, x2)
            dc.append((ta - tb).norm(dim=-1).mean().item())
            nc.append(ta.norm(dim=-1).mean().item())
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    return {"mode": mode, "pairs": len(dv), "velocity": mean(dv) / max(mean(nv), 1e-12),
            "tokens": mean(dc) / mean(nc) if dc else float("nan")}


def main(argv=None) -> int:
    """Tile disagreement of each --semantic-tiles mode on one image (see tile_disagreement)."""
    args = build_parser().parse_args(argv)
    try:
        lr = read_image(args.image)[None]
    except ImageError as e:
        print(f"seams.py: error: {e}", file=sys.stderr)
        return 2
    if args.blur_half:  # the case users report: one half sharp, the other blurred
        w = lr.shape[-1] // 2
        k = torch.exp(-torch.arange(-6, 7.0) ** 2 / 8)
        k = (k[:, None] * k)[None, None].repeat(3, 1, 1, 1) / k.sum() ** 2
        lr[..., w:] = F.conv2d(F.pad(lr[..., w:], (6,) * 4, mode="replicate"), k, groups=3)
    if args.ckpt:
        try:
            pipe, _ = sample.load_pipeline(sample.SampleConfig(ckpt=args.ckpt, device="cpu"))
        except (ValueError, OSError) as e:  # not a checkpoint
            print(f"seams.py: error: {e}", file=sys.stderr)
            return 2
        if pipe.semantic is None:
            print(
                f"seams.py: note: {args.ckpt} has no semantic encoder, so every mode gives the "
                "same tiles",
                file=sys.stderr,
            )
    # random matrices everywhere (also the zero-initialised adaLN / output ones): c_sem reaches v
    else:
        # the RoPE grid of one tile; the sampler itself rounds odd tiles
        unit = vae.PixelCodec().factor
        model, codec, semantic = bench_models("small", max(args.tile // unit, 1) * unit, "cpu")
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for q in model.parameters():
                if q.dim() > 1:
                    q.normal_(0, 0.02)
        pipe = sample.VOSRPipeline(model, codec, semantic)
    rows = [
        tile_disagreement(
            pipe, lr, args.tile, args.tile_overlap, mode, args.scale, args.guidance, seed=args.seed
        )
        for mode in ("global", "per-tile")
    ]
    lines = reports.text_table(
        [
            ["semantic tiles", "pairs", "velocity", "tokens"],
            *(
                [r["mode"], str(r["pairs"]), f"{r['velocity']:.6f}", f"{r['tokens']:.4f}"]
                for r in rows
            ),
        ]
    )
    lines[0] += "   (relative disagreement on overlaps)"
    print("\n".join(lines))
    return 0


def build_parser():
    ap = CLIParser(prog="seams.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True, help="an LR image larger than one tile at --scale")
    ap.add_argument(
        "--ckpt", help="run dir (default: a random small DiT + random ViT-S, all weights non-zero)"
    )
    ap.add_argument(
        "--blur-half", action="store_true", help="blur the right half first (sharp | blurred)"
    )
    ap.add_argument(
        "--tile", type=number(int, 0, low_open=True), default=256, help="tile side in output pixels"
    )
    ap.add_argument(
        "--tile-overlap", type=number(int, 0), default=64, help="tile overlap in output pixels"
    )
    ap.add_argument(
        "--scale", type=number(float, 0, low_open=True), default=4.0, help="SR scale factor"
    )
    ap.add_argument("--guidance", type=number(float), default=0.5, help="guidance scale s (eq. 2)")
    ap.add_argument(
        "--seed", type=number(int), default=0, help="seed of the noise (and of the random model)"
    )
    return describe_defaults(ap)


if __name__ == "__main__":
    sys.exit(run_script(main, "seams.py"))
