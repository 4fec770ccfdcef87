"""tools/experiment.py: every planned command is one its script accepts; an experiment runs end to
end into one folder, continues where it stopped and refuses a folder of another experiment."""
import importlib
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
import distill  # noqa: E402
import evaluate  # noqa: E402
import train_teacher  # noqa: E402
from tools import experiment as X  # noqa: E402
from tests.test_evaluate import one_thread, read_rows, tiny_run  # noqa: E402,F401 (fixtures)

PARSERS = {"train_teacher.py": train_teacher.parse_args, "distill.py": distill.parse_args,
           "evaluate.py": lambda argv: evaluate.parse_args(evaluate.build_parser(), argv)}


@pytest.mark.parametrize("recipe", sorted(X.RECIPES))
@pytest.mark.parametrize("name", sorted(X.EXPERIMENTS))
def test_every_planned_command_parses_with_its_script(name, recipe, tmp_path):
    """Each step's flags, read by the parser of the script it runs: none misspelt or mistyped."""
    steps = X.plan(name, X.RECIPES[recipe], tmp_path)
    assert len({s.name for s in steps}) == len(steps)  # the names mark what is done: unique
    for step in steps:
        args = PARSERS[step.argv[0]](step.argv[1:])
        if step.argv[0] == "evaluate.py":
            assert args.command in ("sweep", "compare")


def test_a_training_step_with_a_run_folder_resumes(tmp_path):
    step = X.Step("train_x", ["train_teacher.py", "--out", str(tmp_path / "run"), "--steps", "5"])
    assert "--resume" not in X.command_of(step, tmp_path)
    (tmp_path / "run").mkdir()
    assert X.command_of(step, tmp_path)[-1] == "--resume"


def in_process(ran):
    """experiment.execute for the tests: the script's main in this process (no new interpreter)."""
    def execute(command):
        script, argv = Path(command[1]).name, command[2:]
        ran.append(argv[0] if script == "evaluate.py" else script)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = importlib.import_module(script.removesuffix(".py")).main(argv)
        return code
    return execute


def test_fig4_runs_into_one_folder_and_continues_where_it_stopped(tiny_run, tmp_path, monkeypatch,
                                                                   capsys):
    ran = []
    monkeypatch.setattr(X, "execute", in_process(ran))
    out = tmp_path / "fig4"
    flags = ["fig4", "--out", str(out), "--teacher", str(tiny_run / "run"), "--val-lr",
             str(tiny_run / "lr"), "--val-hr", str(tiny_run / "hr"), "--sample-steps", "2",
             "--check-steps", "3", "--check-images", "2", "--metrics", "psnr"]
    assert X.main(flags) == 0
    assert ran == ["sweep"] + ["compare"] * 4 + ["sweep"] * 2
    commands = (out / "commands.sh").read_text().splitlines()
    assert len(commands) == 7 and commands[0].startswith("python evaluate.py sweep --ckpt")
    rows = read_rows(out / "intervals.csv")
    assert [r["comparison"] for r in rows] == ["s-0.5_vs_s1", "s0_vs_s1", "s0.5_vs_s1", "s2_vs_s1"]
    for r in rows:  # the collected table is each comparison's own
        (own,) = read_rows(out / "compare" / f"{r['comparison']}.csv")
        assert {k: v for k, v in r.items() if k != "comparison"} == own
        assert r["metric"] == "psnr" and r["expect"] == ("higher" if r["comparison"] == "s2_vs_s1"
                                                         else "lower")
    assert len((out / "log.txt").read_text().splitlines()) == 7
    orders = []
    for n in (2, 3):  # the two check sweeps, on the first 2 photos
        table = read_rows(out / f"check_{n}steps.sweep.csv")
        assert len(read_rows(out / f"check_{n}steps.images.csv")) == 5 * 2  # scales x photos
        values = np.array([float(r["psnr"]) for r in table])
        orders.append([table[i]["image"][2:] for i in np.argsort(values, kind="stable")])
    same = "the same order" if orders[0] == orders[1] else "another order"
    assert (out / "rank_check.txt").read_text() == (
        f"psnr: s by rising value at 2 steps {' < '.join(orders[0])}; at 3 steps "
        f"{' < '.join(orders[1])}: {same}\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "log.txt"}

    ran.clear()
    (out / ".done" / "compare_s2_vs_s1").unlink()  # as if stopped before the last step
    assert X.main(flags) == 0
    assert ran == ["compare"]
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 6
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert after == before

    ran.clear()
    assert X.main([*flags[:-2], "--metrics", "psnr,ssim"]) == 2  # other settings, same folder
    assert ran == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"experiment.py: error: {out} holds another experiment or other settings "
                   f"({out / 'experiment.json'}): choose another --out"]


def test_a_failed_step_stops_with_one_line_and_is_redone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(X, "execute", lambda command: 3)
    out = tmp_path / "t1"
    assert X.main(["table1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["experiment.py: error: step distill_rc_lr2e-5 failed (exit 3, its output "
                   "above); run the same command again to continue from it"]
    assert list((out / ".done").iterdir()) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert X.main(["fig4", "--out", str(tmp_path / "other")]) == 2
    assert "is not empty and holds no experiment.json" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
