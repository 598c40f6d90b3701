"""`--stage-data DIR`: copy each rank's shard of each LMDB to node-local storage once, read it there.

Datasets on a parallel file system (Lustre, GPFS) are slow to read again and again; a rank's
contiguous shard is copied once into DIR (for example /dev/shm or a local NVMe disk) before
training, and the data layers read the copy. The copy is `shard_cache.lmdb_shard` with no
rotation, so it does not depend on where training resumes (the layers' `skip_records` starts
them there): it is named by the source's identity (real path, size, modification time), the
rank and the number of ranks, and a later run with the same data and ranks reuses it.

The time spent and the bytes the rank read from storage while copying (Linux's
/proc/self/io read_bytes, which counts page-cache misses, so a source already cached reads 0)
are reported per rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from mpicaffe.data import shard_cache


@dataclass
class StagedShard:
    """One rank's staged copy of one LMDB shard."""

    source: str
    path: str
    bounds: tuple[int, int]   # the shard's records [start, end) in the source
    reused: bool
    seconds: float
    bytes_read: int | None    # storage reads while copying; None where /proc/self/io is missing


def storage_bytes_read() -> int | None:
    """Bytes this process has read from storage so far (not from the page cache), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def stage_lmdb(source: str, rank: int, size: int, directory: str) -> StagedShard:
    """Copy `rank`'s shard of the LMDB `source` into `directory` unless a complete copy is there.

    Raises UserError when the source is not a readable LMDB or holds fewer records than ranks.
    """
    start_bytes = storage_bytes_read()
    start = time.perf_counter()
    path, bounds, reused = shard_cache.lmdb_shard(source, rank, size, skip=0, cache=directory)
    seconds = time.perf_counter() - start
    end_bytes = storage_bytes_read()
    read = None if start_bytes is None or end_bytes is None else end_bytes - start_bytes
    return StagedShard(source, path, bounds, reused, seconds, read)


def describe(rank: int, shards: list[StagedShard]) -> str:
    """One log line for a rank's staged shards."""
    if not shards:
        return f"rank {rank}: no LMDB data layers"
    parts = []
    for s in shards:
        start, end = s.bounds
        read = "" if s.bytes_read is None else f", {s.bytes_read / 1e6:.2f} MB read from storage"
        what = "reused" if s.reused else "copied"
        parts.append(f"{what} records {start}..{end - 1} of {s.source} ({s.seconds:.2f} s{read})")
    return f"rank {rank}: " + "; ".join(parts)
