"""Export a run's EMA weights (a teacher or a student) as fp16 + the config keys sample.py needs.

    python -m tools.export RUN_DIR OUT_DIR [--note TEXT] [--sampler-defaults JSON] [--overwrite]

OUT_DIR gets ema.safetensors (fp16) and config.json: a small, shippable model that
`sample.py --ckpt OUT_DIR` runs and `train_teacher.py --init OUT_DIR` can start from.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

import vae

from vosr.cli import OneLineParser, run_script
from vosr.files import read_json, read_safetensors_header, save_safetensors
from vosr.loading import SAMPLER_DEFAULTS, check_sampler_defaults
from vosr.runs import write_json

NAME = "export.py"
# What sample.py reads from a run's config.json (the model, the codec, the semantic encoder and its
# block, the conditioning it was trained with, how it meets the LR at inference), and what says
# where it came from.
EXPORT_KEYS = ("preset", "patch_size", "codec", "light_decoder", "semantic", "semantic_size",
               "semantic_layer", "train_grid", "enc_dim", "mode", "alpha", "degradation",
               "resize_back", "upscale", "color_fix", "tile_blend", "size", "teacher", "method",
               "omega", "steps", "batch", "lr", "ema")


def export_run(run_dir: str, out_dir: str, note: str = "", overwrite: bool = False,
               sampler_defaults: dict | None = None) -> Path:
    """A run's EMA weights (teacher or student) as fp16 safetensors + the config keys sample.py
    needs: a small, shippable model, which train_teacher.py --init can also start from."""
    src, out = Path(run_dir), Path(out_dir)
    if not (src / "config.json").is_file() or not (src / "ema.safetensors").is_file():
        raise SystemExit(
            f"{NAME}: RUN_DIR {src}: not a run dir (needs config.json and ema.safetensors)"
        )
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{NAME}: OUT_DIR {out} is a file, not a folder")
    if (out / "ema.safetensors").exists() and not overwrite:
        raise SystemExit(
            f"{NAME}: OUT_DIR {out} already holds a model (ema.safetensors); add --overwrite to "
            "replace it"
        )
    try:
        conf = read_json(src / "config.json")
        read_safetensors_header(src / "ema.safetensors")
    except ValueError as e:  # broken JSON, a truncated weights file: the message names the file
        raise SystemExit(f"{NAME}: RUN_DIR {src}: {e}") from None
    if conf.get("semantic") not in vae.BUILT_IN_SEMANTICS:   # a weights file: the user ships it
        raise SystemExit(f"{NAME}: {src} uses the semantic encoder file {conf.get('semantic')}; "
                         "export it beside the weights yourself")
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in load_file(str(src / "ema.safetensors")).items()
    }
    save_safetensors(state, out / "ema.safetensors")
    # unset (None) values are left out: sample.py's default stands in for them (α: 0.15)
    keep = {k: conf[k] for k in EXPORT_KEYS if conf.get(k) is not None} | (
        {"note": note} if note else {}
    )
    if sampler_defaults:              # the settings sample.py uses for this model unless given
        keep["sampler_defaults"] = sampler_defaults
    write_json(keep, out / "config.json")
    return out


def main(argv=None) -> None:
    p = OneLineParser(
        prog=NAME, description="export a run's EMA weights as fp16 for sample.py --ckpt OUT_DIR"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir of train_teacher.py or distill.py")
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="the folder to write (ema.safetensors, config.json)"
    )
    p.add_argument("--note", default="", help="a line saved in config.json, e.g. what the model is")
    p.add_argument(
        "--sampler-defaults",
        default=None,
        metavar="JSON",
        help="the sample.py settings this model runs with unless given, a JSON object of "
        f"some of {', '.join(SAMPLER_DEFAULTS)}, e.g. '{{\"lapped\": \"on\"}}' "
        "(default: none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    a = p.parse_args(argv)
    defaults = None
    if a.sampler_defaults:
        try:
            defaults = json.loads(a.sampler_defaults)
            check_sampler_defaults(defaults, "argument --sampler-defaults")
        except json.JSONDecodeError as e:
            p.error(f"argument --sampler-defaults: not JSON ({e})")
        except ValueError as e:
            p.error(str(e))
    out = export_run(a.run_dir, a.out_dir, a.note, a.overwrite, defaults)
    print(
        f"{NAME}: wrote {out}/ema.safetensors "
        f"({(out / 'ema.safetensors').stat().st_size / 1e6:.1f} MB, fp16)"
    )


if __name__ == "__main__":
    sys.exit(run_script(main, "export.py"))
