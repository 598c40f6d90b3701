"""`mpicaffe info`: the layers of a net as Caffe builds them for a phase, with shapes and costs.

Output shapes, parameter counts and forward FLOPs come from building the net with the built-in
engine (which needs the net's data sources). A net that cannot be built (as Caffe would refuse
it, or with a data source missing) gets the layer list alone and the reason as an error; without
torch installed, the layer list alone. FLOPs count a multiply-add as 2 for Convolution, Deconvolution and InnerProduct,
and one operation per output element for other layers (data layers: 0).
"""
from __future__ import annotations

import math

from mpicaffe import prototxt
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

MULTIPLY_ADD_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


def _layer_flops(layer, bottom_shapes, top_shapes) -> int:
    if not bottom_shapes:
        return 0
    if layer.type in MULTIPLY_ADD_TYPES and layer.blobs:
        weight = layer.blobs[0]
        if layer.type == "Deconvolution":
            # each input element meets num_output/group * kernel weights
            per_input = math.prod(weight.shape[1:])
            return 2 * math.prod(bottom_shapes[0]) * per_input
        # each output element is a dot product over the weight's fan-in
        fan_in = weight.shape[0] if layer.type == "InnerProduct" and layer.param.inner_product_param.transpose \
            else math.prod(weight.shape[1:])
        return 2 * sum(math.prod(s) for s in top_shapes) * fan_in
    return sum(math.prod(s) for s in top_shapes)


def layer_costs(engine_net) -> list[tuple[int, int]]:
    """(learnable parameters owned, forward FLOPs per batch) of each layer of a built engine net."""
    out = []
    for layer in engine_net.layers:
        top_shapes = [engine_net.blobs[t].shape for t in layer.param.top]
        bottom_shapes = [engine_net.blobs[b].shape for b in layer.param.bottom]
        n_params = sum(engine_net.blob_owner(layer.name, j)[1] and b.numel() for j, b in enumerate(layer.blobs))
        out.append((n_params, _layer_flops(layer, bottom_shapes, top_shapes)))
    return out


def describe(path: str, phase: str = "TRAIN", level: int = 0, stages: list[str] | tuple = ()) -> tuple[str, str]:
    """Read, upgrade and filter the net at `path`; return a table of its layers, and why the net
    cannot be built ("" when it can, or when torch is missing)."""
    phase_value = prototxt.phase_from_name(phase)
    net_param = prototxt.net_for_phase(prototxt.read_net(path), phase_value, level, tuple(stages), path)
    rows = [("#", "name", "type", "bottoms", "tops", "top shapes", "params", "FLOPs")]
    engine_net, error, why = None, "", ""
    try:
        from mpicaffe.backends.engine.net import Net

        engine_net = Net(net_param, source=path, retain_diffs=False)
    except ImportError as e:
        why = f"the built-in engine, which needs torch: {e}"
    except UserError as e:
        error = str(e)
        why = "the net built, and it cannot be"
    total_params = total_flops = 0
    costs = layer_costs(engine_net) if engine_net is not None else []
    for i, layer in enumerate(net_param.layer):
        shapes = params = flops = ""
        if engine_net is not None:
            top_shapes = [engine_net.blobs[t].shape for t in layer.top]
            shapes = " ".join("x".join(map(str, s)) or "scalar" for s in top_shapes)
            n_params, n_flops = costs[i]
            total_params += n_params
            total_flops += n_flops
            params, flops = f"{n_params:,}", f"{n_flops:,}"
        rows.append((str(i), layer.name, layer.type, ", ".join(layer.bottom), ", ".join(layer.top),
                     shapes, params, flops))
    if engine_net is None:
        rows = [r[:5] for r in rows]
    else:
        engine_net.close()
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    state = f"phase {caffe_pb2.Phase.Name(phase_value)}"
    if level:
        state += f", level {level}"
    if stages:
        state += f", stages {', '.join(stages)}"
    lines = [f"Net '{net_param.name}' ({state}): {len(net_param.layer)} layers"]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    if engine_net is None:
        lines.append(f"(shapes, parameters and FLOPs need {why})")
    else:
        lines.append(f"Total: {total_params:,} learnable parameters, {total_flops:,} forward FLOPs per batch")
    return "\n".join(lines) + "\n", error
