"""--data-workers: Data and ImageData decode and transform on worker threads, and give the same
batches bit for bit for any number of workers: same records, order, crops, mirrors and means
as the in-line path (and as DataTransformer.transform on the whole batch), same shards, resume
and errors; the threads end with the layer."""
import re
import threading

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import create_layer
from mpicaffe.backends.engine.layers.base_data import default_data_workers, use_data_workers
from mpicaffe.backends.engine.net import Net
from mpicaffe.cli import build_parser
from mpicaffe.config import TrainConfig
from mpicaffe.data import images, lmdb_io, mean_file, sharding
from mpicaffe.data.transform import DataTransformer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
WORKERS = (0, 1, 3)
N, BATCH, SHAPE, CROP = 23, 5, (3, 20, 22), 16
SEED = 11


def pictures(n=N, shape=SHAPE):
    """Smooth images with noise (JPEG keeps them recognisable), labels 0..n-1."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:shape[1], 0:shape[2]]
    base = np.stack([(x * 7 + y * 3) % 256] * shape[0]).astype(np.int16)
    noise = rng.integers(-30, 30, size=(n,) + shape)
    return np.clip(base[None] + noise + 9 * np.arange(n)[:, None, None, None], 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    """An encoded (JPEG) and a raw LMDB of the same pictures, and a mean file of their size."""
    root = tmp_path_factory.mktemp("workers")
    data = pictures()
    out = {}
    for kind in ("encoded", "raw"):
        def datum(i, kind=kind):
            if kind == "encoded":
                return lmdb_io.encoded_datum(images.encode_image(data[i], "jpg"), i)
            return lmdb_io.array_to_datum(data[i], i)
        out[kind] = str(root / kind)
        lmdb_io.write_datums(out[kind], [(lmdb_io.datum_key(i), datum(i)) for i in range(N)])
    out["mean"] = str(root / "mean.binaryproto")
    mean_file.write_mean_file(out["mean"], data.mean(axis=0).astype(np.float32))
    return out


TRANSFORMS = {
    "mean_value": f"crop_size: {CROP} mirror: true mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5",
    "mean_file": f"crop_size: {CROP} mirror: true mean_file: '{{mean}}'",
}


def data_layer(db, workers, transform="", batch=BATCH, phase=TRAIN, name="d"):
    text = (f'name: "{name}" type: "Data" top: "data" top: "label" data_param {{ source: "{db}" '
            f"batch_size: {batch} backend: LMDB }} transform_param {{ {transform} }}")
    layer = create_layer(prototxt.parse_text(text, caffe_pb2.LayerParameter(), "<test>"), phase, "cpu", "")
    layer.setup([])
    layer.set_data_workers(workers)
    return layer


def read(layer, batches):
    """`batches` batches (data, labels) from a layer's first forward on, torch seeded alike for
    every layer; closes the layer."""
    torch.manual_seed(SEED)
    try:
        with torch.no_grad():
            return [tuple(t.numpy().copy() for t in layer.forward([])) for _ in range(batches)]
    finally:
        layer.close()


def assert_same(a, b):
    assert len(a) == len(b)
    for (x, y), (x2, y2) in zip(a, b):
        assert x.dtype == x2.dtype == np.float32
        np.testing.assert_array_equal(x, x2)  # bit for bit: equal floats, same shapes
        np.testing.assert_array_equal(y, y2)


def expected_labels(start, end, first, count):
    out, i = [], first
    for _ in range(count):
        out.append(i)
        i = start if i + 1 >= end else i + 1
    return out


@pytest.mark.parametrize("kind", ["encoded", "raw"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_any_number_of_workers_gives_the_same_batches_bit_for_bit(dbs, kind, transform):
    param = TRANSFORMS[transform].format(mean=dbs["mean"])
    batches = 7  # 35 records of 23: wraps to the first record
    got = {w: read(data_layer(dbs[kind], w, param), batches) for w in WORKERS}
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])
    labels = np.concatenate([y for _, y in got[0]]).astype(int)
    assert list(labels) == expected_labels(0, N, 0, batches * BATCH)
    # and as Caffe's DataTransformer gives them on the whole batch: the draws of one stream, in order
    torch.manual_seed(SEED)
    transformer = DataTransformer(prototxt.parse_text(param, caffe_pb2.TransformationParameter()), TRAIN)
    decoded = {int(k): transformer.decode(d) for k, d in lmdb_io.iter_datums(dbs[kind])}
    for b, (x, _) in enumerate(got[0]):
        stacked = np.stack([decoded[i] for i in labels[b * BATCH:(b + 1) * BATCH]])
        np.testing.assert_array_equal(x, transformer.transform(stacked))
    assert got[0][0][0].shape == (BATCH, 3, CROP, CROP)


def test_test_phase_center_crop_and_mirror_draws_match(dbs):
    param = TRANSFORMS["mean_value"]
    got = {w: read(data_layer(dbs["encoded"], w, param, phase=TEST), 5) for w in WORKERS}
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])


@pytest.mark.parametrize("kind", ["encoded", "raw"])
def test_resume_with_skip_records_is_the_same_for_any_workers(dbs, kind):
    skip = 19
    got = {}
    for w in WORKERS:
        layer = data_layer(dbs[kind], w, TRANSFORMS["mean_value"])
        layer.skip_records(skip)
        got[w] = read(layer, 4)
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])
    labels = np.concatenate([y for _, y in got[0]]).astype(int)
    assert list(labels) == expected_labels(0, N, skip, 4 * BATCH)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_its_shard_with_workers(dbs, rank):
    start, end = sharding.shard_bounds(N, rank, 2)
    got = {}
    for w in WORKERS:
        layer = data_layer(dbs["encoded"], w, TRANSFORMS["mean_value"], batch=4)
        layer.set_shard(rank, 2)
        layer.skip_records(3)
        got[w] = read(layer, 5)
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])
    labels = np.concatenate([y for _, y in got[0]]).astype(int)
    assert list(labels) == expected_labels(start, end, start + 3, 20)  # wraps within the shard


def test_images_of_different_sizes_draw_per_image_alike_for_any_workers(tmp_path):
    """Records of two sizes cropped to one shape: Caffe's draws per image, in record order."""
    small = pictures(8, shape=(3, 17, 25))
    large = pictures(8)
    records = [(lmdb_io.datum_key(i), lmdb_io.encoded_datum(images.encode_image((small, large)[i % 2][i], "png"), i))
               for i in range(8)]
    lmdb_io.write_datums(str(tmp_path / "db"), records)
    got = {w: read(data_layer(str(tmp_path / "db"), w, TRANSFORMS["mean_value"], batch=3), 4) for w in WORKERS}
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])
    torch.manual_seed(SEED)
    transformer = DataTransformer(prototxt.parse_text(TRANSFORMS["mean_value"], caffe_pb2.TransformationParameter()),
                                  TRAIN)
    order = expected_labels(0, 8, 0, 12)
    expected = [transformer.transform((small, large)[i % 2][i][None])[0] for i in order]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got[0]]), np.stack(expected))


def write_with_bad_record(path, bad_index, bad_value):
    data = pictures(8)
    records = [(lmdb_io.datum_key(i), lmdb_io.encoded_datum(images.encode_image(data[i], "jpg"), i)) for i in range(8)]
    records[bad_index] = (lmdb_io.datum_key(bad_index), bad_value)
    lmdb_io.write_datums(str(path), records)
    return str(path)


@pytest.mark.parametrize("bad, message", [
    (lmdb_io.encoded_datum(b"not an image"), "record '00000006': cannot decode"),
    (b"\xff\xff not a datum", "record '00000006': not a Datum"),
])
def test_a_corrupt_record_raises_the_located_error_in_its_batch(tmp_path, bad, message):
    db = write_with_bad_record(tmp_path / "db", 6, bad)
    for w in WORKERS:
        layer = data_layer(db, w, TRANSFORMS["mean_value"], batch=4)
        with torch.no_grad():
            layer.forward([])  # records 0-3 are fine: the next batch's error waits for its forward
            for _ in range(2):  # and stays
                with pytest.raises(UserError, match=re.escape(db) + f": {message}"):
                    layer.forward([])
        layer.close()
        assert not worker_threads("d")


def worker_threads(name):
    return [t for t in threading.enumerate() if t.name.startswith(f"mpicaffe-Data-{name}-worker")]


def test_closing_the_net_stops_the_worker_threads(dbs):
    text = f"""name: "n" layer {{ name: "w" type: "Data" top: "data" top: "label"
      data_param {{ source: "{dbs['encoded']}" batch_size: 4 backend: LMDB }}
      transform_param {{ crop_size: {CROP} mirror: true }} }}"""
    net = Net(prototxt.net_for_phase(prototxt.parse_text(text, caffe_pb2.NetParameter()), TRAIN))
    assert use_data_workers([net], 3, local_ranks=1) == 3
    net.forward()
    net.forward()
    assert 1 <= len(worker_threads("w")) <= 3
    prefetch = net.layers[0]._prefetcher.thread
    net.close()
    assert not worker_threads("w") and not prefetch.is_alive()


def test_no_worker_threads_with_zero_workers(dbs):
    layer = data_layer(dbs["encoded"], 0, name="z")
    with torch.no_grad():
        layer.forward([])
    assert not worker_threads("z")
    layer.close()


def test_set_data_workers_is_refused_after_the_first_forward_or_below_zero(dbs):
    layer = data_layer(dbs["raw"], 2)
    with pytest.raises(UserError, match="data workers must be 0 or more"):
        layer.set_data_workers(-1)
    with torch.no_grad():
        layer.forward([])
    with pytest.raises(UserError, match="set_data_workers must be called before the first forward"):
        layer.set_data_workers(1)
    layer.close()


def test_image_data_gives_the_same_batches_for_any_workers(tmp_path):
    data = pictures(9)
    lines = []
    for i in range(9):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(images.encode_image(data[i], "jpg"))
        lines.append(f"{path} {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    got = {}
    for w in WORKERS:
        text = (f'name: "i" type: "ImageData" top: "data" top: "label" image_data_param {{ source: '
                f'"{tmp_path}/list.txt" batch_size: 4 shuffle: true }} transform_param {{ crop_size: {CROP} '
                "mirror: true mean_value: 100 }")
        torch.manual_seed(SEED)
        layer = create_layer(prototxt.parse_text(text, caffe_pb2.LayerParameter()), TRAIN, "cpu", "")
        layer.setup([])
        layer.set_data_workers(w)
        got[w] = read(layer, 6)  # 24 images of 9: reshuffled twice
    for w in WORKERS[1:]:
        assert_same(got[w], got[0])


def test_default_is_the_rank_share_of_the_node_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [default_data_workers(r) for r in (1, 2, 4, 16, 32)] == [16, 8, 4, 1, 1]


def test_the_flag_reaches_the_config_and_the_caffe_backend_refuses_it():
    parse = build_parser().parse_args
    assert parse(["train", "--solver", "s.prototxt"]).data_workers is None
    assert parse(["train", "--solver", "s.prototxt", "--data-workers", "0"]).data_workers == 0
    with pytest.raises(SystemExit):
        parse(["train", "--solver", "s.prototxt", "--data-workers", "-1"])
    TrainConfig(solver="s", data_workers=2).check("engine", 1)
    with pytest.raises(UserError, match="--data-workers 2 needs --backend engine"):
        TrainConfig(solver="s", data_workers=2).check("caffe", 1)
