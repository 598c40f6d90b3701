"""Vision layers: Convolution, Deconvolution, InnerProduct and Im2col (pooling is in pooling.py).

Shapes follow Caffe's rules exactly (C++ integer division in the convolution rule). torch's
convolution kernels compute the common cases; where their window rule differs from Caffe's (a
convolution window that sticks out past the padded input) the input is padded explicitly so that
torch sees exactly Caffe's windows. Autograd gives the backward everywhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer, check_axis
from mpicaffe.proto import caffe_pb2

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# Convolution runs channels-last from this batch size on. Below it, oneDNN's channels-last
# backward is slower (VGG-16 at batch 2: 0.86x); with one image, torch's batch_norm backward
# also miscomputes a channels-last tensor whose batch stride is not C*H*W, which a 1x1
# convolution of one image returns (torch 2.13)
CHANNELS_LAST_MIN_BATCH = 4


# --- shape rules (pure functions) ---
def _c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def conv_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    """Caffe's convolution (and im2col) output size, with C++ truncating division."""
    extent = dilation * (kernel - 1) + 1
    return _c_div(size + 2 * pad - extent, stride) + 1


def deconv_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    """Caffe's deconvolution output size."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


# --- im2col in any number of spatial axes ---
def _im2col(x: torch.Tensor, kernel, stride, pad, dilation, out, value: float = 0) -> torch.Tensor:
    """Caffe's column layout: (B, C, *spatial) -> (B, C * prod(kernel), prod(out)).

    Positions outside the input read `value`. The input is padded (or cropped) on the far side so
    that exactly `out` windows fit, which also covers Caffe's truncated-division windows that reach
    past the padded input.
    """
    n = len(kernel)
    b, c = x.shape[:2]
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    pads: list[int] = []
    for i in reversed(range(n)):
        pads += [pad[i], (out[i] - 1) * stride[i] + extents[i] - x.shape[2 + i] - pad[i]]
    if any(pads):
        x = F.pad(x, pads, value=value)
    for i in range(n):
        # each unfold appends one window axis at the end
        x = x.unfold(2 + i, extents[i], stride[i])
        if dilation[i] != 1:
            x = x[..., ::dilation[i]]
    perm = [0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n)]
    return x.permute(perm).reshape(b, c * math.prod(kernel), math.prod(out))


def _col2im_index(in_shape, kernel, stride, pad, dilation, out, device) -> torch.Tensor:
    """For each (kernel offset, column) of _im2col on an `in_shape` image: the flat image index it
    reads, or prod(in_shape) where it reads padding."""
    total = math.prod(in_shape)
    pos = torch.arange(total, dtype=torch.int64, device=device).reshape(1, 1, *in_shape)
    idx = _im2col(pos, kernel, stride, pad, dilation, out, value=-1)[0]
    return torch.where(idx < 0, torch.full_like(idx, total), idx)


# --- convolution ---
def _spatial_values(layer: Layer, p, name: str, repeated: str, n_sp: int, default: int | None) -> list[int]:
    """One value per spatial axis from `repeated` (once, or once per axis) or from name_h/name_w."""
    values = list(getattr(p, repeated))
    h, w = f"{name}_h", f"{name}_w"
    if p.HasField(h) or p.HasField(w):
        if n_sp != 2:
            raise layer.error(f"{h} and {w} can only be used for 2-D convolution ({n_sp} spatial axes here)")
        if values:
            raise layer.error(f"give either {repeated} or {h}/{w}, not both")
        return [getattr(p, h), getattr(p, w)]
    allowed = {1, n_sp} if default is None else {0, 1, n_sp}
    if len(values) not in allowed:
        raise layer.error(f"{repeated} must be given once or once per spatial axis "
                          f"(given {len(values)} times; {n_sp} spatial axes)")
    return [default if not values else values[0 if len(values) == 1 else i] for i in range(n_sp)]


def _conv_geometry(layer: Layer, p: caffe_pb2.ConvolutionParameter, n_sp: int):
    """Caffe's kernel/stride/pad/dilation per spatial axis, with its checks."""
    kernel = _spatial_values(layer, p, "kernel", "kernel_size", n_sp, None)
    if any(k <= 0 for k in kernel):
        raise layer.error(f"kernel dimensions must be nonzero, got {kernel}")
    stride = _spatial_values(layer, p, "stride", "stride", n_sp, 1)
    if any(s <= 0 for s in stride):
        raise layer.error(f"stride dimensions must be nonzero, got {stride}")
    pad = _spatial_values(layer, p, "pad", "pad", n_sp, 0)
    dilation = list(p.dilation)
    if len(dilation) not in (0, 1, n_sp):
        raise layer.error(f"dilation must be given once or once per spatial axis "
                          f"(given {len(dilation)} times; {n_sp} spatial axes)")
    dilation = [1 if not dilation else dilation[0 if len(dilation) == 1 else i] for i in range(n_sp)]
    if any(d <= 0 for d in dilation):
        raise layer.error(f"dilation must be positive, got {dilation}")
    return kernel, stride, pad, dilation


class _ConvolutionBase(Layer):
    """Caffe's BaseConvolutionLayer: each bottom gives one top, all with the same filters."""

    min_bottoms = 1
    min_tops = 1
    reverse = False  # Deconvolution: the roles of input and output channels swap

    def setup(self, bottoms):
        if len(self.param.bottom) != len(self.param.top):
            raise self.error(f"needs as many tops as bottoms, got {len(self.param.bottom)} bottom(s) "
                             f"and {len(self.param.top)} top(s)")
        p = self.param.convolution_param
        x = bottoms[0]
        self.channel_axis = check_axis(self, p.axis, x.dim())
        self.n_sp = x.dim() - self.channel_axis - 1
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, p, self.n_sp)
        self.channels = x.shape[self.channel_axis]
        if p.num_output <= 0:
            raise self.error("num_output must be positive")
        if p.group <= 0:
            raise self.error("group must be positive")
        if self.channels % p.group:
            raise self.error(f"the bottom's {self.channels} channels are not divisible by group {p.group}")
        if p.num_output % p.group:
            raise self.error(f"num_output {p.num_output} is not a multiple of group {p.group}")
        out_c, in_c = (self.channels, p.num_output) if self.reverse else (p.num_output, self.channels)
        self.add_blob((out_c, in_c // p.group, *self.kernel), p.weight_filler)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)
        for b in bottoms:
            self.output_shape(b)

    def output_shape(self, x: torch.Tensor) -> list[int]:
        """Spatial output shape for bottom `x`, with Caffe's checks."""
        if x.dim() != self.channel_axis + 1 + self.n_sp:
            raise self.error(f"the bottom's number of axes may not change (now shape {tuple(x.shape)})")
        if x.shape[self.channel_axis] != self.channels:
            raise self.error(f"input size incompatible with the convolution kernel: {self.channels} "
                             f"channels expected, bottom shape {tuple(x.shape)}")
        size = deconv_output_size if self.reverse else conv_output_size
        sizes = x.shape[self.channel_axis + 1:]
        out = [size(*a) for a in zip(sizes, self.kernel, self.pad, self.stride, self.dilation)]
        if any(o <= 0 for o in out):
            raise self.error(f"output would be empty: bottom spatial shape {tuple(sizes)}, kernel "
                             f"{self.kernel}, pad {self.pad}, stride {self.stride}, dilation {self.dilation}")
        return out

    def forward(self, bottoms):
        if any(b.shape != bottoms[0].shape for b in bottoms):
            raise self.error("all bottoms must have the same shape")
        return [self.apply(b) for b in bottoms]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output_shape(x)
        p = self.param.convolution_param
        lead = x.shape[:self.channel_axis]
        x2 = x.reshape(-1, self.channels, *x.shape[self.channel_axis + 1:])
        weight = self.blobs[0].to(x.dtype)
        bias = self.blobs[1].to(x.dtype) if p.bias_term else None
        y = self.compute(x2, weight, bias, out, p.group)
        return y.reshape(*lead, p.num_output, *out)

    def compute(self, x, weight, bias, out, group):
        raise NotImplementedError


@register
class Convolution(_ConvolutionBase):
    """Caffe's Convolution layer (1 to N spatial axes, groups, dilation)."""

    type = "Convolution"

    def _conv2d_channels_last(self, x, weight, bias, pad, group):
        """2-D convolution in channels-last layout, input and top: oneDNN runs it without
        reordering, and the top stays channels-last through ReLU, BatchNorm, Eltwise and Pooling,
        whose kernels are vectorized over channels only in that layout (max pooling 10x faster).
        Measured, TRAIN step at batch 8 or more: 1.04x (ResNet-50) to 1.3x (CIFAR-10-quick,
        ResNet-20, SqueezeNet, MobileNet-v2) faster."""
        x = x.contiguous(memory_format=torch.channels_last)
        if (x.shape[1] == 1 and group == 1 and self.stride == [1, 1] and self.dilation == [1, 1]
                and weight.requires_grad and torch.is_grad_enabled()):
            y = _OneChannelConv2dFn.apply(x, weight, bias, pad)
        else:
            y = F.conv2d(x, weight, bias, self.stride, pad, self.dilation, group)
        # a one-channel input is also contiguous, and oneDNN then returns the top contiguous
        # (LeNet: 1.15x faster with its pooling in channels-last)
        return y.contiguous(memory_format=torch.channels_last)

    def compute(self, x, weight, bias, out, group):
        sizes = x.shape[2:]
        if self.n_sp in _CONV:
            pad = list(self.pad)
            # C++ truncation can give a last window that reaches past the padded input: Caffe's
            # im2col reads zeros there, so pad the far side explicitly
            far = [(o - 1) * s + d * (k - 1) + 1 - n - p
                   for o, s, d, k, n, p in zip(out, self.stride, self.dilation, self.kernel, sizes, pad)]
            if any(f > p for f, p in zip(far, pad)):
                x = F.pad(x, [v for i in reversed(range(self.n_sp)) for v in (pad[i], max(far[i], 0))])
                pad = [0] * self.n_sp
            if self.n_sp == 2 and x.shape[0] >= CHANNELS_LAST_MIN_BATCH:
                return self._conv2d_channels_last(x, weight, bias, pad, group)
            return _CONV[self.n_sp](x, weight, bias, self.stride, pad, self.dilation, group)
        # other spatial ranks: Caffe's im2col followed by one matrix product per group
        b = x.shape[0]
        cols = _im2col(x, self.kernel, self.stride, self.pad, self.dilation, out)
        cols = cols.reshape(b, group, -1, cols.shape[-1])
        w = weight.reshape(group, weight.shape[0] // group, -1)
        y = torch.einsum("gok,bgkl->bgol", w, cols).reshape(b, weight.shape[0], *out)
        if bias is not None:
            y = y + bias.reshape(1, -1, *[1] * self.n_sp)
        return y


class _OneChannelConv2dFn(torch.autograd.Function):
    """Convolution (stride 1) of a one-channel input, a grayscale image, whose weight gradient is
    itself a convolution: of the input by the top's gradient, with the batch as the channels.
    oneDNN's weight gradient is slow with one input channel (LeNet's conv1: 4.9 ms, this 1.2 ms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return F.conv2d(x, weight, bias, 1, pad)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, weight, None, [1, 1], ctx.pad, [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = F.conv2d(x.transpose(0, 1), g.transpose(0, 1), None, 1, ctx.pad).transpose(0, 1)
        if ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


@register
class Deconvolution(_ConvolutionBase):
    """Caffe's Deconvolution layer: the transpose of Convolution, weights (C_in, num_output/group, *kernel)."""

    type = "Deconvolution"
    reverse = True

    def compute(self, x, weight, bias, out, group):
        if self.n_sp in _DECONV:
            return _DECONV[self.n_sp](x, weight, bias, self.stride, self.pad, 0, group, self.dilation)
        # other spatial ranks: one matrix product per group, then Caffe's col2im (a scatter-add)
        b, c = x.shape[:2]
        num_output = weight.shape[1] * group
        k = math.prod(self.kernel)
        w = weight.reshape(group, c // group, -1)
        xs = x.reshape(b, group, c // group, -1)
        cols = torch.einsum("gck,bgcl->bgkl", w, xs).reshape(b, num_output, k * xs.shape[-1])
        index = _col2im_index(out, self.kernel, self.stride, self.pad, self.dilation,
                              list(x.shape[2:]), x.device).reshape(-1)
        y = x.new_zeros(b, num_output, math.prod(out) + 1).index_add(2, index, cols)
        y = y[..., :-1].reshape(b, num_output, *out)
        if bias is not None:
            y = y + bias.reshape(1, -1, *[1] * self.n_sp)
        return y


@register
class Im2col(Layer):
    """Caffe's Im2col layer: each image becomes its convolution column matrix."""

    type = "Im2col"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.convolution_param
        x = bottoms[0]
        self.channel_axis = check_axis(self, p.axis, x.dim())
        self.n_sp = x.dim() - self.channel_axis - 1
        if self.n_sp < 1:
            raise self.error(f"needs at least one spatial axis after the channel axis, bottom shape "
                             f"{tuple(x.shape)}")
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, p, self.n_sp)

    def forward(self, bottoms):
        x = bottoms[0]
        ax = self.channel_axis
        if x.dim() != ax + 1 + self.n_sp:
            raise self.error(f"the bottom's number of axes may not change (now shape {tuple(x.shape)})")
        sizes = list(x.shape[ax + 1:])
        out = [conv_output_size(*a) for a in zip(sizes, self.kernel, self.pad, self.stride, self.dilation)]
        if any(o <= 0 for o in out):
            raise self.error(f"output would be empty: bottom spatial shape {tuple(sizes)}")
        c = x.shape[ax]
        x2 = x.reshape(-1, c, *sizes)
        fits = all(conv_output_size(n, k, p, s, d) == (n + 2 * p - d * (k - 1) - 1) // s + 1
                   for n, k, p, s, d in zip(sizes, self.kernel, self.pad, self.stride, self.dilation))
        if self.n_sp == 2 and fits:
            cols = F.unfold(x2, self.kernel, self.dilation, self.pad, self.stride)
        else:
            cols = _im2col(x2, self.kernel, self.stride, self.pad, self.dilation, out)
        return [cols.reshape(*x.shape[:ax], c * math.prod(self.kernel), *out)]


# --- inner product ---
@register
class InnerProduct(Layer):
    """Caffe's InnerProduct layer: axes from `axis` on are flattened; weights (N, K), or (K, N) if transpose."""

    type = "InnerProduct"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        p = self.param.inner_product_param
        x = bottoms[0]
        axis = check_axis(self, p.axis, x.dim())
        if p.num_output <= 0:
            raise self.error("num_output must be positive")
        self.k = math.prod(x.shape[axis:])
        self.add_blob((self.k, p.num_output) if p.transpose else (p.num_output, self.k), p.weight_filler)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)

    def forward(self, bottoms):
        p = self.param.inner_product_param
        x = bottoms[0]
        axis = check_axis(self, p.axis, x.dim())
        if math.prod(x.shape[axis:]) != self.k:
            raise self.error(f"input size incompatible with inner product parameters: {self.k} inputs "
                             f"expected from axis {axis} on, bottom shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.k)
        weight = self.blobs[0].to(x.dtype)
        bias = self.blobs[1].to(x.dtype) if p.bias_term else None
        # a parameter of the net: a leaf whose .grad is its slice of flat_diff
        if weight.requires_grad and weight.is_leaf and weight.grad is not None and torch.is_grad_enabled():
            y = _InnerProductFn.apply(x2, weight, bias, p.transpose)
        elif p.transpose:
            y = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
        else:
            y = F.linear(x2, weight, bias)
        return [y.reshape(*x.shape[:axis], p.num_output)]


class _InnerProductFn(torch.autograd.Function):
    """x W^T + b (x W + b with transpose) whose backward adds the weight's gradient straight into
    W.grad, the net's flat_diff, as Caffe's gemm with beta 1 does, instead of returning a new
    weight-sized tensor for autograd to add there: a large weight (VGG-16's fc6, 411 MB) then
    needs no fresh memory, and no page faults, in every iteration (VGG-16, batch 2: 1.18x faster,
    225 MB less at peak). Autograd gets a zero gradient for W (broadcast, no memory), so that
    W's gradient hooks (the reducer's) still run."""

    @staticmethod
    def forward(ctx, x, weight, bias, transpose):
        ctx.save_for_backward(x, weight)
        ctx.transpose = transpose
        w = weight if transpose else weight.t()
        return x @ w if bias is None else torch.addmm(bias, x, w)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ (weight.t() if ctx.transpose else weight)
        if ctx.needs_input_grad[1]:
            a, b = (x.t(), g) if ctx.transpose else (g.t(), x)
            if weight.grad is None:  # cleared since the forward: autograd sets it
                gw = a @ b
            else:
                weight.grad.addmm_(a, b)
                gw = weight.new_zeros(()).expand(weight.shape)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None
