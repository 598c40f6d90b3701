"""`mpicaffe info`: the layers of a net as Caffe builds them for a phase."""
from __future__ import annotations

from mpicaffe import prototxt
from mpicaffe.proto import caffe_pb2


def describe(path: str, phase: str = "TRAIN", level: int = 0, stages: list[str] | tuple = ()) -> str:
    """Read, upgrade and filter the net at `path`; return a table of its layers."""
    phase_value = prototxt.phase_from_name(phase)
    net = prototxt.net_for_phase(prototxt.read_net(path), phase_value, level, tuple(stages), path)
    rows = [("#", "name", "type", "bottoms", "tops")]
    for i, layer in enumerate(net.layer):
        rows.append((str(i), layer.name, layer.type, ", ".join(layer.bottom), ", ".join(layer.top)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    state = f"phase {caffe_pb2.Phase.Name(phase_value)}"
    if level:
        state += f", level {level}"
    if stages:
        state += f", stages {', '.join(stages)}"
    lines = [f"Net '{net.name}' ({state}): {len(net.layer)} layers"]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines) + "\n"
