"""`--stage-data DIR` under real `mpirun -np 2`: each rank copies only its shard of each LMDB,
training reads the copies (same weights as reading the source), and a second run reuses them."""
import os
import re

import numpy as np

from mpicaffe import prototxt
from mpicaffe.data import lmdb_io
from tests.mpi_harness import run_mpi

RECORDS = 2000
SHAPE = (3, 128, 128)  # 49 kB records: a 100 MB database, well above the kernel's read-ahead (often 8 MB)

NET = """
name: "staged"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 } data_param { source: "TRAIN_DB" batch_size: 8 backend: LMDB } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.00390625 } data_param { source: "TEST_DB" batch_size: 10 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "NET"
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
max_iter: 6
display: 2
test_iter: 2
test_interval: 3
snapshot_after_train: true
snapshot_prefix: "PREFIX"
random_seed: 3
"""


def _write_db(path, n, seed):
    rng = np.random.default_rng(seed)
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i),
                                      lmdb_io.array_to_datum(rng.integers(0, 256, SHAPE, dtype=np.uint8),
                                                             int(rng.integers(10))))
                                     for i in range(n)))


def _evict(db):
    """Drop the database's pages from the page cache, so reading it again counts in read_bytes."""
    fd = os.open(os.path.join(db, "data.mdb"), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _solver(tmp_path, name, train_db, test_db):
    net = tmp_path / f"{name}_net.prototxt"
    net.write_text(NET.replace("TRAIN_DB", str(train_db)).replace("TEST_DB", str(test_db)))
    solver = tmp_path / f"{name}_solver.prototxt"
    solver.write_text(SOLVER.replace("NET", str(net)).replace("PREFIX", str(tmp_path / name)))
    return str(solver)


def _train(solver, *extra):
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, *extra], timeout=300)
    return result.rank_stderr(0)


def _staged(log, db):
    """{rank: (what, first, last, MB read)} from rank 0's staging report for database `db`."""
    found = {}
    for rank, what, first, last, mb in re.findall(
            rf"rank (\d): .*?(copied|reused) records (\d+)\.\.(\d+) of {re.escape(str(db))} "
            r"\([\d.]+ s, ([\d.]+) MB read from storage\)", log):
        found[int(rank)] = (what, int(first), int(last), float(mb))
    return found


def _weights(path):
    return [np.array(b.data) for layer in prototxt.read_net(str(path)).layer for b in layer.blobs]


def test_each_rank_copies_only_its_shard_and_a_second_run_reuses_it(tmp_path):
    train_db, test_db, stage = tmp_path / "train_db", tmp_path / "test_db", tmp_path / "stage"
    _write_db(train_db, RECORDS, 0)
    _write_db(test_db, 40, 1)
    _evict(str(train_db))
    size_mb = os.path.getsize(train_db / "data.mdb") / 1e6

    log = _train(_solver(tmp_path, "first", train_db, test_db), "--stage-data", str(stage))
    train = _staged(log, train_db)
    assert train == {0: ("copied", 0, 999, train[0][3]), 1: ("copied", 1000, 1999, train[1][3])}, log
    for rank in (0, 1):
        # measured storage reads while copying: about half the database each, plus read-ahead (the
        # source was evicted from the page cache; the layer's setup read its first and last pages)
        assert 0.3 * size_mb < train[rank][3] < 0.75 * size_mb, (rank, train[rank][3], size_mb)
    assert {r: v[:3] for r, v in _staged(log, test_db).items()} == {0: ("copied", 0, 19), 1: ("copied", 20, 39)}
    # each copy holds exactly its shard's records, and training reads the copy
    copies = sorted(p for p in os.listdir(stage) if p.startswith("train_db"))
    assert len(copies) == 2
    source = list(lmdb_io.iter_values(str(train_db)))
    for copy in copies:
        values = [v for _, v in lmdb_io.iter_values(str(stage / copy))]
        first = 0 if ".rank0of2." in copy else 1000
        assert values == [v for _, v in source[first:first + 1000]]
    assert re.search(rf"rank 0 of 2 reads records 0\.\.999 of 1000 in {re.escape(str(stage))}/train_db\.rank0of2\.",
                     log), log
    assert re.search(r"Data wait per iteration: [\d.]+ ms mean across ranks", log), log

    # the second run copies nothing, and resuming mid-shard needs no new copy either
    log2 = _train(_solver(tmp_path, "second", train_db, test_db), "--stage-data", str(stage))
    assert {r: v[0] for r, v in _staged(log2, train_db).items()} == {0: "reused", 1: "reused"}, log2
    assert {r: v[0] for r, v in _staged(log2, test_db).items()} == {0: "reused", 1: "reused"}, log2
    assert len(os.listdir(stage)) == 4  # train and test shards of two ranks
    log3 = _train(_solver(tmp_path, "first", train_db, test_db), "--stage-data", str(stage),
                  "--snapshot", str(tmp_path / "first_iter_6.solverstate"), "--check-every", "1")
    assert "copied" not in log3 and "reused records 0..999" in log3, log3
    assert len(os.listdir(stage)) == 4

    # reading the staged copies gives the same training as reading the source
    _train(_solver(tmp_path, "direct", train_db, test_db))
    for a, b in zip(_weights(tmp_path / "second_iter_6.caffemodel"), _weights(tmp_path / "direct_iter_6.caffemodel")):
        np.testing.assert_array_equal(a, b)
