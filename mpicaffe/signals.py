"""Signals as batch schedulers send them, and time-based snapshots, agreed on by every rank.

SIGTERM and SIGUSR1 (Slurm's `--signal`, the supervisor) ask for a snapshot and a stop; SIGINT
and SIGHUP do what Caffe's `--sigint_effect`/`--sighup_effect` say (snapshot, stop or none;
Caffe's defaults: SIGINT stops, SIGHUP snapshots). A handler only counts the signal. At each
iteration boundary the ranks sum their counts, together with rank 0's "the snapshot timer ran
out" (`--snapshot-every-minutes`), in one Allreduce of a few ints, so they all act on the same
iteration even when a signal reached only some of them or reached them at different times.

A run stopped this way exits with STOPPED_EXIT_CODE after its snapshot, so a batch script or
`mpicaffe launch` can tell "stopped on request, resume later" from a failure.

`mpicaffe train` counts signals from the moment its command line is parsed to its exit
(`catch()`), so a signal at any moment ends in a defined status:
- during start-up (MPI, torch, data, nets): the ranks agree before the first iteration and stop
  there, with no snapshot (nothing was trained), status STOPPED_EXIT_CODE;
- during training: the snapshot and stop above, STOPPED_EXIT_CODE;
- during the last iteration, the final snapshot or test, or MPI finalize: the run has finished;
  it completes as usual and exits 0, logging that the signal came too late to stop it.

Open MPI 5's mpirun forwards SIGUSR1 and SIGUSR2 to the ranks, but on SIGTERM, SIGINT or SIGHUP
it forwards SIGTERM and kills the ranks about 0.25 s later, too soon for a snapshot: signal
mpirun with SIGUSR1, or the ranks themselves (`srun` and Slurm's `--signal` do), or run under
`mpicaffe launch`, which turns SIGTERM and SIGINT into SIGUSR1 for mpirun.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

# the exit status of a run stopped by a signal (after its snapshot); BSD's EX_TEMPFAIL
STOPPED_EXIT_CODE = 75
EFFECTS = ("snapshot", "stop", "none")

# what each request asks for; the timer is rank 0's `--snapshot-every-minutes`
_SOURCES = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "timer")

# signals counted since the last iteration boundary (written by the handler only)
_counts = np.zeros(len(_SOURCES), np.int32)
_previous: dict[int, object] = {}


def _handle(signum, frame) -> None:
    # only count: the training loop acts at the next iteration boundary
    _counts[_SOURCES.index(signal.Signals(signum).name)] += 1


def catch() -> bool:
    """Count SIGTERM, SIGUSR1, SIGINT and SIGHUP from now on; False when already counting."""
    if _previous:
        return False
    for name in _SOURCES[:4]:
        signum = getattr(signal, name)
        _previous[signum] = signal.signal(signum, _handle)
    return True


def release() -> None:
    """Put back the handlers `catch()` replaced."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()


def take() -> np.ndarray:
    """The counts since the last call, and zero them."""
    counts = _counts.copy()
    _counts[:] = 0
    return counts


def pending() -> list[str]:
    """The signals counted since the last iteration boundary, by name."""
    return [name for name, count in zip(_SOURCES, _counts) if count]


def reached(point: str) -> None:
    """Fault injection for the tests: with MPICAFFE_SIGNAL_AT=POINT:SIGNAME[:RANK], this process
    sends itself SIGNAME when it reaches POINT (start, last-iteration, final-snapshot, exit)."""
    spec = os.environ.get("MPICAFFE_SIGNAL_AT", "").split(":")
    if spec[0] != point or len(spec) < 2:
        return
    if len(spec) == 3 and spec[2] != os.environ.get("OMPI_COMM_WORLD_RANK", "0"):
        return
    os.kill(os.getpid(), getattr(signal, spec[1]))


@dataclass
class Action:
    """What the ranks agreed to do at an iteration boundary, and why (for the log)."""

    snapshot: bool = False
    stop: bool = False
    reason: str = ""


class RunControl:
    """Signal handlers that count requests, and the per-iteration agreement on them.

    `install()` on every rank before training (`catch()`, unless the command already did);
    `at_boundary(iteration)` collectively before the first iteration and after each one;
    `uninstall()` afterwards.
    """

    def __init__(self, comm, sigint_effect: str = "stop", sighup_effect: str = "snapshot",
                 snapshot_every_minutes: float = 0.0):
        for flag, effect in (("--sigint-effect", sigint_effect), ("--sighup-effect", sighup_effect)):
            if effect not in EFFECTS:
                raise UserError(f"{flag} {effect}: must be one of {', '.join(EFFECTS)}")
        self.comm = comm
        self.effects = {"SIGTERM": "snapshot+stop", "SIGUSR1": "snapshot+stop", "SIGINT": sigint_effect,
                        "SIGHUP": sighup_effect, "timer": "snapshot"}
        self.interval = snapshot_every_minutes * 60.0
        self.last_snapshot = time.monotonic()
        self.owns_handlers = False

    def snapshot_written(self) -> None:
        """Restart the snapshot timer (any snapshot counts)."""
        self.last_snapshot = time.monotonic()

    def at_boundary(self, iteration: int) -> Action:
        """Collective: what every rank does now. Costs one Allreduce of five ints with several ranks."""
        counts = take()
        if self.interval and self.comm.rank == 0 and time.monotonic() - self.last_snapshot >= self.interval:
            counts[-1] = 1
        if self.comm.size > 1:
            self.comm.Allreduce_sum(counts)
        action = Action()
        reasons = []
        for name, count in zip(_SOURCES, counts):
            if not count:
                continue
            effect = self.effects[name]
            action.snapshot |= "snapshot" in effect
            action.stop |= "stop" in effect
            where = "" if name == "timer" or self.comm.size == 1 else f" on {count} rank(s)"
            reasons.append(f"{name}{where} ({effect})")
        action.reason = ", ".join(reasons)
        if reasons and self.comm.rank == 0:
            log.info("At iteration %d: %s", iteration, action.reason)
        return action

    def install(self) -> None:
        """Count signals from now on (`catch()`), unless the command already does."""
        self.owns_handlers = catch()

    def uninstall(self) -> None:
        """Put the previous handlers back if `install()` replaced them."""
        if self.owns_handlers:
            release()
            self.owns_handlers = False
