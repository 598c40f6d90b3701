"""Progress lines from a training job to `mpicaffe launch`, through mpirun's output.

When the supervisor starts a job it sets MPICAFFE_PROGRESS=1 (and has mpirun pass it on); rank 0
of the trainer then prints one line per event on stdout, `@mpicaffe <event> <json>`:

- `start`: the iteration the job starts at, its ranks and global batch, the snapshot it resumed
  from (null for a fresh start);
- `iteration`: an iteration completed (`iteration` is the solver's count after it).

Going through mpirun's output, they reach the supervisor wherever rank 0 runs, with no shared
file system. The supervisor reads them to log the iterations a failure lost and the time from
the failure to the first iteration the relaunched job completes; it does not echo them.

`bar_stream()` says where rank 0 draws its progress bar for a person watching: on its stderr
when that is a terminal; under mpirun, whose ranks' stdout is a pseudo-terminal even when
mpirun's output goes to a file, on stdout when mpirun (an ancestor process on this node) writes
both its stdout and stderr to one terminal. Otherwise no bar is drawn.
"""
from __future__ import annotations

import json
import os
import sys
import time

PROGRESS_ENV = "MPICAFFE_PROGRESS"
MARKER = "@mpicaffe "


def enabled() -> bool:
    return os.environ.get(PROGRESS_ENV) == "1"


def report(event: str, **fields) -> None:
    """Print one progress line (rank 0, when enabled); `time` is added (seconds since the epoch)."""
    fields["time"] = time.time()
    sys.stdout.write(f"{MARKER}{event} {json.dumps(fields)}\n")
    sys.stdout.flush()


_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "orterun")


def bar_stream():
    """The stream rank 0 draws its progress bar on, or None (see the module docstring)."""
    if os.environ.get(PROGRESS_ENV) == "1":  # under `mpicaffe launch`: stdout carries the events
        return None
    if sys.stderr.isatty():
        return sys.stderr
    if sys.stdout.isatty() and _launcher_terminal() is not None:
        return sys.stdout
    return None


def _launcher_terminal(pid: int | None = None) -> str | None:
    """The terminal mpirun writes both its stdout and stderr to, when mpirun is an ancestor of
    this process on this node; None otherwise."""
    pid = os.getppid() if pid is None else pid
    for _ in range(16):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if name in _LAUNCHERS:
                out, err = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2))
                return out if out == err and out.startswith(("/dev/pts/", "/dev/tty")) else None
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def parse(line: str) -> tuple[str, dict] | None:
    """(event, fields) of a progress line, possibly after an mpirun output tag; None otherwise."""
    at = line.find(MARKER)
    if at < 0:
        return None
    event, _, payload = line[at + len(MARKER):].strip().partition(" ")
    try:
        return event, json.loads(payload)
    except ValueError:
        return None
