"""Pruning a running engine solver in place: rebuild its nets smaller, keep weights, history and data.

The train and test nets are rebuilt from their NetParameters with the pruned num_output; every
parameter blob is copied over cut, the solver's history is cut the same way, and the data and
input layers (no bottoms, no blobs) are carried over as they are, so each keeps its position in
its database, its rank shard and its prefetch thread.
"""
from __future__ import annotations

import numpy as np
import torch

from mpicaffe.backends.engine.net import Net
from mpicaffe.info import MULTIPLY_ADD_TYPES
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune.dependencies import Analysis, PhaseView, analyze
from mpicaffe.prune.surgery import Cuts, cut_array, cut_shape, plan_cuts, prune_history, prune_net_param


def analyze_solver(solver) -> Analysis:
    """The prunable groups of an engine solver's train and test nets."""
    return analyze([PhaseView.of(n) for n in [solver.net, *solver.test_nets]])


def parameter_count(net: Net, cuts: Cuts | None = None) -> int:
    """Learnable parameters the net owns (BatchNorm statistics included), after `cuts` if given."""
    return sum(int(np.prod(cut_shape(i.shape, i.layer, i.index, cuts) if cuts else i.shape)) for i in net.param_infos)


def multiply_add_count(net: Net, cuts: Cuts | None = None) -> int:
    """Multiply-adds per sample of the net's Convolution, Deconvolution and InnerProduct layers
    (as `mpicaffe info` counts them), after `cuts` if given: every weight meets each output
    position once (each input position for a Deconvolution), and cuts leave positions unchanged."""
    total = 0
    for info in net.param_infos:
        layer = net.layer(info.layer)
        if info.index != 0 or layer.type not in MULTIPLY_ADD_TYPES:
            continue
        if layer.type == "Deconvolution":
            positions = net.blobs[layer.param.bottom[0]].shape[2:]
        elif layer.type == "InnerProduct":
            positions = net.blobs[layer.param.top[0]].shape[1:-1]  # the axes between the batch and num_output
        else:
            positions = net.blobs[layer.param.top[0]].shape[2:]
        shape = cut_shape(info.shape, info.layer, 0, cuts) if cuts else info.shape
        total += int(np.prod(shape)) * int(np.prod(positions))
    return total


def rebuild_net(old: Net, cuts: Cuts) -> Net:
    """A new Net of `old`'s definition with the cuts applied, holding `old`'s cut weights and its
    data and input layers."""
    new = Net(prune_net_param(old.param, cuts), old.device, old.source, retain_diffs=old.retain_diffs)
    for i, layer in enumerate(new.layers):
        if not layer.param.bottom and not layer.blobs:
            if hasattr(layer, "close"):
                layer.close()
            new.layers[i] = old.layer(layer.name)
    with torch.no_grad():
        for info in new.param_infos:
            src = old.layer(info.layer).blobs[info.index].detach().cpu().numpy()
            cut = cut_array(src, info.layer, info.index, cuts)
            new.layer(info.layer).blobs[info.index].copy_(torch.from_numpy(np.ascontiguousarray(cut)))
    new.timings = old.timings
    return new


def prune_solver(solver, removed: dict[str, list[int]], analysis: Analysis | None = None) -> Cuts:
    """Remove the channels `removed` (group name -> channels) from a running engine solver: its
    train net, test nets and history. Every rank given the same `removed` gets the same result."""
    analysis = analysis or analyze_solver(solver)
    cuts = plan_cuts(analysis, {k: np.asarray(v, np.int64) for k, v in removed.items()})
    if not cuts:
        return cuts
    old = solver.net
    params = [(i.layer, i.index, i.shape) for i in old.param_infos]
    history = prune_history([t.detach().cpu().numpy() for t in solver.history_blobs()], params, cuts)
    net = rebuild_net(old, cuts)
    tests = [rebuild_net(t, cuts) for t in solver.test_nets]
    for t in tests:
        t.share_trained_layers_with(net)
    solver.replace_nets(net, tests, history)
    return cuts


def probe_net(train: Net) -> Net:
    """The train net's definition in phase TEST (no dropout, BatchNorm's global statistics), sharing
    its weights, with data layers of its own that read from the first record."""
    param = caffe_pb2.NetParameter()
    param.CopyFrom(train.param)
    param.state.phase = caffe_pb2.TEST
    for lp in param.layer:
        lp.ClearField("phase")
    net = Net(param, train.device, train.source, retain_diffs=False)
    net.share_trained_layers_with(train)
    return net
