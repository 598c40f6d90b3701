"""Normalization layers against numpy references written from Caffe's Forward_cpu/Backward_cpu."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from mpicaffe.errors import UserError
from tests.engine.layer_harness import TEST, TRAIN, check_gradients, forward, make_layer, run_backward


def layer_text(kind: str, params: str = "", bottoms=("x",), top: str = "y") -> str:
    b = " ".join(f'bottom: "{name}"' for name in bottoms)
    return f'name: "l" type: "{kind}" {b} top: "{top}" {params}'


def f32(v: float) -> float:
    """A float parameter as caffe.proto stores it (float32)."""
    return float(np.float32(v))


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale + shift


# --- BatchNorm ---
def bn_reduce_axes(x):
    return (0, *range(2, x.ndim))


def bn_bcast(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def test_batchnorm_blobs_and_param_specs():
    text = layer_text("BatchNorm")
    layer, _ = make_layer(text, [rand(2, 3, 4)])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,), (1,)]
    assert layer.blob_learnable == [False, False, False]
    assert all(float(b.abs().sum()) == 0 for b in layer.blobs)
    # Caffe's LayerSetUp adds ParamSpec { lr_mult: 0 } for each statistic (kept in the layer's param,
    # which the net writes into .caffemodel files)
    assert [(s.HasField("lr_mult"), s.lr_mult) for s in layer.param.param] == [(True, 0.0)] * 3
    layer, _ = make_layer(text + " param { lr_mult: 0 decay_mult: 0 }", [rand(2, 3)])
    assert len(layer.param.param) == 3 and layer.param.param[0].decay_mult == 0


@pytest.mark.parametrize("spec", ["param { lr_mult: 1 }", "param { lr_mult: 0 } param { decay_mult: 0 }"])
def test_batchnorm_rejects_learning_the_statistics(spec):
    with pytest.raises(UserError, match="cannot configure batch normalization statistics"):
        make_layer(layer_text("BatchNorm", spec), [rand(2, 3)])


def test_batchnorm_needs_channels_axis_and_matching_channels():
    with pytest.raises(UserError, match="at least 2 axes"):
        make_layer(layer_text("BatchNorm"), [rand(5)])
    layer, _ = make_layer(layer_text("BatchNorm"), [rand(2, 3)])
    with pytest.raises(UserError, match="3 channels"):
        layer.forward([torch.zeros(2, 4)])


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (6, 2), (1, 2, 1, 1)])
def test_batchnorm_train_updates_statistics_like_caffe_then_test_uses_them(shape):
    maf, eps = 0.9, 1e-3
    text = layer_text("BatchNorm", f"batch_norm_param {{ moving_average_fraction: {maf} eps: {eps} }}")
    maf, eps = f32(maf), f32(eps)
    layer, _ = make_layer(text, [np.zeros(shape)], TRAIN, dtype=torch.float64)
    c = shape[1]
    mean_sum, var_sum, factor = np.zeros(c), np.zeros(c), np.zeros(1)
    for step in range(3):
        x = rand(*shape, seed=step, scale=1 + step, shift=step - 1)
        with torch.no_grad():
            (y,) = layer.forward([torch.as_tensor(x)])
        axes = bn_reduce_axes(x)
        mean = x.mean(axis=axes)
        var = ((x - bn_bcast(mean, x)) ** 2).mean(axis=axes)
        np.testing.assert_allclose(y.numpy(), (x - bn_bcast(mean, x)) / np.sqrt(bn_bcast(var, x) + eps),
                                   rtol=1e-10, atol=1e-12)
        m = x.size // c
        correction = m / (m - 1) if m > 1 else 1.0
        factor = factor * maf + 1
        mean_sum = mean + maf * mean_sum
        var_sum = correction * var + maf * var_sum
        np.testing.assert_allclose(layer.blobs[2].numpy(), factor, rtol=1e-12)
        np.testing.assert_allclose(layer.blobs[0].numpy(), mean_sum, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.blobs[1].numpy(), var_sum, rtol=1e-10, atol=1e-12)

    x = rand(*shape, seed=9)
    want = (x - bn_bcast(mean_sum / factor, x)) / np.sqrt(bn_bcast(var_sum / factor, x) + eps)
    (y,) = forward(text, x, phase=TEST, blobs=[mean_sum, var_sum, factor])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # use_global_stats: true in TRAIN uses the stored statistics and leaves them alone
    glob = text.replace("batch_norm_param {", "batch_norm_param { use_global_stats: true")
    layer, _ = make_layer(glob, [x], TRAIN)
    layer.blobs = [torch.as_tensor(b, dtype=torch.float32) for b in (mean_sum, var_sum, factor)]
    (y,) = layer.forward([torch.as_tensor(x, dtype=torch.float32)])
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.blobs[2].numpy(), factor, rtol=1e-7)


def test_batchnorm_zero_scale_factor_means_zero_statistics():
    x = rand(2, 3, 2)
    (y,) = forward(layer_text("BatchNorm"), x, phase=TEST, blobs=[np.ones(3), np.ones(3), np.zeros(1)])
    np.testing.assert_allclose(y, x / np.sqrt(f32(1e-5)), rtol=1e-5)


def test_batchnorm_infer_tops_does_not_touch_statistics():
    layer, tensors = make_layer(layer_text("BatchNorm"), [rand(2, 3, 2)])
    (t,) = layer.infer_tops(tensors)
    assert t.shape == tensors[0].shape
    assert all(float(b.abs().sum()) == 0 for b in layer.blobs)


def caffe_bn_backward(y, dy, std, use_global_stats):
    """Transcription of BatchNormLayer::Backward_cpu; y is the normalized top, std sqrt(var + eps)."""
    s = bn_bcast(std, y)
    if use_global_stats:
        return dy / s
    axes = bn_reduce_axes(y)
    m = y.size // y.shape[1]
    d = bn_bcast((dy * y).sum(axis=axes), y) * y
    d = d + bn_bcast(dy.sum(axis=axes), y)
    d = dy - d / m
    return d / s


@pytest.mark.parametrize("shape", [(3, 2, 2, 3), (5, 4)])
def test_batchnorm_backward_train_matches_caffe(shape):
    eps = f32(1e-5)
    x = rand(*shape, seed=4, scale=2.0)
    (y,), (dy,), (dx,), _ = run_backward(layer_text("BatchNorm"), x, phase=TRAIN)
    var = x.var(axis=bn_reduce_axes(x))
    np.testing.assert_allclose(dx, caffe_bn_backward(y, dy, np.sqrt(var + eps), False), rtol=1e-8, atol=1e-10)
    check_gradients(layer_text("BatchNorm"), x, phase=TRAIN)


def test_batchnorm_backward_global_stats_matches_caffe():
    eps = f32(1e-5)
    x = rand(3, 2, 2, 2, seed=5)
    layer, (xt,) = make_layer(layer_text("BatchNorm"), [x], TEST, dtype=torch.float64)
    mean_sum, var_sum, factor = np.array([0.5, -1.0]), np.array([2.0, 0.5]), np.array([2.0])
    layer.blobs = [torch.as_tensor(b) for b in (mean_sum, var_sum, factor)]
    xt.requires_grad_(True)
    (y,) = layer.forward([xt])
    dy = rand(*y.shape, seed=6)
    y.backward(torch.as_tensor(dy))
    std = np.sqrt(var_sum / factor + eps)
    want = caffe_bn_backward(y.detach().numpy(), dy, std, use_global_stats=True)
    np.testing.assert_allclose(xt.grad.numpy(), want, rtol=1e-12)


# --- Scale ---
def test_scale_default_blob_is_ones_along_channels():
    x = rand(2, 3, 4, 2)
    layer, _ = make_layer(layer_text("Scale"), [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,)] and layer.blob_learnable == [True]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.ones(3))
    s = np.array([0.5, -2.0, 3.0])
    (y,) = forward(layer_text("Scale"), x, blobs=[s])
    np.testing.assert_allclose(y, x * s[None, :, None, None], rtol=1e-6)


@pytest.mark.parametrize("axis,num_axes,blob_shape,bcast", [
    (0, -1, (2, 3, 4, 2), (2, 3, 4, 2)),
    (-2, 2, (4, 2), (1, 1, 4, 2)),
    (1, 2, (3, 4), (1, 3, 4, 1)),
    (2, 0, (), (1, 1, 1, 1)),
    (0, 1, (2,), (2, 1, 1, 1)),
])
def test_scale_axis_num_axes_shapes(axis, num_axes, blob_shape, bcast):
    x = rand(2, 3, 4, 2)
    params = f"scale_param {{ axis: {axis} num_axes: {num_axes} }}"
    layer, _ = make_layer(layer_text("Scale", params), [x])
    assert tuple(layer.blobs[0].shape) == blob_shape
    s = rand(*blob_shape, seed=2) if blob_shape else np.array(1.5)
    (y,) = forward(layer_text("Scale", params), x, blobs=[s])
    np.testing.assert_allclose(y, x * s.reshape(bcast), rtol=1e-6)
    check_gradients(layer_text("Scale", params), x)


def test_scale_with_bias_term_and_fillers():
    x = rand(2, 3, 2)
    params = ('scale_param { bias_term: true filler { type: "constant" value: 2 } '
              'bias_filler { type: "constant" value: 0.5 } }')
    layer, _ = make_layer(layer_text("Scale", params), [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), [2, 2, 2])
    np.testing.assert_array_equal(layer.blobs[1].numpy(), [0.5, 0.5, 0.5])
    default, _ = make_layer(layer_text("Scale", "scale_param { bias_term: true }"), [x])
    np.testing.assert_array_equal(default.blobs[1].numpy(), [0, 0, 0])  # bias filler defaults to 0
    s, b = np.array([1.0, -1.0, 0.5]), np.array([0.25, 0.0, -3.0])
    (y,) = forward(layer_text("Scale", params), x, blobs=[s, b])
    np.testing.assert_allclose(y, x * s[None, :, None] + b[None, :, None], rtol=1e-6)
    check_gradients(layer_text("Scale", params), x)


def test_scale_with_two_bottoms():
    x, s = rand(2, 3, 4), rand(3, 4, seed=1)
    text = layer_text("Scale", bottoms=("x", "s"))
    layer, _ = make_layer(text, [x, s])
    assert layer.blobs == []
    (y,) = forward(text, x, s)
    np.testing.assert_allclose(y, x * s[None], rtol=1e-6)
    check_gradients(text, x, s)
    # bias_term with two bottoms: the only blob is the bias, shaped like the second bottom
    text = layer_text("Scale", "scale_param { bias_term: true axis: 0 }", bottoms=("x", "s"))
    s0 = rand(2, seed=3)
    layer, _ = make_layer(text, [x, s0])
    assert [tuple(b.shape) for b in layer.blobs] == [(2,)]
    b = np.array([1.0, -2.0])
    (y,) = forward(text, x, s0, blobs=[b])
    np.testing.assert_allclose(y, x * s0[:, None, None] + b[:, None, None], rtol=1e-6)
    check_gradients(text, x, s0)
    # a scalar second bottom scales everything
    (y,) = forward(layer_text("Scale", bottoms=("x", "s")), x, np.array(2.0))
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_scale_bias_parameter_errors(kind):
    x = rand(2, 3, 4)
    pname = f"{kind.lower()}_param"
    with pytest.raises(UserError, match="num_axes must be non-negative"):
        make_layer(layer_text(kind, f"{pname} {{ num_axes: -2 }}"), [x])
    with pytest.raises(UserError, match="extends past"):
        make_layer(layer_text(kind, f"{pname} {{ axis: 2 num_axes: 2 }}"), [x])
    with pytest.raises(UserError, match="out of range"):
        make_layer(layer_text(kind, f"{pname} {{ axis: 3 }}"), [x])
    with pytest.raises(UserError, match="dimension mismatch"):
        make_layer(layer_text(kind, bottoms=("x", "p")), [x, np.ones(4)])
    with pytest.raises(UserError, match="extends past"):
        make_layer(layer_text(kind, f"{pname} {{ axis: 2 }}", bottoms=("x", "p")), [x, np.ones((4, 1))])
    with pytest.raises(UserError, match="1 to 2 bottom"):
        make_layer(layer_text(kind, bottoms=("a", "b", "c")), [x, x, x])


# --- Bias ---
def test_bias_one_bottom_learned_and_two_bottoms():
    x = rand(2, 3, 4)
    layer, _ = make_layer(layer_text("Bias"), [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,)]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.zeros(3))
    filled, _ = make_layer(layer_text("Bias", 'bias_param { filler { type: "constant" value: 3 } }'), [x])
    np.testing.assert_array_equal(filled.blobs[0].numpy(), [3, 3, 3])
    b = np.array([1.0, -1.0, 2.0])
    (y,) = forward(layer_text("Bias"), x, blobs=[b])
    np.testing.assert_allclose(y, x + b[None, :, None], rtol=1e-6)
    params = "bias_param { axis: -2 num_axes: -1 }"
    layer, _ = make_layer(layer_text("Bias", params), [x])
    assert tuple(layer.blobs[0].shape) == (3, 4)
    check_gradients(layer_text("Bias", params), x)
    text = layer_text("Bias", "bias_param { axis: 0 }", bottoms=("x", "b"))
    b2 = rand(2, 3, seed=5)
    (y,) = forward(text, x, b2)
    np.testing.assert_allclose(y, x + b2[:, :, None], rtol=1e-6, atol=1e-6)
    check_gradients(text, x, b2)


# --- LRN ---
def lrn_across_ref(x, size, alpha, beta, k):
    c = x.shape[1]
    pre = (size - 1) // 2
    sq = x ** 2
    scale = np.full(x.shape, k, dtype=np.float64)
    for ch in range(c):
        for j in range(max(0, ch - pre), min(c, ch + pre + 1)):
            scale[:, ch] += alpha / size * sq[:, j]
    return x * scale ** -beta


def lrn_within_ref(x, size, alpha, beta):
    h, w = x.shape[2:]
    pad = (size - 1) // 2
    sq = x ** 2
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            # Caffe's AVE pooling: divisor from the window clipped to the padded input (here always
            # size * size), sum over the window clipped to the input
            hs, ws = i - pad, j - pad
            he, we = min(hs + size, h + pad), min(ws + size, w + pad)
            pool = (he - hs) * (we - ws)
            s = sq[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)].sum(axis=(2, 3))
            out[:, :, i, j] = x[:, :, i, j] * (1 + alpha * s / pool) ** -beta
    return out


@pytest.mark.parametrize("size,channels", [(1, 3), (3, 4), (5, 4), (5, 7), (7, 3)])
def test_lrn_across_channels_windows_at_the_channel_borders(size, channels):
    alpha, beta, k = 0.3, 0.75, 2.0
    x = rand(2, channels, 3, 2, seed=size)
    text = layer_text("LRN", f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}")
    (y,) = forward(text, x)
    np.testing.assert_allclose(y, lrn_across_ref(x, size, f32(alpha), beta, k), rtol=1e-5, atol=1e-6)
    check_gradients(text, x)


@pytest.mark.parametrize("size,h,w", [(3, 4, 3), (5, 4, 3), (5, 1, 6), (1, 2, 2)])
def test_lrn_within_channel_ignores_k_and_pads_like_caffe_pooling(size, h, w):
    alpha, beta = 0.8, 0.6
    x = rand(2, 2, h, w, seed=h + w)
    text = layer_text("LRN", f"lrn_param {{ norm_region: WITHIN_CHANNEL local_size: {size} alpha: {alpha} "
                             f"beta: {beta} k: 7 }}")
    (y,) = forward(text, x)
    np.testing.assert_allclose(y, lrn_within_ref(x, size, f32(alpha), f32(beta)), rtol=1e-5, atol=1e-6)
    check_gradients(text, x)


def test_lrn_errors():
    x = rand(1, 3, 2, 2)
    for size in (4, 0):
        with pytest.raises(UserError, match="odd values for local_size"):
            make_layer(layer_text("LRN", f"lrn_param {{ local_size: {size} }}"), [x])
    with pytest.raises(UserError, match="4 axes"):
        make_layer(layer_text("LRN"), [rand(2, 3, 4)])


# --- MVN ---
def mvn_ref(x, normalize_variance, across_channels, eps):
    shape = x.shape + (1,) * (4 - x.ndim)
    rows = shape[0] if across_channels else shape[0] * shape[1]
    v = x.reshape(rows, -1)
    d = v - v.mean(axis=1, keepdims=True)
    if normalize_variance:
        d = d / (np.sqrt((d ** 2).mean(axis=1, keepdims=True)) + eps)  # eps on the std
    return d.reshape(shape)


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [True, False])
def test_mvn_variants(normalize_variance, across_channels):
    eps = 0.5  # large, so eps on the std differs visibly from eps on the variance
    x = rand(2, 3, 2, 3, seed=1, scale=0.7, shift=0.3)
    params = (f"mvn_param {{ normalize_variance: {str(normalize_variance).lower()} "
              f"across_channels: {str(across_channels).lower()} eps: {eps} }}")
    (y,) = forward(layer_text("MVN", params), x)
    np.testing.assert_allclose(y, mvn_ref(x, normalize_variance, across_channels, eps), rtol=1e-5, atol=1e-6)


def test_mvn_top_has_caffes_legacy_4_axes():
    x = rand(3, 5)
    (y,) = forward(layer_text("MVN", "mvn_param { across_channels: true }"), x)
    assert y.shape == (3, 5, 1, 1)
    np.testing.assert_allclose(y, mvn_ref(x, True, True, f32(1e-9)), rtol=1e-5, atol=1e-6)
    (y,) = forward(layer_text("MVN"), x)  # one value per (num, channel): all zeros
    np.testing.assert_array_equal(y, np.zeros((3, 5, 1, 1)))
    with pytest.raises(UserError, match="at most 4 axes"):
        make_layer(layer_text("MVN"), [rand(1, 2, 3, 4, 5)])


def caffe_mvn_backward(y, dy, std, rows):
    """Transcription of MVNLayer::Backward_cpu (normalize_variance); std is sqrt(var) + eps."""
    yv, gv = y.reshape(rows, -1), dy.reshape(rows, -1)
    dim = yv.shape[1]
    d = (gv * yv).sum(axis=1, keepdims=True) * yv
    d = d + gv.sum(axis=1, keepdims=True)
    d = gv - d / dim
    return (d / std.reshape(rows, 1)).reshape(y.shape)


@pytest.mark.parametrize("across_channels", [True, False])
def test_mvn_backward_is_caffes_not_the_exact_gradient(across_channels):
    eps = 0.5
    x = rand(2, 3, 2, 2, seed=2)
    params = f"mvn_param {{ across_channels: {str(across_channels).lower()} eps: {eps} }}"
    (y,), (dy,), (dx,), _ = run_backward(layer_text("MVN", params), x)
    rows = 2 if across_channels else 6
    v = x.reshape(rows, -1)
    std = np.sqrt(((v - v.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)) + eps
    np.testing.assert_allclose(dx, caffe_mvn_backward(y, dy, std, rows), rtol=1e-10, atol=1e-12)
    with pytest.raises(GradcheckError):  # Caffe's formula ignores eps, so finite differences disagree
        check_gradients(layer_text("MVN", params), x)


def test_mvn_backward_finite_for_constant_rows_and_exact_without_variance():
    x = np.ones((1, 2, 2, 2))
    _, _, (dx,), _ = run_backward(layer_text("MVN"), x)
    assert np.isfinite(dx).all()
    x = rand(2, 3, 2, 2, seed=3)
    check_gradients(layer_text("MVN", "mvn_param { normalize_variance: false }"), x)
    check_gradients(layer_text("MVN", "mvn_param { eps: 0 }"), x)  # with eps 0, Caffe's is exact
