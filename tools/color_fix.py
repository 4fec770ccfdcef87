"""The official release's colour fixes (those SR releases share, from StableSR), used by sample.py.

Not the paper's method: a post-processing of the clamped 8-bit output against the 8-bit LR↑ (color_fix_of
quantises both first), adain matching each channel's mean and std, wavelet swapping in the low frequencies.
sample.py applies the one --color-fix names (the release's adain for a release model folder).
"""
import torch
import torch.nn.functional as F


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel's mean and std matched to the reference's: (sr − μ_sr)/σ_sr · σ_ref + μ_ref."""
    def stats(x):                                                      # σ = sqrt(unbiased variance + eps)
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]
    (mu_s, sd_s), (mu_r, sd_r) = stats(sr), stats(ref)
    return (sr - mu_s) / sd_s * sd_r + mu_r


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest level of an à-trous wavelet decomposition: a 3×3 binomial dilated 1, 2, 4, 8, 16 (replicate pad)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output's high frequencies with the reference's low ones (colour, tone): sr − low(sr) + low(ref)."""
    return sr - _low_pass(sr) + _low_pass(ref)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → the nearest of the 256 8-bit levels (what an 8-bit file of x holds)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def color_fix_of(sr: torch.Tensor, ref: torch.Tensor | None, method: str) -> torch.Tensor:
    """The colour fix `method` of the clamped 8-bit output against the 8-bit LR↑, clamped to [0, 1]."""
    if ref is None or method == "none":
        return sr.clamp(0, 1)
    return COLOR_FIX[method](quantize8(sr), quantize8(ref)).clamp(0, 1)


COLOR_FIX = {"none": lambda sr, ref: sr, "adain": adain_color_fix, "wavelet": wavelet_color_fix}
