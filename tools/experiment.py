"""One command per table (ours: plumbing, not the paper's method): a named experiment of
docs/ablations.md end to end -- its arms (train_teacher.py, distill.py), their sweeps (evaluate.py
sweep --per-image), the paired comparisons with bootstrap intervals (evaluate.py compare) and the
plots -- into one folder.

    python -m tools.experiment fig4 --out results/fig4                  # CPU recipe (the default)
    python -m tools.experiment table4 --out results/table4 --recipe gpu
    python -m tools.experiment table1 --out results/table1 --dry-run    # print the commands only

Each step is a command line of the stage scripts, run in order as a child process. A finished step
is marked in OUT/.done/ and skipped when the same command is run again, so a stopped experiment
continues where it stopped (a training step whose run folder exists continues it with --resume).
OUT/commands.sh lists every command, OUT/log.txt each step's time and exit status, OUT/intervals.csv
every comparison.
"""
import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from vosr.cli import OneLineParser, number
from vosr.files import UserError, atomic_path, read_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Recipe:
    """Where the data is and how long each stage runs; the defaults are the CPU recipe."""
    data: str = "data/train"                            # HR training photos
    val: str = "data/val"                               # held-out HR photos: validation curves
    val_lr: str = "data/val_rw/lr"                      # the held-out photos, degraded once
    val_hr: str = "data/val_rw/hr"
    teacher: str = "checkpoints/vosr-small-realworld"  # Fig. 4's teacher; Table 1 distils it
    init: str = "checkpoints/vosr-small-realworld"     # the arms of Tables 4 and 5 start from it
    device: str = "cpu"
    metrics: str = "psnr,lpips,dists,niqe"
    sample_steps: int = 8                               # teachers' Euler steps (the paper: 25)
    check_steps: int = 25                               # fig4: sample_steps ranks s as 25 do?
    check_images: int = 10
    teacher_steps: int = 600
    distill_steps: int = 400
    batch: int = 16
    train_flags: tuple = ("--cache-images", "--ckpt-every", "100", "--log-every", "50")


RECIPES = {
    "cpu": Recipe(),
    "gpu": Recipe(device="cuda", sample_steps=25, teacher_steps=2000, distill_steps=1000,
                  batch=64, train_flags=("--bf16", "--cache-images", "--ckpt-every", "500",
                                         "--log-every", "100")),
}
TRAINING = ("train_teacher.py", "distill.py")


@dataclass
class Step:
    """One command line (a script and its flags) and the files it leaves."""
    name: str
    argv: list
    outputs: list = field(default_factory=list)


def sweep_step(name, ckpt, out, r, guidance, steps, *flags, seeds="0,1"):
    """evaluate.py sweep of one checkpoint (two noise seeds), with its per-image CSV."""
    argv = ["evaluate.py", "sweep", "--ckpt", ckpt, "--lr", r.val_lr, "--hr", r.val_hr,
            "--steps", str(steps), "--lapped", "off", "--guidance", guidance, "--seeds", seeds,
            "--metrics", r.metrics, "--device", r.device, "--per-image", f"{out}/{name}.images.csv",
            "--csv", f"{out}/{name}.sweep.csv", "--plot", f"{out}/{name}.png", *flags]
    return Step(f"sweep_{name}", argv, [f"{out}/{name}.images.csv"])


def compare_step(name, a, b, out, expect=None, a_guidance=None, b_guidance=None):
    """evaluate.py compare of two per-image CSVs into OUT/compare/NAME.csv."""
    argv = ["evaluate.py", "compare", "--a", a, "--b", b, "--csv", f"{out}/compare/{name}.csv"]
    optional = {"--a-guidance": a_guidance, "--b-guidance": b_guidance, "--expect": expect}
    for flag, value in optional.items():
        argv += [flag, value] if value is not None else []
    return Step(f"compare_{name}", argv, [f"{out}/compare/{name}.csv"])


# Fig. 4 (paper §4.2, §3.3): as s grows LPIPS rises and MUSIQ falls -- more faithful, less
# generative.
# Against s = 1, a smaller s is then expected lower in LPIPS, DISTS, NIQE (our stand-ins for the
# perceptual and no-reference side) and in PSNR (fidelity); s = 2 the other way.
FIG4_METRICS = ("lpips", "dists", "niqe", "psnr")


def expected(r, direction, metrics=FIG4_METRICS):
    """--expect METRIC=direction for those of `metrics` the recipe scores (None if none)."""
    chosen = [m for m in r.metrics.split(",") if m in metrics]
    return ",".join(f"{m}={direction}" for m in chosen) or None


FIG4_SCALES = "-0.5,0,0.5,1,2"


def fig4(r, out):
    """The guidance sweep of the real-world teacher (inference only), each s against s = 1; and on
    the first check_images photos, sweeps at sample_steps and check_steps (fig4_rank_check)."""
    steps = [sweep_step("teacher", r.teacher, out, r, FIG4_SCALES, r.sample_steps)]
    images = f"{out}/teacher.images.csv"
    for s in ("-0.5", "0", "0.5", "2"):
        expect = expected(r, "higher" if float(s) > 1 else "lower")
        steps.append(compare_step(f"s{s}_vs_s1", images, images, out, expect, "1", s))
    if r.check_steps != r.sample_steps:
        for n in (r.sample_steps, r.check_steps):
            steps.append(sweep_step(f"check_{n}steps", r.teacher, out, r, FIG4_SCALES, n,
                                    "--n", str(r.check_images), seeds="0"))
    return steps


def scale_order(path, metric):
    """The guidance scales of a sweep's table (--csv) from the lowest `metric` to the highest."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["image"].removeprefix("s=") for r in sorted(rows, key=lambda r: float(r[metric]))]


def fig4_rank_check(r, out):
    """Lines saying, per metric, whether the sweep at sample_steps orders the scales as the one at
    check_steps does, on the same photos."""
    if r.check_steps == r.sample_steps:
        return []
    tables = [Path(out) / f"check_{n}steps.sweep.csv" for n in (r.sample_steps, r.check_steps)]
    lines = []
    for m in r.metrics.split(","):
        fast, slow = (scale_order(t, m) for t in tables)
        verdict = "the same order" if fast == slow else "another order"
        lines.append(f"{m}: s by rising value at {r.sample_steps} steps {' < '.join(fast)}; at "
                     f"{r.check_steps} steps {' < '.join(slow)}: {verdict}")
    return lines


def teacher_arm(name, r, out, seed, *flags):
    """train_teacher.py from the recipe's --init for one arm and training seed."""
    argv = ["train_teacher.py", "--data", r.data, "--val-data", r.val,
            "--out", f"{out}/runs/{name}", "--init", r.init, "--preset", "small",
            "--codec", "pixel4", "--degradation", "realesrgan", "--resize-back", "release",
            "--batch", str(r.batch), "--steps", str(r.teacher_steps), "--seed", str(seed),
            "--device", r.device, *flags, *r.train_flags]
    return Step(f"train_{name}", argv, [f"{out}/runs/{name}/ema.safetensors"])


def arms_and_contrasts(r, out, arms, contrasts, guidance):
    """Each arm trained at training seeds 0 and 1 and swept; each (b, a, expect) contrast compared
    per training seed; two seeds of each arm compared (the rule's seed-to-seed check)."""
    steps = []
    for seed in (0, 1):
        for name, flags in arms.items():
            steps.append(teacher_arm(f"{name}_seed{seed}", r, out, seed, *flags))
            steps.append(sweep_step(f"{name}_seed{seed}", f"{out}/runs/{name}_seed{seed}", out, r,
                                    guidance, r.sample_steps))
    for s in guidance.split(","):
        for seed in (0, 1):
            for b, a, expect in contrasts:
                a_csv, b_csv = (f"{out}/{arm}_seed{seed}.images.csv" for arm in (a, b))
                steps.append(compare_step(f"{b}_vs_{a}_seed{seed}_s{s}", a_csv, b_csv, out, expect,
                                          s, s))
        for name in arms:
            a_csv, b_csv = (f"{out}/{name}_seed{seed}.images.csv" for seed in (0, 1))
            steps.append(compare_step(f"{name}_seed1_vs_seed0_s{s}", a_csv, b_csv, out, None, s, s))
    return steps


def table4(r, out):
    """Appendix Table 4: ImageNet vs random EfficientNet-Lite0 c_sem (same shape, same fresh
    projection; the primary contrast), no encoder as the reference. 128² crops: the encoder sees 32²
    LR pixels at its native 224² input. The release scores at s = -0.5; s = 1: the full branch."""
    encoders = {"imagenet": "efficientnet-lite0", "random": "random-efficientnet-lite0",
                "none": "none"}
    arms = {name: ("--semantic", enc, "--semantic-size", "224", "--size", "128")
            for name, enc in encoders.items()}
    contrasts = [("imagenet", "random", "better"), ("imagenet", "none", "better")]
    return arms_and_contrasts(r, out, arms, contrasts, "-0.5,1")


def table5(r, out):
    """Appendix Table 5 (7 in the arXiv HTML): the auxiliary branch -- partial conditioning,
    standard CFG and the full branch alone, trained the same steps. The paper: partial beats
    full-only in MUSIQ (here NIQE), not in LPIPS; so the expectation is NIQE's only."""
    arms = {mode: ("--mode", mode, "--semantic", "efficientnet-lite0", "--size", "64")
            for mode in ("partial", "cfg", "full")}
    contrasts = [("partial", "full", expected(r, "lower", ("niqe",))), ("partial", "cfg", "better")]
    return arms_and_contrasts(r, out, arms, contrasts, "1")


def table1(r, out):
    """Appendix Table 1 (3 in the arXiv HTML): RC vs shortcut distillation of the real-world
    teacher at the release's settings (ω 0.5, α 0.1, EMA 0.999), two learning rates, one step."""
    steps = []
    for lr in ("2e-5", "1e-4"):
        for method in ("rc", "shortcut"):
            name = f"{method}_lr{lr}"
            argv = ["distill.py", "--teacher", r.teacher, "--data", r.data, "--val-data", r.val,
                    "--out", f"{out}/runs/{name}", "--method", method, "--omega", "0.5",
                    "--alpha", "0.1", "--ema", "0.999", "--lr", lr, "--steps", str(r.distill_steps),
                    "--batch", str(r.batch), "--size", "64", "--seed", "0", "--device", r.device,
                    *r.train_flags]
            steps.append(Step(f"distill_{name}", argv, [f"{out}/runs/{name}/ema.safetensors"]))
            steps.append(sweep_step(name, f"{out}/runs/{name}", out, r, "1", 1))
        steps.append(compare_step(f"rc_vs_shortcut_lr{lr}", f"{out}/shortcut_lr{lr}.images.csv",
                                  f"{out}/rc_lr{lr}.images.csv", out, "better"))
    return steps


EXPERIMENTS = {"fig4": fig4, "table4": table4, "table5": table5, "table1": table1}
REPORTS = {"fig4": ("rank_check.txt", fig4_rank_check)}  # a summary written after the last step


def plan(name, recipe, out):
    """The experiment's steps, its paths as strings."""
    return EXPERIMENTS[name](recipe, str(out))


def claim_folder(out, settings):
    """Create OUT, or reuse it for the same experiment and settings; another experiment's folder is
    refused (its runs and tables would be mixed or replaced)."""
    record = Path(out) / "experiment.json"
    if record.is_file():
        if read_json(record) != settings:
            raise UserError(f"{out} holds another experiment or other settings ({record}): "
                            "choose another --out")
    elif Path(out).is_dir() and any(Path(out).iterdir()):
        raise UserError(f"{out} is not empty and holds no experiment.json: choose another --out")
    Path(out, ".done").mkdir(parents=True, exist_ok=True)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


def command_of(step, out):
    """The step's command line; a training step whose run folder exists continues it (--resume)."""
    argv = list(step.argv)
    if argv[0] in TRAINING and Path(argv[argv.index("--out") + 1]).is_dir():
        argv.append("--resume")
    return [sys.executable, str(ROOT / argv[0]), *argv[1:]]


def execute(command):
    """Run a step's command line in the repository root; its exit status."""
    return subprocess.run(command, cwd=ROOT).returncode


def collect_intervals(out, steps):
    """OUT/intervals.csv: every comparison's table, one row per metric, named by its comparison."""
    header, rows = None, []
    for step in steps:
        if step.name.startswith("compare_") and Path(step.outputs[0]).is_file():
            with open(step.outputs[0], newline="") as f:
                table = list(csv.reader(f))
            header = ["comparison", *table[0]]
            rows += [[step.name.removeprefix("compare_"), *row] for row in table[1:]]
    if header:
        with atomic_path(Path(out) / "intervals.csv") as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])


def run(name, recipe, out, dry_run=False, log=print):
    """Run the experiment's steps not yet done; 0, or the exit status of the step that failed."""
    steps = plan(name, recipe, out)
    if dry_run:
        for step in steps:
            log(" ".join(["python", *step.argv]))
        return 0
    claim_folder(out, json.loads(json.dumps({"experiment": name, **asdict(recipe)})))
    with atomic_path(Path(out) / "commands.sh") as tmp:
        tmp.write_text("".join(" ".join(["python", *s.argv]) + "\n" for s in steps))
    for k, step in enumerate(steps, 1):
        marker = Path(out) / ".done" / step.name
        if marker.is_file():
            log(f"[{k}/{len(steps)}] {step.name}: done earlier, skipped")
            continue
        log(f"[{k}/{len(steps)}] {step.name}: {' '.join(['python', *step.argv])}")
        start = time.time()
        code = execute(command_of(step, out))
        with open(Path(out) / "log.txt", "a") as f:
            f.write(f"{step.name}\t{time.time() - start:.0f} s\texit {code}\n")
        if code:
            raise UserError(f"step {step.name} failed (exit {code}, its output above); run the "
                            "same command again to continue from it")
        marker.touch()
        collect_intervals(out, steps)
    if name in REPORTS:
        file, report = REPORTS[name]
        lines = report(recipe, out)
        with atomic_path(Path(out) / file) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
        for line in lines:
            log(line)
    log(f"{name}: all {len(steps)} steps done; the intervals are in {Path(out) / 'intervals.csv'}")
    return 0


def build_parser():
    p = OneLineParser(prog="experiment.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    p.add_argument("--out", required=True, help="its folder: runs, CSVs, plots, log")
    p.add_argument("--recipe", choices=list(RECIPES), default="cpu",
                   help="the recipe of defaults below (default: cpu)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    for f in fields(Recipe):
        if f.name != "train_flags":
            kind = number(int, 1) if f.type is int else str
            p.add_argument("--" + f.name.replace("_", "-"), type=kind,
                           help=f"overrides the recipe's (cpu: {f.default})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name, None)}
    recipe = replace(RECIPES[args.recipe], **given)
    try:
        return run(args.name, recipe, args.out, args.dry_run)
    except UserError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("experiment.py: interrupted; the steps done are kept: run the same command again to "
              "continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
