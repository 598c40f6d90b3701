"""Data layers of the built-in engine: Input, DummyData, MemoryData, Data (LMDB), ImageData,
HDF5Data, HDF5Output. Databases, image lists and HDF5 files are written to tmp dirs with the
data package; expected batches are computed from the arrays written."""
import gc
import os
import threading

import h5py
import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import create_layer
from mpicaffe.backends.engine.net import Net
from mpicaffe.data import images, lmdb_io, sharding
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.engine.layer_harness import make_layer

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

_open_layers = []


@pytest.fixture(autouse=True)
def _close_layers():
    yield
    while _open_layers:
        layer = _open_layers.pop()
        layer.close()


def layer_from(text, phase=TRAIN, source=""):
    param = prototxt.parse_text(text, caffe_pb2.LayerParameter(), "<test>")
    layer = create_layer(param, phase, "cpu", source)
    layer.setup([])
    if hasattr(layer, "close"):
        _open_layers.append(layer)
    return layer


def run(layer):
    with torch.no_grad():
        return [t.numpy() for t in layer.forward([])]


# ------------------------------------------------------------------ LMDB fixtures
def uint8_data(n=10, shape=(3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8), rng.integers(0, 10, size=n)


def write_db(path, data, labels, keys=None, kind="uint8"):
    def datum(i):
        if kind == "encoded":
            return lmdb_io.encoded_datum(images.encode_image(data[i], "png"), int(labels[i]))
        array = data[i] if kind == "uint8" else data[i].astype(np.float32)
        return lmdb_io.array_to_datum(array, int(labels[i]))
    keys = keys or [lmdb_io.datum_key(i) for i in range(len(data))]
    lmdb_io.write_datums(str(path), [(k, datum(i)) for i, k in enumerate(keys)])
    return str(path)


def data_layer(db, batch=4, extra="", tops=("data", "label"), phase=TRAIN, source="", param=""):
    top = " ".join(f'top: "{t}"' for t in tops)
    return layer_from(f'name: "d" type: "Data" {top} data_param {{ source: "{db}" batch_size: {batch} '
                      f"backend: LMDB {param} }} {extra}", phase, source)


def expected_order(start, end, first, count):
    """Record indices Caffe's reader visits from `first`, wrapping to `start` after `end - 1`."""
    out, i = [], first
    for _ in range(count):
        out.append(i)
        i = start if i + 1 >= end else i + 1
    return out


# ------------------------------------------------------------------ Data
def test_data_reads_records_in_order_and_wraps(tmp_path):
    data, labels = uint8_data(10)
    layer = data_layer(write_db(tmp_path / "db", data, labels))
    tops = layer.infer_tops([])
    assert [tuple(t.shape) for t in tops] == [(4, 3, 4, 5), (4,)]
    order = expected_order(0, 10, 0, 12)
    for b in range(3):
        x, y = run(layer)
        idx = order[4 * b:4 * b + 4]
        assert x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x, data[idx].astype(np.float32))
        np.testing.assert_array_equal(y, labels[idx].astype(np.float32))


def test_infer_tops_consumes_nothing(tmp_path):
    data, labels = uint8_data(6)
    layer = data_layer(write_db(tmp_path / "db", data, labels), batch=2, tops=("data",))
    for _ in range(3):
        assert [tuple(t.shape) for t in layer.infer_tops([])] == [(2, 3, 4, 5)]
    (x,) = run(layer)
    np.testing.assert_array_equal(x, data[:2])


def test_float_data_records(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    labels = np.arange(5)
    layer = data_layer(write_db(tmp_path / "db", data, labels, kind="float"), batch=5,
                       extra="transform_param { scale: 0.5 mean_value: 1 mean_value: 2 }")
    x, y = run(layer)
    np.testing.assert_array_equal(x, (data - np.array([1, 2], np.float32)[:, None, None]) * np.float32(0.5))
    np.testing.assert_array_equal(y, labels)


def test_encoded_png_records_with_center_crop(tmp_path):
    data, labels = uint8_data(4, shape=(3, 6, 7))
    layer = data_layer(write_db(tmp_path / "db", data, labels, kind="encoded"), batch=4, phase=TEST,
                       extra="transform_param { crop_size: 4 }")
    assert tuple(layer.infer_tops([])[0].shape) == (4, 3, 4, 4)
    x, y = run(layer)
    np.testing.assert_array_equal(x, data[:, :, 1:5, 1:5])
    np.testing.assert_array_equal(y, labels)


def test_non_numeric_keys_are_read_in_key_order(tmp_path):
    data, labels = uint8_data(5)
    keys = [b"img_%c" % c for c in b"ecadb"]
    layer = data_layer(write_db(tmp_path / "db", data, labels, keys=keys), batch=5)
    x, _ = run(layer)
    order = [keys.index(k) for k in sorted(keys)]
    np.testing.assert_array_equal(x, data[order])


@pytest.mark.parametrize("key_style", ["%08d", "k%08d"])
def test_two_shards_are_disjoint_contiguous_and_cover_the_db(tmp_path, key_style):
    n, batch = 11, 3
    data, labels = uint8_data(n, shape=(1, 2, 2))
    labels = np.arange(n)
    keys = [(key_style % i).encode() for i in range(n)]
    db = write_db(tmp_path / "db", data, labels, keys=keys)
    seen = []
    for rank in range(2):
        layer = data_layer(db, batch=batch)
        layer.set_shard(rank, 2)
        start, end = sharding.shard_bounds(n, rank, 2)
        got = np.concatenate([run(layer)[1] for _ in range(3)]).astype(int)
        assert list(got) == expected_order(start, end, start, 3 * batch)  # wraps within the shard
        np.testing.assert_array_equal(run(layer)[0][0], data[expected_order(start, end, start, 10)[9]])
        assert layer.seek_method == (sharding.FIRST if rank == 0 else
                                     sharding.SEQUENTIAL if key_style == "%08d" else sharding.SCAN)
        seen.append(set(got))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    assert seen[0] == set(range(6))  # the first rank takes the extra record


def test_set_shard_errors(tmp_path):
    data, labels = uint8_data(3)
    db = write_db(tmp_path / "db", data, labels)
    with pytest.raises(UserError, match="layer 'd'.*cannot split 3 records among 4 ranks"):
        data_layer(db).set_shard(0, 4)
    layer = data_layer(db, batch=1)
    run(layer)
    with pytest.raises(UserError, match="set_shard must be called before the first forward"):
        layer.set_shard(0, 2)


def test_rand_skip_starts_at_a_seeded_offset(tmp_path):
    data, labels = uint8_data(20, shape=(1, 1, 1))
    labels = np.arange(20)
    db = write_db(tmp_path / "db", data, labels)
    firsts = []
    for seed in range(6):
        torch.manual_seed(seed)
        layer = data_layer(db, batch=1, param="rand_skip: 10")
        first = int(run(layer)[1][0])
        assert 0 <= first < 10 and int(run(layer)[1][0]) == (first + 1) % 20
        torch.manual_seed(seed)
        again = data_layer(db, batch=1, param="rand_skip: 10")
        assert int(run(again)[1][0]) == first
        firsts.append(first)
    assert len(set(firsts)) > 1


def test_data_errors(tmp_path):
    data, labels = uint8_data(2)
    db = write_db(tmp_path / "db", data, labels)
    with pytest.raises(UserError, match="LEVELDB is not supported"):
        layer_from(f'name: "d" type: "Data" top: "x" data_param {{ source: "{db}" batch_size: 1 }}')
    with pytest.raises(UserError, match="LEVELDB is not supported"):
        layer_from(f'name: "d" type: "Data" top: "x" data_param {{ source: "{db}" batch_size: 1 backend: LEVELDB }}')
    with pytest.raises(UserError, match=r"layer 'd' \(Data\): data_param.source: file not found: .*missing_db"):
        data_layer(tmp_path / "missing_db")
    with pytest.raises(UserError, match="data_param.batch_size must be positive"):
        data_layer(db, batch=0)
    (tmp_path / "not_lmdb").mkdir()
    with pytest.raises(UserError, match="no data.mdb inside"):
        data_layer(tmp_path / "not_lmdb")


def test_bad_record_error_reaches_forward(tmp_path):
    data, _ = uint8_data(3)
    records = [(lmdb_io.datum_key(i), lmdb_io.array_to_datum(data[i], 0)) for i in range(3)]
    records[2] = (lmdb_io.datum_key(2), lmdb_io.encoded_datum(b"not an image"))
    lmdb_io.write_datums(str(tmp_path / "db"), records)
    layer = data_layer(tmp_path / "db", batch=3)
    with pytest.raises(UserError, match="record '00000002': cannot decode"):
        run(layer)


def test_source_found_next_to_the_net_file(tmp_path, monkeypatch):
    data, labels = uint8_data(2)
    write_db(tmp_path / "models" / "db", data, labels)
    monkeypatch.chdir(tmp_path)
    net_file = str(tmp_path / "models" / "net.prototxt")
    layer = data_layer("db", batch=2, source=net_file)
    assert layer.db_path == os.path.join(str(tmp_path / "models"), "db")
    np.testing.assert_array_equal(run(layer)[0], data)


def test_close_stops_the_prefetch_thread(tmp_path):
    data, labels = uint8_data(10)
    layer = data_layer(write_db(tmp_path / "db", data, labels), batch=2, param="prefetch: 2")
    run(layer)
    thread = layer._prefetcher.thread
    assert thread.daemon and thread.is_alive()
    layer.close()
    assert not thread.is_alive() and thread not in threading.enumerate()
    with pytest.raises(UserError, match="closed"):
        run(layer)
    layer.close()  # twice is fine


def test_a_dropped_layer_stops_its_thread(tmp_path):
    data, labels = uint8_data(10)
    param = prototxt.parse_text(f'name: "d" type: "Data" top: "x" data_param {{ source: "{tmp_path}/db" '
                                "batch_size: 2 backend: LMDB } transform_param { mirror: true }",
                                caffe_pb2.LayerParameter())
    write_db(tmp_path / "db", data, labels)
    layer = create_layer(param, TRAIN)
    layer.setup([])
    layer.forward([])
    thread = layer._prefetcher.thread
    del layer
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_data_layer_in_a_net(tmp_path):
    data, labels = uint8_data(4)
    db = write_db(tmp_path / "db", data, labels)
    text = f"""name: "n" layer {{ name: "d" type: "Data" top: "data" top: "label"
      data_param {{ source: "{db}" batch_size: 2 backend: LMDB }} transform_param {{ scale: 0.5 }} }}"""
    net = Net(prototxt.net_for_phase(prototxt.parse_text(text, caffe_pb2.NetParameter()), TRAIN))
    _open_layers.append(net.layers[0])
    assert net.blobs["data"].shape == (2, 3, 4, 5) and net.outputs == ["data", "label"]
    net.forward()
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[2:] * np.float32(0.5))
    np.testing.assert_array_equal(net.blobs["label"].data, labels[2:])


# ------------------------------------------------------------------ ImageData
def write_images(tmp_path, n=5, shape=(3, 6, 5), gray_every=0):
    rng = np.random.default_rng(4)
    (tmp_path / "img").mkdir()
    arrays, lines = [], []
    for i in range(n):
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with open(tmp_path / "img" / f"im {i}.png", "wb") as f:
            f.write(images.encode_image(a, "png"))
        arrays.append(a)
        lines.append(f"img/im {i}.png {10 + i}")  # a space in the path: the label follows the last one
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return np.stack(arrays)


def image_layer(tmp_path, batch=2, extra="", param_extra="", phase=TRAIN):
    return layer_from(f"""name: "im" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: {batch}
        {param_extra} }} {extra}""", phase)


def test_image_data_reads_the_list_in_order_and_wraps(tmp_path):
    arrays = write_images(tmp_path)
    layer = image_layer(tmp_path, batch=3)
    assert [tuple(t.shape) for t in layer.infer_tops([])] == [(3, 3, 6, 5), (3,)]
    order = expected_order(0, 5, 0, 9)
    for b in range(3):
        x, y = run(layer)
        idx = order[3 * b:3 * b + 3]
        np.testing.assert_array_equal(x, arrays[idx])
        np.testing.assert_array_equal(y, np.array(idx) + 10)


def test_image_data_resize_gray_and_transform(tmp_path):
    write_images(tmp_path, n=2)
    layer = image_layer(tmp_path, batch=2, param_extra="new_height: 4 new_width: 3 is_color: false",
                        extra="transform_param { scale: 2 }")
    x, _ = run(layer)
    expected = np.stack([images.load_image(str(tmp_path / "img" / f"im {i}.png"), False, (4, 3))
                         for i in range(2)])
    assert x.shape == (2, 1, 4, 3)
    np.testing.assert_array_equal(x, expected * np.float32(2))


def test_image_data_shuffles_every_epoch(tmp_path):
    write_images(tmp_path, n=8, shape=(1, 2, 2))
    torch.manual_seed(0)
    layer = image_layer(tmp_path, batch=8, param_extra="shuffle: true")
    epochs = [list(run(layer)[1].astype(int)) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(10, 18))
    assert epochs[0] != list(range(10, 18)) and epochs[0] != epochs[1]
    torch.manual_seed(0)
    again = image_layer(tmp_path, batch=8, param_extra="shuffle: true")
    assert list(run(again)[1].astype(int)) == epochs[0]


def test_image_data_shard(tmp_path):
    write_images(tmp_path, n=5, shape=(1, 2, 2))
    layer = image_layer(tmp_path, batch=3)
    layer.set_shard(1, 2)  # lines 3..4
    assert list(run(layer)[1].astype(int)) == [13, 14, 13]


def test_image_data_errors(tmp_path):
    write_images(tmp_path, n=3)
    (tmp_path / "bad.txt").write_text("img/im 0.png 1\nimg/im 1.png\n")
    with pytest.raises(UserError, match=r"bad.txt:2: expected '<image path> <integer label>'"):
        layer_from(f'name: "im" type: "ImageData" top: "d" top: "l" image_data_param {{ source: '
                   f'"{tmp_path}/bad.txt" root_folder: "{tmp_path}/" }}')
    with pytest.raises(UserError, match="image_data_param.source: file not found"):
        layer_from('name: "im" type: "ImageData" top: "d" top: "l" image_data_param { source: "/no/list" }')
    with pytest.raises(UserError, match="new_height and new_width must be set at the same time"):
        image_layer(tmp_path, param_extra="new_height: 3")
    (tmp_path / "list.txt").write_text("img/im 0.png 1\nimg/missing.png 2\n")
    layer = image_layer(tmp_path, batch=2)
    with pytest.raises(UserError, match=r"list.txt:2: could not load image .*missing.png"):
        run(layer)


# ------------------------------------------------------------------ HDF5Data / HDF5Output
def write_h5(path, data, label):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=label)


def test_hdf5_data_rows_wrap_across_files(tmp_path):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(5, 2, 3)), rng.normal(size=(3, 2, 3))
    write_h5(tmp_path / "a.h5", a, np.arange(5))
    write_h5(tmp_path / "b.h5", b.astype(np.float32), np.arange(5, 8, dtype=np.int32))
    (tmp_path / "files.txt").write_text("a.h5\nb.h5\n")  # relative to the list's folder
    layer = layer_from(f'name: "h" type: "HDF5Data" top: "data" top: "label" '
                       f'hdf5_data_param {{ source: "{tmp_path}/files.txt" batch_size: 3 }}')
    assert [tuple(t.shape) for t in layer.infer_tops([])] == [(3, 2, 3), (3,)]
    rows = np.concatenate([a, b]).astype(np.float32)
    order = expected_order(0, 8, 0, 12)
    for k in range(4):
        x, y = run(layer)
        idx = order[3 * k:3 * k + 3]
        np.testing.assert_array_equal(x, rows[idx])
        np.testing.assert_array_equal(y, idx)


def test_hdf5_data_shuffle_covers_every_row_each_epoch(tmp_path):
    write_h5(tmp_path / "a.h5", np.zeros((4, 1)), np.arange(4))
    write_h5(tmp_path / "b.h5", np.zeros((6, 1)), np.arange(4, 10))
    (tmp_path / "files.txt").write_text(f"{tmp_path}/a.h5 {tmp_path}/b.h5")
    torch.manual_seed(1)
    layer = layer_from(f'name: "h" type: "HDF5Data" top: "data" top: "label" '
                       f'hdf5_data_param {{ source: "{tmp_path}/files.txt" batch_size: 10 shuffle: true }}')
    epochs = [list(run(layer)[1].astype(int)) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(10))
        # a file's rows stay together (files are shuffled, then rows within each file)
        assert sorted(e[:4]) == list(range(4)) or sorted(e[:6]) == list(range(4, 10))
    assert any(e != list(range(10)) for e in epochs)


def test_hdf5_data_errors(tmp_path):
    write_h5(tmp_path / "a.h5", np.zeros((2, 1)), np.zeros(3))
    (tmp_path / "files.txt").write_text("a.h5\n")
    base = f'name: "h" type: "HDF5Data" hdf5_data_param {{ source: "{tmp_path}/files.txt" batch_size: 1 }}'
    with pytest.raises(UserError, match="dataset 'label' has 3 rows but 'data' has 2"):
        layer_from(base + ' top: "data" top: "label"')
    with pytest.raises(UserError, match="no dataset 'other'"):
        layer_from(base + ' top: "other"')
    with pytest.raises(UserError, match="HDF5Data does not transform data"):
        layer_from(base + ' top: "data" transform_param { scale: 2 }')
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="at least 1 HDF5 filename listed in"):
        layer_from(f'name: "h" type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{tmp_path}/empty.txt" }}')


def test_hdf5_output_writes_4d_datasets_and_appends(tmp_path):
    out = tmp_path / "out.h5"
    text = f'name: "o" type: "HDF5Output" bottom: "data" bottom: "label" hdf5_output_param {{ file_name: "{out}" }}'
    rng = np.random.default_rng(6)
    batches = [(rng.normal(size=(3, 4)).astype(np.float32), np.arange(3, dtype=np.float32) + 3 * k)
               for k in range(2)]
    layer, _ = make_layer(text, list(batches[0]))
    assert layer.infer_tops([torch.zeros(3, 4), torch.zeros(3)]) == []
    for data, label in batches:
        assert layer.forward([torch.from_numpy(data), torch.from_numpy(label)]) == []
    layer.close()
    with h5py.File(out, "r") as f:
        assert f["data"].shape == (6, 4, 1, 1) and f["label"].shape == (6, 1, 1, 1)
        assert f["data"].dtype == np.float32
        np.testing.assert_array_equal(f["data"][()].reshape(6, 4), np.concatenate([b[0] for b in batches]))
        np.testing.assert_array_equal(f["label"][()].reshape(6), np.arange(6))
    layer, _ = make_layer(text, [np.zeros((2, 1)), np.zeros(3)])
    with pytest.raises(UserError, match="same batch size"):
        layer.forward([torch.zeros(2, 1), torch.zeros(3)])
    layer.close()


# ------------------------------------------------------------------ DummyData
def test_dummy_data_constant_fills_once_others_every_forward():
    torch.manual_seed(0)
    layer = layer_from("""name: "dd" type: "DummyData" top: "a" top: "b"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 }
          data_filler { type: "constant" value: 1.5 } data_filler { type: "gaussian" std: 1 } }""")
    a0, b0 = layer.infer_tops([])
    assert (a0 == 1.5).all() and tuple(a0.shape) == (2, 3) and (b0 == 0).all() and tuple(b0.shape) == (4,)
    a1, b1 = layer.forward([])
    a1[0, 0] = 7.0  # a constant top is not refilled: what the user writes stays, as in Caffe
    a2, b2 = layer.forward([])
    assert a2 is a1 and a2[0, 0] == 7.0 and (a2.flatten()[1:] == 1.5).all()
    assert not torch.equal(b1, b2) and b1.std() > 0


def test_dummy_data_one_filler_for_all_tops_and_legacy_dims():
    layer = layer_from("""name: "dd" type: "DummyData" top: "a" top: "b"
        dummy_data_param { num: 2 channels: 3 channels: 1 height: 4 width: 5 data_filler { type: "uniform" } }""")
    a, b = layer.infer_tops([])
    assert tuple(a.shape) == (2, 3, 4, 5) and tuple(b.shape) == (2, 1, 4, 5)
    a1, _ = layer.forward([])
    a2, _ = layer.forward([])
    assert not torch.equal(a1, a2) and (a1 >= 0).all() and (a1 <= 1).all()
    default = layer_from('name: "dd" type: "DummyData" top: "z" dummy_data_param { shape { dim: 3 } }')
    z1, z2 = default.forward([])[0], default.forward([])[0]
    assert z1 is z2 and not z1.any()  # no filler: constant 0


def test_dummy_data_errors():
    with pytest.raises(UserError, match="Both shape and legacy fields"):
        layer_from('name: "dd" type: "DummyData" top: "a" dummy_data_param { num: 1 channels: 1 height: 1 '
                   'width: 1 shape { dim: 1 } }')
    with pytest.raises(UserError, match="Number of data fillers must be 0, 1 or equal to the number of tops: 3"):
        layer_from('name: "dd" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { shape { dim: 1 } '
                   "data_filler {} data_filler {} }")
    with pytest.raises(UserError, match="Must specify 'shape' once, or once per top blob"):
        layer_from('name: "dd" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { '
                   "shape { dim: 1 } shape { dim: 2 } }")
    with pytest.raises(UserError, match="Must specify 'height' once"):
        layer_from('name: "dd" type: "DummyData" top: "a" dummy_data_param { num: 1 channels: 1 width: 1 }')


# ------------------------------------------------------------------ MemoryData
def memory_layer(batch=2):
    return layer_from(f'name: "m" type: "MemoryData" top: "data" top: "label" '
                      f"memory_data_param {{ batch_size: {batch} channels: 2 height: 3 width: 1 }}")


def test_memory_data_batches_wrap_and_share_the_arrays():
    layer = memory_layer()
    assert [tuple(t.shape) for t in layer.infer_tops([])] == [(2, 2, 3, 1), (2,)]
    data = np.arange(6 * 6, dtype=np.float32).reshape(6, 2, 3, 1)
    labels = np.arange(6, dtype=np.float32)
    layer.set_input_arrays(data, labels)
    for k in (0, 1, 2, 0):
        x, y = run(layer)
        np.testing.assert_array_equal(x, data[2 * k:2 * k + 2])
        assert y.shape == (2, 1, 1, 1)  # Caffe's forward reshapes the label top to 4-D
        np.testing.assert_array_equal(y.reshape(2), labels[2 * k:2 * k + 2])
    data[2:4] = -1  # the arrays are used in place, as Caffe points its top at them
    np.testing.assert_array_equal(run(layer)[0], -np.ones((2, 2, 3, 1)))
    layer.set_input_arrays(data, labels.reshape(6, 1, 1, 1))
    np.testing.assert_array_equal(run(layer)[1].reshape(2), [0, 1])


def test_memory_data_errors():
    layer = memory_layer()
    with pytest.raises(UserError, match="set_input_arrays"):
        run(layer)
    good = np.zeros((4, 2, 3, 1), np.float32)
    with pytest.raises(UserError, match="multiple of batch size 2"):
        layer.set_input_arrays(np.zeros((3, 2, 3, 1), np.float32), np.zeros(3, np.float32))
    with pytest.raises(UserError, match="data array must be float32"):
        layer.set_input_arrays(good.astype(np.float64), np.zeros(4, np.float32))
    with pytest.raises(UserError, match="data array has wrong number of channels"):
        layer.set_input_arrays(np.zeros((4, 1, 3, 1), np.float32), np.zeros(4, np.float32))
    with pytest.raises(UserError, match="same first dimension"):
        layer.set_input_arrays(good, np.zeros(2, np.float32))
    with pytest.raises(UserError, match="must be specified and positive in memory_data_param"):
        layer_from('name: "m" type: "MemoryData" top: "a" top: "b" memory_data_param { batch_size: 2 }')


# ------------------------------------------------------------------ Input
def test_input_shapes_one_for_all_or_per_top():
    text = """name: "n"
      layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
      layer { name: "in2" type: "Input" top: "c" top: "d"
              input_param { shape { dim: 1 } shape { dim: 4 dim: 1 dim: 2 } } }
      layer { name: "in3" type: "Input" top: "e" }"""
    net = Net(prototxt.net_for_phase(prototxt.parse_text(text, caffe_pb2.NetParameter()), TEST))
    shapes = {n: net.blobs[n].shape for n in "abcde"}
    assert shapes == {"a": (2, 3), "b": (2, 3), "c": (1,), "d": (4, 1, 2), "e": (0,)}
    assert net.inputs == ["a", "b", "c", "d", "e"]
    net.blobs["a"].data[...] = 5
    net.forward()
    assert (net.blobs["a"].data == 5).all()  # the net never overwrites inputs


def test_input_shape_count_error():
    with pytest.raises(UserError, match="2 tops vs. 3 shapes"):
        layer_from('name: "in" type: "Input" top: "a" top: "b" '
                   "input_param { shape { dim: 1 } shape { dim: 1 } shape { dim: 1 } }")
