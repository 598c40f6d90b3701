"""Activation layers against numpy references written from Caffe's Forward_cpu/Backward_cpu."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe.errors import UserError
from tests.engine.layer_harness import TEST, check_gradients, forward, make_layer, run_backward


def layer_text(kind: str, params: str = "", bottom: str = "x", top: str = "y") -> str:
    return f'name: "l" type: "{kind}" bottom: "{bottom}" top: "{top}" {params}'


# inputs with exact zeros and both signs
X = np.array([[[[-2.0, -0.5, 0.0, 0.5], [1.5, 0.0, -3.0, 2.5]],
               [[0.25, -1.25, 3.0, 0.0], [-0.75, 0.0, 1.0, -4.0]],
               [[0.0, 2.0, -2.0, 0.125], [-0.125, 0.5, 0.0, -1.0]]]])  # (1, 3, 2, 4)


def f32(v: float) -> float:
    """A float parameter as caffe.proto stores it (float32)."""
    return float(np.float32(v))


def smooth_input(shape=(2, 3, 2, 3), seed=1, low=0.1):
    """Random values kept at least `low` away from 0 (so kinks at 0 don't upset finite differences)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(low, 2.0, size=shape)
    return v * rng.choice([-1.0, 1.0], size=shape)


# --- ReLU ---
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_forward_and_caffe_backward_at_zero(slope):
    text = layer_text("ReLU", f"relu_param {{ negative_slope: {slope} }}")
    slope = f32(slope)
    (y,) = forward(text, X)
    np.testing.assert_allclose(y, np.maximum(X, 0) + slope * np.minimum(X, 0), rtol=1e-6)
    _, (dy,), (dx,), _ = run_backward(text, X)
    # Caffe: top_diff * ((x > 0) + negative_slope * (x <= 0)); at exactly 0 the slope
    np.testing.assert_allclose(dx, dy * ((X > 0) + slope * (X <= 0)), rtol=1e-12)
    check_gradients(text, smooth_input())


def test_neuron_layers_take_one_bottom_and_keep_shape():
    with pytest.raises(UserError, match="exactly 1 bottom"):
        make_layer('name: "l" type: "ReLU" bottom: "a" bottom: "b" top: "y"', [X, X])
    for kind in ("ReLU", "Sigmoid", "TanH", "AbsVal", "BNLL", "ELU", "Swish", "Power", "Exp", "Threshold"):
        x = np.ones((2, 3, 5))
        assert forward(layer_text(kind), x)[0].shape == (2, 3, 5)


# --- PReLU ---
def test_prelu_blob_shape_default_filler_and_forward():
    layer, _ = make_layer(layer_text("PReLU"), [X])
    assert tuple(layer.blobs[0].shape) == (3,) and layer.blob_learnable == [True]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), [0.25, 0.25, 0.25])
    shared, _ = make_layer(layer_text("PReLU", "prelu_param { channel_shared: true }"), [X])
    assert tuple(shared.blobs[0].shape) == ()  # Caffe: a 0-axis blob
    filled, _ = make_layer(layer_text("PReLU", 'prelu_param { filler { type: "constant" value: 0.5 } }'), [X])
    np.testing.assert_array_equal(filled.blobs[0].numpy(), [0.5, 0.5, 0.5])

    slopes = np.array([0.1, -0.2, 0.3])
    (y,) = forward(layer_text("PReLU"), X, blobs=[slopes])
    a = slopes[None, :, None, None]
    np.testing.assert_allclose(y, np.maximum(X, 0) + a * np.minimum(X, 0), rtol=1e-6)
    (y,) = forward(layer_text("PReLU", "prelu_param { channel_shared: true }"), X, blobs=[np.array(0.3)])
    np.testing.assert_allclose(y, np.maximum(X, 0) + 0.3 * np.minimum(X, 0), rtol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_backward_matches_caffe(shared):
    text = layer_text("PReLU", f'prelu_param {{ channel_shared: {str(shared).lower()} '
                               'filler { type: "uniform" min: -0.5 max: 0.5 } }')
    torch.manual_seed(3)
    layer, _ = make_layer(text, [X])
    slope = layer.blobs[0].double().numpy()
    torch.manual_seed(3)
    _, (dy,), (dx,), (dslope,) = run_backward(text, X)
    a = slope if shared else slope[None, :, None, None]
    np.testing.assert_allclose(dx, dy * ((X > 0) + a * (X <= 0)), rtol=1e-12)
    contrib = dy * X * (X <= 0)
    want = contrib.sum() if shared else contrib.sum(axis=(0, 2, 3))
    np.testing.assert_allclose(dslope, want, rtol=1e-12)
    check_gradients(text, smooth_input())


def test_prelu_needs_two_axes():
    with pytest.raises(UserError, match="at least 2 axes"):
        make_layer(layer_text("PReLU"), [np.ones(4)])


# --- ELU ---
def test_elu_forward_and_gradient_alpha_at_zero():
    text = layer_text("ELU", "elu_param { alpha: 0.7 }")
    (y,) = forward(text, X)
    np.testing.assert_allclose(y, np.maximum(X, 0) + 0.7 * (np.exp(np.minimum(X, 0)) - 1), rtol=1e-6)
    tops, (dy,), (dx,), _ = run_backward(text, X)
    # Caffe: top_diff * ((x > 0) + (alpha + top) * (x <= 0))
    np.testing.assert_allclose(dx, dy * ((X > 0) + (f32(0.7) + tops[0]) * (X <= 0)), rtol=1e-12)
    check_gradients(text, smooth_input())


# --- Sigmoid, TanH ---
def test_sigmoid_uses_caffes_tanh_formula():
    x = np.array([-40.0, -5.0, 0.0, 0.5, 3.0, 40.0], dtype=np.float32).reshape(1, 6)
    (y,) = forward(layer_text("Sigmoid"), x)
    np.testing.assert_allclose(y, 0.5 * np.tanh(0.5 * x) + 0.5, rtol=1e-6, atol=1e-7)
    assert y[0, 0] == 0.0  # saturates to exactly 0, unlike 1 / (1 + exp(40))
    tops, (dy,), (dx,), _ = run_backward(layer_text("Sigmoid"), X)
    np.testing.assert_allclose(dx, dy * tops[0] * (1 - tops[0]), rtol=1e-12)
    check_gradients(layer_text("Sigmoid"), smooth_input())


def test_tanh():
    (y,) = forward(layer_text("TanH"), X)
    np.testing.assert_allclose(y, np.tanh(X), rtol=1e-6)
    tops, (dy,), (dx,), _ = run_backward(layer_text("TanH"), X)
    np.testing.assert_allclose(dx, dy * (1 - tops[0] ** 2), rtol=1e-12)
    check_gradients(layer_text("TanH"), smooth_input())


# --- AbsVal ---
def test_absval_forward_backward_and_no_in_place():
    (y,) = forward(layer_text("AbsVal"), X)
    np.testing.assert_array_equal(y, np.abs(X))
    _, (dy,), (dx,), _ = run_backward(layer_text("AbsVal"), X)
    np.testing.assert_allclose(dx, dy * np.sign(X), rtol=1e-12)  # 0 at x == 0
    check_gradients(layer_text("AbsVal"), smooth_input())
    with pytest.raises(UserError, match="in-place"):
        make_layer(layer_text("AbsVal", top="x"), [X])


# --- BNLL ---
def test_bnll_forward_at_large_inputs():
    x = np.array([[-1000.0, -60.0, -1.0, 0.0, 1.0, 60.0, 1000.0]], dtype=np.float32)
    (y,) = forward(layer_text("BNLL"), x)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = np.where(xd > 0, xd + np.log1p(np.exp(-xd)), np.log1p(np.exp(xd)))
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-30)
    assert np.isfinite(y).all()


def test_bnll_backward_uses_caffes_threshold():
    x = np.array([[-1000.0, -60.0, -1.0, 0.0, 1.0, 60.0, 1000.0]])
    _, (dy,), (dx,), _ = run_backward(layer_text("BNLL"), x)
    # Caffe: expval = exp(min(x, 50)); top_diff * expval / (expval + 1)
    e = np.exp(np.minimum(x, 50.0))
    np.testing.assert_allclose(dx, dy * e / (e + 1), rtol=1e-12)
    assert np.isfinite(dx).all()  # exp(1000) would overflow without the threshold
    check_gradients(layer_text("BNLL"), smooth_input())


# --- Power ---
def caffe_power_backward(x, y, dy, power, scale, shift):
    diff_scale = power * scale
    if diff_scale == 0:
        return np.zeros_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        if power == 1:
            d = np.full_like(x, diff_scale)
        elif power == 2:
            d = diff_scale * scale * x + diff_scale * shift
        elif shift == 0:
            d = y / x * power
        else:
            d = diff_scale * y / (scale * x + shift)
    return dy * d


POWER_CASES = [
    (2.0, 0.5, 1.0),    # squared special case
    (3.0, 1.0, 0.0),    # shift 0: power * y / x
    (1.5, 2.0, 5.0),    # general case
    (1.0, -2.0, 0.5),   # power 1: constant diff_scale
    (0.0, 3.0, 1.0),    # power 0: output 1, no gradient
    (3.0, 0.0, 2.0),    # scale 0: output shift^power, no gradient
    (-1.0, 1.0, 10.0),  # negative power
]


@pytest.mark.parametrize("power,scale,shift", POWER_CASES)
def test_power_forward_and_caffe_backward(power, scale, shift):
    text = layer_text("Power", f"power_param {{ power: {power} scale: {scale} shift: {shift} }}")
    x = np.abs(X) + 0.5 if power == 1.5 else X
    (y,) = forward(text, x)
    if scale * power == 0:
        want = np.full_like(x, 1.0 if power == 0 else shift ** power)
    else:
        want = (shift + scale * x) ** power
    np.testing.assert_allclose(y, want, rtol=1e-6)
    tops, (dy,), (dx,), _ = run_backward(text, x)
    np.testing.assert_allclose(dx, caffe_power_backward(x, tops[0], dy, power, scale, shift), rtol=1e-12)


def test_power_backward_nan_at_zero_base_as_caffe():
    # Caffe divides the output by x when shift is 0: 0/0 at x == 0 (true gradient is 0)
    text = layer_text("Power", "power_param { power: 3 }")
    _, _, (dx,), _ = run_backward(text, np.array([[0.0, 1.0]]))
    assert np.isnan(dx[0, 0]) and np.isfinite(dx[0, 1])


@pytest.mark.parametrize("power,scale,shift", [(2.0, 0.5, 1.0), (1.5, 2.0, 5.0), (-1.0, 1.0, 10.0), (3.0, 1.0, 0.0)])
def test_power_gradient_matches_finite_differences_away_from_zero(power, scale, shift):
    text = layer_text("Power", f"power_param {{ power: {power} scale: {scale} shift: {shift} }}")
    check_gradients(text, np.abs(smooth_input()) + 0.2)


# --- Exp, Log ---
@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (-1.0, 2.0, 0.5), (2.0, 3.0, 1.0), (0.5, -1.0, -2.0)])
def test_exp_forward_and_gradient(base, scale, shift):
    text = layer_text("Exp", f"exp_param {{ base: {base} scale: {scale} shift: {shift} }}")
    x = X / 4
    (y,) = forward(text, x)
    b = np.e if base == -1 else base
    np.testing.assert_allclose(y, b ** (shift + scale * x), rtol=1e-5)
    check_gradients(text, smooth_input() / 4)


@pytest.mark.parametrize("kind", ["Exp", "Log"])
@pytest.mark.parametrize("base", [0.0, -2.0])
def test_exp_log_reject_nonpositive_base(kind, base):
    with pytest.raises(UserError, match="base must be strictly positive"):
        make_layer(layer_text(kind, f"{kind.lower()}_param {{ base: {base} }}"), [X])


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (10.0, 2.0, 0.5), (2.0, -1.0, 5.0)])
def test_log_forward_and_gradient(base, scale, shift):
    text = layer_text("Log", f"log_param {{ base: {base} scale: {scale} shift: {shift} }}")
    x = np.abs(X) + 0.5 if scale > 0 else X
    (y,) = forward(text, x)
    want = np.log(shift + scale * x) / (1.0 if base == -1 else np.log(base))
    np.testing.assert_allclose(y, want, rtol=1e-5)
    inputs = np.abs(smooth_input()) + 0.5 if scale > 0 else smooth_input()
    check_gradients(text, inputs)


def test_log_base_one_is_an_error():
    with pytest.raises(UserError, match="infinite"):
        make_layer(layer_text("Log", "log_param { base: 1 }"), [X])


# --- Threshold ---
def test_threshold_forward():
    (y,) = forward(layer_text("Threshold", "threshold_param { threshold: 0.5 }"), X)
    np.testing.assert_array_equal(y, (X > 0.5).astype(np.float32))  # x == threshold gives 0
    (y,) = forward(layer_text("Threshold"), X)
    np.testing.assert_array_equal(y, (X > 0).astype(np.float32))


def test_threshold_has_no_backward_like_caffe():
    layer, (x,) = make_layer(layer_text("Threshold"), [X])
    x.requires_grad_(True)
    (y,) = layer.forward([x])
    with pytest.raises(UserError, match="no backward"):
        y.sum().backward()
    # no gradient needed: no error (Caffe skips Backward for such layers)
    (y,) = layer.forward([torch.as_tensor(X)])
    assert not y.requires_grad


# --- Clip ---
def test_clip_forward_and_backward_inclusive_bounds():
    text = layer_text("Clip", "clip_param { min: -0.5 max: 1 }")
    (y,) = forward(text, X)
    np.testing.assert_array_equal(y, np.maximum(-0.5, np.minimum(X, 1.0)))
    _, (dy,), (dx,), _ = run_backward(text, X)
    # Caffe: top_diff * (x >= min && x <= max): the bounds themselves pass the gradient
    assert (X == -0.5).any() and (X == 1.0).any()
    np.testing.assert_array_equal(dx, dy * ((X >= -0.5) & (X <= 1.0)))


def test_clip_min_above_max_gives_min_like_caffe():
    text = layer_text("Clip", "clip_param { min: 1 max: -1 }")
    (y,) = forward(text, X)
    np.testing.assert_array_equal(y, np.ones_like(X))
    _, _, (dx,), _ = run_backward(text, X)
    np.testing.assert_array_equal(dx, np.zeros_like(X))


def test_clip_needs_min_and_max():
    with pytest.raises(UserError, match="min and max"):
        make_layer(layer_text("Clip", "clip_param { min: 1 }"), [X])


# --- Swish ---
@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_swish_forward_and_caffe_backward(beta):
    text = layer_text("Swish", f"swish_param {{ beta: {beta} }}")
    sig = 0.5 * np.tanh(0.5 * beta * X) + 0.5
    (y,) = forward(text, X)
    np.testing.assert_allclose(y, X * sig, rtol=1e-6, atol=1e-7)
    tops, (dy,), (dx,), _ = run_backward(text, X)
    by = beta * tops[0]
    np.testing.assert_allclose(dx, dy * (by + sig * (1 - by)), rtol=1e-12)
    check_gradients(text, smooth_input())


# --- Dropout ---
def test_dropout_train_mask_statistics_and_scaling():
    x = np.ones((10, 100, 10, 10), dtype=np.float32)
    text = layer_text("Dropout", "dropout_param { dropout_ratio: 0.3 }")
    torch.manual_seed(7)
    (y1,) = forward(text, x)
    torch.manual_seed(7)
    (y2,) = forward(text, x)
    np.testing.assert_array_equal(y1, y2)  # the mask comes from torch's global generator
    scale = np.float32(1.0) / np.float32(1.0 - np.float32(0.3))
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], scale, rtol=1e-7)
    assert abs(kept.mean() - 0.7) < 0.01


def test_dropout_backward_is_mask_times_scale():
    layer, (x,) = make_layer(layer_text("Dropout"), [np.arange(1, 201, dtype=np.float32).reshape(2, 100)],
                             dtype=torch.float64)
    x.requires_grad_(True)
    (y,) = layer.forward([x])
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g)
    mask = (y.detach() != 0).double()
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(x.grad, g * mask * 2.0)


def test_dropout_identity_at_test_and_no_random_draws_when_inferring():
    (y,) = forward(layer_text("Dropout"), X, phase=TEST)
    np.testing.assert_array_equal(y, X.astype(np.float32))
    state = torch.get_rng_state()
    layer, tensors = make_layer(layer_text("Dropout"), [X])
    (t,) = layer.infer_tops(tensors)
    assert t.shape == tensors[0].shape
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_dropout_ratio_must_be_a_probability_below_one(ratio):
    with pytest.raises(UserError, match="dropout_ratio"):
        make_layer(layer_text("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}"), [X])


def test_dropout_ratio_zero_is_identity_in_train():
    (y,) = forward(layer_text("Dropout", "dropout_param { dropout_ratio: 0 }"), X)
    np.testing.assert_array_equal(y, X.astype(np.float32))
