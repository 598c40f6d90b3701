"""Distributed training on real Caffe: what the trainer needs from a pycaffe solver (CaffeSolver).

- Data: Caffe's Data and ImageData layers read their source from its start, so with several
  ranks each rank writes a local copy of its contiguous shard (mpicaffe.data.shard_cache) and its
  nets read that instead. On resume the copy starts where the interrupted run was, so the data
  trajectory continues; one process reads the source itself and, as `caffe train`, restarts at
  its first record.
- Start state: rank 0 loads `--weights`. For `--snapshot`, rank 0 reads the solver state and the
  weights it names and sends their bytes to every rank, which restores from a local copy:
  pycaffe cannot set a solver's history (momentum), and no shared file system is needed. Rank 0's
  parameters are then broadcast.
- Gradients: one fused allreduce of the parameters' diffs in pycaffe's on_gradients_ready
  callback, after all iter_size backward passes and before Caffe's update.
- Test: the test net shares the train net's weights (Solver::Test's ShareTrainedLayersWith) and
  each output element is summed over the rank's forwards, as Solver::Test sums them.
- Timings (data wait, forward, backward): pycaffe's per-layer callbacks on the train net.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np

from mpicaffe import prototxt
from mpicaffe.backends.caffe import CaffeSolver, output_values
from mpicaffe.backends.engine.lr_policy import learning_rate
from mpicaffe.backends.engine.snapshot_io import ResumeState, read_resume_state
from mpicaffe.config import TrainConfig
from mpicaffe.data import shard_cache, sharding
from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import Communicator
from mpicaffe.parallel.reducer import FusedReducer
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

READERS = ("Data", "ImageData")
# Caffe keeps two history blobs per parameter for these solvers (AdaDeltaPreSolve, AdamPreSolve)
HISTORY_SETS = {"AdaDelta": 2, "Adam": 2}


class CaffeTraining:
    """One rank's pycaffe solver, set up for distributed training (the trainer's backend adapter).

    Building it is collective (see the module docstring); a UserError on any rank is raised on
    all of them. Caffe runs in CPU mode.
    """

    name = "real Caffe (pycaffe)"

    def __init__(self, cfg: TrainConfig, comm: Communicator, param: caffe_pb2.SolverParameter,
                 run_param: caffe_pb2.SolverParameter):
        if comm.rank != 0:
            # rank 0 alone logs, Caffe's own INFO lines included (glog reads this when Caffe loads)
            os.environ.setdefault("GLOG_minloglevel", "1")
        self.cfg, self.comm, self.param = cfg, comm, param
        # the solver as prepared (its data sources unsharded), and as this rank's Caffe runs it
        self.source_param = caffe_pb2.SolverParameter()
        self.source_param.CopyFrom(run_param)
        self.run_param = caffe_pb2.SolverParameter()
        self.run_param.CopyFrom(run_param)
        self.timings = {"data": 0.0, "forward": 0.0, "backward": 0.0}
        self._scratch: str | None = None
        resume = comm.agreed(self._check_and_read_resume)
        if comm.size > 1 and cfg.snapshot:
            resume = comm.bcast(resume, root=0)
        self.current_step = resume.current_step if resume else 0
        if comm.size > 1 or cfg.stage_data:
            comm.agreed(lambda: self._read_local_shards(resume.iter if resume else 0))
        self.solver: CaffeSolver = comm.agreed(lambda: CaffeSolver(cfg.solver, self.run_param))
        comm.agreed(lambda: self._load_start_state(resume))
        self._broadcast_parameters()
        self._time_layers()
        self.solver.add_callback(self._advance_step, lambda: None)

    # --- start state ---
    def _check_and_read_resume(self) -> ResumeState | None:
        if self.cfg.snapshot and self.comm.rank == 0:
            log.info("Resuming from %s", self.cfg.snapshot)
            return read_resume_state(self.cfg.snapshot)
        return None

    def _read_local_shards(self, iteration: int) -> None:
        """Point every Data/ImageData layer at a local copy of this rank's shard of its source,
        starting where a run that reached `iteration` has read to."""
        rank, size = self.comm.rank, self.comm.size
        train, tests = sharding.batches_read(self.param, iteration, rank, size)
        nets = [(self.run_param.train_net_param, train, True)]
        nets += [(net, batches, False) for net, batches in zip(self.run_param.test_net_param, tests)]
        for net, batches, is_train in nets:
            for lp in net.layer:
                if lp.type not in READERS or not prototxt.layer_included(net.state, lp):
                    continue
                if lp.type == "Data":
                    p = lp.data_param
                    if p.backend != caffe_pb2.DataParameter.LMDB:
                        raise UserError(f"layer '{lp.name}': data_param.backend LEVELDB: mpicaffe gives each rank "
                                        "its shard of LMDB databases only; convert the data to LMDB (mpicaffe "
                                        "convert) and set `backend: LMDB`")
                    copy = shard_cache.lmdb_shard
                else:
                    p = lp.image_data_param
                    copy = shard_cache.list_shard
                try:
                    # --stage-data is where the shard copies go (they are always made)
                    path, (start, end), reused = copy(p.source, rank, size, batches * p.batch_size,
                                                      self.cfg.stage_data or self.cfg.shard_cache)
                except UserError as e:
                    raise UserError(f"layer '{lp.name}': {lp.type} source {p.source}: {e}") from None
                if is_train and end - start < p.batch_size:
                    raise UserError(f"layer '{lp.name}': rank {rank}'s shard holds {end - start} records, fewer "
                                    f"than one batch ({p.batch_size}); use fewer ranks or a smaller batch")
                log.info("layer '%s': rank %d of %d reads records %d..%d of %s from %s copy %s", lp.name, rank, size,
                         start, end - 1, p.source, "its cached" if reused else "a new", path)
                p.source = path
                if lp.type == "Data":
                    p.backend = caffe_pb2.DataParameter.LMDB

    def rebuild(self, param: caffe_pb2.SolverParameter, state: ResumeState) -> None:
        """Collective: continue from `state` with `param`, the solver with its nets pruned
        (mpicaffe.prune.apoptosis). Each rank re-reads its shards from the current iteration, as a
        resumed run does, builds a new pycaffe solver and restores the state into it."""
        self.source_param = param
        self.run_param = caffe_pb2.SolverParameter()
        self.run_param.CopyFrom(param)
        self.comm.agreed(lambda: self._read_local_shards(state.iter))
        self.comm.agreed(lambda: self.solver.rebuild(self.run_param))
        self.comm.agreed(lambda: self._load_start_state(state))
        self.current_step = state.current_step
        self._time_layers()

    def _load_start_state(self, resume: ResumeState | None) -> None:
        solver = self.solver
        if resume is not None:
            self._scratch = self._scratch or tempfile.mkdtemp(prefix="mpicaffe-resume-")
            state = caffe_pb2.SolverState.FromString(resume.state)
            self._check_history(state)
            if resume.weights is not None:
                weights = os.path.join(self._scratch, "resume" + resume.weights_suffix)
                with open(weights, "wb") as f:
                    f.write(resume.weights)
                solver.net.copy_from(weights)
            state_path = os.path.join(self._scratch, "resume.solverstate")
            with open(state_path, "wb") as f:
                f.write(resume.state)
            solver.restore(state_path)
        elif self.cfg.weights and self.comm.rank == 0:
            for path in (w.strip() for w in self.cfg.weights.split(",")):
                if not os.path.isfile(path):
                    raise UserError(f"--weights {path}: file not found")
                log.info("Finetuning from %s", path)
                solver.net.copy_from(path)

    def _check_history(self, state: caffe_pb2.SolverState) -> None:
        """What Caffe would abort on when restoring: the number and sizes of the history blobs."""
        params = self.solver.parameter_arrays() * HISTORY_SETS.get(self.run_param.type, 1)
        where = f"{self.cfg.snapshot}: "
        if len(state.history) != len(params):
            raise UserError(f"{where}Incorrect length of history blobs: the state has {len(state.history)}, the "
                            f"{self.run_param.type} solver needs {len(params)}")
        for i, (bp, p) in enumerate(zip(state.history, params)):
            if len(bp.data) != p.size:
                raise UserError(f"{where}history blob {i} holds {len(bp.data)} values, the net's parameter has "
                                f"shape {p.shape}")

    def _broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's weights (the iteration and history came from the
        same snapshot bytes on every rank)."""
        with self.comm.labelled("start-state broadcast"):
            self.comm.Bcast_arrays(self.solver.parameter_arrays(), root=0)

    # --- per iteration ---
    def _advance_step(self) -> None:
        # Caffe's GetLearningRate keeps current_step (multistep) inside the solver, out of pycaffe's
        # reach; the same calls in the same order keep a copy of it (Caffe logs the MultiStep line)
        _, self.current_step = learning_rate(self.run_param, self.solver.iter, self.current_step, announce=False)

    def _time_layers(self) -> None:
        """Accumulate data wait, forward and backward seconds of the train net in `timings`."""
        net, timings = self.solver.net, self.timings
        last = len(net.layers) - 1
        readers = {i for i, layer in enumerate(net.layers) if layer.type in READERS}
        marks = {"forward": 0.0, "data": 0.0, "backward": 0.0}

        def before_forward(i: int) -> None:
            now = time.perf_counter()
            if i == 0:
                marks["forward"] = now
            if i in readers:
                marks["data"] = now

        def after_forward(i: int) -> None:
            now = time.perf_counter()
            if i in readers:
                timings["data"] += now - marks["data"]
            if i == last:
                timings["forward"] += now - marks["forward"]

        def before_backward(i: int) -> None:
            if i == last:
                marks["backward"] = time.perf_counter()

        def after_backward(i: int) -> None:
            if i == 0:
                timings["backward"] += time.perf_counter() - marks["backward"]

        net.before_forward(before_forward)
        net.after_forward(after_forward)
        net.before_backward(before_backward)
        net.after_backward(after_backward)

    # --- what the training loop uses ---
    def make_reducer(self, weight: float) -> FusedReducer:
        if self.comm.size > 1 and self.comm.rank == 0:
            log.info("Gradients are averaged in one fused allreduce after backward (Caffe backend)")
        return FusedReducer(self.comm, self.solver.gradient_arrays(), weight)

    def parameter_arrays(self) -> list[np.ndarray]:
        statistics = {a.__array_interface__["data"][0] for a in self.solver.statistics_arrays()}
        return [a for a in self.solver.parameter_arrays() if a.__array_interface__["data"][0] not in statistics]

    def statistics_arrays(self) -> list[np.ndarray]:
        return self.solver.statistics_arrays()

    def output_values(self, net) -> tuple[list[str], np.ndarray, list[float]]:
        return output_values(net)

    def forward_loss(self) -> float:
        net = self.solver.net
        return float(net._forward(0, len(net.layers) - 1))

    def test_sums(self, i: int, count: int) -> tuple[list[str], np.ndarray, list[float], np.float32]:
        net = self.solver.test_nets[i]
        net.share_with(self.solver.net)
        last = len(net.layers) - 1
        names, sums, weights = [], np.zeros(0, np.float32), []
        loss = np.float32(0)
        for k in range(count):
            loss += np.float32(net._forward(0, last))  # Net::Forward's loss, as Solver::Test adds it
            names, values, weights = output_values(net)
            sums = values if k == 0 else sums + values
        return names, sums, weights, loss

    def finite(self) -> bool:
        """Whether the train net's weights and statistics are all finite (by each blob's sum, as
        EngineTraining.finite)."""
        return all(bool(np.isfinite(a.sum())) for a in self.solver.parameter_arrays())

    def first_non_finite(self) -> str | None:
        """As the engine's Net.first_non_finite, on the pycaffe net."""
        net = self.solver.net
        names = list(net._layer_names)
        for name, layer in zip(names, net.layers):
            for top in net.top_names[name]:
                if not np.isfinite(net.blobs[top].data).all():
                    return f"layer '{name}' ({layer.type}): its top '{top}' in forward"
        types = dict(zip(names, (layer.type for layer in net.layers)))
        for kind, order in (("gradient", reversed(names)), ("value", names)):
            for name in order:
                for j, blob in enumerate(net.params.get(name, ())):
                    if not np.isfinite(blob.diff if kind == "gradient" else blob.data).all():
                        return f"layer '{name}' ({types[name]}): the {kind} of its parameter {j}"
        return None

    def rollback(self, state_path: str, base_lr: float) -> bool:
        """Collective: rebuild the pycaffe solver at `base_lr` and restore the snapshot
        `state_path` (read on rank 0) on every rank, its data read from the snapshot's iteration,
        as a resumed run does. Returns True: the solver was rebuilt (a new reducer is needed)."""
        state = self.comm.bcast(self.comm.agreed(lambda: read_resume_state(state_path) if self.comm.rank == 0
                                                 else None), root=0)
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(self.source_param)
        param.base_lr = base_lr
        self.rebuild(param, state)
        return True

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
