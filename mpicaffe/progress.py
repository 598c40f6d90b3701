"""Progress lines from a training job to `mpicaffe launch`, through mpirun's output.

When the supervisor starts a job it sets MPICAFFE_PROGRESS=1 (and has mpirun pass it on); rank 0
of the trainer then prints one line per event on stdout, `@mpicaffe <event> <json>`:

- `start`: the iteration the job starts at, its ranks and global batch, the snapshot it resumed
  from (null for a fresh start);
- `iteration`: an iteration completed (`iteration` is the solver's count after it).

Going through mpirun's output, they reach the supervisor wherever rank 0 runs, with no shared
file system. The supervisor reads them to log the iterations a failure lost and the time from
the failure to the first iteration the relaunched job completes; it does not echo them.
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
