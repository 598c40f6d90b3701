"""Communicators: every collective mpicaffe uses, over MPI (mpi4py) or a single process.

Training code never calls MPI directly: it asks a Communicator to broadcast parameters, average
gradients in place (one fused buffer, or buckets started while backward is still running), sum
test scores, and agree on Python values. Lowercase methods move Python objects, the others numpy
buffers (as mpi4py names them) or, where the name says so, torch tensors on any device (through
mpicaffe.parallel.buffers, which alone knows how MPI reaches a device's memory).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from mpicaffe.errors import UserError

T = TypeVar("T")


class RankError(UserError):
    """A user error raised on one or more ranks, re-raised on every rank so none waits forever.
    `rank` is the rank that raised this copy (the CLI prints rank 0's)."""

    def __init__(self, message: str, rank: int = 0):
        super().__init__(message)
        self.rank = rank


class Communicator:
    """The single-process communicator: rank 0 of 1; collectives return their input."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    name = "single process"
    shrunk = False  # ULFM: whether failed ranks were removed (MPICommunicator.shrink)
    phase = "start-up"  # what the collectives run now are for (see `labelled`)

    @contextlib.contextmanager
    def labelled(self, phase: str):
        """Collectives run inside belong to `phase` of training, which stall reports and ULFM
        recovery logs name; an exception leaving it carries the innermost phase it left
        (`failed_phase`)."""
        outer, self.phase = self.phase, phase
        try:
            yield
        except Exception as e:
            if not hasattr(e, "mpicaffe_phase"):
                with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                    e.mpicaffe_phase = phase
            raise
        finally:
            self.phase = outer

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        pass

    def Allreduce_sum(self, buf: np.ndarray) -> None:
        pass

    def Iallreduce_sum(self, buf: np.ndarray):
        return _DoneRequest()

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def watch_stalls(self, timeout: float) -> None:
        """Collective: give every later collective a deadline of `timeout` seconds (mpicaffe.parallel.stall);
        nothing to wait for in a single process."""

    def return_errors(self) -> None:
        """ULFM: make MPI errors raise (mpi4py's MPI.Exception) instead of aborting the job."""

    # --- built on the primitives above ---
    def allreduce_mean_(self, buf: np.ndarray) -> None:
        """Average `buf` across ranks, in place."""
        if self.size > 1:
            self.Allreduce_sum(buf)
            buf *= buf.dtype.type(1.0 / self.size)

    def Bcast_tensor(self, tensor, root: int = 0) -> None:
        """Give every rank `root`'s values of this contiguous torch tensor, on any device, in place."""
        if self.size == 1:
            return
        from mpicaffe.parallel.buffers import HostBuffer

        buffer = HostBuffer(tensor)
        buffer.stage()  # on every rank: pending kernels that write the tensor end before MPI writes it
        buffer.wait_ready()
        self.Bcast(buffer.message, root=root)
        if self.rank != root:
            buffer.unstage()

    def Bcast_arrays(self, arrays: list, root: int = 0) -> None:
        """Give every rank `root`'s values of these float32 arrays (views are written in place),
        in one Bcast through a packed buffer. numpy arrays, or torch tensors that are views (on
        one device)."""
        if self.size == 1 or not arrays:
            return
        if not isinstance(arrays[0], np.ndarray):  # torch tensors: pack on their device
            views = [t.detach().view(-1) for t in arrays]
            packed = views[0].new_empty(sum(v.numel() for v in views))
            offset = 0
            for v in views:
                packed[offset:offset + v.numel()] = v
                offset += v.numel()
            self.Bcast_tensor(packed, root=root)
            offset = 0
            for v in views:
                v.copy_(packed[offset:offset + v.numel()])
                offset += v.numel()
            return
        buffer = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32, copy=False)
        self.Bcast(buffer, root=root)
        offset = 0
        for a in arrays:
            a.reshape(-1)[...] = buffer[offset:offset + a.size]
            offset += a.size

    def agree(self, error: BaseException | None) -> None:
        """Collective: if any rank passes an error, raise RankError on every rank, naming the
        ranks that failed and the first message, so a failure on one rank stops them all."""
        messages = self.allgather(None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            ranks = ", ".join(str(r) for r, _ in failed)
            first_rank, first = failed[0]
            detail = first if self.size == 1 else f"rank {first_rank}: {first}"
            raise RankError(detail if self.size == 1 else f"failed on rank(s) {ranks}; {detail}", self.rank)

    def agreed(self, fn: Callable[[], T]) -> T:
        """Collective: call `fn()` on every rank and return its result; a UserError it raises on
        any rank is raised as RankError on every rank (see `agree`)."""
        error, result = None, None
        try:
            result = fn()
        except UserError as e:
            error = e
        self.agree(error)
        return result

    def check_same(self, value: str, what: str) -> None:
        """Collective: error on every rank if `value` (e.g. a hash) differs across ranks.

        The ranks' sha256 of `value` are gathered through a fixed-size buffer allreduce rather
        than a pickled allgather: a rank dying mid-collective then surfaces as an MPI error
        (which ULFM recovery handles), never as a half-received pickle."""
        table = np.zeros((self.size, 32), dtype=np.int32)
        table[self.rank] = np.frombuffer(hashlib.sha256(value.encode()).digest(), dtype=np.uint8)
        self.Allreduce_sum(table)
        values = [bytes(row.astype(np.uint8)).hex() for row in table]
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            listing = "; ".join(f"ranks {','.join(map(str, rs))}: {v[:16]}" for v, rs in groups.items())
            raise RankError(f"ranks disagree on {what} ({listing})", self.rank)


def failed_phase(error: BaseException, default: str) -> str:
    """The phase of training (Communicator.labelled) that `error` was raised in, or `default`."""
    return getattr(error, "mpicaffe_phase", default)


class _DoneRequest:
    def Wait(self) -> None:
        pass

    def Test(self) -> bool:
        return True


class _WatchedRequest:
    """A non-blocking collective whose Wait has the stall watch's deadline."""

    def __init__(self, request, watch):
        self.request, self.watch = request, watch

    def Wait(self) -> None:
        self.watch.wait(self.request)

    def Test(self) -> bool:
        return self.request.Test()


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (a duplicate of COMM_WORLD by default)."""

    name = "MPI"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = (comm or MPI.COMM_WORLD).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = local.Get_rank()
        self.local_size = local.Get_size()
        local.Free()
        self.world_ranks = list(range(self.size))  # rank -> rank at start (they change on a ULFM shrink)
        self.watch = None  # a mpicaffe.parallel.stall.StallWatch once watch_stalls() is called

    def barrier(self) -> None:
        if self.watch:
            self.watch.wait(self.comm.Ibarrier())
        else:
            self.comm.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.watch:  # pickled objects: wait for every rank to arrive, then the blocking call
            self.watch.wait(self.comm.Ibarrier())
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        if self.watch:
            self.watch.wait(self.comm.Ibarrier())
        return self.comm.allgather(obj)

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.watch:
            self.watch.wait(self.comm.Ibcast(buf, root=root))
        else:
            self.comm.Bcast(buf, root=root)

    def Allreduce_sum(self, buf: np.ndarray) -> None:
        if self.watch:
            self.watch.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def Iallreduce_sum(self, buf: np.ndarray):
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return _WatchedRequest(request, self.watch) if self.watch else request

    def watch_stalls(self, timeout: float) -> None:
        from mpicaffe.parallel.stall import StallWatch

        self.watch = StallWatch(self.comm, timeout)
        self.watch.phase = lambda: self.phase

    def return_errors(self) -> None:
        self.comm.Set_errhandler(self.MPI.ERRORS_RETURN)

    def shrink(self) -> list[int]:
        """ULFM, after a collective raised a process failure: revoke the communicator (so every
        rank's pending operations fail too) and go on with the survivors, renumbered 0..n-1 in
        their old order. Collective over the survivors. Returns the failed ranks, numbered as at
        start (`world_ranks`)."""
        MPI = self.MPI
        self.comm.Revoke()
        survivors_comm = self.comm.Shrink()
        survivors = MPI.Group.Translate_ranks(survivors_comm.Get_group(), list(range(survivors_comm.Get_size())),
                                              self.comm.Get_group())
        failed = [self.world_ranks[r] for r in range(self.size) if r not in survivors]
        self.world_ranks = [self.world_ranks[r] for r in survivors]
        self.comm, self.shrunk = survivors_comm, True
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        if self.watch:
            self.watch = self.watch.rebuilt(self.comm)
        return failed

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def exit_without_finalize(self, code: int) -> None:
        """End the process now, skipping MPI_Finalize: after a ULFM shrink, Open MPI 5's finalize
        can wait forever for the failed ranks (open-mpi/ompi#11404; seen here about once in 10
        runs under load). mpirun --with-ft ulfm accepts a rank that exits without it."""
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launched_by_mpi() -> bool:
    """True when mpirun/mpiexec/srun started this process as one of several ranks."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def create_communicator(kind: str = "auto") -> Communicator:
    """'mpi' (requires mpi4py), 'single', or 'auto': MPI when launched with several ranks."""
    if kind == "single" or (kind == "auto" and not launched_by_mpi()):
        return Communicator()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UserError("this process was started under MPI, but mpi4py is not installed: "
                        "pip install mpi4py (built against the MPI you launch with)") from None
    return MPICommunicator()


def digest(*parts: bytes | str) -> str:
    """A short hex digest of byte strings, for comparing configurations across ranks."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()
