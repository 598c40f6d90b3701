"""`mpicaffe test`: score a trained model (Caffe's `caffe test`), printing Caffe's lines."""
from __future__ import annotations

import logging

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.net import Net
from mpicaffe.backends.engine.precision import autocast_dtype
from mpicaffe.backends.engine.solver import net_output_values
from mpicaffe.logs import format_float
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)


def open_net(model: str, phase: int, device: str, level: int, stages: list[str] | tuple, precision: str,
             weights: str | None) -> Net:
    """The net of `model` for `phase` and NetState, on `device`, in `precision` (autocast as
    `train --precision`), with `weights` loaded if given: what `test` and `time` run."""
    param = prototxt.net_for_phase(prototxt.read_net(model), phase, level, tuple(stages), model)
    net = Net(param, device=device, source=model, retain_diffs=False)
    dtype = autocast_dtype(precision, net.device)
    if dtype is not None:
        log.info("Precision %s: the net runs under autocast to %s, as train --precision runs it", precision, dtype)
    net.set_autocast(dtype)
    if weights:
        snapshot_io.load_weights(net, weights)
    return net


def score(model: str, weights: str | None, iterations: int, device: str = "cpu", level: int = 0,
          stages: list[str] | tuple = (), precision: str = "fp32") -> list[tuple[str, float]]:
    """Run `iterations` TEST-phase forwards in `precision` (fp32, bf16, fp16: autocast, as `train
    --precision`); log each batch's outputs, the mean loss and the mean of each output element as
    `caffe test` does; return [(output name, mean)]."""
    net = open_net(model, caffe_pb2.TEST, device, level, stages, precision, weights)
    if not weights:
        log.warning("Running without trained weights: the scores are those of the initialized net")
    log.info("Running for %d iterations.", iterations)
    sums = None
    loss = np.float32(0)
    for i in range(iterations):
        with torch.no_grad():
            loss += np.float32(net.forward())
        names, values, loss_weights = net_output_values(net)
        sums = values.copy() if sums is None else sums + values
        for name, value in zip(names, values):
            log.info("Batch %d, %s = %s", i, name, format_float(value))
    log.info("Loss: %s", format_float(loss / np.float32(iterations)))
    means = (sums / np.float32(iterations)).astype(np.float32)
    for name, mean, w in zip(names, means, loss_weights):
        extra = f" (* {format_float(w)} = {format_float(np.float32(w) * mean)} loss)" if w else ""
        log.info("%s = %s%s", name, format_float(mean), extra)
    return [(name, float(m)) for name, m in zip(names, means)]
