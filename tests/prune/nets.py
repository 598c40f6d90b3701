"""Small nets for the pruning tests, with every structure the surgery handles.

BRANCHY: a grouped convolution (left alone), BatchNorm + Scale, a Concat of two convolutions, an
Eltwise of two convolutions (pruned jointly), MAX pooling, a Flatten into an InnerProduct, a
net output (kept). Input layers, so the tests feed their own data.
"""
from __future__ import annotations

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2


def _conv(name, bottom, n, k=1, pad=0, group=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} group: {group} '
            f'weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}\n')


BRANCHY = (
    'name: "branchy"\n'
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
    + _conv("convg", "data", 6, 3, 1, group=3)
    + 'layer { name: "relug" type: "ReLU" bottom: "convg" top: "convg" }\n'
    + _conv("conv1", "convg", 8, 3, 1)
    + 'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }\n'
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    + _conv("conv2a", "conv1", 6)
    + _conv("conv2b", "conv1", 4, 3, 1)
    + 'layer { name: "cat" type: "Concat" bottom: "conv2a" bottom: "conv2b" top: "cat" }\n'
    'layer { name: "pool1" type: "Pooling" bottom: "cat" top: "pool1" '
    'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
    + _conv("conv3", "pool1", 10)
    + _conv("conv3s", "pool1", 10)
    + 'layer { name: "elt" type: "Eltwise" bottom: "conv3" bottom: "conv3s" top: "elt" }\n'
    'layer { name: "relu3" type: "ReLU" bottom: "elt" top: "elt" }\n'
    'layer { name: "flat" type: "Flatten" bottom: "elt" top: "flat" }\n'
    'layer { name: "ip1" type: "InnerProduct" bottom: "flat" top: "ip1" inner_product_param { num_output: 16 '
    'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 0.1 } } }\n'
    'layer { name: "relu4" type: "ReLU" bottom: "ip1" top: "ip1" }\n'
    'layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 5 '
    'weight_filler { type: "gaussian" std: 0.3 } } }\n'
)

PRUNABLE = {"conv1", "conv2a", "conv2b", "conv3+conv3s", "ip1"}


def parse(text: str = BRANCHY) -> caffe_pb2.NetParameter:
    return prototxt.parse_text(text, caffe_pb2.NetParameter(), "<branchy>")


def randomize_batchnorm(net, seed: int = 0) -> None:
    """Give every BatchNorm layer nonzero statistics (its filler leaves zeros)."""
    g = torch.Generator().manual_seed(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            mean, var, factor = layer.blobs
            with torch.no_grad():
                mean.copy_(torch.randn(mean.shape, generator=g) * 0.5)
                var.copy_(torch.rand(var.shape, generator=g) + 0.5)
                factor.fill_(1.0)


def inputs(seed: int = 0, shape=(2, 3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def feeder(seed: int = 0):
    """A `feed(net)` that puts a new random batch into the net's 'data' input on every call."""
    rng = np.random.default_rng(seed)

    def feed(net) -> None:
        blob = net.blobs["data"]
        blob.data[...] = rng.standard_normal(blob.data.shape).astype(np.float32)

    return feed
