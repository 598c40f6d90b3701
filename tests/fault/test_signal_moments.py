"""A signal at every moment of `mpicaffe train`, from start-up to exit, ends in a defined status.

Each case sends a real signal to the rank processes at one named moment (MPICAFFE_SIGNAL_AT,
mpicaffe.signals.reached) of a real `mpirun -np 2` job, or of one process:

| moment                                   | status | snapshot                         |
|------------------------------------------|--------|----------------------------------|
| start-up (before MPI, torch, nets)       | 75     | none: nothing was trained        |
| during training (tests/fault/test_launch) | 75     | at the iteration it stopped      |
| during the last iteration                | 0      | the final one, as without signal |
| during the final snapshot                | 0      | the final one, complete          |
| after training, before MPI finalize      | 0      | the final one                    |

Before this, a signal at start-up killed the rank (SIGUSR1: status 138; SIGINT: a traceback), and
one after the last iteration killed it too (the handlers were gone), so `mpicaffe launch` saw a
failure where the run had finished.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpicaffe import snapshot
from tests.mpi_harness import mpi_env, run_mpi

ITERS = 6


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "digits", "--out", str(folder)], check=True,
                   capture_output=True, timeout=300)
    return folder / "digits_train_lmdb"


def _solver(tmp_path, source) -> str:
    (tmp_path / "net.prototxt").write_text(
        f'layer {{ name: "data" type: "Data" top: "data" top: "label" data_param {{ source: "{source}" '
        'batch_size: 8 backend: LMDB } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: {ITERS}\n'
                    f'display: 1\nsnapshot_prefix: "{tmp_path / "s"}"\n')
    return str(path)


def _train(tmp_path, digits, at: str, ranks: int = 2, *flags: str):
    argv = ["python", "-m", "mpicaffe", "train", "--solver", _solver(tmp_path, digits), *flags]
    env = {"MPICAFFE_SIGNAL_AT": at}
    if ranks == 1:
        proc = subprocess.run([sys.executable, *argv[1:]], env=mpi_env(env), capture_output=True, text=True, check=False,
                              timeout=300)
        return proc.returncode, proc.stderr, proc.stderr
    result = run_mpi(ranks, argv, env=env, timeout=300, check=False)
    return result.returncode, result.rank_stderr(0), result.output


def _snapshots(tmp_path) -> list[int]:
    path = snapshot.manifest_path(str(tmp_path / "s"))
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [entry["iteration"] for entry in json.load(f)["snapshots"]]


@pytest.mark.parametrize("at, reason", [("start:SIGUSR1:1", "SIGUSR1 on 1 rank(s) (snapshot+stop)"),
                                        ("start:SIGTERM", "SIGTERM on 2 rank(s) (snapshot+stop)")])
def test_a_signal_during_start_up_stops_before_the_first_iteration(tmp_path, digits, at, reason):
    status, log, output = _train(tmp_path, digits, at)
    assert status == 75, output
    assert f"Stopped before the first iteration ({reason}): nothing to snapshot" in log
    assert "Iteration 0" not in log and "Optimization stopped early." in log
    assert _snapshots(tmp_path) == []


def test_sigint_during_start_up_of_one_process_stops_cleanly_not_with_a_traceback(tmp_path, digits):
    status, log, _ = _train(tmp_path, digits, "start:SIGINT", ranks=1)
    assert status == 75, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert "Stopped before the first iteration (SIGINT (stop))" in log


def test_sighup_during_start_up_snapshots_nothing_and_trains_on(tmp_path, digits):
    status, log, _ = _train(tmp_path, digits, "start:SIGHUP", ranks=1)
    assert status == 0, log
    assert "Optimization Done." in log and _snapshots(tmp_path) == [ITERS]


def test_a_stop_during_the_last_iteration_finishes_the_run(tmp_path, digits):
    status, log, output = _train(tmp_path, digits, "last-iteration:SIGUSR1")
    assert status == 0, output
    assert "The stop came with the last iteration: the run is finished" in log
    assert "Optimization Done." in log and f"Iteration {ITERS - 1}," in log
    assert _snapshots(tmp_path) == [ITERS]


@pytest.mark.parametrize("at", ["final-snapshot:SIGTERM", "exit:SIGUSR1", "exit:SIGINT:1"])
def test_a_signal_after_the_last_iteration_leaves_a_finished_run(tmp_path, digits, at):
    status, log, output = _train(tmp_path, digits, at)
    assert status == 0, output
    name = at.split(":")[1]
    assert f"{name} arrived after the last iteration: the run had finished, exiting with status 0" in output
    assert "Optimization Done." in log
    assert _snapshots(tmp_path) == [ITERS]
    assert os.path.getsize(f"{tmp_path}/s_iter_{ITERS}.caffemodel") > 0


def test_signal_exit_code_0_gives_caffes_status_for_a_stopped_run(tmp_path, digits):
    status, log, _ = _train(tmp_path, digits, "start:SIGTERM", 1, "--signal-exit-code", "0")
    assert status == 0, log
    assert "Optimization stopped early." in log
