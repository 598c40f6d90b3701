"""Rank sharding of a dataset: each rank reads one contiguous range of records.

Caffe's multi-GPU Data layer keeps the records whose index % solver_count == solver_rank, so
every rank reads (and skips) the whole database. Here rank r of n gets the contiguous range
`shard_bounds(count, r, n)` and starts reading there directly.

Finding where a range starts in an LMDB without reading the database (`seek_record`):

- Fast path (`seek_sequential`): Caffe's tools name record i `%08d` (convert_mnist_data,
  convert_cifar_data) or `%08d_<file name>` (convert_imageset). When the first and last keys
  carry leading decimal numbers of the same width whose difference is count - 1, record i's key
  is computed and the cursor jumps to it (`set_key` for all-digit keys, `set_range` on the
  number for prefixed keys); the key found is checked to carry that number. This trusts the
  numbers to be unique, as every Caffe tool writes them. Cost: three B-tree lookups.
- Otherwise (`seek_by_scan`): step the cursor from the first record, keys only. LMDB's cursor
  hands back pointers into the memory map, so stepping over a record never touches its value
  pages; the cost is one B-tree step per skipped record.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mpicaffe.errors import UserError

FIRST = "first record"
SEQUENTIAL = "sequential keys"
SCAN = "key scan"

_NUMBER = re.compile(rb"\d+")


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The record range [start, end) of `rank` when `n` records are split among `size` ranks.

    Ranges are contiguous, in rank order, and cover all records; their sizes differ by at most
    one, the earlier ranks taking the extra records. Raises UserError when a rank would get no
    records, ValueError for an invalid rank or size.
    """
    if size < 1:
        raise ValueError(f"shard count must be at least 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    if n < size:
        raise UserError(f"cannot split {n} records among {size} ranks: ranks {n}..{size - 1} would get "
                        f"no data; run at most {n} ranks or use a larger dataset")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def key_number(key: bytes) -> tuple[int, int] | None:
    """(value, digit count) of the decimal number a key starts with; None if it starts otherwise."""
    match = _NUMBER.match(bytes(key))
    if match is None:
        return None
    return int(match.group()), len(match.group())


def seek_sequential(cursor, index: int, count: int) -> bool:
    """Jump an LMDB cursor to record `index` of `count` by computing its key (Caffe's `%08d` keys).

    Returns False, with the cursor anywhere, when the keys do not look sequential or the computed
    key is not there; the caller then falls back to `seek_by_scan`.
    """
    if not 0 <= index < count or not cursor.first():
        return False
    first_key = bytes(cursor.key())
    if not cursor.last():
        return False
    last_key = bytes(cursor.key())
    first, last = key_number(first_key), key_number(last_key)
    if first is None or last is None or first[1] != last[1] or last[0] - first[0] != count - 1:
        return False
    width = first[1]
    number = first[0] + index
    target = b"%0*d" % (width, number)
    if first_key.isdigit() and last_key.isdigit():
        return bool(cursor.set_key(target))
    return bool(cursor.set_range(target)) and key_number(bytes(cursor.key())) == (number, width)


def seek_by_scan(cursor, index: int) -> None:
    """Put an LMDB cursor on record `index` by stepping from the first record, keys only."""
    if not cursor.first():
        raise ValueError("the database is empty")
    for _ in range(index):
        if not cursor.next():
            raise ValueError(f"the database has fewer than {index + 1} records")


def seek_record(cursor, index: int, count: int) -> str:
    """Put an LMDB cursor on record `index` (0-based, in key order) of a database of `count` records.

    Returns the method used: FIRST (index 0), SEQUENTIAL (key computed) or SCAN (keys stepped over).
    """
    if index == 0:
        if not cursor.first():
            raise ValueError("the database is empty")
        return FIRST
    if seek_sequential(cursor, index, count):
        return SEQUENTIAL
    seek_by_scan(cursor, index)
    return SCAN


def test_share(test_iter: int, rank: int, size: int) -> int:
    """How many of a test net's `test_iter` batches `rank` runs: a contiguous share, or one batch
    each on the first `test_iter` ranks when there are fewer batches than ranks."""
    if test_iter >= size:
        lo, hi = shard_bounds(test_iter, rank, size)
        return hi - lo
    return 1 if rank < test_iter else 0


def batches_read(param, iteration: int, rank: int, size: int) -> tuple[int, list[int]]:
    """The batches `rank`'s data layers have read when training (SolverParameter `param`, as the
    user wrote it) reaches `iteration`: (train net batches, [batches of each test net]).

    A resumed run starts each layer this far into its shard, where the uninterrupted run would be.
    """
    tests_done = 0
    if param.test_interval:
        tests_done = sum(1 for t in range(0, iteration, param.test_interval) if t > 0 or param.test_initialization)
    tests = [tests_done * test_share(n, rank, size) for n in param.test_iter]
    return iteration * param.iter_size, tests


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank batch sizes: the prototxt's batch, this rank's batch, the global batch, and the
    weight of this rank's gradient in the average."""

    prototxt_batch: int
    local: int
    global_batch: int
    weight: float


def plan_batches(prototxt_batch: int, size: int, rank: int, global_batch: int | None) -> BatchPlan:
    """Keep the prototxt's batch on every rank (global = ranks x batch), or split `global_batch`
    over the ranks as evenly as possible (earlier ranks take the remainder)."""
    if global_batch is None:
        return BatchPlan(prototxt_batch, prototxt_batch, prototxt_batch * size, 1.0)
    if global_batch < size:
        raise UserError(f"--global-batch {global_batch} is smaller than the number of ranks ({size})")
    lo, hi = shard_bounds(global_batch, rank, size)
    return BatchPlan(prototxt_batch, hi - lo, global_batch, (hi - lo) * size / global_batch)
