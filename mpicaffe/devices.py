"""Which torch device a process runs on: Caffe's -gpu flag and solver_mode/device_id."""
from __future__ import annotations

import logging

import torch

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


def select_device(gpu: str | None, solver: caffe_pb2.SolverParameter | None = None) -> str:
    """The device for this process: `--gpu N` (or 'all', meaning GPU 0 for one process) wins; else
    solver_mode GPU picks device_id when CUDA is available, and falls back to the CPU with a note."""
    if gpu is not None:
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {gpu}: no CUDA device is available to PyTorch")
        first = gpu.split(",")[0].strip()
        index = 0 if first == "all" else int(first)
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"--gpu {gpu}: there are {torch.cuda.device_count()} CUDA devices")
        return f"cuda:{index}"
    if solver is not None and solver.solver_mode == caffe_pb2.SolverParameter.GPU:
        if torch.cuda.is_available():
            return f"cuda:{solver.device_id}"
        log.info("solver_mode is GPU but no CUDA device is available: using the CPU")
    return "cpu"
