"""Snapshots, `--resume auto`, signals and `mpicaffe launch` under real `mpirun` with the bundled
LeNet (shortened runs, same seeds; the data come from `mpicaffe convert mnist`):

- kill -9 one rank of three under `mpicaffe launch`: the job finishes, at most one snapshot
  interval is lost, and the final test accuracy (300 iterations, the full test set) is within 0.5
  points of a fault-free run with the same seeds; in fact every loss matches it;
- kill -9 rank 0 while it writes a snapshot: the manifest still names the previous complete one;
  truncated and bit-flipped snapshots are skipped, and `--resume auto` starts from the newest good
  one (on a different rank count, with the same global batch);
- SIGTERM to the ranks (as srun and Slurm send it): a snapshot at the current iteration, exit
  status 75, and resuming from it continues the same trajectory as an uninterrupted run; the
  same on the real-Caffe backend, with SIGTERM sent to `mpicaffe launch`.

Runs compared with an uninterrupted one use LeNet without its random crops and dropout, whose
random draws a resumed run does not replay (with them, two 300-iteration runs differed by 1.1
points of accuracy).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpicaffe import prototxt, snapshot
from tests.fault.rank_faults import BackgroundMPI, losses_by_iteration
from tests.mpi_harness import mpi_env, run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "mnist", "--out", str(folder)], check=True,
                   capture_output=True, timeout=600)
    return folder


def _lenet(folder, mnist, name, max_iter, snapshot_every=0, test_interval=0, deterministic=False):
    """The bundled LeNet solver and net, writing into `folder`; `deterministic` drops the random
    crops and dropout."""
    net = prototxt.read_net(os.path.join(ROOT, "prototxt/lenet/lenet_train_val.prototxt"))
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = str(mnist / os.path.basename(lp.data_param.source))
            if deterministic:
                lp.transform_param.ClearField("crop_size")
    if deterministic:
        keep = [lp for lp in net.layer if lp.type != "Dropout"]
        del net.layer[:]
        net.layer.extend(keep)
    net_path = folder / f"{name}_net.prototxt"
    prototxt.write_text(net, str(net_path))
    solver = prototxt.read_solver(os.path.join(ROOT, "prototxt/lenet/lenet_solver.prototxt"))
    solver.net = str(net_path)
    solver.max_iter, solver.snapshot, solver.display = max_iter, snapshot_every, 0
    solver.snapshot_prefix = str(folder / name)
    solver.snapshot_after_train = False
    if test_interval:
        solver.test_interval = test_interval
    else:
        for f in ("test_iter", "test_interval"):
            solver.ClearField(f)
    path = folder / f"{name}_solver.prototxt"
    prototxt.write_text(solver, str(path))
    return str(path)


def _accuracy(log: str) -> float:
    return [float(a) for a in re.findall(r"Test net output #0: accuracy = ([0-9.]+)", log)][-1]


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of MPI rank `rank` of the job whose command line holds `marker`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(entry)
        except OSError:
            continue
    return None


def _wait_lines(path, count, proc, timeout=600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"the job ended before {path} had {count} lines"
        if os.path.exists(path) and len(_text(path).splitlines()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {count} lines")


def _text(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _latest(prefix) -> int:
    return json.loads(_text(snapshot.manifest_path(str(prefix))))["latest"]["iteration"]


def _launch(argv, output, cwd):
    with open(output, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mpicaffe", "launch", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=mpi_env(), cwd=cwd, start_new_session=True)


def _finish(proc, output, timeout=900):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"mpicaffe launch did not finish in {timeout}s:\n{_text(output)}")
    return proc.returncode, _text(output)


def test_kill_9_one_rank_of_three_under_launch_loses_at_most_one_interval(tmp_path, mnist):
    iters, interval = 300, 100
    clean = _lenet(tmp_path, mnist, "clean", iters, interval, test_interval=iters, deterministic=True)
    clean_metrics = tmp_path / "clean.jsonl"
    result = run_mpi(3, ["python", "-m", "mpicaffe", "train", "--solver", clean, "--metrics", str(clean_metrics)],
                     timeout=900)
    clean_accuracy = _accuracy(result.rank_stderr(0))

    solver = _lenet(tmp_path, mnist, "faulty", iters, interval, test_interval=iters, deterministic=True)
    metrics = tmp_path / "faulty.jsonl"
    events = tmp_path / "events.jsonl"
    output = str(tmp_path / "launch.out")
    proc = _launch(["-np", "3", "--mpirun-args=--oversubscribe", "--events", str(events), "--",
                    "train", "--solver", solver, "--metrics", str(metrics)], output, str(tmp_path))
    try:
        _wait_lines(str(metrics).replace(".jsonl", ".rank1.jsonl"), 150, proc)
        victim = _rank_pid(solver, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        status, log = _finish(proc, output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert status == 0, log
    [event] = [json.loads(line) for line in _text(events).splitlines()]
    assert event["failed_ranks"] == [1] and event["signals"] == {"1": 9} and event["recovered"]
    assert event["resumed_iteration"] == 100 and 0 < event["iterations_lost"] <= interval, event
    assert re.search(r"Fault detected at .*failed rank\(s\): 1 \(signal 9\)", log)
    assert "--resume auto: resuming from" in log and "Recovered: relaunched on 3 rank(s), resumed at iteration 100" in log
    assert abs(_accuracy(log) - clean_accuracy) <= 0.005, (_accuracy(log), clean_accuracy)
    # the same seeds and the resumed data position: the relaunched job redid the fault-free run's iterations
    got, want = losses_by_iteration(metrics), losses_by_iteration(clean_metrics)
    assert sorted(got) == list(range(iters))
    np.testing.assert_allclose([got[i] for i in range(iters)], [want[i] for i in range(iters)], rtol=1e-5, atol=1e-6)


def test_kill_9_during_a_snapshot_write_keeps_the_previous_one_and_corrupt_ones_are_skipped(tmp_path, mnist):
    solver = _lenet(tmp_path, mnist, "lenet", 80, snapshot_every=10)
    job = BackgroundMPI(3, ["python", "-m", "mpicaffe", "train", "--solver", solver], str(tmp_path / "a.out"))
    try:
        rank0 = None
        end = time.monotonic() + 600
        writing = None
        while writing is None and time.monotonic() < end and job.proc.poll() is None:
            rank0 = rank0 or _rank_pid(solver, 0)
            for name in os.listdir(tmp_path):
                m = re.match(r"\.lenet_iter_(\d+)\.(caffemodel|solverstate)\..*\.partial$", name)
                if m and int(m.group(1)) >= 40 and rank0:
                    os.kill(rank0, signal.SIGKILL)
                    writing = int(m.group(1)), m.group(2)
                    break
            time.sleep(0.0005)
        assert writing, f"no snapshot write was caught:\n{job.text()}"
        result = job.finish()
    finally:
        job.kill()
    assert result.returncode != 0
    at, kind = writing
    prefix = str(tmp_path / "lenet")
    # the manifest names the previous complete snapshot; the one being written is not listed
    data = json.loads(_text(snapshot.manifest_path(prefix)))
    assert data["latest"]["iteration"] == at - 10, (writing, data["latest"])
    assert at not in [r["iteration"] for r in data["snapshots"]]
    if kind == "caffemodel":
        assert not os.path.exists(f"{prefix}_iter_{at}.caffemodel")   # no half-written file under its name

    # the newest complete one truncated, the one before bit-flipped: both skipped with a warning
    with open(f"{prefix}_iter_{at - 10}.caffemodel", "r+b") as f:
        f.truncate(1000)
    with open(f"{prefix}_iter_{at - 20}.solverstate", "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 0x10]))
    resumed = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--resume", "auto",
                          "--global-batch", "192"], timeout=900)
    log = resumed.rank_stderr(0)
    assert f"Skipping the snapshot at iteration {at - 10}: {prefix}_iter_{at - 10}.caffemodel does not match" in log
    assert f"Skipping the snapshot at iteration {at - 20}: {prefix}_iter_{at - 20}.solverstate does not match" in log
    assert (f"--resume auto: resuming from {prefix}_iter_{at - 30}.solverstate (iteration {at - 30}, written by 3 "
            "rank(s) with global batch 192)") in log
    assert _latest(prefix) == 80


def test_sigterm_snapshots_the_current_iteration_and_resuming_continues_the_trajectory(tmp_path, mnist):
    iters = 60
    ref = _lenet(tmp_path, mnist, "ref", iters, deterministic=True)
    ref_metrics = tmp_path / "ref.jsonl"
    run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", ref, "--metrics", str(ref_metrics)], timeout=900)

    solver = _lenet(tmp_path, mnist, "run", iters, deterministic=True)
    metrics = tmp_path / "run.jsonl"
    argv = ["python", "-m", "mpicaffe", "train", "--solver", solver, "--metrics", str(metrics)]
    job = BackgroundMPI(2, argv, str(tmp_path / "run.out"))
    try:
        job.wait_for_lines(str(metrics), 25)
        for rank in (0, 1):                       # as srun delivers a scheduler's SIGTERM
            job.signal_rank(rank, signal.SIGTERM)
        result = job.finish()
    finally:
        job.kill()
    assert result.returncode == 75, result.output
    log = result.rank_stderr(0)
    assert "Optimization stopped early." in log
    # the two signals can straddle an iteration boundary: the ranks act on whichever arrived first
    assert re.search(r"SIGTERM on [12] rank\(s\) \(snapshot\+stop\)", log), log
    stopped = _latest(tmp_path / "run")
    assert stopped == len(losses_by_iteration(metrics)) and 25 <= stopped < iters    # the iteration it stopped at
    assert os.path.exists(tmp_path / f"run_iter_{stopped}.solverstate")

    run_mpi(2, argv + ["--resume", "auto"], timeout=900)
    got, want = losses_by_iteration(metrics), losses_by_iteration(ref_metrics)
    assert sorted(got) == list(range(iters))
    np.testing.assert_allclose([got[i] for i in range(iters)], [want[i] for i in range(iters)], rtol=1e-5, atol=1e-6)


def test_caffe_backend_sigterm_to_launch_then_resume_auto(tmp_path, mnist):
    from tests.real_caffe import import_pycaffe

    import_pycaffe()
    iters = 40
    ref = _lenet(tmp_path, mnist, "ref", iters, deterministic=True)
    ref_metrics = tmp_path / "ref.jsonl"
    caffe = ["--backend", "caffe", "--shard-cache", str(tmp_path / "shards")]
    run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", ref, "--metrics", str(ref_metrics), *caffe],
            timeout=900)

    solver = _lenet(tmp_path, mnist, "run", iters, deterministic=True)
    metrics = tmp_path / "run.jsonl"
    output = str(tmp_path / "launch.out")
    train = ["train", "--solver", solver, "--metrics", str(metrics), *caffe]
    proc = _launch(["-np", "2", "--mpirun-args=--oversubscribe", "--", *train], output, str(tmp_path))
    try:
        _wait_lines(str(metrics), 10, proc)
        proc.send_signal(signal.SIGTERM)          # the supervisor asks the ranks to snapshot and stop
        status, log = _finish(proc, output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Got SIGTERM: asking the job to snapshot and stop" in log
    stopped = _latest(tmp_path / "run")
    # the signal may land after the last iteration (40 are quick): then the run is finished and
    # exits 0 (tests/fault/test_signal_moments.py); otherwise it snapshots where it stopped
    if status == 0:
        assert stopped == iters, log
        assert ("arrived after the last iteration: the run had finished" in log
                or "The stop came with the last iteration: the run is finished" in log), log
    else:
        assert status == 75, log
        assert "SIGUSR1 on 2 rank(s)" in log
        assert 10 <= stopped < iters and stopped == len(losses_by_iteration(metrics))

    resumed = run_mpi(2, ["python", "-m", "mpicaffe", *train, "--resume", "auto"], timeout=900)
    assert f"--resume auto: resuming from {tmp_path}/run_iter_{stopped}.solverstate" in resumed.rank_stderr(0)
    got, want = losses_by_iteration(metrics), losses_by_iteration(ref_metrics)
    assert sorted(got) == list(range(iters))
    np.testing.assert_allclose([got[i] for i in range(iters)], [want[i] for i in range(iters)], rtol=1e-5, atol=1e-6)
