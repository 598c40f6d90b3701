"""`mpicaffe train`: a Caffe solver on every MPI rank, gradients averaged synchronously.

Each rank builds the same solver from the same files (checked by hash), reads its own contiguous
shard of each LMDB, and runs Caffe's iteration; gradients are averaged across ranks before the
update (in buckets overlapped with backward for the built-in engine), so every rank applies the
same update to the same weights. Rank 0 loads or restores weights and broadcasts them, prints the
log (loss averaged over ranks, test scores summed over the ranks' shares of test_iter) and writes
snapshots. With one process this is exactly `caffe train`.

The loop is the same for both backends; what differs (building the solver and giving it its data
shard, the start state, gradient reduction, test sums, timings) is behind a small adapter per
backend, with the members `TrainingBackend` lists: mpicaffe.backends.engine_training for the
built-in engine, mpicaffe.backends.caffe_training for real Caffe through pycaffe.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mpicaffe import progress, prototxt, snapshot
from mpicaffe.backends import resolve_backend
from mpicaffe.backends.engine.lr_policy import learning_rate
from mpicaffe.caffe_log import SmoothedLoss, format_float, output_lines
from mpicaffe.comm import Communicator, create_communicator, digest
from mpicaffe.data.sharding import shard_bounds, test_share
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.signals import RunControl
from mpicaffe.telemetry import Telemetry

log = logging.getLogger(__name__)

# data layers whose batch the trainer sets per rank and which read a rank's shard
SHARDED_TYPES = {"Data": "data_param", "ImageData": "image_data_param"}
NEVER = 2**31 - 1


@dataclass
class TrainConfig:
    """What `mpicaffe train` was asked to do."""

    solver: str
    weights: str | None = None
    snapshot: str | None = None
    gpu: str | None = None
    level: int = 0
    stages: list[str] = field(default_factory=list)
    global_batch: int | None = None
    scale_lr: bool = False
    overlap: bool = True
    bucket_mb: float = 1.0
    check_every: int = 100
    metrics: str | None = None
    timeline: str | None = None
    timeline_iters: int = 10
    backend: str = "engine"
    shard_cache: str | None = None
    fault_tolerance: str = "none"  # "ulfm": survive rank failures in-run (mpicaffe.elastic)
    stall_timeout: float = 0.0     # > 0: report a stalled rank and abort after this many seconds (mpicaffe.stall)
    apoptosis: object | None = None  # mpicaffe.prune.apoptosis.ApoptosisConfig (--prune-every): shrink while training
    resume: str | None = None           # "auto": the newest verified snapshot of the manifest (mpicaffe.snapshot)
    snapshot_every_minutes: float = 0.0  # > 0: also snapshot when this much time passed since the last one
    keep_snapshots: int = 0             # > 0: delete all but the newest K snapshots of the manifest
    sigint_effect: str = "stop"         # Caffe's --sigint_effect: snapshot, stop or none
    sighup_effect: str = "snapshot"     # Caffe's --sighup_effect
    stage_data: str | None = None       # copy each rank's LMDB shards here first (mpicaffe.data.staging)
    devices: str | None = None          # per-rank devices "cuda:0,cpu,..." or one for all (mpicaffe.devices)
    balance: str = "none"               # "auto": per-rank batches by measured speed (mpicaffe.balance)
    balance_iters: int = 10             # iterations measured before balancing


@dataclass
class BatchPlan:
    """Per-rank batch sizes: the prototxt's batch, this rank's batch, the global batch, and the
    weight of this rank's gradient in the average."""

    prototxt_batch: int
    local: int
    global_batch: int
    weight: float


def plan_batches(prototxt_batch: int, size: int, rank: int, global_batch: int | None) -> BatchPlan:
    """Keep the prototxt's batch on every rank (global = ranks x batch), or split `global_batch`
    over the ranks as evenly as possible (earlier ranks take the remainder)."""
    if global_batch is None:
        return BatchPlan(prototxt_batch, prototxt_batch, prototxt_batch * size, 1.0)
    if global_batch < size:
        raise UserError(f"--global-batch {global_batch} is smaller than the number of ranks ({size})")
    lo, hi = shard_bounds(global_batch, rank, size)
    return BatchPlan(prototxt_batch, hi - lo, global_batch, (hi - lo) * size / global_batch)


def _data_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """The net's Data/ImageData layers that its state includes."""
    return [lp for lp in net.layer if lp.type in SHARDED_TYPES and prototxt.layer_included(net.state, lp)]


def _python_data_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """The net's Python layers with no bottoms: data layers that read their rank's shard themselves."""
    return [lp for lp in net.layer if lp.type == "Python" and not lp.bottom and prototxt.layer_included(net.state, lp)]


def _absolute_sources(net: caffe_pb2.NetParameter, net_path: str) -> None:
    """Resolve data sources as Caffe would (working directory first, then the net's folder), so
    the net can be handed on inline without losing its folder; for the same reason the folder
    is where Python layers' modules are looked for after sys.path."""
    base = os.path.dirname(net_path) if os.path.exists(net_path) else ""
    if base and any(lp.type == "Python" for lp in net.layer) and os.path.abspath(base) not in sys.path:
        sys.path.append(os.path.abspath(base))
    for lp in net.layer:
        for field_name in ("data_param", "image_data_param"):
            if lp.HasField(field_name):
                p = getattr(lp, field_name)
                if p.source and not os.path.isabs(p.source):
                    alt = os.path.join(base, p.source)
                    if not os.path.exists(p.source) and base and os.path.exists(alt):
                        p.source = os.path.abspath(alt)


def prepare_solver(cfg: TrainConfig, comm: Communicator, backend: str = "engine"
                   ) -> tuple[caffe_pb2.SolverParameter, caffe_pb2.SolverParameter, BatchPlan]:
    """Read the solver and its nets; return (the solver as written, the solver each rank runs, the
    batch plan). The one each rank runs has its nets inline with per-rank batches, and its own
    testing, display and snapshots turned off: the trainer does those across ranks."""
    original = prototxt.read_solver(cfg.solver)
    original.train_state.level = cfg.level
    original.train_state.stage.extend(cfg.stages)
    nets = prototxt.solver_nets(original, cfg.solver)
    comm.check_same(digest(prototxt.to_text(original), prototxt.to_text(nets.train),
                           *(prototxt.to_text(t) for t in nets.tests)), "the solver and net definitions")
    train = nets.train
    data = _data_layers(train)
    batch_of = [getattr(lp, SHARDED_TYPES[lp.type]).batch_size for lp in data]
    if comm.size > 1 or cfg.global_batch:
        python_data = _python_data_layers(train)
        if not data and (cfg.global_batch or not python_data or backend != "engine"):
            raise UserError(f"{nets.train_source}: distributed training needs a Data or ImageData layer in "
                            "the train net (each rank reads its own shard of it), or, without --global-batch, "
                            "on the built-in engine, a Python data layer that reads its rank's shard "
                            "(caffe.solver_rank())")
        if not data and comm.rank == 0:
            log.info("The train net is fed by Python data layer(s) %s: the per-rank batch is theirs, and each "
                     "rank's instance reads its own shard", ", ".join(lp.name for lp in python_data))
        if len(set(batch_of)) > 1:
            raise UserError(f"{nets.train_source}: the train net's data layers have different batch sizes "
                            f"{batch_of}; mpicaffe needs one batch size to split across ranks")
    plan = plan_batches(batch_of[0] if batch_of else 1, comm.size, comm.rank, cfg.global_batch)
    for lp in data:
        getattr(lp, SHARDED_TYPES[lp.type]).batch_size = plan.local

    run = caffe_pb2.SolverParameter()
    run.CopyFrom(original)
    for f in ("net", "net_param", "train_net", "train_net_param", "train_state"):
        run.ClearField(f)
    del run.test_net[:]
    del run.test_net_param[:]
    del run.test_state[:]
    _absolute_sources(train, nets.train_source)
    run.train_net_param.CopyFrom(train)
    for t, src in zip(nets.tests, nets.test_sources):
        _absolute_sources(t, src)
        run.test_net_param.add().CopyFrom(t)
    if cfg.scale_lr:
        run.base_lr = original.base_lr * plan.global_batch / plan.prototxt_batch
    run.display = 0
    run.test_interval = NEVER
    run.test_initialization = False
    run.snapshot = 0
    run.snapshot_after_train = False
    return original, run, plan


def _check_heterogeneous(cfg: TrainConfig, backend: str) -> None:
    """--devices and --balance need the built-in engine (and balancing, a fixed set of ranks)."""
    if cfg.devices and cfg.gpu is not None:
        raise UserError("give --gpu or --devices, not both")
    if backend == "caffe" and cfg.devices:
        raise UserError(f"--devices {cfg.devices}: the Caffe backend runs Caffe in CPU mode on every rank; use "
                        "--backend engine for per-rank devices")
    if cfg.balance == "auto":
        if backend == "caffe":
            raise UserError("--balance auto needs --backend engine: Caffe's Data layer fixes its batch size when "
                            "the net is built, so a rank's batch cannot change during training")
        if cfg.fault_tolerance == "ulfm":
            raise UserError("--balance auto and --fault-tolerance ulfm cannot be combined yet: a recovery "
                            "re-splits the global batch evenly")
        if cfg.balance_iters < 1:
            raise UserError(f"--balance-iters {cfg.balance_iters}: need at least one iteration to measure")


class Reducer(Protocol):
    """Gradient averaging (mpicaffe.reducer), run from the solver's callbacks."""

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

    def statistics_arrays(self) -> list[np.ndarray]:
        """Views of the train net's statistics blobs (BatchNorm's), which each rank accumulates
        from its own batches in forward, as in Caffe's data-parallel training."""

    def output_values(self, net) -> tuple[list[str], np.ndarray, list[float]]:
        """Names, float32 values and loss weights of each element of `net`'s outputs."""

    def test_sums(self, i: int, count: int) -> tuple[list[str], np.ndarray, list[float], np.float32]:
        """Forward test net `i` `count` times with the train net's weights: output names, the
        float32 sum of each output element, loss weights, the summed loss."""

    def close(self) -> None:
        """Release data readers and temporary files."""


def open_backend(name: str, cfg: TrainConfig, comm: Communicator, param: caffe_pb2.SolverParameter,
                 run_param: caffe_pb2.SolverParameter) -> TrainingBackend:
    """The training adapter of backend `name` ('engine' or 'caffe'), built collectively."""
    if name == "caffe":
        from mpicaffe.backends.caffe_training import CaffeTraining

        return CaffeTraining(cfg, comm, param, run_param)
    from mpicaffe.backends.engine_training import EngineTraining

    return EngineTraining(cfg, comm, param, run_param)


class Trainer:
    """The distributed training loop around one backend solver (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, comm: Communicator):
        self.cfg = cfg
        self.comm = comm
        error = None
        try:
            if cfg.weights and cfg.snapshot:
                raise UserError("give a snapshot to resume training or weights to finetune, but not both")
            backend = resolve_backend(cfg.backend)
            _check_heterogeneous(cfg, backend)
            self.param, self.run_param, self.plan = prepare_solver(cfg, comm, backend)
        except UserError as e:
            error = e
        comm.agree(error)
        # signals are counted from here on, acted upon at iteration boundaries (mpicaffe.signals)
        self.control = comm.agreed(lambda: RunControl(comm, cfg.sigint_effect, cfg.sighup_effect,
                                                      cfg.snapshot_every_minutes))
        self.control.install()
        self.stopped_early = ""  # why, when a signal stopped the run
        self._snapshot_iter = -1
        if cfg.resume:
            self._resume_auto()
        self.backend = open_backend(backend, cfg, comm, self.param, self.run_param)
        self.solver = self.backend.solver
        self.reducer = self.backend.make_reducer(self.plan.weight)
        # looked up at each call: pruning (mpicaffe.prune.apoptosis) replaces the reducer when the net shrinks
        self.solver.add_callback(lambda: self.reducer.start(), lambda: self.reducer.finish())
        self.telemetry = Telemetry(comm.rank, cfg.metrics, cfg.timeline, cfg.timeline_iters,
                                   self.param.max_iter)
        self._smoothing = SmoothedLoss(self.param.average_loss)  # on this rank, averaged over ranks at display
        self.recovery = None  # mpicaffe.elastic.TrainingState under --fault-tolerance ulfm
        self.balancer = None
        if cfg.balance == "auto" and comm.size > 1:
            from mpicaffe.balance import Balancer

            self.balancer = Balancer(self, cfg.balance_iters)
        self.apoptosis = None
        if cfg.apoptosis is not None:
            from mpicaffe.prune.apoptosis import Apoptosis

            self.apoptosis = comm.agreed(lambda: Apoptosis(cfg.apoptosis, self))

    # --- the loop ---
    def run(self) -> None:
        p, solver, comm = self.param, self.solver, self.comm
        if comm.rank == 0:
            self._log_plan()
            log.info("Solving %s", self.run_param.train_net_param.name)
            log.info("Learning Rate Policy: %s", p.lr_policy)
        start_iter = solver.iter
        if comm.rank == 0 and progress.enabled():
            progress.report("start", iteration=start_iter, ranks=comm.size, global_batch=self.plan.global_batch,
                            resumed_from=self.cfg.snapshot)
        display_timer = time.perf_counter()
        display_from = solver.iter
        while solver.iter < p.max_iter:
            it = solver.iter
            if self.recovery is not None:
                self.recovery.commit()
            if p.test_interval and it % p.test_interval == 0 and (it > 0 or p.test_initialization):
                with self.telemetry.phase("test", it):
                    self.test_all()
            self.telemetry.begin_iteration(it, self.backend, self.reducer)
            if self.balancer is not None:
                self.balancer.before_iteration()
            solver.step(1)
            self._smoothing.add(solver.loss)
            rate = learning_rate(self.run_param, it, self.backend.current_step, announce=False)[0]
            self.telemetry.end_iteration(it, self.backend, self.reducer, solver.loss, rate)
            if self.balancer is not None:
                self.balancer.after_iteration()
            if p.display and it % p.display == 0:
                lapse = time.perf_counter() - display_timer
                self._display(it, (it - display_from) / (lapse or 1), lapse, rate)
                display_timer, display_from = time.perf_counter(), it
            if self.cfg.check_every and solver.iter % self.cfg.check_every == 0:
                self.check_parameters_agree()
            if self.apoptosis is not None:
                self.apoptosis.after_iteration()
            if p.snapshot and solver.iter % p.snapshot == 0:
                self.snapshot()
            if self._stop_requested():
                break
        if p.snapshot_after_train and (not p.snapshot or solver.iter % p.snapshot != 0):
            self.snapshot()
        if p.test_interval and solver.iter % p.test_interval == 0 and solver.iter > start_iter and not self.stopped_early:
            self.test_all()
        self.check_parameters_agree()
        self.control.uninstall()
        self._log_data_wait(solver.iter - start_iter)
        if comm.rank == 0:
            log.info("Optimization stopped early." if self.stopped_early else "Optimization Done.")
        self.telemetry.close()
        self.backend.close()

    def _log_data_wait(self, iterations: int) -> None:
        """Collective: rank 0 logs the mean time per iteration the ranks waited for their train data."""
        waits = self.comm.allgather(self.backend.timings["data"] / max(1, iterations))
        if self.comm.rank == 0 and iterations:
            slowest = int(np.argmax(waits))
            log.info("Data wait per iteration: %.2f ms mean across ranks (%.2f ms on rank %d, the most)",
                     1e3 * float(np.mean(waits)), 1e3 * waits[slowest], slowest)

    def _log_plan(self) -> None:
        plan, n = self.plan, self.comm.size
        per_rank = (f"{plan.local} per rank" if self.cfg.global_batch is None
                    else f"{plan.global_batch // n} to {-(-plan.global_batch // n)} per rank")
        lr = self.run_param.base_lr
        scaled = f" (linearly scaled from the solver's {format_float(self.param.base_lr)})" if self.cfg.scale_lr else ""
        log.info("Training on %d rank(s) (%s): global batch %d (%s; the prototxt says %d); effective base_lr %s%s",
                 n, self.comm.name, plan.global_batch, per_rank, plan.prototxt_batch, format_float(lr), scaled)
        log.info("Backend: %s", self.backend.name)

    def _display(self, it: int, per_s: float, lapse: float, rate: float) -> None:
        names, values, weights = self.backend.output_values(self.solver.net)
        buf = np.concatenate([[self._smoothing.value], values]).astype(np.float32)
        self.comm.allreduce_mean_(buf)
        if self.comm.rank == 0:
            log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", it, format_float(per_s),
                     format_float(lapse), self.param.display, format_float(buf[0]))
            for line in output_lines("Train", names, buf[1:], weights):
                log.info("%s", line)
            log.info("Iteration %d, lr = %s", it, format_float(rate))

    # --- testing ---
    def test_all(self) -> list[list[tuple[str, float]]]:
        """Test every test net with its test_iter batches split across ranks; rank 0 logs Caffe's
        lines. Returns the mean scores per test net (on every rank)."""
        self.share_rank0_statistics()
        results = []
        for i in range(len(self.solver.test_nets)):
            results.append(self.test(i))
        return results

    def test(self, i: int) -> list[tuple[str, float]]:
        solver, comm = self.solver, self.comm
        total = self.param.test_iter[i]
        count = test_share(total, comm.rank, comm.size)
        names, values, weights = self.backend.output_values(solver.test_nets[i])
        sums, loss = np.zeros_like(values), np.float32(0)
        if count:
            names, sums, weights, loss = self.backend.test_sums(i, count)
        buf = np.concatenate([sums, [loss]]).astype(np.float32)
        comm.Allreduce_sum(buf)
        means = (buf[:-1] / np.float32(total)).astype(np.float32)
        if comm.rank == 0:
            log.info("Iteration %d, Testing net (#%d)", solver.iter, i)
            if self.param.test_compute_loss:
                log.info("Test loss: %s", format_float(buf[-1] / np.float32(total)))
            for line in output_lines("Test", names, means, weights):
                log.info("%s", line)
        return [(n, float(m)) for n, m in zip(names, means)]

    def share_rank0_statistics(self) -> None:
        """Collective: every rank takes rank 0's BatchNorm statistics, so that the test batches
        split across ranks are scored by one model: the one rank 0 snapshots (in Caffe's
        data-parallel training the root solver alone tests and snapshots)."""
        self.comm.Bcast_arrays(self.backend.statistics_arrays(), root=0)

    # --- consistency and snapshots ---
    def check_parameters_agree(self) -> None:
        """Collective: stop with a clear error if the ranks' weights are not bit-identical."""
        if self.comm.size > 1:
            weights = digest(*(a.tobytes() for a in self.backend.parameter_arrays()))
            self.comm.check_same(weights, f"the weights at iteration {self.solver.iter} (ranks diverged)")

    def snapshot(self) -> None:
        """Rank 0 writes a snapshot of the current iteration (once) and records it in the manifest."""
        if self._snapshot_iter == self.solver.iter:
            return
        self._snapshot_iter = self.solver.iter
        if self.comm.rank == 0:
            with self.telemetry.phase("snapshot", self.solver.iter):
                self.write_snapshot()
        self.control.snapshot_written()

    def write_snapshot(self) -> tuple[str, str]:
        """Write a snapshot on this rank (rank 0's duty, or the lowest live rank's) and record it in
        the manifest once both files are complete (mpicaffe.snapshot). Returns the two paths."""
        weights, state = self.solver.snapshot()
        snapshot.record_snapshot(self.solver.param.snapshot_prefix, weights, state, self.solver.iter, self.comm.size,
                                 self.plan.global_batch, self.cfg.keep_snapshots)
        return weights, state

    def _stop_requested(self) -> bool:
        """Collective, after each iteration: act on signals and the snapshot timer (mpicaffe.signals)."""
        action = self.control.at_boundary(self.solver.iter)
        if action.snapshot:
            self.snapshot()
        if self.comm.rank == 0 and progress.enabled():
            progress.report("iteration", iteration=self.solver.iter)
        if action.stop:
            self.stopped_early = action.reason
        return action.stop

    def _resume_auto(self) -> None:
        """--resume auto: rank 0 picks the newest snapshot of the manifest whose checksums verify and
        tells every rank; without one the run starts as asked (fresh, --weights or --snapshot)."""
        cfg, comm = self.cfg, self.comm
        prefix = self.param.snapshot_prefix

        def choose():
            if comm.rank != 0:
                return None
            found = snapshot.latest_verified_snapshot(prefix)
            return None if found is None else (found[0], found[1].iteration, found[1].ranks, found[1].global_batch)

        found = comm.bcast(comm.agreed(choose), root=0)
        if found is None:
            if comm.rank == 0:
                start = (f"from --snapshot {cfg.snapshot}" if cfg.snapshot else
                         f"finetuning from {cfg.weights}" if cfg.weights else "from scratch")
                log.info("--resume auto: no verified snapshot in %s; starting %s", snapshot.manifest_path(prefix), start)
            return
        path, iteration, ranks, global_batch = found
        cfg.snapshot, cfg.weights = path, None
        if comm.rank == 0:
            log.info("--resume auto: resuming from %s (iteration %d, written by %d rank(s) with global batch %d)",
                     path, iteration, ranks, global_batch)
            if global_batch != self.plan.global_batch:
                log.warning("--resume auto: this run's global batch is %d, the snapshot's run had %d; pass "
                            "--global-batch %d to continue its trajectory", self.plan.global_batch, global_batch,
                            global_batch)


def train(cfg: TrainConfig, comm: Communicator | None = None) -> Trainer:
    """Train as `caffe train` does, on every rank of `comm` (default: MPI when under mpirun)."""
    comm = comm or create_communicator()
    if cfg.stall_timeout:
        comm.watch_stalls(cfg.stall_timeout)
    if cfg.fault_tolerance == "ulfm":
        from mpicaffe import elastic

        elastic.prepare(cfg, comm)
    trainer = Trainer(cfg, comm)
    if cfg.stall_timeout:
        from mpicaffe import stall

        stall.watch_training(trainer)
    if cfg.fault_tolerance == "ulfm":
        elastic.run(trainer)
    else:
        trainer.run()
    return trainer
