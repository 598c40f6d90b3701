"""`mpicaffe time`: per-layer forward and backward times of a net (Caffe's `caffe time`).

Forward times are those of each layer inside the net's forward pass. The engine backpropagates the
whole net at once (autograd), so the backward pass is timed whole, and each layer's backward time
is measured separately: the layer is run again on a copy of its inputs and only its backward is
timed. Lines follow Caffe's format.
"""
from __future__ import annotations

import logging
import time

import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.logs import format_float
from mpicaffe.score import open_net

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_backward_seconds(net: Net, i: int, bottoms: list[torch.Tensor], device: torch.device) -> float:
    """Run layer i on detached copies of its bottoms and time only its backward."""
    inputs = [b.detach().requires_grad_(b.requires_grad) if b.is_floating_point() else b.detach()
              for b in bottoms]
    tops = [t for t in net.run_layer_alone(i, inputs) if t.requires_grad]
    if not tops:
        return 0.0
    grads = [torch.ones_like(t) for t in tops]
    _sync(device)
    start = time.perf_counter()
    torch.autograd.backward(tops, grads)
    _sync(device)
    return time.perf_counter() - start


def time_net(model: str, iterations: int = 50, phase: str = "TRAIN", device: str = "cpu",
             weights: str | None = None, level: int = 0, stages: list[str] | tuple = (),
             precision: str = "fp32") -> dict:
    """Time `iterations` forward-backward passes in `precision` (fp32, bf16, fp16: autocast, as
    `train --precision`); log Caffe's report and return the figures (ms)."""
    net = open_net(model, prototxt.phase_from_name(phase), device, level, stages, precision, weights)
    dev = net.device
    log.info("Performing Forward")
    log.info("Initial loss: %s", format_float(net.forward()))
    log.info("Performing Backward")
    net.backward()
    n = len(net.layers)
    fwd, bwd = [0.0] * n, [0.0] * n
    fwd_total = bwd_total = 0.0
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    total = 0.0
    for j in range(iterations):
        iter_start = time.perf_counter()
        bottoms_seen = []
        for i in range(n):
            bottoms_seen.append([net.blobs[b].tensor for b in net._bottom_names[i]])
            start = time.perf_counter()
            net.forward(i, i)
            _sync(dev)
            fwd[i] += time.perf_counter() - start
        fwd_total += time.perf_counter() - iter_start
        start = time.perf_counter()
        net.backward()
        _sync(dev)
        bwd_total += time.perf_counter() - start
        total += time.perf_counter() - iter_start
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1,
                 format_float((time.perf_counter() - iter_start) * 1e3))
        for i, layer in enumerate(net.layers):
            if not getattr(layer, "holds_inputs", False) and net._bottom_names[i]:
                bwd[i] += _layer_backward_seconds(net, i, bottoms_seen[i], dev)
    log.info("Average time per layer: ")
    per_layer = {}
    for i, name in enumerate(net.layer_names):
        f, b = fwd[i] * 1e3 / iterations, bwd[i] * 1e3 / iterations
        per_layer[name] = (f, b)
        log.info("%10s\tforward: %s ms.", name, format_float(f))
        log.info("%10s\tbackward: %s ms.", name, format_float(b))
    report = {
        "forward_ms": fwd_total * 1e3 / iterations,
        "backward_ms": bwd_total * 1e3 / iterations,
        "forward_backward_ms": (fwd_total + bwd_total) * 1e3 / iterations,
        "per_layer_ms": per_layer,
    }
    log.info("Average Forward pass: %s ms.", format_float(report["forward_ms"]))
    log.info("Average Backward pass: %s ms.", format_float(report["backward_ms"]))
    log.info("Average Forward-Backward: %s ms.", format_float(report["forward_backward_ms"]))
    log.info("Total Time: %s ms.", format_float(total * 1e3))
    log.info("*** Benchmark ends ***")
    return report
