"""Caffe's Data (LMDB) and ImageData layers: records or listed images, read ahead in a thread.

Both read in the prefetch thread of base_data.PrefetchingLayer and decode and transform on its
BatchWorkers, one batch ahead: the next batch decodes while this one is transformed. The order of
records and the random draws are deterministic (seeded from torch.initial_seed() and the shard
rank) and do not depend on the number of workers. For distributed training call
`set_shard(rank, size)` before the first forward; call `close()` to stop the threads.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import lmdb
import numpy as np
import torch
from google.protobuf.message import DecodeError

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base_data import (
    SHUFFLE_STREAM,
    SKIP_STREAM,
    BatchWorkers,
    PrefetchingLayer,
    check_batch_size,
    thread_error,
)
from mpicaffe.data import images, lmdb_io, sharding
from mpicaffe.data.transform import DataTransformer, find_file, make_rng, transformer_for_layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


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
    (Caffe's DataReader wraps to the first record); its workers parse, decode and transform them."""

    def __init__(self, path: str, start_key: bytes, start: int, end: int, first_key: bytes, first: int,
                 batch_size: int, transformer: DataTransformer, make_workers: Callable[[], BatchWorkers]):
        self.path, self.start_key, self.start, self.end = path, start_key, start, end
        self.first_key, self.first = first_key, first
        self.batch_size, self.transformer, self.make_workers = batch_size, transformer, make_workers

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        workers = self.make_workers()
        try:
            with lmdb_io.shared_env(self.path) as env, env.begin(buffers=False) as txn:
                cursor = txn.cursor()
                if not cursor.set_key(self.first_key):
                    raise UserError(f"{self.path}: record {self.first_key!r} is gone; the database "
                                    "changed while it was being read")
                index = self.first

                def read_batch() -> tuple[list[bytes], Callable[[], list]]:
                    nonlocal index
                    records = []
                    for _ in range(self.batch_size):
                        records.append(cursor.item())
                        index += 1
                        if index >= self.end or not cursor.next():
                            cursor.set_key(self.start_key)
                            index = self.start
                    return [key for key, _ in records], workers.decode(self._decode, records)

                batch = read_batch()
                while True:
                    upcoming = read_batch()  # decodes while this batch is transformed
                    yield self._assemble(*batch, workers)
                    batch = upcoming
        finally:
            workers.close()

    def _decode(self, record: tuple[bytes, bytes]) -> tuple[np.ndarray, float]:
        datum = _parse_record(self.path, record)
        return _decode_datum(self.path, self.transformer, record[0], datum), datum.label

    def _assemble(self, keys: list[bytes], decoded: Callable[[], list],
                  workers: BatchWorkers) -> tuple[np.ndarray, np.ndarray]:
        arrays, labels = zip(*decoded())
        names = [f"{self.path}: record {k.decode('utf-8', 'replace')!r}" for k in keys]
        data = workers.transform(self.transformer, list(arrays), names)
        return data, np.array(labels, dtype=np.float32)


@register
class DataLayer(PrefetchingLayer):
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
        self.batch_size = check_batch_size(self, p.batch_size, "data_param.batch_size")
        self.transformer = transformer_for_layer(self.param, self.phase, self.source, error=thread_error(self))
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
            skip = int(make_rng(self.rank, SKIP_STREAM).integers(rand_skip)) % (end - start)
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
                            self.transformer, self._workers())


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
                 transformer: DataTransformer, make_workers: Callable[[], BatchWorkers]):
        self.list_path, self.entries, self.root, self.size, self.color = list_path, entries, root, size, color
        self.shuffle, self.shuffle_rng, self.skip = shuffle, shuffle_rng, skip
        self.batch_size, self.transformer, self.make_workers = batch_size, transformer, make_workers

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
        workers = self.make_workers()

        def read_batch() -> tuple[list, Callable[[], list]]:
            nonlocal pos
            batch = []
            for _ in range(self.batch_size):
                batch.append(order[pos])
                pos += 1
                if pos >= len(order):
                    pos = 0
                    if self.shuffle:  # Caffe reshuffles at the end of every epoch
                        self.shuffle_rng.shuffle(order)
            return batch, workers.decode(self.load, batch)

        try:
            batch, decoded = read_batch()
            while True:
                upcoming = read_batch()  # decodes while this batch is transformed
                names = [f"{self.list_path}:{n}: {self.root + name}" for name, _, n in batch]
                data = workers.transform(self.transformer, decoded(), names)
                yield data, np.array([label for _, label, _ in batch], dtype=np.float32)
                batch, decoded = upcoming
        finally:
            workers.close()


@register
class ImageDataLayer(PrefetchingLayer):
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
        self.batch_size = check_batch_size(self, p.batch_size, "image_data_param.batch_size")
        self.transformer = transformer_for_layer(self.param, self.phase, self.source, error=thread_error(self))
        reader = self._reader(self.entries, None, 0)
        # the shape comes from the first listed image (Caffe reads the first after shuffling)
        self.item_shape = self.transformer.output_shape(reader.load(self.entries[0]).shape)
        self.rank, self.shard_size = 0, 1
        self.bounds = (0, len(self.entries))

    def _reader(self, entries, rng, skip) -> _ImageListBatches:
        p = self.param.image_data_param
        return _ImageListBatches(self.list_path, entries, p.root_folder, self.size, p.is_color, p.shuffle, rng,
                                 skip, self.batch_size, self.transformer, self._workers())

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
        shuffle_rng = make_rng(self.rank, SHUFFLE_STREAM)
        skip = 0
        rand_skip = self.param.image_data_param.rand_skip
        if rand_skip:
            skip = int(make_rng(self.rank, SKIP_STREAM).integers(rand_skip))
            if skip >= len(entries):
                raise self.error(f"Not enough points to skip: rand_skip drew {skip} for {len(entries)} images")
        return self._reader(entries, shuffle_rng, skip)

