"""`--comm nccl|gloo`: a torch.distributed process group over the ranks of the MPI job, for the
gradient buckets (mpicaffe.parallel.reducer.ProcessGroupReducer).

No second launcher and no environment to set: the group is bootstrapped from the MPI
communicator. Rank 0 picks a free TCP port on its host and broadcasts (address, port) over MPI;
every rank then calls `torch.distributed.init_process_group(backend,
init_method="tcp://ADDRESS:PORT", rank=comm.rank, world_size=comm.size)`. Everything else (the
start-state broadcast, the weights checksum, test scores, ULFM) stays on MPI. The address is
$MASTER_ADDR on rank 0 when set, 127.0.0.1 when every rank is on rank 0's node, else rank 0's
address on the route to the first rank of another node.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket

import torch

from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import Communicator

log = logging.getLogger(__name__)

CHOICES = ("mpi", "nccl", "gloo", "auto")


def choose_comm(requested: str, devices: list[str], nccl: list[bool]) -> str:
    """What carries the gradients ('mpi', 'nccl' or 'gloo') for `--comm requested`, given every
    rank's device ('cpu', 'cuda:0', ...) and whether its PyTorch has NCCL. 'auto' is NCCL when
    every rank is on a CUDA device and has NCCL, else MPI (mixed CPU/GPU ranks: MPI)."""
    if requested not in CHOICES:
        raise UserError(f"--comm {requested}: expected one of {', '.join(CHOICES)}")
    all_cuda = all(d.startswith("cuda") for d in devices)
    if requested == "auto":
        return "nccl" if all_cuda and all(nccl) else "mpi"
    if requested == "nccl":
        off_gpu = [r for r, d in enumerate(devices) if not d.startswith("cuda")]
        if off_gpu:
            where = f"rank {off_gpu[0]} runs on {devices[off_gpu[0]]}" if len(devices) > 1 else \
                f"this process runs on {devices[0]}"
            raise UserError(f"--comm nccl needs every rank on a CUDA device, but {where}; use --gpu or --devices "
                            "cuda:N, or --comm mpi (or gloo) on CPUs")
        if not all(nccl):
            rank = nccl.index(False)
            raise UserError(f"--comm nccl: rank {rank}'s PyTorch has no NCCL (torch.distributed.is_nccl_available() "
                            "is False); use --comm mpi")
    return requested


def nccl_available() -> bool:
    """Whether this PyTorch can make NCCL process groups."""
    return torch.distributed.is_available() and torch.distributed.is_nccl_available()


class ProcessGroup:
    """torch.distributed's default process group over `comm`'s ranks, with `backend` ('nccl' or
    'gloo'). Building it is collective over `comm`; `close()` destroys it (call it on every rank).

    `device`: this rank's torch device (NCCL binds the rank's GPU). `timeout`: seconds a
    collective may wait before torch.distributed fails it (0: its default)."""

    def __init__(self, comm: Communicator, backend: str, device: str = "cpu", timeout: float = 0.0):
        import torch.distributed as dist

        self.backend, self.rank, self.size = backend, comm.rank, comm.size
        self._dist = dist
        comm.agree(UserError(f"--comm {backend}: torch.distributed already has a default process group in this "
                             "process") if dist.is_initialized() else None)
        if backend == "nccl" and device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        hosts = comm.allgather(socket.gethostname())
        host, port = comm.bcast((_rank0_address(hosts), _free_port()) if comm.rank == 0 else None, root=0)
        url_host = f"[{host}]" if ":" in host else host
        options = {"timeout": datetime.timedelta(seconds=timeout)} if timeout > 0 else {}
        dist.init_process_group(backend, init_method=f"tcp://{url_host}:{port}", rank=comm.rank,
                                world_size=comm.size, **options)
        if comm.rank == 0:
            log.info("Gradients averaged with %s (torch.distributed, rendezvous at %s:%d); other collectives over MPI",
                     backend.upper() if backend == "nccl" else backend, host, port)

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """Sum `tensor` over the ranks, in place; with `async_op`, a handle to `.wait()` on."""
        return self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, async_op=async_op)

    def close(self) -> None:
        """Destroy the process group (once; collective)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _rank0_address(hosts: list[str]) -> str:
    """Rank 0: the address the other ranks reach it at, given every rank's host name."""
    configured = os.environ.get("MASTER_ADDR", "").strip()
    if configured:
        return configured
    others = [h for h in hosts if h != hosts[0]]
    if not others:
        return "127.0.0.1"
    return _address_towards(others[0]) or socket.gethostbyname(hosts[0])


def _address_towards(host: str) -> str | None:
    """This host's address on the route to `host` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
