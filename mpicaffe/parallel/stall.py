"""Stall detection without ULFM: a deadline on every collective, and a cheap way to name the rank
that stopped coming (`mpicaffe train --stall-timeout S`).

A rank that stops reaching collectives (hung I/O, a wedged node, a stopped process) leaves the
others waiting forever inside MPI. With a StallWatch on the communicator, every collective is
started non-blocking and its request polled; while polling, a rank also answers "are you there?"
queries on a private duplicate of the communicator. When a collective has not completed after
S seconds, the rank asks every other rank and waits a short grace period (`grace_seconds`) for
their answers: ranks that answer are alive and waiting too, the others are stalled. If the
collective completes meanwhile, training goes on.

Then each waiting rank logs which rank stalled and where (iteration, phase, the last collective
every rank finished); the lowest rank that answered (rank 0 when alive) writes a snapshot of the
last good state -- the weights and solver history as of the iteration being run, since the
update of an interrupted iteration is applied only after its gradient allreduce -- gives the
other waiting ranks a grace period to report too, and calls MPI_Abort with STALL_EXIT_CODE,
which takes the stalled rank down too and makes mpirun exit with that code, for a supervisor to
relaunch with `--resume`.

Cost while nothing stalls: one MPI_Test per poll of a pre-posted receive. The phase a report
names is the communicator's (Communicator.labelled), set by the code that runs the collectives.
"""
from __future__ import annotations

import atexit
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# mpirun's exit status when a rank stalled (MPI_Abort's code); the supervisor relaunches on it
STALL_EXIT_CODE = 76

_QUERY, _REPLY = 7301, 7302
_NO_REPLY = -2  # a reply is an iteration, or -1 before the first


@dataclass
class StallReport:
    """What a waiting rank found: who stalled, where the others wait, for how long."""

    rank: int
    stalled: list[int]
    alive: list[int]
    phase: str
    iteration: int | None
    waited: float
    last_done: str
    answers: dict[int, int] = field(default_factory=dict)  # alive rank -> the iteration it reported

    def message(self) -> str:
        at = f" (solver at iteration {self.iteration})" if self.iteration is not None else ""
        waiting = ", ".join(map(str, self.alive))
        if not self.stalled:
            return (f"no collective progress for {self.waited:.1f} s in the {self.phase}{at}, yet every rank "
                    f"answered (ranks {waiting}): the ranks are not running the same collectives")
        who = ", ".join(map(str, self.stalled))
        return (f"rank(s) {who} stalled: rank(s) {waiting} waited {self.waited:.1f} s for them in the "
                f"{self.phase}{at} and they did not answer; the last collective every rank finished was "
                f"the {self.last_done}")


class StallWatch:
    """Deadlines for the collectives of one communicator (see the module docstring).

    Built collectively (it duplicates `comm`). `iteration()` tells the report which iteration is
    running; `good_state()`, called on the lowest live rank when a stall is found, writes a
    snapshot and returns its description.
    """

    def __init__(self, comm, timeout: float, grace_seconds: float | None = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.timeout = float(timeout)
        self.grace = grace_seconds if grace_seconds is not None else min(5.0, max(1.0, self.timeout / 4))
        self.hb = comm.Dup()
        self.rank, self.size = self.hb.Get_rank(), self.hb.Get_size()
        self.iteration: Callable[[], int | None] = lambda: None
        self.phase: Callable[[], str] = lambda: "start-up"  # the communicator's phase (Communicator.labelled)
        self.good_state: Callable[[], str] | None = None
        self.last_done = "start-up"
        self._query = np.zeros(1, np.int64)
        self._query_req = self.hb.Irecv(self._query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self._status = MPI.Status()
        self._sends: list = []
        atexit.register(self.close)  # before mpi4py's MPI_Finalize, which runs after atexit handlers

    def close(self) -> None:
        """Withdraw the pending query receive (a pending receive must not outlive MPI)."""
        if self._query_req is not None:
            try:
                self._query_req.Cancel()
                self._query_req.Wait()
            except self.MPI.Exception:
                pass  # its communicator was revoked (ULFM): nothing is pending any more
            self._query_req = None

    def rebuilt(self, comm) -> StallWatch:
        """The same watch over `comm` (after a ULFM shrink); collective over `comm`."""
        self.close()
        watch = StallWatch(comm, self.timeout, self.grace)
        watch.iteration, watch.good_state, watch.phase = self.iteration, self.good_state, self.phase
        return watch

    # --- the hot path ---
    def wait(self, request) -> None:
        """Complete `request` (a non-blocking collective), answering queries while waiting; on a
        stall, report it and abort (does not return)."""
        if not request.Test():
            start = time.monotonic()
            deadline = start + self.timeout
            while not request.Test():
                self.answer()
                now = time.monotonic()
                if now > deadline and self._confirm_stall(request, now - start):
                    break
                if now - start > 0.002:
                    time.sleep(0.0002)  # the ranks share cores: do not spin on them for long waits
        self.last_done = self._where()

    def answer(self) -> None:
        """Reply to every pending "are you there?" query with this rank's iteration."""
        while self._query_req is not None and self._query_req.Test(self._status):
            reply = np.array([self._iteration_or(-1)], np.int64)
            self._sends.append((self.hb.Isend(reply, dest=self._status.Get_source(), tag=_REPLY), reply))
            self._query_req = self.hb.Irecv(self._query, source=self.MPI.ANY_SOURCE, tag=_QUERY)
        if self._sends:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    # --- a stall ---
    def _iteration_or(self, default: int) -> int:
        it = self.iteration()
        return default if it is None else int(it)

    def _where(self) -> str:
        it = self.iteration()
        return self.phase() + ("" if it is None else f" (solver at iteration {it})")

    def _confirm_stall(self, request, waited: float) -> bool:
        """Ask every other rank whether it is there; False if `request` completed meanwhile
        (no stall), otherwise report and abort."""
        others = [r for r in range(self.size) if r != self.rank]
        query = np.array([self.rank], np.int64)
        sends = [self.hb.Isend(query, dest=r, tag=_QUERY) for r in others]
        replies = {r: np.full(1, _NO_REPLY, np.int64) for r in others}
        receives = {r: self.hb.Irecv(replies[r], source=r, tag=_REPLY) for r in others}
        answered: set[int] = set()
        end = time.monotonic() + self.grace
        while time.monotonic() < end and len(answered) < len(others):
            if request.Test():
                for r in others:
                    if r not in answered:
                        receives[r].Cancel()
                return False
            self.answer()
            # a receive that completes without a reply in it (the job torn down by another rank's
            # abort) is no answer
            answered.update(r for r in others
                            if r not in answered and receives[r].Test() and replies[r][0] != _NO_REPLY)
            time.sleep(0.001)
        del sends  # tiny eager messages; an unanswered one is abandoned with the job
        report = StallReport(
            rank=self.rank, stalled=sorted(set(others) - answered), alive=sorted(answered | {self.rank}),
            phase=self.phase(), iteration=self.iteration(), waited=waited + self.grace,
            last_done=self.last_done, answers={r: int(replies[r][0]) for r in answered})
        self._stop(report)
        return True

    def _stop(self, report: StallReport) -> None:
        """Log the stall; the lowest live rank snapshots and aborts the job, the others keep
        answering until that abort takes them down (or abort themselves after a while)."""
        log.error("rank %d: %s", self.rank, report.message())
        if self.rank == min(report.alive):
            if self.good_state is not None and report.stalled:
                try:
                    log.error("rank %d: snapshot of the last good state: %s", self.rank, self.good_state())
                except Exception as e:  # noqa: BLE001 -- the abort below must still happen
                    log.error("rank %d: could not snapshot the last good state: %s", self.rank, e)
            # the other waiting ranks reach their own deadline a little later (they entered the
            # collective later) and report within a grace period of it: let them, then abort
            self._answer_for(self.grace)
            log.error("rank %d: aborting the job with exit code %d (stalled rank)", self.rank, STALL_EXIT_CODE)
            self.abort()
        self._answer_for(max(60.0, 2 * self.timeout))
        self.abort()

    def _answer_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.answer()
            time.sleep(0.01)

    def abort(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.hb.Abort(STALL_EXIT_CODE)


def watch_training(trainer) -> None:
    """Let `trainer.comm`'s stall watch (if any) name the iteration in its reports and snapshot
    the solver as the last good state: its weights and history are those at the start of the
    iteration being run, or at its end once the update is applied (the stall then is in a later
    collective), never half-updated."""
    watch = getattr(trainer.comm, "watch", None)
    if watch is None:
        return
    solver = trainer.solver

    def snapshot() -> str:
        return ", ".join(trainer.write_snapshot())  # the files and the manifest entry `--resume auto` reads

    watch.iteration = lambda: solver.iter
    watch.good_state = snapshot
