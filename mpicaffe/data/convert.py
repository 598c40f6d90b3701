"""`mpicaffe convert`: write Caffe LMDB datasets (and mean files) from arrays, image lists or built-ins.

    mpicaffe convert digits|mnist --out DIR [--seed S] [--test-fraction F] [--overwrite]
    mpicaffe convert npz FILE --out DB [--labels LABELS.npy] [--mean M.binaryproto] ...
    mpicaffe convert images LISTFILE --root DIR --out DB [--resize-height H --resize-width W]
                            [--gray] [--shuffle] [--encoded [--encode-type png|jpg]] [--mean M]

The built-in datasets write DIR/<name>_train_lmdb, DIR/<name>_test_lmdb and
DIR/<name>_mean.binaryproto (mean of the training set), and reuse them on a rerun with the same
parameters. Other outputs are never replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import TextIO

import lmdb

from mpicaffe.atomic import write_bytes_atomic
from mpicaffe.data import datasets, lmdb_io, mean_file
from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

# Bump when what the built-in converters write changes, so old outputs are not reused.
BUILTIN_FORMAT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `convert` subcommand's arguments (one sub-subcommand per source) to parser."""
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True,
                                    title="sources")
    for name, spec in datasets.BUILTIN.items():
        p = sources.add_parser(
            name, help=f"built-in: {spec.description}, split into train/test",
            description=f"Write {spec.description}, shuffled and split into train and test LMDBs, "
                        f"plus the training set's mean: DIR/{name}_train_lmdb, DIR/{name}_test_lmdb, "
                        f"DIR/{name}_mean.binaryproto. A rerun with the same parameters reuses them.")
        p.add_argument("--out", required=True, metavar="DIR", help="output directory")
        p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
        p.add_argument("--test-fraction", type=float, default=None, metavar="F",
                       help=f"fraction of records for the test set (default: {spec.default_test} "
                            f"of {spec.size})")
        _add_overwrite(p)

    p = sources.add_parser(
        "npz", help="numpy arrays: an .npz file, or a .npy file with --labels",
        description="Write an LMDB from numpy arrays, keyed %08d like convert_mnist_data. "
                    "uint8 arrays are stored as pixel bytes, anything else as float_data.")
    p.add_argument("file", metavar="FILE", help=".npz archive (or .npy data file with --labels)")
    p.add_argument("--out", required=True, metavar="DB", help="LMDB directory to create")
    p.add_argument("--labels", metavar="LABELS.npy", help=".npy file of labels, when FILE is a .npy")
    p.add_argument("--data-key", metavar="KEY", help="array in the .npz holding the data "
                   "(default: 'data' or 'X')")
    p.add_argument("--label-key", metavar="KEY", help="array in the .npz holding the labels "
                   "(default: 'labels' or 'y')")
    p.add_argument("--layout", choices=datasets.LAYOUTS, default="nchw",
                   help="axis order of 4-D arrays (default: nchw); 3-D arrays are (N, H, W)")
    _add_mean(p)
    _add_overwrite(p)

    p = sources.add_parser(
        "images", help="an image folder and a list file, like convert_imageset",
        description="Write an LMDB from images listed as '<relative/path> <label>' lines, keyed "
                    "%08d_<path> like convert_imageset. Color images are stored BGR, as OpenCV "
                    "reads them.")
    p.add_argument("list_file", metavar="LISTFILE", help="list of '<relative/path> <integer label>' lines")
    p.add_argument("--root", required=True, metavar="DIR", help="folder the listed paths are relative to")
    p.add_argument("--out", required=True, metavar="DB", help="LMDB directory to create")
    p.add_argument("--resize-height", type=int, default=0, metavar="H",
                   help="resize images to this height (with --resize-width; bilinear)")
    p.add_argument("--resize-width", type=int, default=0, metavar="W",
                   help="resize images to this width (with --resize-height; bilinear)")
    p.add_argument("--gray", action="store_true", help="store images as one gray channel")
    p.add_argument("--shuffle", action="store_true", help="shuffle the list before writing")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle (default: 0)")
    p.add_argument("--encoded", action="store_true",
                   help="store encoded images (the file's bytes when unchanged) instead of pixels")
    p.add_argument("--encode-type", choices=("png", "jpg"), default=None,
                   help="encoding for --encoded (default: each file's own); implies --encoded")
    p.add_argument("--check-size", action="store_true", help="require all images to have one size")
    _add_mean(p)
    _add_overwrite(p)


def _add_mean(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", metavar="M.binaryproto",
                   help="also write the per-pixel mean of the database (like compute_image_mean)")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    """Run `mpicaffe convert` with parsed arguments; returns the exit status."""
    if args.source in datasets.BUILTIN:
        return convert_builtin(args.source, args.out, seed=args.seed,
                               test_fraction=args.test_fraction, overwrite=args.overwrite)
    if args.source == "npz":
        return _convert_npz(args)
    if args.source == "images":
        return _convert_images(args)
    raise UserError(f"unknown source {args.source!r}")


# ---------------------------------------------------------------------------- progress

class Progress:
    """Report records done on long conversions (over about a second), to stderr.

    On a terminal: a carriage-return counter; otherwise a log line every ~10%.
    """

    def __init__(self, what: str, total: int, stream: TextIO | None = None) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._step = max(1, math.ceil(total / 10))
        self._start = time.monotonic()
        self._last_draw = 0.0
        self.shown = False

    def __call__(self, done: int) -> None:
        finished = done >= self.total
        if self.tty:
            now = time.monotonic()
            if finished and not self.shown:
                return
            if finished or (now - self._start >= 1.0 and now - self._last_draw >= 0.1):
                self._last_draw = now
                self.shown = True
                self.stream.write(f"\r{self.what}: {done}/{self.total}" + ("\n" if finished else ""))
                self.stream.flush()
        elif (done % self._step == 0 and time.monotonic() - self._start >= 1.0) or (finished and self.shown):
            self.shown = True
            log.info("%s: %d/%d (%d%%)", self.what, done, self.total, 100 * done // max(1, self.total))


def _refuse_existing(paths: list[str], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise UserError(f"{path} already exists; pass --overwrite to replace it")


def _write(db_path: str, records, total: int, overwrite: bool) -> int:
    n = lmdb_io.write_datums(db_path, records, overwrite=overwrite,
                             on_record=Progress(f"Writing {db_path}", total))
    log.info("Wrote %d records to %s", n, db_path)
    return n


def _write_mean(db_path: str, mean_path: str, total: int) -> None:
    mean = mean_file.compute_mean(db_path, on_record=Progress(f"Computing mean of {db_path}", total))
    mean_file.write_mean_file(mean_path, mean)
    log.info("Wrote mean %s of shape (1, %d, %d, %d)", mean_path, *mean.shape)


# ---------------------------------------------------------------------------- sources

def _convert_npz(args: argparse.Namespace) -> int:
    outputs = [args.out] + ([args.mean] if args.mean else [])
    _refuse_existing(outputs, args.overwrite)
    if args.labels:
        data, labels = datasets.load_npy_pair(args.file, args.labels, args.layout)
    else:
        data, labels = datasets.load_npz(args.file, args.data_key, args.label_key, args.layout)
    log.info("%s: %d records of shape %s, %s", args.file, data.shape[0], data.shape[1:], data.dtype)
    _write(args.out, datasets.array_records(data, labels), data.shape[0], args.overwrite)
    if args.mean:
        _write_mean(args.out, args.mean, data.shape[0])
    return 0


def _convert_images(args: argparse.Namespace) -> int:
    if (args.resize_height > 0) != (args.resize_width > 0) or min(args.resize_height, args.resize_width) < 0:
        raise UserError("give both --resize-height and --resize-width as positive sizes, or neither")
    size = (args.resize_height, args.resize_width) if args.resize_height > 0 else None
    encoding = None
    if args.encoded or args.encode_type:
        encoding = args.encode_type or ""
    outputs = [args.out] + ([args.mean] if args.mean else [])
    _refuse_existing(outputs, args.overwrite)
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: not a directory")
    entries = datasets.read_image_list(args.list_file)
    if not entries:
        raise UserError(f"{args.list_file}: the list is empty")
    datasets.check_image_files(entries, args.list_file, args.root)
    if args.shuffle:
        entries = datasets.shuffle_entries(entries, args.seed)
    log.info("%s: %d images", args.list_file, len(entries))
    records = datasets.image_records(entries, args.list_file, args.root, color=not args.gray, size=size,
                                     encoding=encoding, check_size=args.check_size)
    _write(args.out, records, len(entries), args.overwrite)
    if args.mean:
        _write_mean(args.out, args.mean, len(entries))
    return 0


def builtin_paths(name: str, out_dir: str) -> dict:
    """Paths the built-in dataset `name` is written to under out_dir."""
    return {
        "train": os.path.join(out_dir, f"{name}_train_lmdb"),
        "test": os.path.join(out_dir, f"{name}_test_lmdb"),
        "mean": os.path.join(out_dir, f"{name}_mean.binaryproto"),
        "marker": os.path.join(out_dir, f"{name}_dataset.json"),
    }


def convert_builtin(name: str, out_dir: str, seed: int = 0, test_fraction: float | None = None,
                    overwrite: bool = False) -> int:
    """Write (or reuse) the built-in dataset `name` as train/test LMDBs plus the train mean.

    A JSON marker written last records the parameters; a later call with the same parameters
    whose outputs are all present returns at once. Returns the exit status (0).
    """
    spec = datasets.BUILTIN[name]
    n_test = spec.default_test if test_fraction is None else datasets.test_count(spec.size, test_fraction)
    paths = builtin_paths(name, out_dir)
    params = {"dataset": name, "format": BUILTIN_FORMAT, "seed": seed,
              "train_count": spec.size - n_test, "test_count": n_test}
    if not overwrite and _builtin_complete(paths, params):
        log.info("Reusing %s dataset in %s (same parameters: seed %d, %d train / %d test); "
                 "pass --overwrite to rebuild", name, out_dir, seed, params["train_count"], n_test)
        return 0
    previous = _read_marker(paths["marker"])
    if not overwrite and previous is not None and all(previous.get(k) == v for k, v in params.items()):
        # Our own outputs for these parameters, but damaged or partly removed: rebuild them.
        log.info("Rebuilding incomplete %s dataset in %s", name, out_dir)
    elif not overwrite:
        if previous is not None:
            raise UserError(
                f"{out_dir} holds the {name} dataset written with other parameters "
                f"(seed {previous.get('seed')}, {previous.get('train_count')} train / "
                f"{previous.get('test_count')} test; asked for seed {seed}, {params['train_count']} / "
                f"{n_test}); pass --overwrite to replace it")
        _refuse_existing([paths[k] for k in ("train", "test", "mean", "marker")], False)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.lexists(paths["marker"]):
        os.remove(paths["marker"])

    data, labels = spec.load()
    train, test = datasets.split_train_test(data, labels, n_test, seed)
    for split, (x, y) in (("train", train), ("test", test)):
        _write(paths[split], datasets.array_records(x, y), x.shape[0], overwrite=True)
    _write_mean(paths["train"], paths["mean"], train[0].shape[0])

    marker = dict(params, train=os.path.basename(paths["train"]), test=os.path.basename(paths["test"]),
                  mean=os.path.basename(paths["mean"]), shape=list(data.shape[1:]))
    write_bytes_atomic(paths["marker"], (json.dumps(marker, indent=2) + "\n").encode())
    return 0


def _builtin_complete(paths: dict, params: dict) -> bool:
    """Whether the marker matches params and every output it vouches for is present and whole."""
    marker = _read_marker(paths["marker"])
    if marker is None or any(marker.get(k) != v for k, v in params.items()):
        return False
    try:
        return (lmdb_io.count(paths["train"]) == params["train_count"]
                and lmdb_io.count(paths["test"]) == params["test_count"]
                and os.path.isfile(paths["mean"]))
    except (UserError, OSError, lmdb.Error):  # missing or unreadable means "not complete"
        return False


def _read_marker(path: str) -> dict | None:
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None
