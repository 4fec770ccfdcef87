"""Tests for dit.py: shapes, init, r-embedder, RoPE, attention, semantics, checkpoints, compile, grad ckpt.

The central check is `reference_forward`: an independent, plain-torch re-implementation of
the official release's block (paper Fig. 2) that reads the weights by their release key names, with naive attention and a
per-position RoPE loop. The model must agree with it.
"""
import math
import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

import dit  # noqa: E402

torch.set_num_threads(2)


def randomize(model, seed=0, scale=0.2):
    """Give every parameter random values (the zero-initialised layers would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name else 0.0))
    return model


def inputs(B=2, C=4, H=8, W=8, N=5, enc=768, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2 * C, H, W, generator=g)
    t = torch.rand(B, generator=g)
    c_sem = torch.randn(B, N, enc, generator=g)
    return x, t, c_sem


# ----------------------------------------------------------------------------- independent reference

def naive_rope_table(gh, gw, hd, g_train, theta=10000.0):
    """Per token, per channel pair, the rotation angle, by explicit Python loops (the release's 2-D RoPE)."""
    half = hd // 2
    ang = torch.zeros(gh * gw, hd, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            n = i * gw + j  # row-major token order
            for k in range(hd // 4):
                f = theta ** (-2 * k / half)
                ang[n, 2 * k] = ang[n, 2 * k + 1] = (i * g_train / gh) * f                  # row half
                ang[n, half + 2 * k] = ang[n, half + 2 * k + 1] = (j * g_train / gw) * f    # column half
    return ang


def naive_rope_apply(x, ang):
    """Rotate each adjacent pair (x2k, x2k+1) by its angle with a loop over pairs."""
    out = torch.empty_like(x)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    for c in range(0, x.shape[-1], 2):
        a, b = x[..., c], x[..., c + 1]
        out[..., c] = a * cos[:, c] - b * sin[:, c]
        out[..., c + 1] = b * cos[:, c] + a * sin[:, c]
    return out


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def naive_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def t_embed(sd, prefix, t):
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    a = t.double()[:, None] * f
    e = torch.cat([a.cos(), a.sin()], -1).float()
    return lin(sd, prefix + ".mlp.2", F.silu(lin(sd, prefix + ".mlp.0", e)))


def reference_forward(model, x, t, c_sem, r=None):
    """The release's forward pass (paper Fig. 2) from the state dict by key names; naive attention and RoPE loops."""
    sd = {k: v.detach().double().float() for k, v in model.state_dict().items()}
    d, H, p, C = model.dim, model.num_heads, model.patch_size, model.latent_channels
    hd = d // H
    B, _, Hh, Ww = x.shape
    gh, gw = Hh // p, Ww // p
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.permute(0, 2, 3, 1).reshape(B, gh * gw, d)
    c = t_embed(sd, "t_embedder", t)
    if r is not None:
        c = c + t_embed(sd, "r_embedder", r) * (t - r)[:, None]
    c0 = lin(sd, "t_block.1", F.silu(c))
    if c_sem is None:
        c_sem = torch.zeros(B, 7, model.enc_dim)  # "no semantics" = zero tokens (any count)
    kv = F.layer_norm(c_sem, (model.enc_dim,), sd["layer_norm.weight"], sd["layer_norm.bias"], 1e-5)
    kv = lin(sd, "mlp_ca.fc2", F.gelu(lin(sd, "mlp_ca.fc1", kv), approximate="tanh"))
    ang = naive_rope_table(gh, gw, hd, model.train_grid)
    heads = lambda z: z.reshape(B, z.shape[1], H, hd).transpose(1, 2)  # noqa: E731
    for i in range(model.depth):
        b = f"blocks.{i}."
        mod = sd[b + "scale_shift_table"][None] + c0.reshape(B, 6, d)
        sh1, sc1, g1, sh2, sc2, g2 = [mod[:, j][:, None] for j in range(6)]
        hid = rms(tok, sd[b + "norm1.weight"]) * (1 + sc1) + sh1
        q, k, v = lin(sd, b + "attn.qkv", hid).split(d, dim=-1)
        q = naive_rope_apply(rms(heads(q), sd[b + "attn.q_norm.weight"]), ang)
        k = naive_rope_apply(rms(heads(k), sd[b + "attn.k_norm.weight"]), ang)
        a = naive_attention(q, k, heads(v)).transpose(1, 2).reshape(B, -1, d)
        tok = tok + g1 * lin(sd, b + "attn.proj", a)
        q = rms(heads(lin(sd, b + "cross_attn.q_linear", tok)), sd[b + "cross_attn.q_norm.weight"])
        k = rms(heads(lin(sd, b + "cross_attn.k_linear", kv)), sd[b + "cross_attn.k_norm.weight"])
        v = heads(lin(sd, b + "cross_attn.v_linear", kv))
        tok = tok + lin(sd, b + "cross_attn.proj", naive_attention(q, k, v).transpose(1, 2).reshape(B, -1, d))
        hid = rms(tok, sd[b + "norm2.weight"]) * (1 + sc2) + sh2
        ab = lin(sd, b + "mlp.w12", hid)
        hdim = ab.shape[-1] // 2
        tok = tok + g2 * lin(sd, b + "mlp.w3", F.silu(ab[..., :hdim]) * ab[..., hdim:])
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c))[:, None].split(d, dim=-1)
    out = lin(sd, "final_layer.linear", rms(tok, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift)
    out = out.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return out.reshape(B, C, gh * p, gw * p)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("H,W", [(8, 8), (8, 12)])
def test_shape_and_reference_forward(H, W):
    torch.manual_seed(0)
    model = randomize(dit.build("tiny", train_grid=4)).eval()
    x, t, c_sem = inputs(H=H, W=W)
    with torch.no_grad():
        v = model(x, t, c_sem)
        v_none = model(x, t, None)
    assert v.shape == (2, 4, H, W)
    torch.testing.assert_close(v, reference_forward(model, x, t, c_sem), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_none, reference_forward(model, x, t, None), rtol=1e-4, atol=1e-4)


def test_tiny_is_tiny_and_zero_init_output():
    assert dit.param_count("tiny") < 1_000_000
    torch.manual_seed(0)
    model = dit.build("tiny", latent_channels=3, enc_dim=32)
    x, t, c_sem = inputs(C=3, enc=32)
    with torch.no_grad():
        v = model(x, t, c_sem)
    assert v.shape == (2, 3, 8, 8) and torch.count_nonzero(v) == 0
    assert model.final_layer.linear.weight.abs().sum() == 0


def test_r_equals_t_is_the_teacher():
    torch.manual_seed(0)
    student = randomize(dit.build("tiny", with_r=True, enc_dim=16), seed=3).eval()
    teacher = dit.build("tiny", enc_dim=16).eval()
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("r_embedder.")})
    x, t, c_sem = inputs(enc=16)
    with torch.no_grad():
        v_teacher = teacher(x, t, c_sem)
        assert torch.equal(student(x, t, c_sem), v_teacher)          # r = None means r = t
        assert torch.equal(student(x, t, c_sem, r=t.clone()), v_teacher)
        r = t * 0.5
        v_r = student(x, t, c_sem, r=r)
        assert (v_r - v_teacher).abs().max() > 1e-3
        torch.testing.assert_close(v_r, reference_forward(student, x, t, c_sem, r), rtol=1e-4, atol=1e-4)
        r_mixed = t.flip(0)                                          # one sample with r < t, one with r > t
        assert (t - r_mixed).prod() < 0
        torch.testing.assert_close(student(x, t, c_sem, r=r_mixed), reference_forward(student, x, t, c_sem, r_mixed),
                                   rtol=1e-4, atol=1e-4)
        student.r_embedder.mlp[2].bias.add_(1.0)                     # perturb r_embedder only
        assert torch.equal(student(x, t, c_sem, r=t), v_teacher)
        assert not torch.allclose(student(x, t, c_sem, r=r), v_r)
        assert torch.equal(teacher(x, t, c_sem, r=t), v_teacher)
        with pytest.raises(ValueError, match="r_embedder"):
            teacher(x, t, c_sem, r=r)


def test_rope_against_naive_loop():
    g = torch.Generator().manual_seed(0)
    for gh, gw, hd, g_train in [(3, 5, 8, 4), (4, 4, 16, 4), (6, 2, 8, 3)]:
        cos, sin = dit.rope_tables(gh, gw, hd, g_train)
        ang = naive_rope_table(gh, gw, hd, g_train)
        torch.testing.assert_close(cos, ang.cos().float(), rtol=0, atol=1e-5)
        x = torch.randn(2, 3, gh * gw, hd, generator=g)
        torch.testing.assert_close(dit.apply_rope(x, cos, sin), naive_rope_apply(x.double(), ang).float(),
                                   rtol=1e-5, atol=1e-5)
    # at the training grid the positions are integers and the tables equal the persistent buffers
    rope = dit.VisionRotaryEmbedding(64, 32, 10000.0)
    assert rope.freqs_cos.shape == (1024, 64)
    assert torch.equal(rope.tables(32, 32, "cpu")[0], rope.freqs_cos)
    torch.testing.assert_close(rope.freqs_sin[33, 32 + 2], torch.tensor(math.sin(1.0 * 10000 ** (-2 / 32))))


def test_attention_against_naive_softmax():
    torch.manual_seed(0)
    d, H, N, M = 32, 4, 6, 5
    attn, xattn = randomize(dit.Attention(d, H), 1), randomize(dit.CrossAttention(d, H), 2)
    x, kv = torch.randn(2, N, d), torch.randn(2, M, d)
    cos, sin = dit.rope_tables(2, 3, d // H, 2)
    heads = lambda z: z.reshape(2, z.shape[1], H, d // H).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, -1)
        q = dit.apply_rope(rms(heads(q), attn.q_norm.weight), cos, sin)
        k = dit.apply_rope(rms(heads(k), attn.k_norm.weight), cos, sin)
        ref = attn.proj(naive_attention(q, k, heads(v)).transpose(1, 2).reshape(2, N, d))
        torch.testing.assert_close(attn(x, cos, sin), ref, rtol=1e-5, atol=1e-5)
        q = rms(heads(xattn.q_linear(x)), xattn.q_norm.weight)
        k = rms(heads(xattn.k_linear(kv)), xattn.k_norm.weight)
        ref = xattn.proj(naive_attention(q, k, heads(xattn.v_linear(kv))).transpose(1, 2).reshape(2, N, d))
        torch.testing.assert_close(xattn(x, kv), ref, rtol=1e-5, atol=1e-5)


def test_no_semantics_and_projection_fast_path():
    torch.manual_seed(0)
    model = randomize(dit.build("tiny", enc_dim=16)).eval()
    x, t, c_sem = inputs(enc=16)
    with torch.no_grad():
        v_none = model(x, t, None)
        for n in (1, 3, 50):
            torch.testing.assert_close(model(x, t, torch.zeros(2, n, 16)), v_none, rtol=1e-4, atol=1e-5)
        kv = model.project_semantics(c_sem)
        assert kv.shape == (2, 5, model.dim)
        assert torch.equal(model(x, t, c_sem_proj=kv), model(x, t, c_sem))
        assert torch.equal(model(x, t, c_sem_proj=model.project_semantics(None, batch_size=2)), v_none)
        torch.testing.assert_close(model(x, t, c_sem_proj=model.project_semantics(None)), v_none)  # batch-1 kv
        assert not torch.allclose(model(x, t, c_sem), v_none)
        with pytest.raises(ValueError, match="enc_dim"):
            model(x, t, torch.zeros(2, 3, 17))


# names and shapes of the released 0.5B student (release_keys_0.5B.txt); blocks.0 repeats for 1..27
RELEASE_0_5B = {
    "x_embedder.proj.weight": (1024, 8, 2, 2), "x_embedder.proj.bias": (1024,),
    "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.0.bias": (1024,),
    "t_embedder.mlp.2.weight": (1024, 1024), "t_embedder.mlp.2.bias": (1024,),
    "feat_rope.freqs_cos": (1024, 64), "feat_rope.freqs_sin": (1024, 64),
    "t_block.1.weight": (6144, 1024), "t_block.1.bias": (6144,),
    "final_layer.norm_final.weight": (1024,),
    "final_layer.linear.weight": (16, 1024), "final_layer.linear.bias": (16,),
    "final_layer.adaLN_modulation.1.weight": (2048, 1024), "final_layer.adaLN_modulation.1.bias": (2048,),
    "layer_norm.weight": (768,), "layer_norm.bias": (768,),
    "mlp_ca.fc1.weight": (3072, 768), "mlp_ca.fc1.bias": (3072,),
    "mlp_ca.fc2.weight": (1024, 3072), "mlp_ca.fc2.bias": (1024,),
    "r_embedder.mlp.0.weight": (1024, 256), "r_embedder.mlp.0.bias": (1024,),
    "r_embedder.mlp.2.weight": (1024, 1024), "r_embedder.mlp.2.bias": (1024,),
}
RELEASE_BLOCK = {
    "scale_shift_table": (6, 1024), "norm1.weight": (1024,), "norm2.weight": (1024,),
    "attn.qkv.weight": (3072, 1024), "attn.qkv.bias": (3072,),
    "attn.q_norm.weight": (64,), "attn.k_norm.weight": (64,),
    "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
    "mlp.w12.weight": (5460, 1024), "mlp.w12.bias": (5460,), "mlp.w3.weight": (1024, 2730), "mlp.w3.bias": (1024,),
    "cross_attn.q_linear.weight": (1024, 1024), "cross_attn.q_linear.bias": (1024,),
    "cross_attn.k_linear.weight": (1024, 1024), "cross_attn.k_linear.bias": (1024,),
    "cross_attn.v_linear.weight": (1024, 1024), "cross_attn.v_linear.bias": (1024,),
    "cross_attn.proj.weight": (1024, 1024), "cross_attn.proj.bias": (1024,),
    "cross_attn.q_norm.weight": (64,), "cross_attn.k_norm.weight": (64,),
}


def test_0_5B_has_release_names_and_shapes():
    expected = dict(RELEASE_0_5B)
    for i in range(28):
        expected.update({f"blocks.{i}.{k}": s for k, s in RELEASE_BLOCK.items()})
    with torch.device("meta"):
        model = dit.build("0.5B", with_r=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    n_params = sum(math.prod(s) for k, s in expected.items() if not k.startswith("feat_rope"))
    assert dit.param_count("0.5B", with_r=True) == n_params
    assert abs(dit.param_count("0.5B") / 0.486e9 - 1) < 0.01
    assert abs(dit.param_count("1.4B") / 1.394e9 - 1) < 0.01


def test_release_config_from_args_json():
    """The official release's args.json (training arguments) gives the same model as the 0.5B preset, with
    the RoPE grid from resolution / 8 / patch_size; an architecture variant we do not implement is named."""
    args = dict(dim=1024, depth=28, num_heads=16, patch_size=2, mlp_ratio=4.0, resolution=512, use_qknorm=True,
                use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
    expected = dict(RELEASE_0_5B)
    for i in range(28):
        expected.update({f"blocks.{i}.{k}": s for k, s in RELEASE_BLOCK.items()})
    conf = dit.release_config(args, latent_channels=4, enc_dim=768, with_r=True, sem_hidden=3072)
    assert (conf.preset, conf.train_grid) == ("0.5B", 32)
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in dit.VOSRDiT(conf).state_dict().items()}
    assert got == expected
    big_args = {**args, "dim": 1536, "depth": 36, "num_heads": 24, "resolution": 1024}
    big = dit.release_config(big_args, 16, 1024, False)
    assert (big.preset, big.train_grid, big.latent_channels, big.enc_dim) == ("1.4B", 64, 16, 1024)
    with pytest.raises(ValueError, match="use_swiglu"):
        dit.release_config({**args, "use_swiglu": False}, 4, 768, False)


def test_checkpoint_roundtrip_and_strict_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    student = randomize(dit.build("tiny", with_r=True, enc_dim=16, train_grid=8), seed=5).eval()
    path = str(tmp_path / "student.safetensors")
    dit.save_checkpoint(student, path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    fresh = dit.build("tiny", with_r=True, enc_dim=16, train_grid=8).eval()
    assert dit.load_release_checkpoint(fresh, path) == []
    x, t, c_sem = inputs(enc=16)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c_sem, r=t * 0.3), student(x, t, c_sem, r=t * 0.3))

    # a teacher file (no r_embedder.*) loads into a student; r_embedder stays at init
    teacher_path = str(tmp_path / "teacher.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("r_embedder.")}, teacher_path)
    fresh2 = dit.build("tiny", with_r=True, enc_dim=16, train_grid=8)
    r_init = fresh2.r_embedder.mlp[0].weight.clone()
    missing = dit.load_release_checkpoint(fresh2, teacher_path)
    assert sorted(missing) == sorted(k for k in student.state_dict() if k.startswith("r_embedder."))
    assert torch.equal(fresh2.r_embedder.mlp[0].weight, r_init)
    assert torch.equal(fresh2.t_block[1].weight, student.t_block[1].weight)

    # a student file into a teacher model: unexpected keys
    with pytest.raises(ValueError, match=r"unexpected key .r_embedder\.mlp.*with_r=True"):
        dit.load_release_checkpoint(dit.build("tiny", enc_dim=16, train_grid=8), path)
    # wrong shape: error names the file, the key and both shapes
    with pytest.raises(ValueError) as e:
        other = dit.build("tiny", with_r=True, enc_dim=16, train_grid=8, latent_channels=3)
        dit.load_release_checkpoint(other, path)
    assert "student.safetensors" in str(e.value) and "x_embedder.proj.weight" in str(e.value)
    assert "(64, 8, 2, 2)" in str(e.value) and "(64, 6, 2, 2)" in str(e.value)
    # extra key
    extra = str(tmp_path / "extra.safetensors")
    save_file({**load_file(path), "pos_embed": torch.zeros(3)}, extra)
    with pytest.raises(ValueError, match="extra.safetensors.*pos_embed"):
        dit.load_release_checkpoint(fresh, extra)
    # missing non-r key
    holed = str(tmp_path / "holed.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k != "blocks.1.norm2.weight"}, holed)
    with pytest.raises(ValueError, match="blocks.1.norm2.weight"):
        dit.load_release_checkpoint(fresh, holed)
    # RoPE tables of a different position convention (e.g. no rescaling) are caught
    sd = load_file(path)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = dit.rope_tables(8, 8, 32, 16)
    bad_rope = str(tmp_path / "rope.safetensors")
    save_file(sd, bad_rope)
    with pytest.raises(ValueError, match="feat_rope.freqs_cos"):
        dit.load_release_checkpoint(fresh, bad_rope)


def test_init_onto_another_semantic_encoder_keeps_only_its_input_layers_fresh(tmp_path):
    """new_semantic=True (train_teacher.py --init from a teacher of another c_sem width): every weight but the
    semantic projection's LayerNorm and first Linear comes from the file; those stay at the model's init.
    Without it the width mismatch is an error; with it a file of the same width still loads whole."""
    torch.manual_seed(0)
    src = randomize(dit.build("tiny", enc_dim=16, train_grid=8), seed=3)
    path = str(tmp_path / "teacher.safetensors")
    dit.save_checkpoint(src, path)
    model = dit.build("tiny", enc_dim=24, train_grid=8)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer_norm.weight"):
        dit.load_release_checkpoint(model, path)
    missing = dit.load_release_checkpoint(model, path, new_semantic=True)
    fresh = {"layer_norm.weight", "layer_norm.bias", "mlp_ca.fc1.weight", "mlp_ca.fc1.bias"}
    assert set(missing) == fresh
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k] if k in fresh else src.state_dict()[k].to(v.dtype)), k
    same = dit.build("tiny", enc_dim=16, train_grid=8)
    assert dit.load_release_checkpoint(same, path, new_semantic=True) == []
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())


def test_from_checkpoint_skips_the_random_init(tmp_path):
    """dit.from_checkpoint gives the same model as build + load_release_checkpoint (fp16 files are cast to
    fp32); a teacher file into a student leaves no uninitialised memory: r_embedder gets its usual init."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    student = randomize(dit.build("tiny", with_r=True, enc_dim=16, train_grid=8), seed=5).eval()
    path = str(tmp_path / "student.safetensors")
    save_file({k: v.half() for k, v in student.state_dict().items()}, path)
    conf = dit.preset_config("tiny", with_r=True, enc_dim=16, train_grid=8)
    got, want = dit.from_checkpoint(conf, path), dit.build("tiny", with_r=True, enc_dim=16, train_grid=8)
    dit.load_release_checkpoint(want, path)
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), k
    teacher = str(tmp_path / "teacher.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("r_embedder.")}, teacher)
    got = dit.from_checkpoint(conf, teacher)
    w = got.r_embedder.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and got.r_embedder.mlp[0].bias.abs().sum() == 0
    assert all(torch.isfinite(v).all() for v in got.state_dict().values())
    sd = load_file(path)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = dit.rope_tables(8, 8, 32, 16)
    save_file(sd, str(tmp_path / "rope.safetensors"))
    with pytest.raises(ValueError, match="feat_rope.freqs_cos"):                 # still checked
        dit.from_checkpoint(conf, str(tmp_path / "rope.safetensors"))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m1 = randomize(dit.build("tiny", enc_dim=16, with_r=True), seed=7).train()
    m2 = dit.build("tiny", enc_dim=16, with_r=True, grad_ckpt=True).train()
    m2.load_state_dict(m1.state_dict())
    x, t, c_sem = inputs(enc=16)
    for m in (m1, m2):
        (m(x, t, c_sem, r=t * 0.5) ** 2).mean().backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert p1.grad is not None and p1.grad.abs().sum() > 0, n
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    model = randomize(dit.build("tiny", enc_dim=16), scale=0.1).eval()
    x, t, c_sem = inputs(enc=16)
    with torch.no_grad():
        ref = model(x, t, c_sem)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(x, t, c_sem)
    assert v.dtype == torch.bfloat16
    assert (v.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    os.environ.get("DIT_TEST_INDUCTOR") != "1", reason="inductor on CPU takes ~50 s here; set DIT_TEST_INDUCTOR=1"))])
def test_compile_matches_eager(backend):
    """Whole-model torch.compile without graph breaks; aot_eager by default (fast), inductor on request."""
    if backend == "inductor" and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: inductor cannot build CPU kernels here")
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = randomize(dit.build("tiny", enc_dim=16, with_r=True), scale=0.1).eval()
    x, t, c_sem = inputs(enc=16)
    with torch.no_grad():
        ref = model(x, t, c_sem, r=t * 0.5)
        explain = torch._dynamo.explain(model)(x, t, c_sem, r=t * 0.5)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
        t0 = time.time()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        out = compiled(x, t, c_sem, r=t * 0.5)
        print(f"{backend} compile+run of tiny: {time.time() - t0:.1f} s")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compile_blocks_matches_eager_and_keeps_keys():
    """Regional compilation: same outputs and gradients, and the state dict keeps its plain names."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = randomize(dit.build("tiny", enc_dim=16, with_r=True), scale=0.1)
    keys = list(model.state_dict())
    x, t, c_sem = inputs(enc=16)
    ref = model(x, t, c_sem, r=t * 0.5)
    ref_grad = torch.autograd.grad(ref.square().mean(), model.blocks[0].attn.qkv.weight)[0]
    dit.compile_blocks(model, backend="aot_eager")
    out = model(x, t, c_sem, r=t * 0.5)
    grad = torch.autograd.grad(out.square().mean(), model.blocks[0].attn.qkv.weight)[0]
    assert list(model.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
