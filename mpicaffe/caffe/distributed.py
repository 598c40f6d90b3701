"""Data-parallel pycaffe scripts: what `mpicaffe python` turns on for every solver a script makes.

Under `mpirun -np N mpicaffe python SCRIPT`, `enable(comm)` runs before the script. From then on
every solver the script creates (`caffe.SGDSolver(...)`, `caffe.get_solver(...)`, ...):
- reads this rank's contiguous shard of each train-net database (Data, ImageData, ...) and
  starts from rank 0's weights;
- averages its gradients across ranks in buckets overlapped with backward, as `mpicaffe train`
  does, so N ranks with batch B train as one process with batch N*B;
- after each `step`, holds in its train net's output blobs (losses, accuracies) their mean over
  the ranks, so a script that prints them prints the global values;
- writes snapshots on rank 0 only (`Net.save` too); the other ranks' stdout is discarded by the
  runner, so the script's prints appear once.
Test nets are not sharded: each rank scores the whole test set, so a script's test loop prints
what one process would. Nets made directly with `caffe.Net` are not touched.
"""
from __future__ import annotations

import numpy as np

from mpicaffe.backends.engine import solver_ranks
from mpicaffe.backends.engine.solver import Solver
from mpicaffe.backends.engine_training import shard_data
from mpicaffe.parallel.comm import Communicator
from mpicaffe.parallel.reducer import BucketReducer

BUCKET_BYTES = 25 << 20  # mpicaffe train's default --bucket-mb

_state: dict[str, Communicator | None] = {"comm": None}


def enable(comm: Communicator) -> None:
    """Make every solver created from now on train data-parallel over `comm`."""
    _state["comm"] = comm
    solver_ranks.set_solvers(comm.size, comm.rank)


def _comm() -> Communicator | None:
    comm = _state["comm"]
    return comm if comm is not None and comm.size > 1 else None


def writes_files() -> bool:
    """Whether this process writes snapshots and saved nets (rank 0, or no distributed run)."""
    comm = _comm()
    return comm is None or comm.rank == 0


def attach(solver: Solver) -> None:
    """Collective when distributed: shard the train data, take rank 0's weights, and average
    gradients across ranks from the next step on."""
    comm = _comm()
    if comm is None:
        return
    if comm.rank != 0:  # rank 0 alone writes the solver's periodic and final snapshots
        solver.param.snapshot = 0
        solver.param.snapshot_after_train = False
    shard_data(solver, comm.rank, comm.size, test_nets=False)  # each rank scores the whole test set
    comm.Bcast_tensor(solver.net.flat_data, root=0)
    reducer = BucketReducer(comm, solver.net, 1.0, BUCKET_BYTES, solver.param.iter_size)
    solver.add_callback(reducer.start, reducer.finish)


def share_outputs(solver: Solver) -> None:
    """Collective when distributed: the train net's output blobs become their mean over ranks."""
    comm = _comm()
    if comm is None:
        return
    net = solver.net
    outputs = [net.blobs[name].data for name in net.outputs]
    if not outputs:
        return
    buffer = np.concatenate([np.asarray(o, np.float32).reshape(-1) for o in outputs])
    comm.allreduce_mean_(buffer)
    offset = 0
    for o in outputs:
        o[...] = buffer[offset:offset + o.size].reshape(o.shape)
        offset += o.size
