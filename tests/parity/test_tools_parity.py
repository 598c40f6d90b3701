"""Our LMDBs and mean files as real Caffe reads them: a pycaffe Data layer with our mean file
subtracts it from our records exactly as we compute them (compute_image_mean itself needs OpenCV,
which the CPU build leaves out, so Caffe's Data layer is the reader checked here)."""
import numpy as np

from mpicaffe.data import lmdb_io, mean_file
from tests.real_caffe import import_pycaffe


def test_caffe_data_layer_reads_our_lmdb_and_mean_file(tmp_path):
    caffe = import_pycaffe()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(12, 3, 5, 4), dtype=np.uint8)
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(data[i], i % 3))
                              for i in range(len(data))))
    mean_path = str(tmp_path / "mean.binaryproto")
    mean_file.write_mean_file(mean_path, mean_file.compute_mean(db))
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(f"""
    layer {{ name: "d" type: "Data" top: "data" top: "label"
             transform_param {{ mean_file: "{mean_path}" scale: 0.5 }}
             data_param {{ source: "{db}" batch_size: 12 backend: LMDB }} }}
    """)
    net = caffe.Net(str(net_path), caffe.TEST)
    net.forward()
    expected = (data.astype(np.float32) - data.astype(np.float64).mean(axis=0).astype(np.float32)) * 0.5
    np.testing.assert_allclose(net.blobs["data"].data, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(net.blobs["label"].data, np.arange(12) % 3)
