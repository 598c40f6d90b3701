"""What the data layers that read files share (Caffe's base_data_layer): the prefetch thread and
the worker threads that decode and transform each batch.

Data and ImageData read in a background thread that keeps up to `data_param.prefetch` ready
batches (numpy) in a bounded queue, so reading overlaps compute; on a GPU the thread also pins
them, so the copy to the device runs asynchronously. The images of each batch are decoded and
transformed by the layer's BatchWorkers: `data_workers` threads (`mpicaffe train --data-workers`),
or in the prefetch thread itself when it is 0. Call `close()` to stop the threads (the prefetch
thread is a daemon thread and is also stopped when the layer is collected). Also here: the
batch-size check and the random streams every reading data layer draws from.
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.data.transform import DataTransformer
from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

# random streams of make_rng: one per use, so that one does not shift another's draws
SKIP_STREAM, SHUFFLE_STREAM = 1, 2

# worker threads of a layer that `mpicaffe train` does not configure (pycaffe's Net, test, time)
DEFAULT_DATA_WORKERS = max(1, min(4, os.cpu_count() or 1))
# tasks per worker and stage of a batch: fewer hand-offs, yet a short tail when the stage ends
CHUNKS_PER_WORKER = 4


class BatchWorkers:
    """Decode and transform the images of each batch on `workers` threads (0: in the calling thread).

    Threads rather than processes: Pillow's JPEG decoder and numpy's copies and arithmetic release
    the GIL, and threads share the decoded images and the output batch without pickling them (on
    2 cores, 2 workers read JPEG records 1.5x as fast as none; docs/benchmarks.md).
    The random draws stay in the calling thread, in batch order (DataTransformer.draw_images),
    so a batch is the same bit for bit whatever the number of workers.
    """

    def __init__(self, workers: int, name: str):
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None

    def decode(self, decode: Callable, items: Sequence) -> Callable[[], list]:
        """Start `decode(item)` for every item; returns a function that waits for the results, in
        order, raising the exception of the first item that failed. With no workers nothing
        starts: the function decodes in the caller."""
        if self._pool is None:
            return lambda: [decode(item) for item in items]
        futures = [self._pool.submit(_map, decode, chunk) for chunk in self._chunks(list(items))]
        return lambda: [result for future in futures for result in future.result()]

    def transform(self, transformer: DataTransformer, arrays: list[np.ndarray],
                  names: Sequence[str]) -> np.ndarray:
        """transformer.transform_images(arrays, names), its per-image work spread over the workers."""
        if self._pool is None:
            return transformer.transform_images(arrays, names)
        shape, draws = transformer.draw_images([a.shape for a in arrays], names)
        out = np.empty((len(arrays),) + shape, dtype=np.float32)

        def transform_chunk(indices: list[int]) -> None:
            for i in indices:
                transformer.transform_image(arrays[i], draws, i, out[i])

        futures = [self._pool.submit(transform_chunk, chunk) for chunk in self._chunks(list(range(len(arrays))))]
        for future in futures:
            future.result()
        return out

    def _chunks(self, items: list) -> list[list]:
        size = max(1, -(-len(items) // (self.workers * CHUNKS_PER_WORKER)))
        return [items[i:i + size] for i in range(0, len(items), size)]

    def close(self) -> None:
        """Stop the threads, dropping the work not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _map(function: Callable, items: list) -> list:
    return [function(item) for item in items]


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs a batch iterator in a daemon thread, keeping up to `depth` ready batches queued.

    `make_batches` is called in the thread (so that it may open thread-bound resources such as an
    LMDB read transaction there); its iterator is closed when the thread ends. An exception in
    the thread is raised by the next `get`.
    """

    def __init__(self, make_batches: Callable[[], Iterator], depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._failure: _Failure | None = None
        self.thread = threading.Thread(target=self._run, args=(make_batches,), name=name, daemon=True)
        self.thread.start()

    def _run(self, make_batches: Callable[[], Iterator]) -> None:
        batches = None
        try:
            batches = make_batches()
            for batch in batches:
                if not self._put(batch):
                    break
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._put(_Failure(e))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        """The next batch, waiting for the thread if none is ready."""
        if self._failure is not None:
            raise self._failure.error
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetch thread {self.thread.name} has stopped") from None
                continue
            if isinstance(item, _Failure):
                self._failure = item
                raise item.error
            return item

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and drop the queued batches."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class PrefetchingLayer(Layer):
    """A data layer whose batches come from a Prefetcher started at the first forward."""

    min_bottoms = max_bottoms = 0
    _prefetcher: Prefetcher | None = None
    _closed = False
    data_workers = DEFAULT_DATA_WORKERS

    def set_data_workers(self, workers: int) -> None:
        """Decode and transform each batch on `workers` threads (0: in the prefetch thread).
        Call before the first forward; the batches are the same for any number."""
        self._check_not_started("set_data_workers")
        if workers < 0:
            raise self.error(f"data workers must be 0 or more, got {workers}")
        self.data_workers = int(workers)

    def _workers(self) -> Callable[[], BatchWorkers]:
        """What makes the layer's BatchWorkers in the prefetch thread (holding no reference to the
        layer, so that a layer dropped without close() is collected and its threads stopped)."""
        return functools.partial(BatchWorkers, self.data_workers, f"mpicaffe-{self.type}-{self.name}-worker")

    def _make_batches(self) -> Callable[[], Iterator]:
        raise NotImplementedError

    def _ensure_started(self) -> Prefetcher:
        if self._closed:
            raise self.error("the layer was closed; it reads no more data")
        if self._prefetcher is None:
            make = self._make_batches()
            if self.device.type == "cuda":
                make = _pinned(make)
            depth = self.param.data_param.prefetch
            self._prefetcher = Prefetcher(make, depth, name=f"mpicaffe-{self.type}-{self.name}")
            # stop the thread when the layer is collected without close(); holds no reference to self
            self._finalizer = weakref.finalize(self, self._prefetcher.close)
        return self._prefetcher

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        data, labels = self._ensure_started().get()
        tops = [_to_device(data, self.device)]
        if len(self.param.top) > 1:
            tops.append(_to_device(labels, self.device))
        return tops

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        tops = [torch.zeros((self.batch_size,) + tuple(self.item_shape), device=self.device)]
        if len(self.param.top) > 1:
            tops.append(torch.zeros(self.batch_size, device=self.device))
        return tops

    def close(self) -> None:
        """Stop the prefetch thread; later forwards raise."""
        self._closed = True
        if self._prefetcher is not None:
            self._finalizer.detach()
            self._prefetcher.close()
            self._prefetcher = None

    def stop_reading(self) -> None:
        """Stop the prefetch thread and drop what it read ahead, so that set_shard, skip_records
        and batch_size may change before the next forward (ULFM recovery re-shards a running net)."""
        if self._prefetcher is not None:
            self._finalizer.detach()
            self._prefetcher.close()
            self._prefetcher = None

    def _check_not_started(self, what: str) -> None:
        if self._prefetcher is not None or self._closed:
            raise self.error(f"{what} must be called before the first forward")


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):  # pinned by the prefetch thread
        return array.to(device, non_blocking=True)
    return torch.from_numpy(array).to(device)


def _pinned(make_batches: Callable[[], Iterator]) -> Callable[[], Iterator]:
    """Batches as page-locked tensors, so the copy to the GPU can run asynchronously."""
    def batches():
        inner = make_batches()
        try:
            for batch in inner:
                yield tuple(torch.from_numpy(a).pin_memory() for a in batch)
        finally:
            inner.close()
    return batches


def default_data_workers(local_ranks: int) -> int:
    """`mpicaffe train`'s default --data-workers: the rank's share of the node's cores, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, local_ranks))


def use_data_workers(nets: Sequence, workers: int | None, local_ranks: int) -> int:
    """Give every prefetching data layer of `nets` `workers` decode threads (None: the rank's share
    of the node's cores, `default_data_workers`); returns the number given."""
    if workers is None:
        workers = default_data_workers(local_ranks)
    layers = [layer for net in nets for layer in net.layers if isinstance(layer, PrefetchingLayer)]
    for layer in layers:
        layer.set_data_workers(workers)
    if layers:
        log.info("Data layers decode and transform %s", f"on {workers} worker threads per rank" if workers
                 else "in their prefetch thread (--data-workers 0)")
    return workers


def thread_error(layer: Layer) -> Callable[[str], UserError]:
    """Like layer.error, but keeping no reference to the layer, for objects the reader thread holds
    (so that a layer dropped without close() is collected and its thread stopped)."""
    where = f"{layer.source}: " if layer.source else ""
    prefix = f"{where}layer '{layer.name}' ({layer.type}): "
    return lambda message: UserError(prefix + message)


def check_batch_size(layer: Layer, value: int, field: str) -> int:
    """`value` as an int; the layer's error naming `field` unless it is positive."""
    if value <= 0:
        raise layer.error(f"{field} must be positive, got {value}")
    return int(value)

