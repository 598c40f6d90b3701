"""What pruning did: parameters and multiply-adds per layer and in total, and test scores.

Parameters are the learnable blobs each layer owns (as `mpicaffe info` counts them, BatchNorm
statistics included); multiply-adds are those of Convolution, Deconvolution and InnerProduct
layers per input image (`mpicaffe info`'s FLOPs / 2 / batch), measured on the TEST net.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mpicaffe.backends.engine.solver import net_output_values
from mpicaffe.info import MULTIPLY_ADD_TYPES, layer_costs
from mpicaffe.logs import format_float


@dataclass
class LayerCost:
    name: str
    type: str
    params: int
    macs: int  # per image


def net_costs(net) -> list[LayerCost]:
    """Parameters and multiply-adds per image of each layer of an engine net."""
    out = []
    for layer, (params, flops) in zip(net.layers, layer_costs(net)):
        batch = net.blobs[layer.param.bottom[0]].shape[0] if layer.param.bottom else 1
        macs = flops // 2 // max(batch, 1) if layer.type in MULTIPLY_ADD_TYPES else 0
        out.append(LayerCost(layer.name, layer.type, params, macs))
    return out


def evaluate(net, iterations: int) -> list[tuple[str, float]]:
    """Mean of each output element of `net` over `iterations` forward passes (as `caffe test`)."""
    sums = None
    names: list[str] = []
    for _ in range(iterations):
        with torch.no_grad():
            net.forward()
        names, values, _ = net_output_values(net)
        sums = values.astype(np.float64) if sums is None else sums + values
    return [(n, float(s / iterations)) for n, s in zip(names, sums)]


@dataclass
class Report:
    """Before/after figures of one pruning run (written as text and as JSON)."""

    before: list[LayerCost]
    after: list[LayerCost]
    channels: dict[str, tuple[int, int]]  # pruned layer -> (num_output before, after)
    blocked: list[tuple[str, str]]
    criterion: str
    scores: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # "before"/"after"/...

    def totals(self) -> dict[str, int]:
        return {"params_before": sum(c.params for c in self.before), "params_after": sum(c.params for c in self.after),
                "macs_before": sum(c.macs for c in self.before), "macs_after": sum(c.macs for c in self.after)}

    def to_json(self) -> dict:
        return {"criterion": self.criterion, "totals": self.totals(),
                "layers": [{"name": b.name, "type": b.type, "params": [b.params, a.params], "macs": [b.macs, a.macs],
                            "num_output": list(self.channels.get(b.name, ()))}
                           for b, a in self._pairs()],
                "left_whole": [{"layers": n, "reason": r} for n, r in self.blocked],
                "scores": {k: dict(v) for k, v in self.scores.items()}}

    def _pairs(self):
        after = {c.name: c for c in self.after}
        return [(b, after.get(b.name, LayerCost(b.name, b.type, 0, 0))) for b in self.before
                if b.params or b.macs]

    def text(self) -> str:
        rows = [("layer", "type", "num_output", "params before", "params after", "MACs/image before",
                 "MACs/image after")]
        for b, a in self._pairs():
            n = self.channels.get(b.name)
            rows.append((b.name, b.type, f"{n[0]} -> {n[1]}" if n else "", f"{b.params:,}", f"{a.params:,}",
                         f"{b.macs:,}", f"{a.macs:,}"))
        t = self.totals()
        rows.append(("total", "", "", f"{t['params_before']:,}", f"{t['params_after']:,}", f"{t['macs_before']:,}",
                     f"{t['macs_after']:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"Parameters: {_ratio(t['params_before'], t['params_after'])}; multiply-adds per image: "
                     f"{_ratio(t['macs_before'], t['macs_after'])} (criterion {self.criterion})")
        for name, why in self.blocked:
            lines.append(f"Left whole: {name}: {why}")
        for label, values in self.scores.items():
            lines.append(f"Test scores {label}: " + ", ".join(f"{n} = {format_float(v)}" for n, v in values))
        return "\n".join(lines) + "\n"


def _ratio(before: int, after: int) -> str:
    if not after:
        return f"{before:,} -> {after:,}"
    return f"{before:,} -> {after:,} ({before / after:.2f}x fewer, {100 * (1 - after / before):.1f}% removed)" \
        if before else "0 -> 0"
