"""What evaluate.py writes besides its error lines: aligned text tables, CSV files, the guidance
sweep's line plot (Fig. 4 style) and the grid's comparison sheet.

Plumbing of evaluate.py, not the paper's method; tools/bench_sample.py and tools/seams.py print
their tables with text_table. Drawn with PIL alone: no plotting dependency.
"""
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vosr.files import UserError, atomic_path, write_image


def mean_row(rows, names):
    """The mean of each metric over the rows, as a row named 'mean'."""
    return {"image": "mean", **{n: float(np.mean([r[n] for r in rows])) for n in names}}


KEY_COLUMNS = ("image", "guidance", "seed")  # name a row of a per-image CSV; other columns: metrics


def write_rows(path, header, cells):
    """A CSV file of a header and rows of cells, written atomically (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(cells)


def write_csv(path, rows, names, mean=True, keys=("image",)):
    """Per-image rows (their `keys` columns, then the metrics), then (if mean) the mean; atomic."""
    rows = rows + ([{**{k: "" for k in keys}, **mean_row(rows, names)}] if mean else [])
    cells = [[*(r[k] for k in keys), *(f"{r[n]:.6f}" for n in names)] for r in rows]
    write_rows(path, [*keys, *names], cells)


def read_csv(path):
    """The rows of a per-image CSV of write_csv as dicts (metric values as floats) and its metric
    columns; a score CSV's closing 'mean' row left out. A UserError names a bad or missing file."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not table or "image" not in table[0]:
        raise UserError(f"{path}: not a per-image CSV of evaluate.py (no 'image' column)")
    header, body = table[0], [r for r in table[1:] if r]
    if body and body[-1][header.index("image")] == "mean":
        body = body[:-1]
    metrics = [c for c in header if c not in KEY_COLUMNS]
    rows = []
    for line, cells in enumerate(body, start=2):
        if len(cells) != len(header):
            raise UserError(f"{path}, line {line}: {len(cells)} values for {len(header)} columns")
        row = dict(zip(header, cells))
        for m in metrics:
            try:
                row[m] = float(row[m])
            except ValueError:
                raise UserError(f"{path}, line {line}: {m} = {row[m]!r} is not a number") from None
        rows.append(row)
    return rows, metrics


def text_table(cells: list[list[str]]) -> list[str]:
    """Rows of strings as lines of aligned columns: the first left-aligned (names), the rest right
    (numbers)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        for row in cells
    ]


def format_table(rows, names, max_rows=30, mean=True):
    """Per-image rows (up to max_rows), then the mean."""
    shown = rows if len(rows) <= max_rows else []
    cells = [["image", *names]] + [[r["image"], *(f"{r[n]:.4f}" for n in names)] for r in shown]
    if mean:
        cells.append(["mean", *(f"{v:.4f}" for v in list(mean_row(rows, names).values())[1:])])
    out = text_table(cells)
    out.insert(1, "-" * len(out[0]))
    if len(rows) > max_rows:
        out.append(f"({len(rows)} images; per-image values in the CSV)")
    return "\n".join(out)


def line_plot(xs, series: dict, path, title="", size=(640, 300)):
    """A small PIL line chart, one panel per series (no plotting dependency)."""
    from PIL import Image, ImageDraw
    W, H = size
    img = Image.new("RGB", (W * len(series), H), "white")
    d = ImageDraw.Draw(img)
    for i, (name, ys) in enumerate(series.items()):
        x0, y0, x1, y1 = i * W + 60, 30, i * W + W - 20, H - 40
        lo, hi = min(ys), max(ys)
        lo, hi = (lo - 1, hi + 1) if hi == lo else (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        px = lambda x: x0 + (x - min(xs)) / ((max(xs) - min(xs)) or 1) * (x1 - x0)
        py = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 8), f"{name} vs guidance scale s {title}", fill="black")
        for x in xs:
            d.text((px(x) - 8, y1 + 6), f"{x:g}", fill="black")
        for y in (lo, (lo + hi) / 2, hi):
            d.text((i * W + 4, py(y) - 6), f"{y:.3f}", fill="black")
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        d.line(pts, fill=(200, 30, 30), width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(200, 30, 30))
    write_image(path, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)


def comparison_sheet(rows: list[list[torch.Tensor]], names: list[str]) -> torch.Tensor:
    """Rows of same-size images (3,H,W) in [0,1], one per column, each above its 4× zoomed centre
    crop; the columns labelled with `names` → one image (3, H', W')."""
    from PIL import Image, ImageDraw
    lines = []
    for row in rows:
        H, W = row[0].shape[-2:]
        z = min(H, W) // 4  # zoom: the centre z×z crop, scaled to the image width
        cells = []
        for img in row:
            crop = img[:, (H - z) // 2:(H + z) // 2, (W - z) // 2:(W + z) // 2]
            crop = F.interpolate(crop[None], size=(W, W), mode="nearest")[0]
            cells.append(torch.cat([img.clamp(0, 1), crop.clamp(0, 1)], 1))
        lines.append(torch.cat(cells, -1))
    sheet = torch.cat(lines, 1)
    pil = Image.fromarray((sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    d = ImageDraw.Draw(pil)
    W = sheet.shape[-1] // len(names)
    for i, name in enumerate(names):
        d.text((i * W + 4, 4), name, fill=(255, 255, 0))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
