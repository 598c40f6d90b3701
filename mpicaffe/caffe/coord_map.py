"""How the spatial coordinates of two NetSpec tops relate, as pycaffe's `caffe.coord_map`; its
main use is `crop(top_from, top_to)`, the Crop layer that aligns a fully convolutional net's
upsampled scores with its input (FCN).

A coordinate map is `(axis, scale, shift)`: output coordinate `x * scale + shift` comes from
input coordinate `x`, on every spatial axis from `axis` on (None: any axis, as for ReLU).
Scale and shift are numpy arrays, one entry per spatial axis (or one for all).
"""
from __future__ import annotations

import numpy as np

from mpicaffe.caffe.net_spec import Function, Top, layers

CoordMap = tuple  # (axis or None, scale, shift)

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN",
                       "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH",
                       "Threshold"]

_LEGACY_SPATIAL = {"kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"}


class UndefinedMapException(Exception):
    """The layer's output coordinates have no fixed relation to its input's."""


class AxisMismatchException(Exception):
    """Two maps act on different axes and cannot be composed."""


def conv_params(fn: Function) -> tuple:
    """`(axis, stride, kernel extent, pad)` of a Convolution, Deconvolution, Im2col or Pooling
    layer, the kernel extent counting its dilation; arrays of one entry per axis (or one)."""
    spec = fn.params.get("convolution_param", fn.params)
    if _LEGACY_SPATIAL & set(fn.params):
        raise AssertionError(f"{fn.type_name}: cropping does not support legacy _h/_w params; "
                             f"use kernel_size, stride and pad")
    kernel = np.array(spec["kernel_size"], ndmin=1)
    dilation = np.array(spec.get("dilation", 1), ndmin=1)
    return (spec.get("axis", 1), np.array(spec.get("stride", 1), ndmin=1), (kernel - 1) * dilation + 1,
            np.array(spec.get("pad", 0), ndmin=1))


def crop_params(fn: Function) -> tuple:
    """`(axis, offset)` of a Crop layer, with Caffe's defaults (axis 2, offset 0)."""
    spec = fn.params.get("crop_param", fn.params)
    return spec.get("axis", 2), np.array(spec.get("offset", 0), ndmin=1)


def coord_map(fn: Function) -> CoordMap:
    """The map from a layer's input coordinates to its output's; UndefinedMapException for a
    layer that has none (InnerProduct, Reshape, ...)."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the Crop axis counts the first cropped axis; ours the one before
    raise UndefinedMapException(f"{fn.type_name} layers have no coordinate map")


def compose(base_map: CoordMap, next_map: CoordMap) -> CoordMap:
    """`next_map` applied after `base_map`: scales multiply, the next shift is scaled by the base."""
    axis1, scale1, shift1 = base_map
    axis2, scale2, shift2 = next_map
    if axis1 is None:
        axis = axis2
    elif axis2 is None or axis1 == axis2:
        axis = axis1
    else:
        raise AxisMismatchException(f"cannot compose maps on axis {axis1} and axis {axis2}")
    return axis, scale1 * scale2, scale1 * shift2 + shift1


def inverse(coord_map: CoordMap) -> CoordMap:
    """The map back from output to input coordinates."""
    axis, scale, shift = coord_map
    return axis, 1 / scale, -shift / scale


def _mappable_bottoms(top: Top) -> tuple:
    # a Crop's second bottom only gives the output size: its coordinates do not map
    return top.fn.inputs[:1] if top.fn.type_name == "Crop" else top.fn.inputs


def _maps_to_ancestors(start: Top, stop: dict | None = None):
    """Walk from `start` towards the data, composing maps: {ancestor top: map from it to start}.
    With `stop`, return (top, map) at the first top found in `stop`, else None."""
    maps = {start: (None, 1, 0)}
    frontier = [start]
    while frontier:
        top = frontier.pop()
        if stop is not None and top in stop:
            return top, maps[top]
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return maps if stop is None else None


def coord_map_from_to(top_from: Top, top_to: Top) -> CoordMap:
    """The map from `top_from`'s coordinates to `top_to`'s, through their nearest common ancestor
    top; RuntimeError when only non-spatial layers (or none) connect them."""
    from_maps = _maps_to_ancestors(top_from)
    met = _maps_to_ancestors(top_to, stop=from_maps)
    if met is None:
        raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")
    common, to_map = met
    return compose(to_map, inverse(from_maps[common]))


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cropping `top_from` to `top_to`'s size where their coordinates align
    (`crop_param { axis offset }` computed from the layers between them)."""
    axis, scale, shift = coord_map_from_to(top_from, top_to)
    scale, shift = np.asarray(scale), np.asarray(shift)
    if not (scale == 1).all():
        raise AssertionError(f"scale mismatch on crop (a = {scale})")
    if not (shift <= 0).all():
        raise AssertionError(f"cannot crop negative offset (b = {shift})")
    if not (np.round(shift) == shift).all():
        raise AssertionError(f"cannot crop noninteger offset (b = {shift})")
    offsets = [int(v) for v in -np.round(shift).astype(int).ravel()]
    return layers.Crop(top_from, top_to, crop_param={"axis": axis + 1, "offset": offsets})


__all__ = ["PASS_THROUGH_LAYERS", "AxisMismatchException", "UndefinedMapException", "compose", "conv_params",
           "coord_map", "coord_map_from_to", "crop", "crop_params", "inverse"]
