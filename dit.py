"""VOSR denoiser: LightningDiT with cross-attention to semantic tokens (paper §3.2, Fig. 2).

The network predicts the flow-matching velocity v = z_1 - z_0 (noise - data, eq. 1) from

    x     = concat[c_str, z_t]   (B, 2C, h, w)  structural condition (encoded LR) + noisy latent
    t     (B,) in [0, 1]                         flow time, used as given (not x1000)
    c_sem (B, N, enc_dim) or None                semantic tokens (DINOv2 features); None = the
                                                 "no semantics" input of the partial branch (eq. 2)
    r     (B,) or None                           the one-step student's second time (eq. 12-17)

Per block, in order (paper Fig. 2; the official release): adaLN-modulated, gated self-attention with
2-D RoPE -> cross-attention to the projected semantic tokens (no norm, no gate) -> adaLN-modulated,
gated SwiGLU MLP. Time conditioning is "adaLN-single" (PixArt-alpha): one shared Linear(d -> 6d)
plus a learnable (6, d) table per block.

Module and parameter names equal the released checkpoints' state-dict keys
(release_keys_0.5B.txt), so `load_release_checkpoint` (below) needs no key map and `save_checkpoint`
writes files in the release layout: ours and theirs are interchangeable.

Initialisation (DiT / PixArt): xavier-uniform linears with zero bias; the patch embed as a
linear; timestep MLPs N(0, 0.02); adaLN outputs (t_block, final adaLN) and the final linear zero,
so the model outputs exactly zero at init. The per-block scale_shift_table starts as
randn(6, d) / sqrt(d) (PixArt's choice): the gates are then non-zero, so every block already
receives gradient on the first step while the output is still zero.
"""
import math
import os
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vosr.files import save_safetensors
from vosr.loading import RELEASE_ARCH_FLAGS


@dataclass
class DiTConfig:
    dim: int = 384               # hidden size d
    depth: int = 8               # number of blocks
    num_heads: int = 6           # head_dim = dim / num_heads (64 in the paper's models)
    latent_channels: int = 4     # C; the model sees 2C input channels (c_str, z_t); SD VAE = 4
    enc_dim: int = 768           # width of the semantic tokens c_sem (DINOv2-B = 768)
    patch_size: int = 2
    train_grid: int = 32  # token-grid side at training size (512^2 / 8 / 2 = 32): RoPE reference
    mlp_ratio: float = 4.0       # SwiGLU hidden = int(2/3 * mlp_ratio * d)
    sem_hidden: int = 0          # hidden width of the semantic projection; 0: 3d (the 0.5B release)
    with_r: bool = False         # add the student's r_embedder (distillation)
    grad_ckpt: bool = False      # gradient checkpointing per block (training only)
    rope_theta: float = 10000.0
    preset: str = "custom"


PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, num_heads=2),  # unit tests, < 1 M params
    "small": dict(
        dim=256, depth=6, num_heads=4
    ),  # CPU demos, ~ 8 M params (fp16 demo model < 20 MB)
    "0.5B": dict(dim=1024, depth=28, num_heads=16),  # paper, 0.486 B params
    "1.4B": dict(dim=1536, depth=36, num_heads=24),  # paper, 1.39 B params
}
# Every preset defaults to the SD VAE (4 channels) and DINOv2-B (768); builders override them.
# The paper's 1.4B model runs a 16-channel VAE and DINOv2-L: build("1.4B", latent_channels=16,
# enc_dim=1024) has 1.3939 B parameters (teacher), the paper's figure.


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in fp32, cast back, times a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight


def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (128 frequencies, [cos, sin]) -> Linear -> SiLU ->
    Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]  # (B, 128); t NOT scaled by 1000
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # cos first, as the release
        return self.mlp(emb.to(self.mlp[0].weight.dtype))             # (B, d)


def rope_tables(grid_h: int, grid_w: int, head_dim: int, train_grid: int, theta: float = 10000.0,
                device=None):
    """2-D RoPE tables (grid_h*grid_w, head_dim) in fp32, rows of tokens in row-major order.

    First half of each head's channels encodes the row, second half the column; within a half,
    head_dim/4 frequencies f_k = theta^(-2k/(head_dim/2)), each repeated for an adjacent channel
    pair. Positions are rescaled to the training grid: pos = index * G_train / G, separately per
    axis for non-square grids, so at the training size pos is the integer index and a larger
    grid interpolates the same position range (the official release's convention).
    """
    half = head_dim // 2
    # (hd/4,)
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half)
    pos_h = torch.arange(grid_h, device=device, dtype=torch.float32) / grid_h * train_grid
    pos_w = torch.arange(grid_w, device=device, dtype=torch.float32) / grid_w * train_grid
    # (gh, hd/2): pairs share an angle
    ang_h = (pos_h[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
    ang_w = (pos_w[:, None] * freqs[None]).repeat_interleave(2, dim=-1)   # (gw, hd/2)
    ang = torch.cat([ang_h[:, None, :].expand(grid_h, grid_w, half),
                     ang_w[None, :, :].expand(grid_h, grid_w, half)], dim=-1)  # (gh, gw, hd)
    ang = ang.reshape(grid_h * grid_w, head_dim)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs: (x2k cos - x2k+1 sin, x2k+1 cos + x2k sin); x (B, H, N, hd), in fp32.
    """
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


class VisionRotaryEmbedding(nn.Module):
    """Holds the training-grid RoPE tables as buffers `freqs_cos/sin` (they are in the release
    files)."""

    def __init__(self, head_dim: int, train_grid: int, theta: float):
        super().__init__()
        assert head_dim % 4 == 0, "2-D RoPE needs head_dim divisible by 4"
        self.head_dim, self.train_grid, self.theta = head_dim, train_grid, theta
        cos, sin = rope_tables(train_grid, train_grid, head_dim, train_grid, theta)
        # Persistent, so the state dict matches the release and loads strictly. The forward pass
        # does not read them (a model cast to bf16 would round them): it uses fp32 tables from
        # `tables`, which equal these at the training grid; the loader checks that they agree.
        self.register_buffer("freqs_cos", cos, persistent=True)
        self.register_buffer("freqs_sin", sin, persistent=True)
        self._cache = {}  # (grid_h, grid_w, device) -> (cos, sin); eager mode only

    def tables(self, grid_h: int, grid_w: int, device):
        """fp32 (cos, sin) of shape (grid_h*grid_w, head_dim) for the current grid."""
        # traced: computed inside the graph (constant-folded), no dict
        if torch.compiler.is_compiling():
            return rope_tables(grid_h, grid_w, self.head_dim, self.train_grid, self.theta, device)
        key = (grid_h, grid_w, str(device))
        if key not in self._cache:
            self._cache[key] = rope_tables(
                grid_h, grid_w, self.head_dim, self.train_grid, self.theta, device
            )
        return self._cache[key]


class Attention(nn.Module):
    """Self-attention: qkv -> per-head RMSNorm on q, k -> 2-D RoPE -> SDPA -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                       # (B, H, N, hd)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        v = v.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v)                   # default scale 1/sqrt(hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Cross-attention: q from the hidden states, k/v from the semantic tokens; per-head RMSNorm on
    q, k."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        self.v_linear = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv):
        B, N, D = x.shape
        M = kv.shape[1]
        # (B, H, N, hd)
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        # (B, H, M, hd)
        k = self.k_linear(kv).reshape(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_linear(kv).reshape(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        v = v.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """w12 (d -> 2h) -> halves a, b -> silu(a) * b -> w3 (h -> d); h = int(2/3 * 4d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class SemanticMlp(nn.Module):
    """Linear(enc_dim -> h) -> GELU(tanh) -> Linear(h -> d), h = 3d by default: c_sem to the
    keys/values width."""

    def __init__(self, enc_dim: int, dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 3 * dim
        self.fc1 = nn.Linear(enc_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention (gated, adaLN) -> cross-attention to c_sem (residual) -> SwiGLU (gated,
    adaLN)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)  # PixArt init
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))

    def forward(self, x, c0, kv, cos, sin):
        B = x.shape[0]
        # adaLN-single: shared c0 (B, 6d) + this block's table (6, d) -> six (B, 1, d) vectors
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + c0.reshape(B, 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + self.cross_attn(x, kv)                                # no norm, no gate
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (from c, not c0) -> RMSNorm -> modulate -> Linear(d -> p*p*C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)   # (B, 1, d) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Conv2d(2C -> d, kernel p, stride p) -> row-major tokens (B, h/p * w/p, d)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- the model

class VOSRDiT(nn.Module):
    """The VOSR denoiser v(concat[c_str, z_t], t, c_sem[, r]) of Fig. 2."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 4:
            raise ValueError(
                f"dim {cfg.dim} / heads {cfg.num_heads} must give a head_dim divisible by 4"
            )
        self.cfg = cfg
        self.preset, self.dim, self.depth, self.num_heads = (cfg.preset, cfg.dim, cfg.depth,
                                                             cfg.num_heads)
        self.latent_channels, self.enc_dim = cfg.latent_channels, cfg.enc_dim
        self.patch_size, self.train_grid = cfg.patch_size, cfg.train_grid
        self.with_r, self.grad_ckpt = cfg.with_r, cfg.grad_ckpt
        d, C, p = cfg.dim, cfg.latent_channels, cfg.patch_size

        self.x_embedder = PatchEmbed(2 * C, d, p)                      # input = [c_str, z_t]
        self.t_embedder = TimestepEmbedder(d)
        if cfg.with_r:
            self.r_embedder = TimestepEmbedder(d)  # student only
        # adaLN-single, shared by blocks
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.feat_rope = VisionRotaryEmbedding(d // cfg.num_heads, cfg.train_grid, cfg.rope_theta)
        self.layer_norm = nn.LayerNorm(cfg.enc_dim, eps=1e-5)          # semantic projection, part 1
        self.mlp_ca = SemanticMlp(cfg.enc_dim, d, cfg.sem_hidden)  # semantic projection, part 2
        self.blocks = nn.ModuleList(
            [DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(d, p, C)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT/PixArt init; the output is exactly zero until the zero-initialised layers move."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch embed initialised like a linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in [self.t_embedder] + ([self.r_embedder] if self.with_r else []):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for lin in (self.t_block[1], self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def project_semantics(self, c_sem, batch_size: int = 1):
        """c_sem (B, N, enc_dim) -> keys/values (B, N, d): LayerNorm -> Linear -> GELU(tanh) ->
        Linear.

        c_sem=None ("no semantics") is one zero token per sample: attention over N identical
        keys/values returns that value whatever N is, so this equals N zero tokens (tested).
        Compute once and pass as forward(..., c_sem_proj=...) to reuse across sampling steps.
        """
        dtype = self.layer_norm.weight.dtype
        if c_sem is None:
            c_sem = torch.zeros(
                batch_size, 1, self.enc_dim, device=self.layer_norm.weight.device, dtype=dtype
            )
        if c_sem.shape[-1] != self.enc_dim:
            raise ValueError(
                f"c_sem has width {c_sem.shape[-1]}, the model expects enc_dim={self.enc_dim}"
            )
        return self.mlp_ca(self.layer_norm(c_sem.to(dtype)))

    def unpatchify(self, x, h: int, w: int):
        """(B, h*w, p*p*C) -> (B, h, w, p, p, C) -> (B, C, h*p, w*p)."""
        p, C = self.patch_size, self.latent_channels
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x, t, c_sem=None, r=None, c_sem_proj=None):
        """x = concat[c_str, z_t] (B, 2C, H, W), t (B,) -> velocity v (B, C, H, W)."""
        B, Cin, H, W = x.shape
        p = self.patch_size
        if Cin != 2 * self.latent_channels:
            raise ValueError(
                f"x has {Cin} channels, expected 2*latent_channels = {2 * self.latent_channels}"
            )
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}")
        if c_sem is not None and c_sem_proj is not None:
            raise ValueError("pass either c_sem or c_sem_proj, not both")
        h, w = H // p, W // p

        # time conditioning c; the student adds emb_r(r) * (t - r), which vanishes at r = t (eq.
        # 12-17)
        c = self.t_embedder(t)                                                    # (B, d)
        if self.with_r:
            r = t if r is None else r
            c = c + self.r_embedder(r) * (t - r).to(c.dtype)[:, None]
        elif r is not None and not torch.equal(r, t):
            raise ValueError("this model has no r_embedder (a teacher): r must be None or equal t")
        c0 = self.t_block(c)  # (B, 6d), shared

        # (B or 1, N, d)
        kv = self.project_semantics(c_sem, B) if c_sem_proj is None else c_sem_proj
        if kv.shape[0] != B:
            kv = kv.expand(B, -1, -1)
        cos, sin = self.feat_rope.tables(h, w, x.device)                          # (h*w, hd) fp32

        x = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype))              # (B, h*w, d)
        for block in self.blocks:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c0, kv, cos, sin, use_reentrant=False)
            else:
                x = block(x, c0, kv, cos, sin)
        x = self.final_layer(x, c)                                                # (B, h*w, p*p*C)
        return self.unpatchify(x, h, w)                                           # (B, C, H, W)


# ------------------------------------------------------------------------ building, counting, files

def preset_config(preset: str, **overrides) -> DiTConfig:
    """DiTConfig of a preset ('tiny', 'small', '0.5B', '1.4B'), with fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    unknown = set(overrides) - set(DiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown override(s) {sorted(unknown)}; valid: {list(DiTConfig.__dataclass_fields__)}"
        )
    return DiTConfig(**{**PRESETS[preset], "preset": preset, **overrides})


def build(preset: str, **overrides) -> VOSRDiT:
    """Model of a preset ('tiny', 'small', '0.5B', '1.4B'), with DiTConfig fields overridden."""
    return VOSRDiT(preset_config(preset, **overrides))


def from_checkpoint(cfg: DiTConfig, path: str) -> VOSRDiT:
    """The model of cfg with the weights of `path` (load_release_checkpoint), without paying for the
    random init that the file overwrites (seconds for the 1.4B model). The only weights the file may
    lack, a student's r_embedder, get their usual init."""
    with torch.device("meta"):
        model = VOSRDiT(cfg)
    model = model.to_empty(device="cpu")  # uninitialised storage, filled below
    cos, sin = rope_tables(
        cfg.train_grid, cfg.train_grid, cfg.dim // cfg.num_heads, cfg.train_grid, cfg.rope_theta
    )
    with torch.no_grad():
        model.feat_rope.freqs_cos.copy_(cos)                 # ours, checked against the file's
        model.feat_rope.freqs_sin.copy_(sin)
        if cfg.with_r:
            for lin in (model.r_embedder.mlp[0], model.r_embedder.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
    load_release_checkpoint(model, path)
    return model


def compile_blocks(model: VOSRDiT, **compile_kwargs) -> VOSRDiT:
    """torch.compile each DiT block in place ("regional" compilation); returns the model.

    The blocks are identical, so they share one compiled graph: compiling takes seconds where the
    whole
    0.5B model takes minutes, and it still fuses the fp32 norm / RoPE / adaLN element-wise work that
    dominates an eager training step (README, Performance)."""
    for block in model.blocks:
        block.compile(**compile_kwargs)
    return model


def param_count(preset: str, **overrides) -> int:
    """Number of parameters (buffers excluded), counted on the meta device: no memory needed."""
    with torch.device("meta"):
        model = build(preset, **overrides)
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: VOSRDiT, path: str, metadata: dict | None = None):
    """Write the state dict (release layout) as safetensors, atomically; config goes in the
    metadata."""
    meta = {k: str(v) for k, v in asdict(model.cfg).items()}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), path, meta)


# ------------------------------------------------------------------- the official release's weights

def release_config(
    args: dict, latent_channels: int, enc_dim: int, with_r: bool, sem_hidden: int = 0
) -> DiTConfig:
    """The DiTConfig of a released model from its args.json (the official release's training
    arguments).

    dim/depth/num_heads/patch_size/mlp_ratio give the shape; the RoPE reference grid is the training
    crop `resolution` / 8 (VAE factor) / patch_size (32 for the released 512² models). Raises
    ValueError naming the key when args.json asks for an architecture variant this module does not
    implement."""
    for key in ("dim", "depth", "num_heads"):
        if not isinstance(args.get(key), int):
            raise ValueError(
                f"args.json: '{key}' missing or not an integer (got {args.get(key)!r})"
            )
    for key, ours in RELEASE_ARCH_FLAGS.items():
        if key in args and bool(args[key]) != ours:
            raise ValueError(
                f"args.json: {key}={args[key]!r} is not supported (this DiT implements "
                f"{key}={ours})"
            )
    patch = int(args.get("patch_size", 2))
    shape = dict(dim=args["dim"], depth=args["depth"], num_heads=args["num_heads"])
    preset = next((name for name, p in PRESETS.items() if p == shape), "custom")
    return DiTConfig(**shape, latent_channels=latent_channels, enc_dim=enc_dim, patch_size=patch,
                     train_grid=int(args.get("resolution", 512)) // 8 // patch,
                     mlp_ratio=float(args.get("mlp_ratio", 4.0)), with_r=with_r,
                     sem_hidden=sem_hidden, preset=preset)


# the layers whose shape follows the semantic width enc_dim
SEMANTIC_INPUT = ("layer_norm.", "mlp_ca.fc1.")


def load_release_checkpoint(model: VOSRDiT, path: str, own_rope: bool = False,
                            new_semantic: bool = False) -> list[str]:
    """Load a released VOSR (or our own) .safetensors strictly; returns the missing keys.

    Only r_embedder.* may be missing (a teacher loaded into a student: it stays at its init, and
    contributes nothing at r = t). Any other missing key, any unexpected key, or a shape mismatch
    raises an error naming the key, both shapes and the file. The file's RoPE tables are checked
    against ours, which verifies the position convention of the release's 2-D RoPE; own_rope=True
    keeps the model's tables instead (training on from weights of another crop size: stage 2 from
    stage 1). new_semantic=True (ours: a fine-tune onto another semantic encoder) keeps the model's
    SEMANTIC_INPUT layers at their init when the file's enc_dim differs; everything else still loads
    strictly.
    """
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state, own = load_file(path, device="cpu"), model.state_dict()
    if own_rope:
        state |= {k: v for k, v in own.items() if k.startswith("feat_rope.")}
    width = state.get("layer_norm.weight", own["layer_norm.weight"]).shape
    if new_semantic and width != own["layer_norm.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith(SEMANTIC_INPUT)}
    unexpected = [k for k in state if k not in own]
    if unexpected:
        student = unexpected[0].startswith("r_embedder.")
        hint = " (a student checkpoint: build the model with with_r=True)" if student else ""
        raise ValueError(
            f"{path}: unexpected key {unexpected[0]!r}{hint}; {len(unexpected)} unexpected in all"
        )
    for k, v in own.items():  # model order, so the first mismatch reported is the earliest layer
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: shape mismatch at {k!r}: checkpoint {tuple(state[k].shape)} vs model "
                f"{tuple(v.shape)} (check preset, latent_channels, enc_dim, train_grid)"
            )
    missing = [k for k in own if k not in state]
    fresh = ("r_embedder.",) + (SEMANTIC_INPUT if new_semantic else ())
    bad = [k for k in missing if not k.startswith(fresh)]
    if bad:
        raise ValueError(f"{path}: missing key {bad[0]!r}; {len(bad)} missing in all")
    for name in ("freqs_cos", "freqs_sin"):
        ours = getattr(model.feat_rope, name).float().cpu()
        theirs = state[f"feat_rope.{name}"].float()
        tol = 1e-4 if state[f"feat_rope.{name}"].dtype == torch.float32 else 1e-2
        err = (ours - theirs).abs().max().item()
        if err > tol:
            raise ValueError(f"{path}: feat_rope.{name} differs from our RoPE tables by {err:.3g} "
                             f"(different position convention or train_grid)")
    model.load_state_dict(state, strict=False)  # strictness checked above; dtypes are cast on copy
    if missing:
        print(f"load_release_checkpoint: {path} has no {', '.join(missing)}: kept at init")
    return missing
