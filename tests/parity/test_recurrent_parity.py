"""Recurrent parity beyond one forward: what RNN and LSTM carry from one forward to the next, Caffe's
.caffemodel loading into the engine, and a small LSTM net trained by both solvers.

The one-forward cases (plain, x_static, expose_hidden, LSTMUnit, Filter) are in
test_layer_parity.py. Tolerance: the float32 parity tolerance of tests/parity/common.py throughout.
"""
from __future__ import annotations

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.proto import caffe_pb2
from tests.parity.common import assert_close, caffe_net, compare_params, copy_params, engine_net, pycaffe

TRAIN = caffe_pb2.TRAIN
f32 = np.float32
T, N, I, D = 5, 3, 4, 6  # timesteps, streams, input size, num_output

FILL = 'weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "uniform" min: -0.3 max: 0.3 }'


def one_layer_net(layer_type: str, static: bool) -> str:
    static_input = 'top: "s"' if static else ""
    static_shape = f"shape {{ dim: {N} dim: 2 }}" if static else ""
    return f"""name: "carry" force_backward: true
layer {{ name: "input" type: "Input" top: "x" top: "cont" {static_input}
  input_param {{ shape {{ dim: {T} dim: {N} dim: {I} }} shape {{ dim: {T} dim: {N} }} {static_shape} }} }}
layer {{ name: "L" type: "{layer_type}" bottom: "x" bottom: "cont" {'bottom: "s"' if static else ''} top: "y"
  recurrent_param {{ num_output: {D} {FILL} }} }}
"""


def batch(rng: np.random.Generator, k: int, static: bool) -> dict[str, np.ndarray]:
    """Inputs of forward k: the first starts every sequence, later ones carry some streams on
    (cont 1 at t = 0) and break others mid-batch."""
    cont = np.ones((T, N), f32)
    cont[0] = 0 if k == 0 else [1, 0, 1]
    cont[3, 2] = 0
    arrays = {"x": rng.standard_normal((T, N, I)).astype(f32), "cont": cont}
    if static:
        arrays["s"] = rng.standard_normal((N, 2)).astype(f32)
    return arrays


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static"])
@pytest.mark.parametrize("layer_type", ["RNN", "LSTM"])
def test_state_carries_over_to_the_next_forward_like_caffe(layer_type, static, tmp_path):
    pycaffe()
    text = one_layer_net(layer_type, static)
    cnet, enet = caffe_net(text, TRAIN, tmp_path / "net.prototxt"), engine_net(text, TRAIN)
    copy_params(cnet, enet)
    rng = np.random.default_rng(7)
    for k in range(3):
        what = f"{layer_type} forward {k}"
        for name, a in batch(rng, k, static).items():
            cnet.blobs[name].data[...] = a
            enet.blobs[name].data[...] = a
        cnet.forward()
        enet.forward()
        assert_close(enet.blobs["y"].data, cnet.blobs["y"].data, f"{what}: top 'y'")
        g = rng.standard_normal((T, N, D)).astype(f32)
        cnet.clear_param_diffs()
        enet.clear_param_diffs()
        # Caffe overwrites bottom diffs in each backward; the engine's Net adds to an input blob's
        # diff from the last backward, so start the inputs from zero in both
        for name in ("x", "s") if static else ("x",):
            cnet.blobs[name].diff[...] = 0
            enet.blobs[name].diff[...] = 0
        cnet.blobs["y"].diff[...] = g
        enet.blobs["y"].diff[...] = g
        cnet.backward()
        enet.backward()
        for name in ("x", "cont") + (("s",) if static else ()):
            assert_close(enet.blobs[name].diff, cnet.blobs[name].diff, f"{what}: bottom '{name}' diff")
        compare_params(enet, cnet, f"{what}: param", diff=True)


def test_a_caffe_caffemodel_loads_into_the_engine(tmp_path):
    # Caffe's own file, so the blob order and shapes are Caffe's, not what copy_params assumes
    pycaffe()
    text = one_layer_net("LSTM", static=True) + (
        'layer { name: "R" type: "RNN" bottom: "y" bottom: "cont" bottom: "s" top: "z" '
        f'recurrent_param {{ num_output: 3 {FILL} }} }}\n')
    cnet = caffe_net(text, TRAIN, tmp_path / "net.prototxt")
    cnet.save(str(tmp_path / "w.caffemodel"))
    enet = engine_net(text, TRAIN)
    enet.copy_from(prototxt.read_net(str(tmp_path / "w.caffemodel")), "w.caffemodel")
    compare_params(enet, cnet, "loaded weights", rtol=0, atol=0)
    for name, a in batch(np.random.default_rng(3), 0, static=True).items():
        cnet.blobs[name].data[...] = a
        enet.blobs[name].data[...] = a
    cnet.forward()
    enet.forward()
    assert_close(enet.blobs["z"].data, cnet.blobs["z"].data, "top 'z' with the loaded weights")


# a sequence labeller: LSTM over (T, N, I) inputs, a per-timestep classifier, softmax loss over
# classes on axis 2
LSTM_NET = f"""name: "tagger"
layer {{ name: "input" type: "Input" top: "x" top: "cont" top: "label"
  input_param {{ shape {{ dim: {T} dim: {N} dim: {I} }} shape {{ dim: {T} dim: {N} }} shape {{ dim: {T} dim: {N} }} }} }}
layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h" recurrent_param {{ num_output: {D} {FILL} }} }}
layer {{ name: "score" type: "InnerProduct" bottom: "h" top: "score"
  inner_product_param {{ num_output: 3 axis: 2 {FILL} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" softmax_param {{ axis: 2 }} }}
"""
STEPS = 12


def test_a_small_lstm_net_trains_like_caffe(tmp_path):
    pycaffe()
    from mpicaffe.backends.caffe import CaffeSolver

    (tmp_path / "tagger.prototxt").write_text(LSTM_NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path}/tagger.prototxt"\nbase_lr: 0.5\nmomentum: 0.9\nlr_policy: "fixed"\n'
                      f'weight_decay: 0.001\nclip_gradients: 5\nmax_iter: {STEPS}\ndisplay: 0\nrandom_seed: 1\n'
                      f'snapshot_prefix: "{tmp_path}/tagger"\n')
    caffe_solver = CaffeSolver(str(solver))
    engine = get_solver(str(solver))
    copy_params(caffe_solver.net, engine.net)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, T, N, I)).astype(f32)
    # the label of a step is the sign pattern of the input so far, something an LSTM can learn
    label = (np.cumsum(x[..., 0], axis=1) > 0).astype(f32) + (x[..., 1] > 1)
    losses = []
    for step in range(STEPS):
        k = step % 4
        arrays = {"x": x[k], "cont": np.ones((T, N), f32), "label": label[k]}
        arrays["cont"][0] = 0 if k == 0 else [0, 1, 1]  # later batches continue some sequences
        for name, a in arrays.items():
            caffe_solver.net.blobs[name].data[...] = a
            engine.net.blobs[name].data[...] = a
        caffe_solver.step(1)
        engine.step(1)
        losses.append((engine.loss, caffe_solver.loss))
    e, c = np.array(losses).T
    assert np.all(np.isfinite(c)) and c[-4:].mean() < c[:4].mean(), f"Caffe did not learn: {c}"
    assert_close(e, c, "loss per step")
    compare_params(engine.net, caffe_solver.net, f"weights after {STEPS} steps")
