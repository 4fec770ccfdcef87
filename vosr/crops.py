"""The random draws of training: generators seeded by (seed, step), so a resume draws exactly what the
stopped run would have, and the random crop (and flip) of an HR image. Used by train_teacher.py (folder
data, noise and degradation draws) and vosr/shards.py (streamed data).
"""
import torch
import torch.nn.functional as F


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
