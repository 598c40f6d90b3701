"""Gradient averaging across ranks: one fused buffer, or buckets overlapped with backward.

FusedReducer averages a list of gradients by packing them into one buffer (the pycaffe backend's
per-parameter diffs) or, for one contiguous buffer (the engine's flat_diff), in place.

BucketReducer (built-in engine) splits the flat diff buffer into size-capped buckets in the order
backward produces them (last layers first) and starts a non-blocking allreduce on each as soon as
every parameter in it has its gradient, so communication overlaps the rest of backward. Buckets
start strictly in order, so every rank issues the same collectives in the same order.
ProcessGroupReducer does the same over a torch.distributed process group (`--comm nccl|gloo`,
mpicaffe.parallel.process_group) instead of MPI.

The reducers take torch tensors on any device (numpy arrays too: the pycaffe backend's diffs);
MPI reaches them through mpicaffe.parallel.buffers (CPU: numpy views, nothing copied; CUDA: the
device pointer for CUDA-aware MPI, else a pinned host copy staged per bucket as it becomes ready,
so the overlap holds on a GPU too). Scaling happens on the tensor's own device.

All take a per-rank `weight`: the local gradient is multiplied by it before the sum and the sum
divided by the number of ranks, which gives the batch-weighted mean when ranks hold batches of
different sizes (weight = local batch * ranks / global batch).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from mpicaffe.parallel.buffers import HostBuffer
from mpicaffe.parallel.comm import Communicator


class FusedReducer:
    """Average `grads` (torch tensors, or numpy views of gradients) across ranks with one allreduce."""

    def __init__(self, comm: Communicator, grads: list[torch.Tensor | np.ndarray], weight: float = 1.0):
        self.comm = comm
        # numpy arrays (pycaffe's diffs) become tensors over the same memory
        self.grads = [torch.from_numpy(g) if isinstance(g, np.ndarray) else g.detach() for g in grads]
        self.weight = np.float32(weight)
        self.in_place = len(self.grads) == 1 and self.grads[0].is_contiguous()
        if self.in_place:
            self.flat = self.grads[0].view(-1)
        else:
            self.flat = torch.zeros(sum(g.numel() for g in self.grads), dtype=torch.float32,
                                    device=self.grads[0].device)
        self.buffer = HostBuffer(self.flat)
        self.seconds = 0.0

    def start(self) -> None:
        """Nothing to do before backward (the fused reducer runs after it)."""

    def finish(self) -> None:
        """Average the gradients in place across ranks."""
        start = time.perf_counter()
        if self.comm.size > 1:
            if not self.in_place:
                offset = 0
                for g in self.grads:
                    self.flat[offset:offset + g.numel()] = g.reshape(-1)
                    offset += g.numel()
            if self.weight != 1:
                self.buffer.scale_(self.weight)
            self.buffer.stage()
            self.buffer.wait_ready()
            self.comm.Allreduce_sum(self.buffer.message)
            self.buffer.unstage()
            self.buffer.scale_(1.0 / self.comm.size)
            if not self.in_place:
                offset = 0
                for g in self.grads:
                    g.copy_(self.flat[offset:offset + g.numel()].view(g.shape))
                    offset += g.numel()
        self.seconds += time.perf_counter() - start


class _Buckets:
    """Bucketing of an engine net's `flat_diff` and the gradient hooks that say when a bucket is
    complete; subclasses say how a bucket is reduced (`_launch` during backward, `_reduce_now`
    after it, `_wait_all`).

    `start()` arms the reducer at the beginning of an iteration (iter_size backward passes are
    expected before the gradients are complete); `finish()` reduces every bucket not yet started,
    waits for all, and scales the result.
    """

    def __init__(self, net, weight: float, bucket_bytes: int, iter_size: int, mode: str | None = None):
        self.weight = np.float32(weight)
        self.iter_size = iter_size
        self.grads = net.flat_diff.detach().view(-1)
        self.seconds = 0.0
        # params from the end of the buffer to the start: backward produces them in that order
        infos = sorted(zip(net.param_infos, net.learnable_params), key=lambda p: p[0].offset, reverse=True)
        self.buckets: list[tuple[int, int]] = []
        self._members: list[int] = []  # learnable params per bucket
        bucket_of: dict[int, int] = {}
        lo = hi = None
        members = 0
        for info, tensor in infos:
            if hi is None:
                hi = info.offset + info.count
            elif (hi - info.offset) * 4 > bucket_bytes:
                self.buckets.append((lo, hi))
                self._members.append(members)
                hi, members = lo, 0
            lo = info.offset
            if tensor.requires_grad:
                bucket_of[id(tensor)] = len(self.buckets)
                members += 1
                tensor.register_post_accumulate_grad_hook(self._on_grad)
        if hi is not None:
            self.buckets.append((lo, hi))
            self._members.append(members)
        self._bucket_of = bucket_of
        # how MPI (or, for scaling alone, the CPU) reaches the buckets: mpicaffe.parallel.buffers
        self.host = HostBuffer(self.grads, mode)
        self._parts = [self.host.part(lo, hi) for lo, hi in self.buckets]
        self._remaining = [0] * len(self.buckets)
        self._next = 0
        self._armed = False

    def start(self) -> None:
        self._remaining = [m * self.iter_size for m in self._members]
        self._next = 0
        self._armed = self.size > 1

    def _on_grad(self, tensor: torch.Tensor) -> None:
        if not self._armed:
            return
        self._remaining[self._bucket_of[id(tensor)]] -= 1
        if self._remaining[self._bucket_of[id(tensor)]] == 0:
            t = time.perf_counter()
            # the last bucket completes when backward does: finish() reduces it, blocking
            while self._next < len(self.buckets) - 1 and self._remaining[self._next] <= 0:
                self._scale(self._next)
                self._launch(self._next)
                self._next += 1
            self.seconds += time.perf_counter() - t
        self._progress()

    def _scale(self, i: int) -> None:
        if self.weight != 1:
            self._parts[i].scale_(self.weight)

    def finish(self) -> None:
        if not self._armed:
            return
        # buckets still waiting have nothing left to overlap with: a blocking allreduce is cheaper
        # than a non-blocking one Open MPI only advances inside MPI calls
        t = time.perf_counter()
        for i in range(self._next, len(self.buckets)):
            self._scale(i)
            self._reduce_now(i)
        self._next = len(self.buckets)
        self._wait_all()
        self.host.scale_(1.0 / self.size)
        self.seconds += time.perf_counter() - t
        self._armed = False

    # --- how a bucket is reduced ---
    @property
    def size(self) -> int:
        """The number of ranks now (a ULFM recovery shrinks the communicator under the reducer)."""
        raise NotImplementedError

    def _launch(self, i: int) -> None:
        """Bucket i's gradients are complete (buckets come in order): start reducing it."""
        raise NotImplementedError

    def _progress(self) -> None:
        """Called at every gradient hook: drive what is in flight."""

    def _reduce_now(self, i: int) -> None:
        """After backward: reduce bucket i, blocking."""
        raise NotImplementedError

    def _wait_all(self) -> None:
        """Wait for every bucket started by `_launch`; the gradients then hold the sums."""
        raise NotImplementedError


class BucketReducer(_Buckets):
    """Average an engine net's `flat_diff` across the ranks of `comm` (MPI) in buckets started
    during backward.

    On a GPU without CUDA-aware MPI each complete bucket is first copied to pinned host memory
    (mpicaffe.parallel.buffers); its allreduce starts once that copy has finished, checked at
    each later gradient hook, so backward's remaining kernels and the copies overlap the
    communication. A bucket that was complete during backward is always reduced non-blocking and
    the rest blocking, whatever the copies' timing, so every rank's collectives match.
    """

    def __init__(self, comm: Communicator, net, weight: float = 1.0, bucket_bytes: int = 1 << 20,
                 iter_size: int = 1):
        self.comm = comm
        super().__init__(net, weight, bucket_bytes, iter_size)
        self._staged: list[int] = []  # complete buckets whose copy to the host may still run
        self._requests: list = []

    @property
    def size(self) -> int:
        return self.comm.size

    def start(self) -> None:
        super().start()
        self._staged, self._requests = [], []

    def _launch(self, i: int) -> None:
        part = self._parts[i]
        part.stage()
        if not self._staged and part.ready():  # always so on the CPU
            self._requests.append(self.comm.Iallreduce_sum(part.message))
            return
        self._staged.append(i)
        self._start_staged(wait=False)

    def _start_staged(self, wait: bool) -> None:
        """Start the allreduce of the staged buckets, in order, whose copy has finished (all with `wait`)."""
        while self._staged:
            part = self._parts[self._staged[0]]
            if wait:
                part.wait_ready()
            elif not part.ready():
                return
            self._requests.append(self.comm.Iallreduce_sum(part.message))
            self._staged.pop(0)

    def _progress(self) -> None:
        if self._staged:
            self._start_staged(wait=False)
        for r in self._requests:  # drive progress of what is in flight
            r.Test()

    def _reduce_now(self, i: int) -> None:
        self._start_staged(wait=True)
        part = self._parts[i]
        part.stage()
        part.wait_ready()
        self.comm.Allreduce_sum(part.message)

    def _wait_all(self) -> None:
        self._start_staged(wait=True)
        for r in self._requests:
            r.Wait()
        self.host.unstage()

    def abandon(self) -> None:
        """Drop the buckets in flight after a collective failed and the communicator was revoked
        (ULFM recovery): wait for each to end, in error, so that none writes into the gradients
        later."""
        for r in self._requests:
            try:
                r.Wait()
            except Exception:  # noqa: BLE001,S110 -- failing is what a request on a revoked communicator does
                pass
        self._requests, self._staged, self._next, self._armed = [], [], len(self.buckets), False


class ProcessGroupReducer(_Buckets):
    """Average an engine net's `flat_diff` over a torch.distributed process group (NCCL or gloo,
    mpicaffe.parallel.process_group.ProcessGroup) in buckets started during backward: the same
    buckets and order as BucketReducer, each an `all_reduce(async_op=True)` on the tensor where
    it lives (NCCL orders it after the kernels that wrote it on the GPU)."""

    def __init__(self, group, net, weight: float = 1.0, bucket_bytes: int = 1 << 20, iter_size: int = 1):
        # no MPI here: the buffer's parts serve to scale it where it lives
        self.group = group
        super().__init__(net, weight, bucket_bytes, iter_size,
                         mode="view" if net.flat_diff.device.type == "cpu" else "device")
        self._works: list = []

    @property
    def size(self) -> int:
        return self.group.size

    def start(self) -> None:
        super().start()
        self._works = []

    def _launch(self, i: int) -> None:
        self._works.append(self.group.all_reduce(self._parts[i].tensor, async_op=True))

    def _reduce_now(self, i: int) -> None:
        self.group.all_reduce(self._parts[i].tensor, async_op=False)

    def _wait_all(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []
