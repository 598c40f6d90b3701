"""Cut a net, its weights and its solver history by a pruning plan.

A plan says which channels of each group go. `plan_cuts` turns it into, for each parameter blob,
the indices to delete along each axis, all in the blob's *original* indices (so cuts from several
groups, e.g. two inputs of one Concat, combine without offsets shifting under each other), and
the new num_output of each pruned layer. The same cuts apply to the prototxt (num_output), the
.caffemodel blobs and the .solverstate history (one history blob per learnable parameter, in
Caffe's order, times the solver's history sets).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpicaffe.backends.engine.net import blob_proto_shape, blob_proto_to_tensor, tensor_to_blob_proto
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune.dependencies import Analysis

Shapes = dict[tuple[str, int], tuple[int, ...]]


@dataclass
class Cuts:
    """Indices to delete per (layer, blob index, axis), and the new num_output per layer."""

    remove: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)
    num_output: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.num_output)


def plan_cuts(analysis: Analysis, removed: dict[str, np.ndarray]) -> Cuts:
    """`removed`: group name -> the group channels to remove. Groups left out lose nothing."""
    cuts = Cuts()
    parts: dict[tuple[str, int, int], list[np.ndarray]] = {}
    for g in analysis.groups:
        channels = np.asarray(removed.get(g.name, []), np.int64)
        if channels.size == 0:
            continue
        if channels.min() < 0 or channels.max() >= g.channels or np.unique(channels).size != channels.size:
            raise ValueError(f"bad channel selection for group {g.name}: {channels}")
        if channels.size >= g.channels:
            raise ValueError(f"group {g.name} would lose all {g.channels} channels")
        for m in g.members:
            cuts.num_output[m] = g.channels - channels.size
        for e in g.edits:
            parts.setdefault((e.layer, e.blob, e.axis), []).append(e.index[channels].reshape(-1))
    cuts.remove = {k: np.unique(np.concatenate(v)) for k, v in parts.items()}
    return cuts


def cut_array(a: np.ndarray, layer: str, blob: int, cuts: Cuts) -> np.ndarray:
    """Parameter blob `blob` of `layer` (in its true shape) with the cut indices deleted."""
    for (name, j, axis), index in cuts.remove.items():
        if (name, j) == (layer, blob):
            a = np.delete(a, index, axis=axis)
    return a


def cut_shape(shape: tuple[int, ...], layer: str, blob: int, cuts: Cuts) -> tuple[int, ...]:
    """The shape parameter blob `blob` of `layer` has after the cuts."""
    dims = list(shape)
    for (name, j, axis), index in cuts.remove.items():
        if (name, j) == (layer, blob):
            dims[axis] -= index.size
    return tuple(dims)


def prune_net_param(param: caffe_pb2.NetParameter, cuts: Cuts) -> caffe_pb2.NetParameter:
    """A copy of a net (prototxt or weights file) with the pruned layers' num_output lowered; every
    layer of that name is changed (a layer may appear once per phase)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    for lp in out.layer:
        if lp.name in cuts.num_output:
            p = lp.inner_product_param if lp.type == "InnerProduct" else lp.convolution_param
            p.num_output = cuts.num_output[lp.name]
    return out


def prune_weights(weights: caffe_pb2.NetParameter, shapes: Shapes, cuts: Cuts,
                  source: str = "") -> caffe_pb2.NetParameter:
    """A pruned copy of a weights file (a .caffemodel NetParameter). `shapes` gives each blob's
    true shape in the net ((layer, j) -> shape), since old files store 4-D legacy shapes."""
    out = prune_net_param(weights, cuts)
    for lp in out.layer:
        for j, bp in enumerate(lp.blobs):
            a = blob_proto_to_tensor(bp).numpy()
            shape = shapes.get((lp.name, j), blob_proto_shape(bp))
            if a.size != int(np.prod(shape)):
                raise UserError(f"{source}: layer '{lp.name}' blob {j} holds {a.size} values; the net's "
                                f"parameter has shape {shape}")
            tensor_to_blob_proto(_tensor(cut_array(a.reshape(shape), lp.name, j, cuts)), bp)
    return out


def prune_history(history: list[np.ndarray], params: list[tuple[str, int, tuple[int, ...]]], cuts: Cuts,
                  source: str = "") -> list[np.ndarray]:
    """Pruned solver history. `params` lists the learnable parameters in Caffe's order as
    (layer, blob index, shape); the history holds one or more sets of them."""
    if not params or len(history) % len(params):
        raise UserError(f"{source}: the solver state has {len(history)} history blobs, not a multiple of the "
                        f"net's {len(params)} learnable parameters (is it the state of this net?)")
    out = []
    for i, h in enumerate(history):
        layer, j, shape = params[i % len(params)]
        if h.size != int(np.prod(shape)):
            raise UserError(f"{source}: history blob {i} holds {h.size} values; parameter {j} of layer "
                            f"'{layer}' has shape {shape}")
        out.append(cut_array(np.asarray(h, np.float32).reshape(shape), layer, j, cuts))
    return out


def _tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
