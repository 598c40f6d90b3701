"""caffe.NetSpec, caffe.layers/params, to_proto and coord_map.crop: nets written in Python, and a
NetSpec LeNet trained on the engine. Parity of the text with real pycaffe is in
tests/parity/test_pycaffe_netspec_parity.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from mpicaffe import caffe
from mpicaffe.caffe import coord_map
from mpicaffe.caffe import layers as L
from mpicaffe.caffe import params as P
from mpicaffe.proto import caffe_pb2
from tests.parity.test_pycaffe_netspec_parity import lenet as parity_lenet


def lenet(lmdb: str, batch_size: int) -> caffe_pb2.NetParameter:
    """LeNet as Caffe's "learning LeNet" tutorial writes it with NetSpec (the parity test's)."""
    return parity_lenet(caffe, lmdb, batch_size)


def test_the_package_exports_pycaffe_net_spec_names():
    assert caffe.layers is caffe.net_spec.layers and caffe.params is caffe.net_spec.params
    assert caffe.NetSpec is caffe.net_spec.NetSpec and caffe.to_proto is caffe.net_spec.to_proto
    assert callable(caffe.coord_map.crop) and callable(caffe.draw.get_pydot_graph)
    assert {"NetSpec", "layers", "params", "to_proto", "net_spec", "coord_map", "draw"} <= set(caffe.__all__)


def test_lenet_netspec_gives_an_mpicaffe_net_parameter_with_the_tutorials_layers():
    net = lenet("train_lmdb", 64)
    assert type(net) is caffe_pb2.NetParameter
    assert [(lay.name, lay.type, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("data", "Data", [], ["data", "label"]),
        ("conv1", "Convolution", ["data"], ["conv1"]),
        ("pool1", "Pooling", ["conv1"], ["pool1"]),
        ("conv2", "Convolution", ["pool1"], ["conv2"]),
        ("pool2", "Pooling", ["conv2"], ["pool2"]),
        ("fc1", "InnerProduct", ["pool2"], ["fc1"]),
        ("relu1", "ReLU", ["fc1"], ["fc1"]),
        ("score", "InnerProduct", ["fc1"], ["score"]),
        ("loss", "SoftmaxWithLoss", ["score", "label"], ["loss"]),
    ]
    data = net.layer[0]
    assert (data.data_param.source, data.data_param.batch_size, data.data_param.backend) == (
        "train_lmdb", 64, caffe_pb2.DataParameter.LMDB)
    assert data.transform_param.scale == pytest.approx(1 / 255)
    conv1 = net.layer[1].convolution_param
    assert (list(conv1.kernel_size), conv1.num_output, conv1.weight_filler.type) == ([5], 20, "xavier")
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.MAX


def test_keywords_go_to_the_layer_param_then_to_the_layer():
    n = caffe.NetSpec()
    n.data = L.Input(shape={"dim": [2, 3, 8, 8]})
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=[3], pad=(1,), name="renamed",
                           param=[{"lr_mult": 1, "decay_mult": 1}, {"lr_mult": 2, "decay_mult": 0}],
                           include={"phase": caffe.TRAIN}, loss_weight=0.5)
    n.py = L.Python(n.conv, python_param={"module": "m", "layer": "L"}, param_str="x", loss_weight=1)
    conv, py = n.to_proto().layer[1:]
    assert conv.name == "renamed" and list(conv.top) == ["conv"]
    assert list(conv.convolution_param.kernel_size) == [3] and list(conv.convolution_param.pad) == [1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.include[0].phase == caffe.TRAIN and list(conv.loss_weight) == [0.5]
    assert (py.python_param.module, py.python_param.layer, py.python_param.param_str) == ("m", "L", "x")
    assert list(py.loss_weight) == [1]


def test_unnamed_tops_are_named_for_their_type_and_count():
    data = L.Input(shape={"dim": [1, 1, 4, 4]})
    relu = L.ReLU(L.Convolution(data, num_output=1, kernel_size=1), in_place=True)
    net = caffe.to_proto(L.Convolution(relu, num_output=1, kernel_size=1), L.Sigmoid(relu))
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("Input1", [], ["Input1"]),
        ("Convolution1", ["Input1"], ["Convolution1"]),
        ("ReLU1", ["Convolution1"], ["Convolution1"]),
        ("Convolution2", ["Convolution1"], ["Convolution2"]),
        ("Sigmoid1", ["Convolution1"], ["Sigmoid1"]),
    ]
    assert relu.to_proto().layer[-1].name == "ReLU1"


def test_ntop_gives_a_tuple_of_tops_or_with_zero_the_layer_itself():
    n = caffe.NetSpec()
    tops = L.DummyData(shape=[{"dim": [2, 3]}, {"dim": [2]}], ntop=2)
    assert isinstance(tops, tuple) and len(tops) == 2
    n.x, n.y = tops
    n.silence = L.Silence(n.y, ntop=0)
    assert isinstance(n.silence, caffe.net_spec.Function)
    layers = n.to_proto().layer
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in layers] == [
        ("x", [], ["x", "y"]), ("silence", ["y"], [])]


def test_params_are_the_caffe_pb2_constants():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == caffe_pb2.PoolingParameter.AVE
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM


def test_mistakes_raise_errors_that_name_them():
    with pytest.raises(TypeError, match="Convolution input 0 is not a Top"):
        L.Convolution("data", num_output=1)
    with pytest.raises(AttributeError, match="Convolution layer: no field 'kernal_size'"):
        L.Convolution(L.Input(), kernal_size=3).to_proto()
    n = caffe.NetSpec()
    with pytest.raises(KeyError):            # pycaffe raises KeyError
        n["nothing"]
    assert not hasattr(n, "nothing")          # and hasattr, copy still work
    n.data = L.Input()
    assert copy.copy(n).data is n.data


def test_coord_map_crop_aligns_an_fcn_upsampled_score_with_its_input(tmp_path):
    # data --conv k3 pad 100--> +99 --pool k2 s2--> x/2 + 49.25 --deconv k4 s2--> x + 100: offset 100
    n = caffe.NetSpec()
    n.data = L.Input(shape={"dim": [1, 3, 32, 32]})
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=100)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.up = L.Deconvolution(n.pool, convolution_param={"num_output": 4, "kernel_size": 4, "stride": 2, "bias_term": False})
    axis, scale, shift = coord_map.coord_map_from_to(n.up, n.data)
    assert axis == 1 and np.all(scale == 1) and np.all(shift == -100)
    n.score = coord_map.crop(n.up, n.data)
    crop = n.to_proto().layer[-1]
    assert (crop.type, list(crop.bottom), crop.crop_param.axis, list(crop.crop_param.offset)) == (
        "Crop", ["up", "data"], 2, [100])
    (tmp_path / "fcn.prototxt").write_text(str(n.to_proto()))
    net = caffe.Net(str(tmp_path / "fcn.prototxt"), caffe.TEST)
    assert net.blobs["score"].data.shape == (1, 4, 32, 32)


def test_coord_map_refuses_tops_joined_by_no_spatial_layer():
    data = L.Input(shape={"dim": [1, 3, 8, 8]})
    fc = L.InnerProduct(data, num_output=3)
    with pytest.raises(RuntimeError, match="Could not compute map"):
        coord_map.coord_map_from_to(fc, L.Input(shape={"dim": [1, 3]}))
    assert coord_map.compose((None, 1, 0), (2, 0.5, 3)) == (2, 0.5, 3)
    assert coord_map.inverse((2, 0.5, 3)) == (2, 2.0, -6.0)
    with pytest.raises(coord_map.AxisMismatchException):
        coord_map.compose((1, 1, 0), (2, 1, 0))


@pytest.fixture(scope="module")
def mnist_lmdb(tmp_path_factory):
    from mpicaffe.data.convert import builtin_paths, convert_builtin

    out = str(tmp_path_factory.mktemp("mnist"))
    convert_builtin("mnist", out)
    return builtin_paths("mnist", out)["train"]


def test_a_netspec_lenet_trains_on_the_engine(tmp_path, mnist_lmdb):
    (tmp_path / "train.prototxt").write_text(str(lenet(mnist_lmdb, 16)))
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "train.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nlr_policy: "fixed"\n'
        'max_iter: 10\nrandom_seed: 1\nsnapshot_prefix: "lenet"\n')
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    assert solver.net.blobs["data"].data.shape == (16, 1, 28, 28)
    before = solver.net.params["conv1"][0].data.copy()
    solver.step(3)
    assert solver.iter == 3
    assert np.isfinite(solver.net.blobs["loss"].data).all()
    assert not np.allclose(before, solver.net.params["conv1"][0].data)
