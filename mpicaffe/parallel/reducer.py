"""Gradient averaging across ranks: one fused buffer, or buckets overlapped with backward.

FusedReducer averages a list of gradient arrays by packing them into one buffer (the pycaffe
backend's per-parameter diffs) or, for one contiguous buffer (the engine's flat_diff), in place.

BucketReducer (built-in engine) splits the flat diff buffer into size-capped buckets in the order
backward produces them (last layers first) and starts a non-blocking allreduce on each as soon as
every parameter in it has its gradient, so communication overlaps the rest of backward. Buckets
start strictly in order, so every rank issues the same collectives in the same order.

Both take a per-rank `weight`: the local gradient is multiplied by it before the sum and the sum
divided by the number of ranks, which gives the batch-weighted mean when ranks hold batches of
different sizes (weight = local batch * ranks / global batch).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from mpicaffe.parallel.comm import Communicator


class FusedReducer:
    """Average `arrays` (numpy views of gradients) across ranks with one allreduce."""

    def __init__(self, comm: Communicator, arrays: list[np.ndarray], weight: float = 1.0):
        self.comm = comm
        self.arrays = arrays
        self.weight = np.float32(weight)
        self.in_place = len(arrays) == 1 and arrays[0].flags.c_contiguous
        total = sum(a.size for a in arrays)
        self.buffer = arrays[0].reshape(-1) if self.in_place else np.zeros(total, np.float32)
        self.seconds = 0.0

    def start(self) -> None:
        """Nothing to do before backward (the fused reducer runs after it)."""

    def finish(self) -> None:
        """Average the gradients in place across ranks."""
        start = time.perf_counter()
        if self.comm.size > 1:
            if not self.in_place:
                offset = 0
                for a in self.arrays:
                    self.buffer[offset:offset + a.size] = a.reshape(-1)
                    offset += a.size
            if self.weight != 1:
                self.buffer *= self.weight
            self.comm.Allreduce_sum(self.buffer)
            self.buffer *= np.float32(1.0 / self.comm.size)
            if not self.in_place:
                offset = 0
                for a in self.arrays:
                    a.reshape(-1)[...] = self.buffer[offset:offset + a.size]
                    offset += a.size
        self.seconds += time.perf_counter() - start


class BucketReducer:
    """Average an engine net's `flat_diff` across ranks in buckets started during backward.

    `start()` arms the reducer at the beginning of an iteration (iter_size backward passes are
    expected before the gradients are complete); `finish()` starts any bucket not yet started,
    waits for all, and scales the result.
    """

    def __init__(self, comm: Communicator, net, weight: float = 1.0, bucket_bytes: int = 1 << 20,
                 iter_size: int = 1):
        self.comm = comm
        self.weight = np.float32(weight)
        self.iter_size = iter_size
        self.buffer = net.flat_diff.detach().numpy()
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
        self._remaining = [0] * len(self.buckets)
        self._requests: list = []
        self._next = 0
        self._armed = False

    def start(self) -> None:
        self._remaining = [m * self.iter_size for m in self._members]
        self._requests = []
        self._next = 0
        self._armed = self.comm.size > 1

    def _on_grad(self, tensor: torch.Tensor) -> None:
        if not self._armed:
            return
        self._remaining[self._bucket_of[id(tensor)]] -= 1
        if self._remaining[self._bucket_of[id(tensor)]] == 0:
            self._launch_ready()
        for r in self._requests:  # drive progress of what is in flight
            r.Test()

    def _launch_ready(self) -> None:
        t = time.perf_counter()
        # the last bucket completes when backward does: finish() reduces it, blocking
        while self._next < len(self.buckets) - 1 and self._remaining[self._next] <= 0:
            lo, hi = self.buckets[self._next]
            view = self.buffer[lo:hi]
            if self.weight != 1:
                view *= self.weight
            self._requests.append(self.comm.Iallreduce_sum(view))
            self._next += 1
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        if not self._armed:
            return
        # buckets still waiting have nothing left to overlap with: a blocking allreduce is cheaper
        # than a non-blocking one Open MPI only advances inside MPI calls
        t = time.perf_counter()
        for lo, hi in self.buckets[self._next:]:
            view = self.buffer[lo:hi]
            if self.weight != 1:
                view *= self.weight
            self.comm.Allreduce_sum(view)
        self._next = len(self.buckets)
        for r in self._requests:
            r.Wait()
        self.buffer *= np.float32(1.0 / self.comm.size)
        self.seconds += time.perf_counter() - t
        self._armed = False

    def abandon(self) -> None:
        """Drop the buckets in flight after a collective failed and the communicator was revoked
        (ULFM recovery): wait for each to end, in error, so that none writes into the gradients
        later."""
        for r in self._requests:
            try:
                r.Wait()
            except Exception:  # noqa: BLE001,S110 -- failing is what a request on a revoked communicator does
                pass
        self._requests, self._next, self._armed = [], len(self.buckets), False
