"""`mpicaffe launch` under real launchers, with a small net on the digits data set:

- a job that never completes an iteration is a configuration error, reported and not relaunched:
  mpirun refusing to start (more ranks than -H gives slots, no --oversubscribe), a bad --solver;
- ranks that talk over TCP alone (`--mca btl self,tcp`, no shared memory): the closest this
  machine comes to ranks on two nodes, and what the images' Open MPI settings must allow;
- `--launcher srun` in a one-node Slurm (scripts/setup_slurm.sh): a rank killed by SIGKILL is
  relaunched with `--resume auto`, SIGTERM to the supervisor reaches the ranks (through srun, as
  SIGUSR1) and they snapshot and stop; outside an allocation srun is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mpicaffe.data import datasets
from tests.mpi.test_train_mpi import _setup
from tests.mpi_harness import mpi_env


def _solver(tmp_path, max_iter=20, snapshot=0):
    x, y = datasets.load_digits()
    path = _setup(tmp_path, "tiny", x[:800], y[:800], 16, max_iter=max_iter)
    if snapshot:
        with open(path, "a") as f:
            f.write(f"snapshot: {snapshot}\n")
    return path


def _launch(argv, env=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", "launch", *argv], check=False, capture_output=True,
                          text=True, env=env or mpi_env(), timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_mpirun_refusing_to_start_is_a_configuration_error_and_not_retried(tmp_path):
    # one slot for two ranks: Open MPI's mpirun refuses before starting any
    status, log = _launch(["-np", "2", "--mpirun-args=-H localhost:1", "--max-restarts", "3", "--",
                           "train", "--solver", _solver(tmp_path)])
    assert status != 0, log
    assert "There are not enough slots available" in log
    assert "Configuration error: the job exited with status" in log and "not relaunching" in log, log
    assert "Launch 1 on 2 rank(s)" in log and "Launch 2" not in log, log


def test_a_bad_solver_path_is_not_retried(tmp_path):
    missing = str(tmp_path / "no_such_solver.prototxt")
    status, log = _launch(["-np", "2", "--mpirun-args=--oversubscribe", "--", "train", "--solver", missing])
    assert status == 1, log
    assert "Configuration error: the job exited with status 1" in log, log
    # the job's own error is among the last lines the supervisor repeats
    assert re.search(r"Its last lines of output:\n.*supervisor.py.*no_such_solver\.prototxt: solver file not found", log), log
    assert "Launch 2" not in log, log


def test_ranks_train_over_tcp_alone_without_shared_memory(tmp_path):
    solver = _solver(tmp_path)
    tcp = "--oversubscribe --mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include lo"
    status, log = _launch(["-np", "2", f"--mpirun-args={tcp}", "--", "train", "--solver", solver],
                          env=mpi_env({"OMPI_MCA_btl": "self,tcp"}))
    assert status == 0, log
    assert "The job finished (launch 1, 0 restart(s))" in log and "Iteration 20, loss" in log, log
    # the control: with neither shared memory nor TCP the ranks cannot reach each other, so the
    # run above did talk over TCP
    status, log = _launch(["-np", "2", "--mpirun-args=--oversubscribe --mca pml ob1 --mca btl self", "--",
                           "train", "--solver", solver], env=mpi_env({"OMPI_MCA_btl": "self"}))
    assert status != 0 and "Configuration error" in log, log


def _slurm_missing() -> str | None:
    if shutil.which("salloc") is None:
        return "no Slurm: run scripts/setup_slurm.sh (as root)"
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=30)
    if up.returncode != 0 or not re.search(r"idle|mix|alloc", up.stdout):
        return f"Slurm has no node up (sinfo: {(up.stdout + up.stderr).strip()}): run scripts/setup_slurm.sh"
    return None


def _pids(marker: str) -> dict[str, int]:
    """The pids of `mpicaffe launch` ("launch") and of its srun tasks ("rank 0", "rank 1", ...)
    whose command line holds `marker`."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
            if marker.encode() not in words or b"salloc" in words[0] or words[0].endswith(b"srun"):
                continue
            if b"launch" in words:
                found["launch"] = int(entry)
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                rank = [v for v in f.read().split(b"\0") if v.startswith(b"SLURM_PROCID=")]
            if rank:
                found[f"rank {rank[0].split(b'=')[1].decode()}"] = int(entry)
        except OSError:
            continue
    return found


def _salloc_launch(tmp_path, max_iter, snapshot):
    """`salloc -n 2 mpicaffe launch --launcher srun ...` of the small net, once it has trained 30
    iterations: (the salloc process, the solver, the output file, the events file)."""
    reason = _slurm_missing()
    if reason and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"Slurm is required in CI: {reason}")
    if reason:
        pytest.skip(reason)
    solver = _solver(tmp_path, max_iter=max_iter, snapshot=snapshot)
    metrics, events, output = tmp_path / "metrics.jsonl", tmp_path / "events.jsonl", tmp_path / "launch.out"
    argv = ["salloc", "--quiet", "-n", "2", sys.executable, "-m", "mpicaffe", "launch", "-np", "2", "--launcher", "srun",
            "--launcher-args=--mpi=pmix", "--events", str(events), "--", "train", "--solver", solver,
            "--metrics", str(metrics)]
    with open(output, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=mpi_env(), start_new_session=True)
    end = time.monotonic() + 120
    while time.monotonic() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 30):
        if proc.poll() is not None:
            pytest.fail(output.read_text())
        time.sleep(0.05)
    return proc, solver, output, events


def test_srun_outside_a_slurm_allocation_is_refused(tmp_path):
    env = {k: v for k, v in mpi_env().items() if not k.startswith("SLURM_")}
    status, log = _launch(["-np", "2", "--launcher", "srun", "--", "train", "--solver", "S"], env=env)
    assert status == 1 and "--launcher srun: not inside a Slurm allocation (SLURM_JOB_ID is not set)" in log, log


def test_srun_launcher_relaunches_a_killed_rank_with_resume_auto(tmp_path):
    proc, solver, output, events = _salloc_launch(tmp_path, max_iter=120, snapshot=20)
    try:
        os.kill(_pids(solver)["rank 1"], signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = output.read_text()
    assert proc.returncode == 0, log
    assert re.search(r"Fault detected at .*: srun exited with status \d+; failed rank\(s\): .*1 \(signal 9\)", log), log
    assert "--resume auto: resuming from" in log and "Recovered: relaunched on 2 rank(s)" in log, log
    assert re.search(r"Launch 2 on 2 rank\(s\): srun --ntasks 2 --kill-on-bad-exit=1 .* --resume auto", log), log
    [event] = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["signals"]["1"] == signal.SIGKILL and event["recovered"] and event["resumed_iteration"] >= 20, event


def test_sigterm_to_launch_under_srun_snapshots_and_stops_the_ranks(tmp_path):
    proc, solver, output, events = _salloc_launch(tmp_path, max_iter=5000, snapshot=0)
    try:
        os.kill(_pids(solver)["launch"], signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = output.read_text()
    assert proc.returncode == 75, log
    assert "Got SIGTERM: asking the job to snapshot and stop (SIGUSR1 to srun)" in log, log
    assert re.search(r"At iteration \d+: SIGUSR1 on 2 rank\(s\) \(snapshot\+stop\)", log), log
    assert "Stopped on SIGTERM: the job exited with status 75" in log and "Launch 2" not in log, log
    assert not events.exists()   # a stop on request is no fault
