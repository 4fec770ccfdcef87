"""Teacher training: conditioning builders, the flow-matching loss, exact resume, DDP equivalence."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import train_teacher as tt
from vosr import files, runs

ROOT = Path(__file__).resolve().parents[1]
from tools import bench_train  # noqa: E402
from tools import export  # noqa: E402


def make_photos(folder: Path, n=6, size=(80, 96), seed=0):
    """Smooth random colour images (gradients + blobs) so crops and codecs see image-like data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    for i in range(n):
        img = np.zeros((*size, 3))
        for c in range(3):
            a, b, f = rng.uniform(-1, 1, 3)
            img[..., c] = 0.5 + 0.3 * np.sin(6 * f * xx + 3 * a) * np.cos(5 * b * yy)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_cached_crops_equal_uncached_and_decode_each_photo_once(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", n=3)
    (photos / "broken.png").write_bytes(b"not a png")
    plain = tt.HRCrops(str(photos), 32, seed=5)
    expected = [plain[i] for i in range(40)]
    assert len(plain.bad) == 1  # the broken file was drawn, so the cache meets it too
    reads = []
    read_image = tt.files.read_image
    monkeypatch.setattr(tt.files, "read_image", lambda f: reads.append(f) or read_image(f))
    cached = tt.HRCrops(str(photos), 32, seed=5, cache=True)
    for i in range(40):
        assert torch.equal(cached[i], expected[i])
    assert sorted(reads) == sorted(cached.files)  # each photo (and the broken file) decoded once
    assert cached.bad == plain.bad and len(cached.cache) == 3


def test_build_conditions_by_hand():
    B = 4
    c_str = torch.ones(B, 2, 2, 2)
    c_sem = torch.ones(B, 3, 5)
    aux = torch.tensor([False, True, False, True])
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    a_logit = torch.tensor([0.0, 1.0, 2.0, 3.0])
    n = torch.full((B, 2, 2, 2), 2.0)
    a = [1 / (1 + math.exp(-v)) for v in (0.0, 1.0, 2.0, 3.0)]
    full = [a[i] + 2 * math.sqrt(1 - a[i] ** 2) for i in range(B)]

    cs, se = tt.build_conditions(c_str, c_sem, "partial", aux, alpha, a_logit, n)
    want = [full[0], 0.2, full[2], 0.4]  # partial samples: α·c_str
    for i in range(B):
        assert torch.allclose(cs[i], torch.full((2, 2, 2), want[i]), atol=1e-6)
    assert se[[0, 2]].eq(1).all() and se[[1, 3]].eq(0).all()

    cs, se = tt.build_conditions(c_str, c_sem, "cfg", aux, alpha, a_logit, n)
    want = [full[0], 0.0, full[2], 0.0]  # standard CFG: the condition is dropped entirely
    for i in range(B):
        assert torch.allclose(cs[i], torch.full((2, 2, 2), want[i]), atol=1e-6)
    assert se[[1, 3]].eq(0).all()

    cs, se = tt.build_conditions(c_str, c_sem, "full", aux, alpha, a_logit, n)
    for i in range(B):
        assert torch.allclose(cs[i], torch.full((2, 2, 2), full[i]), atol=1e-6)
    assert se.eq(1).all()
    cs, se = tt.build_conditions(c_str, None, "partial", aux, alpha, a_logit, n)
    assert se is None


def test_flow_matching_loss_direct_formula():
    torch.manual_seed(0)
    z0, z1, c_str = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    t = torch.tensor([0.1, 0.5, 0.9])

    def model(x, t, c_sem):  # any fixed function of (c_str, z_t, t)
        return x[:, :4] * 0.5 - x[:, 4:] * t.view(-1, 1, 1, 1)

    loss = tt.flow_matching_loss(model, z0, c_str, None, t, z1)
    X0, E, C, T = (v.numpy().astype(np.float64) for v in (z0, z1, c_str, t))
    Z = (1 - T[:, None, None, None]) * X0 + T[:, None, None, None] * E
    pred = C * 0.5 - Z * T[:, None, None, None]
    assert loss.item() == pytest.approx(((pred - (E - X0)) ** 2).mean(), rel=1e-5)


def test_conditioning_draws_statistics():
    cfg = tt.TrainConfig(p_partial=0.1)
    aux, alpha, a_logit, n = tt.draw_conditioning_noise(cfg, torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert abs(aux.float().mean().item() - 0.1) < 0.01
    assert alpha.min() >= 0.05 and alpha.max() <= 0.25 and abs(alpha.mean().item() - 0.15) < 0.005
    assert abs(a_logit.mean().item() - 5.0) < 0.05 and abs(a_logit.std().item() - 1.0) < 0.05


def _cfg(tmp_path, photos, **kw):
    base = dict(data=str(photos), out=str(tmp_path / "run"), preset="tiny", codec="pixel", semantic="none",
                degradation="bicubic", size=32, batch=4, steps=4, lr=1e-3, ema=0.9, workers=0,
                log_every=1, val_every=1000, ckpt_every=2, device="cpu")
    return tt.TrainConfig(**(base | kw))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """4 steps in one go == 2 steps, then --resume to 4: the same model, EMA, optimiser moments and step,
    bit for bit (and so the same data, degradation, noise and κ draws: every RNG stream of a step)."""
    photos = make_photos(tmp_path / "photos")
    kw = dict(degradation="realesrgan", grad_accum=2)  # the degradation's and each micro-batch's streams too
    full = tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "a"), **kw))
    tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "b"), steps=2, **kw))
    resumed = tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "b"), steps=4, resume=True, **kw))
    assert sorted(resumed) == [2, 3] and all(resumed[s] == full[s] for s in (2, 3))
    a, b = (load_file(str(tmp_path / d / "ckpt.safetensors")) for d in "ab")
    assert a.keys() == b.keys()
    for prefix in ("model.", "ema.", "optim."):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys
        for k in keys:
            assert torch.equal(a[k], b[k]), k
    assert any(k.endswith("exp_avg") for k in a) and any(k.endswith("exp_avg_sq") for k in a)
    assert float(a["optim.0.step"]) == float(b["optim.0.step"]) == 4
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "ckpt.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "ckpt.safetensors"), "pt") as fb:
        assert fa.metadata()["step"] == fb.metadata()["step"] == "4"
    ea, eb = (load_file(str(tmp_path / d / "ema.safetensors")) for d in "ab")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not torch.equal(a["ema.final_layer.linear.weight"], a["model.final_layer.linear.weight"])  # EMA lags
    assert full[0] != full[3]  # the model actually trains


def test_sigterm_mid_run_saves_the_step_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """A real train_teacher.py gets SIGTERM in the middle of its run: it saves the step it was in
    and exits 143 with one line naming the checkpoint; --resume then ends with the weights, EMA,
    optimiser and log of an uninterrupted run, bit for bit."""
    photos = make_photos(tmp_path / "photos", n=3, size=(40, 40))
    steps = 60
    args = ["--data", str(photos), "--preset", "tiny", "--codec", "pixel", "--semantic", "none",
            "--degradation", "bicubic", "--size", "32", "--batch", "2", "--workers", "0",
            "--device", "cpu", "--steps", str(steps), "--log-every", "1", "--ckpt-every", "1000"]
    run, script = tmp_path / "run", str(ROOT / "train_teacher.py")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, script, *args, "--out", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # mid-run: after its second step
        if f" step 2/{steps} " in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    lines = [line for line in err.splitlines() if ": warning: " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    saved = int(files.read_safetensors_header(run / "ckpt.safetensors")[1]["step"])
    assert 2 <= saved < steps  # stopped mid-run: --ckpt-every saves nothing before the last step
    assert lines[0] == (f"train_teacher.py: stopped by SIGTERM after step {saved}: saved "
                        f"{run / 'ckpt.safetensors'}; continue with --resume "
                        f"(python train_teacher.py --out {run} --resume)")
    assert not (run / runs.LOCK).exists()
    capsys.readouterr()
    # --resume, and the uninterrupted run, in this process on one thread as the CLI
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tt.main(["--out", str(run), "--resume"]) == 0
        assert f"resumed {run} at step {saved}" in capsys.readouterr().out
        tt.train(tt.parse_cli(args + ["--out", str(tmp_path / "ref")])[0])
    finally:
        torch.set_num_threads(threads)
    for name in ("ckpt.safetensors", "ema.safetensors"):
        a, b = (load_file(str(d / name)) for d in (tmp_path / "ref", run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ref, resumed = ([json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
                    for d in (tmp_path / "ref", run))
    assert [rec["step"] for rec in resumed] == list(range(1, steps + 1))
    assert [rec["loss"] for rec in ref] == [rec["loss"] for rec in resumed]


def test_resume_uses_the_learning_rate_given_now(tmp_path):
    """--resume with a new --lr trains at that lr, not the one saved in the optimiser state."""
    photos = make_photos(tmp_path / "photos")
    run = tmp_path / "run"
    tt.train(_cfg(tmp_path, photos, steps=2))
    before = load_file(str(run / "ckpt.safetensors"))
    tt.train(_cfg(tmp_path, photos, steps=3, resume=True, lr=0.0, weight_decay=0.0))
    after = load_file(str(run / "ckpt.safetensors"))
    weights = [k for k in before if k.startswith("model.")]
    assert all(torch.equal(before[k], after[k]) for k in weights)  # lr 0: nothing moved
    assert not torch.equal(before["optim.0.exp_avg"], after["optim.0.exp_avg"])  # but the step ran


def test_training_writes_run_dir_and_val_grid(tmp_path):
    photos = make_photos(tmp_path / "photos", n=4, size=(64, 64))
    run = tmp_path / "run"
    cfg = _cfg(tmp_path, photos, out=str(run), val_data=str(photos), val_every=2, steps=2, semantic="random",
               semantic_size=28, degradation="realesrgan", size=64, val_steps=2)
    tt.train(cfg)
    conf = json.loads((run / "config.json").read_text())
    assert conf["train_grid"] == 64 // 8 // 2 and conf["semantic"] == "semantic.safetensors"
    assert (run / "ema.safetensors").exists() and (run / "ckpt.safetensors").exists()
    grid = Image.open(run / "val_0000002.png")
    assert grid.size == (3 * 64, 4 * 64)  # LR | sample | HR, one row per validation image
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert "val_loss" in log[-1] and math.isfinite(log[-1]["val_loss"])
    assert 0 < log[-1]["val_psnr"] < 60  # PSNR in dB of [0, 1] images: positive (the value: a test below)



def poison_loss(monkeypatch, bad_calls, value):
    """Make the flow-matching loss non-finite (loss · value) on the given 1-based calls."""
    real, calls = tt.flow_matching_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * value if calls["n"] in bad_calls else loss

    monkeypatch.setattr(tt, "flow_matching_loss", poisoned)

def test_nonfinite_loss_stops_with_step(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", n=2)
    poison_loss(monkeypatch, bad_calls=(3,), value=float("nan"))
    with pytest.raises(SystemExit) as e:
        tt.train(_cfg(tmp_path, photos, steps=4, ckpt_every=1))
    assert e.value.code == 3
    # the checkpoint of the last good step (2) is still there and loadable
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "ckpt.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"


def test_parse_args_preset_and_overrides():
    cfg = tt.parse_args(["--preset", "small", "--data", "x", "--lr", "0.5", "--bf16"])
    assert cfg.preset == "small" and cfg.size == tt.PRESETS["small"]["size"] and cfg.lr == 0.5 and cfg.bf16
    cfg = tt.parse_args(["--preset", "0.5B-stage2"])
    assert cfg.preset == "0.5B" and cfg.size == 512 and cfg.batch == 256 and cfg.lr == 5e-5


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo ranks gives the same losses and, after the all-reduced gradients of 2 steps,
    the same weights as 1 process with the same global batch."""
    photos = make_photos(tmp_path / "photos")
    args = ["--data", str(photos), "--preset", "tiny", "--codec", "pixel", "--semantic", "none",
            "--degradation", "bicubic", "--size", "32", "--batch", "4", "--steps", "2", "--workers", "0",
            "--log-every", "1", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, str(ROOT / "train_teacher.py"), *args, "--out", str(tmp_path / "one")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(ROOT / "train_teacher.py"), *args, "--out", str(tmp_path / "two")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    one, two = ([json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert len(one) == 2 and two == pytest.approx(one, rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "ckpt.safetensors")) for d in ("one", "two"))
    keys = [k for k in a if k.startswith("model.") and a[k].is_floating_point()]
    # Adam's first steps are about lr·sign(gradient): where a gradient is ~0, the ranks' summation order
    # can flip the sign, so a few weights differ by ~lr; ranks that did not share gradients differ in most.
    differ = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in keys) / sum(a[k].numel() for k in keys)
    assert differ < 0.01, differ


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun with 2 gloo ranks; SIGTERM goes to rank 1 only: both stop after the same step (rank
    0 would otherwise wait in the next step's all-reduce), and rank 0 saves it and says so."""
    photos = make_photos(tmp_path / "photos", n=3, size=(40, 40))
    run, steps = tmp_path / "run", 200
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", str(ROOT / "train_teacher.py"), "--data", str(photos),
         "--out", str(run), "--preset", "tiny", "--codec", "pixel", "--semantic", "none",
         "--degradation", "bicubic", "--size", "32",
         "--batch", "4", "--steps", str(steps), "--workers", "0", "--log-every", "1",
         "--ckpt-every", "1000", "--device", "cpu"],
        cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if f" step 2/{steps} " in line:
            break
    rank1 = [pid for pid in children(proc.pid) if b"\0RANK=1\0" in b"\0" + environ(pid)]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    saved = int(files.read_safetensors_header(run / "ckpt.safetensors")[1]["step"])
    assert 2 <= saved < steps, err
    assert (f"train_teacher.py: stopped by SIGTERM after step {saved}: saved "
            f"{run / 'ckpt.safetensors'}; continue with --resume") in err
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, saved + 1))  # rank 0 went no further


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_dit_flops_formula_matches_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    import dit

    def naive_sdpa(q, k, v, **kw):  # the CPU SDPA kernel is invisible to the counter: use matmuls
        return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v

    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", naive_sdpa)
    model = dit.build("tiny", latent_channels=4, enc_dim=32, train_grid=8)
    x, c_sem = torch.randn(1, 8, 16, 16), torch.randn(1, 20, 32)
    with FlopCounterMode(display=False) as fc:
        model(x, torch.rand(1), c_sem)
    counted = fc.get_total_flops()
    assert bench_train.dit_flops(model, tokens=64, sem_tokens=20) == pytest.approx(counted, rel=0.03)


def test_init_starts_from_another_runs_ema(tmp_path):
    """--init: model and EMA start from the run's EMA weights (not its step, not its RoPE tables, which
    follow the new crop size); a model of another preset is refused."""
    photos = make_photos(tmp_path / "photos")
    tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "a"), steps=2))
    # lr = 0 and no weight decay: after one step the weights are exactly the ones --init loaded
    hist = tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "b"), steps=1, lr=0.0, weight_decay=0.0,
                         size=64, init=str(tmp_path / "a")))
    assert sorted(hist) == [0]  # step 0: a fresh run, not a resume
    a, b = load_file(str(tmp_path / "a" / "ckpt.safetensors")), load_file(str(tmp_path / "b" / "ckpt.safetensors"))
    weights = [k[4:] for k in a if k.startswith("ema.") and "feat_rope" not in k]
    assert any(not torch.equal(a["ema." + k], a["model." + k]) for k in weights)  # EMA ≠ raw weights in a
    for k in weights:
        assert torch.equal(b["model." + k], a["ema." + k]) and torch.equal(b["ema." + k], a["ema." + k]), k
    assert a["model.feat_rope.freqs_cos"].shape != b["model.feat_rope.freqs_cos"].shape  # its own grid
    with pytest.raises(files.UserError, match="does not fit"):
        tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "c"), steps=1, preset="small", init=str(tmp_path / "a")))


def test_init_from_an_fp16_export(tmp_path):
    """--init also takes an exported model folder (tools/export.py: fp16 EMA + config), the way a
    committed checkpoint carries a CPU run from one session to the next."""
    photos = make_photos(tmp_path / "photos")
    tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "a"), steps=2))
    exported = export.export_run(str(tmp_path / "a"), str(tmp_path / "export"))
    tt.train(_cfg(tmp_path, photos, out=str(tmp_path / "b"), steps=1, lr=0.0, weight_decay=0.0,
                  init=str(exported)))
    a, b = load_file(str(tmp_path / "a" / "ema.safetensors")), load_file(str(tmp_path / "b" / "ckpt.safetensors"))
    assert b["model.blocks.0.attn.qkv.weight"].dtype == torch.float32  # trained in fp32, not in fp16
    for k in (k for k in a if "feat_rope" not in k):  # RoPE tables are this run's own, not loaded
        assert torch.equal(b["model." + k], a[k].half().float()), k


def test_validation_psnr_against_an_independent_computation(tmp_path, monkeypatch):
    """validate() reports PSNR = 10·log10(1 / MSE) per image, averaged (higher is better), of the sampler's
    SR against the HR crops; the sampler is replaced by one that returns a known SR."""
    import vae
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 32, 32, generator=g) * 0.8 + 0.1
    sr = (hr + torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1) * torch.randn(hr.shape, generator=g)).clamp(0, 1)

    class KnownSR:
        def __init__(self, *a, **k):
            pass

        def __call__(self, lr, *a, **k):
            assert lr.shape == (3, 3, 8, 8)
            return sr.clone()

    monkeypatch.setattr(tt, "VOSRPipeline", KnownSR)
    cfg = _cfg(tmp_path, tmp_path, size=32)
    codec = vae.load_codec("pixel")
    ema = tt.dit.build("tiny", latent_channels=codec.channels, enc_dim=768, patch_size=1, train_grid=4)
    got = tt.validate(cfg, ema, codec, None, hr, 7, tmp_path, torch.device("cpu"))
    S, H = sr.double().numpy(), hr.double().numpy()
    want = np.mean([10 * math.log10(1.0 / ((S[i] - H[i]) ** 2).mean()) for i in range(3)])
    assert got["val_psnr"] == pytest.approx(want, abs=1e-4)
    assert 10 < got["val_psnr"] < 45  # three noise levels: about 40, 26 and 14 dB
    assert (tmp_path / "val_0000007.png").is_file()


def resized_back(lr, size):
    """Each of the release's resize-back modes on lr, clamped and rounded to 8 bits, written out here."""
    out = {}
    for m in ("area", "bilinear", "bicubic"):
        up = F.interpolate(lr, size=size, mode=m) if m == "area" else \
            F.interpolate(lr, size=size, mode=m, align_corners=False)
        out[m] = (up.clamp(0, 1) * 255).round() / 255
    return out


def modes_used(out, candidates):
    return [next(m for m, c in candidates.items() if torch.allclose(out[i], c[i], atol=1e-6)) for i in range(len(out))]


def test_release_resize_back_draws_a_mode_per_sample_on_8bit_levels():
    lr = (torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    out = tt.degrade._resize_back(lr, (32, 32), "release", torch.Generator().manual_seed(5))
    assert out.shape == (12, 3, 32, 32)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)  # on 8-bit levels
    used = modes_used(out, resized_back(lr, (32, 32)))
    drawn = torch.randint(3, (12,), generator=torch.Generator().manual_seed(5))  # one draw per sample
    assert used == [("area", "bilinear", "bicubic")[k] for k in drawn]
    assert len(set(used)) == 3  # per sample, not one mode for the batch
    again = tt.degrade._resize_back(lr, (32, 32), "release", torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="release"):
        tt.degrade._resize_back(lr, (32, 32), "nearest")
    # degrade(): the Real-ESRGAN LR, then the release's resize-back from the same generator
    hr = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    small = tt.degrade.degrade(hr, generator=torch.Generator().manual_seed(2))
    back = tt.degrade.degrade(hr, generator=torch.Generator().manual_seed(2), resize_back="release")
    assert all(m in ("area", "bilinear", "bicubic") for m in modes_used(back, resized_back(small, (32, 32))))


def test_make_condition_resize_back_option():
    """c_str is encoded from the bicubic, clamped LR↑ by default (as sample.py); with resize_back
    'release' from the release's random resize-back, on 8-bit levels."""
    class Identity:
        def encode(self, x):
            return x

    hr = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    lr = tt.degrade.degrade_bicubic(hr)
    cfg = tt.TrainConfig(degradation="bicubic")
    _, c_str, _, _ = tt.make_condition(hr, cfg, Identity(), None, torch.Generator().manual_seed(0))
    bicubic = F.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose((c_str + 1) / 2, bicubic, atol=1e-6)
    cfg = tt.TrainConfig(degradation="bicubic", resize_back="release")
    _, c_str, _, _ = tt.make_condition(hr, cfg, Identity(), None, torch.Generator().manual_seed(0))
    used = modes_used((c_str + 1) / 2, resized_back(lr, (32, 32)))
    assert len(set(used)) > 1
    assert tt.parse_args(["--resize-back", "release"]).resize_back == "release"
    assert tt.TrainConfig().resize_back == "bicubic"
