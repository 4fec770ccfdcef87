"""Reading the official VOSR release's files as a user of its README has them (ours: plumbing, not the method).

A release model folder (preset/ckpts/VOSR_*/) holds args.json, its training arguments, and the weights:
release_config gives the DiTConfig, release_settings the rest (codec channels, DINOv2 block, α), release_weights
finds the .safetensors, and load_release_checkpoint loads it (or one of ours: the key names are the same)
strictly. Beside it lie sd21_lwdecoder.pth (load_light_decoder), the one-frame Qwen-Image-vae-2d/ folder
(load_qwen_2d) and DINOv2 in facebookresearch's key layout (dinov2_official_to_timm). Used by dit.py
(from_checkpoint), vae.py (load_codec, load_semantic), tools/loading.py (sample.py --ckpt), tools/runs.py
(train_teacher.py --init) and distill.py.
"""
import inspect
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from dit import PRESETS, DiTConfig, VOSRDiT
from tools.files import read_state_dict
from vae import _freeze, load_strict

# ----------------------------------------------------------------------------- args.json and model folders

# The official release's args.json flags for architecture variants; this module implements one of each.
RELEASE_ARCH_FLAGS = {"use_qknorm": True, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
                      "wo_shift": False}


def release_config(args: dict, latent_channels: int, enc_dim: int, with_r: bool, sem_hidden: int = 0) -> DiTConfig:
    """The DiTConfig of a released model from its args.json (the official release's training arguments).

    dim/depth/num_heads/patch_size/mlp_ratio give the shape; the RoPE reference grid is the training crop
    `resolution` / 8 (VAE factor) / patch_size (32 for the released 512² models). Raises ValueError naming
    the key when args.json asks for an architecture variant this module does not implement."""
    for key in ("dim", "depth", "num_heads"):
        if not isinstance(args.get(key), int):
            raise ValueError(f"args.json: '{key}' missing or not an integer (got {args.get(key)!r})")
    for key, ours in RELEASE_ARCH_FLAGS.items():
        if key in args and bool(args[key]) != ours:
            raise ValueError(f"args.json: {key}={args[key]!r} is not supported (this DiT implements {key}={ours})")
    patch = int(args.get("patch_size", 2))
    shape = dict(dim=args["dim"], depth=args["depth"], num_heads=args["num_heads"])
    preset = next((name for name, p in PRESETS.items() if p == shape), "custom")
    return DiTConfig(**shape, latent_channels=latent_channels, enc_dim=enc_dim, patch_size=patch,
                     train_grid=int(args.get("resolution", 512)) // 8 // patch,
                     mlp_ratio=float(args.get("mlp_ratio", 4.0)), with_r=with_r, sem_hidden=sem_hidden,
                     preset=preset)


RELEASE_WEIGHT_DIRS = ("clean_weights", "checkpoints", ".")
RELEASE_WEIGHT_NAMES = ("ema_model.safetensors", "model.safetensors")
RELEASE_LATENT_CHANNELS = {"sd2": 4, "qwen": 16}                                        # ae_type -> C
RELEASE_DINOV2 = {"dinov2b": ("dinov2_vitb14_pretrain.pth", 768), "dinov2l": ("dinov2_vitl14_pretrain.pth", 1024)}


def read_json(path: Path) -> dict:
    """The JSON object in `path` (args.json, config.json), or a ValueError naming the file."""
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {path.name} ({e})") from None
    return obj


def release_weights(folder: Path) -> Path:
    """The weights of a release model folder, found as the official release finds them: the first of
    clean_weights/, checkpoints/, the folder itself holding ema_model.safetensors or model.safetensors;
    else the first *.safetensors below the folder."""
    for sub in RELEASE_WEIGHT_DIRS:
        for name in RELEASE_WEIGHT_NAMES:
            if (folder / sub / name).is_file():
                return folder / sub / name
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise ValueError(f"{folder}: no weights (looked for {folder}/checkpoints/ema_model.safetensors, "
                         f"…/model.safetensors in clean_weights/, checkpoints/, the folder, then any *.safetensors)")
    return found[0]


def release_settings(folder: Path) -> dict:
    """What args.json of a release model folder says beyond the DiT shape (release_config): the latent
    channels (ae_type sd2 -> 4, qwen -> 16), the semantic encoder (enc_type, enc_dim, dinov2_size, the one
    block of layer_dinov2b_list), α (the mean of weak_cond_strength_aelq_list, 0.15) and infer_steps."""
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


SEMANTIC_INPUT = ("layer_norm.", "mlp_ca.fc1.")  # the layers whose shape follows the semantic width enc_dim


def load_release_checkpoint(model: VOSRDiT, path: str, own_rope: bool = False,
                            new_semantic: bool = False) -> list[str]:
    """Load a released VOSR (or our own) .safetensors strictly; returns the missing keys.

    Only r_embedder.* may be missing (a teacher loaded into a student: it stays at its init, and
    contributes nothing at r = t). Any other missing key, any unexpected key, or a shape mismatch
    raises an error naming the key, both shapes and the file. The file's RoPE tables are checked
    against ours, which verifies the position convention of the release's 2-D RoPE; own_rope=True keeps the model's
    tables instead (training on from weights of another crop size: stage 2 from stage 1). new_semantic=True
    (ours: a fine-tune onto another semantic encoder) keeps the model's SEMANTIC_INPUT layers at their init
    when the file's enc_dim differs; everything else still loads strictly.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state, own = load_file(path, device="cpu"), model.state_dict()
    if own_rope:
        state |= {k: v for k, v in own.items() if k.startswith("feat_rope.")}
    width = state.get("layer_norm.weight", own["layer_norm.weight"]).shape
    if new_semantic and width != own["layer_norm.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith(SEMANTIC_INPUT)}
    unexpected = [k for k in state if k not in own]
    if unexpected:
        student = unexpected[0].startswith("r_embedder.")
        hint = " (a student checkpoint: build the model with with_r=True)" if student else ""
        raise ValueError(f"{path}: unexpected key {unexpected[0]!r}{hint}; {len(unexpected)} unexpected in all")
    for k, v in own.items():  # model order, so the first mismatch reported is the earliest layer
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: shape mismatch at {k!r}: checkpoint {tuple(state[k].shape)} vs model "
                             f"{tuple(v.shape)} (check preset, latent_channels, enc_dim, train_grid)")
    missing = [k for k in own if k not in state]
    fresh = ("r_embedder.",) + (SEMANTIC_INPUT if new_semantic else ())
    bad = [k for k in missing if not k.startswith(fresh)]
    if bad:
        raise ValueError(f"{path}: missing key {bad[0]!r}; {len(bad)} missing in all")
    for name in ("freqs_cos", "freqs_sin"):
        ours = getattr(model.feat_rope, name).float().cpu()
        theirs = state[f"feat_rope.{name}"].float()
        tol = 1e-4 if state[f"feat_rope.{name}"].dtype == torch.float32 else 1e-2
        err = (ours - theirs).abs().max().item()
        if err > tol:
            raise ValueError(f"{path}: feat_rope.{name} differs from our RoPE tables by {err:.3g} "
                             f"(different position convention or train_grid)")
    model.load_state_dict(state, strict=False)  # strictness checked above; dtypes are cast on copy
    if missing:
        print(f"load_release_checkpoint: {path} has no {', '.join(missing)}: kept at init")
    return missing


# ----------------------------------------------------------------------------- codec and DINOv2 files

LIGHT_DECODER = dict(in_channels=4, out_channels=3, block_out_channels=(64, 128, 256, 256), layers_per_block=2)


def build_light_decoder(config: dict | None = None) -> nn.Module:
    """The lightweight SD2 decoder of VOSR-0.5B (~12.4 M params with the default shape), randomly
    initialised; its input is latent / scaling_factor. config: the shape keys of the release's
    sd21_lwdecoder.pth (in_channels, out_channels, block_out_channels, layers_per_block)."""
    from diffusers.models.autoencoders.vae import Decoder
    c = {**LIGHT_DECODER, **(config or {})}
    blocks = tuple(c["block_out_channels"])
    return Decoder(in_channels=c["in_channels"], out_channels=c["out_channels"],
                   up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                   layers_per_block=c["layers_per_block"], norm_num_groups=c.get("norm_num_groups", 32),
                   act_fn="silu")


def load_light_decoder(path) -> nn.Module:
    """The light decoder from a released file, loaded strictly.

    The release's sd21_lwdecoder.pth is a dict {"config": shape keys, "model_state_dict": weights} (the
    official release's inference scripts build the decoder from that config); a flat state dict
    (.safetensors or .pth) gets the default shape. A 'module.'/'decoder.' prefix on every key is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"light decoder not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:                      # truncated zip, not a pickle, a forbidden global, ...
            raise ValueError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:120]})") from None
        if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
            sd, config = raw["model_state_dict"], raw.get("config")
            if config is not None and not isinstance(config, dict):
                raise ValueError(f"{path}: 'config' is a {type(config).__name__}, expected a dict")
            unknown = set(config or {}) - set(LIGHT_DECODER) - {"norm_num_groups"}
            if unknown:
                raise ValueError(f"{path}: unknown light-decoder config key(s) {sorted(unknown)}")
        else:
            sd = raw
            for nest in ("model", "state_dict"):
                if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
                    sd = sd[nest]
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: not a state dict")
    for prefix in ("module.", "decoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    with torch.device("meta"):  # skip the random init, every weight comes from the file
        dec = build_light_decoder(config)
    load_strict(dec, sd, path)
    return _freeze(dec)


# The official release's 2-D Qwen-Image VAE folder (config _class_name "AutoencoderKLQwenImage2D") holds
# diffusers' AutoencoderKLQwenImage weights reduced to one frame: a causal 3-D conv kernel (O,I,3,k,k)
# becomes its last temporal tap (O,I,k,k), an RMS-norm gamma (C,1,1,1) loses its time axis (C,1,1), and
# the temporal up/down-sampling convs (time_conv) are dropped. For one frame that is exact: a causal conv
# pads the time axis with zeros in front, so only the last tap ever meets the frame, and time_conv only
# runs from the second frame on. We load such a folder into diffusers' class (the 2-D kernel in the last
# tap, zeros in the others) and run it on (B, C, 1, H, W).

def qwen_2d_to_3d(sd2d: dict, own: dict, path) -> dict:
    """The 2-D folder's state dict in the shapes of diffusers' AutoencoderKLQwenImage state dict `own`.

    Only the time_conv tensors may be absent (they get zeros: never used for one frame); any other missing
    or unexpected key, or a shape that is not a reduction of diffusers' one, raises an error naming it."""
    out = {}
    for k, v in sd2d.items():
        if k not in own:
            raise ValueError(f"{path}: unexpected key '{k}' for AutoencoderKLQwenImage")
        want = tuple(own[k].shape)
        if tuple(v.shape) == want:
            out[k] = v
        elif k.endswith(".gamma") and want == (*v.shape, 1):                 # (C,1,1) -> (C,1,1,1)
            out[k] = v.unsqueeze(-1)
        elif v.ndim == 4 and len(want) == 5 and want[:2] + want[3:] == tuple(v.shape):
            w = v.new_zeros(want)                                           # (O,I,T,k,k), zero taps
            w[:, :, -1] = v                                                 # the tap that meets the frame
            out[k] = w
        else:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(v.shape)}, expected {want} "
                             "(or its one-frame reduction)")
    for k in own:
        if k not in out:
            if ".time_conv." not in k:
                raise ValueError(f"{path}: missing key '{k}' ({len(set(own) - set(out))} missing in all)")
            out[k] = torch.zeros(own[k].shape, dtype=own[k].dtype)
    return out


def load_qwen_2d(folder, dtype=torch.float32) -> nn.Module:
    """diffusers' AutoencoderKLQwenImage with the weights of a 2-D folder (config.json + *.safetensors)."""
    try:
        from diffusers import AutoencoderKLQwenImage
    except ImportError:
        import diffusers
        raise ValueError(f"{folder}: the Qwen-Image VAE needs diffusers >= 0.35 (installed "
                         f"{diffusers.__version__})") from None
    folder = Path(folder)
    with open(folder / "config.json") as f:
        conf = json.load(f)
    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    kwargs = {k: v for k, v in conf.items() if k in params and k != "self"}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pth) in {folder}")
    sd = {}
    for file in files:                              # one file, or the shards of one state dict
        sd.update(read_state_dict(file))
    with torch.device("meta"):
        model = AutoencoderKLQwenImage(**kwargs)
    path = files[0] if len(files) == 1 else folder
    load_strict(model, qwen_2d_to_3d(sd, model.state_dict(), path), path)
    return model if dtype == torch.float32 else model.to(dtype)  # (diffusers warns on any .to(dtype))


def dinov2_official_to_timm(sd: dict) -> dict:
    """Map facebookresearch/dinov2 key names to timm's; timm-keyed dicts pass through unchanged.

    Same in both: cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,
    norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*. Differences handled here:
      mask_token                 (iBOT masking, unused at inference)      -> dropped
      blocks.C.N.*               (block_chunks > 0 training checkpoints)  -> blocks.N.*
      register_tokens            -> reg_token; pos_embed[:, 0] is folded into cls_token and removed from
                                    pos_embed (timm's no_embed_class layout for registers)
      head.*                     (a classifier head; never used)          -> dropped
    """
    out = {}
    for k, v in sd.items():
        if k == "mask_token" or k.startswith("head."):
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        if re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k):
            raise ValueError("SwiGLU DINOv2 (ViT-g) weights are not supported; use ViT-S/B/L")
        out[k] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out
