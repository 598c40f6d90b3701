"""Which output channels of a net can be removed, and every blob cut that removing them implies.

A *group* is a set of Convolution/InnerProduct layers (its *members*) whose output channels are
removed together: usually one layer; several when an Eltwise adds their outputs, or when they
share parameters. Removing channel k of a group removes channel k of every member, and cuts
every parameter blob that reads or scales those channels: the next Convolution's input channels,
the next InnerProduct's rows (H*W of them per channel after a Flatten or an implicit flatten),
BatchNorm statistics, Scale/Bias/PReLU blobs, at the offsets a Concat puts the channels at.

Channels are followed through the net in layer order, for each phase. Anything the analysis does
not know to be safe blocks the group, with a reason, and the group is left whole:
  - the channels reach a net output, a loss or accuracy input, or a layer that mixes or reshapes
    channels (Softmax, Reshape, Slice, InnerProduct with axis != 1, ...);
  - LRN across channels: each output depends on its neighbours' values, and removing a channel,
    even an all-zero one, changes which channels are neighbours;
  - grouped convolution, as a source or a consumer (left alone: removing channels would change
    the channels per group);
  - an Eltwise whose inputs are not all pruned jointly by the same group with the same channel
    layout;
  - a parameter shared with a layer that would not receive the identical cut.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpicaffe.proto import caffe_pb2

SOURCE_TYPES = ("Convolution", "InnerProduct")
# layers that apply a function to each element (or each channel) and keep the channel layout
ELEMENTWISE_TYPES = {"ReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold",
                     "Clip", "Swish", "Dropout", "Split", "Pooling"}


@dataclass(frozen=True)
class Edit:
    """Removing group channel k removes indices `index[k]` along `axis` of parameter blob `blob`
    of layer `layer` (`index` has one row per group channel)."""

    layer: str
    blob: int
    axis: int
    index: np.ndarray
    source: bool = False  # a member's own output channels

    def same_cut(self, other: Edit) -> bool:
        return (self.blob, self.axis) == (other.blob, other.axis) and _same_map(self.index, other.index)


def _same_map(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.sort(a, axis=1), np.sort(b, axis=1))


@dataclass
class Group:
    """Layers whose `channels` output channels are removed jointly, and the cuts that implies."""

    members: tuple[str, ...]
    channels: int
    edits: list[Edit] = field(default_factory=list)

    def weight_axis(self, member: str) -> int:
        """The output-channel axis of a member's weight blob (1 for a transposed InnerProduct)."""
        return next(e.axis for e in self.edits if e.layer == member and e.blob == 0 and e.source)

    @property
    def name(self) -> str:
        return "+".join(self.members)


@dataclass
class Analysis:
    """Prunable groups, and (name, reason) for every candidate layer left whole."""

    groups: list[Group]
    blocked: list[tuple[str, str]]

    def group_of(self, layer: str) -> Group | None:
        return next((g for g in self.groups if layer in g.members), None)


@dataclass
class PhaseView:
    """One phase of a net as the analysis needs it: layers (with Caffe's defaults), blob shapes,
    and the net outputs. Build it from an engine Net with `PhaseView.of(net)`."""

    layers: list[caffe_pb2.LayerParameter]
    shapes: dict[str, tuple[int, ...]]
    outputs: set[str]

    @classmethod
    def of(cls, net) -> PhaseView:
        return cls([layer.param for layer in net.layers],
                   {name: tuple(b.shape) for name, b in net.blobs.items()}, set(net.outputs))


class _Blocked(Exception):
    pass


def _identity(channels: int) -> np.ndarray:
    return np.arange(channels, dtype=np.int64).reshape(channels, 1)


def _expand(index: np.ndarray, inner: int) -> np.ndarray:
    """Channel indices -> the indices of their `inner` consecutive elements after flattening."""
    if inner == 1:
        return index
    c, w = index.shape
    return (index.reshape(c, w, 1) * inner + np.arange(inner)).reshape(c, w * inner)


def _source_problem(lp: caffe_pb2.LayerParameter) -> str | None:
    if len(lp.top) != 1:
        return f"{lp.type} with {len(lp.top)} tops: left alone"
    if lp.type == "Convolution":
        if lp.convolution_param.group != 1:
            return f"grouped convolution (group {lp.convolution_param.group}): left alone"
        if lp.convolution_param.axis != 1:
            return f"Convolution with axis {lp.convolution_param.axis}: only axis 1 is pruned"
        return None
    if lp.inner_product_param.axis != 1:
        return f"InnerProduct with axis {lp.inner_product_param.axis}: only axis 1 is pruned"
    return None


def _num_output(lp: caffe_pb2.LayerParameter) -> int:
    return (lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param).num_output


def _source_edits(lp: caffe_pb2.LayerParameter, channels: int) -> list[Edit]:
    ident = _identity(channels)
    p = lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param
    axis = 1 if lp.type == "InnerProduct" and p.transpose else 0
    return [Edit(lp.name, 0, axis, ident, source=True)] + ([Edit(lp.name, 1, 0, ident, source=True)]
                                                           if p.bias_term else [])


def _consumer_edits(lp: caffe_pb2.LayerParameter, index: np.ndarray, shape: tuple[int, ...]) -> list[Edit]:
    """Cuts in a layer with weights that reads the channels `index` of its bottom (axis 1)."""
    if len(lp.bottom) != 1:
        raise _Blocked(f"they feed {lp.type} '{lp.name}', which has {len(lp.bottom)} bottoms sharing its weights")
    if lp.type in ("Convolution", "Deconvolution"):
        if lp.convolution_param.group != 1:
            raise _Blocked(f"they feed grouped convolution '{lp.name}' (group {lp.convolution_param.group})")
        if lp.convolution_param.axis != 1:
            raise _Blocked(f"they feed {lp.type} '{lp.name}' with axis {lp.convolution_param.axis}")
        # Convolution weights are (out, in, kh, kw); Deconvolution's are (in, out, kh, kw)
        return [Edit(lp.name, 0, 1 if lp.type == "Convolution" else 0, index)]
    if lp.type == "InnerProduct":
        p = lp.inner_product_param
        if p.axis != 1:
            raise _Blocked(f"they feed InnerProduct '{lp.name}' with axis {p.axis}")
        rows = _expand(index, math.prod(shape[2:]))
        return [Edit(lp.name, 0, 0 if p.transpose else 1, rows)]
    raise _Blocked(f"they feed layer '{lp.name}' ({lp.type}), which must keep its input size")


def _channel_blobs(lp: caffe_pb2.LayerParameter, index: np.ndarray, ndim: int) -> list[Edit]:
    """Cuts in a per-channel layer's own blobs (BatchNorm, Scale, Bias, PReLU)."""
    if lp.type == "BatchNorm":
        return [Edit(lp.name, 0, 0, index), Edit(lp.name, 1, 0, index)]
    if lp.type == "PReLU":
        return [] if lp.prelu_param.channel_shared else [Edit(lp.name, 0, 0, index)]
    p = lp.scale_param if lp.type == "Scale" else lp.bias_param
    if len(lp.bottom) != 1:
        raise _Blocked(f"they feed {lp.type} '{lp.name}' with a second bottom")
    if p.axis % ndim != 1 or p.num_axes not in (0, 1):
        raise _Blocked(f"they feed {lp.type} '{lp.name}' with axis {p.axis}, num_axes {p.num_axes}")
    if p.num_axes == 0:
        return []
    n = 2 if lp.type == "Scale" and p.bias_term else 1
    return [Edit(lp.name, j, 0, index) for j in range(n)]


def _concat_axis(lp: caffe_pb2.LayerParameter) -> int:
    p = lp.concat_param
    return p.concat_dim if p.HasField("concat_dim") else p.axis


@dataclass
class _Trace:
    edits: list[Edit] = field(default_factory=list)
    partial_eltwise: set[str] = field(default_factory=set)
    problem: str | None = None


def _trace(members: set[str], channels: int, view: PhaseView) -> _Trace:
    """Follow the channels of `members` through one phase of the net."""
    out = _Trace()
    maps: dict[str, np.ndarray] = {}
    try:
        for lp in view.layers:
            carried = [(i, maps[b]) for i, b in enumerate(lp.bottom) if b in maps]
            if lp.name in members:
                for _, index in carried:
                    out.edits += _consumer_edits(lp, index, view.shapes[lp.bottom[0]])
                out.edits += _source_edits(lp, channels)
                maps[lp.top[0]] = _identity(channels)
                continue
            if not carried:
                continue
            for top, index in _through(lp, carried, view, out).items():
                maps[top] = index
        reached = sorted(b for b in maps if b in view.outputs)
        if reached:
            raise _Blocked(f"they reach net output '{reached[0]}', which keeps its size")
    except _Blocked as e:
        out.problem = str(e)
    return out


def _through(lp: caffe_pb2.LayerParameter, carried: list[tuple[int, np.ndarray]], view: PhaseView,
             out: _Trace) -> dict[str, np.ndarray]:
    """The channel map of each top of `lp`, given the maps of its carried bottoms; adds its cuts."""
    t = lp.type
    first = carried[0][1]
    shape = view.shapes[lp.bottom[carried[0][0]]]
    if t in ELEMENTWISE_TYPES or (t == "LRN" and lp.lrn_param.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL) \
            or (t == "MVN" and not lp.mvn_param.across_channels):
        return {top: first for top in lp.top}
    if t == "LRN":
        raise _Blocked(f"they feed LRN '{lp.name}' across channels, where removing any channel changes "
                       "its neighbours' outputs")
    if t in ("BatchNorm", "Scale", "Bias", "PReLU"):
        out.edits += _channel_blobs(lp, first, len(shape))
        return {top: first for top in lp.top}
    if t in ("Convolution", "Deconvolution", "InnerProduct"):
        out.edits += _consumer_edits(lp, first, shape)
        return {}
    if t == "Silence":
        return {}
    if t == "Flatten":
        p = lp.flatten_param
        end = p.end_axis % len(shape)
        if p.axis % len(shape) >= 2:
            return {lp.top[0]: first}
        if p.axis % len(shape) == 1 and end == len(shape) - 1:
            return {lp.top[0]: _expand(first, math.prod(shape[2:]))}
        raise _Blocked(f"they feed Flatten '{lp.name}' with axis {p.axis}, end_axis {p.end_axis}")
    if t == "Crop" and lp.crop_param.axis % len(shape) >= 2:
        return {lp.top[0]: first} if carried[0][0] == 0 else {}
    if t == "Concat":
        if _concat_axis(lp) % len(shape) != 1:
            raise _Blocked(f"they feed Concat '{lp.name}' along axis {_concat_axis(lp)}")
        offsets = np.cumsum([0] + [view.shapes[b][1] for b in lp.bottom])
        return {lp.top[0]: np.concatenate([index + offsets[i] for i, index in carried], axis=1)}
    if t == "Eltwise":
        if len(carried) < len(lp.bottom):
            out.partial_eltwise.add(lp.name)
            missing = [b for i, b in enumerate(lp.bottom) if i not in dict(carried)]
            raise _Blocked(f"Eltwise '{lp.name}' combines them with '{missing[0]}', which is not pruned with them")
        if any(not _same_map(index, first) for _, index in carried):
            raise _Blocked(f"Eltwise '{lp.name}' combines inputs whose channels do not line up")
        return {lp.top[0]: first}
    raise _Blocked(f"they feed layer '{lp.name}' ({t}), which must keep its input size")


def analyze(views: list[PhaseView]) -> Analysis:
    """Find the prunable groups of a net given one PhaseView per phase (TRAIN, TEST, ...).

    A group must be prunable in every phase its members appear in; its cuts are the union of
    the phases' cuts (a layer in several phases gets the same cut from each).
    """
    layers: dict[str, caffe_pb2.LayerParameter] = {}
    for view in views:
        for lp in view.layers:
            layers.setdefault(lp.name, lp)
    blocked: list[tuple[str, str]] = []
    candidates = []
    for name, lp in layers.items():
        if lp.type not in SOURCE_TYPES:
            continue
        problem = _source_problem(lp)
        if problem:
            blocked.append((name, problem))
        elif _num_output(lp) > 1:
            candidates.append(name)
    sharers = _sharers(layers)
    parent = {c: c for c in candidates}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    def union(names) -> bool:
        roots = sorted({find(n) for n in names})
        for r in roots[1:]:
            parent[r] = roots[0]
        return len(roots) > 1

    for names in sharers.values():  # layers sharing a parameter are pruned jointly
        union([n for n in names if n in parent])
    while True:
        groups: dict[str, list[str]] = {}
        for c in candidates:
            groups.setdefault(find(c), []).append(c)
        traces = {root: _trace_phases(members, layers, views) for root, members in groups.items()}
        at_eltwise: dict[str, list[str]] = {}
        for root, trace in traces.items():
            for e in trace.partial_eltwise:
                at_eltwise.setdefault(e, []).append(root)
        merged = False
        for roots in at_eltwise.values():  # groups meeting at an Eltwise are pruned jointly
            merged = union(roots) or merged
        if not merged:
            break
    result = []
    for root, members in groups.items():
        trace = traces[root]
        problem = trace.problem or _sharing_problem(trace.edits, layers, sharers)
        name = "+".join(members)
        if problem:
            blocked.append((name, problem))
        else:
            result.append(Group(tuple(members), _num_output(layers[members[0]]), trace.edits))
    return Analysis(result, blocked)


def _trace_phases(members: list[str], layers: dict[str, caffe_pb2.LayerParameter],
                  views: list[PhaseView]) -> _Trace:
    sizes = {_num_output(layers[m]) for m in members}
    if len(sizes) > 1:
        return _Trace(problem=f"layers pruned jointly ({', '.join(members)}) have different num_output")
    channels = sizes.pop()
    merged = _Trace()
    by_key: dict[tuple[str, int, int], Edit] = {}
    for view in views:
        present = {m for m in members if any(lp.name == m for lp in view.layers)}
        if not present:
            continue
        t = _trace(present, channels, view)
        merged.partial_eltwise |= t.partial_eltwise
        if t.problem and not merged.problem:
            merged.problem = t.problem
        for e in t.edits:
            key = (e.layer, e.blob, e.axis)
            if key not in by_key:
                by_key[key] = e
            elif not by_key[key].same_cut(e):
                merged.problem = merged.problem or f"layer '{e.layer}' would be cut differently in different phases"
    merged.edits = list(by_key.values())
    return merged


def _sharers(layers: dict[str, caffe_pb2.LayerParameter]) -> dict[str, list[str]]:
    """Parameter name -> the layers that use it, for parameters used by more than one layer."""
    users: dict[str, list[str]] = {}
    for name, lp in layers.items():
        for spec in lp.param:
            if spec.name:
                users.setdefault(spec.name, []).append(name)
    return {p: names for p, names in users.items() if len(names) > 1}


def _sharing_problem(edits: list[Edit], layers: dict[str, caffe_pb2.LayerParameter],
                     sharers: dict[str, list[str]]) -> str | None:
    """A shared parameter must get the same cut in every layer that uses it."""
    cut = {(e.layer, e.blob): e for e in edits}
    for (layer, j), e in cut.items():
        specs = layers[layer].param
        pname = specs[j].name if j < len(specs) else ""
        for other in sharers.get(pname, []):
            other_j = [k for k, s in enumerate(layers[other].param) if s.name == pname]
            if not all((other, k) in cut and cut[(other, k)].same_cut(e) for k in other_j):
                return f"layer '{layer}' shares parameter '{pname}' with '{other}', which would not get the same cut"
    return None
