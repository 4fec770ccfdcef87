"""tools/blockiness.py: the block-edge gradient ratio, against a naive loop, on images with and without a grid."""
import torch
from PIL import Image

from tools import blockiness


def naive_ratio(y, period):
    edge, inside = [], []
    H, W = y.shape
    for i in range(H):
        for j in range(W - 1):
            (edge if j % period == period - 1 else inside).append(abs(float(y[i, j + 1] - y[i, j])))
    for i in range(H - 1):
        for j in range(W):
            (edge if i % period == period - 1 else inside).append(abs(float(y[i + 1, j] - y[i, j])))
    return (sum(edge) / len(edge)) / (sum(inside) / len(inside))


def test_edge_ratio_matches_a_naive_loop():
    y = torch.rand(13, 19, generator=torch.Generator().manual_seed(0)) * 255
    for period in (2, 4, 8):
        assert abs(blockiness.edge_ratio(y, period) - naive_ratio(y, period)) < 1e-4


def test_a_block_mosaic_scores_high_and_a_smooth_image_near_one():
    g = torch.Generator().manual_seed(1)
    smooth = torch.linspace(0, 1, 64)[None] * torch.linspace(0.5, 1, 64)[:, None] * 255 + torch.rand(64, 64, generator=g)
    mosaic = smooth + 20 * torch.rand(8, 8, generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert 0.9 < blockiness.edge_ratio(smooth, 8) < 1.1
    assert blockiness.edge_ratio(mosaic, 8) > 3
    assert blockiness.edge_ratio(mosaic, 8) > 2 * blockiness.edge_ratio(mosaic, 6)   # the grid is at period 8


def test_cli_goes_past_a_bad_file_and_names_a_missing_folder(tmp_path, capsys):
    Image.new("RGB", (16, 16), (90, 120, 30)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert blockiness.main([str(tmp_path), "--period", "8"]) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in err and out.strip().splitlines()[-1].endswith("1")
    assert blockiness.main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
