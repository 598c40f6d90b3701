#!/usr/bin/env python
"""Data layer throughput against `--data-workers`: images/s for JPEG-encoded and raw LMDBs.

Builds two LMDBs of the same generated 256x256 color images (smooth gradients with noise, so
JPEG sizes are like photographs'; labels 0..N-1): one of JPEG-encoded records (quality 95, as
`mpicaffe convert images --encoded` writes them) and one of raw Datums. Each is read by the
engine's Data layer, batch 64, `crop_size: 224 mirror: true` and three mean_values (TRAIN), with
each worker count, in one process on the CPU. The consumer only takes the batches (forward), so
the rate is the input pipeline's alone. Both databases are read once before timing, so that
their pages are in the page cache (a raw record is 192 KiB).

Method: the configurations (database x workers) are interleaved within each repetition, so that
noise from other processes hits them alike; each one is a fresh layer, warmed up by 2 batches,
then timed over `--batches` batches. The table shows the median images/s over `--repeats`
repetitions, the speed-up over `--data-workers 0` (decoding in the prefetch thread), and the
CPU time the process spent per image (all its threads; median), which other processes on the
machine disturb less than the rate.

    python scripts/bench/data.py [--records 1500] [--workers 0,1,2] [--batches 20] [--repeats 3]
                                 [--markdown]

Workers default to 0, 1, 2 and then powers of two up to the number of CPUs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import create_layer
from mpicaffe.data import images, lmdb_io
from mpicaffe.proto import caffe_pb2

SIZE, CROP, BATCH = 256, 224, 64
TRANSFORM = f"crop_size: {CROP} mirror: true mean_value: 104 mean_value: 117 mean_value: 123"


def picture(i: int, rng: np.random.Generator) -> np.ndarray:
    """A (3, SIZE, SIZE) uint8 image: gradients that move with i, and noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([(x + 3 * i) % 256, (2 * y + i) % 256, ((x + y) // 2 + 5 * i) % 256]).astype(np.int16)
    return np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)


def build(folder: str, records: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    encoded, raw = [], []
    for i in range(records):
        image = picture(i, rng)
        key = lmdb_io.datum_key(i)
        encoded.append((key, lmdb_io.encoded_datum(images.encode_image(image, "jpg"), i)))
        raw.append((key, lmdb_io.array_to_datum(image, i).SerializeToString()))
    dbs = {"JPEG-encoded": os.path.join(folder, "encoded"), "raw": os.path.join(folder, "raw")}
    lmdb_io.write_datums(dbs["JPEG-encoded"], encoded)
    lmdb_io.write_datums(dbs["raw"], raw)
    for db in dbs.values():  # into the page cache, so that the first configuration timed reads no disk
        for _ in lmdb_io.iter_values(db):
            pass
    return dbs


def measure(db: str, workers: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of a fresh Data layer over `batches` batches after warmup."""
    text = (f'name: "data" type: "Data" top: "data" top: "label" data_param {{ source: "{db}" '
            f"batch_size: {BATCH} backend: LMDB }} transform_param {{ {TRANSFORM} }}")
    layer = create_layer(prototxt.parse_text(text, caffe_pb2.LayerParameter()), caffe_pb2.TRAIN, "cpu", "")
    layer.setup([])
    layer.set_data_workers(workers)
    try:
        for _ in range(2):
            layer.forward([])
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            layer.forward([])
        images = batches * BATCH
        return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3
    finally:
        layer.close()


def default_workers() -> str:
    cores = os.cpu_count() or 1
    counts, n = [0, 1, 2], 4
    while n <= cores:
        counts.append(n)
        n *= 2
    return ",".join(map(str, counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1500, help="records per database (default 1500)")
    parser.add_argument("--workers", default=default_workers(), help="worker counts, comma-separated")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per configuration (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print the table in markdown")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the layer's own threads only
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="mpicaffe-bench-data-") as folder:
        start = time.perf_counter()
        dbs = build(folder, args.records)
        print(f"{args.records} records of 3x{SIZE}x{SIZE} per database, built in {time.perf_counter() - start:.1f} s; "
              f"batch {BATCH}, {TRANSFORM}; {os.cpu_count()} CPUs", flush=True)
        rates: dict[tuple[str, int], list[float]] = {(kind, w): [] for kind in dbs for w in workers}
        cpu: dict[tuple[str, int], list[float]] = {(kind, w): [] for kind in dbs for w in workers}
        for r in range(args.repeats):
            for kind, db in dbs.items():
                for w in workers:
                    rate, ms = measure(db, w, args.batches)
                    rates[kind, w].append(rate)
                    cpu[kind, w].append(ms)
            print(f"repeat {r}: " + ", ".join(f"{kind} {w}: {rates[kind, w][-1]:.0f}" for kind in dbs for w in workers),
                  flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    rows = [(kind, w, median[kind, w], median[kind, w] / median[kind, workers[0]], statistics.median(cpu[kind, w]))
            for kind in dbs for w in workers]
    header = ("LMDB", "--data-workers", "images/s", f"vs {workers[0]} workers", "CPU ms/image")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for kind, w, rate, ratio, ms in rows:
            print(f"| {kind} | {w} | {rate:.0f} | {ratio:.2f}x | {ms:.2f} |")
    else:
        print(f"{header[0]:>14} {header[1]:>15} {header[2]:>9} {header[3]:>13} {header[4]:>13}")
        for kind, w, rate, ratio, ms in rows:
            print(f"{kind:>14} {w:>15} {rate:>9.0f} {ratio:>12.2f}x {ms:>13.2f}")


if __name__ == "__main__":
    main()
