"""Activation (neuron) layers: one bottom, one top of the same shape, element by element.

Where Caffe's Backward_cpu is the true gradient of its forward, autograd supplies it (checked in
the tests, including at the kinks, e.g. ReLU at exactly 0). Where it is not (BNLL's clamped
exponent, Power's division by the input, Threshold's missing backward) a small autograd Function
states Caffe's backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


class _Neuron(Layer):
    """Caffe's NeuronLayer: exactly one bottom and one top, top shaped like the bottom."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def forward(self, bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.apply(bottoms[0])]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.apply")


def _caffe_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # Caffe's sigmoid formula, 0.5 * tanh(0.5 * x) + 0.5 (exactly 0 or 1 where tanh saturates);
    # in place, so only for use inside autograd Functions
    return torch.tanh(x * 0.5).mul_(0.5).add_(0.5)


@register
class ReLU(_Neuron):
    """Caffe's ReLU layer (leaky with negative_slope)."""

    type = "ReLU"

    def apply(self, x):
        slope = self.param.relu_param.negative_slope
        if slope == 0:
            return torch.relu(x)
        # leaky_relu's backward uses x > 0, as Caffe's: the gradient at exactly 0 is negative_slope
        return F.leaky_relu(x, slope)


@register
class PReLU(_Neuron):
    """Caffe's PReLU layer: a learned negative slope per channel (or one shared)."""

    type = "PReLU"

    def setup(self, bottoms):
        x = bottoms[0]
        if x.dim() < 2:
            raise self.error(f"the bottom must have at least 2 axes, got shape {tuple(x.shape)}")
        if x.dim() > 4:
            # Caffe reads the channel count through the legacy 4-axis accessor
            raise self.error(f"Caffe's PReLU takes at most 4 axes, got shape {tuple(x.shape)}")
        p = self.param.prelu_param
        shape = () if p.channel_shared else (x.shape[1],)
        if p.HasField("filler"):
            self.add_blob(shape, p.filler)
        else:
            self.add_blob(shape, value=0.25)

    def apply(self, x):
        slope = self.blobs[0].to(x.dtype)
        if slope.dim() == 0:
            slope = slope.reshape(1)
        elif x.shape[1] != slope.shape[0]:
            raise self.error(f"bottom has {x.shape[1]} channels but the slope blob has {slope.shape[0]}")
        # prelu's backward uses x > 0, as Caffe's: at exactly 0 the input gradient is the slope
        return F.prelu(x, slope)


@register
class ELU(_Neuron):
    """Caffe's ELU layer."""

    type = "ELU"

    def apply(self, x):
        # elu's backward takes the x <= 0 branch at 0 (gradient alpha), as Caffe's
        return F.elu(x, self.param.elu_param.alpha)


class _SigmoidFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = _caffe_sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


@register
class Sigmoid(_Neuron):
    """Caffe's Sigmoid layer."""

    type = "Sigmoid"

    def apply(self, x):
        return _SigmoidFn.apply(x)


@register
class TanH(_Neuron):
    """Caffe's TanH layer."""

    type = "TanH"

    def apply(self, x):
        return torch.tanh(x)


@register
class AbsVal(_Neuron):
    """Caffe's AbsVal layer."""

    type = "AbsVal"

    def setup(self, bottoms):
        if self.param.top[0] == self.param.bottom[0]:
            raise self.error("AbsVal does not allow in-place computation (top and bottom are the same blob)")

    def apply(self, x):
        # abs's backward is sign(x), 0 at 0, as Caffe's caffe_cpu_sign
        return torch.abs(x)


_BNLL_THRESHOLD = 50.0


class _BNLLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # Caffe's BNLL backward clamps the exponent at 50
        e = torch.exp(torch.clamp(x, max=_BNLL_THRESHOLD))
        return g * e / (e + 1)


@register
class BNLL(_Neuron):
    """Caffe's BNLL layer: log(1 + exp(x))."""

    caffe_in_place_backward_is_wrong = True

    type = "BNLL"

    def apply(self, x):
        return _BNLLFn.apply(x)


class _PowerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, power, scale, shift):
        diff_scale = power * scale
        ctx.consts = (power, scale, shift, diff_scale)
        if diff_scale == 0:
            # Caffe: the input is ignored; the output is 1 (power 0) or shift^power
            value = torch.full_like(x, 1.0) if power == 0 else torch.full_like(x, shift).pow_(power)
            return value
        y = x
        if scale != 1:
            y = y * scale
        if shift != 0:
            y = y + shift
        if power != 1:
            y = torch.pow(y, power)
        elif y is x:
            y = x.clone()
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        power, scale, shift, diff_scale = ctx.consts
        if diff_scale == 0:
            return torch.zeros_like(g), None, None, None
        x, y = ctx.saved_tensors
        # Caffe's PowerLayer::Backward_cpu, case by case (power 2 expanded; otherwise divides
        # the output by the base, so a zero base gives NaN or inf where the true gradient is finite)
        if power == 1:
            d = g * diff_scale
        elif power == 2:
            d = x * (diff_scale * scale)
            if shift != 0:
                d = d + diff_scale * shift
            d = g * d
        elif shift == 0:
            d = g * (y / x * power)
        else:
            base = x * scale if scale != 1 else x
            d = y / (base + shift)
            if diff_scale != 1:
                d = d * diff_scale
            d = g * d
        return d, None, None, None


@register
class Power(_Neuron):
    """Caffe's Power layer: (shift + scale * x) ^ power."""

    caffe_in_place_backward_is_wrong = True

    type = "Power"

    def apply(self, x):
        p = self.param.power_param
        return _PowerFn.apply(x, p.power, p.scale, p.shift)


def _log_base(layer: Layer, base: float) -> float:
    """Caffe's Exp/Log base check: -1 means e (log base exactly 1), else base must be > 0."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}")
    log_base = math.log(base)
    if math.isinf(log_base) or math.isnan(log_base):
        raise layer.error(f"log(base) = log({base}) is not finite")
    return log_base


@register
class Exp(_Neuron):
    """Caffe's Exp layer: base ^ (shift + scale * x)."""

    type = "Exp"

    def setup(self, bottoms):
        self._constants()

    def _constants(self) -> tuple[float, float]:
        p = self.param.exp_param
        log_base = _log_base(self, p.base)
        inner = log_base * p.scale
        if p.shift == 0:
            outer = 1.0
        elif p.base == -1:
            outer = math.exp(p.shift)
        else:
            outer = math.pow(p.base, p.shift)
        return inner, outer

    def apply(self, x):
        inner, outer = self._constants()
        y = torch.exp(x if inner == 1 else x * inner)
        return y if outer == 1 else y * outer


@register
class Log(_Neuron):
    """Caffe's Log layer: log_base(shift + scale * x)."""

    caffe_in_place_backward_is_wrong = True

    type = "Log"

    def setup(self, bottoms):
        self._base_scale()

    def _base_scale(self) -> float:
        log_base = _log_base(self, self.param.log_param.base)
        if log_base == 0:
            raise self.error(f"1/log(base) is infinite for base {self.param.log_param.base}")
        return 1.0 / log_base

    def apply(self, x):
        p = self.param.log_param
        base_scale = self._base_scale()
        y = x
        if p.scale != 1:
            y = y * p.scale
        if p.shift != 0:
            y = y + p.shift
        y = torch.log(y)
        return y if base_scale == 1 else y * base_scale


class _ThresholdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, message):
        ctx.message = message
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        raise UserError(ctx.message)


@register
class Threshold(_Neuron):
    """Caffe's Threshold layer: 1 where x > threshold, else 0."""

    type = "Threshold"

    def apply(self, x):
        # Caffe's ThresholdLayer has no backward (NOT_IMPLEMENTED aborts): error if a gradient
        # has to pass through it
        message = str(self.error(
            "has no backward in Caffe, but a gradient reached it; set propagate_down: false on "
            "this layer or keep it off the path to the loss"))
        return _ThresholdFn.apply(x, self.param.threshold_param.threshold, message)


@register
class Clip(_Neuron):
    """Caffe's Clip layer: max(min, min(x, max))."""

    caffe_in_place_backward_is_wrong = True

    type = "Clip"

    def setup(self, bottoms):
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max (required fields in caffe.proto)")

    def apply(self, x):
        p = self.param.clip_param
        lo, hi = p.min, p.max
        if lo <= hi:
            # clamp's backward passes the gradient where min <= x <= max, as Caffe's
            return torch.clamp(x, lo, hi)
        # Caffe with min > max: max(min, min(x, max)) is min everywhere, gradient 0
        return torch.clamp_max(x, hi).clamp_min(lo)


class _SwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        s = _caffe_sigmoid(x * beta if beta != 1 else x)
        y = x * s
        ctx.beta = beta
        ctx.save_for_backward(s, y)
        return y

    @staticmethod
    def backward(ctx, g):
        s, y = ctx.saved_tensors
        by = y * ctx.beta if ctx.beta != 1 else y
        return g * (by + s * (1 - by)), None


@register
class Swish(_Neuron):
    """Caffe's Swish layer: x * sigmoid(beta * x)."""

    type = "Swish"

    def apply(self, x):
        return _SwishFn.apply(x, self.param.swish_param.beta)


@register
class Dropout(_Neuron):
    """Caffe's Dropout layer: in TRAIN, keep with probability 1 - ratio and scale by 1/(1 - ratio)."""

    type = "Dropout"

    def setup(self, bottoms):
        ratio = self.param.dropout_param.dropout_ratio
        if not 0 <= ratio < 1:
            raise self.error(f"dropout_ratio must be in [0, 1), got {ratio}")

    def apply(self, x):
        if self.phase != caffe_pb2.TRAIN:
            return x.view_as(x)
        ratio = self.param.dropout_param.dropout_ratio
        # the mask comes from torch's global generator, seeded by the solver's random_seed
        mask = torch.empty_like(x).bernoulli_(1.0 - ratio)
        return x * mask.mul_(1.0 / (1.0 - ratio))

    def infer_tops(self, bottoms):
        return [torch.zeros_like(bottoms[0])]
