"""NetSpec, coord_map.crop and draw against real pycaffe: the same script, run with `import caffe`
and with `from mpicaffe import caffe`, writes the same prototxt text and draws the same graph."""
from __future__ import annotations

import collections
import importlib
import os
import pathlib

import pytest
from google.protobuf import text_format

from mpicaffe import caffe as mpicaffe_caffe
from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2
from tests.parity.common import pycaffe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENET = os.path.join(ROOT, "prototxt/lenet/lenet_train_val.prototxt")


def lenet(caffe, lmdb="examples/mnist/mnist_train_lmdb", batch_size=64):
    """Caffe's "learning LeNet" tutorial net."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param={"scale": 1. / 255}, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler={"type": "xavier"})
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler={"type": "xavier"})
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler={"type": "xavier"})
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler={"type": "xavier"})
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def caffenet_style(caffe):
    """Helpers returning several tops, lr_mult/decay_mult lists, in-place ReLU and Dropout,
    phase rules, a Python layer with python_param, loss_weight, a name override."""
    L, P = caffe.layers, caffe.params
    learned = [{"lr_mult": 1, "decay_mult": 1}, {"lr_mult": 2, "decay_mult": 0}]

    def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad, group=group,
                             param=learned, weight_filler={"type": "gaussian", "std": 0.01},
                             bias_filler={"type": "constant", "value": 0.1})
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout):
        fc = L.InnerProduct(bottom, num_output=nout, param=learned)
        return fc, L.ReLU(fc, in_place=True)

    n = caffe.NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=32, ntop=2,
                             transform_param={"crop_size": 27, "mean_value": [104, 117, 123], "mirror": True},
                             include={"phase": caffe.TRAIN})
    n.conv1, n.relu1 = conv_relu(n.data, 11, 96, stride=4)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
    n.conv2, n.relu2 = conv_relu(n.norm1, 5, 256, pad=2, group=2)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.AVE, global_pooling=True)
    n.fc6, n.relu6 = fc_relu(n.pool2, 64)
    n.drop6 = L.Dropout(n.relu6, in_place=True, dropout_ratio=0.5)
    n.fc8 = L.InnerProduct(n.drop6, num_output=10, param=learned, name="fc8_renamed")
    n.scaled = L.Python(n.fc8, module="my_layers", layer="ChannelScale", param_str="0.5",
                        param=[{"lr_mult": 1}])
    n.aux = L.Python(n.scaled, n.label, python_param={"module": "my_layers", "layer": "EuclideanLoss"},
                     loss_weight=0.3)
    n.accuracy = L.Accuracy(n.fc8, n.label, include={"phase": caffe.TEST}, top_k=5)
    n.loss = L.SoftmaxWithLoss(n.fc8, n.label, loss_param={"ignore_label": 255, "normalize": False})
    n.silence = L.Silence(n.accuracy, ntop=0)
    return n.to_proto()


def anonymous(caffe):
    """caffe.to_proto on tops nobody named: names come from the layer types."""
    L = caffe.layers
    data = L.Input(shape={"dim": [1, 3, 8, 8]})
    conv = L.Convolution(data, num_output=3, kernel_size=3, weight_filler={"type": "msra"})
    relu = L.ReLU(conv, in_place=True)
    split = L.Slice(relu, ntop=3, slice_param={"axis": 1, "slice_point": [1, 2]})
    return caffe.to_proto(L.Eltwise(split[0], split[2], operation=caffe.params.Eltwise.PROD),
                          L.Pooling(relu, kernel_size=2), L.TanH(L.Sigmoid(split[1])))


def _coord_map(caffe):
    return importlib.import_module(caffe.__name__ + ".coord_map")


def fcn(caffe):
    """An FCN-style net: convolutions and pools down, a Deconvolution up, coord_map.crop back to
    the input's size, as Caffe's FCN nets are written."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape={"dim": [1, 3, 64, 64]})
    n.conv1 = L.Convolution(n.data, kernel_size=3, pad=100, num_output=8)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=3, pad=1, num_output=8, dilation=2)
    n.pool2 = L.Pooling(n.conv2, kernel_size=3, stride=2, pad=1, pool=P.Pooling.MAX)
    n.fc = L.Convolution(n.pool2, kernel_size=7, num_output=16)
    n.drop = L.Dropout(n.fc, dropout_ratio=0.5, in_place=True)
    n.score = L.Convolution(n.drop, kernel_size=1, num_output=5)
    n.up = L.Deconvolution(n.score, convolution_param={"num_output": 5, "kernel_size": 8, "stride": 4,
                                                           "bias_term": False}, param=[{"lr_mult": 0}])
    n.crop = _coord_map(caffe).crop(n.up, n.data)
    n.pool_score = L.Convolution(n.pool1, kernel_size=1, num_output=5)
    n.fuse = L.Crop(n.pool_score, n.crop, crop_param={"axis": 2, "offset": [0]})
    return n.to_proto()


@pytest.mark.parametrize("script", [lenet, caffenet_style, anonymous, fcn], ids=lambda f: f.__name__)
def test_netspec_script_writes_the_prototxt_text_pycaffe_writes(script):
    expected = str(script(pycaffe()))
    ours = script(mpicaffe_caffe)
    assert type(ours) is caffe_pb2.NetParameter
    assert str(ours) == expected


def test_param_name_dict_is_pycaffes():
    real = importlib.import_module(pycaffe().__name__ + ".net_spec")
    assert mpicaffe_caffe.net_spec.param_name_dict() == real.param_name_dict()


def test_crop_and_coord_maps_are_pycaffes():
    maps = []
    for caffe in (pycaffe(), mpicaffe_caffe):
        L, cm = caffe.layers, _coord_map(caffe)
        data = L.Input(shape={"dim": [1, 3, 64, 64]})
        conv = L.Convolution(data, kernel_size=5, pad=[4, 3], num_output=4)
        pool = L.Pooling(L.ReLU(conv, in_place=True), kernel_size=3, stride=2, pad=1)
        up = L.Deconvolution(pool, convolution_param={"num_output": 4, "kernel_size": 3, "stride": 2})
        axis, scale, shift = cm.coord_map_from_to(up, data)
        half = L.Deconvolution(pool, convolution_param={"num_output": 4, "kernel_size": 4, "stride": 2})
        with pytest.raises(AssertionError, match="cannot crop noninteger offset"):
            cm.crop(half, data)
        maps.append((axis, list(scale), list(shift), str(caffe.to_proto(cm.crop(up, data)))))
    assert maps[0] == maps[1]
    assert maps[1][:3] == (1, [1.0], [-3.0, -2.0]) and "offset: 3\n    offset: 2" in maps[1][3]


def _real_draw():
    """pycaffe and its caffe.draw, which imports pydot (the test extra): fail in CI without it."""
    real = pycaffe()
    try:
        return real, importlib.import_module(real.__name__ + ".draw")
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"pycaffe's draw needs pydot, which scripts/setup.sh installs: {e}")
        pytest.skip(f"pycaffe's draw needs pydot: {e}")


def _graph(draw, net, **kwargs):
    graph = draw.get_pydot_graph(net, **kwargs)
    nodes = {n.get_name(): n.get_attributes() for n in graph.get_nodes()}
    edges = collections.Counter((e.get_source(), e.get_destination(), e.get("label")) for e in graph.get_edges())
    return graph.get_name(), graph.get("rankdir"), nodes, edges


@pytest.mark.parametrize("phase", ["TRAIN", "TEST", "ALL"])
@pytest.mark.parametrize("rankdir,display_lrm", [("LR", False), ("TB", True)])
def test_draw_gives_pycaffes_graph(phase, rankdir, display_lrm):
    real, real_draw = _real_draw()
    code = None if phase == "ALL" else getattr(real, phase)
    options = {"rankdir": rankdir, "phase": code, "display_lrm": display_lrm}
    real_net = text_format.Parse(pathlib.Path(LENET).read_text(), real.proto.caffe_pb2.NetParameter())
    expected = _graph(real_draw, real_net, **options)
    ours = _graph(mpicaffe_caffe.draw, prototxt.read_net(LENET), **options)
    assert ours == expected
    assert len(ours[2]) >= 14 and sum(ours[3].values()) >= 19


def test_draw_of_a_netspec_fcn_gives_pycaffes_graph():
    real, real_draw = _real_draw()
    expected = _graph(real_draw, fcn(real), rankdir="LR", display_lrm=True)
    assert _graph(mpicaffe_caffe.draw, fcn(mpicaffe_caffe), rankdir="LR", display_lrm=True) == expected
