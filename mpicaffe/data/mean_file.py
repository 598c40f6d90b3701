"""Mean files: the per-pixel mean image as a binary BlobProto (.binaryproto).

This is what Caffe's compute_image_mean writes and what `transform_param { mean_file: ... }`
reads: a (1, C, H, W) blob of float32 means over every record of a database.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from google.protobuf.message import DecodeError

from mpicaffe.atomic import write_bytes_atomic
from mpicaffe.data import lmdb_io
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


class MeanAccumulator:
    """Running per-pixel sum of equally shaped (C, H, W) arrays, in float64."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.count = 0

    def add(self, array: np.ndarray) -> None:
        """Add one record's (C, H, W) array; raises ValueError if its shape differs from the first."""
        if self._sum is None:
            self._sum = np.zeros(array.shape, dtype=np.float64)
        elif array.shape != self._sum.shape:
            raise ValueError(f"record of shape {array.shape} differs from the first record's "
                             f"{self._sum.shape}; a mean needs equally sized records")
        np.add(self._sum, array, out=self._sum)
        self.count += 1

    def mean(self) -> np.ndarray:
        """The (C, H, W) float32 mean of everything added so far."""
        if self._sum is None:
            raise ValueError("no records to average")
        return (self._sum / self.count).astype(np.float32)


def compute_mean(db_path: str, on_record: Callable[[int], None] | None = None) -> np.ndarray:
    """Stream over an LMDB, as compute_image_mean does, and return the (C, H, W) float32 mean.

    Encoded records are decoded first. Raises UserError if the database is empty or its records
    differ in size (the fix is convert_imageset's --resize-height/--resize-width).
    """
    acc = MeanAccumulator()
    for key, datum in lmdb_io.iter_datums(db_path):
        array, _ = lmdb_io.decode_datum(datum)
        try:
            acc.add(array)
        except ValueError as e:
            name = key.decode("utf-8", "replace")
            raise UserError(f"{db_path}: record {name!r}: {e}; resize the images when converting "
                            "(--resize-height/--resize-width)") from None
        if on_record is not None:
            on_record(acc.count)
    if acc.count == 0:
        raise UserError(f"{db_path}: the database is empty; cannot compute a mean")
    return acc.mean()


def array_to_blobproto(array: np.ndarray) -> caffe_pb2.BlobProto:
    """Make a BlobProto with `shape` set from the array's shape and float32 `data`."""
    array = np.asarray(array, dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def blobproto_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """Return a BlobProto's data as a float32 array of its shape.

    As in Caffe's Blob::FromProto, the legacy num/channels/height/width win when any is set;
    otherwise `shape` gives the dimensions.
    """
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    # double_data holds the values of blobs Caffe wrote in double precision
    data = np.array(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"blob holds {data.size} values but its shape {shape} needs {int(np.prod(shape))}")
    return data.reshape(shape)


def mean_blobproto(mean: np.ndarray) -> caffe_pb2.BlobProto:
    """The BlobProto for a (C, H, W) mean: shape (1, C, H, W) plus the legacy dimensions.

    compute_image_mean sets only the legacy num=1/channels/height/width; `shape` is set as well
    so readers that look only at it (pycaffe's array helpers, newer tools) see the same blob.
    """
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim != 3:
        raise ValueError(f"a mean image is (C, H, W); got shape {mean.shape}")
    blob = array_to_blobproto(mean[np.newaxis])
    blob.num = 1
    blob.channels, blob.height, blob.width = (int(d) for d in mean.shape)
    return blob


def write_mean_file(path: str, mean: np.ndarray) -> None:
    """Write a (C, H, W) mean as a .binaryproto, atomically (temporary file, fsync, rename)."""
    write_bytes_atomic(path, mean_blobproto(mean).SerializeToString())


def read_mean_file(path: str) -> np.ndarray:
    """Read a .binaryproto mean (ours or compute_image_mean's) as a (C, H, W) float32 array."""
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read mean file: {e.strerror}") from None
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(payload)
        array = blobproto_to_array(blob)
    except (DecodeError, ValueError) as e:
        raise UserError(f"{path}: not a valid BlobProto mean file: {e}") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise UserError(f"{path}: mean blob has shape {array.shape}; expected (1, C, H, W)")
    return array
