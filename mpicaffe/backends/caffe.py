"""The real-Caffe backend: BVLC Caffe's solver through pycaffe, behind the backend interface.

`CaffeSolver` wraps a pycaffe solver built from a solver prototxt. pycaffe only reads solvers
from files, so a modified SolverParameter is written to a temporary prototxt first, with the file
names in it made absolute (relative names are resolved as the built-in engine resolves them: the
working directory first, then the solver file's folder). Caffe runs in CPU mode; its own
Solver::Init seeds its RNG with random_seed. Caffe aborts the process on a failed CHECK, so the
mistakes a user can make in files (missing files, unknown solver type) are checked here first and
reported as UserErrors.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable

import numpy as np

from mpicaffe import prototxt
from mpicaffe.backends.engine.lr_policy import check_lr_policy
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")


def import_caffe():
    """The pycaffe module, or a UserError saying how to install it."""
    try:
        return importlib.import_module("caffe")
    except ImportError as e:
        raise UserError(f"--backend caffe: pycaffe is not importable ({e}); run scripts/install_caffe.sh "
                        "in this virtual environment, or use --backend engine") from None


def _absolute(path: str, base: str, field: str, source: str) -> str:
    return os.path.abspath(prototxt.resolve_path(path, base, field, source))


def solver_for_caffe(param: caffe_pb2.SolverParameter, solver_path: str) -> caffe_pb2.SolverParameter:
    """A copy of `param` that Caffe can read from any folder: net, train_net, test_net and weights
    file names made absolute, and the snapshot_prefix default Caffe derives from the solver's path
    filled in from `solver_path`. Raises UserError for a file that does not exist."""
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(param)
    base = os.path.dirname(solver_path)
    for f in ("net", "train_net"):
        if out.HasField(f):
            setattr(out, f, _absolute(getattr(out, f), base, f, solver_path))
    tests = [_absolute(p, base, "test_net", solver_path) for p in out.test_net]
    del out.test_net[:]
    out.test_net.extend(tests)
    weights = [",".join(_absolute(name.strip(), base, "weights", solver_path) for name in models.split(","))
               for models in out.weights]
    del out.weights[:]
    out.weights.extend(weights)
    prototxt.default_snapshot_prefix(out, solver_path)
    return out


def _check_solver(param: caffe_pb2.SolverParameter, solver_path: str) -> None:
    """Errors Caffe would abort on, as UserErrors: unknown type, missing net files, bad values."""
    def error(message: str) -> UserError:
        return UserError(f"{solver_path}: {message}")

    if param.type not in SOLVER_TYPES:
        raise error(f"Unknown solver type: {param.type} (known types: {', '.join(SOLVER_TYPES)})")
    if param.average_loss < 1:
        raise error(f"average_loss must be >= 1 (got {param.average_loss})")
    if param.type in ("AdaGrad", "RMSProp") and param.momentum != 0:
        raise error(f"Momentum cannot be used with {param.type}.")
    if param.type == "RMSProp" and not 0 <= param.rms_decay < 1:
        raise error(f"rms_decay should lie between 0 and 1 (got {param.rms_decay:g}).")
    if param.weight_decay and param.regularization_type not in ("L1", "L2"):
        raise error(f"Unknown regularization type: {param.regularization_type!r} (use L2 or L1)")
    try:
        check_lr_policy(param)
    except UserError as e:
        raise error(str(e)) from None
    if param.snapshot and not os.access(os.path.dirname(os.path.abspath(param.snapshot_prefix)), os.W_OK):
        raise error(f"Cannot write to snapshot prefix '{param.snapshot_prefix}'. Make sure that the directory "
                    "exists and is writeable.")
    prototxt.solver_nets(param, solver_path)  # names the train net exactly once; the files exist


class CaffeSolver:
    """A pycaffe solver with the backend interface (see mpicaffe.backends).

    `solver_path` is the solver prototxt; `param`, if given, replaces what the file holds (the
    file's path still anchors relative names and the default snapshot_prefix). `param` is the
    SolverParameter in force (mpicaffe's message); `net` and `test_nets` are pycaffe nets.
    """

    def __init__(self, solver_path: str, param: caffe_pb2.SolverParameter | None = None):
        if param is None:
            if not os.path.isfile(solver_path):
                raise UserError(f"{solver_path}: solver file not found")
            param = prototxt.read_solver(solver_path)
        self.solver_path = solver_path
        self._callbacks: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._build(param)

    def rebuild(self, param: caffe_pb2.SolverParameter) -> None:
        """Continue with a new pycaffe solver for `param` (pruning during training shrinks the
        nets): the callbacks added so far carry over; its weights and state are the caller's."""
        self._build(param)
        for callbacks in self._callbacks:
            self._solver.add_callback(*callbacks)

    def _build(self, param: caffe_pb2.SolverParameter) -> None:
        caffe = import_caffe()
        solver_path = self.solver_path
        self.param = solver_for_caffe(param, solver_path)
        _check_solver(self.param, solver_path)
        caffe.set_mode_cpu()
        fd, tmp = tempfile.mkstemp(prefix="mpicaffe-solver-", suffix=".prototxt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(prototxt.to_text(self.param))
            self._solver = caffe.get_solver(tmp)
        finally:
            os.remove(tmp)
        self._params = _learnable_blobs(self._solver.net)
        self._losses: list[np.float32] = []
        self.loss = 0.0
        self._watch_loss()

    # --- the interface ---
    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def net(self):
        return self._solver.net

    @property
    def test_nets(self) -> list:
        return list(self._solver.test_nets)

    def step(self, iters: int) -> None:
        """Caffe's Solver::Step; `loss` is then the last iteration's loss (mean over iter_size)."""
        self._solver.step(iters)

    def add_callback(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        """pycaffe's add_callback: `on_start` before each iteration's forward passes,
        `on_gradients_ready` after all iter_size backward passes, before the update."""
        self._callbacks.append((on_start, on_gradients_ready))
        self._solver.add_callback(on_start, on_gradients_ready)

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate. In this Caffe (2018 master) it also increments `iter`."""
        self._solver.apply_update()

    def snapshot(self) -> tuple[str, str]:
        """Caffe's Solver::Snapshot; returns the (weights, solver state) paths it wrote. Unlike
        Caffe, which aborts there, makes a missing snapshot folder."""
        os.makedirs(os.path.dirname(self.param.snapshot_prefix) or ".", exist_ok=True)
        self._solver.snapshot()
        return self.snapshot_paths()

    def snapshot_paths(self) -> tuple[str, str]:
        """The (weights, solver state) paths a snapshot of the current iteration has."""
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        stem = f"{self.param.snapshot_prefix}_iter_{self.iter}"
        return (stem + ".caffemodel.h5", stem + ".solverstate.h5") if hdf5 else (stem + ".caffemodel",
                                                                                 stem + ".solverstate")

    def restore(self, path: str) -> None:
        """Caffe's Solver::Restore from a .solverstate or .solverstate.h5 (weights it names included)."""
        if not os.path.isfile(path):
            raise UserError(f"{path}: solver state file not found")
        self._solver.restore(path)

    # --- flat access for the distributed trainer ---
    def parameter_arrays(self) -> list[np.ndarray]:
        """numpy views of the train net's learnable parameters (data), in Caffe's learnable_params
        order (owners only: a shared parameter appears once, at its first use)."""
        return [blob.data for blob in self._params]

    def gradient_arrays(self) -> list[np.ndarray]:
        """numpy views of the same parameters' diffs (see parameter_arrays)."""
        return [blob.diff for blob in self._params]

    def statistics_arrays(self) -> list[np.ndarray]:
        """numpy views of the BatchNorm statistics among parameter_arrays(): blobs the forward
        writes rather than the update learns, so each rank keeps its own."""
        net = self._solver.net
        return [blob.data for layer in net.layers if layer.type == "BatchNorm" for blob in layer.blobs]

    # --- loss of each forward ---
    def _watch_loss(self) -> None:
        """Keep `loss` as Solver::Step computes it, which pycaffe does not expose: each train
        forward's loss summed as Net::ForwardFromTo does, averaged over iter_size. The callback
        is registered first, so `loss` is current when the user's on_gradients_ready runs."""
        net = self._solver.net
        last = len(net.layers) - 1
        weighted = [(net.blobs[name], w) for name, w in zip(net._blob_names, net._blob_loss_weights) if w]

        def after_forward(layer: int) -> None:
            if layer == last:
                loss = np.float32(0)
                for blob, w in weighted:
                    loss += np.float32(np.float32(w) * blob.data.astype(np.float32).sum(dtype=np.float32))
                self._losses.append(loss)

        def on_start() -> None:
            self._losses = []

        def on_gradients_ready() -> None:
            if self._losses:
                total = sum(self._losses, np.float32(0))
                self.loss = float(np.float32(total / np.float32(len(self._losses))))

        net.after_forward(after_forward)
        self._solver.add_callback(on_start, on_gradients_ready)


def output_values(net) -> tuple[list[str], np.ndarray, list[float]]:
    """Names, float32 values and loss weights of every element of a pycaffe net's output blobs,
    in the order Caffe prints them (`Train net output #i`, `Test net output #i`)."""
    weights = net.blob_loss_weights
    names: list[str] = []
    loss_weights: list[float] = []
    values = []
    for name in net.outputs:
        v = np.asarray(net.blobs[name].data, dtype=np.float32).reshape(-1)
        names += [name] * v.size
        loss_weights += [float(weights[name])] * v.size
        values.append(v)
    return names, np.concatenate(values) if values else np.zeros(0, np.float32), loss_weights


def _learnable_blobs(net) -> list:
    """The net's parameter blobs in Caffe's learnable_params order: layer by layer, each blob once.
    Caffe's ShareWeights makes a sharer's blob use its owner's memory, so a repeated data
    address marks a shared blob."""
    seen: set[int] = set()
    blobs = []
    for layer in net.layers:
        for blob in layer.blobs:
            address = blob.data.__array_interface__["data"][0]
            if address in seen:
                continue
            seen.add(address)
            blobs.append(blob)
    return blobs


def create_caffe_solver(solver_path: str, param: caffe_pb2.SolverParameter | None = None) -> CaffeSolver:
    """The backend's factory: a CaffeSolver (see there)."""
    return CaffeSolver(solver_path, param)
