"""Run-dir plumbing of the training scripts (train_teacher.py, distill.py; ours, not the paper's).

A run dir holds config.json, ckpt.safetensors (model, EMA, optimiser, step and, for streamed data,
each data stream's position), ema.safetensors and log.jsonl. Here: checking it before a run starts
(never overwrite a run silently), --overwrite, checkpoints written atomically and read back for
--resume, the teacher run a student distils, torchrun's ranks, the progress line, the lock that
keeps one run per dir (locked), and SIGINT/SIGTERM saving the current step before the run stops
(StopSignals). train_teacher.py writes config.json (write_run_config) and loads --init
(init_weights) itself: they need its models. tools/export.py writes its files with these helpers
too.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from vosr import files
from vosr.files import UserError

RUN_FILES = ("ckpt.safetensors", "ema.safetensors", "config.json", "log.jsonl")


@contextlib.contextmanager
def distributed(cfg):
    """(rank, world size, device) of this process, its process group closed at the end. torchrun
    sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device(cfg.device)
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def check_run_dir(cfg) -> None:
    """The run dir, before any model is built or file written: never overwrite a run silently (one
    that holds a run needs --resume or --overwrite); the checkpoint to resume must be whole;
    --val-data exists."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or start it over)")
    if cfg.resume and (run / "ckpt.safetensors").exists():
        check_training_checkpoint(run / "ckpt.safetensors")
    found = [f for f in RUN_FILES if (run / f).is_file()]
    if found and not (cfg.resume or cfg.overwrite):
        refuse_existing_run(run, found)
    if cfg.val_data and not Path(cfg.val_data).exists():
        raise UserError(f"--val-data {cfg.val_data}: not found")
    if cfg.val_data and not files.find_images(cfg.val_data):  # else a run without validation
        exts = ", ".join(files.IMAGE_EXTS)
        raise UserError(f"--val-data {cfg.val_data}: no images ({exts}) found")


def refuse_existing_run(run: Path, found: list):
    """The one line for a run dir that holds a run: what is there and how to go on."""
    held = ", ".join(found)
    if "ckpt.safetensors" in found:
        try:
            held = f"a checkpoint at step {files.read_safetensors_header(run / 'ckpt.safetensors')[1]['step']}"
        except (ValueError, KeyError):
            held = "a ckpt.safetensors that cannot be read"
    raise UserError(f"--out {run} already holds a run ({held}); add --resume to continue it "
                    "or --overwrite to start over")


def clear_run(run: Path) -> None:
    """--overwrite: the old run's files go before the new run writes any, so no file mixes two runs.
    """
    for f in [*(run / f for f in RUN_FILES), run / "semantic.safetensors", *run.glob("val_*.png")]:
        f.unlink(missing_ok=True)


def write_json(obj: dict, path: Path):
    """config.json and the like, written atomically."""
    with files.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def save_checkpoint(run: Path, model, ema, opt, step: int, data_streams: dict | None = None):
    """ckpt.safetensors (model, EMA, AdamW state; step and the streams' positions as metadata),
    ema.safetensors."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        tensors |= {
            f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)) for k, v in st.items()
        }
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"])}
    if data_streams is not None:  # streamed data: samples drawn by each stream, for an exact resume
        meta["data_streams"] = json.dumps(data_streams)
    files.save_safetensors(tensors, run / "ckpt.safetensors", meta)
    files.save_safetensors(ema.state_dict(), run / "ema.safetensors")


def check_training_checkpoint(path: Path) -> None:
    """--resume: ckpt.safetensors must be whole and hold model, EMA and step; one line if not."""
    try:
        keys, meta = files.read_safetensors_header(path)
    except ValueError as e:
        raise UserError(f"cannot resume: {e}") from None
    for what, ok in (("step in its metadata", "step" in meta),
                     ("model.* weights", any(k.startswith("model.") for k in keys)),
                     ("ema.* weights", any(k.startswith("ema.") for k in keys))):
        if not ok:
            raise UserError(f"cannot resume: {path}: not a training checkpoint (no {what})")


def load_checkpoint(path: Path, model, ema, opt) -> int:
    """Restore model, EMA and optimiser from ckpt.safetensors; returns the step to continue from."""
    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    files.load_strict(model, {k[6:]: v for k, v in sd.items() if k.startswith("model.")}, path,
                      "model.", assign=False)
    ema_sd = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    files.load_strict(ema, ema_sd, path, "ema.", assign=False)
    state: dict = {}
    for k, v in sd.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def resume(ckpt: Path, model, ema, opt, cfg, rank: int, name: str) -> int:
    """--resume: model, EMA and optimiser from the checkpoint; the flags win over its
    hyper-parameters (a cool-down). Returns the step to continue from (0: a new run, or a run dir
    without a checkpoint yet)."""
    if not (cfg.resume and ckpt.exists()):
        if cfg.resume and rank == 0:
            print(f"{name}: {ckpt.parent} has no ckpt.safetensors yet: starting at step 0")
        return 0
    try:
        start = load_checkpoint(ckpt, model, ema, opt)
    except ValueError as e:  # a checkpoint of another model: the message names the key
        raise UserError(f"cannot resume: {e}") from None
    for group in opt.param_groups:
        group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if rank == 0:
        trim_log(ckpt.parent / "log.jsonl", start)
        print(f"{name}: resumed {ckpt.parent} at step {start}")
        if start >= cfg.steps:
            print(
                f"{name}: step {start} is already --steps {cfg.steps}: nothing to train (give a "
                "larger --steps)"
            )
    return start


def resuming(cfg) -> bool:
    """--resume of a run dir that has a checkpoint (else the run starts at step 0)."""
    return bool(cfg.resume) and (Path(cfg.out) / "ckpt.safetensors").exists()


def mean_over_ranks(loss, world: int) -> float:
    """The step's loss averaged over the ranks (an all-reduce under torchrun), as a float."""
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def checkpoint(run: Path, model, ema, opt, step: int, loader, rank: int, world: int) -> None:
    """ckpt.safetensors and ema.safetensors of `step`: rank 0 writes them, every rank calls this
    (under torchrun each rank's streams tell where they are: a collective)."""
    streams = loader.state(world) if hasattr(loader, "state") else None
    if rank == 0:
        save_checkpoint(run, model, ema, opt, step, streams)


class Progress:
    """What rank 0 shows and keeps of the steps: log.jsonl (every --log-every steps and every
    validation), and a bar on a terminal or, elsewhere (nohup, a log file), a plain line every
    --log-every steps from the first step on (a CPU step of the paper's recipe takes seconds)."""

    def __init__(self, cfg, name: str, start: int, rank: int):
        self.cfg, self.name, self.start, self.on = cfg, name, start, rank == 0
        self.file = open(Path(cfg.out) / "log.jsonl", "a") if self.on else None
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not (self.on and self.tty),
                        desc=name.removesuffix(".py"))
        self.t0 = time.time()

    def write(self, record: dict) -> None:
        """One finished step: {"step": steps done, "loss": …, and any "val_*" of its validation}."""
        if not self.on:
            return
        cfg, done, elapsed = self.cfg, record["step"], time.time() - self.t0
        rate = (done - self.start) * cfg.batch / elapsed
        rec = {"step": done, "loss": record["loss"], "img_per_s": round(rate, 2)} | record
        vals = {k: v for k, v in rec.items() if k.startswith("val")}
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rate:.1f}")
        if vals:
            self.bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        if done % cfg.log_every == 0 or vals:
            rec = {k: float(v) if torch.is_tensor(v) else v for k, v in rec.items()}
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if not self.tty and (done % cfg.log_every == 0 or done in (self.start + 1, cfg.steps)):
            speed = (done - self.start) / elapsed
            print(progress_line(self.name, done, cfg.steps, rec["loss"], speed), flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def trim_log(path: Path, step: int) -> None:
    """On resume: keep the log records up to the checkpoint's step (a killed run logged past it) and
    drop a line the kill cut short, so the continued log has each step once; rewritten
    atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with files.atomic_path(path) as tmp:
        tmp.write_text("".join(keep))


def semantic_source(cfg) -> str:
    """The semantic encoder to load: a random encoder saved in the run (a resume) is loaded from
    there."""
    own = Path(cfg.out) / cfg.semantic
    return str(own) if cfg.semantic == "semantic.safetensors" and own.is_file() else cfg.semantic


def load_teacher_run(path: str) -> tuple[dict, Path]:
    """The teacher's config.json and EMA weights; one line naming the file if it is not a teacher
    run (missing, broken, truncated, or a distilled student)."""
    run = Path(path)
    conf, weights = run / "config.json", run / "ema.safetensors"
    if not run.exists():
        raise UserError(f"--teacher {run}: not found")
    if not conf.is_file() or not weights.is_file():
        raise UserError(
            f"--teacher {run}: not a teacher run dir (needs config.json and ema.safetensors)"
        )
    try:
        tconf = files.read_json(conf)
        keys, _ = files.read_safetensors_header(weights)
    except (
        ValueError
    ) as e:  # broken JSON; empty, truncated or not safetensors: the message names the file
        raise UserError(f"--teacher {run}: {e}") from None
    if "method" in tconf or any(k.startswith("r_embedder.") for k in keys):
        raise UserError(f"--teacher {run}: {weights} is a distilled student, not a teacher "
                        "(give the teacher's run dir)")
    for k in ("preset", "codec", "semantic", "enc_dim", "train_grid"):
        if k not in tconf:
            raise UserError(f"--teacher {run}: {conf} has no {k!r}: not a run config")
    sem = tconf["semantic"]
    if sem not in ("none",) and not sem.startswith("random") and (run / sem).is_file():
        # a random encoder saved inside the teacher run
        tconf["semantic"] = str((run / sem).resolve())
    return tconf, weights


def progress_line(name: str, done: int, steps: int, loss: float, steps_per_s: float) -> str:
    """The line printed every --log-every steps when stderr is not a terminal (no progress bar
    there)."""
    eta = time.strftime("%H:%M:%S", time.gmtime((steps - done) / max(steps_per_s, 1e-9)))
    return f"{name}: step {done}/{steps} loss {loss:.4f} {steps_per_s:.2f} steps/s ETA {eta}"


# ------------------------------------------------------------------------- one run per dir (ours)

LOCK = "run.lock"


@contextlib.contextmanager
def locked(run: Path, name: str):
    """The run dir, locked while this run writes to it: `run.lock` (pid, host, start time), created
    with O_EXCL so that of two runs started together exactly one gets it; another run is refused
    naming the holder; a lock whose process is gone (same host) is taken over with a note. The lock
    goes on every exit (a SIGKILL leaves it: the next run on this host takes it over), and so do the
    folders this run made, if nothing else was written to them. Under torchrun rank 0 holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder")
    made = [p for p in (run, *run.parents) if not p.exists()]  # deepest first
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run}: cannot create the folder ({e.strerror})") from None
    mine = _take_lock(run / LOCK, name)
    try:
        yield
    finally:
        if _read_lock(run / LOCK) == mine:
            (run / LOCK).unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()  # only if empty: a refused run leaves no folder behind
            except OSError:
                break


def _take_lock(lock: Path, name: str) -> dict:
    """Create `lock` holding this process (or take over a stale one); UserError naming a holder."""
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _ in range(3):  # a lock released or taken over meanwhile: look again
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None and lock.exists():  # perhaps being written this instant: once more
                time.sleep(0.2)
                holder = _read_lock(lock)
            if holder is None and lock.exists():
                raise UserError(f"--out {lock.parent} is locked by another run ({lock} "
                                "cannot be read); if no run uses this folder, delete "
                                f"{lock}") from None
            if holder is not None and not _stale(holder):
                raise UserError(_held_line(lock, holder)) from None
            if holder is not None:
                print(f"{name}: --out {lock.parent}: taking over the lock of pid {holder['pid']} "
                      f"on {holder['host']} (started {holder['started']}): that process is gone")
                _set_aside(lock, holder)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine))
        except BaseException:  # a signal or a full disk between create and write: no half lock
            lock.unlink(missing_ok=True)
            raise
        return mine
    raise UserError(f"--out {lock.parent}: other runs keep taking its lock {lock}; "
                    "start one at a time")


def _read_lock(lock: Path) -> dict | None:
    """The holder written in a lock file; None if it is gone, empty or unreadable."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and {"pid", "host", "started"} <= holder.keys()
    return holder if ok else None


def _held_line(lock: Path, holder: dict) -> str:
    """The one line for a run dir another run holds."""
    line = (f"--out {lock.parent} is in use by another run: pid {holder['pid']} on "
            f"{holder['host']}, started {holder['started']}; "
            "wait for it to end or choose another --out")
    if holder["host"] != socket.gethostname():  # its pid cannot be looked up from here
        line += f" (if that run is no longer running, delete {lock})"
    return line


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone, or whose pid now belongs to a later process."""
    if holder["host"] != socket.gethostname():
        return False
    pid = int(holder["pid"])
    if pid == os.getpid():
        return True  # this process did not take it: a pid reused (a restarted container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    return started is not None and "time" in holder and started > float(holder["time"]) + 2


def _process_start(pid: int) -> float | None:
    """When process `pid` started (Unix time, from /proc); None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime: ticks since boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _set_aside(lock: Path, holder: dict) -> None:
    """Remove a stale lock; if another run replaced it first, put that run's lock back."""
    aside = lock.with_name(f".{lock.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


# --------------------------------------------------------------------- SIGINT and SIGTERM (ours)

class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM; the message is the line to print (empty on ranks other
    than 0), `code` the exit status: 128 + the signal as shells report it (130 SIGINT, 143 SIGTERM),
    so a job script or scheduler reads it as "ended by that signal"."""

    def __init__(self, signum: int, line: str):
        super().__init__(line)
        self.code = 128 + signum


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill a job: SLURM's --signal,
    torchrun passing on its own). Before the steps begin they stop the run at once (Stopped: nothing
    to save yet). Once armed, the first one only sets a flag: the current step ends, every rank
    agrees (all-reduce MAX), the checkpoint of that step is written and the run stops. Later ones
    are ignored, so nothing cuts the save short (and torchrun passes on a Ctrl-C that its workers
    already got from the terminal)."""

    def __init__(self, run: Path, name: str):
        self.run, self.name, self.pid = run, name, os.getpid()
        self.armed, self.signum, self.old = False, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only go there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker: the main process decides
            return
        if not self.armed:  # (under torchrun rank 0 says it, once)
            rank0 = os.environ.get("RANK", "0") == "0"
            raise Stopped(signum, stop_line(self.name, self.run, signum) if rank0 else "")
        self.signum = self.signum or signum

    def agreed(self, world: int, device) -> int:
        """The signal that stops the run after this step (0: none), the same on every rank."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def stop_line(name: str, run: Path, signum: int, saved: int | None = None) -> str:
    """What a stopped run says: the checkpoint it saved (at step `saved`), or the one it left as it
    was, or that there is none; and how to go on. It names a checkpoint only where one exists."""
    why, ckpt = f"stopped by {signal.Signals(signum).name}", run / "ckpt.safetensors"
    again = f"continue with --resume (python {name} --out {run} --resume)"
    if saved is not None:
        return f"{why} after step {saved}: saved {ckpt}; {again}"
    try:
        step = files.read_safetensors_header(ckpt)[1]["step"]
    except (OSError, ValueError, KeyError):
        step = None
    if step is not None:
        return (f"{why} before its first step: nothing new saved, {ckpt} (step {step}) is as it "
                f"was; {again}")
    made = (run / "config.json").is_file()  # written before the steps: a new start needs --resume
    how = "with --resume (it starts at step 0)" if made else "the same way"
    return (f"{why} before its first step: no checkpoint was saved, nothing to resume; "
            f"start it again {how}")
