"""Caffe's weight fillers (constant, uniform, gaussian with sparse, positive_unitball, xavier,
msra, bilinear), drawing from torch's global generator (seeded by the solver's random_seed)."""
from __future__ import annotations

import math

import torch

from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

VarianceNorm = caffe_pb2.FillerParameter


def _fans(t: torch.Tensor) -> tuple[int, int]:
    # Caffe: fan_in = count / shape(0); fan_out = count / shape(1) (count for 1-axis blobs)
    count = t.numel()
    fan_in = count // t.shape[0] if t.dim() else count
    fan_out = count // t.shape[1] if t.dim() > 1 else count
    return fan_in, fan_out


def _variance_n(t: torch.Tensor, p: caffe_pb2.FillerParameter) -> float:
    fan_in, fan_out = _fans(t)
    if p.variance_norm == VarianceNorm.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if p.variance_norm == VarianceNorm.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


@torch.no_grad()
def fill(t: torch.Tensor, p: caffe_pb2.FillerParameter) -> torch.Tensor:
    """Fill `t` in place as Caffe's filler of type `p.type` would; returns `t`."""
    kind = p.type
    if kind == "constant":
        t.fill_(p.value)
    elif kind == "uniform":
        t.uniform_(p.min, p.max)
    elif kind == "gaussian":
        t.normal_(p.mean, p.std)
        if p.sparse >= 0:
            if t.dim() < 1 or t.shape[0] == 0:
                raise UserError("gaussian filler with sparse needs a blob with at least one axis")
            # Caffe keeps each weight with probability sparse / num_outputs (shape[0])
            keep = torch.bernoulli(torch.full_like(t, p.sparse / t.shape[0]))
            t.mul_(keep)
    elif kind == "positive_unitball":
        t.uniform_(0.0, 1.0)
        rows = t.view(t.shape[0], -1) if t.dim() else t.view(1, -1)
        rows.div_(rows.sum(dim=1, keepdim=True))
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _variance_n(t, p))
        t.uniform_(-scale, scale)
    elif kind == "msra":
        t.normal_(0.0, math.sqrt(2.0 / _variance_n(t, p)))
    elif kind == "bilinear":
        if t.dim() != 4 or t.shape[2] != t.shape[3]:
            raise UserError("bilinear filler needs a 4-axis blob with square kernels (height == width)")
        k = t.shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        x = torch.arange(k, dtype=torch.float64)
        w = 1 - torch.abs(x / f - c)
        t.copy_((w.view(k, 1) * w.view(1, k)).to(t.dtype).expand_as(t))
    else:
        raise UserError(f"unknown filler type '{kind}' (known: constant, uniform, gaussian, "
                        "positive_unitball, xavier, msra, bilinear)")
    return t
