"""Colour fixes of the output against the LR↑, used by sample.py (post-processing, not the method).

Computed on the clamped 8-bit output against the 8-bit LR↑ (color_fix_of quantises both first).
`adain` and `wavelet` are the official release's (its inference scripts' `--align_method`, the
default of a release folder): adain matches each channel's mean and std; wavelet, despite its name,
is one Gaussian split that swaps in the reference's low frequencies. `adain-var` and
`wavelet-atrous` are ours (this project's earlier definitions, as StableSR's colorfix):
σ = sqrt(var + eps), and a 5-level à-trous low pass.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _std(flat: torch.Tensor) -> torch.Tensor:
    """torch's unbiased std over the last axis; (ours) 0, not NaN, for one value (a 1×1 image)."""
    return flat.std(-1, correction=1 if flat.shape[-1] > 1 else 0)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and unbiased std, shaped to broadcast over (B, C, H, W)."""
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], _std(flat)[..., None, None]


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The release's adain, per channel: (sr − μ_sr)/(σ_sr + eps)·(σ_ref + eps) + μ_ref, σ the
    unbiased std."""
    (mu_s, sd_s), (mu_r, sd_r) = _moments(sr), _moments(ref)
    return (sr - mu_s) / (sd_s + eps) * (sd_r + eps) + mu_r


def adain_var_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(ours) adain with σ = sqrt(unbiased variance + eps): (sr − μ_sr)/σ_sr · σ_ref + μ_ref."""
    (mu_s, sd_s), (mu_r, sd_r) = _moments(sr), _moments(ref)
    return (sr - mu_s) / (sd_s ** 2 + eps).sqrt() * (sd_r ** 2 + eps).sqrt() + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest level of an à-trous wavelet decomposition: a 3×3 binomial dilated 1, 2, 4, 8,
    16 (replicate pad)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_atrous_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(ours) The output's high frequencies with the reference's low ones (5-level à-trous):
    sr − low(sr) + low(ref)."""
    return sr - _low_pass(sr) + _low_pass(ref)


def gaussian_low_pass(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """OpenCV's GaussianBlur(img, (0, 0), sigma) of each image of x (B,C,H,W), in float32."""
    import cv2                                 # opencv-python-headless (requirements.txt)
    imgs = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    low = [cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), sigma).reshape(img.shape)
           for img in imgs]
    return torch.from_numpy(np.stack(low)).permute(0, 3, 1, 2).to(x.device)


def resize_lanczos(ref: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ref (B,3,h,w), 8-bit levels in [0,1], resized to (H, W) with PIL LANCZOS (as it is at its
    own size: PIL returns a copy)."""
    if tuple(ref.shape[-2:]) == tuple(size):
        return ref
    out = []
    for img in ref:
        arr = img.float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        up = Image.fromarray(arr, "RGB").resize((size[1], size[0]), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1))
    return torch.stack(out).to(ref.device, torch.float32).div_(255)


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The release's 'wavelet' (one Gaussian split): clip(low(ref) + (sr − low(sr)), 0, 1), low =
    OpenCV's GaussianBlur, σ = 5; the reference first resized to the output's size (PIL LANCZOS)."""
    ref = resize_lanczos(ref, tuple(sr.shape[-2:]))
    return (gaussian_low_pass(ref, sigma) + (sr - gaussian_low_pass(sr, sigma))).clamp(0, 1)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the nearest of the 256 8-bit levels (what an 8-bit file of x holds)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def truncate8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the 8-bit level below (a uint8 cast of x·255), as the release's wavelet ends."""
    return x.clamp(0, 1).mul(255).floor().div(255)


def color_fix_of(sr: torch.Tensor, ref: torch.Tensor | None, method: str) -> torch.Tensor:
    """The colour fix `method` of the clamped 8-bit output against the 8-bit LR↑, in [0, 1]; the
    release's wavelet also truncated to 8 bits, as its function returns them."""
    if ref is None or method == "none":
        return sr.clamp(0, 1)
    fixed = COLOR_FIX[method](quantize8(sr), quantize8(ref)).clamp(0, 1)
    return truncate8(fixed) if method == "wavelet" else fixed


def no_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output as it is."""
    return sr


COLOR_FIX = {"none": no_color_fix, "adain": adain_color_fix, "wavelet": wavelet_color_fix,
             "adain-var": adain_var_color_fix, "wavelet-atrous": wavelet_atrous_color_fix}
