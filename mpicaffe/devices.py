"""Which torch device a process runs on: Caffe's -gpu flag and solver_mode/device_id."""
from __future__ import annotations

import logging

import torch

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


def gpu_ids(gpu: str) -> list[int]:
    """The CUDA device ids Caffe's `-gpu` names: `all`, or a comma-separated list of ids."""
    if not torch.cuda.is_available():
        raise UserError(f"--gpu {gpu}: no CUDA device is available to PyTorch")
    count = torch.cuda.device_count()
    if gpu.strip() == "all":
        return list(range(count))
    try:
        ids = [int(g) for g in gpu.split(",")]
    except ValueError:
        raise UserError(f"--gpu {gpu}: expected 'all' or comma-separated GPU ids") from None
    if not all(0 <= i < count for i in ids):
        raise UserError(f"--gpu {gpu}: there are {count} CUDA devices")
    return ids


def select_device(gpu: str | None, solver: caffe_pb2.SolverParameter | None = None, local_rank: int = 0) -> str:
    """The device for this process.

    `--gpu` wins: a list `0,1,...` gives the rank with local rank r the r-th entry (cycling), `all`
    gives GPU (local rank mod device count). Else solver_mode GPU picks device_id + local rank when
    CUDA is available, and falls back to the CPU with a note.
    """
    if gpu is not None:
        ids = gpu_ids(gpu)
        return f"cuda:{ids[local_rank % len(ids)]}"
    if solver is not None and solver.solver_mode == caffe_pb2.SolverParameter.GPU:
        if torch.cuda.is_available():
            return f"cuda:{(solver.device_id + local_rank) % torch.cuda.device_count()}"
        log.info("solver_mode is GPU but no CUDA device is available: using the CPU")
    return "cpu"


def device_query(gpu: str | None) -> list[str]:
    """`caffe device_query -gpu ID[,ID...|all]`: Caffe's lines describing each device, as far
    as PyTorch reports them."""
    if not gpu:
        raise UserError("Need a device ID to query (--gpu ID, a comma-separated list, or all)")
    ids = gpu_ids(gpu)
    lines = ["Querying GPUs " + ",".join(map(str, ids))]
    for i in ids:
        p = torch.cuda.get_device_properties(i)
        lines += [f"Device id:                     {i}",
                  f"Major revision number:         {p.major}",
                  f"Minor revision number:         {p.minor}",
                  f"Name:                          {p.name}",
                  f"Total global memory:           {p.total_memory}",
                  f"Warp size:                     {getattr(p, 'warp_size', 32)}",
                  f"Number of multiprocessors:     {p.multi_processor_count}"]
    return lines


def rank_device(devices: str, rank: int, size: int) -> str:
    """This rank's device from `--devices`: one entry for every rank, or one per rank in rank
    order (`cuda:0,cuda:1,cpu`). Entries are `cpu`, `cuda:N` or `cuda` (cuda:0); CUDA ids are
    those of the rank's node."""
    entries = [e.strip() for e in devices.split(",")]
    if len(entries) not in (1, size):
        raise UserError(f"--devices {devices}: give one device for all ranks or one per rank ({size}), "
                        f"not {len(entries)}")
    device = entries[0] if len(entries) == 1 else entries[rank]
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--devices {devices}: {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise UserError(f"--devices {devices}: rank {rank} is to use {device}, but no CUDA device is available "
                        "to PyTorch on its node")
    count = torch.cuda.device_count()
    number = int(index or 0)
    if number >= count:
        raise UserError(f"--devices {devices}: rank {rank} is to use {device}, but its node has {count} CUDA "
                        "device(s)")
    return f"cuda:{number}"
