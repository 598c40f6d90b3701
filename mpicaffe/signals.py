"""Signals as batch schedulers send them, and time-based snapshots, agreed on by every rank.

SIGTERM and SIGUSR1 (Slurm's `--signal`, the supervisor) ask for a snapshot and a stop; SIGINT
and SIGHUP do what Caffe's `--sigint_effect`/`--sighup_effect` say (snapshot, stop or none;
Caffe's defaults: SIGINT stops, SIGHUP snapshots). A handler only counts the signal. At each
iteration boundary the ranks sum their counts, together with rank 0's "the snapshot timer ran
out" (`--snapshot-every-minutes`), in one Allreduce of a few ints, so they all act on the same
iteration even when a signal reached only some of them or reached them at different times.

A run stopped this way exits with STOPPED_EXIT_CODE after its snapshot, so a batch script or
`mpicaffe launch` can tell "stopped on request, resume later" from a failure.

Open MPI 5's mpirun forwards SIGUSR1 and SIGUSR2 to the ranks, but on SIGTERM, SIGINT or SIGHUP
it forwards SIGTERM and kills the ranks about 0.25 s later, too soon for a snapshot: signal
mpirun with SIGUSR1, or the ranks themselves (`srun` and Slurm's `--signal` do), or run under
`mpicaffe launch`, which turns SIGTERM and SIGINT into SIGUSR1 for mpirun.
"""
from __future__ import annotations

import logging
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


@dataclass
class Action:
    """What the ranks agreed to do at an iteration boundary, and why (for the log)."""

    snapshot: bool = False
    stop: bool = False
    reason: str = ""


class RunControl:
    """Signal handlers that count requests, and the per-iteration agreement on them.

    `install()` on every rank before training; `at_boundary(iteration)` collectively after each
    iteration; `uninstall()` afterwards puts the previous handlers back.
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
        self.counts = np.zeros(len(_SOURCES), np.int32)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for name in _SOURCES[:4]:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # only count: the training loop acts at the next iteration boundary
        self.counts[_SOURCES.index(signal.Signals(signum).name)] += 1

    def snapshot_written(self) -> None:
        """Restart the snapshot timer (any snapshot counts)."""
        self.last_snapshot = time.monotonic()

    def at_boundary(self, iteration: int) -> Action:
        """Collective: what every rank does now. Costs one Allreduce of five ints with several ranks."""
        counts, self.counts = self.counts, np.zeros(len(_SOURCES), np.int32)
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
