"""Image and file I/O shared by every script (ours, not the paper's method).

Finding the input images of a CLI and naming its outputs (find_images, find_jobs), reading any image
file into a (3, H, W) float tensor and writing one atomically (read_image, write_image,
atomic_path), outputs that exist and output folders that cannot be written (keep_existing,
probe_output_folder), the centre crop and HR | LR contact sheet of degrade.py, and reading weight
files: a state dict (read_state_dict) or only a .safetensors header (read_safetensors_header);
loading a state dict strictly (load_strict). Used by the stage files, tools/ and the tests.
"""
import contextlib
import io
import json
import os
import uuid
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class UserError(Exception):
    """A user mistake or an environment fault they can fix; one line naming it. Library code raises
    it, a script's main prints `script.py: message` and exits non-zero: neither prints nor exits
    elsewhere."""


class ImageError(Exception):
    """An image file that cannot be read or written; the message always names the file."""


class WriteError(ImageError, UserError):
    """An output that cannot be written (full disk, read-only or forbidden folder): the path and
    why."""


def reason_of(e: OSError) -> str:
    """'No space left on device' of an OSError, without the temp file name str(e) would append."""
    return e.strerror or str(e) or type(e).__name__


def find_images(root, recursive=True):
    """Sorted image files under `root` (or [root] if it is a file); hidden files are skipped."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if root.is_file():
        return [root]
    files = root.rglob("*") if recursive else root.glob("*")
    # skip hidden names: macOS "._x.jpg" sidecars and our own in-flight ".x.tmp" files
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _out_names(files, root):
    """Output name per file: relative path with .png; name clashes (a.jpg, a.png) keep the
    extension."""
    base = root if root.is_dir() else root.parent
    rel = [f.relative_to(base) for f in files]
    stems = [r.with_suffix("") for r in rel]
    clash = {s for s, n in Counter(stems).items() if n > 1}
    return [r.with_name(f"{r.stem}_{r.suffix[1:]}.png") if s in clash else r.with_suffix(".png")
            for r, s in zip(rel, stems)]


def find_jobs(inp, out, single_file_ok: bool = True) -> list[tuple[Path, Path]]:
    """(input image, output .png) pairs for a CLI that reads `inp` and writes under `out`.

    `out` is a folder (created later), or, for one input file and single_file_ok, the output file
    itself. Refused with an OSError naming the path: a missing input, no images, an output folder
    that is the input folder or inside it (outputs would be read back as inputs), an output that
    would replace an input."""
    files = find_images(inp)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found in {inp}")
    inp, out = Path(inp), Path(out)
    root = inp if inp.is_dir() else inp.parent
    out_is_file = out.suffix.lower() in IMAGE_EXTS and not out.is_dir()
    if out_is_file:
        if not (inp.is_file() and single_file_ok):
            raise NotADirectoryError(
                f"-o {out} names an image file, but the input {inp} "
                f"{'is a folder' if inp.is_dir() else 'gives several images'}: give a folder"
            )
        jobs = [(inp, out)]
    else:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output path {out} is a file, not a folder")
        if inp.is_dir() and (
            out.resolve() == inp.resolve() or inp.resolve() in out.resolve().parents
        ):
            where = (
                "the input folder" if out.resolve() == inp.resolve() else "inside the input folder"
            )
            raise IsADirectoryError(
                f"output folder {out} is {where} {inp}: choose another -o, so that no input is "
                "overwritten or read back"
            )
        jobs = [(f, out / name) for f, name in zip(files, _out_names(files, root))]
    inputs = {f.resolve() for f in files}
    for _, dst in jobs:
        if dst.resolve() in inputs:
            raise FileExistsError(f"output {dst} is one of the input images: choose another -o")
    return jobs


def _to_rgb_array(im):
    """PIL image of any mode → (H, W, 3) float32 in [0, 1]."""
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit grey (PNG opens as I;16 or I, values 0..65535): divide by 65535, not 255.
        # Float "F" images follow Pillow's own convention of a 0..255 range.
        a = np.asarray(im).astype(np.float32) / (255.0 if im.mode == "F" else 65535.0)
        return np.repeat(np.clip(a, 0.0, 1.0)[:, :, None], 3, axis=2)
    if has_alpha:
        # transparency is composited on white (what a viewer shows); alpha is not super-resolved
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0   # L, P, CMYK, YCbCr, 1 ...


def read_image(path, data: bytes | None = None):
    """Image file → (3, H, W) float32 in [0, 1]; converts any mode, honours EXIF orientation.

    data: the file's bytes when they come from elsewhere (a member of a .tar shard); `path` then
    only names it."""
    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.load()                           # decode now so truncation is caught here
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:              # a broken EXIF block should not lose the photo
                warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({e})")
            arr = _to_rgb_array(im)
    except Exception as e:                      # PIL raises OSError, SyntaxError, ValueError, ...
        reason = str(e) or type(e).__name__
        if type(e).__name__ == "UnidentifiedImageError" or "cannot identify" in reason:
            reason = "not a readable image file (empty, corrupt or unknown format)"
        raise ImageError(f"{path}: {reason}") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def write_image(path, img):
    """(3,H,W) or (1,3,H,W) float in [0,1] → 8-bit file (format from extension), written atomically.
    """
    path = Path(path)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"{path}: expected a (3,H,W) image tensor, got shape {tuple(img.shape)}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image extension {path.suffix!r}")
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (
        (img.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(1, 2, 0)
        .cpu()
        .numpy()
    )
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    except OSError as e:
        raise WriteError(f"cannot write {path}: {reason_of(e)}") from e


def existing_outputs(jobs, outputs_of=None) -> list[Path]:
    """The output files of (input, output) `jobs` that already exist; outputs_of(output) lists a
    job's files when it writes more than one (degrade.py: hr/ and lr/)."""
    return [f for _, dst in jobs for f in (outputs_of(dst) if outputs_of else [dst])
            if Path(f).exists()]


def keep_existing(jobs, existing: list, overwrite: bool, skip_existing: bool, outputs_of=None):
    """(jobs to run, jobs skipped): existing outputs are refused with a UserError naming the first
    and the count unless --overwrite (all run) or --skip-existing (a job whose outputs all exist is
    skipped)."""
    # (ours) a re-run into a folder of earlier results, or -o naming a file, must not replace them
    # silently
    if not existing or overwrite:
        return list(jobs), []
    if not skip_existing:
        raise UserError(f"{len(existing)} output file(s) already exist, the first {existing[0]}: "
                        "add --skip-existing to continue where a run stopped, or --overwrite to "
                        "replace them")
    done, todo, skipped = {Path(f) for f in existing}, [], []
    for job in jobs:
        finished = all(Path(f) in done for f in (outputs_of(job[1]) if outputs_of else [job[1]]))
        (skipped if finished else todo).append(job)
    return todo, skipped


def probe_output_folder(folder) -> Path:
    """Create `folder` (and its parents) and write and delete a hidden file in it, before any work:
    a UserError names the folder and why it cannot be written (read-only, no permission, a file in
    the way)."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write to {folder}: {parent} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder}: {reason_of(e)}") from None
    probe = folder / f".probe.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as e:
        raise UserError(f"cannot write to the output folder {folder}: {reason_of(e)}") from None
    finally:
        probe.unlink(missing_ok=True)
    return folder


_UMASK = os.umask(0o022)
os.umask(_UMASK)                         # read the process umask (set and restored at import)


@contextlib.contextmanager
def atomic_path(path):
    """A hidden temp name beside `path` to write to, renamed onto `path` when the block succeeds and
    removed otherwise: readers see the old file or the new one, never half of one (images,
    checkpoints, configs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        # the usual 0644: some writers (safetensors) create files 0600
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    """The JSON object in `path` (args.json, config.json, experiment.json), or a ValueError naming
    the file."""
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {path.name} ({e})") from None
    return obj


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Tensors as .safetensors (contiguous, on the CPU), written atomically: a crash never leaves
    half a file."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(state, str(tmp), metadata=metadata)


def center_crop(img, side):
    """The central side × side square of img (3, H, W)."""
    _, h, w = img.shape
    top, left = (h - side) // 2, (w - side) // 2
    return img[:, top:top + side, left:left + side]


def contact_sheet(pairs, gap=4):
    """Rows of HR | LR (nearest-upscaled to HR size) on a white canvas, (3, H, W)."""
    rows = []
    for hr, lr in pairs:
        lr_up = F.interpolate(lr[None], size=hr.shape[1:], mode="nearest")[0]
        rows.append(torch.cat([hr, torch.ones(3, hr.shape[1], gap), lr_up], 2))
    width = max(r.shape[2] for r in rows)
    canvas = torch.ones(3, sum(r.shape[1] + gap for r in rows) - gap, width)
    y = 0
    for r in rows:
        canvas[:, y:y + r.shape[1], : r.shape[2]] = r
        y += r.shape[1] + gap
    return canvas


def read_state_dict(path) -> dict:
    """Read a flat {name: tensor} dict from .safetensors (preferred) or .pt/.pth (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not this format, a pickle with forbidden globals, ...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"{path}: not a readable {path.suffix or 'weights'} file ({reason})"
        ) from None
    # training checkpoints often nest the weights one level down
    for nest in (
        "model",
        "state_dict",
    ):
        if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
            sd = sd[nest]
    return sd


def read_safetensors_header(path) -> tuple[dict[str, tuple], dict]:
    """({name: shape}, metadata) of a .safetensors file from its header alone, or a ValueError
    naming the file and what is wrong with it: empty, truncated (shorter than its header says) or
    not a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a readable .safetensors file"
    if size == 0:
        raise ValueError(f"{bad} (empty file, 0 bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        first = f.read(1)
        if size < 8 or (first == b"{" and 8 + n > size):
            raise ValueError(f"{bad} (truncated: {size} bytes, shorter than its own header)")
        f.seek(8)
        raw = f.read(n) if first == b"{" else b""
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError,
            IndexError, ValueError):
        raise ValueError(f"{bad} (not a safetensors header)") from None
    if 8 + n + end > size:
        raise ValueError(f"{bad} (truncated: {size} bytes; its header lists {8 + n + end})")
    return shapes, meta


def load_strict(
    module: torch.nn.Module, sd: dict, path, prefix: str = "", assign: bool = True
) -> None:
    """Strict load with an error naming the file and the first bad key (`prefix` + name, as in the
    file).

    assign=True (vae.py's loaders) also fills a module built on the meta device; training resumes
    with False, so the optimiser keeps the parameters it holds."""
    own = module.state_dict()
    for k in own:
        if k not in sd:
            raise ValueError(
                f"{path}: missing key '{prefix}{k}' ({len(set(own) - set(sd))} missing in all)"
            )
    for k, v in sd.items():
        if k not in own:
            raise ValueError(
                f"{path}: unexpected key '{prefix}{k}' ({len(set(sd) - set(own))} unexpected in "
                "all)"
            )
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{path}: key '{prefix}{k}' has shape {tuple(v.shape)}, expected "
                f"{tuple(own[k].shape)}"
            )
    module.load_state_dict(sd, strict=True, assign=assign)
