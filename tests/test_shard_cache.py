"""Per-rank local shard copies (mpicaffe.data.shard_cache) and the data position of a resumed run."""
import os
import shutil
import tempfile

import numpy as np
import pytest

from mpicaffe.data import lmdb_io, shard_cache, sharding
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


def _db(tmp_path, n):
    path = tmp_path / "src_db"
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(np.full((1, 2, 2), i, np.uint8), i))
                                     for i in range(n)))
    return str(path)


def _labels(path):
    return [d.label for _, d in lmdb_io.iter_datums(path)]


def test_lmdb_copy_holds_the_rank_shard_rotated_and_is_reused(tmp_path):
    src = _db(tmp_path, 11)
    cache = str(tmp_path / "cache")
    path, bounds, reused = shard_cache.lmdb_shard(src, 1, 3, skip=0, cache=cache)
    assert bounds == (4, 8) and not reused and _labels(path) == [4, 5, 6, 7]
    assert shard_cache.lmdb_shard(src, 1, 3, skip=0, cache=cache) == (path, (4, 8), True)
    # a resumed run that read 6 records of this 4-record shard starts at its third record
    rotated, _, reused = shard_cache.lmdb_shard(src, 1, 3, skip=6, cache=cache)
    assert rotated != path and not reused and _labels(rotated) == [6, 7, 4, 5]
    with pytest.raises(UserError, match="cannot split 11 records among 12 ranks"):
        shard_cache.lmdb_shard(src, 0, 12, cache=cache)


def test_list_copy_holds_the_rank_lines(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"img{i}.png {i}\n" for i in range(5)) + "\n")
    path, bounds, _ = shard_cache.list_shard(str(listing), 0, 2, skip=1, cache=str(tmp_path / "cache"))
    assert bounds == (0, 3)
    with open(path) as f:
        assert f.read().splitlines() == ["img1.png 1", "img2.png 2", "img0.png 0"]


def test_batches_read_before_a_resumed_iteration():
    param = caffe_pb2.SolverParameter(iter_size=2, test_interval=10, test_iter=[5, 1])
    # tests ran at 0, 10 and 20; rank 1 of 2 runs 2 of the first net's 5 batches, none of the second's
    assert sharding.batches_read(param, 25, 1, 2) == (50, [6, 0])
    param.test_initialization = False
    assert sharding.batches_read(param, 25, 0, 2) == (50, [6, 2])
    assert [sharding.test_share(5, r, 2) for r in (0, 1)] == [3, 2]


def test_a_copy_changed_since_it_was_made_is_not_reused(tmp_path):
    src = _db(tmp_path, 8)
    cache = str(tmp_path / "cache")
    path, _, _ = shard_cache.lmdb_shard(src, 0, 2, cache=cache)
    assert _labels(path) == [0, 1, 2, 3]
    # tamper with the copy: same record count, shifted labels (the 0.8 -> 0.02 accuracy)
    tampered = [(key, lmdb_io.array_to_datum(np.zeros((1, 2, 2), np.uint8), (d.label + 1) % 10))
                for key, d in lmdb_io.iter_datums(path)]
    lmdb_io.write_datums(path + ".new", tampered)
    digest = os.path.join(path, shard_cache.DIGEST_FILE)
    os.replace(digest, os.path.join(path + ".new", shard_cache.DIGEST_FILE))
    shutil.rmtree(path)
    os.replace(path + ".new", path)
    again, _, reused = shard_cache.lmdb_shard(src, 0, 2, cache=cache)
    assert again == path and not reused and _labels(path) == [0, 1, 2, 3]
    # a copy without its digest (an older run's, or an interrupted one) is made again too
    os.remove(os.path.join(path, shard_cache.DIGEST_FILE))
    assert not shard_cache.lmdb_shard(src, 0, 2, cache=cache)[2]
    assert shard_cache.lmdb_shard(src, 0, 2, cache=cache)[2]
    # a list copy is reused only while it equals the shard
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"img{i}.png {i}\n" for i in range(4)))
    copy, _, _ = shard_cache.list_shard(str(listing), 0, 2, cache=cache)
    with open(copy, "w") as f:
        f.write("img0.png 5\nimg1.png 6\n")
    assert not shard_cache.list_shard(str(listing), 0, 2, cache=cache)[2]
    with open(copy) as f:
        assert f.read() == "img0.png 0\nimg1.png 1\n"


def test_the_default_cache_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv(shard_cache.CACHE_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = shard_cache.cache_dir()
    assert path == str(tmp_path / f"mpicaffe-shards-{os.getuid()}")
    assert os.stat(path).st_mode & 0o777 == 0o700
    os.chmod(path, 0o777)  # a folder others can write into: refused, not used
    with pytest.raises(UserError, match="nobody else can read or write"):
        shard_cache.cache_dir()


def test_a_folder_that_cannot_take_the_copy_is_a_one_line_error(tmp_path):
    src = _db(tmp_path, 8)
    (tmp_path / "file").write_text("not a folder")  # (root writes through read-only modes)
    with pytest.raises(UserError, match=r"cannot write the shard copy .*file/src_db.rank0of2.* \(choose another folder"):
        shard_cache.lmdb_shard(src, 0, 2, cache=str(tmp_path / "file"))
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nb.png 1\n")
    with pytest.raises(UserError, match="cannot write the shard copy"):
        shard_cache.list_shard(str(listing), 0, 2, cache=str(tmp_path / "file"))
