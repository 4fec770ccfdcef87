"""The random draws of training: generators seeded by (seed, step), so a resume draws exactly what
the stopped run would have, and the random crop (and flip) of an HR image. Used by train_teacher.py
(folder data, noise and degradation draws) and vosr/shards.py (streamed data).
"""
import torch
import torch.nn.functional as F

# The random streams of a run. Each draw has its own generator, seeded by (seed, index, stream), so
# a resumed run draws exactly what the stopped one would have, whatever the number of ranks or
# workers:
DRAWS = 0           # index = step: t, z_1, κ, α and the c_str noise of the whole global batch
CROPS = 1           # index = global sample: the image, crop and flip of a folder's sample (HRCrops)
VAL_DEGRADE = 9     # index 0: the held-out crops' degradation, the same at every validation
VAL_NOISE = 10      # index 0: the held-out z_1
DEGRADE = 100       # + micro-batch (rank × grad_accum + k), index = step: its Real-ESRGAN draws
SHARD_CROPS = 1000  # + stream (rank × workers + worker), index = the stream's sample: crop and flip


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one step's draws: the RNG state *is* (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7919 + stream) % 2**63)


def random_crop(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """(3,H,W) → (3,size,size); images smaller than the crop are upscaled first."""
    h, w = img.shape[-2:]
    if min(h, w) < size:
        s = size / min(h, w)
        img = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))),
                            mode="bicubic", align_corners=False)[0].clamp(0, 1)
        h, w = img.shape[-2:]
    y = int(torch.randint(h - size + 1, (1,), generator=g))
    x = int(torch.randint(w - size + 1, (1,), generator=g))
    crop = img[:, y:y + size, x:x + size]
    return crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop
