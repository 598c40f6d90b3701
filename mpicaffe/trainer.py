"""`mpicaffe train`: a Caffe solver on every MPI rank, gradients averaged synchronously.

Each rank builds the same solver from the same files (checked by hash), reads its own contiguous
shard of each LMDB, and runs Caffe's iteration; gradients are averaged across ranks before the
update (in buckets overlapped with backward for the built-in engine), so every rank applies the
same update to the same weights. Rank 0 loads or restores weights and broadcasts them, prints the
log (loss averaged over ranks, test scores summed over the ranks' shares of test_iter) and writes
snapshots. With one process this is exactly `caffe train`.

The loop is the same for both backends; what differs (building the solver and giving it its data
shard, the start state, gradient reduction, test sums, timings) is behind a small adapter per
backend, with the members `mpicaffe.backends.training.TrainingBackend` lists: engine_training for the
built-in engine, mpicaffe.backends.caffe_training for real Caffe through pycaffe.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import numpy as np

from mpicaffe import progress, prototxt, signals, snapshot
from mpicaffe.backends import resolve_backend
from mpicaffe.backends.engine.lr_policy import learning_rate
from mpicaffe.backends.training import open_backend
from mpicaffe.balance import Balancer
from mpicaffe.config import TrainConfig
from mpicaffe.data.sharding import BatchPlan, plan_batches, test_share
from mpicaffe.errors import UserError
from mpicaffe.logs import SmoothedLoss, format_float, output_lines
from mpicaffe.parallel import recovery, stall
from mpicaffe.parallel.comm import Communicator, RankError, create_communicator, digest
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune.apoptosis import Apoptosis
from mpicaffe.signals import RunControl
from mpicaffe.telemetry import Telemetry

log = logging.getLogger(__name__)

# data layers whose batch the trainer sets per rank and which read a rank's shard
SHARDED_TYPES = {"Data": "data_param", "ImageData": "image_data_param"}
NEVER = 2**31 - 1


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


def _check_trains_something(net: caffe_pb2.NetParameter, source: str) -> None:
    """Refuse a train net without layers, or without a loss (no *Loss layer, no loss_weight):
    Caffe trains it with loss 0 and writes snapshots, learning nothing."""
    layers = [lp for lp in net.layer if prototxt.layer_included(net.state, lp)]
    if not layers:
        raise UserError(f"{source}: the train net has no layers (in the TRAIN phase, level {net.state.level}, "
                        f"stages {list(net.state.stage)}): nothing to train")
    if not any(lp.type.endswith("Loss") or any(lp.loss_weight) for lp in layers):
        raise UserError(f"{source}: the train net computes no loss (no *Loss layer and no layer with a loss_weight): "
                        "training would learn nothing")


def _check_same_options(cfg: TrainConfig, comm: Communicator) -> None:
    """Collective: every rank was given the same options (an MPMD launch, or a wrapper script,
    can give ranks different ones: `--global-batch 64` on one and 48 on another would train
    inconsistently); the error names the options that differ."""
    if comm.size == 1:
        return
    options = cfg.shared_options()
    everyone = comm.allgather(options)
    differ = [name for name in options if len({o[name] for o in everyone}) > 1]
    if differ:
        detail = "; ".join(f"--{name.replace('_', '-')}: " + ", ".join(f"rank {r} {o[name]}" for r, o in enumerate(everyone))
                           for name in differ)
        raise UserError(f"the ranks were given different options ({detail})")


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
    _check_same_options(cfg, comm)
    train = nets.train
    _check_trains_something(train, nets.train_source)
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


class Trainer:
    """The distributed training loop around one backend solver (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, comm: Communicator):
        self.cfg = cfg
        self.comm = comm
        error = None
        try:
            backend = resolve_backend(cfg.backend)
            cfg.check(backend, comm.size)
            self.param, self.run_param, self.plan = prepare_solver(cfg, comm, backend)
            if comm.rank == 0:  # a manifest or folder that cannot take the run's snapshots: refused now, not after training
                snapshot.read_manifest(self.param.snapshot_prefix)
                if self.param.snapshot or self.param.snapshot_after_train:
                    snapshot.check_writable(self.param.snapshot_prefix)
        except UserError as e:
            error = e
        comm.agree(error)
        # signals are counted from here on, acted upon at iteration boundaries (mpicaffe.signals)
        self.control = comm.agreed(lambda: RunControl(comm, cfg.sigint_effect, cfg.sighup_effect,
                                                      cfg.snapshot_every_minutes))
        self.control.install()
        self.stopped_early = ""  # why, when a signal stopped the run
        self._rollbacks = 0  # --on-divergence rollback: how many so far
        self._snapshot_iter = -1
        if cfg.resume:
            self._resume_auto()
        self.backend = open_backend(backend, self.cfg, comm, self.param, self.run_param)
        self.solver = self.backend.solver
        self.reducer = self.backend.make_reducer(self.plan.weight)
        # looked up at each call: pruning (mpicaffe.prune.apoptosis) rebuilds the reducer when the net shrinks
        self.solver.add_callback(lambda: self.reducer.start(), lambda: self.reducer.finish())
        self.telemetry = Telemetry(comm.rank, cfg.metrics, cfg.timeline, cfg.timeline_iters,
                                   self.param.max_iter)
        self._smoothing = SmoothedLoss(self.param.average_loss)  # on this rank, averaged over ranks at display
        self.balancer = None
        if cfg.balance == "auto" and comm.size > 1:
            self.balancer = Balancer(self, cfg.balance_iters)
        self.apoptosis = None
        if cfg.apoptosis is not None:
            self.apoptosis = comm.agreed(lambda: Apoptosis(cfg.apoptosis, self))

    # --- what extensions (balance, recovery, pruning) change, through these methods only ---
    def apply_plan(self, plan: BatchPlan) -> None:
        """Collective: train from now on with the per-rank batches of `plan`: each rank reads its
        shard at its new batch (where a run with that plan would be), and its gradient gets the
        plan's weight in the average."""
        self.comm.agreed(lambda: self.backend.reshard(plan.local))
        self.plan = plan
        self.reducer.weight = np.float32(plan.weight)

    def rebuild_reducer(self) -> None:
        """A new gradient reducer over the train net's parameters, after they changed shape."""
        self.reducer = self.backend.make_reducer(self.plan.weight)

    # --- the loop ---
    def run(self, recovery=None) -> None:
        """Train to max_iter (or a stop signal). `recovery`, a mpicaffe.parallel.recovery.TrainingState,
        is committed at the start of every iteration."""
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
        if solver.iter < p.max_iter:
            self._stop_at_start()
        while solver.iter < p.max_iter and not self.stopped_early:
            it = solver.iter
            if it == p.max_iter - 1:
                signals.reached("last-iteration")
            if recovery is not None:
                recovery.commit()
            if p.test_interval and it % p.test_interval == 0 and (it > 0 or p.test_initialization):
                with self.telemetry.phase("test", it):
                    self.test_all()
            self.telemetry.begin_iteration(it, self.backend, self.reducer)
            if self.balancer is not None:
                self.balancer.before_iteration()
            with comm.labelled("gradient allreduce"):  # the train step's only collectives
                solver.step(1)
            if not self._finite():
                self._diverged(it)  # stops, or rolls back to a snapshot
                continue
            self._smoothing.add(solver.loss)
            rate = learning_rate(self.run_param, it, self.backend.current_step, announce=False)[0]
            self.telemetry.end_iteration(it, self.backend, self.reducer, solver.loss, rate)
            if self.balancer is not None:
                with comm.labelled("batch balancing"):
                    self.balancer.after_iteration()
            if p.display and it % p.display == 0:
                lapse = time.perf_counter() - display_timer
                self._display(it, (it - display_from) / (lapse or 1), lapse, rate)
                display_timer, display_from = time.perf_counter(), it
            if self.cfg.check_every and solver.iter % self.cfg.check_every == 0:
                self.check_parameters_agree()
            if self.apoptosis is not None:
                with comm.labelled("pruning"):
                    self.apoptosis.after_iteration()
            if p.snapshot and solver.iter % p.snapshot == 0:
                self.snapshot()
            if self._stop_requested():
                break
        stopped_at_start = self.stopped_early and solver.iter == start_iter
        if p.snapshot_after_train and (not p.snapshot or solver.iter % p.snapshot != 0) and not stopped_at_start:
            signals.reached("final-snapshot")
            self.snapshot()
        if not self.stopped_early:
            # Caffe's Solve() after the last step: a forward pass to display the final loss, and a
            # test (also when max_iter is 0)
            if p.display and solver.iter % p.display == 0:
                self._final_loss()
            if p.test_interval and solver.iter % p.test_interval == 0:
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
        with self.comm.labelled("data-wait summary"):
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

    def _final_loss(self) -> None:
        """Collective: Caffe's closing `Iteration N, loss = L` (the smoothed loss, with one more
        forward pass of the train net)."""
        self._smoothing.add(self.backend.forward_loss())
        buf = np.array([self._smoothing.value], np.float32)
        with self.comm.labelled("final loss"):
            self.comm.allreduce_mean_(buf)
        if self.comm.rank == 0:
            log.info("Iteration %d, loss = %s", self.solver.iter, format_float(buf[0]))

    def _display(self, it: int, per_s: float, lapse: float, rate: float) -> None:
        names, values, weights = self.backend.output_values(self.solver.net)
        buf = np.concatenate([[self._smoothing.value], values]).astype(np.float32)
        with self.comm.labelled("display (loss average)"):
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
        with self.comm.labelled("test phase (score sums)"):
            self.share_rank0_statistics()
            return [self.test(i) for i in range(len(self.solver.test_nets))]

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
            with self.comm.labelled("weights checksum"):
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
        the manifest once both files are complete (mpicaffe.snapshot). Returns the two paths.
        Weights that are not finite are never written: `--resume auto` must not find them."""
        if not self.backend.finite():
            raise UserError(f"no snapshot written at iteration {self.solver.iter}: the weights are not finite")
        weights, state = self.solver.snapshot()
        snapshot.record_snapshot(self.solver.param.snapshot_prefix, weights, state, self.solver.iter, self.comm.size,
                                 self.plan.global_batch, self.cfg.keep_snapshots)
        return weights, state

    # --- divergence ---
    def _finite(self) -> bool:
        """Collective, after each iteration: whether every rank's loss and the weights are finite
        (one reduction of a flag)."""
        flag = np.array([0 if np.isfinite(self.solver.loss) and self.backend.finite() else 1], np.int32)
        with self.comm.labelled("divergence check"):
            self.comm.Allreduce_sum(flag)
        return flag[0] == 0

    def _diverged(self, it: int) -> None:
        """Collective, after iteration `it` went non-finite: stop with an error naming it and where
        the values first went non-finite, or (--on-divergence rollback, at most --divergence-retries
        times) go back to the newest verified snapshot with base_lr times --divergence-lr-factor."""
        comm, cfg = self.comm, self.cfg
        with comm.labelled("divergence report"):
            losses = comm.allgather(float(self.solver.loss))
            places = comm.allgather(self.backend.first_non_finite())
        bad = [r for r, loss in enumerate(losses) if not np.isfinite(loss)]
        what = (f"loss = {format_float(losses[bad[0]])} on rank(s) {', '.join(map(str, bad))}" if bad
                else "the loss is finite, but the update made the weights non-finite")
        first = next(((r, place) for r, place in enumerate(places) if place), None)
        where = "" if first is None else f"; first non-finite: {first[1]}" + (f" (rank {first[0]})" if comm.size > 1 else "")
        message = f"Training diverged at iteration {it}: {what}{where}"
        if cfg.on_divergence == "rollback" and self._rollbacks < cfg.divergence_retries:
            prefix = self.param.snapshot_prefix
            with comm.labelled("divergence rollback"):
                found = comm.bcast(comm.agreed(lambda: snapshot.latest_verified_snapshot(prefix) if comm.rank == 0
                                               else None), root=0)
                if found is not None:
                    path, record = found
                    self._rollbacks += 1
                    rate = float(np.float32(self.run_param.base_lr * cfg.divergence_lr_factor))
                    if comm.rank == 0:
                        log.warning("%s. Rolling back (%d of at most %d) to the snapshot of iteration %d (%s) with "
                                    "base_lr %s (%s x %s)", message, self._rollbacks, cfg.divergence_retries,
                                    record.iteration, path, format_float(rate), format_float(self.run_param.base_lr),
                                    format_float(cfg.divergence_lr_factor))
                    if self.backend.rollback(path, rate):
                        self.rebuild_reducer()
                    self.run_param.base_lr = rate
                    self._smoothing = SmoothedLoss(self.param.average_loss)
                    return
            message += f"; no verified snapshot in {snapshot.manifest_path(prefix)} to roll back to"
        elif cfg.on_divergence == "rollback":
            message += f"; rolled back {self._rollbacks} time(s) already (--divergence-retries)"
        else:
            message += " (lower base_lr, or see --on-divergence rollback)"
        raise RankError(message, comm.rank)

    def _stop_at_start(self) -> None:
        """Collective, before the first iteration: a stop asked for during start-up stops here,
        with no snapshot (nothing was trained yet)."""
        with self.comm.labelled("signal agreement before the first iteration"):
            action = self.control.at_boundary(self.solver.iter)
        if action.stop:
            self.stopped_early = action.reason
            if self.comm.rank == 0:
                log.info("Stopped before the first iteration (%s): nothing to snapshot", action.reason)

    def _stop_requested(self) -> bool:
        """Collective, after each iteration: act on signals and the snapshot timer (mpicaffe.signals)."""
        with self.comm.labelled("signal agreement at the iteration boundary"):
            action = self.control.at_boundary(self.solver.iter)
        if action.snapshot:
            self.snapshot()
        if self.comm.rank == 0 and progress.enabled():
            progress.report("iteration", iteration=self.solver.iter)
        if action.stop and self.solver.iter >= self.param.max_iter:
            if self.comm.rank == 0:
                log.info("The stop came with the last iteration: the run is finished")
            return False
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

        with comm.labelled("resume (choosing the snapshot)"):
            found = comm.bcast(comm.agreed(choose), root=0)
        if found is None:
            if comm.rank == 0:
                start = (f"from --snapshot {cfg.snapshot}" if cfg.snapshot else
                         f"finetuning from {cfg.weights}" if cfg.weights else "from scratch")
                log.info("--resume auto: no verified snapshot in %s; starting %s", snapshot.manifest_path(prefix), start)
            return
        path, iteration, ranks, global_batch = found
        self.cfg = dataclasses.replace(cfg, snapshot=path, weights=None)
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
        recovery.prepare(cfg, resolve_backend(cfg.backend), comm)
    trainer = Trainer(cfg, comm)
    if cfg.stall_timeout:
        stall.watch_training(trainer)
    if cfg.fault_tolerance == "ulfm":
        recovery.run(trainer)
    else:
        trainer.run()
    return trainer
