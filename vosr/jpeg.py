"""JPEG compression in torch, the JPEG step of degrade.py's Real-ESRGAN degradation (ours:
plumbing).

A batched round trip (encode, decode) of libjpeg's baseline coder with a quality per sample, on the
device of the images, so the degradation runs on the GPU inside a training step: IJG tables scaled
by quality, JFIF colour transform, 4:2:0 chroma, 8×8 DCT quantisation, libjpeg's edge replication
and "fancy" upsampling. Real-ESRGAN itself uses BasicSR's DiffJPEG (basicsr/utils/diffjpeg.py);
tests/test_degrade.py checks this one against Pillow's libjpeg.
"""
import math

import torch
import torch.nn.functional as F

_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)
_CHROMA = torch.full((8, 8), 99.0, dtype=torch.float64)
_CHROMA[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
)


def jpeg_tables(quality):
    """IJG tables scaled by quality (libjpeg's jpeg_quality_scaling): (B,8,8) luma, chroma."""
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1, 1, 1).clamp(1, 100)
    s = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    return (torch.floor((_LUMA * s + 50) / 100).clamp(1, 255),
            torch.floor((_CHROMA * s + 50) / 100).clamp(1, 255))


def _dct_basis(device):
    """64×64 matrix of the 2-D 8×8 DCT-II on row-major blocks: kron(D, D), D orthonormal.

    (D ⊗ D) vec(X) = vec(D X Dᵀ), exactly JPEG's forward DCT; orthonormal, so its transpose inverts
    it.
    """
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).to(device=device, dtype=torch.float32)


def _quantise(x, table, basis):
    """x (B,H,W) level-shifted plane, H, W multiples of 8 → quantised-dequantised plane."""
    b, h, w = x.shape
    # (B, blocks, 64)
    blocks = x.reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3).reshape(b, -1, 64)
    coef = blocks @ basis.T                                          # forward DCT of every block
    t = table.to(x).reshape(b, 1, 64)
    blocks = (torch.round(coef / t) * t) @ basis                     # quantise, dequantise, IDCT
    return blocks.reshape(b, h // 8, w // 8, 8, 8).transpose(2, 3).reshape(b, h, w)


# JFIF full-range colour transforms (on 0..255 values); chroma is centred on 0 here, not 128
_RGB2YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCC2RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def jpeg(img, quality):
    """JPEG round trip in torch: img (B,3,H,W) in [0,1], quality (B,) per sample → (B,3,H,W)."""
    b, _, h, w = img.shape
    quality = torch.as_tensor(quality).reshape(-1).expand(b)
    luma_t, chroma_t = jpeg_tables(quality.cpu())
    x = img.float().clamp(0, 1) * 255
    x = F.pad(x, (0, (-w) % 16, 0, (-h) % 16), mode="replicate")   # libjpeg replicates the edge
    shift = torch.tensor([128.0, 0.0, 0.0], device=x.device)          # JPEG level shift (Y − 128)
    ycc = F.conv2d(x, _RGB2YCC.to(x.device)[:, :, None, None], bias=-shift)   # (B, 3, H16, W16)
    chroma = F.avg_pool2d(ycc[:, 1:], 2)                            # 4:2:0: (B, 2, H16/2, W16/2)
    basis = _dct_basis(x.device)
    y = _quantise(ycc[:, 0], luma_t, basis)
    chroma = _quantise(chroma.flatten(0, 1), chroma_t.repeat_interleave(2, 0), basis)
    chroma = chroma.unflatten(0, (b, 2))
    # libjpeg's default "fancy" upsampling is the 3/4-1/4 triangle filter = bilinear, half-pixel
    chroma = chroma[:, :, : (h + 1) // 2, : (w + 1) // 2]
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)[
        :, :, :h, :w
    ]
    ycc = torch.cat([y[:, None, :h, :w], chroma], 1)
    rgb = F.conv2d(ycc, _YCC2RGB.to(x.device)[:, :, None, None], bias=shift[[0, 0, 0]])
    return (rgb / 255).clamp(0, 1).to(img.dtype)
