# ruff: noqa: C408 (the net is written as its authors write it: dict(...) for messages)
"""FCN-8s (Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation",
2015), the model behind most Caffe segmentation work, against real Caffe.

The net is written as its authors' voc-fcn8s/net.py writes it, with caffe.NetSpec and
coord_map's `crop` (the offsets of its three Crop layers come from coord_map), by real pycaffe
and by mpicaffe.caffe: the two texts must be the same. Two changes for a test: Input layers
stand for its VOC Python data layer, and its two Dropout layers are left out (their random masks
cannot be matched). Its VGG-16 convolutions have no fillers (the authors start from VGG weights),
so the weights are random here (He-normal), the three fixed Deconvolutions (lr_mult 0) get
bilinear kernels as the authors' surgery.interp gives them, and the label has 21 classes with
ignored (255) pixels for SoftmaxWithLoss(normalize: false, ignore_label: 255). Caffe computes the
weight diff of a Deconvolution whose lr_mult is 0 (the engine does not; docs/engine.md): those three
diffs are checked to be Caffe's nonzero and the engine's zero, and left out of the comparison.

TRAIN forward and backward on a 1 x 3 x 40 x 40 image (conv1_1's pad of 100 makes its maps
238 x 238), compared as tests/zoo/test_zoo_parity.py compares the zoo: every blob's data and
diff and every parameter's diff, relative to the largest magnitude, within 2e-5 (a net without
BatchNorm, as VGG-16 there), after aligning ReLU and MAX pooling decisions within rounding.
"""
from __future__ import annotations

import numpy as np

from mpicaffe import caffe as ours
from tests.parity.common import caffe_net, copy_params, engine_net, pycaffe
from tests.zoo.test_zoo_parity import TRAIN, Errors, ZooCase, _compare_params, _layer_params, forward_backward

SIZE = 40


def fcn8s(caffe) -> str:
    """voc-fcn8s/net.py's fcn('train'), through `caffe` (real pycaffe or mpicaffe.caffe)."""
    from_caffe = __import__(caffe.__name__ + ".coord_map", fromlist=["crop"])
    L, P, crop = caffe.layers, caffe.params, from_caffe.crop

    def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
        return conv, L.ReLU(conv, in_place=True)

    def max_pool(bottom, ks=2, stride=2):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    def score(bottom):
        return L.Convolution(bottom, num_output=21, kernel_size=1, pad=0,
                             param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])

    def upscore(bottom, ks, stride):
        return L.Deconvolution(bottom, convolution_param=dict(num_output=21, kernel_size=ks, stride=stride,
                                                              bias_term=False), param=[dict(lr_mult=0)])

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    n.label = L.Input(shape=dict(dim=[1, 1, SIZE, SIZE]))
    n.conv1_1, n.relu1_1 = conv_relu(n.data, 64, pad=100)
    n.conv1_2, n.relu1_2 = conv_relu(n.relu1_1, 64)
    n.pool1 = max_pool(n.relu1_2)
    n.conv2_1, n.relu2_1 = conv_relu(n.pool1, 128)
    n.conv2_2, n.relu2_2 = conv_relu(n.relu2_1, 128)
    n.pool2 = max_pool(n.relu2_2)
    n.conv3_1, n.relu3_1 = conv_relu(n.pool2, 256)
    n.conv3_2, n.relu3_2 = conv_relu(n.relu3_1, 256)
    n.conv3_3, n.relu3_3 = conv_relu(n.relu3_2, 256)
    n.pool3 = max_pool(n.relu3_3)
    n.conv4_1, n.relu4_1 = conv_relu(n.pool3, 512)
    n.conv4_2, n.relu4_2 = conv_relu(n.relu4_1, 512)
    n.conv4_3, n.relu4_3 = conv_relu(n.relu4_2, 512)
    n.pool4 = max_pool(n.relu4_3)
    n.conv5_1, n.relu5_1 = conv_relu(n.pool4, 512)
    n.conv5_2, n.relu5_2 = conv_relu(n.relu5_1, 512)
    n.conv5_3, n.relu5_3 = conv_relu(n.relu5_2, 512)
    n.pool5 = max_pool(n.relu5_3)
    n.fc6, n.relu6 = conv_relu(n.pool5, 4096, ks=7, pad=0)
    n.fc7, n.relu7 = conv_relu(n.relu6, 4096, ks=1, pad=0)
    n.score_fr = score(n.relu7)
    n.upscore2 = upscore(n.score_fr, 4, 2)
    n.score_pool4 = score(n.pool4)
    n.score_pool4c = crop(n.score_pool4, n.upscore2)
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=P.Eltwise.SUM)
    n.upscore_pool4 = upscore(n.fuse_pool4, 4, 2)
    n.score_pool3 = score(n.pool3)
    n.score_pool3c = crop(n.score_pool3, n.upscore_pool4)
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=P.Eltwise.SUM)
    n.upscore8 = upscore(n.fuse_pool3, 16, 8)
    n.score = crop(n.upscore8, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return str(n.to_proto())


def _bilinear(size: int) -> np.ndarray:
    """The authors' surgery.upsample_filt: a bilinear kernel of `size`."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def test_fcn8s_written_by_its_net_py_trains_as_in_caffe(tmp_path):
    real = pycaffe()
    text = fcn8s(real)
    assert fcn8s(ours) == text
    text = "force_backward: true\n" + text
    cnet = caffe_net(text, TRAIN, tmp_path / "fcn8s.prototxt")
    rng = np.random.default_rng(8)
    for name, blobs in cnet.params.items():
        w = blobs[0].data
        if name.startswith("upscore"):  # surgery.interp: each class upsampled by itself
            w[...] = 0
            w[range(21), range(21)] = _bilinear(w.shape[-1])
        else:
            w[...] = rng.normal(0, np.sqrt(2.0 / np.prod(w.shape[1:])), w.shape)
            blobs[1].data[...] = rng.normal(0, 0.05, blobs[1].data.shape)
    label = rng.integers(0, 21, (1, 1, SIZE, SIZE)).astype(np.float32)
    label[rng.random(label.shape) < 0.1] = 255
    inputs = {"data": rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32), "label": label}
    enet = engine_net(text, TRAIN, "<fcn8s>")
    copy_params(cnet, enet)
    for name, a in inputs.items():
        cnet.blobs[name].data[...] = a
        enet.blobs[name].data[...] = a
    # the crops coord_map chose: score_pool4c 5, score_pool3c 9, score 31 (the published net's)
    assert [lp.crop_param.offset[0] for lp in _layer_params(text).values() if lp.type == "Crop"] == [5, 9, 31]

    errors = Errors(ZooCase("fcn8s", TRAIN, SIZE, 1))
    forward_backward(errors, cnet, enet, _layer_params(text))
    # Caffe's Deconvolution computes its weight diff even with lr_mult 0, which the engine leaves
    # at zero (docs/engine.md); the weights of the three fixed upsamplings are compared above
    frozen = [name for name in cnet.params if name.startswith("upscore")]
    assert all(not enet.params[name][0].diff.any() and cnet.params[name][0].diff.any() for name in frozen)
    for name in frozen:
        cnet.params[name][0].diff[...] = 0
    _compare_params(errors, cnet, enet, diff=True)
    errors.check()
