"""evaluate.py's command line, and the argparse types its tools share (tools/bench_sample.py, tools/seams.py,
tools/fetch_weights.py): range-checked numbers, comma lists, NAME=DIR columns, help that states every default.

Plumbing of evaluate.py, not the paper's method. build_parser defines the score, sweep, compare and
grid subcommands; sweep takes sample.py's sampler flags (tools/sample_cli.py). A mistake is one
line, `prog: error: message`.
"""
import argparse
import sys
from dataclasses import dataclass

import torch

from tools import sample_cli
from tools.cli import OneLineParser, number


@dataclass
class EvalConfig:
    """The defaults of `score`: Table 1's metrics, a border crop of the SR scale."""
    metrics: str = "psnr,ssim,lpips,dists,niqe"  # Table 1's full-reference metrics + NIQE
    crop: int = 4                                # border crop for PSNR/SSIM = SR scale factor
    sweep_metrics: str = "psnr,lpips,dists,niqe"  # Fig. 4's LPIPS and what to read beside it
    resamples: int = 10_000                      # bootstrap resamples of `compare`


SUBCOMMANDS = ("score", "sweep", "compare", "grid")
MOVED = {"fetch-weights": "tools/fetch_weights.py", "bench": "tools/bench_sample.py", "seams": "tools/seams.py"}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALLOW_SKIPPED_HELP = ("score the pairs that can be scored when some files are unreadable, unpaired "
                      "or of another size (without it such a run names them and exits 2)")
CACHE_HELP = "folder of the converted metric weights (default: $VOSR_METRICS_CACHE, else ~/.cache/vosr_metrics)"


class CLIParser(OneLineParser):
    """tools/cli.py's OneLineParser with evaluate.py's `prog: error: message` wording (as its other error lines)."""

    def error(self, message):
        super().error(f"error: {message}")


def listed(item):
    """argparse type: a comma list, each entry parsed (and checked) by `item`; e.g. listed(number(int, 1))."""
    def parse(text):
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        return values
    return parse


def one_of(*choices):
    """argparse type for a comma-list entry that must be one of `choices`."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def column(text):
    """argparse type of grid --sr: NAME=DIR -> (NAME, DIR)."""
    name, sep, folder = text.rpartition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def describe_defaults(parser):
    """Every option's help ends with its true default: '(default: X)' is appended where the help does not
    already state one (on/off flags are off; a default computed at run time must be described by hand)."""
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.nargs == 0 or a.required or not a.option_strings:
            continue  # --help, on/off flags, required flags, the subcommand
        if not a.help:
            a.help = f"one of {', '.join(map(str, a.choices))}" if a.choices else a.dest.replace("_", " ")
        if "default" not in a.help:
            shown_default = ",".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else a.default
            a.help += f" (default: {shown_default})".replace("%", "%%")
    return parser


def build_parser(metric_names) -> CLIParser:
    """evaluate.py's parser: its subcommand in `command`; --metrics lists `metric_names`."""
    ap = CLIParser(prog="evaluate.py", description="Image-quality metrics of the paper's Table 1 (offline). "
                               "`score` is the default subcommand.")
    sub = ap.add_subparsers(dest="command")
    sc = sub.add_parser("score", help="compare SR images with HR images (default)",
                        description="Compare a folder of SR images with the HR images of the same names. Metrics "
                                    "whose weights are not on this machine are named and skipped; the others are "
                                    "computed.")
    sc.add_argument("--sr", required=True, help="folder of super-resolved images")
    sc.add_argument("--hr", required=True, help="folder of ground-truth images; matched to --sr by file name")
    sc.add_argument("--metrics", default=EvalConfig.metrics,
                    help=f"comma list from {', '.join(metric_names)}; lpips = AlexNet LPIPS "
                         f"(default: {EvalConfig.metrics})")
    sc.add_argument("--crop", type=number(int, 0), default=EvalConfig.crop,
                    help=f"border pixels ignored by PSNR/SSIM, = SR scale (default: {EvalConfig.crop})")
    sc.add_argument("--csv", help="also write per-image values and the mean to this CSV file (default: none)")
    sc.add_argument("--device", default=DEFAULT_DEVICE, help="device for LPIPS/DISTS (default: cuda if available, "
                                                             f"else cpu; here {DEFAULT_DEVICE})")
    sc.add_argument("--cache", help=CACHE_HELP)
    sc.add_argument("--allow-skipped", action="store_true", help=ALLOW_SKIPPED_HELP)
    sw = sub.add_parser("sweep", help="guidance-scale sweep of a checkpoint (paper Fig. 4)")
    sw.add_argument("--ckpt", required=True, help="run dir of train_teacher.py / distill.py")
    sw.add_argument("--lr", required=True, help="folder of LR images")
    sw.add_argument("--hr", required=True, help="folder of HR images of the same names")
    sw.add_argument("--guidance", type=listed(number(float)), default=[-0.5, 0.0, 0.5, 1.0, 2.0],
                    help="comma list of guidance scales s (eq. 2) (default: -0.5,0,0.5,1,2)")
    sw.add_argument("--metrics", default=EvalConfig.sweep_metrics, help="comma list, as for score")
    sample_cli.add_sampler_args(sw, sample_cli.SampleConfig())  # --steps, --alpha, --schedule, --shift, … as sample.py
    sw.set_defaults(seed=None)  # --seed N is --seeds N; giving both is refused
    sw.add_argument("--seeds", type=listed(number(int, 0)),
                    help="comma list of noise seeds: every image is sampled once per seed and "
                         "scale (default: --seed's)")
    sw.add_argument("--crop", type=number(int, 0), default=EvalConfig.crop,
                    help="border pixels ignored by PSNR/SSIM")
    sw.add_argument("--out", help="also save the SR images to OUT/s<scale>/ (default: not saved)")
    sw.add_argument("--csv", help="write the table (one row per scale) here (default: none)")
    sw.add_argument("--per-image", help="write one row per image, scale and seed here, as "
                                        "`compare` reads them (default: none)")
    sw.add_argument("--allow-skipped", action="store_true", help=ALLOW_SKIPPED_HELP)
    sw.add_argument("--n", type=number(int, 1),
                    help="only the first N image pairs, by name (default: all)")
    sw.add_argument("--plot", default="sweep.png", help="PNG plot of each metric against s")
    sw.add_argument("--device", default=DEFAULT_DEVICE,
                    help=f"device of the model and the metrics (default: cuda if available, else cpu; here "
                         f"{DEFAULT_DEVICE})")
    sw.add_argument("--cache", help=CACHE_HELP)
    cp = sub.add_parser("compare", help="paired difference of two per-image CSVs, with intervals",
                        description="b - a per metric over the same images (and seeds): the mean "
                                    "difference, its 95 % percentile bootstrap interval over "
                                    "images, and the verdict of the rule in docs/ablations.md.")
    cp.add_argument("--a", required=True, metavar="CSV",
                    help="per-image CSV of result set a (score --csv, sweep --per-image)")
    cp.add_argument("--b", required=True, metavar="CSV",
                    help="per-image CSV of result set b, of the same images and seeds")
    for side in ("a", "b"):
        cp.add_argument(f"--{side}-guidance", type=number(float), metavar="S",
                        help=f"only {side}'s rows of this guidance scale (default: all)")
    cp.add_argument("--metrics", help="comma list (default: every metric both files have)")
    cp.add_argument("--expect", help="the paper's direction of b - a: lower, higher, better or "
                                     "worse, for every metric or as METRIC=DIRECTION,... (default: "
                                     "none; no verdict is then 'holds')")
    cp.add_argument("--resamples", type=number(int, 1), default=EvalConfig.resamples,
                    help="bootstrap resamples of the images")
    cp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resampling")
    cp.add_argument("--csv", help="also write the table of intervals here (default: none)")
    gr = sub.add_parser("grid", help="comparison grid: bicubic | SR folders | HR, with zoomed crops")
    gr.add_argument("--lr", required=True, help="folder of LR images")
    gr.add_argument("--hr", help="folder of HR images (default: none: photos upscaled as they are, "
                                 "no HR column; the first --sr folder gives the size)")
    gr.add_argument("--sr", type=column, action="append", default=[], metavar="NAME=DIR",
                    help="a column of SR images, repeatable (default: none, only bicubic and HR)")
    gr.add_argument("--images", help="comma list of image names (default: the first --n)")
    gr.add_argument("--n", type=number(int, 1), default=3, help="number of images (rows)")
    gr.add_argument("--out", default="grid.png", help="output PNG")
    for p in (ap, sc, sw, cp, gr):
        describe_defaults(p)
    return ap


def parse_args(ap: CLIParser, argv=None):
    """evaluate.py's arguments (`score` when no subcommand is named), or the exit code 2 after the help (no
    arguments) or a line naming the script a moved subcommand became."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        ap.print_help()
        return 2
    if argv[0] in MOVED:  # these were subcommands once
        print(f"evaluate.py: {argv[0]} is now its own script: python {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv.insert(0, "score")  # `python evaluate.py --sr A --hr B` means `score`
    # `--guidance -0.5,0,1` would read as an unknown option to argparse: glue the list to its flag
    argv = [f"--guidance={argv[i + 1]}" if a == "--guidance" and i + 1 < len(argv) else a
            for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "--guidance"]
    return ap.parse_args(argv)
