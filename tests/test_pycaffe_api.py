"""`from mpicaffe import caffe`: pycaffe's API over the built-in engine."""
import os

import numpy as np
import pytest

from mpicaffe import caffe
from mpicaffe.data import datasets, lmdb_io
from mpicaffe.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "prototxt/lenet/lenet_deploy.prototxt")


def test_net_signatures_blobs_params_and_forward(tmp_path):
    caffe.set_mode_cpu()
    caffe.set_random_seed(3)
    net = caffe.Net(DEPLOY, caffe.TEST)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net.blobs)[:3] == ["data", "conv1", "pool1"]
    assert list(net.params) == ["conv1", "conv2", "ip1", "ip2"]
    assert net.params["conv1"][0].data.shape == (20, 1, 5, 5) and net.params["conv1"][1].data.shape == (20,)
    assert [layer.type for layer in net.layers][:2] == ["Input", "Convolution"]
    x = np.random.default_rng(0).random((64, 1, 24, 24), dtype=np.float32)
    out = net.forward(data=x)
    assert out["prob"].shape == (64, 10)
    np.testing.assert_allclose(out["prob"].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(net.blobs["data"].data, x)

    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    other = caffe.Net(DEPLOY, path, caffe.TEST)          # legacy argument order
    np.testing.assert_array_equal(other.forward(data=x)["prob"], out["prob"])
    again = caffe.Net(DEPLOY, caffe.TEST, weights=path)
    np.testing.assert_array_equal(again.params["ip2"][0].data, net.params["ip2"][0].data)

    end = net.forward(end="conv1")
    assert list(end) == ["conv1"] and end["conv1"].shape == (64, 20, 20, 20)
    with pytest.raises(UserError, match="do not match net inputs"):
        net.forward(label=x)


def test_backward_with_top_diffs_gives_input_diffs():
    text = """
    force_backward: true
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.5 } } }
    """
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    net = caffe.Net(f.name, caffe.TRAIN)
    net.forward(data=np.ones((2, 3), np.float32))
    diffs = net.backward(ip=np.array([[1, 0], [0, 2]], np.float32))
    np.testing.assert_allclose(diffs["data"], [[0.5, 0.5, 0.5], [1, 1, 1]])
    np.testing.assert_allclose(net.params["ip"][0].diff, [[1, 1, 1], [2, 2, 2]])
    os.unlink(f.name)


def test_solver_classes_step_and_callbacks(tmp_path):
    x, y = datasets.load_digits()
    db = str(tmp_path / "db")
    lmdb_io.write_datums(db, ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i]))) for i in range(64)))
    net = tmp_path / "net.prototxt"
    net.write_text(f"""
    layer {{ name: "d" type: "Data" top: "data" top: "label"
             data_param {{ source: "{db}" batch_size: 16 backend: LMDB }} transform_param {{ scale: 0.0039 }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 10\n'
                           f'snapshot_prefix: "{tmp_path}/s"\ntype: "Adam"\n')
    calls = []
    solver = caffe.SGDSolver(str(solver_path))        # the class decides the type, as in pycaffe
    assert solver.param.type == "SGD"
    assert type(caffe.get_solver(str(solver_path))._solver).__name__ == "AdamSolver"
    solver.add_callback(lambda: calls.append("start"), lambda: calls.append("grads"))
    before = solver.net.params["ip"][0].data.copy()
    solver.step(3)
    assert solver.iter == 3 and calls == ["start", "grads"] * 3
    assert not np.array_equal(before, solver.net.params["ip"][0].data)
    assert float(solver.net.blobs["loss"].data) > 0
    solver.snapshot()
    assert (tmp_path / "s_iter_3.caffemodel").exists() and (tmp_path / "s_iter_3.solverstate").exists()


def test_io_helpers_round_trip():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = caffe.io.array_to_blobproto(arr, diff=-arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), -arr)
    datum = caffe.io.array_to_datum(arr.astype(np.uint8), label=3)
    assert datum.label == 3
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), arr.astype(np.uint8))
    vec = caffe.io.arraylist_to_blobprotovector_str([arr, arr[0]])
    back = caffe.io.blobprotovector_str_to_arraylist(vec)
    assert [a.shape for a in back] == [(2, 3, 4), (3, 4)]
    assert caffe.proto.caffe_pb2.TRAIN == caffe.TRAIN


def test_transformer_preprocess_and_deprocess():
    t = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    img = np.random.default_rng(1).random((4, 4, 3)).astype(np.float32)
    x = t.preprocess("data", img)
    expected = img.transpose(2, 0, 1)[[2, 1, 0]] * 255 - np.array([10, 20, 30])[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", x), img, rtol=1e-5, atol=1e-6)
    assert "Convolution" in caffe.layer_type_list()


def test_free_functions_timer_log_nccl_and_version(capsys, monkeypatch):
    assert caffe.__version__ == "1.0.0" and caffe.has_nccl() is False
    caffe.NCCL(None, "uid")  # Caffe built without NCCL: builds, does nothing
    timer = caffe.Timer()
    assert timer.ms == 0.0
    timer.start()
    first = timer.ms  # reading stops the timer
    assert first >= 0 and timer.ms == first
    monkeypatch.setenv("GLOG_minloglevel", "0")  # glog's threshold, which init_log honours
    caffe.init_log()
    caffe.log("hello from pycaffe")
    assert "hello from pycaffe" in capsys.readouterr().err
    caffe.set_solver_count(2)
    caffe.set_solver_rank(1)
    try:
        assert (caffe.solver_count(), caffe.solver_rank()) == (2, 1)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)


def test_layer_setup_and_reshape_shape_the_tops():
    net = caffe.Net(DEPLOY, caffe.TEST)
    conv = net.layer_dict["conv1"]
    top = [net.blobs["conv1"]]
    net.blobs["data"].reshape(2, 1, 28, 28)
    conv.reshape([net.blobs["data"]], top)
    assert top[0].shape == (2, 20, 24, 24)
    assert net._blob_names[net._inputs[0]] == "data" and net._blob_names[net._outputs[0]] == "prob"
