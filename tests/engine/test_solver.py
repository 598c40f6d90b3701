"""The engine's Solver against Caffe's Solver::Step/Solve/Test and every ComputeUpdateValue.

Update rules are checked step by step against a numpy float32 transcription of Caffe's CPU code,
fed with the gradients the net computed (captured in on_gradients_ready). Uses tiny layers
defined here under test-only type names, and Caffe's InnerProduct + SoftmaxWithLoss when present.
"""
import logging
import os
import re

import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine import solver as solver_mod
from mpicaffe.backends.engine.layers import LAYERS, Layer, register
from mpicaffe.backends.engine.solver import SolverAction, get_solver
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

f32 = np.float32
_rng = np.random.default_rng(7)
DATA_X = _rng.standard_normal((16, 3)).astype(np.float32)
DATA_T = (DATA_X @ np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]]) + 0.3).astype(np.float32)

if "TestSeqData" not in LAYERS:
    @register
    class SeqDataForTests(Layer):
        """Rows of DATA_X/DATA_T in order, batch_size at a time, from row rand_skip, cycling."""

        type = "TestSeqData"
        max_bottoms = 0
        min_tops = max_tops = 2

        def setup(self, bottoms):
            self.batch = self.param.data_param.batch_size
            self.pos = self.param.data_param.rand_skip

        def rows(self):
            return [(self.pos + i) % len(DATA_X) for i in range(self.batch)]

        def forward(self, bottoms):
            idx = self.rows()
            self.pos += self.batch
            return [torch.from_numpy(DATA_X[idx]), torch.from_numpy(DATA_T[idx])]

        def infer_tops(self, bottoms):
            return [torch.zeros(self.batch, 3), torch.zeros(self.batch, 2)]

    @register
    class LinearForTests(Layer):
        """y = x W^T + b with W (num_output, inputs) and b (num_output,), as InnerProduct."""

        type = "TestLinear"
        min_bottoms = max_bottoms = 1

        def setup(self, bottoms):
            p = self.param.inner_product_param
            self.add_blob((p.num_output, bottoms[0].shape[1]), p.weight_filler)
            self.add_blob((p.num_output,), p.bias_filler)

        def forward(self, bottoms):
            return [bottoms[0] @ self.blobs[0].t() + self.blobs[1]]

    @register
    class EuclideanLossForTests(Layer):
        """sum((a - b)^2) / (2 N), as Caffe's EuclideanLoss."""

        type = "TestEuclideanLoss"
        min_bottoms = max_bottoms = 2

        def forward(self, bottoms):
            d = bottoms[0] - bottoms[1]
            return [(d * d).sum() / (2 * bottoms[0].shape[0])]

    @register
    class MeanForTests(Layer):
        """Mean over the batch axis: a (C,) output, to test per-element scores."""

        type = "TestMean"
        min_bottoms = max_bottoms = 1

        def forward(self, bottoms):
            return [bottoms[0].mean(0)]


NET = """
name: "tiny"
layer {{ name: "data" type: "TestSeqData" top: "x" top: "t" data_param {{ batch_size: {batch} }}
        include {{ phase: TRAIN }} }}
layer {{ name: "data" type: "TestSeqData" top: "x" top: "t" data_param {{ batch_size: 4 rand_skip: 8 }}
        include {{ phase: TEST }} }}
layer {{ name: "fc" type: "TestLinear" bottom: "x" top: "y"
        param {{ lr_mult: {lr_w} decay_mult: 1 }} param {{ lr_mult: {lr_b} decay_mult: 0 }}
        inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.5 }}
                              bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "loss" type: "TestEuclideanLoss" bottom: "y" bottom: "t" top: "loss" }}
layer {{ name: "mean" type: "TestMean" bottom: "y" top: "ymean" include {{ phase: TEST }} }}
"""


def solver_param(extra: str = "", batch: int = 4, lr_w: float = 1, lr_b: float = 2) -> caffe_pb2.SolverParameter:
    """The tiny net's solver; fields in `extra` override the defaults here."""
    text = ("net_param {" + NET.format(batch=batch, lr_w=lr_w, lr_b=lr_b) + "}\n"
            'base_lr: 0.05 lr_policy: "fixed" max_iter: 12 display: 0 random_seed: 3 '
            "snapshot_after_train: false\n")
    param = prototxt.parse_text(text, caffe_pb2.SolverParameter(), "<test solver>")
    param.MergeFrom(prototxt.parse_text(extra, caffe_pb2.SolverParameter(), "<test solver>"))
    return param


def make_solver(extra: str = "", **kw):
    return get_solver(solver_param(extra, **kw))


def weights(solver) -> list[np.ndarray]:
    return [b.data.copy() for b in solver.net.params["fc"]]


# --- numpy transcription of Caffe's SGDSolver::ApplyUpdate and ComputeUpdateValue (CPU) ---

class NumpyCaffeSolver:
    """Caffe's update, one blob at a time, in float32 as Caffe's CPU code does it."""

    def __init__(self, kind, p: caffe_pb2.SolverParameter, ws, lr_mults, decay_mults):
        self.kind, self.p = kind, p
        self.w = [w.astype(np.float32).copy() for w in ws]
        self.lr_mults, self.decay_mults = lr_mults, decay_mults
        sets = 2 if kind in ("Adam", "AdaDelta") else 1
        self.hist = [np.zeros_like(w) for _ in range(sets) for w in self.w]
        self.clipped = 0

    def rate(self, it):
        p = self.p
        if p.lr_policy == "fixed":
            return f32(p.base_lr)
        assert p.lr_policy == "step"
        return f32(float(p.base_lr) * float(p.gamma) ** (it // p.stepsize))

    def update(self, grads, it):
        p = self.p
        g = [gr.astype(np.float32).copy() for gr in grads]
        for i, m in enumerate(self.lr_mults):
            if m == 0:
                g[i][...] = 0  # Caffe computes no diff for lr_mult 0
        rate = self.rate(it)
        clip = f32(p.clip_gradients)
        if clip >= 0:
            sumsq = f32(0)
            for x in g:
                sumsq = f32(sumsq + f32(np.dot(x.ravel().astype(np.float64), x.ravel())))
            l2 = np.sqrt(sumsq)
            if l2 > clip:
                self.clipped += 1
                g = [x * f32(clip / l2) for x in g]
        n = len(self.w)
        for i in range(n):
            w, gi = self.w[i], g[i]
            if p.iter_size != 1:
                gi = gi * (f32(1) / f32(p.iter_size))
            local_decay = f32(p.weight_decay) * f32(self.decay_mults[i])
            if local_decay:
                if p.regularization_type == "L2":
                    gi = local_decay * w + gi
                else:
                    gi = local_decay * np.sign(w).astype(np.float32) + gi
            lr = rate * f32(self.lr_mults[i])
            gi = getattr(self, "rule_" + self.kind)(i, gi, lr, it)
            self.w[i] = w - gi

    def rule_SGD(self, i, g, lr, it):
        h = self.hist[i]
        h[...] = f32(self.p.momentum) * h
        h[...] = lr * g + h
        return h.copy()

    def rule_Nesterov(self, i, g, lr, it):
        h, m = self.hist[i], f32(self.p.momentum)
        u = h.copy()
        h[...] = m * h
        h[...] = lr * g + h
        u = -m * u
        return (f32(1) + m) * h + u

    def rule_AdaGrad(self, i, g, lr, it):
        h = self.hist[i]
        h[...] = g * g + h
        u = np.sqrt(h) + f32(self.p.delta)
        return lr * (g / u)

    def rule_RMSProp(self, i, g, lr, it):
        h, d = self.hist[i], f32(self.p.rms_decay)
        u = g * g
        h[...] = d * h
        h[...] = (f32(1) - d) * u + h
        u = np.sqrt(h) + f32(self.p.delta)
        return lr * (g / u)

    def rule_AdaDelta(self, i, g, lr, it):
        n = len(self.w)
        h1, h2 = self.hist[i], self.hist[n + i]
        m, delta = f32(self.p.momentum), f32(self.p.delta)
        u = g * g
        h1[...] = m * h1
        h1[...] = (f32(1) - m) * u + h1
        u = (delta + h2) / (delta + h1)
        g = g * np.sqrt(u)
        u = g * g
        h2[...] = m * h2
        h2[...] = (f32(1) - m) * u + h2
        return lr * g

    def rule_Adam(self, i, g, lr, it):
        n = len(self.w)
        m, v = self.hist[i], self.hist[n + i]
        b1, b2 = f32(self.p.momentum), f32(self.p.momentum2)
        t = it + 1
        correction = f32(np.sqrt(1 - float(b2) ** t) / (1 - float(b1) ** t))
        m[...] = b1 * m
        m[...] = (f32(1) - b1) * g + m
        v[...] = b2 * v
        v[...] = (f32(1) - b2) * (g * g) + v
        u = np.sqrt(v) + f32(self.p.delta)
        return (lr * correction) * (m / u)


UPDATE_CASES = {
    "sgd_l2": ("SGD", 'momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 4'),
    "sgd_l1_clip_itersize": ("SGD", ('momentum: 0.9 weight_decay: 0.02 regularization_type: "L1" '
                                     "clip_gradients: 0.3 iter_size: 2")),
    "nesterov": ("Nesterov", "momentum: 0.8 weight_decay: 0.01"),
    "adagrad": ("AdaGrad", "weight_decay: 0.01 delta: 1e-6 base_lr: 0.2"),
    "rmsprop": ("RMSProp", 'rms_decay: 0.9 weight_decay: 0.01 regularization_type: "L1" delta: 1e-6'),
    "adadelta": ("AdaDelta", "momentum: 0.95 delta: 1e-6 base_lr: 1.0 weight_decay: 0.01"),
    "adam": ("Adam", "momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01 clip_gradients: 0.5"),
}


@pytest.mark.parametrize("case", sorted(UPDATE_CASES))
def test_update_rule_matches_numpy_transcription_of_caffe(case):
    kind, extra = UPDATE_CASES[case]
    s = make_solver(f'type: "{kind}" ' + extra)
    assert type(s).type == kind
    ref = NumpyCaffeSolver(kind, s.param, weights(s), lr_mults=[1, 2], decay_mults=[1, 0])
    infos = s.net.param_infos
    grads = []
    s.add_callback(lambda: None, lambda: grads.append(
        [s.net.flat_diff[i.offset:i.offset + i.count].numpy().reshape(i.shape).copy() for i in infos]))
    for it in range(12):
        s.step(1)
        assert s.iter == it + 1
        ref.update(grads[-1], it)
        for got, want in zip(weights(s), ref.w):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, err_msg=f"{case} iteration {it}")
    for got, want in zip(s.history_blobs(), ref.hist):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-8)
    if s.param.clip_gradients >= 0:
        assert ref.clipped > 0, "the case should exercise clipping"
    # the bias (decay_mult 0, lr_mult 2) moves differently from a decayed lr_mult 1 parameter
    assert not np.allclose(weights(s)[1], 0.1)


def test_update_is_data_minus_diff_and_diff_holds_the_update():
    s = make_solver('type: "SGD" momentum: 0.9')
    s.net.forward_backward()
    before = s.net.flat_data.clone()
    s.apply_update()
    assert torch.equal(s.net.flat_data, before - s.net.flat_diff)
    assert torch.equal(s.net.flat_diff, s.history[0])


def test_apply_update_advances_iter_as_pycaffe_does():
    s = make_solver('type: "SGD"')
    s.net.forward_backward()
    s.apply_update()
    assert s.iter == 1


def test_gradient_of_tiny_net_is_the_analytic_one():
    s = make_solver('type: "SGD"')
    w, b = weights(s)
    s.net.clear_param_diffs()
    s.net.forward_backward()
    x, t = DATA_X[:4].astype(np.float64), DATA_T[:4]
    dy = (x @ w.T + b - t) / 4
    np.testing.assert_allclose(s.net.params["fc"][0].diff, dy.T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.net.params["fc"][1].diff, dy.sum(0), rtol=1e-5, atol=1e-6)


def test_iter_size_two_equals_doubled_batch():
    extra = 'type: "SGD" momentum: 0.9 weight_decay: 0.01 '
    a = make_solver(extra + "iter_size: 2", batch=4)
    b = make_solver(extra, batch=8)
    for _ in range(6):
        a.step(1)
        b.step(1)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        for wa, wb in zip(weights(a), weights(b)):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_lr_mult_zero_parameter_gets_no_diff_and_stays_out_of_the_clip_norm(caplog):
    s = make_solver('type: "SGD" momentum: 0.9 clip_gradients: 0.2 weight_decay: 0.01', lr_b=0)
    ref = NumpyCaffeSolver("SGD", s.param, weights(s), lr_mults=[1, 0], decay_mults=[1, 0])
    infos = s.net.param_infos
    grads = []
    s.add_callback(lambda: None, lambda: grads.append(
        [s.net.flat_diff[i.offset:i.offset + i.count].numpy().reshape(i.shape).copy() for i in infos]))
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        for it in range(5):
            s.step(1)
            ref.update(grads[-1], it)
    np.testing.assert_allclose(weights(s)[0], ref.w[0], rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(weights(s)[1], np.full(2, 0.1, np.float32))
    assert ref.clipped == 5
    assert len([r for r in caplog.messages if r.startswith("Gradient clipping")]) == 5


def test_clip_gradients_log_line_and_global_norm(caplog):
    s = make_solver('type: "SGD" clip_gradients: 0.01')
    grads = []
    s.add_callback(lambda: None, lambda: grads.append(s.net.flat_diff.clone()))
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        s.step(1)
    norm = float(np.sqrt(np.dot(grads[0].numpy().astype(np.float64), grads[0].numpy())))
    m = [re.fullmatch(r"Gradient clipping: scaling down gradients \(L2 norm (\S+) > 0\.01\) by scale factor (\S+)",
                      msg) for msg in caplog.messages]
    m = [x for x in m if x]
    assert len(m) == 1
    assert float(m[0].group(1)) == pytest.approx(norm, rel=1e-5)
    assert float(m[0].group(2)) == pytest.approx(0.01 / norm, rel=1e-5)


def test_history_sets_and_order():
    for kind, sets in (("SGD", 1), ("Nesterov", 1), ("AdaGrad", 1), ("RMSProp", 1), ("AdaDelta", 2), ("Adam", 2)):
        s = make_solver(f'type: "{kind}"')
        shapes = [tuple(t.shape) for t in s.history_blobs()]
        assert shapes == [(2, 3), (2,)] * sets, kind


def test_adam_second_history_set_follows_the_first():
    s = make_solver('type: "Adam" momentum: 0.9 momentum2: 0.999')
    s.step(1)
    m_w, m_b, v_w, v_b = s.history_blobs()
    # after one step from zero history: m = 0.1 g and v = 0.001 g^2, so v = 0.1 m^2
    np.testing.assert_allclose(v_w.numpy(), m_w.numpy() ** 2 * 0.1, rtol=1e-4)
    np.testing.assert_allclose(v_b.numpy(), m_b.numpy() ** 2 * 0.1, rtol=1e-4)
    assert np.abs(m_w.numpy()).min() > 0


# --- Caffe's checks ---

@pytest.mark.parametrize("extra, message", [
    ('type: "Bogus"', "Unknown solver type: Bogus (known types: AdaDelta, AdaGrad, Adam, Nesterov, RMSProp, SGD)"),
    ('type: "AdaGrad" momentum: 0.9', "Momentum cannot be used with AdaGrad."),
    ('type: "RMSProp" momentum: 0.9', "Momentum cannot be used with RMSProp."),
    ('type: "RMSProp" rms_decay: 1.0', "rms_decay should lie between 0 and 1"),
    ('type: "RMSProp" rms_decay: -0.5', "rms_decay should lie between 0 and 1"),
    ('weight_decay: 0.1 regularization_type: "L3"', "Unknown regularization type: 'L3'"),
    ('lr_policy: "cosine"', "Unknown learning rate policy: 'cosine'"),
    ('lr_policy: "step" stepsize: 0', "needs stepsize > 0"),
    ("average_loss: 0", "average_loss must be >= 1"),
    ("iter_size: 0", "iter_size must be >= 1"),
    ("test_iter: 2", "test_interval must be > 0"),
    ('snapshot: 5 snapshot_prefix: "/nonexistent/dir/x"', "Cannot write to snapshot prefix"),
])
def test_bad_solver_parameters_are_user_errors(extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_solver(extra)


def test_unknown_regularization_is_fine_without_weight_decay():
    make_solver('regularization_type: "L3"').step(1)


def test_deprecated_solver_type_is_upgraded():
    p = solver_param()
    p.solver_type = caffe_pb2.SolverParameter.ADAM
    p.ClearField("type")
    assert type(get_solver(p)).type == "Adam"


def test_factory_reads_a_solver_file(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(batch=4, lr_w=1, lr_b=2).replace("{{", "{").replace("}}", "}"))
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "net.prototxt" type: "Nesterov" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9\n'
                    "test_iter: 2 test_interval: 3 max_iter: 3\n")
    s = get_solver(str(path))
    assert type(s).type == "Nesterov" and len(s.test_nets) == 1
    assert s.param.snapshot_prefix == str(tmp_path / "solver")


# --- seeding and nets ---

def test_random_seed_fixes_filled_weights():
    a, b = make_solver(), make_solver()
    np.testing.assert_array_equal(weights(a)[0], weights(b)[0])
    c = make_solver("random_seed: 4")
    assert not np.array_equal(weights(a)[0], weights(c)[0])


def test_test_nets_share_weights_with_train_net():
    s = make_solver("test_iter: 1 test_interval: 100")
    s.step(2)
    test_w = s.test_nets[0].params["fc"][0].data
    np.testing.assert_array_equal(test_w, weights(s)[0])
    assert np.shares_memory(test_w, s.net.params["fc"][0].data)


def test_weights_field_loads_into_train_and_test_nets(tmp_path):
    s = make_solver("test_iter: 1 test_interval: 100")
    s.step(3)
    path = str(tmp_path / "w.caffemodel")
    prototxt.write_binary(s.net.to_proto(), path)
    fresh = make_solver(f'test_iter: 1 test_interval: 100 weights: "{path}" random_seed: 9')
    np.testing.assert_array_equal(weights(fresh)[0], weights(s)[0])
    np.testing.assert_array_equal(fresh.test_nets[0].params["fc"][0].data, weights(s)[0])


# --- Step loop, callbacks, actions, logs ---

def test_callbacks_run_around_forward_backward_and_update():
    s = make_solver('type: "SGD"')
    events = []
    data = s.net.layer("data")
    s.add_callback(lambda: events.append(("start", s.iter, data.pos)),
                   lambda: events.append(("ready", s.iter, float(s.net.flat_diff.abs().sum()) > 0,
                                          np.array_equal(weights(s)[1], np.full(2, 0.1, np.float32)))))
    s.step(2)
    assert events == [("start", 0, 0), ("ready", 0, True, True), ("start", 1, 4), ("ready", 1, True, False)]


def test_smoothed_loss_over_average_loss():
    s = make_solver("average_loss: 3")
    losses, smoothed = [], []
    s.add_callback(lambda: None, lambda: (losses.append(s.loss), smoothed.append(s.smoothed_loss)))
    s.step(7)
    for i, sm in enumerate(smoothed):
        window = losses[max(0, i - 2):i + 1]
        assert sm == pytest.approx(np.mean(window), rel=1e-5)


def test_action_function_stop_and_snapshot(tmp_path):
    s = make_solver(f'snapshot_prefix: "{tmp_path}/a"')
    requests = iter([SolverAction.NONE, SolverAction.SNAPSHOT, SolverAction.NONE, SolverAction.STOP])
    s.set_action_function(lambda: next(requests, SolverAction.NONE))
    s.step(10)
    assert s.iter == 4 and s.requested_early_exit
    assert sorted(os.listdir(tmp_path)) == ["a_iter_2.caffemodel", "a_iter_2.solverstate"]


def test_solve_snapshots_after_train_and_logs(tmp_path, caplog):
    s = make_solver(f'max_iter: 4 display: 2 snapshot: 3 snapshot_after_train: true test_iter: 2 '
                    f'test_interval: 2 snapshot_prefix: "{tmp_path}/m" lr_policy: "multistep" gamma: 0.1 '
                    "stepvalue: 1 stepvalue: 3 test_compute_loss: true")
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        s.solve()
    assert sorted(os.listdir(tmp_path)) == ["m_iter_3.caffemodel", "m_iter_3.solverstate",
                                            "m_iter_4.caffemodel", "m_iter_4.solverstate"]
    msgs = caplog.messages
    num = r"-?[0-9.e+-]+"
    patterns = [
        r"Solving tiny",
        r"Learning Rate Policy: multistep",
        r"Iteration 0, Testing net \(#0\)",
        rf"Test loss: {num}",
        rf"    Test net output #0: loss = {num} \(\* 1 = {num} loss\)",
        rf"    Test net output #1: ymean = {num}",
        rf"    Test net output #2: ymean = {num}",
        rf"Iteration 0 \({num} iter/s, {num}s/2 iters\), loss = {num}",
        rf"    Train net output #0: loss = {num} \(\* 1 = {num} loss\)",
        r"Iteration 0, lr = 0.05",
        r"MultiStep Status: Iteration 1, step = 1",
        r"Iteration 2, Testing net \(#0\)",
        rf"Iteration 2 \({num} iter/s, {num}s/2 iters\), loss = {num}",
        r"Iteration 2, lr = 0.005",
        r"Snapshotting to binary proto file .*m_iter_3\.caffemodel",
        r"Snapshotting solver state to binary proto file .*m_iter_3\.solverstate",
        r"MultiStep Status: Iteration 3, step = 2",
        r"Snapshotting to binary proto file .*m_iter_4\.caffemodel",
        rf"Iteration 4, loss = {num}",
        r"Iteration 4, Testing net \(#0\)",
        r"Optimization Done\.",
    ]
    pos = 0
    for pat in patterns:
        while pos < len(msgs) and not re.fullmatch(pat, msgs[pos]):
            pos += 1
        assert pos < len(msgs), f"no log line matching {pat!r} in order; got:\n" + "\n".join(msgs)
        pos += 1


def test_display_lines_report_loss_values(caplog):
    s = make_solver("display: 1")
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        s.step(1)
    line = next(m for m in caplog.messages if m.startswith("    Train net output #0"))
    assert line == f"    Train net output #0: loss = {s.loss:.6g} (* 1 = {s.loss:.6g} loss)"
    head = next(m for m in caplog.messages if m.startswith("Iteration 0 ("))
    assert head.endswith(f"s/1 iters), loss = {s.loss:.6g}")


def test_output_lines_format():
    assert solver_mod.output_lines("Test", ["accuracy", "loss"], [0.98, 0.1234567], [0, 2]) == [
        "    Test net output #0: accuracy = 0.98",
        "    Test net output #1: loss = 0.123457 (* 2 = 0.246913 loss)",
    ]


def test_test_averages_each_output_over_test_iter(caplog):
    s = make_solver("test_iter: 3 test_interval: 100 test_compute_loss: true test_initialization: false")
    s.step(2)
    w, b = weights(s)
    losses, means = [], []
    for i in range(3):
        rows = [(8 + 4 * i + k) % 16 for k in range(4)]
        y = DATA_X[rows] @ w.T + b
        losses.append(((y - DATA_T[rows]) ** 2).sum() / 8)
        means.append(y.mean(0))
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        scores = s.test(0)
    assert [n for n, _ in scores] == ["loss", "ymean", "ymean"]
    got = np.array([v for _, v in scores])
    want = np.array([np.mean(losses), *np.mean(means, 0)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    logged = [re.fullmatch(r"Test loss: (\S+)", m) for m in caplog.messages]
    assert float(next(m for m in logged if m).group(1)) == pytest.approx(np.mean(losses), rel=1e-5)


def test_test_interval_and_test_initialization():
    s = make_solver("test_iter: 1 test_interval: 2 test_initialization: false")
    calls = []
    s.test = lambda i=0: calls.append(s.iter)
    s.step(5)
    assert calls == [2, 4]


# --- snapshot and restore ---

def _run(s, n):
    losses = []
    for _ in range(n):
        s.step(1)
        losses.append(s.loss)
    return losses


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
@pytest.mark.parametrize("kind, extra", [
    ("Adam", "momentum: 0.9 momentum2: 0.999 weight_decay: 0.01"),
    ("SGD", 'momentum: 0.9 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 6'),
    ("AdaDelta", "momentum: 0.9 delta: 1e-6 base_lr: 1.0"),
])
def test_snapshot_then_restore_reproduces_uninterrupted_run(tmp_path, fmt, kind, extra):
    conf = f'type: "{kind}" {extra} snapshot_format: {fmt} snapshot_prefix: "{tmp_path}/s"'
    full = make_solver(conf)
    full_losses = _run(full, 10)
    part = make_solver(conf)
    _run(part, 4)
    model, state = part.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model == f"{tmp_path}/s_iter_4.caffemodel{suffix}"
    assert state == f"{tmp_path}/s_iter_4.solverstate{suffix}"
    fresh = make_solver(conf + " random_seed: 11")
    assert not np.array_equal(weights(fresh)[0], weights(part)[0])
    fresh.restore(state)
    assert fresh.iter == 4 and fresh.current_step == part.current_step
    fresh.net.layer("data").pos = part.net.layer("data").pos  # data position is the trainer's business
    assert _run(fresh, 6) == full_losses[4:]
    for a, b in zip(weights(fresh), weights(full)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.history_blobs(), full.history_blobs()):
        assert torch.equal(a, b)


def test_solverstate_bytes_parse_as_caffe_solver_state(tmp_path):
    s = make_solver(f'type: "Adam" snapshot_prefix: "{tmp_path}/x" lr_policy: "step" gamma: 0.5 stepsize: 2')
    s.step(3)
    model, state_path = s.snapshot()
    state = caffe_pb2.SolverState()
    with open(state_path, "rb") as f:
        state.ParseFromString(f.read())
    assert state.iter == 3
    assert state.learned_net == f"{tmp_path}/x_iter_3.caffemodel" == model
    assert state.current_step == 1
    assert len(state.history) == 4
    assert [tuple(h.shape.dim) for h in state.history] == [(2, 3), (2,), (2, 3), (2,)]
    np.testing.assert_array_equal(np.array(state.history[2].data), s.history_blobs()[2].numpy().ravel())
    net = caffe_pb2.NetParameter()
    with open(model, "rb") as f:
        net.ParseFromString(f.read())
    fc = next(lp for lp in net.layer if lp.name == "fc")
    np.testing.assert_array_equal(np.array(fc.blobs[0].data), weights(s)[0].ravel())


def test_restore_rejects_history_of_another_solver_type(tmp_path):
    s = make_solver(f'type: "SGD" snapshot_prefix: "{tmp_path}/x"')
    s.step(1)
    _, state = s.snapshot()
    adam = make_solver('type: "Adam"')
    with pytest.raises(UserError, match="Incorrect length of history blobs: the state has 2, the Adam solver needs 4"):
        adam.restore(state)


def test_restore_finds_moved_snapshot_next_to_state(tmp_path):
    s = make_solver(f'snapshot_prefix: "{tmp_path}/a/x" momentum: 0.9')
    os.mkdir(tmp_path / "a")
    s.step(2)
    s.snapshot()
    os.rename(tmp_path / "a", tmp_path / "b")
    fresh = make_solver("momentum: 0.9 random_seed: 5")
    fresh.restore(str(tmp_path / "b" / "x_iter_2.solverstate"))
    np.testing.assert_array_equal(weights(fresh)[0], weights(s)[0])
    os.remove(tmp_path / "b" / "x_iter_2.caffemodel")
    with pytest.raises(UserError, match="learned_net .* was not found"):
        fresh.restore(str(tmp_path / "b" / "x_iter_2.solverstate"))


def test_solve_resumes_from_a_snapshot(tmp_path):
    conf = f'momentum: 0.9 max_iter: 6 snapshot_prefix: "{tmp_path}/r"'
    a = make_solver(conf)
    a.step(3)
    _, state = a.snapshot()
    b = make_solver(conf)
    b.solve(state)
    assert b.iter == 6


def test_in_memory_solver_state_round_trip():
    a = make_solver('type: "Adam"')
    a.step(3)
    b = make_solver('type: "Adam"')
    b.restore_state(a.solver_state())
    assert b.iter == 3
    for x, y in zip(a.history_blobs(), b.history_blobs()):
        assert torch.equal(x, y)


# --- with the real layers ---

@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_inner_product_softmax_net_trains_and_matches_numpy(kind):
    text = """
    net_param { name: "ip"
      layer { name: "data" type: "Input" top: "x" top: "label"
              input_param { shape { dim: 6 dim: 4 } shape { dim: 6 } } }
      layer { name: "ip" type: "InnerProduct" bottom: "x" top: "z"
              inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
      layer { name: "loss" type: "SoftmaxWithLoss" bottom: "z" bottom: "label" top: "loss" } }
    base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 momentum2: 0.999 weight_decay: 0.001 random_seed: 1
    snapshot_after_train: false max_iter: 10
    """ + f'type: "{kind}"'
    s = get_solver(prototxt.parse_text(text, caffe_pb2.SolverParameter(), "<ip>"))
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    label = np.array([0, 1, 2, 0, 1, 2], np.float32)
    s.net.blobs["x"].data[...] = x
    s.net.blobs["label"].data[...] = label
    ref = NumpyCaffeSolver(kind, s.param, [b.data.copy() for b in s.net.params["ip"]], [1, 1], [1, 1])
    losses = []
    for it in range(10):
        w, b = ref.w
        z = x.astype(np.float64) @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        losses.append(-np.log(p[np.arange(6), label.astype(int)]).mean())
        dz = p.copy()
        dz[np.arange(6), label.astype(int)] -= 1
        dz /= 6
        ref.update([(dz.T @ x).astype(np.float32), dz.sum(0).astype(np.float32)], it)
        s.step(1)
        assert s.loss == pytest.approx(losses[-1], rel=1e-5)
    for got, want in zip([b.data for b in s.net.params["ip"]], ref.w):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]


def test_batchnorm_statistics_are_kept_in_history_but_never_updated():
    text = NET.format(batch=4, lr_w=1, lr_b=1).replace(
        'bottom: "y" bottom: "t" top: "loss"',
        'bottom: "z" bottom: "t" top: "loss"').replace(
        'layer { name: "loss"', 'layer { name: "bn" type: "BatchNorm" bottom: "y" top: "z" }\nlayer { name: "loss"')
    param = prototxt.parse_text("net_param {" + text + '} base_lr: 0.1 lr_policy: "fixed" type: "Adam" '
                                "weight_decay: 0.1 random_seed: 1 snapshot_after_train: false",
                                caffe_pb2.SolverParameter(), "<bn>")
    s = get_solver(param)
    assert len(s.history_blobs()) == 2 * 5
    seen = []
    s.add_callback(lambda: None, lambda: seen.append([b.data.copy() for b in s.net.params["bn"]]))
    s.step(3)
    assert seen[-1][2][0] > 0  # the forward did update the statistics
    for before, after in zip(seen[-1], s.net.params["bn"]):
        np.testing.assert_array_equal(after.data, before)
