"""Finding and loading the model a sample.py --ckpt names, and the sampler settings that come with it.

Plumbing of sample.py (and of evaluate.py sweep, tools/bench_sample.py and tools/seams.py through
sample.load_pipeline), not the paper's method. A --ckpt is a train_teacher.py / distill.py run dir
(config.json + ema.safetensors), an official release model folder (args.json + weights, its codec and DINOv2
files beside it; vosr/release.py, dit.py and vae.py read those) or a bare .safetensors. Here: finding its
settings and weights (read_run_dir, read_release_folder, release_folder_of); sample.load_model builds its DiT,
codec and semantic encoder; checkpoint_defaults fills in the settings the flags left to the checkpoint.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vosr import release
from vosr.files import read_safetensors_header

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "vosr-small-photo"  # sample.py without --ckpt
# what a run dir's config.json "sampler_defaults" may set (ours)
SAMPLER_DEFAULTS = ("steps", "alpha", "tile", "tile_overlap", "color_fix", "upscale", "tile_blend", "vae_tile", "lapped",
                    "start")
RUN_WEIGHTS = {"ema.safetensors": "the EMA weights", "ckpt.safetensors": "the training state"}
RELEASE_CONVENTIONS = dict(color_fix="adain", upscale="pil", tile_blend="gaussian")   # the release's scripts
RELEASE_FILES = {  # ae_type / enc_type → (file beside the model folder, what it is, the flag that replaces it)
    "sd2": ("stable-diffusion-2-1-base", "the SD2.1 VAE of ae_type sd2", "--codec FOLDER"),
    "sd2-light": ("sd21_lwdecoder.pth", "the light decoder of ae_type sd2", "--light-decoder FILE or --light-decoder none"),
    "qwen": ("Qwen-Image-vae-2d", "the Qwen-Image VAE of ae_type qwen", "--codec FOLDER"),
    **{enc: (f"torch_cache/checkpoints/{name}", f"the DINOv2 of enc_type {enc}", "--semantic FILE")
       for enc, (name, _) in release.RELEASE_DINOV2.items()}}


def read_release_folder(folder: Path, cfg) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a release model folder (vosr/release.py); flags win."""
    def beside(key):
        name, what, flag = RELEASE_FILES[key]
        if not (folder.parent / name).exists():
            raise ValueError(f"{folder.parent / name}: not found ({what}; put it beside {folder.name}/ or give {flag})")
        return str(folder.parent / name)
    run = {**release.release_settings(folder), **RELEASE_CONVENTIONS}
    weights, ae = release.release_weights(folder), run["args"]["ae_type"]
    has_r = any(k.startswith("r_embedder.") for k in read_safetensors_header(weights)[0])
    run["kind"] = release.release_kind(run["args"], has_r, folder / "args.json", weights)
    run.update(semantic_size=cfg.semantic_size or run["semantic_size"], codec=cfg.codec or beside(ae),
               semantic_layer=run["semantic_layer"] if cfg.semantic_layer is None else cfg.semantic_layer,
               light_decoder=cfg.light_decoder or (beside("sd2-light") if ae == "sd2" else None),
               semantic=cfg.semantic or beside(run["args"]["enc_type"]))
    return run, weights, [f"settings {folder / 'args.json'}"]


def check_sampler_defaults(own, where: str) -> None:
    """What a model recommends to sample.py (ours): a JSON object of some of SAMPLER_DEFAULTS, or a
    ValueError starting with `where`."""
    if not isinstance(own, dict) or not set(own) <= set(SAMPLER_DEFAULTS):
        raise ValueError(f"{where} {own!r}: a JSON object of some of {', '.join(SAMPLER_DEFAULTS)}")


def read_run_dir(folder: Path, cfg) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a train_teacher.py / distill.py run dir; flags win."""
    conf_path, weights = folder / "config.json", folder / "ema.safetensors"
    if not conf_path.is_file() or not weights.is_file():
        raise ValueError(f"{folder}: neither a run dir (config.json + ema.safetensors) nor an official "
                         "release model folder (args.json + weights)")
    run = release.read_json(conf_path)
    missing = [k for k in ("preset", "codec", "semantic", "semantic_size", "train_grid") if k not in run]
    if missing:
        raise ValueError(f"{conf_path}: missing {', '.join(missing)} (not written by train_teacher.py?)")
    check_sampler_defaults(run.get("sampler_defaults", {}), f"{conf_path}: sampler_defaults")
    if (folder / run["semantic"]).is_file():                           # a random encoder saved in the run dir
        run["semantic"] = str(folder / run["semantic"])
    run.update({k: getattr(cfg, k) for k in ("codec", "light_decoder", "semantic", "semantic_size", "semantic_layer")
                if getattr(cfg, k) is not None})
    return run, weights, [f"settings {conf_path}"]


def onestep_settings(cfg, note=print):
    """VOSR 2.0 (args.json distill_type 'onestep'): one Euler step t = 1 → 0 of one branch with full
    conditioning (guidance 1 in eq. 2). --steps above 1 is a ValueError (the model has no steps in
    between); --guidance and --alpha get a note that they are ignored (its authors: no effect)."""
    if cfg.steps not in (None, 1):
        raise ValueError(f"--steps {cfg.steps}: VOSR 2.0 (args.json distill_type 'onestep') takes "
                         "one Euler step, t = 1 → 0; leave --steps out")
    default = type(cfg).__dataclass_fields__["guidance"].default
    ignored = [flag for flag, given in (("--guidance", cfg.guidance != default),
                                        ("--alpha", cfg.alpha is not None)) if given]
    if ignored:
        note(f"sample.py: {' and '.join(ignored)} ignored: VOSR 2.0 runs one branch with full "
             "conditioning (no guidance, no weak condition)")
    return replace(cfg, steps=1, guidance=1.0)


def checkpoint_defaults(cfg, pipe, run: dict, note=print):
    """The SampleConfig cfg with the settings left to the checkpoint filled in: first a run dir's own (config.json
    "sampler_defaults", e.g. the shipped models' fastest good --tile), then 1 step for a student, 25 (a release's
    infer_steps) for a teacher; α = 0.15 (a release's mean weak_cond_strength_aelq), 0 for a run trained with
    --mode cfg (its auxiliary branch never saw c_str); the release's colour fix, LR upscaler and tile blending
    for a release folder, else none / torch / linear (pil for a run trained with --resize-back
    release); VOSR 2.0's one step of one branch (onestep_settings)."""
    cfg = replace(cfg, **{k: v for k, v in run.get("sampler_defaults", {}).items() if getattr(cfg, k) is None})
    if run.get("kind") == release.ONESTEP:
        cfg = onestep_settings(cfg, note)
    steps = cfg.steps if cfg.steps is not None else 1 if pipe.student else run.get("infer_steps", 25)
    alpha = cfg.alpha if cfg.alpha is not None else run.get("alpha", 0.0 if run.get("mode") == "cfg" else 0.15)
    return replace(cfg, steps=steps, alpha=alpha, color_fix=cfg.color_fix or run.get("color_fix", "none"),
                   upscale=cfg.upscale or run.get("upscale", "pil" if run.get("resize_back") == "release" else "torch"),
                   tile_blend=cfg.tile_blend or run.get("tile_blend", "linear"), lapped=cfg.lapped or "off",
                   start=cfg.start if cfg.start is not None else 1.0)


def release_folder_of(weights: Path) -> Path | None:
    """The release model folder (args.json, no config.json) whose weights file is `weights` (found as
    release_weights finds them: beside args.json or in its clean_weights/ or checkpoints/), or None."""
    if not weights.is_file() or weights.suffix != ".safetensors":
        return None
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "args.json").is_file() and not (folder / "config.json").is_file():
            try:
                if release.release_weights(folder).resolve() == weights.resolve():
                    return folder
            except ValueError:
                return None
    return None
