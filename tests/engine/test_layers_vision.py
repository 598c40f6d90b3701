"""Vision layers against numpy references written from Caffe's loops (conv_layer, deconv_layer,
im2col, inner_product_layer), and finite-difference gradients; pooling is in test_layers_pooling.py."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mpicaffe.errors import UserError
from tests.engine.layer_harness import check_gradients, layer_text, make_layer, rand, run64


def conv_text(params: str, kind: str = "Convolution", **kw) -> str:
    return layer_text(kind, f"convolution_param {{ {params} }}", **kw)


# --- numpy references ---
def conv_ref(x, w, b, stride, pad, dilation, group):
    """Caffe's convolution: channel axis 1, any number of spatial axes, zeros outside the input,
    output size by C++ truncating division."""
    n = x.shape[0]
    o, cg = w.shape[:2]
    kernel = w.shape[2:]
    sizes = x.shape[2:]
    out = [int((s + 2 * p - (d * (k - 1) + 1)) / st) + 1
           for s, k, p, st, d in zip(sizes, kernel, pad, stride, dilation)]
    y = np.zeros((n, o, *out))
    og = o // group
    for op in itertools.product(*[range(v) for v in out]):
        for kk in itertools.product(*[range(v) for v in kernel]):
            pos = [q * st - p + k * d for q, st, p, k, d in zip(op, stride, pad, kk, dilation)]
            if not all(0 <= v < s for v, s in zip(pos, sizes)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *pos)]  # (n, cg)
                ws = w[(slice(g * og, (g + 1) * og), slice(None), *kk)]  # (og, cg)
                y[(slice(None), slice(g * og, (g + 1) * og), *op)] += xs @ ws.T
    if b is not None:
        y += b.reshape(1, -1, *[1] * len(out))
    return y


def deconv_ref(x, w, b, stride, pad, dilation, group):
    """Caffe's deconvolution: each input position scatters its weighted kernel into the output."""
    n, c = x.shape[:2]
    og = w.shape[1]
    kernel = w.shape[2:]
    sizes = x.shape[2:]
    out = [st * (s - 1) + d * (k - 1) + 1 - 2 * p for s, k, p, st, d in zip(sizes, kernel, pad, stride, dilation)]
    y = np.zeros((n, og * group, *out))
    cg = c // group
    for ip in itertools.product(*[range(v) for v in sizes]):
        for kk in itertools.product(*[range(v) for v in kernel]):
            pos = [q * st - p + k * d for q, st, p, k, d in zip(ip, stride, pad, kk, dilation)]
            if not all(0 <= v < s for v, s in zip(pos, out)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *ip)]  # (n, cg)
                ws = w[(slice(g * cg, (g + 1) * cg), slice(None), *kk)]  # (cg, og)
                y[(slice(None), slice(g * og, (g + 1) * og), *pos)] += xs @ ws
    if b is not None:
        y += b.reshape(1, -1, *[1] * len(out))
    return y


def im2col_ref(x, kernel, stride, pad, dilation):
    """Caffe's column matrix per image: row (c, *kernel offset), column (*output position)."""
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    out = [int((s + 2 * p - (d * (k - 1) + 1)) / st) + 1
           for s, k, p, st, d in zip(sizes, kernel, pad, stride, dilation)]
    cols = np.zeros((n, c, *kernel, *out))
    for kk in itertools.product(*[range(v) for v in kernel]):
        for op in itertools.product(*[range(v) for v in out]):
            pos = [q * st - p + k * d for q, st, p, k, d in zip(op, stride, pad, kk, dilation)]
            if all(0 <= v < s for v, s in zip(pos, sizes)):
                cols[(slice(None), slice(None), *kk, *op)] = x[(slice(None), slice(None), *pos)]
    return cols.reshape(n, c * math.prod(kernel), *out)


# ===================== Convolution =====================
def test_convolution_2d_group_dilation_stride_pad():
    x = rand(2, 4, 7, 6)
    w, b = rand(6, 2, 3, 2, seed=1), rand(6, seed=2)
    text = conv_text("num_output: 6 group: 2 kernel_size: 3 kernel_size: 2 stride: 2 stride: 1 "
                     "pad: 1 pad: 2 dilation: 2 dilation: 1")
    (y,) = run64(text, x, blobs=[w, b])
    ref = conv_ref(x, w, b, (2, 1), (1, 2), (2, 1), 2)
    assert y.shape == ref.shape == (2, 6, 3, 9)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_convolution_h_w_spellings_and_blob_shapes():
    x = rand(1, 3, 6, 7)
    text = conv_text("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 "
                     "weight_filler { type: 'constant' value: 2 } bias_filler { type: 'constant' value: 0.5 }")
    layer, _ = make_layer(text, [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 3, 3, 2), (4,)]
    assert torch.all(layer.blobs[0] == 2) and torch.all(layer.blobs[1] == 0.5)
    w, b = rand(4, 3, 3, 2, seed=3), rand(4, seed=4)
    (y,) = run64(text, x, blobs=[w, b])
    np.testing.assert_allclose(y, conv_ref(x, w, b, (2, 3), (1, 0), (1, 1), 1), rtol=1e-10)
    assert y.shape == (1, 4, 3, 2)


def test_convolution_single_value_broadcast_and_no_bias():
    x = rand(2, 2, 5, 5)
    text = conv_text("num_output: 3 kernel_size: 3 stride: 2 pad: 1 bias_term: false")
    layer, _ = make_layer(text, [x])
    assert len(layer.blobs) == 1
    w = rand(3, 2, 3, 3, seed=5)
    (y,) = run64(text, x, blobs=[w])
    np.testing.assert_allclose(y, conv_ref(x, w, None, (2, 2), (1, 1), (1, 1), 1), rtol=1e-10)


@pytest.mark.parametrize("shape,params,kernel,stride,pad,dil", [
    ((2, 4, 9), "kernel_size: 3 stride: 2 pad: 1 dilation: 2", (3,), (2,), (1,), (2,)),
    ((1, 2, 4, 5, 3), ("kernel_size: 2 kernel_size: 3 kernel_size: 1 stride: 1 stride: 2 stride: 1 "
                       "pad: 1 pad: 0 pad: 1 dilation: 2 dilation: 1 dilation: 1"), (2, 3, 1), (1, 2, 1), (1, 0, 1), (2, 1, 1)),
    # four spatial axes: Caffe's N-d im2col path (torch has no conv4d)
    ((1, 2, 3, 4, 3, 3), "kernel_size: 2 stride: 1 stride: 2 stride: 1 stride: 1 pad: 1 pad: 0 pad: 0 pad: 1",
     (2, 2, 2, 2), (1, 2, 1, 1), (1, 0, 0, 1), (1, 1, 1, 1)),
])
def test_convolution_nd(shape, params, kernel, stride, pad, dil):
    x = rand(*shape)
    text = conv_text(f"num_output: 4 group: 2 force_nd_im2col: true {params}")
    layer, _ = make_layer(text, [x])
    assert tuple(layer.blobs[0].shape) == (4, shape[1] // 2, *kernel)
    w, b = rand(4, shape[1] // 2, *kernel, seed=1), rand(4, seed=2)
    (y,) = run64(text, x, blobs=[w, b])
    np.testing.assert_allclose(y, conv_ref(x, w, b, stride, pad, dil, 2), rtol=1e-10, atol=1e-12)
    check_gradients(text, rand(*shape, seed=9))


def test_convolution_zero_spatial_axes_is_a_per_channel_product():
    x = rand(3, 4)
    text = conv_text("num_output: 2 group: 2")
    w, b = rand(2, 2, seed=1), rand(2, seed=2)
    (y,) = run64(text, x, blobs=[w, b])
    ref = np.stack([x[:, :2] @ w[0] + b[0], x[:, 2:] @ w[1] + b[1]], axis=1)
    np.testing.assert_allclose(y, ref, rtol=1e-12)


def test_convolution_axis_flattens_leading_axes():
    x = rand(2, 3, 2, 5, 4)  # channel axis 2
    text = conv_text("num_output: 3 kernel_size: 2 axis: 2")
    w, b = rand(3, 2, 2, 2, seed=1), rand(3, seed=2)
    (y,) = run64(text, x, blobs=[w, b])
    ref = conv_ref(x.reshape(6, 2, 5, 4), w, b, (1, 1), (0, 0), (1, 1), 1).reshape(2, 3, 3, 4, 3)
    np.testing.assert_allclose(y, ref, rtol=1e-12)


def test_convolution_truncated_division_window_past_the_padded_input():
    # (3 + 0 - 4) / 2 truncates to 0 in C++: one output whose window reads zeros past the input
    x = rand(1, 1, 3, 3)
    text = conv_text("num_output: 1 kernel_size: 4 stride: 2")
    w, b = rand(1, 1, 4, 4, seed=1), np.zeros(1)
    (y,) = run64(text, x, blobs=[w, b])
    assert y.shape == (1, 1, 1, 1)
    np.testing.assert_allclose(y.item(), (x[0, 0] * w[0, 0, :3, :3]).sum(), rtol=1e-12)
    np.testing.assert_allclose(y, conv_ref(x, w, b, (2, 2), (0, 0), (1, 1), 1), rtol=1e-12)
    check_gradients(text, x)


def test_convolution_several_bottoms_share_filters():
    x1, x2 = rand(1, 2, 4, 4), rand(1, 2, 4, 4, seed=1)
    text = conv_text("num_output: 2 kernel_size: 3", bottoms=("a", "b"), tops=("c", "d"))
    w, b = rand(2, 2, 3, 3, seed=2), rand(2, seed=3)
    y1, y2 = run64(text, x1, x2, blobs=[w, b])
    np.testing.assert_allclose(y1, conv_ref(x1, w, b, (1, 1), (0, 0), (1, 1), 1), rtol=1e-12)
    np.testing.assert_allclose(y2, conv_ref(x2, w, b, (1, 1), (0, 0), (1, 1), 1), rtol=1e-12)


def test_convolution_gradients_2d():
    text = conv_text("num_output: 4 group: 2 kernel_size: 3 stride: 2 pad: 1 dilation: 2 "
                     "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' }")
    check_gradients(text, rand(2, 4, 6, 5))


@pytest.mark.parametrize("params,shape,message", [
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), "not both"),
    ("num_output: 2 kernel_h: 3 kernel_w: 3", (1, 2, 5), "2-D convolution"),
    ("num_output: 2 kernel_size: 3 stride: 1 stride_h: 2 stride_w: 2", (1, 2, 5, 5), "not both"),
    ("num_output: 2 kernel_size: 3 pad: 1 pad_h: 1", (1, 2, 5, 5), "not both"),
    ("num_output: 2 kernel_h: 3", (1, 2, 5, 5), "nonzero"),
    ("num_output: 2", (1, 2, 5, 5), "kernel_size must be given once or once per spatial axis"),
    ("num_output: 2 kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 2, 5, 5), "given 3 times"),
    ("num_output: 2 kernel_size: 3 stride: 0", (1, 2, 5, 5), "stride"),
    ("num_output: 2 kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", (1, 2, 5, 5), "dilation"),
    ("kernel_size: 3", (1, 2, 5, 5), "num_output must be positive"),
    ("num_output: 3 group: 2 kernel_size: 1", (1, 4, 5, 5), "num_output 3 is not a multiple of group 2"),
    ("num_output: 4 group: 2 kernel_size: 1", (1, 3, 5, 5), "3 channels are not divisible by group 2"),
    ("num_output: 2 kernel_size: 7", (1, 2, 5, 5), "output would be empty"),
    ("num_output: 2 kernel_size: 1 axis: 4", (1, 2, 5, 5), "out of range"),
])
def test_convolution_errors(params, shape, message):
    with pytest.raises(UserError, match=message):
        make_layer(conv_text(params), [np.zeros(shape)])


def test_convolution_bottom_count_and_shape_errors():
    with pytest.raises(UserError, match="as many tops as bottoms"):
        make_layer(conv_text("num_output: 1 kernel_size: 1", bottoms=("a", "b")), [np.zeros((1, 1, 2, 2))] * 2)
    with pytest.raises(UserError, match="same shape"):
        layer, _ = make_layer(conv_text("num_output: 1 kernel_size: 1", bottoms=("a", "b"), tops=("c", "d")),
                              [np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 2))])
        layer.forward([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 2)])
    layer, _ = make_layer(conv_text("num_output: 1 kernel_size: 1"), [np.zeros((1, 2, 2, 2))])
    with pytest.raises(UserError, match="incompatible with the convolution kernel"):
        layer.forward([torch.zeros(1, 3, 2, 2)])


# ===================== Deconvolution =====================
@pytest.mark.parametrize("shape,params,kernel,stride,pad,dil", [
    ((2, 4, 3, 4), "kernel_size: 3 kernel_size: 2 stride: 2 stride: 3 pad: 1 pad: 0 dilation: 1 dilation: 2",
     (3, 2), (2, 3), (1, 0), (1, 2)),
    ((2, 4, 3, 3), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1", (2, 3), (1, 2), (1, 1), (1, 1)),
    ((1, 2, 5), "kernel_size: 4 stride: 3 pad: 2", (4,), (3,), (2,), (1,)),
    ((1, 2, 3), "kernel_size: 2 stride: 3 pad: 2", (2,), (3,), (2,), (1,)),  # pad not below the kernel
    ((1, 2, 2, 3, 2), "kernel_size: 2 stride: 2 pad: 1 pad: 0 pad: 0", (2, 2, 2), (2, 2, 2), (1, 0, 0), (1, 1, 1)),
    # four spatial axes: Caffe's N-d col2im path
    ((1, 2, 2, 2, 3, 2), ("kernel_size: 2 stride: 2 stride: 1 stride: 1 stride: 2 pad: 1 pad: 0 pad: 1 pad: 0 "
                          "dilation: 1 dilation: 2 dilation: 1 dilation: 1"), (2, 2, 2, 2), (2, 1, 1, 2), (1, 0, 1, 0), (1, 2, 1, 1)),
])
def test_deconvolution(shape, params, kernel, stride, pad, dil):
    x = rand(*shape)
    group = 2
    text = conv_text(f"num_output: 6 group: {group} {params}", kind="Deconvolution")
    layer, _ = make_layer(text, [x])
    # Caffe's deconvolution blob: (input channels, num_output / group, *kernel)
    assert tuple(layer.blobs[0].shape) == (shape[1], 6 // group, *kernel)
    assert tuple(layer.blobs[1].shape) == (6,)
    w, b = rand(shape[1], 3, *kernel, seed=1), rand(6, seed=2)
    (y,) = run64(text, x, blobs=[w, b])
    ref = deconv_ref(x, w, b, stride, pad, dil, group)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    check_gradients(text.replace("}", "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }", 1)
                    if "filler" not in text else text, rand(*shape, seed=7))


def test_deconvolution_output_shape_rule_and_empty_output():
    layer, _ = make_layer(conv_text("num_output: 1 kernel_size: 4 stride: 2 pad: 1", kind="Deconvolution"),
                          [np.zeros((1, 1, 5, 5))])
    (y,) = layer.infer_tops([torch.zeros(1, 1, 5, 5)])
    assert tuple(y.shape) == (1, 1, 2 * 4 + 4 - 2, 10)
    with pytest.raises(UserError, match="output would be empty"):
        make_layer(conv_text("num_output: 1 kernel_size: 2 pad: 1", kind="Deconvolution"), [np.zeros((1, 1, 1, 1))])


# ===================== Im2col =====================
@pytest.mark.parametrize("shape,params,kernel,stride,pad,dil", [
    ((2, 3, 5, 6), "kernel_size: 3 kernel_size: 2 stride: 2 stride: 1 pad: 1 dilation: 1 dilation: 2",
     (3, 2), (2, 1), (1, 1), (1, 2)),
    ((1, 2, 5, 4), "kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1", (2, 3), (2, 1), (0, 1), (1, 1)),
    ((1, 2, 3, 3), "kernel_size: 4 stride: 2", (4, 4), (2, 2), (0, 0), (1, 1)),  # truncated division
    ((2, 2, 7), "kernel_size: 3 stride: 2 pad: 1 dilation: 2", (3,), (2,), (1,), (2,)),
    ((1, 2, 3, 4, 3), "kernel_size: 2 pad: 1 pad: 0 pad: 0 stride: 1 stride: 2 stride: 1", (2, 2, 2), (1, 2, 1),
     (1, 0, 0), (1, 1, 1)),
])
def test_im2col(shape, params, kernel, stride, pad, dil):
    x = rand(*shape)
    text = layer_text("Im2col", f"convolution_param {{ {params} }}")
    (y,) = run64(text, x)
    ref = im2col_ref(x, kernel, stride, pad, dil)
    assert y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)
    check_gradients(text, x)


def test_im2col_errors():
    with pytest.raises(UserError, match="spatial axis"):
        make_layer(layer_text("Im2col", "convolution_param { kernel_size: 1 }"), [np.zeros((2, 3))])
    with pytest.raises(UserError, match="not both"):
        make_layer(layer_text("Im2col", "convolution_param { kernel_size: 1 kernel_w: 1 }"), [np.zeros((1, 2, 3, 3))])


# ===================== InnerProduct =====================
def ip_text(params: str) -> str:
    return layer_text("InnerProduct", f"inner_product_param {{ {params} }}")


@pytest.mark.parametrize("axis,transpose", [(1, False), (1, True), (2, False), (-1, True), (0, False)])
def test_inner_product(axis, transpose):
    x = rand(2, 3, 2, 2)
    ax = axis % 4
    k = int(np.prod(x.shape[ax:]))
    text = ip_text(f"num_output: 5 axis: {axis} transpose: {str(transpose).lower()} "
                   "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' }")
    layer, _ = make_layer(text, [x])
    assert tuple(layer.blobs[0].shape) == ((k, 5) if transpose else (5, k))
    w, b = rand(*layer.blobs[0].shape, seed=1), rand(5, seed=2)
    (y,) = run64(text, x, blobs=[w, b])
    wnk = w.T if transpose else w
    ref = x.reshape(-1, k) @ wnk.T + b
    assert y.shape == (*x.shape[:ax], 5)
    np.testing.assert_allclose(y.reshape(-1, 5), ref, rtol=1e-12)
    check_gradients(text, x)


def test_inner_product_without_bias_and_errors():
    x = rand(3, 4)
    text = ip_text("num_output: 2 bias_term: false")
    layer, _ = make_layer(text, [x])
    assert len(layer.blobs) == 1
    w = rand(2, 4, seed=1)
    (y,) = run64(text, x, blobs=[w])
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-12)
    with pytest.raises(UserError, match="incompatible with inner product"):
        layer.forward([torch.zeros(3, 5)])
    with pytest.raises(UserError, match="num_output must be positive"):
        make_layer(ip_text(""), [x])
