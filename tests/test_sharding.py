"""Rank sharding (mpicaffe.data.sharding): contiguous shard ranges and seeking to them in an LMDB."""
import itertools

import lmdb
import numpy as np
import pytest

from mpicaffe.data import lmdb_io, sharding
from mpicaffe.data.sharding import shard_bounds
from mpicaffe.errors import UserError


@pytest.mark.parametrize("n,size", [(10, 1), (10, 3), (10, 4), (7, 7), (1001, 8), (5, 2)])
def test_shards_are_contiguous_cover_and_balanced(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start  # contiguous, disjoint, in rank order
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier ranks take the extra records


def test_shard_bounds_examples():
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(5, 0, 1) == (0, 5)


def test_empty_shard_is_an_error():
    with pytest.raises(UserError, match="cannot split 3 records among 4 ranks"):
        shard_bounds(3, 0, 4)
    with pytest.raises(ValueError):
        shard_bounds(10, 4, 4)
    with pytest.raises(ValueError):
        shard_bounds(10, 0, 0)


def test_key_number():
    assert sharding.key_number(b"00000042") == (42, 8)
    assert sharding.key_number(b"00000042_cat/1.jpg") == (42, 8)
    assert sharding.key_number(b"cat_00000042") is None


class CountingCursor:
    """Wraps an lmdb cursor, counting every access that would read a record's value."""

    VALUE_READS = ("value", "item", "iternext", "iterprev", "getmulti", "pop", "replace", "get")

    def __init__(self, cursor):
        self._cursor = cursor
        self.value_reads = 0

    def __getattr__(self, name):
        if name in self.VALUE_READS:
            self.value_reads += 1
        return getattr(self._cursor, name)


def _write(path, keys):
    records = [(k, lmdb_io.array_to_datum(np.full((1, 1, 2), i % 256, np.uint8), label=i))
               for i, k in enumerate(keys)]
    lmdb_io.write_datums(str(path), records)
    return str(path)


def _cursor(db):
    env = lmdb.open(db, readonly=True, lock=False)
    txn = env.begin()
    return env, txn, CountingCursor(txn.cursor())


def _label_at(cursor):
    return lmdb_io.parse_datum(cursor._cursor.value()).label


KEY_STYLES = {
    "plain": lambda i: b"%08d" % i,
    "imageset": lambda i: b"%08d_img/%s.png" % (i, b"zyx"[i % 3:i % 3 + 1]),
    "names": lambda i: b"rec_%c%03d" % (97 + i % 5, i),  # sorted order differs from write order
}


@pytest.mark.parametrize("style", sorted(KEY_STYLES))
def test_both_seek_paths_find_the_same_record(tmp_path, style):
    n = 23
    keys = [KEY_STYLES[style](i) for i in range(n)]
    db = _write(tmp_path / "db", keys)
    env, _txn, cursor = _cursor(db)
    sorted_labels = [keys.index(k) for k in sorted(keys)]
    for index in range(n):
        if style != "names":
            assert sharding.seek_sequential(cursor, index, n)
            assert _label_at(cursor) == sorted_labels[index]
        else:
            assert not sharding.seek_sequential(cursor, index, n)
        sharding.seek_by_scan(cursor, index)
        assert _label_at(cursor) == sorted_labels[index]
    assert cursor.value_reads == 0  # neither path reads a value
    method = sharding.seek_record(cursor, 7, n)
    assert method == (sharding.SCAN if style == "names" else sharding.SEQUENTIAL)
    assert _label_at(cursor) == sorted_labels[7]
    assert sharding.seek_record(cursor, 0, n) == sharding.FIRST
    env.close()


def test_gaps_in_numbered_keys_fall_back_to_scan(tmp_path):
    keys = [b"%08d" % i for i in (0, 1, 2, 4, 5)]  # 3 missing: last - first != count - 1
    db = _write(tmp_path / "db", keys)
    env, _txn, cursor = _cursor(db)
    assert not sharding.seek_sequential(cursor, 3, 5)
    assert sharding.seek_record(cursor, 3, 5) == sharding.SCAN
    assert bytes(cursor.key()) == b"00000004"
    assert cursor.value_reads == 0
    env.close()


def test_mixed_key_widths_fall_back_to_scan(tmp_path):
    keys = [b"%d" % i for i in range(12)]  # "10" sorts before "2"
    db = _write(tmp_path / "db", keys)
    env, _txn, cursor = _cursor(db)
    assert not sharding.seek_sequential(cursor, 5, 12)
    sharding.seek_record(cursor, 5, 12)
    assert bytes(cursor.key()) == sorted(keys)[5]
    env.close()


def test_scan_past_the_end_is_an_error(tmp_path):
    db = _write(tmp_path / "db", [b"a", b"b"])
    env, _txn, cursor = _cursor(db)
    with pytest.raises(ValueError, match="fewer than 4 records"):
        sharding.seek_by_scan(cursor, 3)
    env.close()
