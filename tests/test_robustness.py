"""Robustness: every odd input is converted, every bad input gives one clear error naming the file
while the batch goes on, and training never loses a checkpoint."""
import importlib
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import dit
import train_teacher as tt
from tests.test_teacher import make_photos, poison_loss

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args):
    """`python script args` in this process (sample.py and degrade.py end in sys.exit(main())): the exit code,
    stdout and stderr as the shell sees them. A traceback would escape as an exception and fail the test."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
        except SystemExit as e:  # what the interpreter does with it: a message goes to stderr, exit 1
            code = e.code if e.code is None or isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    return SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())


def process(*args):
    """`python args` as a child process (train_teacher.py's __main__ does more than call main)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 1-step tiny teacher run (pixel codec, no semantics) to sample with."""
    tmp = tmp_path_factory.mktemp("robust")
    photos = make_photos(tmp / "photos", n=2)
    run = tmp / "run"
    tt.train(tt.TrainConfig(data=str(photos), out=str(run), preset="tiny", patch_size=1, codec="pixel",
                            semantic="none", degradation="bicubic", size=32, batch=2, steps=1, workers=0,
                            device="cpu"))
    return run


def odd_inputs(folder: Path) -> dict:
    """Every input kind that must be converted, not rejected; returns {file name: (w, h)} of the LR."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((13, 11, 3)) * 255).astype(np.uint8)
    sizes = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        sizes[name] = img.size

    save("gray.png", Image.fromarray(rgb[..., 0]))
    save("la.png", Image.fromarray(rgb[..., 0]).convert("LA"))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("sixteen.png", Image.fromarray((rng.random((9, 17)) * 65535).astype(np.uint16)))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("photo.webp", Image.fromarray(rgb))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: width and height swap on read
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    sizes["rotated.jpg"] = (13, 11)
    for s in (1, 2, 7, 15):
        save(f"tiny{s}.png", Image.fromarray(rgb[:s, :s].copy()))
    save("odd.png", Image.fromarray((rng.random((21, 35, 3)) * 255).astype(np.uint8)))
    return sizes


def test_odd_inputs_are_converted_to_exactly_4x(tmp_path, run_dir):
    sizes = odd_inputs(tmp_path / "in")
    out = tmp_path / "out"
    r = cli("sample.py", "--ckpt", run_dir, "-i", tmp_path / "in", "-o", out, "--steps", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for name, (w, h) in sizes.items():
        got = Image.open(out / Path(name).with_suffix(".png").name)
        assert got.size == (4 * w, 4 * h), name
        assert got.mode == "RGB"


def test_bad_inputs_name_the_file_and_the_batch_goes_on(tmp_path, run_dir):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(d / "good.png")
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    full = (tmp_path / "full.png")
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(full)
    (d / "truncated.png").write_bytes(full.read_bytes()[:200])
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", tmp_path / "out", "--steps", "1", "--device", "cpu")
    # the batch went on, and the exit says some failed
    assert r.returncode == 1, r.stderr
    assert "3 failed" in r.stdout
    for name in ("zero.png", "text.jpg", "truncated.png"):
        assert name in r.stderr
    assert (tmp_path / "out" / "good.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file_is_named(tmp_path, run_dir):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "locked.png")
    os.chmod(d / "locked.png", 0)
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", tmp_path / "out", "--device", "cpu")
    assert "locked.png" in r.stderr and r.returncode != 0


def test_permission_denied_is_named_and_the_batch_goes_on(tmp_path, run_dir, monkeypatch, capsys):
    """The same case as above where chmod cannot deny (root, CI): open() itself raises EACCES."""
    import builtins
    import sample
    d = tmp_path / "in"
    d.mkdir()
    for name in ("locked.png", "ok.png"):
        Image.new("RGB", (8, 6), (90, 20, 30)).save(d / name)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if Path(str(file)).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded_open)
    code = sample.main(["--ckpt", str(run_dir), "-i", str(d), "-o", str(tmp_path / "out"), "--steps", "1",
                        "--device", "cpu"])
    err = capsys.readouterr().err
    assert "locked.png" in err and "Permission denied" in err
    assert code == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]


def test_folder_and_path_errors(tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("sample.py", "--ckpt", run_dir, "-i", empty, "-o", tmp_path / "o")
    assert r.returncode != 0 and str(empty) in r.stderr
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (8, 8)).save(img_dir / "a.png")
    as_file = tmp_path / "out.txt"
    as_file.write_text("x")
    r = cli("sample.py", "--ckpt", run_dir, "-i", img_dir, "-o", as_file)
    assert r.returncode != 0 and "out.txt" in r.stderr
    r = cli("sample.py", "--ckpt", tmp_path / "missing_run", "-i", img_dir, "-o", tmp_path / "o")
    assert r.returncode != 0 and "missing_run" in r.stderr
    r = process("train_teacher.py", "--data", img_dir, "--codec", str(tmp_path / "no_vae"), "--steps", "1",
                "--out", tmp_path / "r", "--device", "cpu")
    assert r.returncode != 0 and "no_vae" in r.stderr


def test_checkpoint_mismatch_names_key_and_shapes(tmp_path):
    small = dit.build("tiny", latent_channels=4, enc_dim=8, train_grid=4)
    path = tmp_path / "ckpt.safetensors"
    dit.save_checkpoint(small, path)
    other = dit.build("tiny", latent_channels=16, enc_dim=8, train_grid=4)  # a different channel count
    with pytest.raises(Exception) as e:
        dit.load_release_checkpoint(other, path)
    msg = str(e.value)
    assert "x_embedder.proj.weight" in msg and str(path) in msg
    assert "(64, 8, 2, 2)" in msg and "(64, 32, 2, 2)" in msg  # the file's shape and the model's
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in small.state_dict().items()} | {"extra.weight": torch.zeros(3)}
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(Exception) as e:
        dit.load_release_checkpoint(dit.build("tiny", latent_channels=4, enc_dim=8, train_grid=4),
                                    tmp_path / "extra.safetensors")
    assert "extra.weight" in str(e.value)


def test_crash_between_write_and_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", n=2)
    cfg = dict(data=str(photos), out=str(tmp_path / "run"), preset="tiny", codec="pixel", semantic="none",
               degradation="bicubic", size=32, batch=2, workers=0, ckpt_every=1, device="cpu")
    tt.train(tt.TrainConfig(steps=1, **cfg))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("ckpt.safetensors"):
            raise OSError("simulated crash before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        tt.train(tt.TrainConfig(steps=2, resume=True, **cfg))
    monkeypatch.setattr(os, "replace", real_replace)
    with safe_open(str(tmp_path / "run" / "ckpt.safetensors"), "pt") as f:  # still the step-1 file, intact
        assert f.metadata()["step"] == "1"
        assert any(k.startswith("ema.") for k in f.keys())
    hist = tt.train(tt.TrainConfig(steps=2, resume=True, **cfg))  # and training resumes from it
    assert list(hist) == [1]


def test_skip_nonfinite_tolerates_n_bad_steps(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", n=2)
    poison_loss(monkeypatch, bad_calls=(2, 3), value=float("inf"))
    hist = tt.train(tt.TrainConfig(data=str(photos), out=str(tmp_path / "run"), preset="tiny", codec="pixel",
                                   semantic="none", degradation="bicubic", size=32, batch=2, steps=5, workers=0,
                                   skip_nonfinite=2, device="cpu"))
    assert sorted(hist) == [0, 3, 4]  # steps 1 and 2 were skipped, training went on


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder, to check that nothing was touched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(r, *names):
    """The CLI refused with a non-zero exit and one line on stderr naming each of `names`, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def test_outputs_never_overwrite_or_reread_inputs(tmp_path, run_dir):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray((np.random.default_rng(1).random((6, 8, 3)) * 255).astype(np.uint8)).save(d / name)
    before = snapshot(tmp_path)
    for out in (d, d / "sub", d / "a.png"):                                 # the folder, inside it, an input
        one_line_error(cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1"), out)
    one_line_error(cli("sample.py", "--ckpt", run_dir, "-i", d / "a.png", "-o", d / "a.png", "--steps", "1"),
                   d / "a.png")
    one_line_error(cli("degrade.py", "-i", d, "-o", d / "pairs", "--crop", "4"), d / "pairs")
    assert snapshot(tmp_path) == before                                     # byte-identical, nothing added


def test_output_file_path_writes_one_file_or_is_refused(tmp_path, run_dir):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(d / "a.png")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(d / "b.png")
    one_line_error(cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", tmp_path / "result.png"), "result.png")
    assert not (tmp_path / "result.png").exists()
    r = cli("sample.py", "--ckpt", run_dir, "-i", d / "a.png", "-o", tmp_path / "result.png", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "result.png").is_file() and Image.open(tmp_path / "result.png").size == (32, 24)


def test_name_clashes_get_distinct_outputs(tmp_path, run_dir):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (8, 6), (250, 0, 0)).save(d / "a.png")
    Image.new("RGB", (8, 6), (0, 0, 250)).save(d / "a.jpg")
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", tmp_path / "out", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_jpg.png", "a_png.png"]


def test_written_files_have_the_usual_permissions(tmp_path):
    from vosr import files
    files.write_image(tmp_path / "x.png", torch.zeros(3, 4, 4))
    files.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")       # safetensors alone makes 0600
    for name in ("x.png", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~files._UMASK, name


# ------------------------------------------------------------------ outputs, write errors, Ctrl-C

def small_inputs(folder: Path, n: int = 3, size=(8, 6)) -> Path:
    """n distinct small RGB images a.png, b.png, … in folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{chr(97 + i)}.png")
    return folder


def tmp_files(folder: Path) -> list:
    """Hidden in-flight files (atomic_path's .name.xxxx.tmp, the folder probe) left under folder."""
    return [p for p in folder.rglob(".*") if p.is_file()]


def test_existing_outputs_are_refused_kept_or_replaced(tmp_path, run_dir):
    d = small_inputs(tmp_path / "in")
    out = tmp_path / "out"
    sample = ("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1")
    assert cli(*sample).returncode == 0
    # not even an image: it must stay as it is
    (out / "a.png").write_bytes(b"an earlier result")
    (out / "c.png").unlink()                                      # c was not finished
    before = snapshot(tmp_path)
    # neither flag: refused before any work
    r = cli(*sample)
    one_line_error(r, out / "a.png", "2 output file(s)", "--skip-existing", "--overwrite")
    assert "loaded" not in r.stdout and snapshot(tmp_path) == before
    r = cli(*sample, "--skip-existing")                            # continues: only c is computed
    assert r.returncode == 0, r.stderr
    assert "wrote 1 image(s), skipped 2 existing, 0 failed" in r.stdout
    assert (out / "a.png").read_bytes() == b"an earlier result"
    assert (out / "b.png").read_bytes() == before[Path("out/b.png")]
    assert Image.open(out / "c.png").size == (32, 24)
    r = cli(*sample, "--overwrite")                                # asked for: replaced
    assert r.returncode == 0 and "wrote 3 image(s), skipped 0 existing" in r.stdout
    assert Image.open(out / "a.png").size == (32, 24)
    one_line_error(cli(*sample, "--overwrite", "--skip-existing"), "--skip-existing")


def test_an_existing_output_file_is_not_replaced(tmp_path, run_dir):
    d = small_inputs(tmp_path / "in", n=1)
    precious = tmp_path / "precious.png"
    precious.write_bytes(b"not an output of ours")
    r = cli("sample.py", "--ckpt", run_dir, "-i", d / "a.png", "-o", precious, "--steps", "1")
    one_line_error(r, precious, "1 output file(s)")
    assert precious.read_bytes() == b"not an output of ours"


def test_degrade_keeps_existing_pairs(tmp_path):
    d = small_inputs(tmp_path / "in", n=3, size=(8, 8))
    out = tmp_path / "pairs"
    degrade = ("degrade.py", "-i", d, "-o", out, "--crop", "8", "--mode", "bicubic")
    assert cli(*degrade).returncode == 0
    (out / "hr" / "a.png").write_bytes(b"earlier")
    # c's pair is half there: it is made again
    (out / "lr" / "c.png").unlink()
    before = snapshot(tmp_path)
    r = cli(*degrade)
    one_line_error(r, "degrade.py", out / "hr" / "a.png", "--skip-existing")
    assert snapshot(tmp_path) == before
    r = cli(*degrade, "--skip-existing")
    assert r.returncode == 0, r.stderr
    assert "wrote 1 HR/LR pairs" in r.stdout and "kept 2 existing pair(s)" in r.stdout
    assert (out / "hr" / "a.png").read_bytes() == b"earlier" and (out / "lr" / "c.png").is_file()
    assert cli(*degrade, "--overwrite").returncode == 0
    assert (out / "hr" / "a.png").read_bytes() != b"earlier"


@pytest.mark.parametrize("script", ["sample.py", "degrade.py"])
def test_unwritable_output_is_one_line_before_any_work(tmp_path, run_dir, monkeypatch, script):
    """An output under a file, a folder that cannot be created, a read-only folder: one line
    naming the path and the reason before anything is computed. As root chmod does not deny, so
    the read-only file system and the refused mkdir are OS errors from a monkeypatched open() and
    Path.mkdir."""
    import builtins
    import errno
    d = small_inputs(tmp_path / "in", n=1, size=(8, 8))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = (["--ckpt", run_dir, "--steps", "1"] if script == "sample.py"
            else ["--crop", "8", "--mode", "bicubic"])
    r = cli(script, "-i", d, "-o", blocker / "out", *args)
    one_line_error(r, blocker, "is a file, not a folder")
    assert "loaded" not in r.stdout

    real_open, real_mkdir, ro = builtins.open, Path.mkdir, tmp_path / "readonly"
    ro.mkdir()

    def read_only_open(file, mode="r", *a, **k):
        if Path(str(file)).parent.is_relative_to(ro) and any(c in mode for c in "wax"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *a, **k)

    def refused_mkdir(self, *a, **k):
        if self.is_relative_to(tmp_path / "denied"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(Path, "mkdir", refused_mkdir)
    r = cli(script, "-i", d, "-o", ro, *args)
    one_line_error(r, ro, "Read-only file system")
    assert "loaded" not in r.stdout and not list(ro.iterdir())
    r = cli(script, "-i", d, "-o", tmp_path / "denied" / "out", *args)
    one_line_error(r, tmp_path / "denied" / "out", "Permission denied", "cannot create")
    assert not (tmp_path / "denied").exists()


def full_disk_after(monkeypatch, n_ok: int):
    """PIL saves fail with ENOSPC after n_ok successful saves, having written half a file first."""
    import errno
    real_save, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) > n_ok:
            Path(fp).write_bytes(b"half a PNG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save)


def test_full_disk_mid_batch_keeps_what_was_written(tmp_path, run_dir, monkeypatch):
    d = small_inputs(tmp_path / "in")
    out = tmp_path / "out"
    full_disk_after(monkeypatch, 1)
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1")
    one_line_error(r, out / "b.png", "No space left on device", "1 of 3 image(s) written",
                   "--skip-existing")
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert Image.open(out / "a.png").size == (32, 24)
    monkeypatch.undo()
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1", "--skip-existing")
    assert r.returncode == 0 and "wrote 2 image(s), skipped 1 existing" in r.stdout

    pairs = tmp_path / "pairs"
    full_disk_after(monkeypatch, 3)                                # a's hr and lr, b's hr
    r = cli("degrade.py", "-i", d, "-o", pairs, "--crop", "4", "--mode", "bicubic", "--batch", "1")
    one_line_error(r, pairs / "lr" / "b.png", "No space left on device", "1 of 3 pair(s)")
    written = sorted(str(p.relative_to(pairs)) for p in pairs.rglob("*.png"))
    assert written == ["hr/a.png", "hr/b.png", "lr/a.png"]
    assert not tmp_files(tmp_path)                                 # no half file anywhere


def interrupt_on_call(monkeypatch, module, name: str, n: int):
    """module.name raises KeyboardInterrupt (what Ctrl-C raises) on its n-th call."""
    real, calls = getattr(module, name), []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapper)


def test_ctrl_c_is_one_line_and_skip_existing_continues(tmp_path, run_dir, monkeypatch):
    import degrade
    import sample
    d = small_inputs(tmp_path / "in", n=4)
    out = tmp_path / "out"
    interrupt_on_call(monkeypatch, sample, "super_resolve", 3)
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1")
    assert r.returncode == 130
    one_line_error(r, "interrupted", f"2 of 4 image(s) written to {out}", "--skip-existing")
    done = snapshot(out)
    assert sorted(map(str, done)) == ["a.png", "b.png"] and not tmp_files(tmp_path)
    monkeypatch.undo()
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1", "--skip-existing")
    assert r.returncode == 0 and "wrote 2 image(s), skipped 2 existing" in r.stdout
    assert all(snapshot(out)[k] == v for k, v in done.items())     # the finished ones untouched

    pairs = tmp_path / "pairs"
    # b's lr: b's pair is half written
    interrupt_on_call(monkeypatch, degrade, "write_image", 4)
    r = cli("degrade.py", "-i", d, "-o", pairs, "--crop", "4", "--mode", "bicubic", "--batch", "1")
    assert r.returncode == 130
    one_line_error(r, "interrupted", "1 of 4 pair(s)", "--skip-existing")
    monkeypatch.undo()
    r = cli("degrade.py", "-i", d, "-o", pairs, "--crop", "4", "--mode", "bicubic",
            "--skip-existing")
    assert r.returncode == 0 and "wrote 3 HR/LR pairs" in r.stdout and "kept 1 existing" in r.stdout
    assert len(list(pairs.rglob("*.png"))) == 9 and not tmp_files(tmp_path)


def test_a_real_sigint_stops_sample_with_one_line(tmp_path, run_dir):
    """Ctrl-C as a terminal sends it: SIGINT to a running sample.py once an image is written."""
    import signal
    import time
    d = small_inputs(tmp_path / "in", n=26, size=(16, 16))
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(run_dir), "-i", str(d),
                              "-o", str(out), "--steps", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "a.png").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    written = len(list(out.glob("*.png")))
    assert child.returncode == 130 and written < 26, (child.returncode, stderr)
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert f"interrupted: {written} of 26 image(s) written" in last and "--skip-existing" in last
    assert not tmp_files(tmp_path)


@pytest.mark.parametrize("stage, patch, dtype", [
    ("codec encoder (c_str)", "encode", "fp32"), ("DiT (velocity)", "forward", "bf16"),
    ("codec decoder (image)", "decode", "fp32")])
def test_a_nan_out_of_a_stage_is_one_line_and_the_batch_goes_on(tmp_path, run_dir, monkeypatch,
                                                                  stage, patch, dtype):
    """A NaN planted in one stage for the first image: that image fails with one line naming the
    stage and the format, no black image is written, the next image is, and the exit is 1."""
    import vae
    owner = dit.VOSRDiT if patch == "forward" else vae.PixelCodec
    real, calls = getattr(owner, patch), []

    def poisoned(self, *a, **k):
        calls.append(1)
        out = real(self, *a, **k)
        return out * float("nan") if len(calls) == 1 else out
    monkeypatch.setattr(owner, patch, poisoned)
    d = small_inputs(tmp_path / "in", n=2)
    out = tmp_path / "out"
    r = cli("sample.py", "--ckpt", run_dir, "-i", d, "-o", out, "--steps", "1", "--dtype", dtype)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(lines) == 1 and stage in lines[0] and str(d / "a.png") in lines[0], r.stderr
    hint = f"in {dtype}: re-run with --dtype fp32" if dtype != "fp32" else "in fp32: not a rounding"
    assert hint in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]
    assert "wrote 1 image(s), skipped 0 existing, 1 failed" in r.stdout


TOOL_SCRIPTS = ("export", "make_shards", "fetch_weights", "blockiness", "seams")


@pytest.mark.parametrize("name", TOOL_SCRIPTS)
def test_ctrl_c_in_a_tool_script_is_one_line_and_130(name, capsys, monkeypatch):
    """Each tools/ script's entry point goes through cli.run_script: a Ctrl-C inside its main is one
    line naming the script and exit 130, no traceback."""
    import runpy
    from vosr import cli

    def interrupted_main():
        raise KeyboardInterrupt

    seen = []
    real = cli.run_script

    def spy(main, prog):
        seen.append(prog)
        return real(interrupted_main, prog)
    monkeypatch.setattr(cli, "run_script", spy)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"),
                       run_name="__main__")
    err = capsys.readouterr().err
    assert seen == [f"{name}.py"] and e.value.code == 130
    assert err.count("\n") == 1 and err.startswith(f"{name}.py: interrupted") and "Traceback" not in err
