"""pycaffe's API over the built-in engine: change `import caffe` to `from mpicaffe import caffe`.

Nets (`caffe.Net`), solvers (`caffe.SGDSolver`, `caffe.get_solver`, ...), `caffe.TRAIN`/`TEST`,
the mode functions, `caffe.Layer` (layers written in Python), `caffe.solver_count()`/`solver_rank()`,
`caffe.io` and `caffe.proto.caffe_pb2` behave as in BVLC Caffe's pycaffe.
On a GPU, `.data`/`.diff` arrays are copies (writes to them do not reach the device); on the CPU
they are views, as in pycaffe.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mpicaffe import logs, prototxt
from mpicaffe.backends.engine import solver as _engine_solver
from mpicaffe.backends.engine.layers import layer_types
from mpicaffe.backends.engine.lr_policy import learning_rate
from mpicaffe.backends.engine.solver_ranks import (
    set_multiprocess,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)
from mpicaffe.caffe import coord_map, distributed, draw, io, net_spec, proto
from mpicaffe.caffe.classifier import Classifier
from mpicaffe.caffe.detector import Detector
from mpicaffe.caffe.layer import Layer
from mpicaffe.caffe.net import Net
from mpicaffe.caffe.net_spec import NetSpec, layers, params, to_proto
from mpicaffe.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

__version__ = "1.0.0"  # the BVLC Caffe release whose pycaffe this follows

_mode = {"gpu": False, "device": 0}


def set_mode_cpu() -> None:
    _mode["gpu"] = False


def set_mode_gpu() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("set_mode_gpu: no CUDA device is available to PyTorch")
    _mode["gpu"] = True


def set_device(device_id: int) -> None:
    _mode["device"] = int(device_id)


def set_random_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _default_device() -> str:
    return f"cuda:{_mode['device']}" if _mode["gpu"] else "cpu"


def init_log() -> None:
    """Print log lines (INFO and up) on stderr in glog's format, as pycaffe's init_log."""
    logs.setup_logging()


def log(message: str) -> None:
    """Write `message` as an INFO log line (pycaffe's caffe.log)."""
    logging.getLogger("mpicaffe.caffe").info(message)


def has_nccl() -> bool:
    """False: mpicaffe runs several solvers with MPI (`mpirun ... mpicaffe python`), not NCCL."""
    return False


class NCCL:
    """pycaffe's NCCL(solver, uid), as Caffe built without NCCL has it: it does nothing."""

    def __init__(self, solver, uid: str):
        pass


class Timer:
    """Wall-clock timer: start(), stop(), and `ms`, the milliseconds from start to stop (reading
    it stops a running timer), as pycaffe's caffe.Timer."""

    def __init__(self):
        self._start = self._stop = None

    def start(self) -> None:
        if self._stop is not None or self._start is None:
            self._start, self._stop = time.perf_counter(), None

    def stop(self) -> None:
        if self._start is not None and self._stop is None:
            self._stop = time.perf_counter()

    @property
    def ms(self) -> float:
        if self._start is None:
            return 0.0
        self.stop()
        return (self._stop - self._start) * 1000.0


def layer_type_list() -> list[str]:
    """The layer types the built-in engine implements."""
    return layer_types()


class Solver:
    """A Caffe solver, as pycaffe's: `net`, `test_nets`, `iter`, `step`, `solve`, `snapshot`, ..."""

    _type: str | None = None

    def __init__(self, filename: str):
        param = prototxt.read_solver(filename)
        if self._type is not None:
            param.type = self._type
        self._solver = _engine_solver.get_solver(param, filename, device=_default_device(),
                                                 rank=solver_rank())
        distributed.attach(self._solver)  # under `mpicaffe python` with several ranks: data-parallel
        self.net = Net._wrap(self._solver.net)
        self.test_nets = [Net._wrap(n) for n in self._solver.test_nets]

    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def param(self) -> caffe_pb2.SolverParameter:
        return self._solver.param

    @property
    def lr(self) -> float:
        """The learning rate of the current iteration, as Caffe's SGDSolver::GetLearningRate (which
        also advances a "multistep" policy's step, as reading it does in pycaffe)."""
        rate, self._solver.current_step = learning_rate(self.param, self.iter, self._solver.current_step)
        return float(np.float32(rate))

    def step(self, iters: int) -> None:
        self._solver.step(iters)
        distributed.share_outputs(self._solver)

    def solve(self, resume_file: str | None = None) -> None:
        self._solver.solve(resume_file)
        distributed.share_outputs(self._solver)

    def snapshot(self) -> None:
        if distributed.writes_files():
            self._solver.snapshot()

    def restore(self, path: str) -> None:
        self._solver.restore(path)

    def add_callback(self, on_start, on_gradients_ready) -> None:
        self._solver.add_callback(on_start, on_gradients_ready)

    def apply_update(self) -> None:
        self._solver.apply_update()

    def share_weights(self, net: Net) -> None:
        net.share_with(self.net)


def _solver_class(name: str, solver_type: str) -> type[Solver]:
    return type(name, (Solver,), {"_type": solver_type, "__doc__": f"pycaffe's {name}: a {solver_type} solver."})


SGDSolver = _solver_class("SGDSolver", "SGD")
NesterovSolver = _solver_class("NesterovSolver", "Nesterov")
AdaGradSolver = _solver_class("AdaGradSolver", "AdaGrad")
RMSPropSolver = _solver_class("RMSPropSolver", "RMSProp")
AdaDeltaSolver = _solver_class("AdaDeltaSolver", "AdaDelta")
AdamSolver = _solver_class("AdamSolver", "Adam")


def get_solver(filename: str) -> Solver:
    """The solver of the type the file names (pycaffe's caffe.get_solver)."""
    return Solver(filename)


__all__ = [
    "NCCL",
    "TEST",
    "TRAIN",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "Classifier",
    "Detector",
    "Layer",
    "NesterovSolver",
    "Net",
    "NetSpec",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "Timer",
    "__version__",
    "coord_map",
    "draw",
    "get_solver",
    "has_nccl",
    "init_log",
    "io",
    "layer_type_list",
    "layers",
    "log",
    "net_spec",
    "params",
    "proto",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_multiprocess",
    "set_random_seed",
    "set_solver_count",
    "set_solver_rank",
    "solver_count",
    "solver_rank",
    "to_proto",
]
