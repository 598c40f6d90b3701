"""Pooling layers against numpy references written from Caffe's loops (pooling_layer, spp_layer),
and finite-difference gradients."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mpicaffe.backends.engine.layers import pooling
from mpicaffe.errors import UserError
from tests.engine.layer_harness import (
    TEST,
    TRAIN,
    backward64,
    check_gradients,
    layer_text,
    make_layer,
    rand,
    run64,
)

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)


# --- numpy references ---
def caffe_pooled(size, k, p, s, padded, ceil=True):
    q = (size + 2 * p - k) / s
    out = (math.ceil(q) if ceil else math.floor(q)) + 1
    if padded and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool_ref(x, method, kernel, pad, stride, ceil=True):
    """Transcription of Caffe's PoolingLayer::Forward_cpu (MAX: value and mask; AVE: value)."""
    n, c, h, w = x.shape
    padded = pad[0] != 0 or pad[1] != 0
    oh = caffe_pooled(h, kernel[0], pad[0], stride[0], padded, ceil)
    ow = caffe_pooled(w, kernel[1], pad[1], stride[1], padded, ceil)
    top = np.zeros((n, c, oh, ow))
    mask = np.full((n, c, oh, ow), -1.0)
    for i, j in itertools.product(range(oh), range(ow)):
        hs, ws = i * stride[0] - pad[0], j * stride[1] - pad[1]
        if method == "MAX":
            he, we = min(hs + kernel[0], h), min(ws + kernel[1], w)
            hs, ws = max(hs, 0), max(ws, 0)
            for a, b in itertools.product(range(n), range(c)):
                best = -FLT_MAX
                for hh, ww in itertools.product(range(hs, he), range(ws, we)):
                    if x[a, b, hh, ww] > best:
                        best = x[a, b, hh, ww]
                        mask[a, b, i, j] = hh * w + ww
                top[a, b, i, j] = best
        else:
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            with np.errstate(invalid="ignore", divide="ignore"):
                top[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / np.float64(size)
    return top, mask


def max_pool_backward_ref(dy, mask, bottom_shape):
    """Caffe's MAX backward: each top diff goes to the bottom element its mask names."""
    n, c, h, w = bottom_shape
    dx = np.zeros((n, c, h * w))
    for a, b in itertools.product(range(n), range(c)):
        for m, d in zip(mask[a, b].reshape(-1), dy[a, b].reshape(-1)):
            if m >= 0:
                dx[a, b, int(m)] += d
    return dx.reshape(bottom_shape)


# ===================== Pooling =====================
def pool_text(params: str, tops=("y",)) -> str:
    return layer_text("Pooling", f"pooling_param {{ {params} }}", tops=tops)


def _sweep():
    for h, k, s, pw in itertools.product(range(1, 7), range(1, 4), range(1, 4), (0, 1)):
        for p in range(k):
            if caffe_pooled(h, k, p, s, p > 0 or pw > 0) >= 1:
                yield h, k, p, s, pw


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_border_sweep_against_caffe_loops(method):
    """Every small (size, kernel, pad, stride) along the height: shapes, values, MAX mask and AVE
    divisors; the width has pad 0 or 1, since any padding turns on Caffe's last-window rule."""
    torch_path = fallback = 0
    w, kw = 4, 2
    for h, k, p, s, pw in _sweep():
        x = rand(1, 2, h, w, seed=h * 100 + k * 10 + s)
        text = pool_text(f"pool: {method} kernel_h: {k} kernel_w: {kw} pad_h: {p} pad_w: {pw} "
                         f"stride_h: {s} stride_w: 1", tops=("y", "m") if method == "MAX" else ("y",))
        tops = run64(text, x)
        top, mask = pool_ref(x, method, (k, kw), (p, pw), (s, 1))
        label = f"h={h} k={k} p={p} s={s} pad_w={pw}"
        assert tops[0].shape == top.shape, label
        np.testing.assert_allclose(tops[0], top, rtol=1e-12, err_msg=label)
        if method == "MAX":
            np.testing.assert_array_equal(tops[1], mask, err_msg=label)
        direct = all(pp <= kk // 2 and pooling._torch_pooled_size(n, kk, pp, ss, True) == o
                     for n, kk, pp, ss, o in ((h, k, p, s, top.shape[2]), (w, kw, pw, 1, top.shape[3])))
        torch_path += direct
        fallback += not direct
    assert torch_path > 100 and fallback > 20  # both torch's pooling and Caffe's explicit windows ran


def test_pooling_empty_last_window_without_padding():
    # Caffe keeps a last window that starts past the input when there is no padding (torch drops it)
    x = rand(1, 1, 4, 4)
    text = "kernel_size: 1 stride: 2"
    (y, m) = run64(pool_text(f"pool: MAX {text}", tops=("y", "m")), x)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 2, 0] == -FLT_MAX and m[0, 0, 2, 0] == -1
    np.testing.assert_array_equal(y[0, 0, :2, :2], x[0, 0, ::2, ::2])
    (a,) = run64(pool_text(f"pool: AVE {text}"), x)
    assert np.isnan(a[0, 0, 2, 0])  # Caffe divides 0 by a window size of 0
    (a,) = run64(pool_text("pool: AVE kernel_size: 1 stride: 3"), rand(1, 1, 5, 5))
    assert a.shape == (1, 1, 3, 3) and a[0, 0, 2, 2] == 0  # window size -1: 0 / -1


@pytest.mark.parametrize("kernel,pad", [(2, 0), (3, 2)])  # torch's pooling; explicit windows
def test_pooling_max_first_maximum_gets_the_gradient(kernel, pad):
    x = np.array([[[[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 3.0, 1.0]]]])
    text = pool_text(f"pool: MAX kernel_size: {kernel} stride: 1 pad: {pad}", tops=("y", "m"))
    (y, m), dy, dx = backward64(text, x)
    ref, mask = pool_ref(x, "MAX", (kernel, kernel), (pad, pad), (1, 1))
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(dx, max_pool_backward_ref(dy, mask, x.shape), rtol=1e-12)


@pytest.mark.parametrize("params", [
    "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "pool: MAX kernel_size: 3 stride: 2 pad: 2",  # pad above half the kernel: explicit windows
    "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1",
    "pool: AVE kernel_size: 3 stride: 2 pad: 2",
    "pool: AVE kernel_size: 2 stride: 3",
    "pool: AVE global_pooling: true",
    "pool: MAX global_pooling: true",
    "pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR",
])
def test_pooling_gradients(params):
    x = rand(2, 2, 5, 6, seed=3)
    if "stride: 3" in params:
        x = x[..., :5]  # 6 columns would end in Caffe's empty window (0 / 0 = NaN)
    check_gradients(pool_text(params), x)
    if params.startswith("pool: MAX"):
        # Caffe's mask-driven backward too (the mask itself is checked by the border sweep)
        (_, m), dy, dx = backward64(pool_text(params, tops=("y", "m")), x)
        np.testing.assert_allclose(dx, max_pool_backward_ref(dy, m, x.shape), rtol=1e-12)


def test_pooling_global_and_floor_mode():
    x = rand(2, 3, 4, 5)
    (y,) = run64(pool_text("pool: AVE global_pooling: true"), x)
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=1e-12)
    (y, m) = run64(pool_text("pool: MAX global_pooling: true", tops=("y", "m")), x)
    np.testing.assert_allclose(y[..., 0, 0], x.max(axis=(2, 3)))
    np.testing.assert_array_equal(m[..., 0, 0], x.reshape(2, 3, -1).argmax(-1))
    (y,) = run64(pool_text("pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR"), x)
    ref, _ = pool_ref(x, "MAX", (2, 2), (0, 0), (2, 2), ceil=False)
    assert y.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(y, ref)


def stochastic_windows(x, kernel, stride):
    """Caffe's STOCHASTIC windows (no padding, clipped at the input's end), in scan order."""
    h, w = x.shape[2:]
    oh = caffe_pooled(h, kernel[0], 0, stride[0], False)
    ow = caffe_pooled(w, kernel[1], 0, stride[1], False)
    return oh, ow, lambda i, j: [(a, b) for a in range(i * stride[0], min(i * stride[0] + kernel[0], h))
                                 for b in range(j * stride[1], min(j * stride[1] + kernel[1], w))]


def test_stochastic_pooling_test_phase_is_probability_weighted_average():
    x = np.abs(rand(2, 2, 5, 5)) + 0.1
    (y,) = run64(pool_text("pool: STOCHASTIC kernel_size: 3 stride: 2"), x, phase=TEST)
    oh, ow, window = stochastic_windows(x, (3, 3), (2, 2))
    ref = np.zeros((2, 2, oh, ow))
    for i, j in itertools.product(range(oh), range(ow)):
        v = np.stack([x[:, :, a, b] for a, b in window(i, j)], -1)
        ref[:, :, i, j] = (v * v).sum(-1) / (FLT_MIN + v.sum(-1))
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    check_gradients(pool_text("pool: STOCHASTIC kernel_size: 3 stride: 2"), x, phase=TEST)


def test_stochastic_pooling_test_phase_all_zero_window_gives_zero():
    # Caffe starts the window sum at FLT_MIN, so an all-zero window gives 0 rather than 0 / 0
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, :, 2:] = [[1.0, 2.0], [3.0, 0.0]]
    (y,) = run64(pool_text("pool: STOCHASTIC kernel_size: 2 stride: 2"), x, phase=TEST)
    np.testing.assert_allclose(y[0, 0, 0], [0.0, 14.0 / (6.0 + FLT_MIN)], rtol=1e-12)


def test_stochastic_pooling_train_samples_like_caffe():
    x = np.abs(rand(2, 3, 5, 4)) + 0.05
    text = pool_text("pool: STOCHASTIC kernel_size: 3 stride: 2")
    layer, tensors = make_layer(text, [x], TRAIN, dtype=torch.float64)
    xt = tensors[0].clone().requires_grad_(True)
    torch.manual_seed(5)
    (y,) = layer.forward([xt])
    oh, ow, window = stochastic_windows(x, (3, 3), (2, 2))
    torch.manual_seed(5)
    u = 1.0 - torch.rand((2, 3, oh * ow), dtype=torch.float64).numpy().reshape(2, 3, oh, ow)
    ref = np.zeros((2, 3, oh, ow))
    picked = {}
    for a, b, i, j in itertools.product(range(2), range(3), range(oh), range(ow)):
        pos = window(i, j)
        thres = u[a, b, i, j] * sum(x[a, b, p, q] for p, q in pos)
        cum = 0.0
        for p, q in pos:
            cum += x[a, b, p, q]
            if cum >= thres:
                ref[a, b, i, j] = x[a, b, p, q]
                picked[a, b, i, j] = (p, q)
                break
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    # Caffe's backward: each top diff goes to the element its window picked
    dy = rand(*y.shape, seed=4)
    y.backward(torch.as_tensor(dy))
    dx = np.zeros_like(x)
    for (a, b, i, j), (p, q) in picked.items():
        dx[a, b, p, q] += dy[a, b, i, j]
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-12)
    # no random draw at net build
    state = torch.get_rng_state()
    assert layer.infer_tops([tensors[0]])[0].shape == y.shape
    assert torch.equal(state, torch.get_rng_state())


def test_stochastic_pooling_train_picks_by_probability():
    x = np.tile(np.array([1.0, 3.0]), (4000, 1, 1, 1))  # one window [1, 3]
    (y,) = run64(pool_text("pool: STOCHASTIC kernel_h: 1 kernel_w: 2"), x)
    assert set(np.unique(y)) == {1.0, 3.0}
    assert abs((y == 3.0).mean() - 0.75) < 0.03


@pytest.mark.parametrize("params,message", [
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("pool: MAX kernel_h: 2", "both kernel_h and kernel_w"),
    ("pool: MAX", "both kernel_h and kernel_w"),
    ("pool: MAX global_pooling: true kernel_size: 2", "kernel size cannot be given"),
    ("pool: MAX global_pooling: true pad: 1", "only pad 0 and stride 1"),
    ("pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", "give pad, or both pad_h and pad_w"),
    ("pool: MAX kernel_size: 2 stride_h: 2", "give stride, or both stride_h and stride_w"),
    ("pool: MAX kernel_size: 2 pad: 2", r"pad \(2, 2\) must be smaller than the kernel"),
    ("pool: STOCHASTIC kernel_size: 2 pad: 1", "only for MAX and AVE"),
    ("pool: MAX kernel_size: 0", "cannot be zero"),
    ("pool: MAX kernel_size: 7", "output would be empty"),
])
def test_pooling_errors(params, message):
    with pytest.raises(UserError, match=message):
        make_layer(pool_text(params), [np.zeros((1, 1, 5, 5))])


def test_pooling_top_count_and_axes_errors():
    with pytest.raises(UserError, match="only MAX pooling can have a second"):
        make_layer(pool_text("pool: AVE kernel_size: 2", tops=("y", "m")), [np.zeros((1, 1, 4, 4))])
    with pytest.raises(UserError, match="4 axes"):
        make_layer(pool_text("pool: MAX kernel_size: 2"), [np.zeros((1, 4, 4))])


# ===================== SPP =====================
def spp_text(params: str) -> str:
    return layer_text("SPP", f"spp_param {{ {params} }}")


def spp_ref(x, height, method):
    """Caffe's SPP: level l pools with kernel ceil(size / 2^l), pad (kernel * 2^l - size + 1) // 2,
    stride = kernel; the levels' tops are flattened and concatenated (a single level is not)."""
    outs = []
    for level in range(height):
        bins = 2 ** level
        k = [math.ceil(s / bins) for s in x.shape[2:]]
        p = [(kk * bins - s + 1) // 2 for kk, s in zip(k, x.shape[2:])]
        top, _ = pool_ref(x, method, k, p, k)
        outs.append(top)
    if height == 1:
        return outs[0]
    return np.concatenate([o.reshape(x.shape[0], -1) for o in outs], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape", [(2, 3, 13, 9), (1, 2, 8, 8), (1, 1, 7, 12)])
def test_spp(method, shape):
    x = rand(*shape)
    text = spp_text(f"pyramid_height: 3 pool: {method}")
    (y,) = run64(text, x)
    ref = spp_ref(x, 3, method)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    layer, _ = make_layer(text, [x])
    assert tuple(layer.infer_tops([torch.zeros(shape)])[0].shape) == ref.shape
    check_gradients(text, x)


def test_spp_shapes():
    x = rand(2, 3, 13, 9)
    (y,) = run64(spp_text("pyramid_height: 3"), x)
    assert y.shape == (2, 3 * (1 + 4 + 16))
    # a single level is a plain Pooling layer in Caffe: its top is not flattened
    (y,) = run64(spp_text("pyramid_height: 1 pool: AVE"), x)
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(y[..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-12)


def test_spp_errors():
    # 5 rows in 4 bins: kernel 2, pad 2; Caffe's inner Pooling layer refuses pad >= kernel
    with pytest.raises(UserError, match="pyramid level 2 on a 5x8 input: pad"):
        make_layer(spp_text("pyramid_height: 3"), [np.zeros((1, 1, 5, 8))])
    with pytest.raises(UserError, match="only for MAX and AVE"):
        make_layer(spp_text("pyramid_height: 2 pool: STOCHASTIC"), [np.zeros((1, 1, 5, 8))])
    with pytest.raises(UserError, match="pyramid_height"):
        make_layer(spp_text("pyramid_height: 0"), [np.zeros((1, 1, 5, 8))])
