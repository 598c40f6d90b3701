"""What the trainer (mpicaffe.trainer) needs from a backend: the adapter protocol each backend
implements (engine_training for the built-in engine, caffe_training for real Caffe through
pycaffe), and `open_backend`, which builds one."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from mpicaffe.config import TrainConfig
from mpicaffe.parallel.comm import Communicator
from mpicaffe.proto import caffe_pb2


class Reducer(Protocol):
    """Gradient averaging (mpicaffe.parallel.reducer), run from the solver's callbacks."""

    seconds: float

    def start(self) -> None: ...

    def finish(self) -> None: ...


class TrainingBackend(Protocol):
    """What the trainer needs from a backend, beyond the solver interface (mpicaffe.backends).

    Constructed as `Backend(cfg, comm, solver as written, solver each rank runs)`, collectively:
    every rank builds its solver reading its own data shard, the start state (`--weights`,
    `--snapshot`) is loaded and broadcast from rank 0, and a resumed run's data layers start
    where the interrupted run was. A UserError on any rank is raised on all.
    """

    name: str
    solver: object           # step, iter, loss, net, test_nets, add_callback, snapshot
    current_step: int        # Caffe's current_step after the last step (lr policy state)
    timings: dict[str, float]  # seconds so far in the train net's data wait, forward, backward

    def make_reducer(self, weight: float) -> Reducer:
        """The gradient averaging for this backend, this rank's gradient weighted by `weight`."""

    def parameter_arrays(self) -> list[np.ndarray]:
        """The train net's learned parameters, as numpy arrays (for the checksum)."""

    def statistics_arrays(self) -> list:
        """Views of the train net's statistics blobs (BatchNorm's), which each rank accumulates
        from its own batches in forward, as in Caffe's data-parallel training: numpy arrays, or
        torch tensors on the net's device (the communicator converts them at its boundary)."""

    def finite(self) -> bool:
        """Whether the train net's weights and statistics are all finite (the same on every rank)."""

    def first_non_finite(self) -> str | None:
        """Where this rank's last iteration first went non-finite: a layer's top in forward, a
        parameter's gradient in backward, or a parameter; None when all are finite."""

    def rollback(self, state_path: str, base_lr: float) -> bool:
        """Collective: continue from the snapshot `state_path` at learning rate `base_lr`; returns
        whether the solver was rebuilt (the trainer then needs a new reducer)."""

    def output_values(self, net) -> tuple[list[str], np.ndarray, list[float]]:
        """Names, float32 values and loss weights of each element of `net`'s outputs."""

    def forward_loss(self) -> float:
        """Forward the train net once (a batch of data, no update) and return its loss: Caffe's
        extra pass after the last iteration, to display the final loss."""

    def test_sums(self, i: int, count: int) -> tuple[list[str], np.ndarray, list[float], np.float32]:
        """Forward test net `i` `count` times with the train net's weights: output names, the
        float32 sum of each output element, loss weights, the summed loss."""

    def close(self) -> None:
        """Release data readers and temporary files."""


def open_backend(name: str, cfg: TrainConfig, comm: Communicator, param: caffe_pb2.SolverParameter,
                 run_param: caffe_pb2.SolverParameter) -> TrainingBackend:
    """The training adapter of backend `name` ('engine' or 'caffe'), built collectively."""
    if name == "caffe":
        from mpicaffe.backends.caffe_training import CaffeTraining  # imports pycaffe

        return CaffeTraining(cfg, comm, param, run_param)
    from mpicaffe.backends.engine_training import EngineTraining  # imports torch

    return EngineTraining(cfg, comm, param, run_param)
