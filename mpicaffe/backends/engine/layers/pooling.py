"""Pooling layers: Pooling and SPP (spatial pyramid pooling, a Pooling per pyramid level).

Shapes follow Caffe's pooling rule exactly (rounding up and clipping the last window; average
pooling divides by the window clipped to the padded input). torch's pooling kernels compute the
common cases; where their window rules differ from Caffe's (pad above half the kernel, Caffe's
empty trailing window) the input is padded explicitly so that torch sees exactly Caffe's windows.
Autograd gives the backward: torch's max pooling routes the gradient to the first maximum of a
window, as Caffe's strict `>` scan does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.proto import caffe_pb2

FLT_MAX = torch.finfo(torch.float32).max
FLT_MIN = torch.finfo(torch.float32).tiny
PoolMethod = caffe_pb2.PoolingParameter


# --- shape rules (pure functions) ---
def pooled_size(size: int, kernel: int, pad: int, stride: int, ceil: bool = True, padded: bool = False) -> int:
    """Caffe's pooling output size; `padded`: whether the layer has any padding (pad_h or pad_w).

    With padding, a last window that would start in the padding (at or past size + pad) is
    dropped; without padding Caffe keeps it, even when it starts past the input (an empty window).
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if padded and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _torch_pooled_size(size: int, kernel: int, pad: int, stride: int, ceil: bool) -> int:
    # torch's rule: like Caffe's, but the last-window check applies with or without padding
    out = (size + 2 * pad - kernel + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# --- pooling ---
def _pool_max_ave(x: torch.Tensor, method: int, kernel, pad, stride, out, ceil: bool, want_mask: bool):
    """MAX or AVE pooling of (N, C, H, W) into Caffe's `out` windows; MAX also gives Caffe's mask
    (flat index h * W + w of each window's first maximum, as x's dtype) when `want_mask`."""
    h, w = x.shape[2:]
    torch_ok = all(p <= k // 2 and _torch_pooled_size(n, k, p, s, ceil) == o
                   for n, k, p, s, o in zip((h, w), kernel, pad, stride, out))
    if torch_ok:
        if method == PoolMethod.AVE:
            # torch's divisor with count_include_pad is Caffe's: the window clipped to in + pad
            return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil, count_include_pad=True), None
        if want_mask:
            y, idx = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
            return y, idx.to(x.dtype)
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil), None
    # Caffe's windows made explicit: pad above half the kernel, or Caffe's extra (empty) last
    # window without padding; pad the near side by pad and the far side up to the last window
    far = [(o - 1) * s + k - n - p for n, k, p, s, o in zip((h, w), kernel, pad, stride, out)]
    pads = (pad[1], far[1], pad[0], far[0])
    if method == PoolMethod.AVE:
        sums = F.avg_pool2d(F.pad(x, pads), kernel, stride, divisor_override=1)
        # Caffe divides by the window clipped to in + pad (zero or negative for an empty window)
        sizes = [torch.tensor([min(i * s - p + k, n + p) - (i * s - p) for i in range(o)], dtype=x.dtype,
                              device=x.device) for n, k, p, s, o in zip((h, w), kernel, pad, stride, out)]
        return sums / (sizes[0][:, None] * sizes[1][None, :]), None
    y, idx = F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, stride, return_indices=True)
    wp = w + pad[1] + far[1]
    hh, ww = idx // wp - pad[0], idx % wp - pad[1]
    inside = (hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)
    # a window with no input element keeps Caffe's initial value -FLT_MAX and mask -1
    y = torch.where(inside, y, torch.full_like(y, -FLT_MAX))
    mask = torch.where(inside, hh * w + ww, torch.full_like(idx, -1)).to(x.dtype) if want_mask else None
    return y, mask


def _pool_stochastic(x: torch.Tensor, kernel, stride, out, train: bool) -> torch.Tensor:
    """Caffe's STOCHASTIC pooling (GPU-only in Caffe): TRAIN picks one element per window with
    probability proportional to its value; TEST gives the value-weighted average sum(x^2)/sum(x)."""
    n, c, h, w = x.shape
    # zeros on the far side make every window full size without changing sums or picks
    far = [(o - 1) * s + k - size for size, k, s, o in zip((h, w), kernel, stride, out)]
    xp = F.pad(x, (0, far[1], 0, far[0]))
    win = F.unfold(xp, kernel, stride=stride).reshape(n, c, math.prod(kernel), -1)
    if not train:
        return ((win * win).sum(2) / (win.sum(2) + FLT_MIN)).reshape(n, c, *out)
    cum = win.cumsum(2)
    # Caffe draws u in (0, 1] and takes the first element whose running sum reaches u * total
    u = 1.0 - torch.rand(cum[:, :, -1].shape, dtype=x.dtype, device=x.device)
    pick = (cum >= (u * cum[:, :, -1]).unsqueeze(2)).to(torch.uint8).argmax(2, keepdim=True)
    return win.gather(2, pick).reshape(n, c, *out)


def _check_pooling_pad(layer: Layer, method: int, kernel, pad, what: str = "") -> None:
    if any(pad):
        if method not in (PoolMethod.MAX, PoolMethod.AVE):
            raise layer.error(f"{what}padding is implemented only for MAX and AVE pooling")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise layer.error(f"{what}pad {tuple(pad)} must be smaller than the kernel {tuple(kernel)}")


def _pooled_shape(layer: Layer, x: torch.Tensor, kernel, pad, stride, ceil: bool, what: str = ""):
    if x.dim() != 4:
        raise layer.error(f"the bottom must have 4 axes (num, channels, height, width), got shape "
                          f"{tuple(x.shape)}")
    out = [pooled_size(n, k, p, s, ceil, any(pad)) for n, k, p, s in zip(x.shape[2:], kernel, pad, stride)]
    if any(o <= 0 for o in out):
        raise layer.error(f"{what}output would be empty: input {tuple(x.shape[2:])}, kernel {tuple(kernel)}, "
                          f"pad {tuple(pad)}, stride {tuple(stride)}")
    return out


@register
class Pooling(Layer):
    """Caffe's Pooling layer (MAX with optional mask top, AVE, STOCHASTIC; global pooling)."""

    type = "Pooling"
    min_bottoms = max_bottoms = 1
    min_tops = 1
    max_tops = 2

    def setup(self, bottoms):
        p = self.param.pooling_param
        if len(self.param.top) > 1 and p.pool != PoolMethod.MAX:
            raise self.error("only MAX pooling can have a second (mask) top")
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise self.error("with global_pooling: true the kernel size cannot be given")
        else:
            both_hw = p.HasField("kernel_h") and p.HasField("kernel_w")
            if p.HasField("kernel_size") and both_hw:
                raise self.error("give kernel_size or kernel_h and kernel_w, not both")
            if not p.HasField("kernel_size") and not both_hw:
                raise self.error("give kernel_size, or both kernel_h and kernel_w")
        for name in ("pad", "stride"):
            has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
            if (has_h or has_w) and (p.HasField(name) or not (has_h and has_w)):
                raise self.error(f"give {name}, or both {name}_h and {name}_w")
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        if p.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true only pad 0 and stride 1 are allowed")
        if any(s <= 0 for s in self.stride):
            raise self.error(f"stride must be positive, got {self.stride}")
        x = bottoms[0]
        if x.dim() != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), got shape "
                             f"{tuple(x.shape)}")
        kernel = self.kernel(x)
        if any(k <= 0 for k in kernel):
            raise self.error(f"kernel dimensions cannot be zero, got {kernel}")
        _check_pooling_pad(self, p.pool, kernel, self.pad)
        _pooled_shape(self, x, kernel, self.pad, self.stride, p.round_mode == PoolMethod.CEIL)

    def kernel(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.param.pooling_param
        if p.global_pooling:
            return tuple(x.shape[2:])
        return (p.kernel_size, p.kernel_size) if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)

    def forward(self, bottoms):
        x = bottoms[0]
        p = self.param.pooling_param
        ceil = p.round_mode == PoolMethod.CEIL
        kernel = self.kernel(x)
        out = _pooled_shape(self, x, kernel, self.pad, self.stride, ceil)
        if p.pool == PoolMethod.STOCHASTIC:
            return [_pool_stochastic(x, kernel, self.stride, out, self.phase == caffe_pb2.TRAIN)]
        want_mask = len(self.param.top) > 1
        y, mask = _pool_max_ave(x, p.pool, kernel, self.pad, self.stride, out, ceil, want_mask)
        return [y, mask] if want_mask else [y]

    def infer_tops(self, bottoms):
        x = bottoms[0]
        p = self.param.pooling_param
        out = _pooled_shape(self, x, self.kernel(x), self.pad, self.stride, p.round_mode == PoolMethod.CEIL)
        return [x.new_zeros(*x.shape[:2], *out) for _ in self.param.top]


def spp_level_geometry(level: int, height: int, width: int):
    """Caffe's SPP pooling for one pyramid level: (kernel, pad, stride), each (h, w), so that
    2^level windows cover each axis."""
    bins = 2 ** level
    kernel, pad = [], []
    for size in (height, width):
        k = -(-size // bins)
        kernel.append(k)
        pad.append((k * bins - size + 1) // 2)
    return tuple(kernel), tuple(pad), tuple(kernel)


@register
class SPP(Layer):
    """Caffe's SPP layer: pooled maps of each pyramid level, flattened and concatenated."""

    type = "SPP"
    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def setup(self, bottoms):
        if self.param.spp_param.pyramid_height < 1:
            raise self.error("pyramid_height must be at least 1")
        x = bottoms[0]
        if x.dim() == 4 and (x.shape[2] == 0 or x.shape[3] == 0):
            raise self.error(f"input dimensions cannot be zero, got shape {tuple(x.shape)}")
        self.levels(x)

    def levels(self, x: torch.Tensor):
        """(kernel, pad, stride, out) per level, with the checks of Caffe's inner Pooling layers."""
        p = self.param.spp_param
        if x.dim() != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), got shape "
                             f"{tuple(x.shape)}")
        result = []
        for level in range(p.pyramid_height):
            kernel, pad, stride = spp_level_geometry(level, *x.shape[2:])
            what = f"pyramid level {level} on a {x.shape[2]}x{x.shape[3]} input: "
            _check_pooling_pad(self, p.pool, kernel, pad, what)
            result.append((kernel, pad, stride, _pooled_shape(self, x, kernel, pad, stride, True, what)))
        return result

    def forward(self, bottoms):
        x = bottoms[0]
        p = self.param.spp_param
        pooled = []
        for kernel, pad, stride, out in self.levels(x):
            if p.pool == caffe_pb2.SPPParameter.STOCHASTIC:
                y = _pool_stochastic(x, kernel, stride, out, self.phase == caffe_pb2.TRAIN)
            else:
                y, _ = _pool_max_ave(x, p.pool, kernel, pad, stride, out, True, False)
            pooled.append(y)
        if len(pooled) == 1:
            # Caffe runs a single level as a plain Pooling layer: the top stays (N, C, h, w)
            return pooled
        return [torch.cat([y.flatten(1) for y in pooled], 1)]

    def infer_tops(self, bottoms):
        x = bottoms[0]
        shapes = [out for *_, out in self.levels(x)]
        if len(shapes) == 1:
            return [x.new_zeros(*x.shape[:2], *shapes[0])]
        return [x.new_zeros(x.shape[0], x.shape[1] * sum(h * w for h, w in shapes))]
