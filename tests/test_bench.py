"""Fast paths of the sampler give the plain path's output, and `tools/bench_sample.py` reports stage times."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

import sample
import vae
from tests.test_sample import tiny_dit

from tools import bench_sample  # noqa: E402


@pytest.fixture(scope="module")
def semantic():
    return vae.load_semantic("random-s", image_size=28)  # ViT-S, 2×2 tokens per tile


def _run(pipe, lr, **kw):
    return pipe(lr, 4.0, generator=torch.Generator().manual_seed(0), **kw)


def _count_projections(model, monkeypatch):
    """Count the DiT's semantic projections (the work reuse_semantics saves)."""
    calls = []
    project = model.project_semantics
    monkeypatch.setattr(model, "project_semantics", lambda *a, **k: calls.append(1) or project(*a, **k))
    return calls


@pytest.mark.parametrize("student,guidance,tile", [(False, 0.5, None), (False, 1.0, None), (True, 0.5, None),
                                                   (False, 0.5, 24)])
def test_reuse_semantics_equals_plain(semantic, monkeypatch, student, guidance, tile):
    model = tiny_dit(192, enc_dim=384, with_r=student, patch_size=1)                # a 32² output is one tile
    lr = torch.rand(2, 3, 8, 8) if tile is None else torch.rand(2, 3, 10, 12)
    kw = dict(steps=3, guidance=guidance, tile=tile, tile_overlap=8)
    calls = _count_projections(model, monkeypatch)
    pipes = [sample.VOSRPipeline(model, vae.PixelCodec(), semantic, student, fast=sample.FastPaths(reuse))
             for reuse in (False, True)]
    for pipe in pipes:
        pipe.tile_batch = 1                               # one DiT call per window: counted below
    plain = _run(pipes[0], lr, **kw)
    n_plain, calls[:] = len(calls), []
    fast = _run(pipes[1], lr, **kw)
    tiles = 1 if tile is None else len(sample.tile_windows(5, 3, 1, 1)) * len(sample.tile_windows(6, 3, 1, 1))
    assert tiles in (1, 6)                                # 40×48 output, 24-pixel tiles: latent 5×6, tiles 3
    assert n_plain == 3 * tiles and len(calls) == tiles   # once per tile instead of once per step and tile
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert plain.std() > 0.05                             # the velocity is not zero: a real comparison


def test_reuse_semantics_bf16_and_no_semantics(semantic):
    model, lr = tiny_dit(192, enc_dim=384, patch_size=1), torch.rand(1, 3, 8, 8)
    for sem, bf16 in [(semantic, True), (None, False)]:
        plain = _run(sample.VOSRPipeline(model, vae.PixelCodec(), sem, bf16=bf16), lr, steps=2)
        fast = _run(sample.VOSRPipeline(model, vae.PixelCodec(), sem, bf16=bf16,
                                        fast=sample.FastPaths(reuse_semantics=True)), lr, steps=2)
        # bf16: the same bf16 projection either way (under the same autocast), so the same bits
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def _conv_codec():
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                       norm_num_groups=32)
    return vae.DiffusersCodec(kl, "tiny")                 # factor 2, 4 channels


def test_channels_last_equals_plain():
    model, lr = tiny_dit(4), torch.rand(1, 3, 8, 8)
    plain = _run(sample.VOSRPipeline(model, _conv_codec()), lr, steps=2)
    codec = _conv_codec()
    pipe = sample.VOSRPipeline(model, codec, fast=sample.FastPaths(channels_last=True))
    conv = codec.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(_run(pipe, lr, steps=2), plain, atol=1e-5, rtol=0)


def test_compile_equals_plain(semantic):
    # The "aot_eager" backend traces and functionalises the graphs as inductor does, without generating C++
    # (seconds instead of a minute on a CPU); the mode (max-autotune, …) only matters to inductor.
    model, lr = tiny_dit(4, enc_dim=384), torch.rand(1, 3, 8, 8)
    plain = _run(sample.VOSRPipeline(model, _conv_codec(), semantic), lr, steps=2)
    torch._dynamo.reset()
    pipe = sample.VOSRPipeline(model, _conv_codec(), semantic,
                               fast=sample.FastPaths(True, True, compile="default", compile_backend="aot_eager"))
    assert pipe.net is not pipe.model and pipe.decode is not pipe.codec.decode   # both wrapped
    torch.testing.assert_close(_run(pipe, lr, steps=2), plain, atol=1e-5, rtol=0)


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        sample.VOSRPipeline(tiny_dit(192, enc_dim=384), vae.PixelCodec(), device="cpu", fast=sample.FastPaths(cuda_graphs=True))


def test_cli_flags_select_fast_paths():
    cfg = sample.parse_args(["-i", "x", "--fast", "--compile"])
    assert sample.FastPaths.from_config(cfg) == sample.FastPaths(True, True, compile="default")
    cfg = sample.parse_args(["-i", "x", "--compile", "max-autotune"])
    assert sample.FastPaths.from_config(cfg) == sample.FastPaths(compile="max-autotune")
    assert sample.FastPaths.from_config(sample.parse_args(["-i", "x"])) == sample.FastPaths()


def test_bench_writes_stage_times(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench_sample.main(["--preset", "tiny", "--size", "32", "--semantic-size", "28",
                          "--steps", "1,2", "--batch", "1,2", "--device", "cpu", "--bench-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["path"], r["batch"], r["steps"], r["sampler"]) for r in rows] == [
        (p, b, s, "student" if s == 1 else "teacher") for p in ("plain", "fast") for b in (1, 2) for s in (1, 2)]
    for r in rows:
        stages = [r[f"{s}_ms"] for s in bench_sample.STAGES]
        assert min(stages) > 0
        assert sum(stages) <= r["total_ms"] <= 1.1 * sum(stages) + 2  # the stages are all of the call
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["total_ms"] * 1e3)
    table = capsys.readouterr().out
    assert "total ms" in table and "semantic ms" in table and len(table.splitlines()) >= 1 + 1 + len(rows)


def test_stage_timer_accumulates():
    timer = bench_sample.StageTimer("cpu")
    for _ in range(2):
        with timer("a"):
            sum(range(10000))
    assert timer.seconds["a"] > 0 and list(timer.seconds) == ["a"]


def test_bench_times_the_shipped_checkpoints(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert bench_sample.main(["--case", "checkpoints/vosr-small-photo 24x16 --tile 64", "--case",
                              "checkpoints/vosr-small-photo 24x16 --tile 0", "--repeats", "2", "--bench-json", str(out)]) == 0
    row, whole = json.loads(out.read_text())
    assert (whole["tile"], whole["tiles"]) == (100, 1)                    # --tile 0: one window
    assert (row["lr"], row["sr"], row["steps"], row["tile"]) == ("24×16", "96×64", 1, 64)
    # 96×64 px = 24×16 tokens of 4 px; 64-px tiles of 16 tokens, overlap 2 tokens: 2 × 1 windows
    assert row["tiles"] == len(sample.tile_windows(24, 16, 2, 1)) * len(sample.tile_windows(16, 16, 2, 1)) == 2
    assert len(row["sample_s"]) == 2 and min(row["sample_s"]) > 0
    printed = capsys.readouterr().out
    assert "python sample.py --ckpt checkpoints/vosr-small-photo -i LR.png -o SR.png --tile 64" in printed
