"""Speed-ups of sample.VOSRPipeline that compute the same thing: sample.py --fast, --compile, --cuda-graphs.

Not the paper's method: how the networks run, not what they compute (tests/test_bench.py checks that every
path gives the plain path's output; tools/bench_sample.py times them). sample.py's pipeline asks FastPaths.apply
for the DiT and the codec functions it calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FastPaths:
    """Speed-ups of VOSRPipeline, off by default; none changes what is computed (tests/test_bench.py)."""
    reuse_semantics: bool = False      # project c_sem once per image and tile: it does not depend on z or t
    channels_last: bool = False        # NHWC conv weights in the codec, the layout of cuDNN's fastest kernels
    compile: str | None = None         # torch.compile mode of the DiT and the codec ("default", "max-autotune")
    cuda_graphs: bool = False          # replay the DiT as CUDA graphs (fixed shapes, e.g. the one-step student)
    compile_backend: str = "inductor"  # tests use "aot_eager": the same graphs, no generated code

    @classmethod
    def from_config(cls, cfg) -> FastPaths:
        """The fast paths the sample.py flags ask for (--fast = --reuse-semantics --channels-last)."""
        return cls(reuse_semantics=cfg.fast or cfg.reuse_semantics, channels_last=cfg.fast or cfg.channels_last,
                   compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)

    def apply(self, model, codec, device: torch.device):
        """(DiT, codec encode, codec decode) to run with these paths; channels_last converts the codec in place."""
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline runs on {device}")
        net, encode, decode = model, codec.encode, codec.decode
        if self.channels_last:
            codec.to(memory_format=torch.channels_last)               # 4-D (conv) weights only; no-op for pixel
        if self.compile or self.cuda_graphs:
            mode = None if self.compile in (None, "default") else self.compile
            dit_mode = mode if not self.cuda_graphs else (      # the compile modes that capture CUDA graphs
                "max-autotune" if (mode or "").startswith("max-autotune") else "reduce-overhead")
            opts = lambda m: {"mode": m} if self.compile_backend == "inductor" else {}  # noqa: E731 (inductor's)
            net = torch.compile(model, backend=self.compile_backend, **opts(dit_mode))
            if any(True for _ in codec.parameters()):                 # the pixel codec has nothing to compile
                encode, decode = (torch.compile(fn, backend=self.compile_backend, **opts(mode))
                                  for fn in (codec.encode, codec.decode))
        return net, encode, decode
