"""The zoo generator (tests/zoo/nets.py): published parameter counts and the variants' switches.

These run on the built-in engine alone (no Caffe needed).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2
from tests.parity.common import engine_net
from tests.zoo.nets import FULL_SIZE, NAMES, zoo_net

# learnable parameters at full size as the papers and reference implementations count them:
# convolution and fully connected weights and biases, and BatchNorm's gamma and beta (Caffe's
# Scale layer); BatchNorm's running statistics are not counted
PUBLISHED_PARAMETERS: dict[str, int] = {
    "caffenet": 60_965_224, "alexnet": 60_965_224, "vgg16": 138_357_544,
    "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808,
    "densenet121": 7_978_856, "mobilenet_v1": 4_231_976, "mobilenet_v2": 3_504_872,
    "squeezenet1_0": 1_248_424, "squeezenet1_1": 1_235_496,
}


def parse(text: str) -> caffe_pb2.NetParameter:
    return prototxt.parse_text(text, caffe_pb2.NetParameter(), "<zoo>")


# architectures whose published training nets use Dropout
WITH_DROPOUT = {"caffenet", "alexnet", "vgg16", "nin", "googlenet", "squeezenet1_0", "squeezenet1_1"}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_net_has_the_published_parameter_count_and_one_probability_per_class(name: str):
    net = engine_net(zoo_net(name, batch=1), caffe_pb2.TEST, f"<zoo {name}>")
    assert net.blobs["data"].shape == (1, 3, FULL_SIZE[name], FULL_SIZE[name])
    assert net.outputs == ["prob"]
    # (1, 1000) after a fully connected classifier, (1, 1000, 1, 1) after NIN's and SqueezeNet's pooling
    assert net.blobs["prob"].shape[:2] == (1, 1000) and net.blobs["prob"].count == 1000
    if name in PUBLISHED_PARAMETERS:
        assert sum(info.count for info in net.param_infos if info.learnable) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", NAMES)
def test_train_variant_adds_label_and_loss_and_drops_dropout_on_request(name: str):
    deploy = parse(zoo_net(name, 2, 99))
    train = parse(zoo_net(name, 2, 99, train=True))
    no_dropout = parse(zoo_net(name, 2, 99, train=True, dropout=False))
    assert list(deploy.layer[0].top) == ["data"] and list(train.layer[0].top) == ["data", "label"]
    assert deploy.layer[-1].type == "Softmax"
    # GoogLeNet trains with two auxiliary classifiers besides the main one
    assert sum(lp.type == "SoftmaxWithLoss" for lp in train.layer) == (3 if name == "googlenet" else 1)
    assert any(lp.type == "Dropout" for lp in train.layer) == (name in WITH_DROPOUT)
    assert list(no_dropout.layer) == [lp for lp in train.layer if lp.type != "Dropout"]


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="resnet50"):
        zoo_net("resnet51")


def test_bundled_resnet20_is_what_its_generator_writes_and_has_20_weighted_layers():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    check = subprocess.run([sys.executable, os.path.join(root, "scripts", "gen_resnet20.py"), "--check"],
                           check=False, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    net = prototxt.read_net(os.path.join(root, "prototxt", "resnet20", "resnet20_deploy.prototxt"))
    weighted = [lp for lp in net.layer if lp.type in ("Convolution", "InnerProduct")]
    shortcuts = [lp for lp in weighted if lp.convolution_param.kernel_size == [1]]
    assert len(weighted) - len(shortcuts) == 20 and len(shortcuts) == 2
    assert sum(lp.type == "BatchNorm" for lp in net.layer) == 21


# fan-out into branches (Inception, Fire), Concat chains (DenseNet), Eltwise shortcuts (ResNet),
# depthwise and linear bottlenecks (MobileNet v2), BatchNorm throughout; 64 px, batch 2, no Dropout
LAYER_BY_LAYER = ["googlenet", "inception_bn", "resnet50", "densenet121", "mobilenet_v2", "squeezenet1_1"]


@pytest.mark.parametrize("name", LAYER_BY_LAYER)
def test_layer_by_layer_backward_equals_the_whole_net_backward(name: str):
    # pycaffe's backward callbacks (and backward(start=, end=)) run Caffe's BackwardFromTo layer by
    # layer; over the whole net it must give the parameter and data diffs of one autograd backward
    # (which tests/zoo/test_zoo_parity.py checks against Caffe), to float32 rounding: the diffs of a
    # blob read by several layers are summed in another order (relative 1e-4 of the largest)
    from mpicaffe import caffe

    text = "force_backward: true\n" + zoo_net(name, 2, 64, train=True, dropout=False)
    net = caffe.Net._wrap(engine_net(text, caffe_pb2.TRAIN, f"<zoo {name}>"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    y = np.array([3, 7], np.float32)

    def diffs() -> list[np.ndarray]:
        net.forward(data=x, label=y)
        net.clear_param_diffs()
        net.backward()
        return [net.blobs["data"].diff.copy()] + [p.diff.copy() for ps in net.params.values() for p in ps]

    whole = diffs()
    calls = []
    net.after_backward(calls.append)
    by_layer = diffs()
    assert calls == list(range(len(net.layers) - 1, -1, -1))
    for i, (a, b) in enumerate(zip(by_layer, whole)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(float(np.abs(b).max()), 1e-12), err_msg=f"diff {i}")
