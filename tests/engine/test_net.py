"""Net mechanics as Caffe defines them: in-place blobs, split sums, loss weights, propagate_down,
force_backward, parameter sharing, outputs, weight copying. Uses small layers defined here."""
import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import LAYERS, Layer, register
from mpicaffe.backends.engine.net import Net
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

if "TestInput" not in LAYERS:
    @register
    class InputForTests(Layer):
        """Two-dim input of shape (2, 3), filled by the test."""

        type = "TestInput"
        max_bottoms = 0
        holds_inputs = True

        def infer_tops(self, bottoms):
            return [torch.zeros(2, 3) for _ in self.param.top]

    @register
    class AffineForTests(Layer):
        """y = w * x + b with a learnable (3,) weight and bias."""

        type = "TestAffine"
        min_bottoms = max_bottoms = 1

        def setup(self, bottoms):
            filler = caffe_pb2.FillerParameter(type="constant", value=2.0)
            self.add_blob((3,), filler)
            self.add_blob((3,), None, value=0.5)

        def forward(self, bottoms):
            return [bottoms[0] * self.blobs[0] + self.blobs[1]]

    @register
    class DoubleForTests(Layer):
        """y = 2 x, no parameters (used in place)."""

        type = "TestDouble"
        min_bottoms = max_bottoms = 1

        def forward(self, bottoms):
            return [bottoms[0] * 2]

    @register
    class SquareLossForTests(Layer):
        """0.5 * sum(x^2), a scalar; default loss weight 1 since the type ends with Loss."""

        type = "TestSqLoss"
        min_bottoms = 1

        def forward(self, bottoms):
            return [0.5 * sum((b * b).sum() for b in bottoms)]


def make_net(text: str, phase=caffe_pb2.TRAIN) -> Net:
    param = prototxt.parse_text(text, caffe_pb2.NetParameter(), "<test>")
    return Net(prototxt.net_for_phase(param, phase), source="<test>")


X = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], dtype=np.float32)
CHAIN = """
name: "chain"
layer { name: "in" type: "TestInput" top: "x" }
layer { name: "aff" type: "TestAffine" bottom: "x" top: "y" }
layer { name: "dbl" type: "TestDouble" bottom: "y" top: "y" }
layer { name: "loss" type: "TestSqLoss" bottom: "y" top: "loss" }
"""


def test_in_place_blob_holds_last_data_and_first_producers_diff():
    net = make_net(CHAIN)
    net.blobs["x"].data[...] = X
    loss = net.forward()
    y_pre = X * 2 + 0.5
    np.testing.assert_allclose(net.blobs["y"].data, 2 * y_pre, rtol=1e-6)
    assert loss == pytest.approx(0.5 * float(((2 * y_pre) ** 2).sum()), rel=1e-6)
    net.backward()
    # Caffe's in-place backward leaves d loss / d (aff's output) in y's diff: 2 * (2 y_pre)
    np.testing.assert_allclose(net.blobs["y"].diff, 4 * y_pre, rtol=1e-6)
    w_diff = (4 * y_pre * X).sum(axis=0)
    np.testing.assert_allclose(net.params["aff"][0].diff, w_diff, rtol=1e-6)
    np.testing.assert_allclose(net.params["aff"][1].diff, (4 * y_pre).sum(axis=0), rtol=1e-6)
    # diffs accumulate until cleared, as Caffe's do
    net.forward_backward()
    np.testing.assert_allclose(net.params["aff"][0].diff, 2 * w_diff, rtol=1e-6)
    net.clear_param_diffs()
    assert not net.params["aff"][0].diff.any()


def test_params_live_in_flat_buffers():
    net = make_net(CHAIN)
    assert net.flat_data.numel() == 6
    np.testing.assert_array_equal(net.flat_data.numpy(), [2, 2, 2, 0.5, 0.5, 0.5])
    net.params["aff"][0].data[...] = 7
    assert net.flat_data[:3].tolist() == [7, 7, 7]
    assert [(i.layer, i.index, i.offset, i.count) for i in net.param_infos] == [("aff", 0, 0, 3), ("aff", 1, 3, 3)]


SPLIT = """
layer { name: "in" type: "TestInput" top: "x" }
layer { name: "a" type: "TestAffine" bottom: "x" top: "a" }
layer { name: "b" type: "TestDouble" bottom: "a" top: "b" }
layer { name: "c" type: "TestDouble" bottom: "a" top: "c" }
layer { name: "loss_b" type: "TestSqLoss" bottom: "b" top: "lb" }
layer { name: "loss_c" type: "TestSqLoss" bottom: "c" top: "lc" loss_weight: 3 }
"""


def test_blob_read_twice_gets_sum_of_diffs_and_loss_weights_apply():
    net = make_net(SPLIT)
    net.blobs["x"].data[...] = X
    loss = net.forward()
    a = X * 2 + 0.5
    assert loss == pytest.approx(0.5 * float(((2 * a) ** 2).sum()) * (1 + 3), rel=1e-6)
    net.backward()
    np.testing.assert_allclose(net.blobs["a"].diff, 4 * a + 3 * 4 * a, rtol=1e-6)
    assert net.outputs == ["lb", "lc"]


def test_outputs_are_unconsumed_blobs_in_name_order():
    net = make_net("""
        layer { name: "in" type: "TestInput" top: "x" }
        layer { name: "z" type: "TestDouble" bottom: "x" top: "zeta" }
        layer { name: "a" type: "TestDouble" bottom: "x" top: "alpha" }
    """)
    assert net.outputs == ["alpha", "zeta"]


def test_propagate_down_false_stops_gradient_and_force_backward_reaches_inputs():
    net = make_net(CHAIN.replace('name: "chain"', 'force_backward: true'))
    net.blobs["x"].data[...] = X
    net.forward_backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 2 * (4 * (X * 2 + 0.5)), rtol=1e-6)

    stopped = make_net(CHAIN.replace('type: "TestDouble" bottom: "y" top: "y"',
                                     'type: "TestDouble" bottom: "y" top: "y" propagate_down: false'))
    stopped.blobs["x"].data[...] = X
    stopped.forward_backward()
    assert not stopped.params["aff"][0].diff.any()


SHARED = """
layer { name: "in" type: "TestInput" top: "x" }
layer { name: "a1" type: "TestAffine" bottom: "x" top: "y1" param { name: "w" lr_mult: 2 } param { name: "b" } }
layer { name: "a2" type: "TestAffine" bottom: "x" top: "y2" param { name: "w" } param { name: "b" } }
layer { name: "l1" type: "TestSqLoss" bottom: "y1" top: "l1" }
layer { name: "l2" type: "TestSqLoss" bottom: "y2" top: "l2" }
"""


def test_shared_params_have_one_storage_and_summed_diffs():
    net = make_net(SHARED)
    assert len(net.learnable_params) == 2 and net.flat_data.numel() == 6
    assert net.param_infos[0].lr_mult == 2
    net.params["a1"][0].data[...] = 3
    np.testing.assert_array_equal(net.params["a2"][0].data, [3, 3, 3])
    net.blobs["x"].data[...] = X
    net.forward_backward()
    y = X * 3 + 0.5
    np.testing.assert_allclose(net.params["a2"][0].diff, 2 * (y * X).sum(axis=0), rtol=1e-6)


def test_shared_param_mismatches_are_errors():
    with pytest.raises(UserError, match="shared param 'w' has mismatched lr_mult"):
        make_net(SHARED.replace('param { name: "w" } param { name: "b" }',
                                'param { name: "w" lr_mult: 1 } param { name: "b" }'))


def test_build_errors_name_layer_and_blob():
    with pytest.raises(UserError, match="layer 'aff': unknown bottom blob 'nope'"):
        make_net(CHAIN.replace('bottom: "x" top: "y"', 'bottom: "nope" top: "y"'))
    with pytest.raises(UserError, match="top blob 'x' produced by multiple sources"):
        make_net(CHAIN.replace('bottom: "x" top: "y"', 'bottom: "y0" top: "x"').replace(
            'top: "x" }', 'top: "x" top: "y0" }'))
    with pytest.raises(UserError, match="layer 'bad' has unknown type 'NoSuchLayer'"):
        make_net('layer { name: "bad" type: "NoSuchLayer" }')
    with pytest.raises(UserError, match="duplicate layer name 'dbl'"):
        make_net(CHAIN.replace('name: "loss"', 'name: "dbl"'))


def test_to_proto_and_copy_from_round_trip_with_phase_and_checks():
    net = make_net(CHAIN)
    net.params["aff"][0].data[...] = [1, 2, 3]
    proto = net.to_proto()
    aff = next(layer for layer in proto.layer if layer.name == "aff")
    assert aff.phase == caffe_pb2.TRAIN
    assert list(aff.blobs[0].shape.dim) == [3] and list(aff.blobs[0].data) == [1, 2, 3]

    other = make_net(CHAIN)
    other.copy_from(proto)
    np.testing.assert_array_equal(other.params["aff"][0].data, [1, 2, 3])

    legacy = caffe_pb2.NetParameter()
    legacy.CopyFrom(proto)
    blob = next(layer for layer in legacy.layer if layer.name == "aff").blobs[0]
    blob.ClearField("shape")
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 1, 3
    other.copy_from(legacy)  # Caffe accepts legacy 4-d dims padded with leading ones

    blob.width = 4
    with pytest.raises(UserError, match="cannot copy param 0 weights from layer 'aff'; shape mismatch"):
        other.copy_from(legacy, "w.caffemodel")


def test_test_net_shares_trained_weights():
    train = make_net(CHAIN)
    test = make_net(CHAIN, caffe_pb2.TEST)
    test.share_trained_layers_with(train)
    train.params["aff"][0].data[...] = 5
    np.testing.assert_array_equal(test.params["aff"][0].data, [5, 5, 5])
