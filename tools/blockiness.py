"""Does a folder of SR images show a block grid? The gradient across block edges over the gradient
inside blocks.

    python -m tools.blockiness DIR [DIR ...] [--period 8] [--period 4]

A pixel codec packs each P×P block of pixels into one token (vae.py PixelCodec), and a DiT whose
tokens disagree at their borders leaves a mosaic: neighbouring pixels on either side of a block edge
differ more than neighbours inside a block. For each image (BT.601 luma, evaluate.to_y255) this
measures mean |∂| over the pixel pairs that straddle an edge of the P-grid (columns and rows P−1 |
P, 2P−1 | 2P, …) divided by mean |∂| over all the other neighbouring pairs, x and y pooled. About 1
for a photo; a visible grid shows from about 1.3. Ours, a diagnostic; not in the paper.
"""
import sys
from pathlib import Path

import torch

from evaluate import to_y255
from vosr.cli import OneLineParser, number, run_script
from vosr.files import ImageError, find_images, read_image


def edge_ratio(y: torch.Tensor, period: int) -> float:
    """Mean |gradient| across the edges of the period-P block grid / mean |gradient| elsewhere, x
    and y pooled."""
    dx = (y[:, 1:] - y[:, :-1]).abs()               # dx[:, j] joins columns j and j + 1
    dy = (y[1:, :] - y[:-1, :]).abs()
    on_x = (torch.arange(dx.shape[1]) % period) == period - 1
    on_y = (torch.arange(dy.shape[0]) % period) == period - 1
    edge = torch.cat([dx[:, on_x].flatten(), dy[on_y, :].flatten()])
    inside = torch.cat([dx[:, ~on_x].flatten(), dy[~on_y, :].flatten()])
    return float(edge.mean() / inside.mean().clamp_min(1e-8))


def folder_ratios(folder: Path, periods) -> tuple[dict, list[str]]:
    """{period: [ratio per readable image]} and the files that could not be read."""
    ratios, bad = {p: [] for p in periods}, []
    for path in find_images(folder):
        try:
            y = to_y255(read_image(path)[None])[0]
        except ImageError as e:
            bad.append(f"{path}: {e}")
            continue
        for p in periods:
            ratios[p].append(edge_ratio(y, p))
    return ratios, bad


def main(argv=None) -> int:
    p = OneLineParser(prog="blockiness.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="folders of images (searched recursively)")
    p.add_argument("--period", type=number(int, 2), action="append",
                   help="block side in pixels, at least 2; repeat for several (default: 8 and 4)")
    args = p.parse_args(argv)
    periods = args.period or [8, 4]
    print(
        "folder".ljust(40) + "".join(f"  P={q} mean (max)".rjust(18) for q in periods) + "  images"
    )
    for folder in args.folders:
        if not folder.is_dir():
            print(f"blockiness.py: {folder}: not a folder", file=sys.stderr)
            return 2
        ratios, bad = folder_ratios(folder, periods)
        for line in bad:
            print(f"blockiness.py: skipped {line}", file=sys.stderr)
        n = len(ratios[periods[0]])
        if n == 0:
            print(f"blockiness.py: {folder}: no readable image", file=sys.stderr)
            return 2
        cells = "".join(f"{sum(r) / n:.3f} ({max(r):.3f})".rjust(18) for r in ratios.values())
        print(str(folder)[-40:].ljust(40) + cells + f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "blockiness.py"))
