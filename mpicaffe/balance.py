"""`--balance auto`: per-rank batches proportional to each rank's measured speed, global batch kept.

Ranks on different hardware (a GPU and a CPU, or nodes with different core counts) finish an
equal batch at different times, and the synchronous gradient average makes every rank wait for
the slowest. For the first `--balance-iters` iterations each rank times its compute (forward and
backward, without the data wait or the wait for the gradient average); then the ranks exchange
their median seconds per sample and every rank computes the same split of the global batch,
proportional to speed (`split_by_speed`). Each rank re-reads its shard with its new batch
(EngineTraining.reshard) and weights its gradient by local x ranks / global, so the average is
the mean gradient over all the global batch's samples: the update a single process would make
with the whole batch.
"""
from __future__ import annotations

import logging

import numpy as np

from mpicaffe.data.sharding import BatchPlan
from mpicaffe.errors import UserError

log = logging.getLogger(__name__)


def split_by_speed(global_batch: int, seconds_per_sample: list[float]) -> list[int]:
    """Integer batches, one per rank, summing to `global_batch`, each at least 1 and otherwise
    proportional to 1 / seconds_per_sample (largest remainders get the leftover samples, ties to
    the lower rank, so every rank computes the same split)."""
    size = len(seconds_per_sample)
    if global_batch < size:
        raise UserError(f"cannot balance a global batch of {global_batch} over {size} ranks")
    speed = 1.0 / np.maximum(np.asarray(seconds_per_sample, dtype=np.float64), 1e-12)
    # one sample each first, the rest in proportion to speed
    share = (global_batch - size) * speed / speed.sum()
    split = np.floor(share).astype(int)
    leftover = global_batch - size - int(split.sum())
    order = sorted(range(size), key=lambda r: (-(share[r] - split[r]), r))
    for r in order[:leftover]:
        split[r] += 1
    return [int(b) + 1 for b in split]


class Balancer:
    """Measures this rank's compute time for `iters` iterations, then re-splits the batch (once)."""

    def __init__(self, trainer, iters: int):
        self.trainer, self.iters = trainer, iters
        self.samples: list[float] = []
        self.done = False
        self._before = 0.0

    def _compute_seconds(self) -> float:
        t = self.trainer.backend.timings
        return t["forward"] + t["backward"] - t["data"]  # the engine's forward time includes the data wait

    def before_iteration(self) -> None:
        if not self.done:
            self._before = self._compute_seconds()

    def after_iteration(self) -> None:
        """Collective once `iters` iterations were measured: agree on the split and apply it."""
        if self.done:
            return
        self.samples.append(self._compute_seconds() - self._before)
        if len(self.samples) < self.iters:
            return
        self.done = True
        trainer = self.trainer
        comm, plan = trainer.comm, trainer.plan
        per_sample = comm.allgather(float(np.median(self.samples)) / plan.local)
        split = split_by_speed(plan.global_batch, per_sample)
        local = split[comm.rank]
        trainer.apply_plan(BatchPlan(plan.prototxt_batch, local, plan.global_batch, local * comm.size / plan.global_batch))
        if comm.rank == 0:
            log.info("Balance at iteration %d: median compute per sample %s ms; per-rank batch %s (global %d)",
                     trainer.solver.iter, ", ".join(f"{1e3 * s:.3f}" for s in per_sample),
                     ",".join(map(str, split)), plan.global_batch)
