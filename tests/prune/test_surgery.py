"""Dependency-aware surgery: which groups are prunable, and that the cut net computes what it should.

Tolerances: ratio 0 must give bit-identical outputs (nothing is cut, the files round-trip exactly).
Removing channels that are exactly zero everywhere they flow removes only terms that were +0 in
each sum, but BLAS sums fewer terms in a different order, so outputs agree to float32 rounding:
rtol 1e-5 plus atol 1e-6 x max(1, max |output|), as the parity tests allow.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune import criteria
from mpicaffe.prune.model import PrunableModel, build_net
from mpicaffe.prune.surgery import prune_history
from tests.prune import nets

RTOL, ATOL = 1e-5, 1e-6


def load(text: str = nets.BRANCHY, seed: int = 0) -> PrunableModel:
    torch.manual_seed(seed)
    model = PrunableModel.load("<test>", param=nets.parse(text))
    for net in model.nets.values():
        nets.randomize_batchnorm(net, seed)
    return model


def outputs(param: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter, x: np.ndarray,
            phase: int = caffe_pb2.TEST) -> dict[str, np.ndarray]:
    net = build_net(param, phase, "<pruned>", weights)
    net.blobs["data"].data[...] = x
    with torch.no_grad():
        net.forward()
    return {name: net.blobs[name].data.copy() for name in net.outputs}


def assert_outputs_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k, e in expected.items():
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(actual[k], e, rtol=RTOL, atol=ATOL * scale, err_msg=k)


def test_groups_and_what_is_left_whole():
    model = load()
    assert {g.name for g in model.analysis.groups} == nets.PRUNABLE
    blocked = dict(model.analysis.blocked)
    assert "grouped convolution" in blocked["convg"]
    assert "net output 'ip2'" in blocked["ip2"]
    # Concat offsets: conv2b's channels are inputs 6..9 of conv3 and conv3s
    cut = {(e.layer, e.blob, e.axis): e.index for e in model.analysis.group_of("conv2b").edits}
    assert cut[("conv3", 0, 1)].ravel().tolist() == [6, 7, 8, 9]
    # Flatten: channel k of the Eltwise is rows 16k..16k+15 of ip1 (4x4 positions)
    rows = {(e.layer, e.axis): e.index for e in model.analysis.group_of("conv3").edits}[("ip1", 1)]
    assert rows.shape == (10, 16) and rows[2].tolist() == list(range(32, 48))


@pytest.mark.parametrize("phase", [caffe_pb2.TEST, caffe_pb2.TRAIN])
def test_ratio_zero_is_the_identity(phase):
    model = load()
    removed = model.select("l1", ratio=criteria.parse_amounts("0", "--ratio"))
    assert removed == {}
    net, weights, _ = model.pruned_files(model.cuts(removed))
    assert prototxt.to_text(net) == prototxt.to_text(model.param)
    x = nets.inputs()
    before = outputs(model.param, model.weights_param(), x, phase)
    after = outputs(net, weights, x, phase)
    for k in before:
        assert np.array_equal(before[k], after[k]), k


def _zero_channels(model: PrunableModel, chosen: dict[str, list[int]]) -> None:
    """Make the chosen channels of each group exactly zero wherever they flow."""
    for net in model.nets.values():
        for group, channels in chosen.items():
            for m in group.split("+"):
                layer = net.layer(m)
                with torch.no_grad():
                    layer.blobs[0][channels] = 0
                    layer.blobs[1][channels] = 0
            if group == "conv1":  # (0 - mean) / std * gamma + beta = 0
                with torch.no_grad():
                    net.layer("bn1").blobs[0][channels] = 0
                    net.layer("sc1").blobs[1][channels] = 0


CHOSEN = {"conv1": [1, 6], "conv2a": [0, 5], "conv2b": [2], "conv3+conv3s": [0, 3, 9], "ip1": [4, 5, 15]}


def test_removing_zero_channels_leaves_outputs_unchanged():
    model = load()
    _zero_channels(model, CHOSEN)
    removed = model.select("l1", threshold=criteria.parse_amounts("1e-12", "--threshold"))
    assert {k: v.tolist() for k, v in removed.items()} == CHOSEN
    cuts = model.cuts(removed)
    net, weights, _ = model.pruned_files(cuts)
    assert cuts.num_output == {"conv1": 6, "conv2a": 4, "conv2b": 3, "conv3": 7, "conv3s": 7, "ip1": 13}
    for phase in (caffe_pb2.TEST, caffe_pb2.TRAIN):
        for seed in range(3):
            x = nets.inputs(seed)
            assert_outputs_close(outputs(net, weights, x, phase), outputs(model.param, model.weights_param(), x, phase))
    pruned = build_net(net, caffe_pb2.TEST, "<pruned>", weights)
    assert tuple(pruned.layer("ip1").blobs[0].shape) == (13, 7 * 16)
    assert tuple(pruned.layer("conv3").blobs[0].shape) == (7, 7, 1, 1)
    assert tuple(pruned.layer("bn1").blobs[0].shape) == (6,)


def test_removing_nonzero_channels_changes_outputs():
    """The converse, so the test above can fail: cutting live channels is not a no-op."""
    model = load()
    removed = {"conv2b": np.array([2])}
    net, weights, _ = model.pruned_files(model.cuts(removed))
    x = nets.inputs()
    before = outputs(model.param, model.weights_param(), x)["ip2"]
    assert not np.allclose(outputs(net, weights, x)["ip2"], before, rtol=1e-3)


@pytest.mark.parametrize("sets", [1, 2])
def test_solver_history_is_cut_like_the_weights(sets):
    model = load()
    params = model.learnable_params()
    arrays = model.weight_arrays()
    history = [arrays[layer][j] * (s + 2) for s in range(sets) for layer, j, _ in params]
    cuts = model.cuts({"conv1": np.array([0, 3]), "conv3+conv3s": np.array([1]), "conv2a": np.array([5])})
    net, weights, _ = model.pruned_files(cuts)
    pruned = prune_history(history, params, cuts)
    pruned_net = build_net(net, caffe_pb2.TRAIN, "<p>", weights)
    by_layer = {(i.layer, i.index): pruned_net.layer(i.layer).blobs[i.index].detach()
                for i in pruned_net.param_infos}
    assert len(pruned) == sets * len(params)
    for i, h in enumerate(pruned):
        layer, j, _ = params[i % len(params)]
        np.testing.assert_array_equal(h, by_layer[(layer, j)].numpy() * (i // len(params) + 2))


def test_history_of_another_net_is_refused():
    model = load()
    with pytest.raises(Exception, match="not a multiple"):
        prune_history([np.zeros(3)] * 5, model.learnable_params(), model.cuts({}), "s.solverstate")


SHARED = (
    'name: "siamese"\n'
    'layer { name: "data" type: "Input" top: "data" top: "data_p" '
    'input_param { shape { dim: 2 dim: 2 dim: 6 dim: 6 } } }\n'
    'layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a" param { name: "w" } param { name: "b" } '
    'convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n'
    'layer { name: "conv_b" type: "Convolution" bottom: "data_p" top: "conv_b" param { name: "w" } param { name: "b" } '
    'convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n'
    'layer { name: "ip_a" type: "InnerProduct" bottom: "conv_a" top: "ip_a" param { name: "ipw" } param { name: "ipb" } '
    'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n'
    'layer { name: "ip_b" type: "InnerProduct" bottom: "conv_b" top: "ip_b" param { name: "ipw" } param { name: "ipb" } '
    'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n'
)


def test_shared_parameters_are_cut_jointly():
    model = load(SHARED)
    assert [g.name for g in model.analysis.groups] == ["conv_a+conv_b"]
    group = model.analysis.groups[0]
    with torch.no_grad():
        for net in model.nets.values():
            for j in (0, 1):
                net.layer("conv_a").blobs[j][2] = 0  # shared: conv_b's too
    cuts = model.cuts({group.name: np.array([2])})
    net, weights, _ = model.pruned_files(cuts)
    x = nets.inputs(shape=(2, 2, 6, 6))

    def run(param, w):
        n = build_net(param, caffe_pb2.TEST, "<s>", w)
        n.blobs["data"].data[...] = x
        n.blobs["data_p"].data[...] = x[::-1]
        with torch.no_grad():
            n.forward()
        return {k: n.blobs[k].data.copy() for k in ("ip_a", "ip_b")}

    assert_outputs_close(run(net, weights), run(model.param, model.weights_param()))
    assert cuts.num_output == {"conv_a": 4, "conv_b": 4}


def _blocked_reason(text: str, layer: str) -> str:
    model = load(text)
    return {n: r for n, r in model.analysis.blocked for n in n.split("+")}[layer]


def _net(body: str) -> str:
    return ('name: "n"\nlayer { name: "data" type: "Input" top: "data" top: "label" '
            'input_param { shape { dim: 2 dim: 4 dim: 6 dim: 6 } shape { dim: 2 } } }\n'
            'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 '
            'kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }\n' + body)


@pytest.mark.parametrize("body, reason", [
    (('layer { name: "lrn" type: "LRN" bottom: "c1" top: "lrn" }\n'
     'layer { name: "s" type: "Silence" bottom: "lrn" }\n'), "LRN 'lrn' across channels"),
    (('layer { name: "e" type: "Eltwise" bottom: "c1" bottom: "data" top: "e" }\n'
     'layer { name: "s" type: "Silence" bottom: "e" }\n'), "with 'data', which is not pruned"),
    (('layer { name: "f" type: "Flatten" bottom: "c1" top: "f" }\n'
     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "f" bottom: "label" top: "loss" }\n'),
     "layer 'loss' (SoftmaxWithLoss), which must keep its input size"),
    (('layer { name: "r" type: "Reshape" bottom: "c1" top: "r" reshape_param { shape { dim: 0 dim: -1 } } }\n'
     'layer { name: "s" type: "Silence" bottom: "r" }\n'), "'r' (Reshape)"),
    (('layer { name: "g" type: "Convolution" bottom: "c1" top: "g" convolution_param { num_output: 4 group: 2 '
     'kernel_size: 1 } }\nlayer { name: "s" type: "Silence" bottom: "g" }\n'), "grouped convolution 'g'"),
])
def test_unsupported_consumers_leave_the_layer_whole(body, reason):
    assert reason in _blocked_reason(_net(body), "c1")


def test_within_channel_lrn_and_silence_are_fine():
    text = _net('layer { name: "lrn" type: "LRN" bottom: "c1" top: "lrn" lrn_param { norm_region: WITHIN_CHANNEL } }\n'
                'layer { name: "s" type: "Silence" bottom: "lrn" }\n')
    assert [g.name for g in load(text).analysis.groups] == ["c1"]
