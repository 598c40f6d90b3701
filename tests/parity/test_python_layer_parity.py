"""Python layer parity: real Caffe's PythonLayer and the engine's run the same module.

The module below (written to a temporary folder on sys.path) subclasses whichever `caffe` is
importable: real pycaffe here, as Caffe's PythonLayer requires. The engine runs the same class.
The net: Input -> InnerProduct -> a Python per-channel scale with its own learnable blob ->
a Python Euclidean loss with loss_weight 0.5. Every blob's data after forward, every blob's diff
and every parameter diff after backward must match (tolerance of tests/parity/common.py), and a
.caffemodel the engine writes must load into Caffe with the Python layer's blob in place.
"""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2
from tests.parity.common import (
    assert_close,
    caffe_net,
    compare_params,
    copy_params,
    engine_net,
    pycaffe,
    write_text,
)

MODULE = "pylayers_for_parity"

LAYERS = textwrap.dedent('''
    """Two layers written for pycaffe: a learnable per-channel scale and a Euclidean loss."""
    import numpy as np

    try:
        import caffe  # real pycaffe: its PythonLayer needs a subclass of its caffe.Layer
    except ImportError:
        from mpicaffe import caffe


    class ChannelScale(caffe.Layer):
        """top = bottom * w[c] on axis 1; w starts at param_str's value."""

        def setup(self, bottom, top):
            self.blobs.add_blob(bottom[0].channels)
            self.blobs[0].data[...] = float(self.param_str)

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data * self.blobs[0].data[np.newaxis, :]

        def backward(self, top, propagate_down, bottom):
            self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum(axis=0)
            if propagate_down[0]:
                bottom[0].diff[...] = top[0].diff * self.blobs[0].data[np.newaxis, :]


    class EuclideanLoss(caffe.Layer):
        """sum((a - b)^2) / (2 num), as Caffe's EuclideanLoss; phase TRAIN only."""

        def setup(self, bottom, top):
            if len(bottom) != 2:
                raise ValueError("EuclideanLoss takes two bottoms")
            if self.phase != caffe.TRAIN:
                raise ValueError("this test builds the loss in phase TRAIN")

        def reshape(self, bottom, top):
            if bottom[0].count != bottom[1].count:
                raise ValueError("bottoms must have the same count")
            self.residual = np.zeros_like(bottom[0].data, dtype=np.float32)
            top[0].reshape(1)

        def forward(self, bottom, top):
            self.residual[...] = bottom[0].data - bottom[1].data
            top[0].data[...] = np.sum(self.residual ** 2) / bottom[0].num / 2.0

        def backward(self, top, propagate_down, bottom):
            for i, sign in enumerate((1.0, -1.0)):
                if propagate_down[i]:
                    bottom[i].diff[...] = sign * top[0].diff[0] * self.residual / bottom[i].num
''')

NET = f'''
name: "python_parity"
force_backward: true
layer {{ name: "input" type: "Input" top: "x" top: "target"
        input_param {{ shape {{ dim: 4 dim: 5 }} shape {{ dim: 4 dim: 3 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }}
                               bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "scale" type: "Python" bottom: "ip" top: "scaled"
        python_param {{ module: "{MODULE}" layer: "ChannelScale" param_str: "1.5" }} }}
layer {{ name: "loss" type: "Python" bottom: "scaled" bottom: "target" top: "loss" loss_weight: 0.5
        python_param {{ module: "{MODULE}" layer: "EuclideanLoss" }} }}
'''


@pytest.fixture
def module_on_path(tmp_path, monkeypatch):
    """The layers' module in a folder on sys.path, where Caffe's PythonLayer imports it."""
    folder = tmp_path / "layers"
    folder.mkdir()
    write_text(folder / f"{MODULE}.py", LAYERS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return folder


def _nets(tmp_path):
    cnet = caffe_net(NET, caffe_pb2.TRAIN, tmp_path / "net.prototxt")
    enet = engine_net(NET, caffe_pb2.TRAIN, str(tmp_path / "net.prototxt"))
    copy_params(cnet, enet)
    rng = np.random.default_rng(7)
    for name, shape in (("x", (4, 5)), ("target", (4, 3))):
        a = rng.standard_normal(shape).astype(np.float32)
        cnet.blobs[name].data[...] = a
        enet.blobs[name].data[...] = a
    return cnet, enet


def test_python_layers_match_caffe_forward_and_backward(tmp_path, module_on_path):
    pycaffe()
    cnet, enet = _nets(tmp_path)
    assert list(enet.params) == list(cnet.params) == ["ip", "scale"]
    closs = cnet.forward()["loss"]
    eloss = enet.forward()
    assert_close(eloss, 0.5 * float(closs[0]), "weighted loss")
    for name in cnet.blobs:
        assert_close(enet.blobs[name].data.reshape(cnet.blobs[name].data.shape), cnet.blobs[name].data,
                     f"blob '{name}' data")
    cnet.backward()
    enet.backward()
    for name in cnet.blobs:
        assert_close(enet.blobs[name].diff.reshape(cnet.blobs[name].diff.shape), cnet.blobs[name].diff,
                     f"blob '{name}' diff")
    assert np.abs(cnet.blobs["x"].diff).max() > 0
    compare_params(enet, cnet, "after backward", diff=True)


def test_engine_caffemodel_loads_into_caffe_with_the_python_layers_blob(tmp_path, module_on_path):
    caffe = pycaffe()
    _, enet = _nets(tmp_path)
    enet.params["scale"][0].data[...] = [0.25, -2.0, 3.0]
    prototxt.write_binary(enet.to_proto(), str(tmp_path / "w.caffemodel"))
    loaded = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN, weights=str(tmp_path / "w.caffemodel"))
    compare_params(enet, loaded, "loaded by Caffe")
    np.testing.assert_array_equal(loaded.params["scale"][0].data, [0.25, -2.0, 3.0])
