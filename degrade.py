"""Degradation: HR photos in, degraded LR images out (CLI: python degrade.py -i HR_DIR -o OUT_DIR
--crop 256).

VOSR trains only on synthetic pairs made with the Real-ESRGAN second-order degradation (paper §4.1,
"We then synthesize LR-HR training pairs using the Real-ESRGAN degradation pipeline"), here in
batched torch so that it runs on the GPU inside a training step:

    HR ─blur─resize─noise─JPEG─┬─(p=.8) blur─resize─noise─┬─ resize+sinc → JPEG ─┐
                               first order     second order └─ JPEG → resize+sinc ─┴─ clamp, 8-bit → LR

Unlike the released code (one kernel and one set of scalars per batch) every random choice is drawn
**per sample**, from an explicit CPU `torch.Generator`, so a seed reproduces a batch bit for bit and
the GPU path uses exactly the same draws. degrade_bicubic, a classic bicubic ×4, serves the first,
easy experiment (ours).
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vosr.cli import OneLineParser
from vosr import files
from vosr.files import ImageError, center_crop, contact_sheet, find_jobs, read_image, write_image
from vosr.jpeg import jpeg


@dataclass
class DegradeConfig:
    """Real-ESRGAN's parameters: the release's values, BasicSR's names (second-order ones end in 2,
    then final)."""
    kernel_range: tuple = (7, 9, 11, 13, 15, 17, 19, 21)  # odd sizes, zero-padded to kernel_pad_to
    kernel_pad_to: int = 21
    kernel_list: tuple = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                          "plateau_aniso")
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1                      # sinc kernel instead of a blur kernel
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)             # generalized Gaussian β
    betap_range: tuple = (1.0, 2.0)             # plateau β
    resize_prob: tuple = (0.2, 0.7, 0.1)        # up, down, keep
    resize_range: tuple = (0.15, 1.5)
    resize_modes: tuple = ("area", "bilinear", "bicubic")
    gaussian_noise_prob: float = 0.5            # else Poisson
    noise_range: tuple = (1.0, 30.0)            # Gaussian σ in 8-bit levels
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30, 95)
    second_blur_prob: float = 0.8
    kernel_list2: tuple = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                           "plateau_aniso")
    kernel_prob2: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)           # relative to the final H/scale size, as in BasicSR
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30, 95)
    final_sinc_prob: float = 0.8                # else a 21×21 delta (identity)
    final_jpeg_first_prob: float = 0.5          # JPEG then resize+sinc, else resize+sinc then JPEG


# ----------------------------------------------------------------------------- kernels
# All kernels are (B, 21, 21), sum 1; one of odd size k < 21 is zero outside the central k×k
# (BasicSR's zero-pad).

def _grid(pad_to=21):
    """Pixel offsets (x = column, y = row) from the centre of a pad_to × pad_to kernel."""
    ax = torch.arange(pad_to, dtype=torch.float64) - (pad_to - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _finish(k, size, pad_to):
    """Zero outside the size×size window and normalise to sum 1."""
    xx, yy = _grid(pad_to)
    half = (torch.as_tensor(size, dtype=torch.float64).reshape(-1, 1, 1) - 1) / 2
    k = k * ((xx.abs() <= half) & (yy.abs() <= half))
    return k / k.sum(dim=(-2, -1), keepdim=True)


def _mahalanobis(sigma_x, sigma_y, theta, pad_to):
    """q = [x y] Σ⁻¹ [x y]ᵀ with Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, per sample: (B, pad_to, pad_to)."""
    sx, sy, th = (
        torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in (sigma_x, sigma_y, theta)
    )
    c, s = torch.cos(th), torch.sin(th)
    a = c * c / sx**2 + s * s / sy**2  # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ = [[a, b], [b, d]]
    b = c * s * (1 / sx**2 - 1 / sy**2)
    d = s * s / sx**2 + c * c / sy**2
    xx, yy = _grid(pad_to)
    return a * xx**2 + 2 * b * xx * yy + d * yy**2


def gaussian_kernel(sigma_x, sigma_y, theta, size, pad_to=21):
    """Anisotropic Gaussian exp(-q/2); isotropic when sigma_x == sigma_y."""
    return _finish(torch.exp(-0.5 * _mahalanobis(sigma_x, sigma_y, theta, pad_to)), size, pad_to)


def generalized_gaussian_kernel(sigma_x, sigma_y, theta, beta, size, pad_to=21):
    """BasicSR's generalized Gaussian exp(-(q)^β / 2); β = 1 is the Gaussian."""
    beta = torch.as_tensor(beta, dtype=torch.float64).reshape(-1, 1, 1)
    return _finish(
        torch.exp(-0.5 * _mahalanobis(sigma_x, sigma_y, theta, pad_to) ** beta), size, pad_to
    )


def plateau_kernel(sigma_x, sigma_y, theta, beta, size, pad_to=21):
    """Plateau-shaped kernel 1 / (1 + q^β)."""
    beta = torch.as_tensor(beta, dtype=torch.float64).reshape(-1, 1, 1)
    return _finish(
        1.0 / (_mahalanobis(sigma_x, sigma_y, theta, pad_to) ** beta + 1.0), size, pad_to
    )


def sinc_kernel(cutoff, size, pad_to=21):
    """Circular low-pass (jinc): k(r) = ωc·J1(ωc·r) / (2π r), k(0) = ωc²/(4π)."""
    wc = torch.as_tensor(cutoff, dtype=torch.float64).reshape(-1, 1, 1)
    xx, yy = _grid(pad_to)
    r = torch.sqrt(xx**2 + yy**2)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    k = wc * torch.special.bessel_j1(wc * r_safe) / (2 * math.pi * r_safe)
    k = torch.where(r == 0, wc**2 / (4 * math.pi), k)
    return _finish(k, size, pad_to)


def delta_kernel(batch, pad_to=21):
    """Identity kernel (the "no final sinc" case)."""
    k = torch.zeros(batch, pad_to, pad_to, dtype=torch.float64)
    k[:, pad_to // 2, pad_to // 2] = 1.0
    return k


def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _beta(n, lo, hi, g):
    """BasicSR's β draw: half the time in [lo, 1], else in [1, hi]."""
    return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5,
                       _uniform(n, lo, 1.0, g), _uniform(n, 1.0, hi, g))


def random_kernels(n, kernel_range, kernel_list, kernel_prob, sinc_prob, sigma_range, betag_range,
                   betap_range, generator, pad_to=21):
    """Draw n blur kernels (B, pad_to, pad_to) the Real-ESRGAN way, one per sample."""
    g = generator
    sizes = torch.tensor(kernel_range)[torch.randint(len(kernel_range), (n,), generator=g)]
    kind = torch.multinomial(
        torch.tensor(kernel_prob, dtype=torch.float64), n, replacement=True, generator=g
    )
    names = [kernel_list[i] for i in kind.tolist()]
    iso = torch.tensor(["iso" in m and "aniso" not in m for m in names])
    sx = _uniform(n, *sigma_range, g)
    sy = torch.where(iso, sx, _uniform(n, *sigma_range, g))            # aniso: σx, σy independent
    theta = torch.where(iso, torch.zeros(n, dtype=torch.float64), _uniform(n, -math.pi, math.pi, g))
    bg, bp = _beta(n, *betag_range, g), _beta(n, *betap_range, g)
    k = gaussian_kernel(sx, sy, theta, sizes, pad_to)
    is_gen = torch.tensor(["generalized" in m for m in names]).reshape(-1, 1, 1)
    is_plat = torch.tensor(["plateau" in m for m in names]).reshape(-1, 1, 1)
    k = torch.where(is_gen, generalized_gaussian_kernel(sx, sy, theta, bg, sizes, pad_to), k)
    k = torch.where(is_plat, plateau_kernel(sx, sy, theta, bp, sizes, pad_to), k)
    # sinc instead of blur with prob sinc_prob; cutoff range depends on the kernel size
    use_sinc = torch.rand(n, generator=g, dtype=torch.float64) < sinc_prob
    wc = torch.where(
        sizes < 13, _uniform(n, math.pi / 3, math.pi, g), _uniform(n, math.pi / 5, math.pi, g)
    )
    return torch.where(use_sinc.reshape(-1, 1, 1), sinc_kernel(wc, sizes, pad_to), k)


def filter2d(img, kernel):
    """Per-sample 2-D filter: img (B,C,H,W), kernel (B,k,k); reflect padding like BasicSR's
    filter2D."""
    b, c, h, w = img.shape
    k, p = kernel.shape[-1], kernel.shape[-1] // 2
    # reflect needs p < size
    img = F.pad(img, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    weight = kernel.to(img).reshape(b, 1, k, k).repeat_interleave(c, dim=0)   # (B*C, 1, k, k)
    out = F.conv2d(img.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.reshape(b, c, h, w)


# ----------------------------------------------------------------------------- noise

def add_noise(img, gaussian, sigma, poisson_scale, gray, seed):
    """Gaussian (σ/255) or Poisson noise on ONE sample (1,3,h,w); gray = one plane for all channels.
    """
    g = torch.Generator(device=img.device).manual_seed(int(seed))
    if gaussian:
        shape = (1, 1) + img.shape[2:] if gray else img.shape
        noise = torch.randn(shape, generator=g, device=img.device, dtype=img.dtype) * (sigma / 255)
    else:
        # BasicSR: quantise to 8 bits, vals = 2^ceil(log2(#distinct values)), Poisson(img·vals)/vals
        x = 0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3] if gray else img
        x = (x * 255).round().clamp(0, 255)
        n_vals = int((torch.bincount(x.flatten().long(), minlength=256) > 0).sum())
        vals = 2.0 ** math.ceil(math.log2(max(n_vals, 1)))
        x = x / 255
        noise = (torch.poisson(x * vals, generator=g) / vals - x) * poisson_scale
    return (img + noise).clamp(0, 1)                 # noise on a gray plane broadcasts over RGB


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class OrderDraws:
    """The per-sample draws of one order of the pipeline (each a tensor of n values)."""
    scale: torch.Tensor      # resize factor (first order: of the input; second: of H/scale)
    mode: torch.Tensor       # index into the resize modes
    gaussian: torch.Tensor   # Gaussian noise, else Poisson
    sigma: torch.Tensor      # Gaussian σ in 8-bit levels
    poisson: torch.Tensor    # Poisson noise scale
    gray: torch.Tensor       # one noise plane for all channels
    seed: torch.Tensor       # the sample's own noise stream
    quality: torch.Tensor    # JPEG quality


@dataclass
class DegradationDraws:
    """Every random choice of the second-order pipeline for n samples (CPU tensors)."""
    kernel1: torch.Tensor    # (n, 21, 21) first-order blur (or sinc) kernels
    kernel2: torch.Tensor    # second-order kernels
    sinc: torch.Tensor       # final sinc filter, or a delta
    first: OrderDraws
    second: OrderDraws
    blur2: torch.Tensor      # apply the second-order blur
    mode_final: torch.Tensor  # resize mode of the final resize to H/scale
    jpeg_first: torch.Tensor  # JPEG, then resize + sinc (else resize + sinc, then JPEG)


def sample_params(n, cfg=None, generator=None) -> DegradationDraws:
    """Draw every random choice of the pipeline for n samples."""
    cfg = cfg or DegradeConfig()
    g = generator if generator is not None else torch.default_generator
    if g.device.type != "cpu":
        raise ValueError(
            "degrade: pass a CPU torch.Generator (draws happen on CPU so every device agrees)"
        )

    def u(lo, hi):                # n uniform draws in [lo, hi]
        return _uniform(n, lo, hi, g)

    def coin(p):                  # n coin flips, each True with probability p
        return torch.rand(n, generator=g, dtype=torch.float64) < p

    def modes():                  # n resize modes (area, bilinear, bicubic)
        return torch.randint(len(cfg.resize_modes), (n,), generator=g)

    def resize_scale(probs, rng):
        updown = torch.multinomial(
            torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=g
        )
        up, down = u(1.0, rng[1]), u(rng[0], 1.0)
        return torch.where(
            updown == 0, up, torch.where(updown == 1, down, torch.ones(n, dtype=torch.float64))
        )

    def order(
        resize_prob, resize_range, gaussian_prob, noise_range, poisson_range, gray_prob, jpeg_range
    ):
        scale, mode = resize_scale(resize_prob, resize_range), modes()
        gaussian, sigma, poisson, gray = (coin(gaussian_prob), u(*noise_range), u(*poisson_range),
                                          coin(gray_prob))
        seed = torch.randint(2**62, (n,), generator=g)
        quality = torch.randint(jpeg_range[0], jpeg_range[1] + 1, (n,), generator=g).double()
        return OrderDraws(scale, mode, gaussian, sigma, poisson, gray, seed, quality)

    kernel1 = random_kernels(n, cfg.kernel_range, cfg.kernel_list, cfg.kernel_prob, cfg.sinc_prob,
                             cfg.blur_sigma, cfg.betag_range, cfg.betap_range, g, cfg.kernel_pad_to)
    kernel2 = random_kernels(n, cfg.kernel_range, cfg.kernel_list2, cfg.kernel_prob2,
                             cfg.sinc_prob2, cfg.blur_sigma2, cfg.betag_range2, cfg.betap_range2, g,
                             cfg.kernel_pad_to)
    sizes = torch.tensor(cfg.kernel_range)[torch.randint(len(cfg.kernel_range), (n,), generator=g)]
    # final sinc: ωc ~ U[π/3, π]
    sinc = sinc_kernel(u(math.pi / 3, math.pi), sizes, cfg.kernel_pad_to)
    sinc = torch.where(
        coin(cfg.final_sinc_prob).reshape(-1, 1, 1), sinc, delta_kernel(n, cfg.kernel_pad_to)
    )
    first = order(cfg.resize_prob, cfg.resize_range, cfg.gaussian_noise_prob, cfg.noise_range,
                  cfg.poisson_scale_range, cfg.gray_noise_prob, cfg.jpeg_range)
    second = order(cfg.resize_prob2, cfg.resize_range2, cfg.gaussian_noise_prob2, cfg.noise_range2,
                   cfg.poisson_scale_range2, cfg.gray_noise_prob2, cfg.jpeg_range2)
    return DegradationDraws(kernel1, kernel2, sinc, first, second, blur2=coin(cfg.second_blur_prob),
                            mode_final=modes(), jpeg_first=coin(cfg.final_jpeg_first_prob))


def _resize(x, size, mode):
    size = (max(1, int(size[0])), max(1, int(size[1])))
    return F.interpolate(x, size=size, mode=mode, align_corners=None if mode == "area" else False)


def apply_degradation(hr, params: DegradationDraws, scale=4, modes=("area", "bilinear", "bicubic")):
    """Run the second-order pipeline on hr (B,3,H,W) with per-sample draws from sample_params."""
    b, _, h, w = hr.shape
    ho, wo = h // scale, w // scale                      # output floor(H/scale) × floor(W/scale)
    p, o1, o2 = params, params.first, params.second
    out = filter2d(hr, p.kernel1)                        # first-order blur, batched
    # From the first random resize on, each sample has its own size: loop over samples.
    finals = []
    for i in range(b):
        x = out[i:i + 1]                                 # (1, 3, H, W)
        s = float(o1.scale[i])                           # first resize is relative to the input
        x = _resize(x, (x.shape[2] * s, x.shape[3] * s), modes[o1.mode[i]])  # (1, 3, h1, w1)
        x = add_noise(x, bool(o1.gaussian[i]), float(o1.sigma[i]), float(o1.poisson[i]),
                      bool(o1.gray[i]), int(o1.seed[i]))
        x = jpeg(x, o1.quality[i:i + 1])
        # --- second order ---
        if p.blur2[i]:
            x = filter2d(x, p.kernel2[i:i + 1])
        s = float(o2.scale[i])                           # second resize is relative to H/scale
        x = _resize(x, (h / scale * s, w / scale * s), modes[o2.mode[i]])  # (1, 3, h2, w2)
        x = add_noise(x, bool(o2.gaussian[i]), float(o2.sigma[i]), float(o2.poisson[i]),
                      bool(o2.gray[i]), int(o2.seed[i]))
        if p.jpeg_first[i]:                              # order B: JPEG, then resize + sinc
            x = jpeg(x, o2.quality[i:i + 1])
        finals.append(_resize(x, (ho, wo), modes[p.mode_final[i]]))
    out = filter2d(torch.cat(finals), p.sinc)            # all samples are (ho, wo) again: batched
    last = ~p.jpeg_first                                 # order A: resize + sinc, then JPEG
    if last.any():
        idx = last.nonzero().flatten().to(out.device)
        out = out.index_copy(0, idx, jpeg(out[idx], o2.quality[last]))
    return (out.clamp(0, 1) * 255).round() / 255


def _check_hr(hr, scale):
    if hr.dim() != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(
            f"degrade: expected float hr of shape (B,3,H,W), got {hr.dtype} {tuple(hr.shape)}"
        )
    if hr.shape[2] < scale or hr.shape[3] < scale:
        raise ValueError(
            f"degrade: image {hr.shape[2]}×{hr.shape[3]} is smaller than the scale {scale}"
        )


def _resize_back(lr, size, mode="bicubic", generator=None, modes=("area", "bilinear", "bicubic")):
    """LR → `size` on the 8-bit grid. mode "bicubic": bicubic; "release": the official release's
    resize-back, a mode drawn from `modes`, here per sample from `generator` (CPU; None: torch's),
    there once per batch."""
    if mode not in ("bicubic", "release"):
        raise ValueError(f"degrade: resize_back must be 'bicubic' or 'release', got {mode!r}")
    if mode == "bicubic":
        up = F.interpolate(lr, size=size, mode="bicubic", align_corners=False)
    else:
        g = generator if generator is not None else torch.default_generator
        pick = torch.randint(len(modes), (lr.shape[0],), generator=g)
        up = torch.cat([_resize(lr[i:i + 1], size, modes[int(k)]) for i, k in enumerate(pick)])
    return (up.clamp(0, 1) * 255).round() / 255


def degrade(hr, scale=4, generator=None, resize_back=False, cfg=None):
    """Real-ESRGAN second-order degradation of hr (B,3,H,W) in [0,1] → LR (B,3,H/scale,W/scale),
    8-bit grid.

    resize_back True or "bicubic": bicubic back to (B,3,H,W); "release": a random mode per sample
    (_resize_back, drawn after the degradation's draws). All draws are per sample, from `generator`
    (CPU; None: torch's)."""
    _check_hr(hr, scale)
    cfg = cfg or DegradeConfig()
    params = sample_params(hr.shape[0], cfg, generator)
    lr = apply_degradation(hr.float(), params, scale, cfg.resize_modes)
    if resize_back:
        mode = "bicubic" if resize_back is True else resize_back
        lr = _resize_back(lr, hr.shape[2:], mode, generator, cfg.resize_modes)
    return lr.to(hr.dtype)


def degrade_bicubic(hr, scale=4, resize_back=False):
    """Classic SR degradation: antialiased bicubic ×1/scale, rounded to 8 bits (ours, not the
    paper's)."""
    _check_hr(hr, scale)
    h, w = hr.shape[2] // scale, hr.shape[3] // scale
    lr = F.interpolate(hr.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    lr = (lr.clamp(0, 1) * 255).round() / 255
    return (_resize_back(lr, hr.shape[2:]) if resize_back else lr).to(hr.dtype)


# A light Real-ESRGAN setting (ours): the same two orders with mild blur, noise and JPEG, for the
# middle of a mix that must also keep clean and lightly degraded photos intact (the full ranges
# above reach down to light degradations only rarely).
LIGHT = DegradeConfig(blur_sigma=(0.2, 1.2), blur_sigma2=(0.2, 0.8), sinc_prob=0.0, sinc_prob2=0.0,
                      resize_prob=(0.2, 0.3, 0.5), resize_range=(0.7, 1.2),
                      resize_prob2=(0.2, 0.3, 0.5), resize_range2=(0.8, 1.1),
                      noise_range=(1.0, 6.0), noise_range2=(1.0, 4.0),
                      poisson_scale_range=(0.05, 0.4), poisson_scale_range2=(0.05, 0.3),
                      jpeg_range=(75, 95), jpeg_range2=(80, 95), final_sinc_prob=0.2)

# The mix of `--degradation mix` (ours): clean bicubic ×4, light and full Real-ESRGAN, each a third
# of the samples, so one model learns to keep what a clean photo has and to restore what a degraded
# one lost.
MIX = ("bicubic", "light", "realesrgan")


def degrade_mix(hr, scale=4, generator=None, weights=(1.0, 1.0, 1.0)):
    """Each sample of hr (B,3,H,W) degraded by one kind of MIX, drawn per sample by `weights` → LR.
    """
    _check_hr(hr, scale)
    g = generator if generator is not None else torch.default_generator
    kind = torch.multinomial(
        torch.tensor(weights, dtype=torch.float), hr.shape[0], True, generator=g
    )
    h, w = hr.shape[2] // scale, hr.shape[3] // scale
    lr = hr.new_empty(hr.shape[0], 3, h, w)
    for k, name in enumerate(MIX):
        idx = (kind == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        if name == "bicubic":
            lr[idx] = degrade_bicubic(hr[idx], scale)
        else:
            lr[idx] = degrade(hr[idx], scale, g, cfg=LIGHT if name == "light" else None)
    return lr


# ----------------------------------------------------------------------------- CLI

def run_folder(args):
    """Degrade every image under args.input into args.output/{hr,lr}; returns the exit code."""
    from tqdm import tqdm
    out = Path(args.output)
    try:
        jobs = find_jobs(Path(args.input), out, single_file_ok=False)
    except OSError as e:  # missing input, no images, output is a file or inside the input
        print(f"error: {e}", file=sys.stderr)
        return 2

    def pair(dst):  # the files of one job: hr/ and lr/ under the output folder
        return [out / "hr" / dst.relative_to(out), out / "lr" / dst.relative_to(out)]
    sheet_path = out / "contact_sheet.png"
    existing = files.existing_outputs(jobs, pair) + ([sheet_path] if sheet_path.exists() else [])
    # (ours) earlier pairs are never replaced silently, an unwritable output is said before the work
    try:
        jobs, kept = files.keep_existing(jobs, existing, args.overwrite, args.skip_existing, pair)
        for folder in sorted({f.parent for _, dst in jobs for f in pair(dst)} | {out}):
            files.probe_output_folder(folder)
    except files.UserError as e:
        print(f"degrade.py: {e}", file=sys.stderr)
        return 2
    if not jobs:
        print(f"degrade.py: all {len(kept)} pair(s) are in {out} already; nothing to do")
        return 0
    device, gen = torch.device(args.device), torch.Generator().manual_seed(args.seed)
    fn = (
        degrade
        if args.mode == "realesrgan"
        else (lambda x, scale, generator: degrade_bicubic(x, scale))
    )
    pending, sheet, done, lr_sizes = {}, [], [], set()

    def flush(side):
        names, crops = zip(*pending.pop(side))
        lrs = fn(torch.stack(crops).to(device), scale=args.scale, generator=gen).cpu()
        for name, hr, lr in zip(names, crops, lrs):
            write_image(out / "hr" / name, hr)
            write_image(out / "lr" / name, lr)
            lr_sizes.add(tuple(lr.shape[1:]))
            if len(sheet) < 8:
                sheet.append((hr, lr))
        done.extend(names)

    try:
        named = [(src, dst.relative_to(out)) for src, dst in jobs]
        for path, name in tqdm(named, desc="degrade", unit="img", disable=None):   # None: on a tty
            try:
                img = read_image(path)
                side = min(args.crop, img.shape[1], img.shape[2]) // args.scale * args.scale
                if side < args.scale:
                    raise ImageError(f"{path}: {img.shape[2]}×{img.shape[1]} is too small for "
                                     f"scale {args.scale}")
            except ImageError as e:
                tqdm.write(f"skipped: {e}", file=sys.stderr)
                continue
            if side < args.crop:
                tqdm.write(f"note: {path} is {img.shape[2]}×{img.shape[1]}, smaller than --crop "
                           f"{args.crop}; cropping {side}×{side}", file=sys.stderr)
            pending.setdefault(side, []).append((name, center_crop(img, side)))
            if len(pending[side]) >= args.batch:             # batches of equal-size crops
                flush(side)
        for side in list(pending):
            flush(side)
        if done:
            write_image(out / "contact_sheet.png", contact_sheet(sheet))
    except KeyboardInterrupt:   # Ctrl-C: what is written, how to go on (a pair is whole or absent)
        print(f"degrade.py: interrupted: {len(done)} of {len(jobs)} pair(s) written to {out} "
              f"({len(kept)} kept from before); run the same command with --skip-existing to do "
              "the rest", file=sys.stderr)
        return 130
    except files.WriteError as e:   # a full disk: the next would fail too; keep what is written
        print(f"degrade.py: {e}; {len(done)} of {len(jobs)} pair(s) written to {out} are kept; "
              "run the same command with --skip-existing to do the rest", file=sys.stderr)
        return 1
    if not done:
        print(f"error: none of the {len(jobs)} files could be processed", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{h}×{w}" for h, w in sorted(lr_sizes))
    print(f"wrote {len(done)} HR/LR pairs (LR {sizes}) to {out}; skipped {len(jobs) - len(done)} "
          f"file(s); kept {len(kept)} existing pair(s); contact sheet: {out / 'contact_sheet.png'}")
    return 0


def main(argv=None):
    ap = OneLineParser(
        description="Make HR/LR training pairs with the Real-ESRGAN degradation "
        "(or bicubic). Throughput: python -m tools.bench_degrade"
    )
    ap.add_argument(
        "-i", "--input", help="folder of HR images (searched recursively) or one image file"
    )
    ap.add_argument("-o", "--output", help="output folder: writes hr/, lr/ and contact_sheet.png")
    ap.add_argument("--scale", type=int, default=4, help="downscaling factor (default 4)")
    ap.add_argument(
        "--crop", type=int, default=512, help="centre-crop side in HR pixels (default 512)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the degradation draws (default 0)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    ap.add_argument(
        "--mode",
        choices=("realesrgan", "bicubic"),
        default="realesrgan",
        help="realesrgan: the second-order pipeline (default); bicubic: classic antialiased "
             "×1/scale",
    )
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="replace pairs that already exist in the output folder (default: refuse to "
                        "start)")
    g.add_argument("--skip-existing", action="store_true",
                   help="keep the pairs already in the output folder and make only the missing "
                        "ones (they get draws of their own, not those an uninterrupted run would "
                        "have given them)")
    args = ap.parse_args(argv)
    if args.scale < 1 or args.batch < 1:
        ap.error("--scale and --batch must be positive")
    try:
        torch.empty(1, device=args.device)
    except (RuntimeError, AssertionError) as e:
        print(f"error: device {args.device!r} is not usable: {e}", file=sys.stderr)
        return 2
    if not args.input or not args.output:
        ap.error("-i/--input and -o/--output are required")
    if args.crop < args.scale or args.crop % args.scale:
        ap.error(f"--crop {args.crop} must be a positive multiple of --scale {args.scale}")
    return run_folder(args)


if __name__ == "__main__":
    sys.exit(main())
