"""Adaptive apoptosis during `mpicaffe train` (either backend): the net shrinks as it trains.

Every `every` iterations, until the net has lost `target` of its starting parameters and of its
multiply-adds per sample, rank 0 ranks each prunable group's channels by the criterion and
removes the same fraction of every group's channels: at most `step`, and no more than reaching
the target needs.
Parameters alone would let a net whose parameters sit in a fully connected layer (LeNet's ip1)
stop while its convolutions, which take the time, are still large; the multiply-adds keep it
going until those shrink as much. (Sparing the cheap ip1 and cutting the convolutions harder to
reach the same parameters cost LeNet accuracy in a trial, 97.1% against 97.6%: its conv1 and
conv2 channels matter most, so every group loses the same fraction.) Data
criteria look at `samples` batches of the training data, run through the train net in phase TEST
(no dropout) on rank 0 with a reader of its own, so the training data order is untouched. The
decision (channel indices per group) is broadcast, and every rank applies the same surgery to
its train and test nets, weights and solver history (mpicaffe.prune.live); training continues
with the smaller net and a gradient reducer built for it. Each pruning is logged with the net's
size, so the log records the size over time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from mpicaffe import prototxt
from mpicaffe.atomic import write_bytes_atomic
from mpicaffe.backends.engine.snapshot_io import read_resume_state
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune import criteria
from mpicaffe.prune.arguments import CRITERIA, DATA_CRITERIA
from mpicaffe.prune.dependencies import Analysis
from mpicaffe.prune.live import analyze_solver, multiply_add_count, parameter_count, probe_net, prune_solver
from mpicaffe.prune.surgery import plan_cuts, prune_net_param

log = logging.getLogger(__name__)


@dataclass
class ApoptosisConfig:
    """--prune-every, --prune-criterion, --prune-target, --prune-step, --prune-samples."""

    every: int
    criterion: str = "apoptosis"
    target: float = 0.75
    step: float = 0.25
    samples: int = 5

    def check(self) -> None:
        if self.every < 1:
            raise UserError(f"--prune-every must be >= 1 (got {self.every})")
        if self.criterion not in CRITERIA:
            raise UserError(f"--prune-criterion: unknown criterion '{self.criterion}' "
                            f"(choose {', '.join(CRITERIA)})")
        if not 0 < self.target < 1:
            raise UserError(f"--prune-target must be a fraction of the parameters between 0 and 1 (got {self.target})")
        if not 0 < self.step <= 1:
            raise UserError(f"--prune-step must be between 0 and 1 (got {self.step})")
        if self.samples < 1:
            raise UserError(f"--prune-samples must be >= 1 (got {self.samples})")


@dataclass(frozen=True)
class Size:
    """A net's parameters and multiply-adds per sample."""

    params: int
    macs: int

    @classmethod
    def of(cls, net, cuts=None) -> Size:
        return cls(parameter_count(net, cuts), multiply_add_count(net, cuts))

    def within(self, goal: Size) -> bool:
        return self.params <= goal.params and self.macs <= goal.macs


def choose_removal(solver, cfg: ApoptosisConfig, goal: Size, analysis: Analysis) -> tuple[dict[str, list[int]], float]:
    """(group name -> channels to remove, the fraction used) for one pruning of `solver`: the
    smallest fraction <= cfg.step of every group's channels that brings the net within `goal`,
    else cfg.step."""
    orders = {}
    if cfg.criterion in DATA_CRITERIA:
        probe = probe_net(solver.net)
        try:
            if probe.inputs:
                raise UserError(f"--prune-criterion {cfg.criterion} needs a data layer in the train net")
            stats = criteria.collect_activations(probe, analysis.groups, cfg.samples)
        finally:
            probe.close()
        for g in analysis.groups:
            orders[g.name] = criteria.removal_order(cfg.criterion, stats=stats[g.name])
    else:
        weights = {layer.name: [t.detach().cpu().numpy() for t in layer.blobs] for layer in solver.net.layers}
        for g in analysis.groups:
            orders[g.name] = criteria.removal_order(cfg.criterion, criteria.weight_scores(g, weights, cfg.criterion))

    def removal(ratio: float) -> dict[str, np.ndarray]:
        out = {}
        for g in analysis.groups:
            chosen = criteria.choose(*orders[g.name], g.channels, ratio=ratio)
            if chosen.size:
                out[g.name] = chosen
        return out

    def within(ratio: float) -> bool:
        return Size.of(solver.net, plan_cuts(analysis, removal(ratio))).within(goal)

    lo, hi = 0.0, cfg.step
    if within(hi):
        for _ in range(20):  # bisect for the smallest fraction that reaches the goal
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return {k: v.tolist() for k, v in removal(hi).items()}, hi


class Apoptosis:
    """The trainer's pruning hook: call `after_iteration()` on every rank after each iteration.

    On real Caffe (`--backend caffe`), whose solver cannot shrink in place, each pruning goes
    through a snapshot: rank 0 writes one, loads it into the built-in engine's solver for the nets
    as pruned so far (the mirror), decides and cuts there as above, and broadcasts the cuts and
    the pruned weights and history; every rank then builds a smaller pycaffe solver and restores
    them into it (CaffeTraining.rebuild).
    """

    def __init__(self, cfg: ApoptosisConfig, trainer):
        cfg.check()
        self.cfg, self.trainer = cfg, trainer
        self.caffe = not hasattr(trainer.solver, "replace_nets")
        nets = prototxt.solver_nets(trainer.param, trainer.cfg.solver)
        self.net_param, self.net_source = nets.train, nets.train_source  # the train net as written, pruned so far
        self.done = False
        if trainer.comm.rank != 0:
            return  # rank 0 decides; with real Caffe it alone holds the sizes
        if self.caffe:
            with _quiet_engine(), tempfile.TemporaryDirectory(prefix="mpicaffe-apoptosis-") as scratch:
                mirror = self._mirror(scratch)
                self.start = Size.of(mirror.net)
                _close(mirror)
        else:
            self.start = Size.of(trainer.solver.net)
        self.goal = Size(round((1 - cfg.target) * self.start.params), round((1 - cfg.target) * self.start.macs))
        log.info("Apoptosis: every %d iterations by %s, until %s parameters and %s multiply-adds per sample "
                 "(%s and %s now, target %g removed)", cfg.every, cfg.criterion, f"{self.goal.params:,}",
                 f"{self.goal.macs:,}", f"{self.start.params:,}", f"{self.start.macs:,}", cfg.target)

    def after_iteration(self) -> None:
        solver, comm = self.trainer.solver, self.trainer.comm
        it = solver.iter
        if self.done or it % self.cfg.every or it >= solver.param.max_iter:
            return
        if self.caffe:
            self._prune_caffe(it)
            return
        analysis = analyze_solver(solver)
        decision = comm.agreed(lambda: self._decide(solver, analysis) if comm.rank == 0 else None)
        removed, ratio = comm.bcast(decision, root=0)
        if not removed:
            self.done = True
            return
        before = {g.name: g.channels for g in analysis.groups}
        cuts = prune_solver(solver, removed, analysis)
        self.net_param = prune_net_param(self.net_param, cuts)
        self.trainer.rebuild_reducer()
        if comm.rank == 0:
            now = Size.of(solver.net)
            self.done = now.within(self.goal)
            log.info(self._report(it, ratio, before, removed, now))
            self._write_net(it)
        self.done = comm.bcast(self.done, root=0)

    def _prune_caffe(self, it: int) -> None:
        """Real Caffe: snapshot, prune the snapshot's state in the mirror, rebuild and restore."""
        trainer, comm = self.trainer, self.trainer.comm
        trainer.snapshot()  # Caffe's solver history can only be read from a snapshot (rank 0 writes it)
        decision = comm.bcast(comm.agreed(lambda: self._decide_caffe(it) if comm.rank == 0 else None), root=0)
        if decision is None:
            self.done = True
            return
        cuts, state, self.done, report = decision
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(trainer.backend.source_param)
        param.train_net_param.CopyFrom(prune_net_param(param.train_net_param, cuts))
        for net in param.test_net_param:
            net.CopyFrom(prune_net_param(net, cuts))
        trainer.backend.rebuild(param, state)
        trainer.rebuild_reducer()
        self.net_param = prune_net_param(self.net_param, cuts)
        if comm.rank == 0:
            log.info(report)
            self._write_net(it)

    def _decide_caffe(self, it: int):
        """Rank 0: (cuts, pruned ResumeState, target reached, report) from the snapshot just
        written, or None when nothing is to be removed."""

        _, state_path = self.trainer.solver.snapshot_paths()
        with _quiet_engine(), tempfile.TemporaryDirectory(prefix="mpicaffe-apoptosis-") as scratch:
            mirror = self._mirror(scratch)
            try:
                mirror.restore(state_path)
                analysis = analyze_solver(mirror)
                removed, ratio = self._decide(mirror, analysis)
                if not removed:
                    return None
                before = {g.name: g.channels for g in analysis.groups}
                cuts = prune_solver(mirror, removed, analysis)
                now = Size.of(mirror.net)
                state = read_resume_state(mirror.snapshot()[1])
            finally:
                _close(mirror)
        return cuts, state, now.within(self.goal), self._report(it, ratio, before, removed, now)

    def _mirror(self, scratch: str):
        """The built-in engine's solver for the nets as real Caffe runs them now (data sources
        unsharded), on the CPU, snapshotting into `scratch`."""
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(self.trainer.backend.source_param)
        param.snapshot_prefix = os.path.join(scratch, "pruned")
        return get_solver(param, self.trainer.cfg.solver)

    def _report(self, it: int, ratio: float, before: dict[str, int], removed: dict[str, list[int]], now: Size) -> str:
        shrunk = ", ".join(f"{name} {before[name]}->{before[name] - len(ch)}" for name, ch in removed.items())
        return (f"Apoptosis at iteration {it}: removed {ratio:.3g} of each layer's channels ({shrunk}); net size "
                f"{now.params:,} parameters ({self.start.params / max(now.params, 1):.2f}x fewer than at the start), "
                f"{now.macs:,} multiply-adds per sample ({self.start.macs / max(now.macs, 1):.2f}x fewer)")

    def _write_net(self, it: int) -> None:
        """Rank 0: the pruned train net, beside the snapshots, for loading them later."""
        prefix = self.trainer.param.snapshot_prefix
        path = f"{prefix}_iter_{it}.prototxt"
        try:
            write_bytes_atomic(path, prototxt.to_text(self.net_param).encode())
        except OSError as e:
            log.warning("Apoptosis: could not write the pruned net to %s: %s", path, e.strerror or e)
            return
        log.info("Apoptosis: the pruned net (from %s) is in %s", self.net_source, path)

    def _decide(self, solver, analysis: Analysis) -> tuple[dict[str, list[int]], float]:
        if Size.of(solver.net).within(self.goal) or not analysis.groups:
            return {}, 0.0
        return choose_removal(solver, self.cfg, self.goal, analysis)


@contextlib.contextmanager
def _quiet_engine():
    """The mirror's solver and snapshot messages are not the run's: keep them out of the log."""
    engine_log = logging.getLogger("mpicaffe.backends.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        engine_log.setLevel(level)


def _close(solver) -> None:
    for net in [solver.net, *solver.test_nets]:
        net.close()
