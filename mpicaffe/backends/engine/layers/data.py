"""Data layers: Input, DummyData, MemoryData, Data (LMDB), ImageData, HDF5Data, HDF5Output.

Data and ImageData read and decode in a background thread that keeps up to `data_param.prefetch`
ready batches (numpy) in a bounded queue, so reading overlaps compute. The order of records and
the random draws are deterministic (seeded from torch.initial_seed() and the shard rank). For
distributed training call `set_shard(rank, size)` before the first forward; call `close()` to
stop the thread (it is a daemon thread and is also stopped when the layer is collected).
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np
import torch
from google.protobuf.message import DecodeError

from mpicaffe.backends.engine.fillers import fill
from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.data import images, lmdb_io, sharding
from mpicaffe.data.transform import DataTransformer, find_file, make_rng, transformer_for_layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

# Threads decoding encoded records and image files of one batch in parallel (Pillow releases the GIL).
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

# random streams of make_rng: one per use, so that one does not shift another's draws
_SKIP_STREAM, _SHUFFLE_STREAM = 1, 2


# --- prefetching ---
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


class _PrefetchingLayer(Layer):
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


def _thread_error(layer: Layer) -> Callable[[str], UserError]:
    """Like layer.error, but keeping no reference to the layer, for objects the reader thread holds
    (so that a layer dropped without close() is collected and its thread stopped)."""
    where = f"{layer.source}: " if layer.source else ""
    prefix = f"{where}layer '{layer.name}' ({layer.type}): "
    return lambda message: UserError(prefix + message)


def _batch_size(layer: Layer, value: int, field: str) -> int:
    if value <= 0:
        raise layer.error(f"{field} must be positive, got {value}")
    return int(value)


def _decode_all(decode: Callable, items: list, pool: ThreadPoolExecutor | None) -> list[np.ndarray]:
    if pool is None or len(items) < 2:
        return [decode(item) for item in items]
    return list(pool.map(decode, items))


# --- Input, DummyData, MemoryData ---
@register
class InputLayer(Layer):
    """Caffe's Input layer: tops the user fills (pycaffe's net.blobs[...].data); never computed."""

    type = "Input"
    min_bottoms = max_bottoms = 0
    min_tops = 1
    holds_inputs = True

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        shapes = self.param.input_param.shape
        num_top = len(self.param.top)
        if len(shapes) not in (0, 1, num_top):
            raise self.error(f"input_param.shape must be given once, once per top blob, or not at all: "
                             f"{num_top} tops vs. {len(shapes)} shapes")
        self.shapes: list[tuple[int, ...] | None] = []
        for i in range(num_top):
            if not shapes:
                self.shapes.append(None)
                continue
            dims = tuple(int(d) for d in shapes[0 if len(shapes) == 1 else i].dim)
            if any(d < 0 for d in dims):
                raise self.error(f"input_param.shape {dims} has a negative dimension")
            self.shapes.append(dims)

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.infer_tops(bottoms)

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        # a top without a shape stays empty until the user reshapes it, as Caffe's unshaped blob
        return [torch.zeros(s if s is not None else (0,), device=self.device) for s in self.shapes]


@register
class DummyDataLayer(Layer):
    """Caffe's DummyData layer: tops filled by fillers; constant fillers fill once, others every forward."""

    type = "DummyData"
    min_bottoms = max_bottoms = 0
    min_tops = 1

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.dummy_data_param
        num_top = len(self.param.top)
        num_fillers = len(p.data_filler)
        if num_fillers not in (0, 1, num_top):
            raise self.error(f"Number of data fillers must be 0, 1 or equal to the number of tops: {num_top}; "
                             f"you specified {num_fillers} data fillers.")
        legacy = {f: list(getattr(p, f)) for f in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise self.error("Both shape and legacy fields were specified")
            for field, values in legacy.items():
                if len(values) not in (1, num_top):
                    raise self.error(f"Must specify '{field}' once, or once per top blob ({num_top}); "
                                     f"specified {len(values)}.")
            self.shapes = [tuple(int(v[0] if len(v) == 1 else v[i]) for v in legacy.values())
                           for i in range(num_top)]
        else:
            if len(p.shape) not in (1, num_top):
                raise self.error(f"Must specify 'shape' once, or once per top blob ({num_top}); "
                                 f"specified {len(p.shape)}.")
            self.shapes = [tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else i].dim)
                           for i in range(num_top)]
        if num_fillers == 0:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)] * num_top
        else:
            fillers = [p.data_filler[0 if num_fillers == 1 else i] for i in range(num_top)]
        self.fillers = fillers
        # Caffe's refill_: a top with a constant filler is filled once here and never again
        self._constant: list[torch.Tensor | None] = []
        for shape, filler in zip(self.shapes, fillers):
            if filler.type == "constant":
                self._constant.append(fill(torch.zeros(shape, device=self.device), filler))
            else:
                self._constant.append(None)

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c if c is not None else fill(torch.empty(s, device=self.device), f)
                for c, s, f in zip(self._constant, self.shapes, self.fillers)]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c if c is not None else torch.zeros(s, device=self.device)
                for c, s in zip(self._constant, self.shapes)]


@register
class MemoryDataLayer(Layer):
    """Caffe's MemoryData layer: batches from arrays given with `set_input_arrays`, wrapping around."""

    type = "MemoryData"
    min_bottoms = max_bottoms = 0
    min_tops = max_tops = 2

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.memory_data_param
        self.batch_size, self.channels, self.height, self.width = (
            int(p.batch_size), int(p.channels), int(p.height), int(p.width))
        if self.batch_size * self.channels * self.height * self.width <= 0:
            raise self.error("batch_size, channels, height, and width must be specified and positive in "
                             "memory_data_param")
        if self.param.HasField("transform_param"):
            log.warning("layer '%s': MemoryData does not transform array data given by set_input_arrays",
                        self.name)
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Use `data` (N, C, H, W) float32 and `labels` (N,) or (N, 1, 1, 1) float32 from now on.

        As pycaffe's Net.set_input_arrays: the arrays are used in place, not copied, and N must be
        a multiple of batch_size. The next forward returns the first batch.
        """
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = labels[:, np.newaxis, np.newaxis, np.newaxis]
        for name, array, dims in (("data array", data, (self.channels, self.height, self.width)),
                                  ("labels array", labels, (1, 1, 1))):
            if not isinstance(array, np.ndarray):
                raise self.error(f"{name} must be a numpy array")
            if not array.flags.c_contiguous:
                raise self.error(f"{name} must be C contiguous")
            if array.ndim != 4:
                raise self.error(f"{name} must be 4-d")
            if array.dtype != np.float32:
                raise self.error(f"{name} must be float32, got {array.dtype}")
            for axis, what in enumerate(("channels", "height", "width")):
                if array.shape[axis + 1] != dims[axis]:
                    raise self.error(f"{name} has wrong number of {what}: {array.shape[axis + 1]} "
                                     f"(expected {dims[axis]})")
        if data.shape[0] != labels.shape[0]:
            raise self.error("data and labels must have the same first dimension")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise self.error(f"first dimensions of input arrays must be a multiple of batch size "
                             f"{self.batch_size}; got {data.shape[0]}")
        self._data, self._labels = data, labels.reshape(-1)
        self._pos = 0

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._data is None:
            raise self.error("call set_input_arrays(data, labels) before the first forward "
                             "(MemoryDataLayer needs to be initialized by calling Reset)")
        b, pos = self.batch_size, self._pos
        data = _shared_tensor(self._data[pos:pos + b]).to(self.device)
        # Caffe's Forward_cpu reshapes the label top to (batch_size, 1, 1, 1) though setup made it 1-D
        labels = _shared_tensor(self._labels[pos:pos + b]).reshape(b, 1, 1, 1).to(self.device)
        self._pos = (pos + b) % self._data.shape[0]
        return [data, labels]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros(self.batch_size, self.channels, self.height, self.width, device=self.device),
                torch.zeros(self.batch_size, device=self.device)]


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    # the user's array in place (Caffe points the top at it); a read-only one is copied
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)


# --- Data (LMDB) ---
def _parse_record(path: str, record: tuple[bytes, bytes]) -> caffe_pb2.Datum:
    try:
        return lmdb_io.parse_datum(record[1])
    except DecodeError as e:
        raise UserError(f"{path}: record {record[0].decode('utf-8', 'replace')!r}: not a Datum: {e}") from None


def _decode_datum(path: str, transformer: DataTransformer, key: bytes, datum: caffe_pb2.Datum) -> np.ndarray:
    try:
        return transformer.decode(datum)
    except (ValueError, OSError, SyntaxError) as e:  # Pillow raises SyntaxError for some broken files
        raise UserError(f"{path}: record {key.decode('utf-8', 'replace')!r}: cannot decode: {e}") from None


class _LmdbBatches:
    """Reads batches of records [start, end) of an LMDB in key order, wrapping to `start`
    (Caffe's DataReader wraps to the first record), decodes and transforms them."""

    def __init__(self, path: str, start_key: bytes, start: int, end: int, first_key: bytes, first: int,
                 batch_size: int, transformer: DataTransformer):
        self.path, self.start_key, self.start, self.end = path, start_key, start, end
        self.first_key, self.first = first_key, first
        self.batch_size, self.transformer = batch_size, transformer

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="mpicaffe-decode") if DECODE_THREADS > 1 else None
        try:
            with lmdb_io.shared_env(self.path) as env, env.begin(buffers=False) as txn:
                cursor = txn.cursor()
                if not cursor.set_key(self.first_key):
                    raise UserError(f"{self.path}: record {self.first_key!r} is gone; the database "
                                    "changed while it was being read")
                index = self.first
                while True:
                    records = []
                    for _ in range(self.batch_size):
                        records.append(cursor.item())
                        index += 1
                        if index >= self.end or not cursor.next():
                            cursor.set_key(self.start_key)
                            index = self.start
                    yield self._assemble(records, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _assemble(self, records: list, pool: ThreadPoolExecutor | None) -> tuple[np.ndarray, np.ndarray]:
        keys = [key for key, _ in records]
        datums = [_parse_record(self.path, record) for record in records]
        if not datums[0].encoded:
            pool = None  # raw records decode faster than a hand-off to another thread
        arrays = _decode_all(lambda i: _decode_datum(self.path, self.transformer, keys[i], datums[i]),
                             list(range(len(datums))), pool)
        names = [f"{self.path}: record {k.decode('utf-8', 'replace')!r}" for k in keys]
        data = self.transformer.transform_images(arrays, names)
        return data, np.array([d.label for d in datums], dtype=np.float32)


@register
class DataLayer(_PrefetchingLayer):
    """Caffe's Data layer: batches of Datum records from an LMDB, read ahead in a background thread."""

    type = "Data"
    min_tops = 1
    max_tops = 2

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.data_param
        if p.backend != caffe_pb2.DataParameter.LMDB:
            raise self.error("data_param.backend LEVELDB is not supported (it is Caffe's default when backend "
                             "is not set): mpicaffe reads LMDB only; convert the data to LMDB and set "
                             "`backend: LMDB`")
        if not p.source:
            raise self.error("data_param.source is not set")
        self.db_path = find_file(p.source, os.path.dirname(self.source), "data_param.source", self.source,
                                 self.error)
        self.batch_size = _batch_size(self, p.batch_size, "data_param.batch_size")
        self.transformer = transformer_for_layer(self.param, self.phase, self.source, error=_thread_error(self))
        with self._env() as env:
            self.count = env.stat()["entries"]
            if self.count == 0:
                raise self.error(f"data_param.source {self.db_path}: the database is empty")
            with env.begin(buffers=False) as txn:
                cursor = txn.cursor()
                cursor.first()
                key, value = cursor.item()
        # Caffe's DataLayerSetUp: the first record gives the shape; nothing is consumed
        first = _decode_datum(self.db_path, self.transformer, key, _parse_record(self.db_path, (key, value)))
        self.item_shape = self.transformer.output_shape(first.shape)
        self.rank, self.shard_size = 0, 1
        self.bounds = (0, self.count)
        self.seek_method: str | None = None
        self.records_done = 0
        self.source_db, self.source_count = self.db_path, self.count  # db_path moves to a staged copy

    def skip_records(self, n: int) -> None:
        """Start `n` records into the shard (wrapping), as if `n` records had been read already:
        a resumed run continues where the interrupted one was. Call before the first forward."""
        self._check_not_started("skip_records")
        self.records_done = n

    def _env(self) -> contextlib.AbstractContextManager[lmdb.Environment]:
        return lmdb_io.shared_env(self.db_path, lambda message: self.error(f"data_param.source: {message}"))

    def set_shard(self, rank: int, size: int) -> None:
        """Read only the contiguous records `shard_bounds(count, rank, size)`, wrapping within them.

        Call before the first forward. Random draws (crops, mirrors, rand_skip) are reseeded from
        torch.initial_seed() and `rank`.
        """
        self._check_not_started("set_shard")
        self.db_path, self.count = self.source_db, self.source_count
        try:
            self.bounds = sharding.shard_bounds(self.count, rank, size)
        except UserError as e:
            raise self.error(f"data_param.source {self.db_path}: {e}") from None
        self.rank, self.shard_size = rank, size

    def read_staged(self, path: str) -> None:
        """Read a local copy holding exactly this rank's shard (mpicaffe.data.staging) instead of
        the source; records and random draws are those of the shard. Call after `set_shard`."""
        self._check_not_started("read_staged")
        start, end = self.bounds
        with lmdb_io.shared_env(path, lambda message: self.error(f"staged copy: {message}")) as env:
            count = env.stat()["entries"]
        if count != end - start:
            raise self.error(f"staged copy {path} holds {count} records, not the shard's {end - start}")
        self.db_path, self.count, self.bounds = path, count, (0, count)

    def _make_batches(self) -> Callable[[], Iterator]:
        start, end = self.bounds
        self.transformer.reseed(self.rank)
        skip = 0
        rand_skip = self.param.data_param.rand_skip
        if rand_skip:
            # as Caffe's DataLayerSetUp before DataReader (Caffe 1.0 ignores rand_skip here)
            skip = int(make_rng(self.rank, _SKIP_STREAM).integers(rand_skip)) % (end - start)
        skip = (skip + self.records_done) % (end - start)
        with self._env() as env, env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            self.seek_method = sharding.seek_record(cursor, start, self.count)
            start_key = bytes(cursor.key())
            first_key = start_key
            if skip:
                sharding.seek_record(cursor, start + skip, self.count)
                first_key = bytes(cursor.key())
        if self.shard_size > 1 or self.db_path != self.source_db:
            log.info("layer '%s': rank %d of %d reads records %d..%d of %d in %s (found by %s)", self.name,
                     self.rank, self.shard_size, start, end - 1, self.count, self.db_path, self.seek_method)
        return _LmdbBatches(self.db_path, start_key, start, end, first_key, start + skip, self.batch_size,
                            self.transformer)


# --- ImageData ---
def _read_image_list(path: str, error: Callable[[str], Exception]) -> list[tuple[str, int, int]]:
    """(image path, label, line number) per line `<path> <label>` (the label after the last space)."""
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"image_data_param.source {path}: cannot read the list: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, _, label = line.rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not name or value is None:
            raise error(f"{path}:{number}: expected '<image path> <integer label>', got {line!r}")
        entries.append((name, value, number))
    if not entries:
        raise error(f"image_data_param.source {path}: the list is empty")
    return entries


class _ImageListBatches:
    """Reads batches of images listed in a file, in list order or reshuffled every epoch
    (Caffe's ImageDataLayer), resizing, decoding and transforming them."""

    def __init__(self, list_path: str, entries: list, root: str, size: tuple[int, int] | None, color: bool,
                 shuffle: bool, shuffle_rng: np.random.Generator, skip: int, batch_size: int,
                 transformer: DataTransformer):
        self.list_path, self.entries, self.root, self.size, self.color = list_path, entries, root, size, color
        self.shuffle, self.shuffle_rng, self.skip = shuffle, shuffle_rng, skip
        self.batch_size, self.transformer = batch_size, transformer

    def load(self, entry: tuple[str, int, int]) -> np.ndarray:
        name, _, number = entry
        path = self.root + name  # Caffe concatenates root_folder and the listed path as strings
        try:
            return images.load_image(path, self.color, self.size)
        except (OSError, ValueError) as e:
            raise UserError(f"{self.list_path}:{number}: could not load image {path}: {e}") from None

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = list(self.entries)
        if self.shuffle:
            self.shuffle_rng.shuffle(order)
        pos = self.skip
        pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="mpicaffe-decode") if DECODE_THREADS > 1 else None
        try:
            while True:
                batch = []
                for _ in range(self.batch_size):
                    batch.append(order[pos])
                    pos += 1
                    if pos >= len(order):
                        pos = 0
                        if self.shuffle:  # Caffe reshuffles at the end of every epoch
                            self.shuffle_rng.shuffle(order)
                arrays = _decode_all(self.load, batch, pool)
                names = [f"{self.list_path}:{n}: {self.root + name}" for name, _, n in batch]
                data = self.transformer.transform_images(arrays, names)
                yield data, np.array([label for _, label, _ in batch], dtype=np.float32)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


@register
class ImageDataLayer(_PrefetchingLayer):
    """Caffe's ImageData layer: images and labels from a list file, read ahead in a background thread."""

    type = "ImageData"
    min_tops = max_tops = 2

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.image_data_param
        if not p.source:
            raise self.error("image_data_param.source is not set")
        self.list_path = find_file(p.source, os.path.dirname(self.source), "image_data_param.source",
                                   self.source, self.error)
        height, width = int(p.new_height), int(p.new_width)
        if (height == 0) != (width == 0):
            raise self.error("image_data_param: new_height and new_width must be set at the same time")
        self.size = (height, width) if height else None
        self.entries = _read_image_list(self.list_path, self.error)
        self.batch_size = _batch_size(self, p.batch_size, "image_data_param.batch_size")
        self.transformer = transformer_for_layer(self.param, self.phase, self.source, error=_thread_error(self))
        reader = self._reader(self.entries, None, 0)
        # the shape comes from the first listed image (Caffe reads the first after shuffling)
        self.item_shape = self.transformer.output_shape(reader.load(self.entries[0]).shape)
        self.rank, self.shard_size = 0, 1
        self.bounds = (0, len(self.entries))

    def _reader(self, entries, rng, skip) -> _ImageListBatches:
        p = self.param.image_data_param
        return _ImageListBatches(self.list_path, entries, p.root_folder, self.size, p.is_color, p.shuffle, rng,
                                 skip, self.batch_size, self.transformer)

    def set_shard(self, rank: int, size: int) -> None:
        """Read only the contiguous lines `shard_bounds(lines, rank, size)` of the list (shuffled
        within the shard when `shuffle` is set). Call before the first forward."""
        self._check_not_started("set_shard")
        try:
            self.bounds = sharding.shard_bounds(len(self.entries), rank, size)
        except UserError as e:
            raise self.error(f"image_data_param.source {self.list_path}: {e}") from None
        self.rank, self.shard_size = rank, size

    def _make_batches(self) -> Callable[[], Iterator]:
        start, end = self.bounds
        entries = self.entries[start:end]
        self.transformer.reseed(self.rank)
        shuffle_rng = make_rng(self.rank, _SHUFFLE_STREAM)
        skip = 0
        rand_skip = self.param.image_data_param.rand_skip
        if rand_skip:
            skip = int(make_rng(self.rank, _SKIP_STREAM).integers(rand_skip))
            if skip >= len(entries):
                raise self.error(f"Not enough points to skip: rand_skip drew {skip} for {len(entries)} images")
        return self._reader(entries, shuffle_rng, skip)


# --- HDF5 ---
def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserError("HDF5 layers need h5py: pip install h5py (or mpicaffe[hdf5])") from None
    return h5py


@register
class HDF5DataLayer(Layer):
    """Caffe's HDF5Data layer: one top per dataset name, rows read in order across the listed files."""

    type = "HDF5Data"
    min_bottoms = max_bottoms = 0
    min_tops = 1

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        p = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param")
        if not p.source:
            raise self.error("hdf5_data_param.source is not set")
        self.list_path = find_file(p.source, os.path.dirname(self.source), "hdf5_data_param.source",
                                   self.source, self.error)
        try:
            with open(self.list_path, encoding="utf-8") as f:
                names = f.read().split()
        except (OSError, UnicodeDecodeError) as e:
            raise self.error(f"hdf5_data_param.source {self.list_path}: cannot read: {e}") from None
        if not names:
            raise self.error(f"Must have at least 1 HDF5 filename listed in {self.list_path}")
        list_dir = os.path.dirname(self.list_path)
        self.files = [find_file(n, list_dir, f"HDF5 file listed in {self.list_path}", self.source, self.error)
                      for n in names]
        self.batch_size = _batch_size(self, p.batch_size, "hdf5_data_param.batch_size")
        arrays = self._load(self.files[0])
        self.item_shapes = [a.shape[1:] for a in arrays]
        self.rank = 0
        self._state = None

    def _load(self, path: str) -> list[np.ndarray]:
        h5py = _h5py()
        arrays = []
        try:
            with h5py.File(path, "r") as f:
                for name in self.param.top:
                    if name not in f or not isinstance(f[name], h5py.Dataset):
                        raise self.error(f"{path}: no dataset '{name}' (each top of HDF5Data names a dataset)")
                    ds = f[name]
                    if ds.dtype.kind not in "fiub" or ds.ndim < 1:
                        raise self.error(f"{path}: dataset '{name}' must be numeric with at least 1 axis "
                                         f"(got {ds.dtype}, shape {ds.shape})")
                    arrays.append(np.asarray(ds[()], dtype=np.float32))
        except OSError as e:
            raise self.error(f"{path}: cannot read HDF5 file: {e}") from None
        rows = arrays[0].shape[0]
        for name, a in zip(self.param.top, arrays):
            if a.shape[0] != rows:
                raise self.error(f"{path}: dataset '{name}' has {a.shape[0]} rows but "
                                 f"'{self.param.top[0]}' has {rows}")
        if rows == 0:
            raise self.error(f"{path}: the datasets have no rows")
        if hasattr(self, "item_shapes"):
            for name, a, shape in zip(self.param.top, arrays, self.item_shapes):
                if a.shape[1:] != shape:
                    raise self.error(f"{path}: dataset '{name}' has rows of shape {a.shape[1:]} but the "
                                     f"first file's have {shape}")
        return arrays

    def _start(self) -> dict:
        shuffle = self.param.hdf5_data_param.shuffle
        rng = make_rng(self.rank, _SHUFFLE_STREAM)
        order = np.arange(len(self.files))
        if shuffle:
            rng.shuffle(order)
        state = {"rng": rng, "order": order, "file": 0}
        self._load_file(state)
        return state

    def _load_file(self, state: dict) -> None:
        arrays = self._load(self.files[state["order"][state["file"]]])
        rows = arrays[0].shape[0]
        state.update(arrays=arrays, row=0,
                     perm=state["rng"].permutation(rows) if self.param.hdf5_data_param.shuffle else np.arange(rows))

    def _next_epoch_of_file(self, state: dict) -> None:
        # Caffe's HDF5DataLayer::Next at the end of a file's rows
        shuffle = self.param.hdf5_data_param.shuffle
        if len(self.files) > 1:
            state["file"] += 1
            if state["file"] == len(self.files):
                state["file"] = 0
                if shuffle:
                    state["rng"].shuffle(state["order"])
            self._load_file(state)
        else:
            state["row"] = 0
            if shuffle:
                state["rng"].shuffle(state["perm"])

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._state is None:
            self._state = self._start()
        state = self._state
        b = self.batch_size
        outs = [np.empty((b,) + shape, dtype=np.float32) for shape in self.item_shapes]
        filled = 0
        while filled < b:
            rows = state["arrays"][0].shape[0]
            take = min(b - filled, rows - state["row"])
            index = state["perm"][state["row"]:state["row"] + take]
            for out, array in zip(outs, state["arrays"]):
                out[filled:filled + take] = array[index]
            filled += take
            state["row"] += take
            if state["row"] == rows:
                self._next_epoch_of_file(state)
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros((self.batch_size,) + shape, device=self.device) for shape in self.item_shapes]


def _legacy_shape(t: torch.Tensor) -> tuple[int, int, int, int]:
    # Caffe's num/channels/height/width: missing trailing axes count as 1
    shape = tuple(t.shape)
    return tuple(shape[i] if i < len(shape) else 1 for i in range(4))


@register
class HDF5OutputLayer(Layer):
    """Caffe's HDF5Output layer: writes its two bottoms to datasets "data" and "label" of a file.

    Caffe creates the file (truncating it) at setup and writes the datasets, shaped
    (num, channels, height, width), on the first forward; its second forward fails because the
    datasets exist. Here later forwards append their rows to the same datasets.
    """

    type = "HDF5Output"
    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 0

    def setup(self, bottoms: list[torch.Tensor]) -> None:
        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is not set")
        h5py = _h5py()
        try:
            self._file = h5py.File(self.file_name, "w")
        except OSError as e:
            raise self.error(f"hdf5_output_param.file_name: cannot create {self.file_name}: {e}") from None
        self._finalizer = weakref.finalize(self, self._file.close)

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        data, label = bottoms
        for name, t in (("data", data), ("label", label)):
            if t.dim() > 4:
                raise self.error(f"bottom '{name}' has {t.dim()} axes; HDF5Output writes blobs of at most 4")
        if _legacy_shape(data)[0] != _legacy_shape(label)[0]:
            raise self.error(f"data blob and label blob must have the same batch size "
                             f"({_legacy_shape(data)[0]} vs {_legacy_shape(label)[0]})")
        if not self._file:
            raise self.error(f"{self.file_name} was closed")
        for name, t in (("data", data), ("label", label)):
            array = t.detach().cpu().numpy().astype(np.float32).reshape(_legacy_shape(t))
            if name not in self._file:
                self._file.create_dataset(name, data=array, maxshape=(None,) + array.shape[1:], chunks=True)
                continue
            ds = self._file[name]
            if ds.shape[1:] != array.shape[1:]:
                raise self.error(f"cannot append rows of shape {array.shape[1:]} to dataset '{name}' of "
                                 f"{self.file_name} with rows of shape {ds.shape[1:]}")
            ds.resize(ds.shape[0] + array.shape[0], axis=0)
            ds[-array.shape[0]:] = array
        self._file.flush()
        return []

    def infer_tops(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return []

    def close(self) -> None:
        """Close the file (also done when the layer is collected)."""
        self._finalizer()
