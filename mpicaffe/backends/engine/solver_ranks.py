"""How many solvers run together and which one this process is: Caffe's solver_count/solver_rank.

In BVLC Caffe these are the multi-GPU solver count and this solver's rank, read in pycaffe with
`caffe.solver_count()` and `caffe.solver_rank()`. Under `mpicaffe train` on the built-in engine
they are the MPI world size and rank, set before the nets are built, so a Python layer can pick
its rank's shard of the data in `setup`. Outside a training run they stay 1 and 0.

This module imports nothing, so the trainer can set them without importing the pycaffe API.
"""
from __future__ import annotations

_state = {"count": 1, "rank": 0, "multiprocess": False}


def solver_count() -> int:
    """Number of solvers (MPI ranks) training together; 1 outside a distributed run."""
    return _state["count"]


def solver_rank() -> int:
    """This process's solver rank, 0 .. solver_count() - 1."""
    return _state["rank"]


def multiprocess() -> bool:
    """Whether the solvers run in separate processes (always true under mpirun)."""
    return _state["multiprocess"]


def set_solver_count(count: int) -> None:
    if int(count) < 1:
        raise ValueError(f"solver count must be at least 1, got {count}")
    _state["count"] = int(count)


def set_solver_rank(rank: int) -> None:
    if int(rank) < 0:
        raise ValueError(f"solver rank must not be negative, got {rank}")
    _state["rank"] = int(rank)


def set_multiprocess(value: bool) -> None:
    _state["multiprocess"] = bool(value)


def set_solvers(count: int, rank: int) -> None:
    """Set all three for `count` solvers in separate processes, this one being `rank` (what
    `mpicaffe train` does on each MPI rank before it builds the nets)."""
    if not 0 <= int(rank) < int(count):
        raise ValueError(f"solver rank {rank} is not in 0 .. {int(count) - 1}")
    set_solver_count(count)
    set_solver_rank(rank)
    set_multiprocess(int(count) > 1)
