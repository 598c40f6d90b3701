"""Softmax, loss layers and Accuracy against numpy references written from Caffe's
Forward_cpu/Backward_cpu (2018 master, Debian's 20180821 snapshot)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net, tensor_to_blob_proto
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.engine.layer_harness import TRAIN, check_gradients, forward, make_layer

FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_THRESHOLD = float(np.float32(1e-20))
MODES = ("VALID", "FULL", "BATCH_SIZE", "NONE")


def run_backward(text, *bottoms, top_diffs=None, wrt=(0,)):
    """float64 forward + backward of `wrt` bottoms; returns tops and bottom diffs (numpy)."""
    layer, tensors = make_layer(text, bottoms, TRAIN, dtype=torch.float64)
    xs = [t.clone().requires_grad_(i in wrt) for i, t in enumerate(tensors)]
    tops = layer.forward(xs)
    diffs = top_diffs if top_diffs is not None else [np.ones(tops[0].shape)] + [np.zeros(t.shape) for t in tops[1:]]
    pairs = [(t, torch.as_tensor(d, dtype=torch.float64)) for t, d in zip(tops, diffs) if t.requires_grad]
    torch.autograd.backward([t for t, _ in pairs], [d for _, d in pairs])
    return [t.detach().numpy() for t in tops], [xs[i].grad.numpy() for i in wrt]


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def caffe_normalizer(mode, outer, inner, valid):
    n = {"VALID": valid, "FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))


def caffe_softmax_loss(x, label, axis=1, ignore=None, mode="VALID", top_diff=1.0):
    """SoftmaxWithLossLayer Forward_cpu/Backward_cpu as loops over (outer, inner)."""
    prob = np_softmax(x, axis)
    outer, channels = int(np.prod(x.shape[:axis])), x.shape[axis]
    p3 = prob.reshape(outer, channels, -1)
    inner = p3.shape[2]
    lab = label.reshape(outer, inner)
    loss, count = 0.0, 0
    diff = p3.copy()
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                diff[i, :, j] = 0
                continue
            loss -= math.log(max(p3[i, v, j], FLT_MIN))
            diff[i, v, j] -= 1
            count += 1
    norm = caffe_normalizer(mode, outer, inner, count)
    return loss / norm, (diff * top_diff / norm).reshape(x.shape), prob


# --- Softmax ---
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_softmax_forward_and_gradient(axis):
    x = np.random.default_rng(0).standard_normal((2, 3, 4)) * 3
    text = f'name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param {{ axis: {axis} }}'
    (y,) = forward(text, x)
    np.testing.assert_allclose(y, np_softmax(x, axis), rtol=1e-5, atol=1e-7)
    check_gradients(text, x)
    with pytest.raises(UserError, match="axis 3 out of range"):
        make_layer('name: "s" type: "Softmax" bottom: "x" top: "y" softmax_param { axis: 3 }', [x])


# --- SoftmaxWithLoss ---
def test_softmax_loss_hand_computed():
    # probabilities (0.5, 0.5) and (0.25, 0.75): loss = -(log 0.5 + log 0.75) / 2
    x = np.array([[0.0, 0.0], [0.0, math.log(3.0)]])
    (loss,) = forward('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"', x, np.array([0.0, 1.0]))
    assert loss.shape == ()
    np.testing.assert_allclose(loss, -(math.log(0.5) + math.log(0.75)) / 2, rtol=1e-6)
    # ignoring the second item under each normalization: VALID 1, FULL 2, BATCH_SIZE 2, NONE 1
    for mode, norm in zip(MODES, (1, 2, 2, 1)):
        text = ('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" '
                f'loss_param {{ ignore_label: 1 normalization: {mode} }}')
        (loss,) = forward(text, x, np.array([0.0, 1.0]))
        np.testing.assert_allclose(loss, -math.log(0.5) / norm, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_loss_normalizations_with_ignore_label(mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 2, 2))
    label = np.array([[0, 1, 255, 3], [2, 2, 255, 255], [1, 0, 3, 255]], dtype=float).reshape(3, 2, 2)
    text = ('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" '
            f'loss_param {{ ignore_label: 255 normalization: {mode} }} loss_weight: 2')
    ref_loss, ref_diff, _ = caffe_softmax_loss(x, label, ignore=255, mode=mode, top_diff=2.0)
    (loss,) = forward(text, x, label)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    (loss,), (dx,) = run_backward(text, x, label, top_diffs=[np.array(2.0)])
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-10, atol=1e-12)
    check_gradients(text, x, label, wrt=[0])


def test_softmax_loss_axis_and_deprecated_normalize():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4))
    label = np.array([[0, 3, 1], [2, 2, 1]], dtype=float)
    text = ('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" softmax_param { axis: 2 } '
            'loss_param { ignore_label: 1 }')
    (loss,), (dx,) = run_backward(text, x, label)
    ref_loss, ref_diff, _ = caffe_softmax_loss(x, label, axis=2, ignore=1)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-10, atol=1e-12)
    # has normalize (and no normalization): true -> VALID, false -> BATCH_SIZE
    base = 'name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" softmax_param { axis: 2 } '
    for flag, mode in (("true", "VALID"), ("false", "BATCH_SIZE")):
        (loss,) = forward(base + f'loss_param {{ ignore_label: 1 normalize: {flag} }}', x, label)
        np.testing.assert_allclose(loss, caffe_softmax_loss(x, label, 2, 1, mode)[0], rtol=1e-5)
    (loss,) = forward(base + 'loss_param { ignore_label: 1 normalize: false normalization: NONE }', x, label)
    np.testing.assert_allclose(loss, caffe_softmax_loss(x, label, 2, 1, "NONE")[0], rtol=1e-5)


def test_softmax_loss_clamps_at_flt_min_and_keeps_caffe_gradient():
    # p(label) underflows: loss is -log(FLT_MIN); Caffe's gradient is still prob - 1, not 0
    x = np.array([[0.0, -200.0]])
    text = 'name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"'
    (loss,) = forward(text, x, np.array([1.0]))
    np.testing.assert_allclose(loss, -math.log(FLT_MIN), rtol=1e-6)
    (loss,), (dx,) = run_backward(text, x, np.array([1.0]))
    _, ref_diff, _ = caffe_softmax_loss(x, np.array([1.0]))
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-12)
    np.testing.assert_allclose(dx, [[1.0, -1.0]], atol=1e-12)


def test_softmax_loss_all_ignored_and_prob_top():
    x = np.random.default_rng(3).standard_normal((2, 3))
    text = ('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" top: "prob" '
            'loss_param { ignore_label: -1 }')
    (loss, prob), (dx,) = run_backward(text, x, np.array([-1.0, -1.0]))
    assert loss == 0 and np.all(dx == 0)  # normalizer max(1, 0)
    np.testing.assert_allclose(prob, np_softmax(x, 1), rtol=1e-12)
    # Caffe's backward reads only the loss top's diff: a diff on the probabilities is ignored
    (loss, prob), (dx,) = run_backward(text, x, np.array([0.0, 2.0]), top_diffs=[np.array(1.0), np.ones((2, 3)) * 5])
    np.testing.assert_allclose(dx, caffe_softmax_loss(x, np.array([0.0, 2.0]), ignore=-1)[1], rtol=1e-12)
    layer, ts = make_layer(text, [x, np.zeros(2)])
    loss, prob = layer.forward([ts[0].requires_grad_(True), ts[1]])
    assert loss.requires_grad and not prob.requires_grad


def test_softmax_loss_errors():
    text = 'name: "lossy" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" loss_param { ignore_label: 7 }'
    x = np.zeros((2, 3))
    with pytest.raises(UserError, match=r"layer 'lossy' \(SoftmaxWithLoss\): label 3 is out of range: it must be "
                                        r"in \[0, 3\) and is not ignore_label 7"):
        forward(text, x, np.array([0.0, 3.0]))
    with pytest.raises(UserError, match="label -2 is out of range"):
        forward(text, x, np.array([-2.0, 1.0]))
    # Caffe would truncate it to class 1 (HDF5 labels are floats)
    with pytest.raises(UserError, match=r"layer 'lossy' \(SoftmaxWithLoss\): label 1.5 is not an integer"):
        forward(text, x, np.array([0.0, 1.5]))
    with pytest.raises(UserError, match="number of labels must match number of predictions"):
        forward(text, np.zeros((2, 3, 2)), np.zeros((2, 3)))
    with pytest.raises(UserError, match="same first dimension"):
        make_layer(text, [x, np.zeros(3)])
    with pytest.raises(UserError, match="1 to 2 top"):
        make_layer('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "a" top: "b" top: "c"',
                   [x, np.zeros(2)])


# --- SigmoidCrossEntropyLoss ---
def caffe_sigmoid_ce(x, t, ignore=None, mode=None, top_diff=1.0):
    """SigmoidCrossEntropyLossLayer: Caffe's stable loss, (sigmoid(x) - t) gradient."""
    xf, tf = x.reshape(-1), t.reshape(-1)
    loss, valid = 0.0, 0
    diff = 1 / (1 + np.exp(-xf)) - tf
    for i in range(xf.size):
        if ignore is not None and int(tf[i]) == ignore:
            diff[i] = 0
            continue
        pos = 1.0 if xf[i] >= 0 else 0.0
        loss -= xf[i] * (tf[i] - pos) - math.log(1 + math.exp(xf[i] - 2 * xf[i] * pos))
        valid += 1
    outer = x.shape[0]
    norm = caffe_normalizer(mode or "BATCH_SIZE", outer, xf.size // outer, valid)
    return loss / norm, (diff * top_diff / norm).reshape(x.shape)


@pytest.mark.parametrize("mode", [None, *MODES])
def test_sigmoid_cross_entropy_normalizations_with_ignore(mode):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5)) * 4
    t = rng.choice([0.0, 1.0, -1.0], size=(3, 5))
    norm = f"normalization: {mode} " if mode else ""
    text = ('name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" '
            f'loss_param {{ ignore_label: -1 {norm}}}')
    ref_loss, ref_diff = caffe_sigmoid_ce(x, t, ignore=-1, mode=mode)
    (loss,), (dx,) = run_backward(text, x, t)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-9, atol=1e-12)
    check_gradients(text, x, t, wrt=[0])


def test_sigmoid_cross_entropy_default_batch_size_and_extremes():
    x = np.array([[200.0, -200.0, 0.0], [1.0, -1.0, 30.0]])
    t = np.array([[0.0, 1.0, 1.0], [0.25, 1.0, 0.0]])
    text = 'name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss"'
    (loss,) = forward(text, x, t)
    np.testing.assert_allclose(loss, caffe_sigmoid_ce(x, t)[0], rtol=1e-6)
    assert np.isfinite(loss)
    (loss,) = forward(text + ' loss_param { normalize: true }', x, t)  # VALID: all 6 count
    np.testing.assert_allclose(loss, caffe_sigmoid_ce(x, t, mode="VALID")[0], rtol=1e-6)
    (_,), (dx,) = run_backward(text, x, t)
    np.testing.assert_allclose(dx, caffe_sigmoid_ce(x, t)[1], rtol=1e-9, atol=1e-15)
    with pytest.raises(UserError, match="inputs must have the same count"):
        make_layer(text, [x, np.zeros((2, 2))])


# --- EuclideanLoss ---
def test_euclidean_loss_and_both_gradients():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4, 1, 1))
    text = 'name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"'
    (loss,), (da, db) = run_backward(text, a, b, top_diffs=[np.array(3.0)], wrt=(0, 1))
    d = a - b.reshape(3, 4)
    np.testing.assert_allclose(loss, (d * d).sum() / 3 / 2, rtol=1e-12)
    np.testing.assert_allclose(da, 3.0 * d / 3, rtol=1e-12)
    np.testing.assert_allclose(db.reshape(3, 4), -3.0 * d / 3, rtol=1e-12)
    check_gradients(text, a, b)
    with pytest.raises(UserError, match="inputs must have the same dimension"):
        make_layer(text, [a, np.zeros((3, 5))])
    with pytest.raises(UserError, match="same first dimension"):
        make_layer(text, [a, np.zeros((4, 3))])


# --- HingeLoss ---
def caffe_hinge(x, label, norm="L1", top_diff=1.0):
    num = x.shape[0]
    d = x.reshape(num, -1).copy()
    for i in range(num):
        d[i, int(label[i])] *= -1
    d = np.maximum(0, 1 + d)
    loss = np.abs(d).sum() / num if norm == "L1" else (d * d).sum() / num
    g = d.copy()
    for i in range(num):
        g[i, int(label[i])] *= -1
    g = np.sign(g) * top_diff / num if norm == "L1" else g * top_diff * 2 / num
    return loss, g.reshape(x.shape)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    x = np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 0.0, 2.0, -1.0], [0.3, 0.2, -0.4, 3.0]])
    label = np.array([0.0, 2.0, 3.0])
    text = f'name: "l" type: "HingeLoss" bottom: "x" bottom: "y" top: "loss" hinge_loss_param {{ norm: {norm} }}'
    ref_loss, ref_diff = caffe_hinge(x, label, norm, 2.0)
    (loss,), (dx,) = run_backward(text, x, label, top_diffs=[np.array(2.0)])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    # includes margins exactly at 0 (x = -1 off the label), where Caffe's sign gives 0
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-12)
    smooth = np.random.default_rng(6).uniform(-3, 3, size=(3, 4))
    smooth[np.abs(np.abs(smooth) - 1) < 0.1] = 2.0
    check_gradients(text, smooth, label, wrt=[0])
    with pytest.raises(UserError, match=r"label 4 is out of range: it must be in \[0, 4\)"):
        forward(text, x, np.array([0.0, 4.0, 1.0]))


# --- InfogainLoss ---
def caffe_infogain(x, label, H, axis=1, ignore=None, mode="VALID"):
    prob = np_softmax(x, axis)
    outer, channels = int(np.prod(x.shape[:axis])), x.shape[axis]
    p3 = prob.reshape(outer, channels, -1)
    inner = p3.shape[2]
    lab = label.reshape(outer, inner)
    loss, count = 0.0, 0
    diff = np.zeros_like(p3)
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            for c in range(channels):
                loss -= H[v, c] * math.log(max(p3[i, c, j], LOG_THRESHOLD))
                diff[i, c, j] = p3[i, c, j] * H[v].sum() - H[v, c]
            count += 1
    norm = caffe_normalizer(mode, outer, inner, count)
    return loss / norm, (diff / norm).reshape(x.shape), prob


H3 = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.0], [0.0, 0.3, 2.0]])


@pytest.mark.parametrize("mode", MODES)
def test_infogain_loss_from_third_bottom(mode):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 2))
    label = np.array([[0, 2], [1, 9], [9, 9], [2, 1]], dtype=float)
    text = ('name: "l" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" top: "loss" '
            f'loss_param {{ ignore_label: 9 normalization: {mode} }}')
    ref_loss, ref_diff, _ = caffe_infogain(x, label, H3, ignore=9, mode=mode)
    (loss,), (dx,) = run_backward(text, x, label, H3)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-10, atol=1e-12)
    check_gradients(text, x, label, H3, wrt=[0])


def test_infogain_loss_clamp_gradient_source_file_and_prob_top(tmp_path):
    # p = e^-50 / 2 is below kLOG_THRESHOLD: loss uses log(1e-20), gradient is Caffe's unclamped formula
    x = np.array([[1.0, 2.0, 3.0], [0.0, -50.0, 0.0]])
    label = np.array([2.0, 1.0])
    bp = caffe_pb2.BlobProto()
    tensor_to_blob_proto(torch.as_tensor(H3), bp)
    path = tmp_path / "H.binaryproto"
    prototxt.write_binary(bp, str(path))
    text = ('name: "l" type: "InfogainLoss" bottom: "x" bottom: "y" top: "loss" top: "prob" '
            f'infogain_loss_param {{ source: "{path}" }}')
    ref_loss, ref_diff, ref_prob = caffe_infogain(x, label, H3)
    (loss, prob), (dx,) = run_backward(text, x, label)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-7)
    np.testing.assert_allclose(dx, ref_diff, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(dx[1], [0.2, -0.5, 0.3], atol=1e-12)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-12)
    # with the identity matrix it is SoftmaxWithLoss (up to the two clamps)
    x2 = np.random.default_rng(8).standard_normal((3, 3))
    (a,) = forward('name: "l" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" top: "loss"', x2,
                   np.array([0.0, 2.0, 1.0]), np.eye(3))
    (b,) = forward('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"', x2, np.array([0.0, 2.0, 1.0]))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_infogain_loss_errors():
    x, label = np.zeros((2, 3)), np.zeros(2)
    base = 'name: "l" type: "InfogainLoss" bottom: "x" bottom: "y" '
    with pytest.raises(UserError, match="infogain matrix source must be specified"):
        make_layer(base + 'top: "loss"', [x, label])
    with pytest.raises(UserError, match="normalize is deprecated"):
        make_layer(base + 'bottom: "H" top: "loss" loss_param { normalize: true }', [x, label, H3])
    with pytest.raises(UserError, match="infogain matrix H must be 3x3"):
        forward(base + 'bottom: "H" top: "loss"', x, label, np.eye(2))
    with pytest.raises(UserError, match="label 5 is out of range"):
        forward(base + 'bottom: "H" top: "loss"', x, np.array([0.0, 5.0]), H3)


# --- MultinomialLogisticLoss ---
def test_multinomial_logistic_loss_and_caffe_gradient_at_threshold():
    p = np.array([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]])
    label = np.array([2.0, 1.0])
    text = 'name: "l" type: "MultinomialLogisticLoss" bottom: "p" bottom: "y" top: "loss"'
    (loss,), (dp,) = run_backward(text, p, label, top_diffs=[np.array(2.0)])
    ref = -(math.log(LOG_THRESHOLD) + math.log(0.25)) / 2
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    # Caffe: -top_diff / N / max(p, kLOG_THRESHOLD) at the label, even where clamped
    want = np.zeros_like(p)
    want[0, 2] = -2.0 / 2 / LOG_THRESHOLD
    want[1, 1] = -2.0 / 2 / 0.25
    np.testing.assert_allclose(dp, want, rtol=1e-12)
    smooth = np.random.default_rng(9).uniform(0.1, 1.0, size=(3, 4, 1, 1))
    check_gradients(text, smooth, np.array([[1.0], [3.0], [0.0]]), wrt=[0])
    with pytest.raises(UserError, match="one value per item"):
        make_layer(text, [p, np.zeros((2, 3))])
    with pytest.raises(UserError, match=r"label 3 is out of range: it must be in \[0, 3\)"):
        forward(text, p, np.array([3.0, 0.0]))


# --- ContrastiveLoss ---
def caffe_contrastive(a, b, y, margin, legacy, top_diff=1.0):
    num = a.shape[0]
    diff = (a - b).reshape(num, -1)
    loss = 0.0
    ga = np.zeros_like(diff)
    for i in range(num):
        d2 = float(diff[i] @ diff[i])
        alpha = top_diff / num
        if int(y[i]):
            loss += d2
            ga[i] = alpha * diff[i]
            continue
        if legacy:
            loss += max(margin - d2, 0.0)
            mdist, beta = margin - d2, -alpha
        else:
            dist = math.sqrt(d2)
            loss += max(margin - dist, 0.0) ** 2
            mdist, beta = margin - dist, -alpha * (margin - dist) / (dist + 1e-4)
        ga[i] = beta * diff[i] if mdist > 0 else 0
    return loss / num / 2, ga.reshape(a.shape), -ga.reshape(b.shape)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    a = np.array([[1.0, 2.0], [0.0, 0.3], [1.0, 1.0], [0.2, 0.1]])
    b = np.array([[1.0, 1.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.4]])
    y = np.array([1.0, 0.0, 0.0, 0.5])  # 0.5 reads as int 0: dissimilar
    text = ('name: "l" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss" '
            f'contrastive_loss_param {{ margin: 1.5 legacy_version: {str(legacy).lower()} }}')
    ref_loss, ref_da, ref_db = caffe_contrastive(a, b, y, 1.5, legacy, 3.0)
    (loss,), (da, db) = run_backward(text, a, b, y, top_diffs=[np.array(3.0)], wrt=(0, 1))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(da, ref_da, rtol=1e-12)
    np.testing.assert_allclose(db, ref_db, rtol=1e-12)
    (loss32,) = forward(text, a.reshape(4, 2, 1, 1), b.reshape(4, 2, 1, 1), y.reshape(4, 1, 1, 1))
    np.testing.assert_allclose(loss32, ref_loss, rtol=1e-6)
    if legacy:  # Caffe's legacy backward is the true gradient (away from the margin)
        check_gradients(text, a, b, y, wrt=[0, 1])


def test_contrastive_loss_errors():
    text = 'name: "l" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss"'
    a = np.zeros((3, 2))
    with pytest.raises(UserError, match="same channels"):
        make_layer(text, [a, np.zeros((3, 4)), np.zeros(3)])
    with pytest.raises(UserError, match="height and width 1"):
        make_layer(text, [np.zeros((3, 2, 2)), np.zeros((3, 2, 2)), np.zeros(3)])
    with pytest.raises(UserError, match="one value per pair"):
        make_layer(text, [a, a, np.zeros((3, 2))])
    with pytest.raises(UserError, match="exactly 3 bottom"):
        make_layer('name: "l" type: "ContrastiveLoss" bottom: "a" bottom: "b" top: "loss"', [a, a])


# --- Accuracy ---
def caffe_accuracy(x, label, top_k=1, axis=1, ignore=None):
    """AccuracyLayer Forward_cpu: right if fewer than top_k other classes score >= the true one."""
    outer, channels = int(np.prod(x.shape[:axis])), x.shape[axis]
    s = x.reshape(outer, channels, -1)
    lab = label.reshape(outer, -1)
    right, count = 0, 0
    hits, seen = np.zeros(channels), np.zeros(channels)
    for i in range(outer):
        for j in range(s.shape[2]):
            v = int(lab[i, j])
            if ignore is not None and v == ignore:
                continue
            seen[v] += 1
            better = -1
            for k in range(channels):
                better += s[i, k, j] >= s[i, v, j]
            if better < top_k:
                right += 1
                hits[v] += 1
            count += 1
    per_class = np.where(seen > 0, hits / np.maximum(seen, 1), 0)
    return (right / count if count else 0.0), per_class


def test_accuracy_ties_ignore_label_and_per_class():
    x = np.array([[1.0, 2.0, 2.0, 0.0],    # label 2 ties class 1: one other >= -> right for top 2 only
                  [3.0, 3.0, 3.0, 3.0],    # all tied: three others >= -> wrong even for top 3
                  [0.0, 5.0, 1.0, 1.0],    # ignored
                  [0.5, 0.1, 0.7, 0.2],    # label 0 second best
                  [4.0, 1.0, 1.0, 1.0]])   # label 3 ties two others, one strictly greater
    label = np.array([2.0, 0.0, 9.0, 0.0, 3.0])
    for k, want in ((1, 0.0), (2, 0.5), (3, 0.5), (4, 1.0)):
        text = ('name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "acc" top: "per_class" '
                f'accuracy_param {{ top_k: {k} ignore_label: 9 }}')
        acc, per_class = forward(text, x, label)
        ref_acc, ref_pc = caffe_accuracy(x, label, k, ignore=9)
        assert acc.shape == () and per_class.shape == (4,)
        np.testing.assert_allclose(acc, ref_acc, rtol=1e-7)
        np.testing.assert_allclose(acc, want, rtol=1e-7)
        np.testing.assert_allclose(per_class, ref_pc, rtol=1e-7)
    # top 2: class 0 one of two right, class 1 unseen (0), class 2 right, class 3 wrong (two others >= 1)
    _, per_class = forward('name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "acc" top: "pc" '
                           'accuracy_param { top_k: 2 ignore_label: 9 }', x, label)
    np.testing.assert_allclose(per_class, [0.5, 0.0, 1.0, 0.0])


def test_accuracy_spatial_axis_and_all_ignored():
    rng = np.random.default_rng(10)
    x = np.round(rng.standard_normal((2, 3, 4)))  # ties likely
    label = rng.integers(0, 4, size=(2, 3)).astype(float)
    label[0, 1] = -1
    text = ('name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "acc" '
            'accuracy_param { axis: -1 top_k: 2 ignore_label: -1 }')
    (acc,) = forward(text, x, label)
    np.testing.assert_allclose(acc, caffe_accuracy(x, label, 2, axis=2, ignore=-1)[0], rtol=1e-7)
    (acc,) = forward(text, x, np.full((2, 3), -1.0))
    assert acc == 0.0


def test_accuracy_has_no_gradient_and_errors():
    text = 'name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "acc"'
    layer, (x, y) = make_layer(text, [np.random.default_rng(0).standard_normal((3, 4)), np.zeros(3)])
    (acc,) = layer.forward([x.requires_grad_(True), y])
    assert not acc.requires_grad
    with pytest.raises(UserError, match=r"top_k \(5\) must be less than or equal to the number of classes"):
        make_layer(text + ' accuracy_param { top_k: 5 }', [np.zeros((3, 4)), np.zeros(3)])
    with pytest.raises(UserError, match="number of labels must match number of predictions"):
        make_layer(text, [np.zeros((3, 4, 2)), np.zeros(3)])
    with pytest.raises(UserError, match=r"layer 'a' \(Accuracy\): label 4 is out of range"):
        forward(text, np.zeros((3, 4)), np.array([0.0, 4.0, 1.0]))


def test_loss_and_accuracy_in_a_net():
    """Accuracy next to a loss leaves the net's backward intact; the loss top is a 0-axis blob."""
    text = """
    name: "n"
    layer { name: "in" type: "Input" top: "x" top: "label"
            input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
    layer { name: "w" type: "Parameter" top: "bias" parameter_param { shape { dim: 4 dim: 3 } } }
    layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "bias" top: "score" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
    layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "acc" }
    """
    param = prototxt.parse_text(text, caffe_pb2.NetParameter(), "<test>")
    net = Net(prototxt.net_for_phase(param, caffe_pb2.TRAIN), source="<test>")
    x = np.random.default_rng(11).standard_normal((4, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 2], dtype=np.float32)
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = label
    loss = net.forward_backward()
    ref_loss, ref_diff, _ = caffe_softmax_loss(x.astype(float), label)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert net.blobs["loss"].data.shape == ()
    np.testing.assert_allclose(net.blobs["acc"].data, caffe_accuracy(x, label)[0], rtol=1e-6)
    np.testing.assert_allclose(net.params["w"][0].diff, ref_diff, rtol=1e-5, atol=1e-7)
