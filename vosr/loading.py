"""Checkpoint folders: the official VOSR release's model folders and our run dirs, and the sampler
settings a sample.py --ckpt brings (ours: plumbing, not the method).

A release model folder (preset/ckpts/VOSR_*/) holds args.json, its training arguments, and the
weights: release_settings reads what args.json says beyond the DiT shape (codec channels, DINOv2
block, α), check_args checks it, release_kind tells teacher, student and VOSR 2.0 apart and
release_weights finds the .safetensors; the files themselves are loaded by the stages (dit.py:
release_config, load_release_checkpoint; vae.py: load_light_decoder, load_qwen_2d,
dinov2_official_to_timm). A run dir of train_teacher.py / distill.py holds config.json +
ema.safetensors. read_run_dir, read_release_folder and release_folder_of find a --ckpt's settings
and weights; sample.py builds its networks (load_model) and decides the settings the flags left to
the checkpoint (checkpoint_defaults).
"""
from __future__ import annotations

from pathlib import Path

from vosr.files import read_json, read_safetensors_header

# ---------------------------------------------------------------------- args.json and model folders

# The official release's args.json flags for architecture variants; dit.py implements one of each.
RELEASE_ARCH_FLAGS = {"use_qknorm": True, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
                      "wo_shift": False}
RELEASE_WEIGHT_DIRS = ("clean_weights", "checkpoints", ".")
RELEASE_WEIGHT_NAMES = ("ema_model.safetensors", "model.safetensors")
RELEASE_LATENT_CHANNELS = {"sd2": 4, "qwen": 16}  # ae_type -> C
RELEASE_DINOV2 = {
    "dinov2b": ("dinov2_vitb14_pretrain.pth", 768),
    "dinov2l": ("dinov2_vitl14_pretrain.pth", 1024),
}


def release_weights(folder: Path) -> Path:
    """The weights of a release model folder, found as the official release finds them: the first of
    clean_weights/, checkpoints/, the folder itself holding ema_model.safetensors or
    model.safetensors; else the first *.safetensors below the folder."""
    for sub in RELEASE_WEIGHT_DIRS:
        for name in RELEASE_WEIGHT_NAMES:
            if (folder / sub / name).is_file():
                return folder / sub / name
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise ValueError(
            f"{folder}: no weights (looked for {folder}/checkpoints/ema_model.safetensors, "
            "…/model.safetensors in clean_weights/, checkpoints/, the folder, then any "
            "*.safetensors)"
        )
    return found[0]


def release_settings(folder: Path) -> dict:
    """What args.json of a release model folder says beyond the DiT shape (release_config): the
    latent channels (ae_type sd2 -> 4, qwen -> 16), the semantic encoder (enc_type, enc_dim,
    dinov2_size, the one block of layer_dinov2b_list), α (the mean of weak_cond_strength_aelq_list,
    0.15) and infer_steps."""
    path = folder / "args.json"
    args = read_json(path)
    check_args(args, path)
    ae, enc = args.get("ae_type"), args.get("enc_type")
    if ae not in RELEASE_LATENT_CHANNELS:
        raise ValueError(f"{path}: ae_type {ae!r} is not one of {sorted(RELEASE_LATENT_CHANNELS)}")
    if enc not in RELEASE_DINOV2:
        raise ValueError(f"{path}: enc_type {enc!r} is not one of {sorted(RELEASE_DINOV2)}")
    layers = args.get("layer_dinov2b_list", [8 if enc == "dinov2b" else 17])
    if not (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], int)):
        raise ValueError(f"{path}: layer_dinov2b_list {layers!r}: one block index expected")
    run = dict(release=True, args=args, enc_dim=int(args.get("enc_dim", RELEASE_DINOV2[enc][1])),
               semantic_size=int(args.get("dinov2_size", 448)), semantic_layer=layers[0],
               patch_size=int(args.get("patch_size", 2)))
    strengths = args.get("weak_cond_strength_aelq_list")
    if isinstance(strengths, list) and strengths:
        run["alpha"] = sum(strengths) / len(strengths)
    if isinstance(args.get("infer_steps"), int) and args["infer_steps"] >= 1:
        run["infer_steps"] = args["infer_steps"]
    return run


# ---------------------------------------------------------------------- which model a folder holds
# Five kinds of release folder: VOSR_{0.5B,1.4B}_ms (teachers), VOSR_{0.5B,1.4B}_os (one-step
# students, distill_type "rcgm", with the r embedder) and VOSR2 (VOSR 2.0: distill_type "onestep",
# auxiliary_time_cond false, one step of one branch without r). args.json decides; the weights'
# r_embedder.* keys must agree with it.

TEACHER, STUDENT, ONESTEP = "teacher", "student", "onestep"
DISTILL_TYPES = {"rcgm": STUDENT, "onestep": ONESTEP}   # distill_type → kind; absent, null: teacher
KIND_NAMES = {TEACHER: "teacher", STUDENT: "one-step student",
              ONESTEP: "VOSR 2.0, one step of one branch, no r embedder"}
# the keys of VOSR 2.0's args.json (as community integrations that load it list them): all required
VOSR2_KEYS = ("ae_type", "dim", "depth", "num_heads", "patch_size", "enc_type", "enc_dim",
              "layer_dinov2b_list", "auxiliary_time_cond", "distill_type", "mlp_ratio",
              "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "encdim_ratio", "resolution")
ARG_TYPES = {**dict.fromkeys(("dim", "depth", "num_heads", "patch_size", "resolution", "enc_dim"),
                             int),
             **dict.fromkeys(("mlp_ratio", "encdim_ratio"), float),
             **dict.fromkeys(("auxiliary_time_cond", *RELEASE_ARCH_FLAGS), bool)}
DINOV2_DEPTH = {"dinov2b": 12, "dinov2l": 24}


def _typed(v, kind) -> bool:
    """v is a boolean or 0/1 (kind bool), a positive number (float), a positive whole one (int)."""
    if kind is bool:
        return isinstance(v, bool) or v in (0, 1) and isinstance(v, int)
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float)) and v > 0 and (kind is float or v == int(v))


def check_args(args: dict, path) -> None:
    """args.json checked before anything is built: a value of the wrong type, or one contradicting
    another, is a ValueError naming the key; VOSR 2.0's (distill_type onestep) needs VOSR2_KEYS."""
    dt = args.get("distill_type")
    if dt not in (None, "", "none") and dt not in DISTILL_TYPES:
        raise ValueError(f"{path}: 'distill_type' {dt!r} is not one of {sorted(DISTILL_TYPES)} "
                         "(or absent for a teacher)")
    missing = [k for k in VOSR2_KEYS if k not in args] if dt == "onestep" else []
    if missing:
        raise ValueError(f"{path}: '{missing[0]}' missing (VOSR 2.0's args.json, distill_type "
                         f"'onestep', has {', '.join(VOSR2_KEYS)}); {len(missing)} missing in all")
    for key, kind in ARG_TYPES.items():
        if key in args and not _typed(args[key], kind):
            want = "true or false" if kind is bool else f"a positive {kind.__name__}"
            raise ValueError(f"{path}: '{key}' is {args[key]!r}, expected {want}")
    if dt == "onestep" and args["auxiliary_time_cond"]:
        raise ValueError(f"{path}: 'auxiliary_time_cond' true contradicts distill_type 'onestep' "
                         "(VOSR 2.0: one step without the r embedder)")
    if "dim" in args and "num_heads" in args and args["dim"] % args["num_heads"]:
        raise ValueError(f"{path}: 'num_heads' {args['num_heads']} does not divide "
                         f"dim {args['dim']}")
    unit = 8 * int(args.get("patch_size", 2))
    if "resolution" in args and args["resolution"] % unit:
        raise ValueError(f"{path}: 'resolution' {args['resolution']} is not a multiple of {unit} "
                         "(8 × patch_size)")
    layers, depth = args.get("layer_dinov2b_list"), DINOV2_DEPTH.get(args.get("enc_type"))
    if depth and isinstance(layers, list) and any(isinstance(i, int) and not 0 <= i < depth
                                                  for i in layers):
        raise ValueError(f"{path}: 'layer_dinov2b_list' {layers} names a block that enc_type "
                         f"{args['enc_type']!r} ({depth} blocks) does not have")


def release_kind(args: dict, has_r: bool, path, weights) -> str:
    """TEACHER, STUDENT or ONESTEP from args.json's distill_type and auxiliary_time_cond (check_args
    first), cross-checked with the weights' r_embedder.* keys: a contradiction is a ValueError."""
    kind = DISTILL_TYPES.get(args.get("distill_type"), TEACHER)
    aux, keys = args.get("auxiliary_time_cond"), "has" if has_r else "has no"
    if (kind == STUDENT) != has_r:
        said = {TEACHER: "no 'distill_type' (a teacher)",
                STUDENT: "'distill_type' 'rcgm' (a one-step student with the r embedder)",
                ONESTEP: "'distill_type' 'onestep' (VOSR 2.0, no r embedder)"}[kind]
        raise ValueError(f"{path}: {said}, but {weights} {keys} r_embedder.* keys")
    if aux is not None and aux != has_r:
        raise ValueError(f"{path}: 'auxiliary_time_cond' is {str(aux).lower()}, but {weights} "
                         f"{keys} r_embedder.* keys")
    return kind


# ----------------------------------------------------------------------------- what a --ckpt brings

# sample.py without --ckpt
DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "vosr-small-photo"
# what a run dir's config.json "sampler_defaults" may set (ours)
SAMPLER_DEFAULTS = ("steps", "alpha", "tile", "tile_overlap", "color_fix", "upscale", "tile_blend",
                    "vae_tile", "lapped", "start")
RUN_WEIGHTS = {"ema.safetensors": "the EMA weights", "ckpt.safetensors": "the training state"}
# the release's scripts
RELEASE_CONVENTIONS = dict(color_fix="adain", upscale="pil", tile_blend="gaussian")
# ae_type / enc_type → (file beside the model folder, what it is, the flag that replaces it)
RELEASE_FILES = {
    "sd2": ("stable-diffusion-2-1-base", "the SD2.1 VAE of ae_type sd2", "--codec FOLDER"),
    "sd2-light": ("sd21_lwdecoder.pth", "the light decoder of ae_type sd2",
                  "--light-decoder FILE or --light-decoder none"),
    "qwen": ("Qwen-Image-vae-2d", "the Qwen-Image VAE of ae_type qwen", "--codec FOLDER"),
    **{
        enc: (f"torch_cache/checkpoints/{name}", f"the DINOv2 of enc_type {enc}", "--semantic FILE")
        for enc, (name, _) in RELEASE_DINOV2.items()
    },
}


def read_release_folder(folder: Path, cfg) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a release model folder (vosr/py); flags win."""
    def beside(key):
        name, what, flag = RELEASE_FILES[key]
        if not (folder.parent / name).exists():
            raise ValueError(
                f"{folder.parent / name}: not found ({what}; put it beside {folder.name}/ or give "
                f"{flag})"
            )
        return str(folder.parent / name)
    run = {**release_settings(folder), **RELEASE_CONVENTIONS}
    weights, ae = release_weights(folder), run["args"]["ae_type"]
    has_r = any(k.startswith("r_embedder.") for k in read_safetensors_header(weights)[0])
    run["kind"] = release_kind(run["args"], has_r, folder / "args.json", weights)
    run.update(
        semantic_size=cfg.semantic_size or run["semantic_size"],
        codec=cfg.codec or beside(ae),
        semantic_layer=run["semantic_layer"] if cfg.semantic_layer is None else cfg.semantic_layer,
        light_decoder=cfg.light_decoder or (beside("sd2-light") if ae == "sd2" else None),
        semantic=cfg.semantic or beside(run["args"]["enc_type"]),
    )
    return run, weights, [f"settings {folder / 'args.json'}"]


def check_sampler_defaults(own, where: str) -> None:
    """What a model recommends to sample.py (ours): a JSON object of some of SAMPLER_DEFAULTS, or a
    ValueError starting with `where`."""
    if not isinstance(own, dict) or not set(own) <= set(SAMPLER_DEFAULTS):
        raise ValueError(f"{where} {own!r}: a JSON object of some of {', '.join(SAMPLER_DEFAULTS)}")


def read_run_dir(folder: Path, cfg) -> tuple[dict, Path, list[str]]:
    """(run settings, weights, what was loaded) of a train_teacher.py / distill.py run dir; flags
    win."""
    conf_path, weights = folder / "config.json", folder / "ema.safetensors"
    if not conf_path.is_file() or not weights.is_file():
        raise ValueError(
            f"{folder}: neither a run dir (config.json + ema.safetensors) nor an official "
            "release model folder (args.json + weights)"
        )
    run = read_json(conf_path)
    missing = [
        k for k in ("preset", "codec", "semantic", "semantic_size", "train_grid") if k not in run
    ]
    if missing:
        raise ValueError(
            f"{conf_path}: missing {', '.join(missing)} (not written by train_teacher.py?)"
        )
    check_sampler_defaults(run.get("sampler_defaults", {}), f"{conf_path}: sampler_defaults")
    if (folder / run["semantic"]).is_file():  # a random encoder saved in the run dir
        run["semantic"] = str(folder / run["semantic"])
    run.update(
        {
            k: getattr(cfg, k)
            for k in ("codec", "light_decoder", "semantic", "semantic_size", "semantic_layer")
            if getattr(cfg, k) is not None
        }
    )
    return run, weights, [f"settings {conf_path}"]


def release_folder_of(weights: Path) -> Path | None:
    """The release model folder (args.json, no config.json) whose weights file is `weights` (found
    as release_weights finds them: beside args.json or in its clean_weights/ or checkpoints/), or
    None."""
    if not weights.is_file() or weights.suffix != ".safetensors":
        return None
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "args.json").is_file() and not (folder / "config.json").is_file():
            try:
                if release_weights(folder).resolve() == weights.resolve():
                    return folder
            except ValueError:
                return None
    return None
