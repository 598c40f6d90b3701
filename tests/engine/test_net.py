"""Net mechanics as Caffe defines them: in-place blobs, split sums, loss weights, propagate_down,
force_backward, parameter sharing, outputs, weight copying. Uses small layers defined here."""
import json

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
    # a top listed twice in one layer: MAX pooling's mask would silently replace its output
    with pytest.raises(UserError, match="layer 'pool': top blob 'p' produced by multiple sources"):
        make_net('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
                 'layer { name: "pool" type: "Pooling" bottom: "x" top: "p" top: "p" '
                 'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }')
    with pytest.raises(UserError, match="layer 'bad' has unknown type 'NoSuchLayer'"):
        make_net('layer { name: "bad" type: "NoSuchLayer" }')
    # a name shared by a layer with parameters (weights are found by name); without, Caffe's
    # acceptance (tests/parity/test_pycaffe_api_parity.py)
    with pytest.raises(UserError, match="duplicate layer name 'aff': a layer with parameters"):
        make_net(CHAIN.replace('name: "dbl"', 'name: "aff"'))
    assert make_net(CHAIN.replace('name: "loss"', 'name: "dbl"')).layer_names == ["in", "aff", "dbl", "dbl"]


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


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "BN_TOP" }
layer { name: "scale" type: "Scale" bottom: "BN_TOP" top: "SCALE_TOP"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "SCALE_TOP" top: "SCALE_TOP" }
layer { name: "ip" type: "InnerProduct" bottom: "SCALE_TOP" top: "ip"
        inner_product_param { num_output: 7 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "separate-tops"])
def test_batchnorm_in_training_backpropagates_the_batch_statistics_gradient(in_place):
    # the reproduction: BatchNorm writing its moving sums in forward (inside the flat
    # weights buffer) used to invalidate the convolution weights autograd had saved
    text = BN_NET.replace("BN_TOP", "conv" if in_place else "bn").replace("SCALE_TOP", "conv" if in_place else "sc")
    net = make_net(text)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, generator=g)
    net.blobs["data"].tensor.copy_(x)
    net.blobs["label"].tensor.copy_(torch.tensor([0.0, 3.0, 6.0, 2.0]))
    w, b, gamma, beta, ip_w, ip_b = (p.detach().clone().requires_grad_(True) for p in (
        net.layer("conv").blobs[0], net.layer("conv").blobs[1], net.layer("scale").blobs[0],
        net.layer("scale").blobs[1], net.layer("ip").blobs[0], net.layer("ip").blobs[1]))
    loss = net.forward()
    net.backward()

    # the same computation written directly in torch
    conv = torch.nn.functional.conv2d(x, w, b)
    mean, var = conv.mean(dim=(0, 2, 3), keepdim=True), conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (conv - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    logits = torch.relu(y).flatten(1) @ ip_w.t() + ip_b
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6, 2]))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for layer, j, ref_param in (("conv", 0, w), ("conv", 1, b), ("scale", 0, gamma), ("scale", 1, beta),
                                ("ip", 0, ip_w)):
        np.testing.assert_allclose(net.params[layer][j].diff, ref_param.grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{layer}[{j}]")
    # Caffe's moving sums after one forward: the batch mean, the m / (m - 1) variance, factor 1
    m = 4 * 4 * 4
    np.testing.assert_allclose(net.params["bn"][0].data, mean.detach().flatten().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["bn"][1].data, var.detach().flatten().numpy() * m / (m - 1), rtol=1e-4)
    assert net.params["bn"][2].data[0] == 1


def test_batchnorm_net_trains_under_mpicaffe_train(tmp_path):
    # the second reproduction: DummyData feeding the same net through the solver
    net = BN_NET.replace("BN_TOP", "conv").replace("SCALE_TOP", "conv").replace(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }\n'
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }',
        'layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param {\n'
        '  shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }\n'
        '  data_filler { type: "gaussian" } data_filler { type: "constant" value: 2 } } }')
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 30\n'
        f'display: 0\nsnapshot_after_train: false\nsnapshot_prefix: "{tmp_path / "s"}"\n')
    from mpicaffe.cli import main

    assert main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--metrics", str(tmp_path / "m.jsonl")]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("layer", ['type: "Clip" clip_param { min: -0.5 max: 0.5 }', 'type: "Power" power_param { power: 2 }',
                                   'type: "BNLL"', 'type: "Log"'])
def test_in_place_layers_whose_caffe_backward_is_wrong_warn_and_get_the_true_gradient(layer, caplog):
    text = ('force_backward: true\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 6 } } }\n'
            f'layer {{ name: "l" {layer} bottom: "x" top: "TOP" }}\n'
            'layer { name: "loss" type: "Reduction" bottom: "TOP" top: "loss" loss_weight: 1 }\n')
    x = torch.tensor([0.2, 0.9, 1.7, 0.4, 2.5, 0.7])
    diffs = []
    for top in ("x", "y"):
        caplog.clear()
        net = make_net(text.replace("TOP", top))
        assert ("overwritten bottom" in caplog.text) == (top == "x")
        net.blobs["x"].tensor.copy_(x)
        net.forward()
        net.backward()
        diffs.append(net.blobs["x"].diff.copy())
    np.testing.assert_allclose(diffs[0], diffs[1])
