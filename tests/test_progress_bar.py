"""Rank 0's progress bar (mpicaffe.progress.bar_stream, mpicaffe.logs.progress_bar): drawn with rate
and time left when a person watches a terminal, alone or under `mpirun`, with the log lines
printed above it and never glued to it; not drawn into files.

A real terminal comes from util-linux's `script`, which runs the command on a pseudo-terminal
(given 120 columns: tqdm draws nothing on a 0-column one) and records everything written to it.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.mpi_harness import mpi_env
from tests.test_cli import DUMMY_NET

GLOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} ")
BAR = re.compile(r"\d+%\|[^|\r\n]*\| *\d+/300 \[[0-9:]+<[0-9:]+, +[0-9.]+iter/s, loss [0-9.e-]+\]")


def _setup(tmp_path) -> str:
    (tmp_path / "net.prototxt").write_text(DUMMY_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 300\ndisplay: 100\n'
        f'snapshot_prefix: "{tmp_path / "s"}"\n')
    return str(tmp_path / "solver.prototxt")


def _on_a_terminal(tmp_path, command: list[str]) -> str:
    if shutil.which("script") is None:
        pytest.fail("util-linux's `script` is missing (apt-get install bsdutils)")
    record = tmp_path / "typescript"
    inner = "stty cols 120 rows 40; " + shlex.join(command)
    subprocess.run(["script", "-qec", inner, str(record)], env=mpi_env(), stdout=subprocess.DEVNULL,
                   timeout=300, check=True)
    return record.read_bytes().decode(errors="replace")


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: a carriage return moves back to column 0 and what
    follows overwrites what was there."""
    lines = []
    for raw in text.split("\n"):
        shown: list[str] = []
        for chunk in raw.split("\r"):
            shown[:len(chunk)] = chunk
        lines.append("".join(shown).rstrip())
    return lines


def _check_bar_and_lines(text: str) -> None:
    assert BAR.search(text), text[-2000:]
    screen = _screen(text)
    bars = [i for i, line in enumerate(screen) if BAR.search(line)]
    logged = [line for line in screen if GLOG_LINE.search(line)]
    last_log = max(i for i, line in enumerate(screen) if GLOG_LINE.search(line))
    assert len(bars) == 1 and bars[0] > last_log and "300/300" in screen[bars[0]]  # the finished bar stays, last
    assert len(logged) > 10 and any("Optimization Done." in line for line in logged)
    for line in logged:  # each log line starts its own line, with no bar before or after it
        assert GLOG_LINE.match(line) and not BAR.search(line), line


def test_one_process_on_a_terminal_draws_the_bar_with_the_log_above_it(tmp_path):
    _check_bar_and_lines(_on_a_terminal(tmp_path, [sys.executable, "-m", "mpicaffe", "train", "--solver",
                                                   _setup(tmp_path)]))


def test_under_mpirun_on_a_terminal_the_rank_draws_it(tmp_path):
    text = _on_a_terminal(tmp_path, ["mpirun", "-np", "1", sys.executable, "-m", "mpicaffe", "train", "--solver",
                                     _setup(tmp_path)])
    _check_bar_and_lines(text)


def test_under_mpirun_into_files_no_bar_is_drawn(tmp_path):
    # the ranks' stdout is a pseudo-terminal even then: mpirun's own output decides
    solver = _setup(tmp_path)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        subprocess.run(["mpirun", "-np", "1", sys.executable, "-m", "mpicaffe", "train", "--solver", solver],
                       env=mpi_env(), stdout=out, stderr=err, timeout=300, check=True)
    for name in ("out", "err"):
        text = (tmp_path / name).read_text()
        assert "iter/s]" not in text and "\r" not in text
    assert "Optimization Done." in (tmp_path / "err").read_text()
