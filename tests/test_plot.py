"""`mpicaffe plot`: learning curves read from real logs of `mpicaffe train` and real Caffe's
`caffe train`, from `--metrics` files, and a per-rank time breakdown of a real two-rank run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mpicaffe import cli, plot
from mpicaffe.errors import UserError
from tests.mpi_harness import run_mpi
from tests.real_caffe import caffe_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS, STEPSIZE, BASE_LR = 12, 4, 0.002
SOLVER = f"""net: "prototxt/digits/digits_train_val.prototxt"
test_iter: 1
test_interval: 5
type: "Adam"
base_lr: {BASE_LR}
momentum: 0.9
momentum2: 0.999
lr_policy: "step"
stepsize: {STEPSIZE}
gamma: 0.5
display: 1
max_iter: {ITERS}
snapshot_prefix: "snapshots/digits"
solver_mode: CPU
random_seed: 1
"""
# glog's newer year-prefixed lines under mpirun --tag-output; another rank's lines; two test nets
YEAR_PREFIXED = """\
[1,0]<stderr>:I20261205 21:47:30.000000 13341 solver.cpp:289] Solving LeNet
[1,0]<stderr>:I20261205 21:47:31.681437 13341 solver.cpp:218] Iteration 100 (12.5 iter/s, 8s/100 iters), loss = 0.2
[1,1]<stderr>:I20261205 21:47:31.681437 13342 solver.cpp:218] Iteration 100 (12.5 iter/s, 8s/100 iters), loss = 9
[1,0]<stderr>:I20261205 21:47:31.681500 13341 sgd_solver.cpp:105] Iteration 100, lr = 1e-05
[1,0]<stderr>:I20261205 21:47:32.000000 13341 solver.cpp:347] Iteration 200, Testing net (#0)
[1,0]<stderr>:I20261205 21:47:32.500000 13341 solver.cpp:414]     Test net output #0: accuracy = 0.97
[1,0]<stderr>:I20261205 21:47:32.500000 13341 solver.cpp:414]     Test net output #1: loss = 0.1 (* 1 = 0.1 loss)
[1,0]<stderr>:I20261205 21:47:33.000000 13341 solver.cpp:347] Iteration 200, Testing net (#1)
[1,0]<stderr>:I20261205 21:47:33.250000 13341 solver.cpp:414]     Test net output #0: accuracy = 0.5
[1,0]<stderr>:I20261205 21:47:34.000000 13341 solver.cpp:327] Iteration 200, loss = nan
"""
# the classic year-less form, across New Year
CLASSIC = """\
I1231 23:59:59.000000 100 solver.cpp:289] Solving LeNet
I1231 23:59:59.500000 100 solver.cpp:218] Iteration 0, loss = 2.5
I0101 00:00:01.000000 100 solver.cpp:218] Iteration 10, loss = 1.5
"""


def _mpicaffe(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "mpicaffe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The digits data and a 12-iteration solver with display 1, a test every 5 iterations and a
    step learning rate, and `mpicaffe train`'s log and metrics file for it."""
    cwd = tmp_path_factory.mktemp("plot")
    shutil.copytree(os.path.join(ROOT, "prototxt", "digits"), cwd / "prototxt" / "digits")
    assert _mpicaffe("convert", "digits", "--out", "data/digits", cwd=cwd).returncode == 0
    (cwd / "solver.prototxt").write_text(SOLVER)
    train = _mpicaffe("train", "--solver", "solver.prototxt", "--metrics", "metrics.jsonl", cwd=cwd)
    assert train.returncode == 0, train.stderr[-3000:]
    (cwd / "mpicaffe.log").write_text(train.stderr)
    return cwd


@pytest.fixture(scope="module")
def caffe_log(workdir):
    """Real Caffe's `caffe train` log of the same solver."""
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([caffe_tool("caffe"), "train", "--solver", "solver.prototxt"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir / "caffe.log").write_text(proc.stderr)
    return workdir / "caffe.log"


def _printed(pattern: str, log: str) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in re.findall(pattern, log)]


def _step_lr(iteration: int) -> float:
    return BASE_LR * 0.5 ** (iteration // STEPSIZE)


def _check_series_are_the_printed_values(path) -> dict:
    log = path.read_text()
    series = plot.parse_log(str(path))
    assert set(series) == {"train loss", "test accuracy", "test loss", "lr"}
    train = _printed(r"\] Iteration (\d+) \(.*?\), loss = (\S+)", log) + _printed(r"\] Iteration (\d+), loss = (\S+)", log)
    assert list(zip(series["train loss"].iterations, series["train loss"].values)) == train
    assert series["train loss"].iterations[:ITERS] == list(range(ITERS))
    tests = [int(i) for i in re.findall(r"Iteration (\d+), Testing net \(#0\)", log)]
    assert tests == [0, 5, 10]
    for name in ("accuracy", "loss"):
        values = [float(v) for v in re.findall(rf"Test net output #\d: {name} = (\S+)", log)]
        assert series[f"test {name}"].iterations == tests and series[f"test {name}"].values == values
    assert series["lr"].iterations == list(range(ITERS))
    assert series["lr"].values == pytest.approx([_step_lr(i) for i in range(ITERS)], rel=1e-6)
    seconds = series["train loss"].seconds
    assert seconds[0] >= 0 and seconds == sorted(seconds) and seconds[-1] < 120
    return series


def test_mpicaffe_log_gives_the_printed_values_and_agrees_with_its_metrics_file(workdir):
    series = _check_series_are_the_printed_values(workdir / "mpicaffe.log")
    metrics = plot.parse_metrics(str(workdir / "metrics.jsonl"))
    assert metrics["train loss"].iterations == list(range(ITERS))
    # display 1, average_loss 1: the log prints each iteration's loss, to 6 significant digits
    # (after them, as Caffe, the smoothed loss at the last iteration: `Iteration 12, loss = ...`)
    assert series["train loss"].values[:ITERS] == [float(f"{v:.6g}") for v in metrics["train loss"].values]
    assert metrics["lr"].values == pytest.approx(series["lr"].values, rel=1e-6)
    times = [json.loads(line)["time"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train loss"].seconds[-1] == pytest.approx(sum(times))


def test_real_caffe_log_gives_the_printed_values(caffe_log):
    series = _check_series_are_the_printed_values(caffe_log)
    assert series["train loss"].iterations == [*range(ITERS), ITERS]  # Caffe's last `Iteration 12, loss =`


def test_year_prefixed_tagged_lines_and_two_test_nets(tmp_path):
    (tmp_path / "new.log").write_text(YEAR_PREFIXED)
    series = plot.parse_log(str(tmp_path / "new.log"))
    loss = series["train loss"]
    assert (loss.iterations, loss.values[0], loss.seconds[0]) == ([100, 200], 0.2, pytest.approx(1.681437))
    assert loss.values[1] != loss.values[1]  # nan
    assert (series["lr"].values, series["test accuracy"].values, series["test loss"].values) == ([1e-5], [0.97], [0.1])
    assert series["test#1 accuracy"].iterations == [200] and series["test#1 accuracy"].seconds == [3.25]
    (tmp_path / "classic.log").write_text(CLASSIC)
    assert plot.parse_log(str(tmp_path / "classic.log"))["train loss"].seconds == [0.5, 2.0]


def test_several_runs_overlay_one_labelled_line_each_in_every_panel(workdir, caffe_log, tmp_path):
    files = [str(workdir / "mpicaffe.log"), str(caffe_log), str(workdir / "metrics.jsonl")]
    figure = plot.plot_files(files, str(tmp_path / "curves.png"))
    panels = [ax.get_ylabel() for ax in figure.axes]
    assert panels == ["train loss", "test accuracy", "test loss", "lr"]
    labels = ["mpicaffe.log", "caffe.log", "metrics.jsonl"]
    for ax in figure.axes:
        runs = labels if ax.get_ylabel() in ("train loss", "lr") else labels[:2]  # no tests in metrics
        assert [line.get_label() for line in ax.get_lines()] == runs
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == labels
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    figure = plot.plot_files(files[:2], str(tmp_path / "curves.svg"), labels=["ours", "Caffe"], x="seconds")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["ours", "Caffe"]
    assert figure.axes[-1].get_xlabel() == "seconds"
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:1000]


def test_breakdown_of_a_two_rank_run_stacks_each_ranks_mean_times(workdir, tmp_path):
    run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", "solver.prototxt", "--metrics", "two.jsonl"],
            cwd=str(workdir), timeout=180)
    files = [str(workdir / "two.jsonl"), str(workdir / "two.rank1.jsonl")]
    figure = plot.plot_files(files, str(tmp_path / "breakdown.pdf"), breakdown=True)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rank 0", "rank 1"]
    assert [bars.get_label() for bars in ax.containers] == ["compute", "data wait", "communication", "update"]
    records = [[json.loads(line) for line in lines] for lines in
               (workdir.joinpath(p).read_text().splitlines() for p in ("two.jsonl", "two.rank1.jsonl"))]
    assert [len(r) for r in records] == [ITERS, ITERS]
    for bars, key in zip(ax.containers, ("compute", "data_wait", "communication", "update")):
        assert [bar.get_height() for bar in bars] == pytest.approx([1e3 * sum(r[key] for r in rank) / ITERS
                                                                    for rank in records])
    totals = [sum(bars[rank].get_height() for bars in ax.containers) for rank in (0, 1)]
    assert totals == pytest.approx([1e3 * sum(r["time"] for r in rank) / ITERS for rank in records])
    assert (tmp_path / "breakdown.pdf").read_bytes()[:5] == b"%PDF-"


def test_user_errors_are_one_line_naming_the_file(workdir, tmp_path, capsys):
    (tmp_path / "empty.log").write_text("I1205 21:47:31.681437 1 caffe.cpp:197] Use CPU.\n")
    (tmp_path / "bare.log").write_text("Iteration 0, loss = 1\n")
    log, out = str(workdir / "mpicaffe.log"), str(tmp_path / "out.png")
    cases = [
        (["missing.log", "-o", out], "cannot read missing.log: No such file or directory"),
        ([str(tmp_path / "empty.log"), "-o", out], f"{tmp_path / 'empty.log'}: nothing to plot"),
        ([log, "-o", str(tmp_path / "out.nope")], "cannot write"),
        ([log, "-o", str(tmp_path / "no" / "such" / "out.png")], "cannot write"),
        ([log, "--label", "a", "--label", "b", "-o", out], "give one --label per file: 2 label(s) for 1 file(s)"),
        ([log, "--breakdown", "-o", out], f"{log} is not a metrics file"),
        ([str(tmp_path / "bare.log"), "--x", "seconds", "-o", out], "carry no glog timestamps"),
    ]
    for argv, message in cases:
        assert cli.main(["plot", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mpicaffe plot: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(UserError, match="not a line of"):
        (tmp_path / "bad.jsonl").write_text('{"iteration": 0, "loss": 1}\nnot json\n{"iteration": 1}\n')
        plot.parse_metrics(str(tmp_path / "bad.jsonl"))


def test_the_command_writes_the_image_and_imports_no_torch(workdir, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mpicaffe", "plot", "mpicaffe.log",
                           "metrics.jsonl", "-o", str(tmp_path / "curves.png")], cwd=workdir, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if "torch" in line]
    assert f"Plotted 2 file(s) to {tmp_path / 'curves.png'}" in proc.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
