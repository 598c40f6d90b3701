"""RNN, LSTM, LSTMUnit and Filter against numpy references written from Caffe's formulas, their
shape checks, finite-difference gradients, the state carried between forwards, and weights through
a .caffemodel. Parity with real Caffe: tests/parity/test_layer_parity.py, test_recurrent_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.engine.layer_harness import TRAIN, check_gradients, forward, make_layer, run_backward

T, N, I, D = 4, 3, 5, 2
FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def cont_with_breaks(first=0.0):
    c = np.ones((T, N))
    c[0] = first
    c[2, 1] = 0  # a new sequence starts mid-batch in stream 1
    return c


def layer_text(layer_type, static=False, expose=False, num_output=D):
    states = ("h", "c") if layer_type == "LSTM" else ("h",)
    bottoms = ["x", "cont"] + ["s"] * static + [f"{s}0" for s in states] * expose
    tops = ["y"] + [f"{s}T" for s in states] * expose
    return (f'name: "r" type: "{layer_type}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops)
            + f" recurrent_param {{ num_output: {num_output} {FILL} expose_hidden: {str(expose).lower()} }}")


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def rnn_reference(x, cont, blobs, s=None, h=None):
    """Caffe's RNN: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_s s]), o_t = tanh(W_ho h_t + b_o)."""
    w_xh, b_h, *w_s, w_hh, w_ho, b_o = blobs
    h = np.zeros((x.shape[1], w_hh.shape[0])) if h is None else h
    out = []
    for t in range(x.shape[0]):
        pre = x[t].reshape(x.shape[1], -1) @ w_xh.T + b_h + (cont[t][:, None] * h) @ w_hh.T
        if w_s:
            pre = pre + s.reshape(s.shape[0], -1) @ w_s[0].T
        h = np.tanh(pre)
        out.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(out), h


def lstm_reference(x, cont, blobs, s=None, h=None, c=None):
    """Caffe's LSTM: gates in the order i, f, o, g; c_t = cont_t f c_{t-1} + i g; h_t = o tanh(c_t)."""
    w_xc, b_c, *w_s, w_hc = blobs
    d = w_hc.shape[1]
    h = np.zeros((x.shape[1], d)) if h is None else h
    c = np.zeros((x.shape[1], d)) if c is None else c
    out = []
    for t in range(x.shape[0]):
        ct = cont[t][:, None]
        gates = x[t].reshape(x.shape[1], -1) @ w_xc.T + b_c + (ct * h) @ w_hc.T
        if w_s:
            gates = gates + s.reshape(s.shape[0], -1) @ w_s[0].T
        i, f, o, g = sigmoid(gates[:, :d]), sigmoid(gates[:, d:2 * d]), sigmoid(gates[:, 2 * d:3 * d]), np.tanh(gates[:, 3 * d:])
        c = ct * f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out), h, c


def blobs_of(layer):
    return [b.detach().double().numpy() for b in layer.blobs]


# --- parameter blobs: Caffe's order and shapes ---
@pytest.mark.parametrize("layer_type, static, shapes", [
    ("RNN", False, [(D, 6), (D,), (D, D), (D, D), (D,)]),
    ("RNN", True, [(D, 6), (D,), (D, 12), (D, D), (D, D), (D,)]),
    ("LSTM", False, [(4 * D, 6), (4 * D,), (4 * D, D)]),
    ("LSTM", True, [(4 * D, 6), (4 * D,), (4 * D, 12), (4 * D, D)]),
])
def test_parameter_blobs_have_caffes_order_and_shapes(layer_type, static, shapes):
    bottoms = [rand(T, N, 2, 3), cont_with_breaks()] + [rand(N, 3, 4)] * static
    layer, _ = make_layer(layer_text(layer_type, static), bottoms)
    assert [tuple(b.shape) for b in layer.blobs] == shapes


# --- forward against the references ---
@pytest.mark.parametrize("static", [False, True])
def test_rnn_forward_matches_caffes_formula(static):
    x, cont, s = rand(T, N, I, seed=1), cont_with_breaks(), rand(N, 3, seed=2)
    layer, tensors = make_layer(layer_text("RNN", static), [x, cont] + [s] * static, dtype=torch.float64)
    (y,) = [t.numpy() for t in layer.forward(tensors)]
    np.testing.assert_allclose(y, rnn_reference(x, cont, blobs_of(layer), s)[0], rtol=1e-12)
    assert y.shape == (T, N, D)


@pytest.mark.parametrize("static", [False, True])
def test_lstm_forward_matches_caffes_formula(static):
    x, cont, s = rand(T, N, I, seed=1), cont_with_breaks(), rand(N, 3, seed=2)
    layer, tensors = make_layer(layer_text("LSTM", static), [x, cont] + [s] * static, dtype=torch.float64)
    (y,) = [t.numpy() for t in layer.forward(tensors)]
    np.testing.assert_allclose(y, lstm_reference(x, cont, blobs_of(layer), s)[0], rtol=1e-12)


def test_expose_hidden_starts_from_h0_c0_and_returns_the_final_state():
    x, cont = rand(T, N, I, seed=1), cont_with_breaks(first=1.0)
    h0, c0 = rand(1, N, D, seed=3), rand(1, N, D, seed=4)
    layer, tensors = make_layer(layer_text("LSTM", expose=True), [x, cont, h0, c0], dtype=torch.float64)
    y, h_t, c_t = (t.numpy() for t in layer.forward(tensors))
    ref, ref_h, ref_c = lstm_reference(x, cont, blobs_of(layer), h=h0[0], c=c0[0])
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    assert h_t.shape == c_t.shape == (1, N, D)
    np.testing.assert_allclose(h_t[0], ref_h, rtol=1e-12)
    np.testing.assert_allclose(c_t[0], ref_c, rtol=1e-12)
    np.testing.assert_array_equal(h_t[0], y[-1])

    layer, tensors = make_layer(layer_text("RNN", expose=True), [x, cont, h0], dtype=torch.float64)
    y, h_t = (t.numpy() for t in layer.forward(tensors))
    ref, ref_h = rnn_reference(x, cont, blobs_of(layer), h=h0[0])
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    np.testing.assert_allclose(h_t[0], ref_h, rtol=1e-12)


@pytest.mark.parametrize("layer_type", ["RNN", "LSTM"])
def test_the_next_forward_continues_from_the_last_state(layer_type):
    # Caffe's RecurrentLayer without expose_hidden: two forwards of T steps with cont 1 at the
    # second's t = 0 equal one forward of 2T steps
    x, cont = rand(2 * T, N, I, seed=5), np.ones((2 * T, N))
    cont[0] = 0
    cont[T] = [1, 0, 1]  # stream 1 starts over at the batch boundary
    text = layer_text(layer_type)
    layer, _ = make_layer(text, [x[:T], cont[:T]], dtype=torch.float64)
    with torch.no_grad():
        first = layer.forward([torch.as_tensor(x[:T]), torch.as_tensor(cont[:T])])[0]
        layer.infer_tops([torch.as_tensor(x[T:]), torch.as_tensor(cont[T:])])  # no effect on the state
        second = layer.forward([torch.as_tensor(x[T:]), torch.as_tensor(cont[T:])])[0]
        whole = layer.forward([torch.as_tensor(x), torch.as_tensor(cont)])[0]
    np.testing.assert_allclose(torch.cat([first, second]).numpy(), whole.numpy(), rtol=1e-12)


def test_a_new_batch_size_starts_from_zero_state():
    layer, _ = make_layer(layer_text("RNN"), [rand(T, N, I), np.ones((T, N))], dtype=torch.float64)
    x, ones = rand(T, N + 1, I, seed=2), np.ones((T, N + 1))
    with torch.no_grad():
        layer.forward([torch.as_tensor(rand(T, N, I)), torch.as_tensor(np.ones((T, N)))])
        (y,) = layer.forward([torch.as_tensor(x), torch.as_tensor(ones)])
    np.testing.assert_allclose(y.numpy(), rnn_reference(x, ones, blobs_of(layer))[0], rtol=1e-12)


def test_lstm_unit_matches_caffes_formula():
    c_prev, gates, cont = rand(1, N, D, seed=1), rand(1, N, 4 * D, seed=2) * 2, np.array([[1.0, 0.0, 1.0]])
    c, h = forward('name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"',
                   c_prev, gates, cont)
    i, f, o, g = (gates[..., k * D:(k + 1) * D] for k in range(4))
    i, f, o, g = sigmoid(i), sigmoid(f), sigmoid(o), np.tanh(g)
    ref_c = cont[..., None] * f * c_prev + i * g
    np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, o * np.tanh(ref_c), rtol=1e-5, atol=1e-6)


# --- backward ---
def test_rnn_and_lstm_gradients_match_finite_differences():
    x, cont, s = rand(3, 2, 3, seed=1), np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), rand(2, 2, seed=2)
    # cont 0 at t = 0: each forward gradcheck runs starts afresh, whatever the carried state
    check_gradients(layer_text("RNN", static=True), x, cont, s, wrt=[0, 2])
    check_gradients(layer_text("LSTM", static=True), x, cont, s, wrt=[0, 2])


def test_lstm_unit_gradient_matches_finite_differences():
    check_gradients('name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"',
                    rand(1, 2, 3, seed=1), rand(1, 2, 12, seed=2), np.array([[1.0, 0.0]]), wrt=[0, 1])


@pytest.mark.parametrize("layer_type", ["RNN", "LSTM"])
def test_no_diff_reaches_cont_h0_or_c0_and_exposed_final_state_diffs_are_dropped(layer_type):
    states = 2 if layer_type == "LSTM" else 1
    bottoms = [rand(T, N, I), cont_with_breaks(first=1.0)] + [rand(1, N, D, seed=k) for k in range(states)]
    layer, tensors = make_layer(layer_text(layer_type, expose=True), bottoms, dtype=torch.float64)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    y, *final = layer.forward(xs)
    # Caffe shares only the data of h_0/c_0 and h_T/c_T with its unrolled net
    assert not any(t.requires_grad for t in final)
    y.sum().backward()
    assert np.abs(xs[0].grad.numpy()).sum() > 0
    assert all(x.grad is None for x in xs[1:])


def test_lstm_unit_sends_no_diff_to_cont():
    text = 'name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"'
    _, _, (dc, dg, dcont), _ = run_backward(text, rand(1, 2, 3), rand(1, 2, 12), np.ones((1, 2)))
    assert np.abs(dc).sum() > 0 and np.abs(dg).sum() > 0
    np.testing.assert_array_equal(dcont, 0)


# --- errors ---
@pytest.mark.parametrize("text, bottoms, message", [
    (layer_text("RNN"), [rand(T, N, I), np.ones((T, N + 1))],
     r"layer 'r' \(RNN\): bottom 1 \(cont\) must have shape \(timesteps, streams\) = \(4, 3\)"),
    (layer_text("LSTM"), [rand(T, N, I), np.ones((T, N, 1))], r"layer 'r' \(LSTM\): bottom 1 \(cont\) must have shape"),
    (layer_text("RNN"), [rand(T, N), np.ones((T, N))], r"bottom 0 \(x\) must have at least 3 axes"),
    (layer_text("RNN", static=True), [rand(T, N, I), np.ones((T, N)), rand(N + 1, 2)],
     r"bottom 2 \(x_static\) must have 3 streams"),
    (layer_text("LSTM", expose=True), [rand(T, N, I), np.ones((T, N)), rand(1, N, D), rand(1, N, D + 1)],
     r"bottom c_0 must have shape \(1, 3, 2\)"),
    (layer_text("RNN", num_output=0), [rand(T, N, I), np.ones((T, N))], r"num_output must be positive"),
    ('name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"',
     [rand(1, N, D), rand(1, N, 3 * D), np.ones((1, N))], r"layer 'u' \(LSTMUnit\): bottom 1 \(gate input\) must have 4 x 2"),
    ('name: "u" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont" top: "c1" top: "h1"',
     [rand(1, N, D), rand(1, N, 4 * D), np.ones((N,))], r"bottom 2 \(cont\) must have 2 axes"),
    ('name: "f" type: "Filter" bottom: "x" bottom: "s" top: "y"', [rand(4, 3), np.ones((4, 2))],
     r"layer 'f' \(Filter\): the selector \(last bottom\) must have shape \(N,\) or \(N, 1, ...\)"),
    ('name: "f" type: "Filter" bottom: "x" bottom: "s" top: "y"', [rand(5, 3), np.ones(4)],
     r"bottom 0 \(shape \(5, 3\)\) must have the selector's 4 items"),
    ('name: "f" type: "Filter" bottom: "x" bottom: "z" bottom: "s" top: "y"', [rand(4, 3), rand(4), np.ones(4)],
     r"one top per bottom but the last"),
])
def test_bad_shapes_are_reported_with_the_layer_name(text, bottoms, message):
    with pytest.raises(UserError, match=message):
        make_layer(text, bottoms)


def test_bottom_and_top_counts_follow_expose_hidden():
    with pytest.raises(UserError, match=r"takes 2 or 3 bottom blobs \(x, cont, \[x_static\]\), got 1"):
        make_layer('name: "r" type: "RNN" bottom: "x" top: "y" recurrent_param { num_output: 2 }', [rand(T, N, I)])
    with pytest.raises(UserError, match=r"takes exactly 3 top blob\(s\) \(output, h_T, c_T\), got 1"):
        make_layer('name: "r" type: "LSTM" bottom: "x" bottom: "c" bottom: "h" bottom: "c0" top: "y" '
                   'recurrent_param { num_output: 2 expose_hidden: true }', [])
    with pytest.raises(UserError, match=r"x, cont, \[x_static\], h_0 \+ c_0"):
        make_layer('name: "r" type: "LSTM" bottom: "x" bottom: "c" top: "y" top: "h" top: "c" '
                   'recurrent_param { num_output: 2 expose_hidden: true }', [])


def test_layer_changing_forward_shape_is_checked_again():
    layer, _ = make_layer(layer_text("RNN"), [rand(T, N, I), np.ones((T, N))])
    with pytest.raises(UserError, match="bottom 1 \\(cont\\)"):
        layer.forward([torch.zeros(T, N, I), torch.zeros(T + 1, N)])


# --- Filter ---
def test_filter_keeps_items_with_a_nonzero_selector():
    a, b = rand(5, 2, 3, seed=1), rand(5, 4, seed=2)
    sel = np.array([[0.0], [1.0], [-2.0], [0.0], [0.5]])
    text = 'name: "f" type: "Filter" bottom: "a" bottom: "b" bottom: "s" top: "ya" top: "yb"'
    ya, yb = forward(text, a, b, sel)
    np.testing.assert_allclose(ya, a[[1, 2, 4]], rtol=1e-6)
    np.testing.assert_allclose(yb, b[[1, 2, 4]], rtol=1e-6)
    _, (dya, _), (da, db, ds), _ = run_backward(text, a, b, sel)
    expected = np.zeros_like(a)
    expected[[1, 2, 4]] = dya
    np.testing.assert_array_equal(da, expected)
    np.testing.assert_array_equal(db[[0, 3]], 0)
    np.testing.assert_array_equal(ds, 0)  # Caffe never backpropagates into the selector
    check_gradients(text, a, b, sel, wrt=[0, 1])


def test_filter_top_shape_is_the_full_batch_at_setup_then_follows_the_selector():
    text = 'name: "f" type: "Filter" bottom: "x" bottom: "s" top: "y"'
    layer, (x, s) = make_layer(text, [rand(4, 3), np.zeros(4)])
    assert layer.infer_tops([x, s])[0].shape == (4, 3)  # Caffe's first Reshape keeps every item
    assert layer.infer_tops([x, s])[0].shape == (0, 3)
    assert layer.forward([x, torch.tensor([0.0, 1.0, 0.0, 1.0])])[0].shape == (2, 3)
    # nothing kept: an empty top, and a zero diff for every item
    (y,), _, (dx, _), _ = run_backward(text, rand(4, 3), np.zeros(4))
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(dx, 0)


# --- in a net ---
NET = f"""name: "seq" force_backward: true
layer {{ name: "input" type: "Input" top: "x" top: "cont" top: "s"
  input_param {{ shape {{ dim: {T} dim: {N} dim: {I} }} shape {{ dim: {T} dim: {N} }} shape {{ dim: {N} dim: 2 }} }} }}
layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "s" top: "h"
  recurrent_param {{ num_output: {D} {FILL} }} }}
layer {{ name: "rnn" type: "RNN" bottom: "h" bottom: "cont" top: "o" recurrent_param {{ num_output: 3 {FILL} }} }}
"""


def make_net(text=NET):
    param = prototxt.parse_text(text, caffe_pb2.NetParameter(), "<test>")
    return Net(prototxt.net_for_phase(param, TRAIN), "cpu", "<test>")


def test_weights_round_trip_through_a_caffemodel(tmp_path):
    net = make_net()
    path = str(tmp_path / "w.caffemodel")
    prototxt.write_binary(net.to_proto(), path)
    other = make_net()
    other.copy_from(prototxt.read_net(path), path)
    for name, blobs in net.params.items():
        for j, b in enumerate(blobs):
            np.testing.assert_array_equal(other.params[name][j].data, b.data, err_msg=f"{name}[{j}]")
    for n in (net, other):
        n.blobs["x"].data[...] = rand(T, N, I).astype(np.float32)
        n.blobs["s"].data[...] = rand(N, 2).astype(np.float32)
        n.blobs["cont"].data[...] = cont_with_breaks()
        n.forward()
    np.testing.assert_array_equal(other.blobs["o"].data, net.blobs["o"].data)


def test_a_net_with_force_backward_sends_no_diff_to_cont():
    net = make_net()
    net.blobs["x"].data[...] = rand(T, N, I).astype(np.float32)
    net.blobs["s"].data[...] = rand(N, 2).astype(np.float32)
    net.blobs["cont"].data[...] = cont_with_breaks(first=1.0)
    net.forward()
    net.blobs["o"].diff[...] = 1
    net.backward()
    assert np.abs(net.blobs["x"].diff).sum() > 0 and np.abs(net.blobs["s"].diff).sum() > 0
    np.testing.assert_array_equal(net.blobs["cont"].diff, 0)
    assert all(np.abs(p.diff).sum() > 0 for blobs in net.params.values() for p in blobs)
