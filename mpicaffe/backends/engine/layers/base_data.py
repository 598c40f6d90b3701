"""What the data layers that read files share (Caffe's base_data_layer): the prefetch thread.

Data and ImageData read and decode in a background thread that keeps up to `data_param.prefetch`
ready batches (numpy) in a bounded queue, so reading overlaps compute; on a GPU the thread also
pins them, so the copy to the device runs asynchronously. Call `close()` to stop the thread (it
is a daemon thread and is also stopped when the layer is collected). Also here: the batch-size
check and the random streams every reading data layer draws from.
"""
from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch

from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.errors import UserError

# random streams of make_rng: one per use, so that one does not shift another's draws
SKIP_STREAM, SHUFFLE_STREAM = 1, 2


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

