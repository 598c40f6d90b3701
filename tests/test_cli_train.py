"""`mpicaffe train|test|time` on the bundled models, from the command line, single process.

Training the bundled nets to their accuracy targets takes a minute or two each; they run in CI
as the acceptance of the built-in engine.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd, timeout=900, threads="1"):
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stderr


def _workdir(tmp_path, model, dataset):
    shutil.copytree(os.path.join(ROOT, "prototxt", model), tmp_path / "prototxt" / model)
    _cli("convert", dataset, "--out", f"data/{dataset}", cwd=tmp_path)
    return tmp_path


def _test_scores(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"Test net output #0: accuracy = ([0-9.]+)", log)]


def test_digits_net_trains_to_95_percent_then_scores_and_times(tmp_path):
    cwd = _workdir(tmp_path, "digits", "digits")
    log = _cli("train", "--solver", "prototxt/digits/digits_solver.prototxt", cwd=cwd)
    scores = _test_scores(log)
    assert len(scores) == 7 and scores[-1] >= 0.95, scores
    assert re.search(r"Iteration 50 \([0-9.]+ iter/s, [0-9.]+s/50 iters\), loss = [0-9.]+", log)
    assert "Train net output #0: loss = " in log and "Optimization Done." in log
    weights = "examples_out/digits/digits_iter_600.caffemodel"
    assert (cwd / weights).exists() and (cwd / "examples_out/digits/digits_iter_600.solverstate").exists()

    log = _cli("test", "--model", "prototxt/digits/digits_train_val.prototxt", "--weights", weights,
               "-iterations", "3", cwd=cwd)
    final = float(re.search(r"\] accuracy = ([0-9.]+)", log).group(1))
    assert final == pytest.approx(scores[-1], abs=1e-6)   # same weights, same 300 test images
    assert len(re.findall(r"Batch \d, accuracy = ", log)) == 3 and "Loss: " in log
    assert re.search(r"\] loss = [0-9.]+ \(\* 1 = [0-9.]+ loss\)", log)

    log = _cli("time", "--model", "prototxt/digits/digits_train_val.prototxt", "--iterations", "3", cwd=cwd)
    assert re.search(r"conv1\tforward: [0-9.e-]+ ms\.", log) and re.search(r"conv1\tbackward: [0-9.e-]+ ms\.", log)
    assert "Average Forward-Backward:" in log and "*** Benchmark ends ***" in log


def test_resume_from_snapshot_continues_the_same_trajectory(tmp_path):
    cwd = _workdir(tmp_path, "digits", "digits")
    solver = cwd / "prototxt/digits/digits_solver.prototxt"
    text = solver.read_text().replace("max_iter: 600", "max_iter: 40").replace("snapshot: 300", "snapshot: 20")
    solver.write_text(text.replace("display: 50", "display: 1").replace("test_interval: 100", "test_interval: 1000"))
    full = _cli("train", "--solver", str(solver), cwd=cwd)
    resumed = _cli("train", "--solver", str(solver), "--snapshot", "examples_out/digits/digits_iter_20.solverstate",
                   cwd=cwd)

    def losses(log, first):
        # display 1 and average_loss 1: each iteration's line carries that iteration's loss
        pairs = re.findall(r"Iteration (\d+) \(.*?\), loss = ([0-9.e-]+)", log)
        return {int(i): v for i, v in pairs if int(i) >= first}

    after_full, after_resume = losses(full, 20), losses(resumed, 20)
    assert sorted(after_resume) == list(range(20, 40))
    assert after_resume == {i: after_full[i] for i in after_resume}   # exactly the same losses


@pytest.mark.skipif(os.environ.get("MPICAFFE_SKIP_LONG") == "1", reason="MPICAFFE_SKIP_LONG=1")
def test_lenet_trains_to_97_percent(tmp_path):
    cwd = _workdir(tmp_path, "lenet", "mnist")
    log = _cli("train", "--solver", "prototxt/lenet/lenet_solver.prototxt", cwd=cwd, timeout=1800)
    scores = _test_scores(log)
    assert scores[-1] >= 0.97, scores
