"""Distributed training on the built-in engine: what the trainer needs from an engine solver.

The engine keeps parameters, gradients and solver history in flat buffers, so the start state is
broadcast with one Bcast per buffer, the checksum hashes one buffer, and gradients are averaged
in buckets started while backward runs (BucketReducer) or in one allreduce (FusedReducer). The
buffers go to mpicaffe.parallel as torch tensors, on whatever device the rank trains on. With
`--comm nccl|gloo` the gradient buckets go over a torch.distributed process group instead of MPI
(ProcessGroupReducer; mpicaffe.parallel.process_group). Its
data layers seek to the rank's shard themselves (`set_shard`) and, on resume, skip what the
interrupted run had read (`skip_records`); with `--stage-data` they read a node-local copy of
the shard instead (`read_staged`, mpicaffe.data.staging).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from mpicaffe.backends.engine import snapshot_io, solver_ranks
from mpicaffe.backends.engine.layers.base_data import use_data_workers
from mpicaffe.backends.engine.solver import Solver, get_solver, net_output_values
from mpicaffe.config import TrainConfig
from mpicaffe.data import sharding, staging
from mpicaffe.devices import rank_device, select_device
from mpicaffe.parallel.buffers import host_array
from mpicaffe.parallel.comm import Communicator
from mpicaffe.parallel.process_group import ProcessGroup, choose_comm, nccl_available
from mpicaffe.parallel.reducer import BucketReducer, FusedReducer, ProcessGroupReducer
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


class EngineTraining:
    """One rank's engine solver, set up for distributed training (the trainer's backend adapter).

    Building it is collective: every rank builds the solver and takes its data shard, rank 0
    loads `--weights` or restores `--snapshot`, and rank 0's weights, history and iteration are
    broadcast. A UserError on any rank is raised on all of them.
    """

    name = "the built-in engine"

    def __init__(self, cfg: TrainConfig, comm: Communicator, param: caffe_pb2.SolverParameter,
                 run_param: caffe_pb2.SolverParameter):
        self.cfg, self.comm, self.param, self.run_param = cfg, comm, param, run_param
        self.staged: list[staging.StagedShard] = []
        self.solver: Solver = comm.agreed(self._build)
        self.group = self._open_process_group()
        self._log_staging()
        self._broadcast_state()
        self._skip_read_records()

    def _build(self) -> Solver:
        cfg, comm = self.cfg, self.comm
        if cfg.devices:
            device = rank_device(cfg.devices, comm.rank, comm.size)
        else:
            device = select_device(cfg.gpu, self.param, comm.local_rank)
        solver_ranks.set_solvers(comm.size, comm.rank)  # caffe.solver_count()/solver_rank() for Python layers
        solver = get_solver(self.run_param, cfg.solver, device=device, rank=comm.rank, shown=self.param,
                            precision=cfg.precision)
        solver.set_overflow_agreement(lambda found: any(comm.allgather(found)))  # fp16: skip on every rank or none
        # the trainer never reads intermediate blob diffs: do not keep them (Caffe's debug_info would)
        solver.net.retain_diffs = bool(self.param.debug_info)
        use_data_workers([solver.net, *solver.test_nets], cfg.data_workers, comm.local_size)
        if comm.size > 1 or cfg.stage_data:
            self.staged = shard_data(solver, comm.rank, comm.size, cfg.stage_data)
        if comm.rank == 0:
            if cfg.weights:
                for path in (w.strip() for w in cfg.weights.split(",")):
                    log.info("Finetuning from %s", path)
                    snapshot_io.load_weights(solver.net, path)
            if cfg.snapshot:
                log.info("Resuming from %s", cfg.snapshot)
                solver.restore(cfg.snapshot)
        return solver

    def _open_process_group(self) -> ProcessGroup | None:
        """Collective: `--comm`'s choice for the gradient buckets, from every rank's device: the
        torch.distributed process group to use (NCCL or gloo), or None for MPI."""
        comm = self.comm
        device = str(self.solver.net.flat_data.device)
        ranks = comm.allgather((device, nccl_available()))
        requested = "mpi" if self.cfg.comm == "auto" and self.cfg.fault_tolerance == "ulfm" else self.cfg.comm
        kind = comm.agreed(lambda: choose_comm(requested, [d for d, _ in ranks], [n for _, n in ranks]))
        if comm.rank == 0 and self.cfg.comm == "auto":
            log.info("--comm auto: gradients averaged with %s", kind.upper())
        if kind == "mpi" or comm.size == 1:
            return None
        return ProcessGroup(comm, kind, device, self.cfg.stall_timeout)

    def _log_staging(self) -> None:
        """--stage-data: rank 0 logs what every rank copied or reused, and how long it took."""
        if not self.cfg.stage_data:
            return
        reports = self.comm.allgather((staging.describe(self.comm.rank, self.staged),
                                       sum(s.seconds for s in self.staged)))
        if self.comm.rank == 0:
            log.info("Staged data in %s: %.2f s on the slowest rank", self.cfg.stage_data,
                     max(seconds for _, seconds in reports))
            for line, _ in reports:
                log.info("  %s", line)

    def _broadcast_state(self) -> None:
        """Make every rank start from rank 0's weights, solver history and iteration."""
        solver, comm = self.solver, self.comm
        if comm.size == 1:
            return
        with comm.labelled("start-state broadcast"):
            comm.Bcast_tensor(solver.net.flat_data, root=0)
            for h in solver.history:
                comm.Bcast_tensor(h, root=0)
            solver.iter, solver.current_step = comm.bcast((solver.iter, solver.current_step), root=0)

    def _skip_read_records(self) -> None:
        """On resume at iteration K, start each data layer where an uninterrupted run would be
        (Caffe restarts at the first record; mpicaffe continues the trajectory)."""
        if self.solver.iter == 0:
            return
        train, tests = sharding.batches_read(self.param, self.solver.iter, self.comm.rank, self.comm.size)
        for net, batches in zip([self.solver.net, *self.solver.test_nets], [train, *tests]):
            for layer in net.layers:
                if hasattr(layer, "skip_records"):
                    layer.skip_records(batches * layer.batch_size)

    def reshard(self, local_batch: int) -> None:
        """ULFM recovery, after the ranks changed: read this rank's new shard with `local_batch`
        records per train batch, from where a fresh run on this many ranks resumed at `iter` would
        (so the data order after a recovery is that of `--snapshot` with `--global-batch`)."""
        solver, comm = self.solver, self.comm
        nets = [solver.net, *solver.test_nets]
        for net in nets:
            for layer in net.layers:
                if hasattr(layer, "stop_reading"):
                    layer.stop_reading()
        for layer in solver.net.layers:
            if hasattr(layer, "set_shard"):
                layer.batch_size = local_batch
        self.staged = shard_data(solver, comm.rank, comm.size, self.cfg.stage_data)
        for net in nets:
            for layer in net.layers:
                if hasattr(layer, "skip_records"):
                    layer.skip_records(0)
        self._skip_read_records()

    # --- what the training loop uses ---
    @property
    def current_step(self) -> int:
        return self.solver.current_step

    @property
    def timings(self) -> dict[str, float]:
        return self.solver.net.timings

    def make_reducer(self, weight: float) -> BucketReducer | FusedReducer | ProcessGroupReducer:
        net = self.solver.net
        # over a process group, --no-overlap is one bucket: reduced after backward
        bucket_bytes = int(self.cfg.bucket_mb * (1 << 20)) if self.cfg.overlap else 1 << 62
        if self.group is not None:
            return ProcessGroupReducer(self.group, net, weight, bucket_bytes, self.run_param.iter_size)
        if self.cfg.overlap:
            return BucketReducer(self.comm, net, weight, bucket_bytes, self.run_param.iter_size)
        return FusedReducer(self.comm, [net.flat_diff], weight)

    def parameter_arrays(self) -> list[np.ndarray]:
        """The learned blobs, as numpy arrays to read (views on the CPU, one copy from a GPU)."""
        net = self.solver.net
        flat = host_array(net.flat_data)
        return [flat[i.offset:i.offset + i.count] for i in net.param_infos if i.learnable]

    def statistics_arrays(self) -> list[torch.Tensor]:
        """Views of the flat weights buffer holding the statistics (blobs a layer writes in
        forward, BatchNorm's), in the net's order, as tensors on the net's device (the
        communicator writes them in place)."""
        net = self.solver.net
        flat = net.flat_data.detach()
        return [flat[i.offset:i.offset + i.count] for i in net.param_infos if not i.learnable]

    def output_values(self, net) -> tuple[list[str], np.ndarray, list[float]]:
        return net_output_values(net)

    def forward_loss(self) -> float:
        with torch.no_grad():
            return float(self.solver.net.forward())

    def test_sums(self, i: int, count: int) -> tuple[list[str], np.ndarray, list[float], np.float32]:
        names, sums, weights, loss, _ = self.solver.test_sums(i, count)
        return names, sums, weights, loss

    def finite(self) -> bool:
        """Whether the train net's weights and statistics are all finite, by their sum: one pass
        without a temporary (LeNet 0.05 ms, ResNet-50 6 ms here, 25x less than an elementwise
        check); a NaN or inf makes it non-finite, as do weights so large that it overflows."""
        return bool(torch.isfinite(self.solver.net.flat_data.detach().sum()))

    def first_non_finite(self) -> str | None:
        return self.solver.net.first_non_finite()

    def rollback(self, state_path: str, base_lr: float) -> bool:
        """Collective: go back to the snapshot `state_path` (rank 0 reads it; every rank takes its
        weights, history and iteration) and train on at `base_lr`; the data layers read on. Returns
        whether the solver was rebuilt (no: the reducer still holds)."""
        self.comm.agreed(lambda: self.solver.restore(state_path) if self.comm.rank == 0 else None)
        self._broadcast_state()
        self.run_param.base_lr = base_lr
        return False

    def close(self) -> None:
        for net in [self.solver.net, *self.solver.test_nets]:
            net.close()
        if self.group is not None:
            self.group.close()
            self.group = None


def shard_data(solver: Solver, rank: int, size: int, stage_dir: str | None = None,
               test_nets: bool = True) -> list[staging.StagedShard]:
    """Give each rank its contiguous shard of every database (of the train net's alone without
    `test_nets`); a train shard must hold a batch. With `stage_dir`, each LMDB shard is copied
    there (or an earlier copy reused) and read from there; returns the staged copies."""
    staged = []
    for net in [solver.net, *solver.test_nets] if test_nets else [solver.net]:
        for layer in net.layers:
            if not hasattr(layer, "set_shard"):
                continue
            layer.set_shard(rank, size)
            start, end = layer.bounds
            if net is solver.net and end - start < layer.batch_size:
                raise layer.error(f"rank {rank}'s shard holds {end - start} records, fewer than one batch "
                                  f"({layer.batch_size}); use fewer ranks or a smaller batch")
            if stage_dir and hasattr(layer, "read_staged"):
                shard = staging.stage_lmdb(layer.source_db, rank, size, stage_dir)
                layer.read_staged(shard.path)
                staged.append(shard)
    return staged
