"""Caffe's LMDB databases: Datum records stored under keys that sort in record order.

A database is a directory holding data.mdb and lock.mdb; each value is a serialized Datum. Raw
records keep pixels as uint8 bytes (`data`, channel-major C x H x W, BGR for color images) or as
`float_data`; encoded records keep PNG/JPEG file bytes in `data` with `encoded` set. Writing
follows Caffe's tools: keys from `datum_key`, one transaction per 1000 records.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

import lmdb
import numpy as np

from mpicaffe.data import images
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

# Caffe's tools commit every 1000 puts (convert_imageset, convert_mnist_data).
COMMIT_EVERY = 1000
# Address space reserved up front; the file itself only grows as records arrive.
INITIAL_MAP_SIZE = 1 << 30

Record = tuple[bytes, caffe_pb2.Datum | bytes]


def datum_key(index: int, name: str | None = None) -> bytes:
    """The key Caffe's tools give record `index`.

    convert_mnist_data and convert_cifar_data use format_int(i, 8), i.e. "%08d";
    convert_imageset appends "_" and the file name as listed: "%08d_<path>".
    """
    key = f"{index:08d}"
    if name is not None:
        key += "_" + name
    return key.encode("utf-8")


def array_to_datum(array: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """Make a raw Datum from a (C, H, W) or (H, W) array.

    uint8 arrays go to `data` as bytes (as Caffe writes images); any other dtype goes to
    `float_data` as float32.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"a Datum holds a (C, H, W) array; got shape {array.shape}")
    channels, height, width = array.shape
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, label=int(label))
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    return datum


def encoded_datum(data: bytes, label: int = 0) -> caffe_pb2.Datum:
    """Make an encoded Datum holding image file bytes.

    Like Caffe's ReadFileToDatum, channels/height/width are left unset: the reader decodes them.
    """
    return caffe_pb2.Datum(data=bytes(data), label=int(label), encoded=True)


def decode_datum(datum: caffe_pb2.Datum) -> tuple[np.ndarray, int]:
    """Return (array, label) for a Datum: (C, H, W) uint8, or float32 for float_data records.

    Encoded records are decoded with the channels the image holds (Caffe's DecodeDatumNative):
    1 for gray, 3 (BGR) for color. Raw uint8 arrays are read-only views of the Datum's bytes.
    """
    if datum.encoded:
        return images.decode_image(datum.data), datum.label
    shape = (datum.channels, datum.height, datum.width)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        array = np.frombuffer(datum.data, dtype=np.uint8)
    elif len(datum.float_data):
        array = np.array(datum.float_data, dtype=np.float32)
    else:
        array = np.zeros(0, dtype=np.uint8)
    if array.size != size:
        raise ValueError(
            f"Datum holds {array.size} values but its shape {shape} needs {size}")
    return array.reshape(shape), datum.label


def parse_datum(value: bytes) -> caffe_pb2.Datum:
    """Parse one serialized Datum (an LMDB value)."""
    datum = caffe_pb2.Datum()
    datum.ParseFromString(value)
    return datum


def write_datums(db_path: str, records: Iterable[Record], *, overwrite: bool = False,
                 on_record: Callable[[int], None] | None = None) -> int:
    """Write (key, Datum or serialized Datum) records to a new LMDB at db_path; return the count.

    The database is built in a sibling directory and renamed into place when complete, so
    db_path never holds a half-written database. An existing db_path raises UserError unless
    overwrite is set. on_record(n) is called after the n-th record is queued.
    """
    db_path = os.path.normpath(os.fspath(db_path))
    if os.path.lexists(db_path) and not overwrite:
        raise UserError(f"{db_path}: already exists; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(db_path))
    os.makedirs(parent, exist_ok=True)
    partial = f"{db_path}.partial-{os.getpid()}"
    _remove(partial)
    env = lmdb.open(partial, map_size=INITIAL_MAP_SIZE, subdir=True, meminit=False)
    count = 0
    try:
        batch = []
        for key, value in records:
            if not isinstance(value, (bytes, bytearray)):
                value = value.SerializeToString()
            batch.append((key, value))
            count += 1
            if len(batch) == COMMIT_EVERY:
                _commit(env, batch)
                batch = []
            if on_record is not None:
                on_record(count)
        if batch:
            _commit(env, batch)
        env.sync(True)
        env.close()
        if overwrite:
            _remove(db_path)
        os.rename(partial, db_path)
    except BaseException:
        env.close()
        _remove(partial)
        raise
    return count


def _commit(env: lmdb.Environment, batch: list) -> None:
    """Put one batch in one transaction, doubling the map size whenever LMDB reports it full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in batch:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# LMDB's meta pages (pages 0 and 1): after the 16-byte page header, the magic and version at
# bytes 16 and 20, the page size (the free-page DB's md_pad) at byte 40, and the last used page
# and the transaction id at bytes 136 and 144 (64-bit builds)
_LMDB_MAGIC = 0xBEEFC0DE


def _check_size(data_path: str, error: Callable[[str], Exception]) -> None:
    """Refuse a data.mdb shorter than its newest meta page says it is (a truncated copy): mapping
    it and reading past the end would kill the process with SIGBUS."""
    size = os.path.getsize(data_path)
    with open(data_path, "rb") as f:
        head = f.read(152)
        if len(head) < 152 or struct.unpack_from("<I", head, 16)[0] != _LMDB_MAGIC:
            raise error(f"{data_path}: not an LMDB data file (no LMDB meta page at its start)")
        page_size = struct.unpack_from("<I", head, 40)[0]
        f.seek(page_size)
        second = f.read(152)
    metas = [struct.unpack_from("<QQ", m, 136) for m in (head, second)
             if len(m) == 152 and struct.unpack_from("<I", m, 16)[0] == _LMDB_MAGIC]
    last_page, _ = max(metas, key=lambda m: m[1])  # the meta of the newest transaction
    needed = (last_page + 1) * page_size
    if size < needed:
        raise error(f"{data_path}: truncated LMDB database: the file holds {size} bytes, its meta page says "
                    f"{needed} (copy it again)")


def _open_for_reading(db_path: str, error: Callable[[str], Exception]) -> lmdb.Environment:
    if not os.path.isdir(db_path):
        what = "is not a directory" if os.path.exists(db_path) else "does not exist"
        raise error(f"{db_path}: {what}; expected an LMDB database directory")
    if not os.path.exists(os.path.join(db_path, "data.mdb")):
        raise error(f"{db_path}: no data.mdb inside; not an LMDB database")
    _check_size(os.path.join(db_path, "data.mdb"), error)
    # Like Caffe's reader (MDB_RDONLY | MDB_NOTLS); without the lock file so read-only media work.
    try:
        return lmdb.open(db_path, readonly=True, lock=False, subdir=True, max_readers=126)
    except lmdb.Error as e:
        raise error(f"{db_path}: cannot open the LMDB database: {e}") from None


# py-lmdb refuses to open one environment twice in a process, so every reader of a database
# (train and test nets, converters, tests) shares one; read transactions are not bound to
# threads (py-lmdb opens with MDB_NOTLS).
_envs: dict[str, list] = {}
_envs_lock = threading.Lock()


@contextlib.contextmanager
def shared_env(db_path: str, error: Callable[[str], Exception] = UserError) -> Iterator[lmdb.Environment]:
    """The process-wide read-only Environment of the LMDB at `db_path`, closed after its last user.

    `error(message)` builds the exception raised when the path is not a readable LMDB.
    """
    db_path = os.fspath(db_path)
    key = os.path.realpath(db_path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            entry = _envs[key] = [_open_for_reading(db_path, error), 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _envs_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _envs[key]
                entry[0].close()


def count(db_path: str) -> int:
    """Number of records in an LMDB, from its statistics (no scan)."""
    with shared_env(db_path) as env:
        return env.stat()["entries"]


def iter_values(db_path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, serialized value) for records start..stop-1 in key order.

    Skipped records are stepped over without copying their values.
    """
    with shared_env(db_path) as env, env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        if not cursor.first():
            return
        for _ in range(start):
            if not cursor.next():
                return
        index = start
        while stop is None or index < stop:
            yield cursor.key(), cursor.value()
            index += 1
            if not cursor.next():
                return


def iter_datums(db_path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, caffe_pb2.Datum]]:
    """Yield (key, Datum) for records start..stop-1 in key order (the order Caffe reads them)."""
    for key, value in iter_values(db_path, start, stop):
        yield key, parse_datum(value)
