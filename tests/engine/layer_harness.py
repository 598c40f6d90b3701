"""Helpers for layer tests: build one engine layer from prototxt text, run it, and check its
backward against finite differences in float64 (torch.autograd.gradcheck)."""
from __future__ import annotations

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.layers import Layer, create_layer
from mpicaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_layer(text: str, bottoms, phase: int = TRAIN, dtype=torch.float32) -> tuple[Layer, list[torch.Tensor]]:
    """Parse a LayerParameter from text, create and set up the layer on `bottoms` (numpy arrays)."""
    param = prototxt.parse_text(text, caffe_pb2.LayerParameter(), "<test>")
    param.phase = phase
    layer = create_layer(param, phase)
    tensors = [torch.as_tensor(np.asarray(b), dtype=dtype) for b in bottoms]
    layer.setup([t.float() for t in tensors])
    layer.blobs = [b.to(dtype) for b in layer.blobs]
    return layer, tensors


def forward(text: str, *bottoms, phase: int = TRAIN, blobs=None) -> list[np.ndarray]:
    """Run one forward of the layer; `blobs` (numpy arrays) replace its filled parameters."""
    layer, tensors = make_layer(text, bottoms, phase)
    if blobs is not None:
        layer.blobs = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in blobs]
    with torch.no_grad():
        return [t.numpy() for t in layer.forward(tensors)]


def check_gradients(text: str, *bottoms, wrt=None, phase: int = TRAIN, params: bool = True,
                    seed: int = 0, eps: float = 1e-6, atol: float = 1e-5) -> None:
    """Assert the layer's backward matches central finite differences, in float64.

    `wrt` lists the bottom indices to check (default: all floating bottoms); `params` adds the
    layer's learnable blobs. The scalar checked is sum(top_k * random weights_k) over all tops.
    """
    layer, tensors = make_layer(text, bottoms, phase, dtype=torch.float64)
    wrt = range(len(tensors)) if wrt is None else wrt
    inputs = [tensors[i].clone().requires_grad_(True) for i in wrt]
    learn = [i for i, ok in enumerate(layer.blob_learnable) if ok] if params else []
    blob_inputs = [layer.blobs[i].clone().requires_grad_(True) for i in learn]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tops = layer.forward(tensors)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tops]

    def fn(*args):
        xs = list(tensors)
        for k, i in enumerate(wrt):
            xs[i] = args[k]
        for k, i in enumerate(learn):
            layer.blobs[i] = args[len(inputs) + k]
        outs = layer.forward(xs)
        return sum((o * w).sum() for o, w in zip(outs, weights) if o.is_floating_point())

    assert torch.autograd.gradcheck(fn, tuple(inputs + blob_inputs), eps=eps, atol=atol, rtol=1e-4)


def run_backward(text, *bottoms, phase=TRAIN, seed=0):
    """float64 forward + backward with random top diffs; returns tops, top diffs, bottom diffs,
    learnable-blob diffs (numpy)."""
    layer, tensors = make_layer(text, bottoms, phase, dtype=torch.float64)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    layer.blobs = [b.clone().requires_grad_(ok) for b, ok in zip(layer.blobs, layer.blob_learnable)]
    tops = layer.forward(xs)
    rng = np.random.default_rng(seed)
    diffs = [rng.standard_normal(t.shape) for t in tops]
    torch.autograd.backward(tops, [torch.as_tensor(d) for d in diffs])
    bottom_diffs = [x.grad.numpy() if x.grad is not None else np.zeros(x.shape) for x in xs]
    blob_diffs = [b.grad.numpy() for b in layer.blobs if b.requires_grad]
    return [t.detach().numpy() for t in tops], diffs, bottom_diffs, blob_diffs


def layer_text(kind: str, params: str = "", bottoms=("x",), tops=("y",)) -> str:
    b = " ".join(f'bottom: "{n}"' for n in bottoms)
    t = " ".join(f'top: "{n}"' for n in tops)
    return f'name: "l" type: "{kind}" {b} {t} {params}'


def run64(text, *bottoms, blobs=None, phase=TRAIN):
    """float64 forward of a one-layer text; `blobs` replace the filled parameters."""
    layer, tensors = make_layer(text, bottoms, phase, dtype=torch.float64)
    if blobs is not None:
        layer.blobs = [torch.as_tensor(np.asarray(b, dtype=np.float64)) for b in blobs]
    with torch.no_grad():
        return [t.numpy() for t in layer.forward(tensors)]


def backward64(text, *bottoms, blobs=None, phase=TRAIN, seed=0):
    """float64 forward + backward of random top diffs (first top only): tops, top diff, bottom diff."""
    layer, tensors = make_layer(text, bottoms, phase, dtype=torch.float64)
    if blobs is not None:
        layer.blobs = [torch.as_tensor(np.asarray(b, dtype=np.float64)) for b in blobs]
    x = tensors[0].clone().requires_grad_(True)
    tops = layer.forward([x])
    dy = np.random.default_rng(seed).standard_normal(tops[0].shape)
    tops[0].backward(torch.as_tensor(dy))
    return [t.detach().numpy() for t in tops], dy, x.grad.numpy()


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)
