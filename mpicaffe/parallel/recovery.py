"""In-run recovery from rank failures with ULFM (`mpicaffe train --fault-tolerance ulfm`, under
`mpirun --with-ft ulfm`).

The communicator returns errors instead of aborting, so a rank's death surfaces on the others as
an MPI exception inside whatever collective they are in: the gradient allreduce, a test sum,
the display average, the weights checksum. The survivors then

1. revoke and shrink the communicator (the failed ranks are dropped, the rest renumbered in
   their old order, so rank 0's duties -- the log, snapshots -- move to the lowest survivor);
2. go back to the recovery state (TrainingState: iteration, lr step, weights, solver history),
   committed by every rank at the start of each iteration: `restore()` to its own commit, then
   `sync()` to the newest commit of any survivor. A failure can let some ranks finish an
   iteration's allreduce (and apply its update) while others see the error, so survivors may be
   one iteration apart; the newest commit holds a complete iteration, so it is the one kept and
   broadcast, and only the interrupted iteration is redone;
3. split the original global batch over the survivors (plan_batches) and re-shard the data:
   each rank reads its new shard from where a fresh run on that many ranks, resumed at the
   agreed iteration with `--global-batch`, would read (sharding.batches_read), so the rest of
   the run is that run;
4. write a snapshot of the agreed state (the new rank 0), for a relaunch should the job still
   die later, and go on. No snapshot is read and no process restarts.

The real-Caffe backend is not supported: pycaffe's Net fixes each Data layer's batch size and
reader when it is built, so survivors could neither take their larger share of the global batch
nor move to their new shard without rebuilding their solver.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from mpicaffe.data.sharding import plan_batches
from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import Communicator, RankError, failed_phase

log = logging.getLogger(__name__)


class TrainingState:
    """What ULFM recovery returns to, in one place (Horovod's elastic state): the iteration,
    Caffe's current_step, the flat weights and the flat solver history of an engine solver.

    `commit()` copies them aside (at each iteration start), `restore()` puts this rank's copy
    back, `sync(comm)` makes every rank hold the newest commit of any rank.
    """

    def __init__(self, solver):
        self.solver = solver
        self.iter = solver.iter
        self.current_step = solver.current_step
        self.weights = solver.net.flat_data.detach().clone()
        self.history = [h.detach().clone() for h in solver.history]

    def commit(self) -> None:
        """Remember the solver's state as the one to return to (a copy of its flat buffers)."""
        s = self.solver
        self.iter, self.current_step = s.iter, s.current_step
        with torch.no_grad():
            self.weights.copy_(s.net.flat_data)
            for saved, h in zip(self.history, s.history):
                saved.copy_(h)

    def restore(self) -> None:
        """Put the last commit back into the solver."""
        s = self.solver
        s.iter, s.current_step = self.iter, self.current_step
        with torch.no_grad():
            s.net.flat_data.copy_(self.weights)
            for saved, h in zip(self.history, s.history):
                h.copy_(saved)

    def sync(self, comm: Communicator) -> int:
        """Collective: adopt the newest commit of any rank (the lowest rank holding it sends it),
        restore it, and return its iteration."""
        with comm.labelled("recovery state broadcast"):
            commits = comm.allgather(self.iter)
            newest = max(commits)
            root = commits.index(newest)
            for t in (self.weights, *self.history):
                comm.Bcast_tensor(t, root=root)
            self.iter, self.current_step = comm.bcast((self.iter, self.current_step), root=root)
        self.restore()
        return newest


def ulfm_enabled() -> bool:
    """True when Open MPI was started with ULFM (`mpirun --with-ft ulfm` sets mpi_ft_enable)."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes", "enabled")


def prepare(cfg, backend: str, comm: Communicator) -> None:
    """Before the trainer is built: refuse what recovery cannot handle (TrainConfig.check, on
    the resolved `backend`), and make MPI errors raise."""
    try:
        cfg.check(backend, comm.size)
    except UserError as e:
        # the same on every rank: each exits with status 1 rather than all calling MPI_Abort at
        # once, which Open MPI's ULFM mode does not reliably turn into a failed job
        raise RankError(str(e), comm.rank) from None
    if comm.size > 1 and not ulfm_enabled() and comm.rank == 0:
        log.warning("--fault-tolerance ulfm: this job was not started with `mpirun --with-ft ulfm`; a rank "
                    "failure will end it")
    comm.return_errors()


def _is_process_failure(error: BaseException) -> bool:
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    if not isinstance(error, MPI.Exception):
        return False
    return error.Get_error_class() in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)


def run(trainer) -> None:
    """Run `trainer` to the end, recovering from rank failures as the module docstring says."""
    state = TrainingState(trainer.solver)
    while True:
        try:
            trainer.run(recovery=state)
            return
        except Exception as e:
            if not _is_process_failure(e):
                raise
            recover(trainer, state, e)


def recover(trainer, state: TrainingState, error: BaseException) -> None:
    """Shrink to the survivors, agree on the state, re-plan the batch and the shards, snapshot."""
    detected = time.perf_counter()
    comm = trainer.comm
    where = failed_phase(error, comm.phase)
    at = state.iter  # the iteration in progress: committed at its start
    log.warning("rank %d: a rank failed (%s) during the %s at iteration %d; recovering",
                comm.world_ranks[comm.rank], error, where, at)
    failed: list[int] = []
    while True:
        try:
            failed += comm.shrink()
            abandon = getattr(trainer.reducer, "abandon", None)  # buckets in flight (BucketReducer)
            if abandon is not None:
                abandon()
            state.restore()
            iteration = state.sync(comm)
            plan = plan_batches(trainer.plan.prototxt_batch, comm.size, comm.rank, trainer.plan.global_batch)
            trainer.apply_plan(plan)
            break
        except Exception as e:  # a further failure during recovery: shrink again
            if not _is_process_failure(e):
                raise
            log.warning("rank %d: another rank failed during recovery (%s)", comm.world_ranks[comm.rank], e)
    seconds = time.perf_counter() - detected
    if comm.rank == 0:
        logging.getLogger("mpicaffe").setLevel(min(logging.getLogger("mpicaffe").level, logging.INFO))
        log.info("Recovered from the failure of rank(s) %s (detected in the %s at iteration %d): %d rank(s) "
                 "go on from iteration %d with global batch %d (%s per rank); detection to resume %.3f s",
                 ", ".join(map(str, failed)), where, at, comm.size, iteration, plan.global_batch,
                 _per_rank(plan.global_batch, comm.size), seconds)
        start = time.perf_counter()
        trainer.write_snapshot()  # recorded in the manifest, for `--resume auto` should the job still die
        log.info("Snapshot of the recovered state at iteration %d written in %.3f s", iteration,
                 time.perf_counter() - start)


def _per_rank(global_batch: int, size: int) -> str:
    """'24', or '16 to 17' when the ranks' batches differ."""
    small, large = global_batch // size, -(-global_batch // size)
    return str(small) if small == large else f"{small} to {large}"
