"""How sample.py runs its networks, not what they compute (ours, not the paper's method): the device
and number format (--device, --dtype), the check that no stage gives a NaN or inf, and the fast
paths (--fast, --compile, --cuda-graphs).

--dtype bf16 / fp16 runs every network of the pipeline (codec, semantic encoder, DiT) under
torch.autocast; the sampler's own arithmetic (Euler updates, tile blending, colour fix) stays fp32.
The default per device is the format measured fastest at a small error (DEFAULT_DTYPE; the table of
`python -m tools.precision`, docs/precision.md). A NaN or inf out of a stage is a NonFiniteError
naming the stage and the format (finite), never a black image. The fast paths compute what the plain
path computes (tests/test_bench.py checks every one; tools/bench_sample.py times them); sample.py's
pipeline asks FastPaths.apply for the DiT and the codec functions it calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vosr.files import UserError

# --device default of evaluate.py and tools/bench_sample.py
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# measured on CPU (docs/precision.md): bf16 autocast was not faster than fp32 even with native
# bf16, and fp16 was slower; no GPU was measured here, so CUDA and MPS keep fp32, the official
# scripts' format
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "fp32", "mps": "fp32"}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags: bf16 computed in hardware
# bf16 / fp32 time per image where bf16 is emulated: this CPU limited to AVX2, a user's CPU without
# AVX-512 BF16 (docs/precision.md)
EMULATED_BF16_SLOWDOWN = (4, 21)


class NonFiniteError(UserError):
    """A NaN or inf out of a stage of the pipeline: names the stage and the number format."""


def name_of(dtype: torch.dtype) -> str:
    """'fp32', 'bf16' or 'fp16' of a torch dtype."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def finite(x: torch.Tensor, stage: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x, or a NonFiniteError naming the stage and the format when it holds a NaN or an inf."""
    # (ours) a NaN becomes 0 when cast to 8 bits: without this check it is a black image and exit 0
    if bool(torch.isfinite(x).all()):
        return x
    if dtype == torch.float32:
        raise NonFiniteError(f"non-finite values (NaN or inf) out of the {stage} in fp32: not a "
                             "rounding problem of a lower precision; check the model files and the "
                             "input")
    raise NonFiniteError(f"non-finite values (NaN or inf) out of the {stage} in {name_of(dtype)}: "
                         "re-run with --dtype fp32")


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA, else Apple MPS, else the CPU; any other name as torch.device(name)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device) -> str:
    """The format sample.py runs in on this device when --dtype is not given (DEFAULT_DTYPE)."""
    return DEFAULT_DTYPE.get(torch.device(device).type, "fp32")


def native_bf16() -> bool | None:
    """Whether this CPU computes bf16 in hardware (NATIVE_BF16_FLAGS in /proc/cpuinfo), or None."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def dtype_warning(device, dtype: str) -> str | None:
    """A one-line warning when this format is known to be slow on this device, else None."""
    if torch.device(device).type != "cpu" or dtype != "bf16" or native_bf16() is not False:
        return None
    low, high = EMULATED_BF16_SLOWDOWN
    return (f"warning: this CPU has no native bf16 (no {' or '.join(NATIVE_BF16_FLAGS)} in "
            f"/proc/cpuinfo): --dtype bf16 is emulated here, measured {low}x to {high}x slower "
            "than fp32 on such CPUs (docs/precision.md); --dtype fp32 is faster")


# ----------------------------------------------------------------------------- fast paths

@dataclass
class FastPaths:
    """Speed-ups of VOSRPipeline, off by default; none changes what is computed
    (tests/test_bench.py)."""
    # project c_sem once per image and tile: it does not depend on z or t
    reuse_semantics: bool = False
    # NHWC conv weights in the codec, the layout of cuDNN's fastest kernels
    channels_last: bool = False
    # torch.compile mode of the DiT and the codec ("default", "max-autotune")
    compile: str | None = None
    # replay the DiT as CUDA graphs (fixed shapes, e.g. the one-step student)
    cuda_graphs: bool = False
    compile_backend: str = "inductor"  # tests use "aot_eager": the same graphs, no generated code

    @classmethod
    def from_config(cls, cfg) -> FastPaths:
        """The fast paths the sample.py flags ask for (--fast = --reuse-semantics --channels-last).
        """
        return cls(reuse_semantics=cfg.fast or cfg.reuse_semantics,
                   channels_last=cfg.fast or cfg.channels_last, compile=cfg.compile,
                   cuda_graphs=cfg.cuda_graphs)

    def apply(self, model, codec, device: torch.device):
        """(DiT, codec encode, codec decode) to run with these paths; channels_last converts the
        codec in place."""
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline runs on {device}")
        net, encode, decode = model, codec.encode, codec.decode
        if self.channels_last:
            codec.to(memory_format=torch.channels_last)  # 4-D (conv) weights only; no-op for pixel
        if self.compile or self.cuda_graphs:
            mode = None if self.compile in (None, "default") else self.compile
            dit_mode = (
                mode
                if not self.cuda_graphs
                # the compile modes that capture CUDA graphs
                else (
                    "max-autotune" if (mode or "").startswith("max-autotune") else "reduce-overhead"
                )
            )
            # noqa: E731 (inductor's)
            opts = lambda m: {"mode": m} if self.compile_backend == "inductor" else {}
            net = torch.compile(model, backend=self.compile_backend, **opts(dit_mode))
            if any(True for _ in codec.parameters()):  # the pixel codec has nothing to compile
                encode, decode = (torch.compile(fn, backend=self.compile_backend, **opts(mode))
                                  for fn in (codec.encode, codec.decode))
        return net, encode, decode
