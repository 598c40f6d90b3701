"""Caffe-format LMDB writing/reading (mpicaffe.data.lmdb_io) and mean files (mpicaffe.data.mean_file)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from mpicaffe.data import datasets, lmdb_io, mean_file
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


def _png_bytes(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def test_uint8_records_read_back_with_caffe_keys(tmp_path):
    rng = np.random.default_rng(1)
    n = 2345  # spans three 1000-record transactions
    data = rng.integers(0, 256, size=(n, 3, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    db = str(tmp_path / "train_lmdb")
    assert lmdb_io.write_datums(db, datasets.array_records(data, labels)) == n
    assert os.path.isfile(os.path.join(db, "data.mdb"))
    assert lmdb_io.count(db) == n

    seen = 0
    for i, (key, datum) in enumerate(lmdb_io.iter_datums(db)):
        assert key == b"%08d" % i
        assert (datum.channels, datum.height, datum.width) == (3, 5, 4)
        assert datum.data == data[i].tobytes()  # channel-major, as written
        assert len(datum.float_data) == 0 and not datum.encoded
        assert datum.label == labels[i]
        array, label = lmdb_io.decode_datum(datum)
        assert array.dtype == np.uint8 and array.shape == (3, 5, 4)
        np.testing.assert_array_equal(array, data[i])
        assert label == labels[i]
        seen += 1
    assert seen == n


def test_iter_datums_start_stop(tmp_path):
    data = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, datasets.array_records(data, np.arange(10)))
    keys = [k for k, _ in lmdb_io.iter_datums(db, start=3, stop=6)]
    assert keys == [b"00000003", b"00000004", b"00000005"]
    assert [d.label for _, d in lmdb_io.iter_datums(db, start=8)] == [8, 9]
    assert list(lmdb_io.iter_datums(db, start=20)) == []


def test_float_records_round_trip_through_float_data(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(7, 2, 3, 3)).astype(np.float32)
    db = str(tmp_path / "float_lmdb")
    lmdb_io.write_datums(db, datasets.array_records(data, np.arange(7)))
    for i, (_, datum) in enumerate(lmdb_io.iter_datums(db)):
        assert datum.data == b"" and len(datum.float_data) == 2 * 3 * 3
        array, label = lmdb_io.decode_datum(datum)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, data[i])
        assert label == i


def test_encoded_png_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(4, 5), dtype=np.uint8)
    color_png, gray_png = _png_bytes(rgb), _png_bytes(gray)
    db = str(tmp_path / "enc_lmdb")
    records = [(lmdb_io.datum_key(0, "a.png"), lmdb_io.encoded_datum(color_png, 4)),
               (lmdb_io.datum_key(1, "b.png"), lmdb_io.encoded_datum(gray_png, 7))]
    lmdb_io.write_datums(db, records)
    (k0, d0), (k1, d1) = lmdb_io.iter_datums(db)
    assert (k0, k1) == (b"00000000_a.png", b"00000001_b.png")
    assert d0.encoded and d0.data == color_png and d0.label == 4
    array, label = lmdb_io.decode_datum(d0)
    assert array.shape == (3, 6, 9) and label == 4
    np.testing.assert_array_equal(array, rgb[:, :, ::-1].transpose(2, 0, 1))  # BGR, like OpenCV
    array, label = lmdb_io.decode_datum(d1)
    assert array.shape == (1, 4, 5) and label == 7
    np.testing.assert_array_equal(array[0], gray)


def test_map_full_grows_instead_of_failing(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_io, "INITIAL_MAP_SIZE", 64 * 1024)
    data = np.random.default_rng(4).integers(0, 256, size=(300, 3, 32, 32), dtype=np.uint8)
    db = str(tmp_path / "db")
    assert lmdb_io.write_datums(db, datasets.array_records(data, np.zeros(300))) == 300
    last_key, last = list(lmdb_io.iter_datums(db))[-1]
    assert last_key == b"00000299" and last.data == data[-1].tobytes()


def test_existing_database_is_refused_and_overwrite_replaces_it(tmp_path):
    db = str(tmp_path / "db")
    one = np.ones((2, 1, 2, 2), dtype=np.uint8)
    lmdb_io.write_datums(db, datasets.array_records(one, [0, 1]))
    with pytest.raises(UserError, match="already exists"):
        lmdb_io.write_datums(db, datasets.array_records(one, [0, 1]))
    lmdb_io.write_datums(db, datasets.array_records(one[:1], [5]), overwrite=True)
    assert lmdb_io.count(db) == 1


def test_failed_write_leaves_no_database_behind(tmp_path):
    db = str(tmp_path / "db")

    def records():
        yield lmdb_io.datum_key(0), lmdb_io.array_to_datum(np.zeros((1, 2, 2), np.uint8))
        raise UserError("bad record")

    with pytest.raises(UserError, match="bad record"):
        lmdb_io.write_datums(db, records())
    assert os.listdir(tmp_path) == []


def test_reading_a_missing_database_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        lmdb_io.count(str(tmp_path / "nope"))


def test_decode_datum_rejects_wrong_size():
    datum = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"\x00\x01\x02")
    with pytest.raises(ValueError, match="3 values"):
        lmdb_io.decode_datum(datum)


def test_mean_file_matches_numpy_mean(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(1500, 3, 4, 6), dtype=np.uint8)
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, datasets.array_records(data, np.zeros(1500)))
    mean = mean_file.compute_mean(db)
    assert mean.dtype == np.float32 and mean.shape == (3, 4, 6)
    np.testing.assert_allclose(mean, data.mean(axis=0), rtol=1e-5)

    path = str(tmp_path / "mean.binaryproto")
    mean_file.write_mean_file(path, mean)
    blob = caffe_pb2.BlobProto()
    with open(path, "rb") as f:
        blob.ParseFromString(f.read())
    # compute_image_mean's legacy dims, plus the N-D shape
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 6)
    assert list(blob.shape.dim) == [1, 3, 4, 6]
    assert len(blob.data) == 3 * 4 * 6
    np.testing.assert_allclose(np.array(blob.data).reshape(3, 4, 6), data.mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(mean_file.read_mean_file(path), mean)


def test_mean_of_float_records(tmp_path):
    data = np.random.default_rng(6).normal(size=(50, 2, 3, 3)).astype(np.float32)
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, datasets.array_records(data, np.zeros(50)))
    np.testing.assert_allclose(mean_file.compute_mean(db), data.astype(np.float64).mean(axis=0),
                               rtol=1e-5, atol=1e-7)


def test_mean_of_unequal_records_is_a_user_error(tmp_path):
    db = str(tmp_path / "db")
    records = [(lmdb_io.datum_key(0), lmdb_io.array_to_datum(np.zeros((1, 2, 2), np.uint8))),
               (lmdb_io.datum_key(1), lmdb_io.array_to_datum(np.zeros((1, 3, 2), np.uint8)))]
    lmdb_io.write_datums(db, records)
    with pytest.raises(UserError, match="00000001"):
        mean_file.compute_mean(db)


def test_blobproto_legacy_dims_win_over_shape_like_caffe():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=2)
    blob.shape.dim.extend([4])
    blob.data.extend([1, 2, 3, 4])
    assert mean_file.blobproto_to_array(blob).shape == (1, 2, 1, 2)
    nd = mean_file.array_to_blobproto(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(mean_file.blobproto_to_array(nd), np.arange(6).reshape(2, 3))


def test_encoded_png_with_alpha_decodes_to_three_bgr_channels():
    # Caffe decodes with cv::IMREAD_ANYCOLOR (or IMREAD_COLOR): the alpha channel is dropped
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 10, 200, 128
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    array, label = lmdb_io.decode_datum(lmdb_io.encoded_datum(buf.getvalue(), 4))
    assert array.shape == (3, 2, 3) and label == 4
    assert (array[0] == 200).all() and (array[2] == 10).all()


def test_two_readers_of_one_database_share_it(tmp_path):
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, [(lmdb_io.datum_key(i), lmdb_io.array_to_datum(np.zeros((1, 2, 2), np.uint8), i))
                              for i in range(3)])
    with lmdb_io.shared_env(db):
        assert lmdb_io.count(db) == 3
        assert [d.label for _, d in lmdb_io.iter_datums(db)] == [0, 1, 2]


def test_a_truncated_database_is_refused_naming_it_instead_of_killing_the_process(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(rng.integers(0, 255, (3, 32, 32)), i % 10))
                              for i in range(500)))
    data = os.path.join(db, "data.mdb")
    assert os.path.getsize(data) > 100_000
    with open(data, "r+b") as f:
        f.truncate(8192)  # a copy cut short (the case: data.mdb cut to 8 KB)
    # in a child process: reading past the end of the mapping would kill it with SIGBUS
    code = ("from mpicaffe.data import lmdb_io\n"
            f"for key, datum in lmdb_io.iter_datums({db!r}):\n    pass\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert f"{data}: truncated LMDB database: the file holds 8192 bytes" in child.stderr
    with open(data, "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="not an LMDB data file"):
        lmdb_io.count(db)
