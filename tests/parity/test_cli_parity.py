"""CLI parity: `mpicaffe test` and real `caffe test` score the bundled LeNet alike.

Data: `mpicaffe convert mnist --out DIR` in a temporary folder, the net's sources rewritten to it.
Weights: 30 iterations of Caffe's own training (lenet_solver.prototxt settings), so the scores
are far from chance. Both commands run as subprocesses on the same model, weights and iteration
count; every `Batch i, <output> = x` line and the summary lines (`Loss: x`, `<output> = x`, with
the loss weight note) must match in order, values within 2e-5 relative (both print 6 significant
digits; float32 sums may differ in the last bit before rounding).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mpicaffe import prototxt
from tests.parity.common import pycaffe
from tests.real_caffe import caffe_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATIONS = 4
LINE = re.compile(r"\] (Batch \d+, \S+ = \S+|Loss: \S+|\S+ = \S+(?: \(\* \S+ = \S+ loss\))?)\s*$")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|-?inf")


def score_lines(output: str) -> list[str]:
    """The score lines of a `caffe test` log (glog prefix dropped), in order, from 'Running for' on."""
    lines, started = [], False
    for raw in output.splitlines():
        if "Running for" in raw:
            started = True
            continue
        m = LINE.search(raw)
        if started and m:
            lines.append(m.group(1))
    return lines


def split_numbers(line: str) -> tuple[str, list[float]]:
    return NUMBER.sub("#", line), [float(x) for x in NUMBER.findall(line)]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """(model path, weights path) for LeNet on the converted MNIST subset."""
    caffe = pycaffe()
    from mpicaffe.backends.caffe import CaffeSolver
    from mpicaffe.cli import main

    tmp = tmp_path_factory.mktemp("lenet")
    assert main(["convert", "mnist", "--out", str(tmp / "mnist")]) == 0
    with open(os.path.join(ROOT, "prototxt/lenet/lenet_train_val.prototxt")) as f:
        text = f.read()
    assert text.count("data/mnist/") == 2
    model = tmp / "lenet_train_val.prototxt"
    model.write_text(text.replace("data/mnist/", f"{tmp}/mnist/"))
    param = prototxt.read_solver(os.path.join(ROOT, "prototxt/lenet/lenet_solver.prototxt"))
    param.net = str(model)
    param.snapshot_prefix = str(tmp / "lenet")
    for f in ("test_interval", "snapshot", "display"):
        param.ClearField(f)
    del param.test_iter[:]
    solver = CaffeSolver(str(tmp / "solver.prototxt"), param)
    solver.step(30)
    weights, _ = solver.snapshot()
    del solver, caffe
    return str(model), weights


def test_mpicaffe_test_reports_caffe_test_scores(lenet):
    model, weights = lenet
    caffe = caffe_tool("caffe")
    env = dict(os.environ, GLOG_minloglevel="0", OMP_NUM_THREADS="1")
    real = subprocess.run([caffe, "test", "-model", model, "-weights", weights, "-iterations", str(ITERATIONS)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert real.returncode == 0, real.stderr[-3000:]
    expected = score_lines(real.stdout + real.stderr)
    assert len(expected) == ITERATIONS * 2 + 3, expected  # accuracy and loss per batch; Loss, accuracy, loss

    ours = subprocess.run([sys.executable, "-m", "mpicaffe", "test", "--model", model, "--weights", weights,
                           "--iterations", str(ITERATIONS)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          check=False)
    assert ours.returncode == 0, ours.stderr[-3000:]
    got = score_lines(ours.stdout + ours.stderr)
    assert [split_numbers(x)[0] for x in got] == [split_numbers(x)[0] for x in expected], (
        "score lines differ:\nmpicaffe:\n" + "\n".join(got) + "\ncaffe:\n" + "\n".join(expected))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(split_numbers(g)[1], split_numbers(e)[1], rtol=2e-5, atol=1e-7,
                                   err_msg=f"mpicaffe: {g!r} vs caffe: {e!r}")
    accuracy = [split_numbers(x)[1][-1] for x in expected if x.startswith("accuracy")]
    assert accuracy and accuracy[0] > 0.5, "trained weights should score well above chance"
