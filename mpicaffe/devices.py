"""Which torch device a process runs on: Caffe's -gpu flag and solver_mode/device_id."""
from __future__ import annotations

import logging

import torch

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


def select_device(gpu: str | None, solver: caffe_pb2.SolverParameter | None = None, local_rank: int = 0) -> str:
    """The device for this process.

    `--gpu` wins: a list `0,1,...` gives the rank with local rank r the r-th entry (cycling), `all`
    gives GPU (local rank mod device count). Else solver_mode GPU picks device_id + local rank when
    CUDA is available, and falls back to the CPU with a note.
    """
    if gpu is not None:
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {gpu}: no CUDA device is available to PyTorch")
        count = torch.cuda.device_count()
        if gpu.strip() == "all":
            return f"cuda:{local_rank % count}"
        try:
            ids = [int(g) for g in gpu.split(",")]
        except ValueError:
            raise UserError(f"--gpu {gpu}: expected 'all' or comma-separated GPU ids") from None
        index = ids[local_rank % len(ids)]
        if not 0 <= index < count:
            raise UserError(f"--gpu {gpu}: there are {count} CUDA devices")
        return f"cuda:{index}"
    if solver is not None and solver.solver_mode == caffe_pb2.SolverParameter.GPU:
        if torch.cuda.is_available():
            return f"cuda:{(solver.device_id + local_rank) % torch.cuda.device_count()}"
        log.info("solver_mode is GPU but no CUDA device is available: using the CPU")
    return "cpu"
