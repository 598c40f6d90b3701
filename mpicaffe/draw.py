"""Drawing a net as a graph, as pycaffe's `caffe.draw`: layers are boxes, blobs octagons.

`get_pydot_graph(net, rankdir)` builds the pydot graph pycaffe builds (same nodes, labels,
colors and edges); `draw_net` renders it with graphviz's `dot`, `draw_net_to_file` writes the
format the file name ends with (png, svg, pdf, dot, ...). Needs pydot (`pip install pydot`, or
the `draw` extra) and graphviz's `dot` program; this module imports only protobuf and, when a
graph is built, pydot, so that `mpicaffe draw` stays light.
"""
from __future__ import annotations

import importlib.util
import shutil

from mpicaffe.proto import caffe_pb2

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

_LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                 "InnerProduct": "#CC33FF"}
_LEARNING_LAYERS = ("Convolution", "Deconvolution", "InnerProduct")
_NO_LABEL = '""'

PYDOT_MISSING = "drawing a net needs pydot: pip install pydot (or the mpicaffe[draw] extra)"
DOT_MISSING = "drawing a net needs graphviz's dot program on PATH: install graphviz (apt-get install graphviz)"
# graphviz's output formats that draw_net_to_file is asked for most (any `dot -T` format works)
FORMATS = ("png", "svg", "pdf", "dot", "gv", "xdot", "ps", "eps", "jpg", "jpeg", "gif", "svgz", "json", "plain")


def _pydot():
    try:
        import pydot
    except ImportError:
        raise ImportError(PYDOT_MISSING) from None
    return pydot


def cannot_draw_to(filename: str) -> str | None:
    """Why `draw_net_to_file(net, filename)` cannot run here, in one line (no pydot, no graphviz,
    an extension that names no format), or None when it can."""
    ext = filename.rpartition(".")[2].lower() if "." in filename else ""
    if ext not in FORMATS:
        return f"{filename}: the extension names the format: one of .{', .'.join(FORMATS)}"
    if importlib.util.find_spec("pydot") is None:
        return PYDOT_MISSING
    if shutil.which("dot") is None:
        return DOT_MISSING
    return None


def get_pooling_types_dict() -> dict[int, str]:
    """{0: "MAX", 1: "AVE", 2: "STOCHASTIC"}: Pooling's methods by number."""
    return {v.number: v.name for v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values}


def get_edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """The label of the edges leaving a layer: a Data layer's batch, a learning layer's outputs."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return _NO_LABEL


def get_layer_lr_mult(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    """(weights, bias) lr_mult of a Convolution, Deconvolution or InnerProduct layer (1.0 unset)."""
    if layer.type not in _LEARNING_LAYERS:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    mults = [p.lr_mult for p in layer.param]
    if len(mults) > 2:
        raise ValueError(f"Could not parse the learning rate multiplier of {layer.name}: "
                         f"{len(mults)} param blocks, expected at most 2")
    return tuple(mults + [1.0] * (2 - len(mults)))


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False) -> str:
    """A layer's node label, quoted for dot: name, (type), the kernel/stride/pad of spatial
    layers and, with display_lrm, the lr_mult of learning layers. Lines are separated by a
    space when the graph runs vertically (TB, BT), else by a line break."""
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    if layer.type == "Pooling":
        kind = f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})"
    else:
        kind = f"({layer.type})"
    parts = [layer.name, kind]
    if layer.type == "Pooling":
        p = layer.pooling_param
        parts.append(_spatial(separator, p.kernel_size, p.stride, p.pad))
    elif layer.type in ("Convolution", "Deconvolution"):
        c = layer.convolution_param
        parts.append(_spatial(separator, c.kernel_size[0] if c.kernel_size else 1,
                              c.stride[0] if c.stride else 1, c.pad[0] if c.pad else 0))
    if display_lrm and layer.type in _LEARNING_LAYERS:
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    # quoted, or dot would read the colons as ports
    return '"' + separator.join(parts) + '"'


def _spatial(separator: str, kernel: int, stride: int, pad: int) -> str:
    return separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"])


def choose_color_by_layertype(layertype: str) -> str:
    """A layer's fill color: red for convolutions, orange pooling, violet inner products, else blue."""
    return _LAYER_COLORS.get(layertype, LAYER_STYLE_DEFAULT["fillcolor"])


def _in_phase(layer: caffe_pb2.LayerParameter, phase: int | None) -> bool:
    """pycaffe's phase test for drawing: only the phase of include/exclude rules counts."""
    if phase is None:
        return True
    if layer.include and layer.exclude:
        raise ValueError(f"layer {layer.name} has both include and exclude specified.")
    included = not layer.include or any(rule.phase == phase for rule in layer.include)
    return included and not any(rule.phase == phase for rule in layer.exclude)


def get_pydot_graph(caffe_net: caffe_pb2.NetParameter, rankdir: str, label_edges: bool = True,
                    phase: int | None = None, display_lrm: bool = False):
    """The net as a pydot graph: a box per layer (in its phase, or all with phase None), an
    octagon per blob, edges from bottoms to layers to tops, laid out in direction `rankdir`."""
    pydot = _pydot()
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes: dict = {}  # key -> pydot.Node; a key drawn again keeps its place and takes the new node
    edges = []
    for layer in caffe_net.layer:
        if not _in_phase(layer, phase):
            continue
        key = f"{layer.name}_{layer.type}"
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        style = NEURON_LAYER_STYLE if in_place else dict(LAYER_STYLE_DEFAULT,
                                                         fillcolor=choose_color_by_layertype(layer.type))
        nodes[key] = pydot.Node(label, **style)
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = pydot.Node(bottom, **BLOB_STYLE)
            edges.append((bottom + "_blob", key, _NO_LABEL))
        for top in layer.top:
            # pycaffe styles a blob only where a layer reads it: an output nothing reads is plain
            nodes[top + "_blob"] = pydot.Node(top)
            edges.append((key, top + "_blob", get_edge_label(layer) if label_edges else _NO_LABEL))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def draw_net(caffe_net: caffe_pb2.NetParameter, rankdir: str, ext: str = "png", phase: int | None = None,
             display_lrm: bool = False) -> bytes:
    """The net drawn by graphviz in format `ext` (png, svg, pdf, dot, ...), as bytes."""
    return get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm).create(format=ext)


def draw_net_to_file(caffe_net: caffe_pb2.NetParameter, filename: str, rankdir: str = "LR",
                     phase: int | None = None, display_lrm: bool = False) -> None:
    """Draw the net into `filename`, in the format its extension names (`.png`, `.svg`, `.dot`)."""
    ext = filename[filename.rfind(".") + 1:].lower()
    image = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as f:
        f.write(image)


__all__ = [
    "BLOB_STYLE",
    "FORMATS",
    "LAYER_STYLE_DEFAULT",
    "NEURON_LAYER_STYLE",
    "cannot_draw_to",
    "choose_color_by_layertype",
    "draw_net",
    "draw_net_to_file",
    "get_edge_label",
    "get_layer_label",
    "get_layer_lr_mult",
    "get_pooling_types_dict",
    "get_pydot_graph",
]
