"""Command-line plumbing of the training scripts, and the argparse parser of every script.

OneLineParser is the parser of every script here (stages and tools/): a mistake is one line. The
rest serves train_teacher.py and distill.py (ours, not the paper's), whose flags are written out in
their build_parser: the flags typed (given_flags), the ranges (RANGES, checked on the resolved
config), the paths checked before anything is built, and --resume, where the run's saved config.json
gives the defaults and the flags typed again win (resolve_cli).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from pathlib import Path

from vosr.files import UserError, read_json


class OneLineParser(argparse.ArgumentParser):
    """argparse for every script here: a mistake is one line on stderr, `prog: message (see
    --help)`, exit 2, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of the training scripts: the docstring as written, each flag's default after its help.
    """

    def _get_default_metavar_for_optional(self, action):
        """N for a count, X for a number (shorter than the flag's name in capitals)."""
        short = {int: "N", float: "X"}.get(action.type)
        return short or super()._get_default_metavar_for_optional(action)


def given_flags(p: argparse.ArgumentParser, argv=None) -> dict:
    """The flags typed on the command line, without the parser's defaults (those are what --help
    shows):
    --resume must know which values were given again. argparse fills in a default only where the
    namespace has no value yet, so every flag starts UNSET, and what is still UNSET was not
    typed."""
    unset = object()
    start = argparse.Namespace(**{a.dest: unset for a in p._actions})
    return {k: v for k, v in vars(p.parse_args(argv, start)).items() if v is not unset}


def number(kind=float, low=None, high=None, low_open=False, multiple=None):
    """argparse type: a finite `kind` number in [low, high] ((low, high] with low_open); None:
    unbounded."""
    name = "an integer" if kind is int else "a number"
    need = (
        f" in {'(' if low_open else '['}{low}, {high}]"
        if low is not None and high is not None
        else f" {'above' if low_open else 'at least'} {low}"
        if low is not None
        else f" at most {high}"
        if high is not None
        else ""
    )

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and value > high
        ):
            raise argparse.ArgumentTypeError(f"must be{need}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def at_least(lo):
    return lambda v: v >= lo, f"must be at least {lo}"


IN_01, IN_01_OPEN = (
    (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (lambda v: 0 <= v < 1, "must be in [0, 1)"),
)
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "must be > 0"), (lambda v: v >= 0, "must be ≥ 0")
FINITE = (math.isfinite, "must be a finite number")
RANGES = {  # field → (test, what it must be); checked on the resolved config (presets, --resume)
    **dict.fromkeys(
        ("patch_size", "batch", "grad_accum", "steps", "log_every", "val_every", "val_steps",
         "ckpt_every"),
        at_least(1),
    ),
    **dict.fromkeys(("seed", "workers", "skip_nonfinite"), at_least(0)),
    "semantic_size": at_least(14),
    "lr": POSITIVE,
    "grad_clip": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "aug_std": NON_NEGATIVE,
    "beta1": IN_01_OPEN,
    "beta2": IN_01_OPEN,
    "ema": IN_01_OPEN,
    "p_partial": IN_01,
    "alpha_min": IN_01,
    "alpha_max": IN_01,
    "aug_mean": FINITE,
}
DISTILL_RANGES = RANGES | {"omega": FINITE, "delta": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
                           "n_rc": at_least(1), "alpha": IN_01}


def _show(v) -> str:
    """A value as the presets in --help and the --resume lines show it: none, on, off or the value.
    """
    return (
        "none" if v is None or v == "" else ("on" if v is True else "off" if v is False else str(v))
    )


def flag(field: str) -> str:
    """The flag of a config field: patch_size → --patch-size."""
    return "--" + field.replace("_", "-")


def presets_epilog(presets: dict) -> str:
    """--help's epilog of a training script: each preset and the defaults it sets."""
    rows = ["presets (each sets these defaults; any flag given wins):"]
    for k, d in presets.items():
        sets = ", ".join(flag(f) if v is True else f"{flag(f)} {_show(v)}"
                         for f, v in d.items() if f != "preset")
        rows.append(f"  {k:<12} {sets}" + (f" (model {d['preset']})" if "preset" in d else ""))
    return "\n".join(rows)


def codec_factor(spec: str) -> int | None:
    """Pixels per latent pixel of a codec spec (as vae.load_codec reads it); 8 for a diffusers VAE.
    """
    m = re.fullmatch(r"pixel(\d*)", spec)
    return int(m.group(1) or 8) if m else 8


def check_ranges(cfg, ranges: dict) -> None:
    """Every numeric setting in its range, or one line naming the flag, its value and the range."""
    # in the config's order
    for field in (f.name for f in dataclasses.fields(cfg) if f.name in ranges):
        (ok, must), v = ranges[field], getattr(cfg, field)
        if v is not None and not ok(v):
            raise UserError(f"{flag(field)} {v:g}: {must}")
    if cfg.alpha_min > cfg.alpha_max:
        raise UserError(f"--alpha-min {cfg.alpha_min:g} > --alpha-max {cfg.alpha_max:g}")
    if cfg.batch % cfg.grad_accum:
        raise UserError(f"--batch {cfg.batch}: must be a multiple of --grad-accum {cfg.grad_accum}")
    unit = codec_factor(cfg.codec) * cfg.patch_size
    if cfg.size < unit or cfg.size % unit:
        raise UserError(
            f"--size {cfg.size}: must be a multiple of {unit} (codec {cfg.codec}: "
            f"{codec_factor(cfg.codec)} px per latent pixel × --patch-size {cfg.patch_size})"
        )


def check_paths(cfg) -> None:
    """Inputs that do not exist stop here, before anything is built or written."""
    if not cfg.data:
        raise UserError(
            "--data DIR is required (a folder of HR images, .tar shards or a .txt list)"
        )
    for field in ("data", "val_data", "init"):
        v = getattr(cfg, field)
        if field == "init" and cfg.resume and (Path(cfg.out) / "ckpt.safetensors").exists():
            continue  # the checkpoint, not --init, gives the weights of a resume
        # a shard pattern: preflight
        if v and not Path(v).exists() and not (field == "data" and "{" in v):
            raise UserError(f"{flag(field)} {v}: not found")


# How to run now, not what the run is: never taken from a saved config.
NOT_INHERITED = ("out", "resume", "overwrite", "device")
# What the checkpoint's shapes (or its RoPE tables) depend on: a resume cannot change them.
FIXED_ON_RESUME = ("preset", "patch_size", "codec", "semantic", "semantic_size", "size")


def saved_config(out: str) -> dict | None:
    """--resume: the run's config.json (None if it has none yet); one line if it is broken."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        raise UserError(f"cannot resume: {e}") from None


def resolve_resume(config_cls, saved: dict, given: dict, name: str, out: str):
    """--resume: the saved config gives the defaults, the flags typed again win. Each value they
    change is printed and returned as {"flag", "from", "to"} (runs.write_run_config records it)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    conf = dataclasses.asdict(config_cls()) | {k: v for k, v in saved.items() if k in fields}
    conf = {k: v for k, v in conf.items() if k not in NOT_INHERITED}
    if conf.get("semantic") == "semantic.safetensors" and str(given.get("semantic", "")).startswith(
        "random"
    ):
        # that random encoder, saved in the run
        given = {k: v for k, v in given.items() if k != "semantic"}
    changed = {k: v for k, v in given.items() if k not in NOT_INHERITED and conf.get(k) != v}
    for k, v in changed.items():
        if k in FIXED_ON_RESUME:
            raise UserError(
                f"{flag(k)} {v}: the run in {out} has {flag(k)} {conf[k]}, "
                "which its checkpoint depends on; start a new run with --init to change it"
            )
    for k, v in changed.items():
        if os.environ.get("RANK", "0") == "0":  # torchrun: once, not once per rank
            print(f"{name}: {flag(k)}: {_show(conf[k])} -> {_show(v)} (given again)")
    return config_cls(**(conf | given)), [
        {"flag": flag(k), "from": conf[k], "to": v} for k, v in changed.items()
    ]


def resolve_cli(
    p, config_cls, given: dict, name: str, fresh, ranges: dict, check_files: bool, retyped=None
):
    """The end both CLIs share. --resume: the run's config.json gives the defaults and the flags
    typed again (`retyped`, else `given`) win; else `fresh()` builds the config. Then every range,
    and the paths. Returns (config, what --resume changed)."""
    if given.get("resume") and given.get("overwrite"):
        p.error("--resume and --overwrite: give one (continue the run, or start it over)")
    out = given.get("out", config_cls.out)
    saved = saved_config(out) if given.get("resume") else None
    if saved is None:
        cfg, changes = fresh(), []
    else:
        cfg, changes = resolve_resume(
            config_cls, saved, given if retyped is None else retyped, name, out
        )
    check_ranges(cfg, ranges)
    if check_files:
        check_paths(cfg)
    return cfg, changes


def run_script(main, prog: str) -> int:
    """main()'s exit status; Ctrl-C is one line and 130 (128 + SIGINT), never a traceback. The
    scripts that use it write their files atomically, so what was written is whole and nothing
    half-written stays."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted (Ctrl-C): the files written so far are complete, an unfinished "
            "one "
            "was not kept; run the same command again",
            file=sys.stderr,
        )
        return 130


# --------------------------------------------------------------------- evaluate.py's argparse types
# (shared with tools/bench_sample.py, tools/seams.py, tools/fetch_weights.py): range-checked numbers
# above, comma lists, help that states every default

class CLIParser(OneLineParser):
    """OneLineParser with evaluate.py's `prog: error: message` wording (as its other error lines);
    also the parser of tools/bench_sample.py, tools/seams.py and tools/fetch_weights.py."""

    def error(self, message):
        super().error(f"error: {message}")


def listed(item):
    """argparse type: a comma list, each entry parsed (and checked) by `item`; e.g.
    listed(number(int, 1))."""
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
    """Every option's help ends with its true default: '(default: X)' is appended where the help
    does not already state one (on/off flags are off; a default computed at run time must be
    described by hand)."""
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.nargs == 0 or a.required or not a.option_strings:
            continue  # --help, on/off flags, required flags, the subcommand
        if not a.help:
            a.help = (
                f"one of {', '.join(map(str, a.choices))}"
                if a.choices
                else a.dest.replace("_", " ")
            )
        if "default" not in a.help:
            shown_default = (
                ",".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else a.default
            )
            a.help += f" (default: {shown_default})".replace("%", "%%")
    return parser
