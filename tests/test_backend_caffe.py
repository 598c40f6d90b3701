"""The pycaffe backend (mpicaffe.backends.caffe) on a tiny net that needs no data files.

Needs real Caffe: skipped outside CI without it, failing in CI (tests/real_caffe.py).
"""
import os

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.real_caffe import import_pycaffe

# two InnerProducts sharing their weights by name, so learnable_params has 3 blobs, not 4
NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p" param { name: "w" }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "x" top: "p2" param { name: "w" }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
layer { name: "loss2" type: "EuclideanLoss" bottom: "p2" bottom: "y" top: "loss2" loss_weight: 0.5 }
"""

SOLVER = """
net: "tiny.prototxt"
test_net: "tiny.prototxt"
test_iter: 1
test_interval: 1000
base_lr: 0.1
lr_policy: "fixed"
random_seed: 3
"""


@pytest.fixture()
def caffe_backend():
    import_pycaffe()
    from mpicaffe.backends import caffe as backend

    return backend


@pytest.fixture()
def solver_dir(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.prototxt").write_text(NET)
    (tmp_path / "models" / "solver.prototxt").write_text(SOLVER)
    return tmp_path / "models"


def test_builds_from_a_path_relative_to_the_solver_folder(caffe_backend, solver_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the net is named relative to the solver's folder, not the cwd
    s = caffe_backend.CaffeSolver("models/solver.prototxt")
    assert s.iter == 0
    assert s.param.net == str(solver_dir / "tiny.prototxt")
    assert s.param.snapshot_prefix == "models/solver"  # Caffe's default: the solver path sans extension
    assert list(s.net.blobs) == ["x", "y", "x_data_0_split_0", "x_data_0_split_1", "y_data_1_split_0",
                                 "y_data_1_split_1", "p", "p2", "loss", "loss2"]
    assert len(s.test_nets) == 1
    s.step(2)
    assert s.iter == 2


def test_modified_parameter_is_used(caffe_backend, solver_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    param = prototxt.read_solver(str(solver_dir / "solver.prototxt"))
    param.base_lr = 0.0
    del param.test_net[:]
    del param.test_iter[:]
    param.ClearField("test_interval")
    s = caffe_backend.CaffeSolver(str(solver_dir / "solver.prototxt"), param)
    assert s.test_nets == []
    before = [a.copy() for a in s.parameter_arrays()]
    s.step(3)
    for a, b in zip(s.parameter_arrays(), before):
        np.testing.assert_array_equal(a, b)  # base_lr 0: nothing moves
    assert s.param.base_lr == 0.0


def test_random_seed_is_honoured(caffe_backend, solver_dir):
    path = str(solver_dir / "solver.prototxt")
    a = [x.copy() for x in caffe_backend.CaffeSolver(path).parameter_arrays()]
    b = [x.copy() for x in caffe_backend.CaffeSolver(path).parameter_arrays()]
    param = prototxt.read_solver(path)
    param.random_seed = 4
    c = [x.copy() for x in caffe_backend.CaffeSolver(path, param).parameter_arrays()]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_parameter_and_gradient_arrays_are_views_in_learnable_order(caffe_backend, solver_dir):
    s = caffe_backend.CaffeSolver(str(solver_dir / "solver.prototxt"))
    params = s.parameter_arrays()
    assert [p.shape for p in params] == [(2, 3), (2,), (2,)]  # ip.w (shared by ip2), ip.b, ip2.b
    np.testing.assert_array_equal(params[1], np.float32(0.1))
    params[2][...] = 7.0
    np.testing.assert_array_equal(s.net.params["ip2"][1].data, 7.0)
    assert np.shares_memory(s.net.params["ip2"][0].data, params[0])

    seen = []

    def on_gradients_ready():
        grads = s.gradient_arrays()
        seen.append([g.copy() for g in grads])
        # the shared weight's diff holds both layers' contributions (Caffe's ShareWeights)
        np.testing.assert_array_equal(grads[0], s.net.params["ip2"][0].diff)
        for g in grads:
            g[...] = 0.0  # a trainer may rewrite gradients here; the update must see it

    s.add_callback(lambda: None, on_gradients_ready)
    before = [p.copy() for p in params]
    s.step(1)
    assert len(seen) == 1 and np.abs(seen[0][0]).sum() > 0
    for a, b in zip(s.parameter_arrays(), before):
        np.testing.assert_array_equal(a, b)


def test_callbacks_order_and_loss(caffe_backend, solver_dir):
    s = caffe_backend.CaffeSolver(str(solver_dir / "solver.prototxt"))
    events = []
    s.add_callback(lambda: events.append(("start", s.iter)), lambda: events.append(("grads", s.iter, s.loss)))
    s.step(2)
    assert [e[:2] for e in events] == [("start", 0), ("grads", 0), ("start", 1), ("grads", 1)]
    net = s.net
    expected = np.float32(net.blobs["loss"].data) + np.float32(0.5) * np.float32(net.blobs["loss2"].data)
    assert events[-1][2] == pytest.approx(float(expected), rel=1e-6)
    assert s.loss == events[-1][2]


def test_loss_is_the_mean_over_iter_size(caffe_backend, solver_dir):
    path = str(solver_dir / "solver.prototxt")
    param = prototxt.read_solver(path)
    param.iter_size = 2
    s = caffe_backend.CaffeSolver(path, param)
    per_forward = []
    s.net.after_forward(lambda i: per_forward.append(float(s.net.blobs["loss"].data) +
                                                     0.5 * float(s.net.blobs["loss2"].data))
                        if i == len(s.net.layers) - 1 else None)
    s.step(1)
    assert len(per_forward) == 2 and per_forward[0] != per_forward[1]
    assert s.loss == pytest.approx(sum(per_forward) / 2, rel=1e-6)


def test_apply_update_increments_iter_in_this_caffe(caffe_backend, solver_dir):
    # Caffe's 2018 master moved ++iter_ into SGDSolver::ApplyUpdate; pycaffe's apply_update shows it
    s = caffe_backend.CaffeSolver(str(solver_dir / "solver.prototxt"))
    s.net.forward()
    s.net.backward()
    s.apply_update()
    assert s.iter == 1


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_and_restore(caffe_backend, solver_dir, tmp_path, fmt):
    path = str(solver_dir / "solver.prototxt")
    # constant data, so a restored run sees what the uninterrupted one saw
    (solver_dir / "tiny.prototxt").write_text(NET.replace('type: "gaussian" std: 1', 'type: "constant" value: 0.3'))
    param = prototxt.read_solver(path)
    param.snapshot_prefix = str(tmp_path / "snap")
    param.momentum = 0.9
    param.snapshot_format = caffe_pb2.SolverParameter.SnapshotFormat.Value(fmt)
    s = caffe_backend.CaffeSolver(path, param)
    s.step(3)
    weights, state = s.snapshot()
    assert os.path.isfile(weights) and os.path.isfile(state)
    assert weights.endswith("snap_iter_3.caffemodel" + (".h5" if fmt == "HDF5" else ""))
    s.step(2)
    after = [p.copy() for p in s.parameter_arrays()]

    r = caffe_backend.CaffeSolver(path, param)
    r.restore(state)
    assert r.iter == 3
    r.step(2)
    for a, b in zip(r.parameter_arrays(), after):
        np.testing.assert_array_equal(a, b)


def test_user_errors_instead_of_caffe_aborts(caffe_backend, solver_dir, tmp_path):
    path = str(solver_dir / "solver.prototxt")
    with pytest.raises(UserError, match="solver file not found"):
        caffe_backend.CaffeSolver(str(tmp_path / "nope.prototxt"))
    param = prototxt.read_solver(path)
    param.type = "Adamax"
    with pytest.raises(UserError, match="Unknown solver type: Adamax"):
        caffe_backend.CaffeSolver(path, param)
    param = prototxt.read_solver(path)
    param.net = "missing.prototxt"
    with pytest.raises(UserError, match="missing.prototxt"):
        caffe_backend.CaffeSolver(path, param)
    for field, value, message in [("lr_policy", "sigmoid", "needs stepsize > 0"), ("lr_policy", "cosine", "Unknown learning"),
                                  ("type", "AdaGrad", "Momentum cannot be used with AdaGrad"),
                                  ("snapshot_prefix", str(tmp_path / "no" / "dir" / "x"), "Cannot write to snapshot")]:
        param = prototxt.read_solver(path)
        param.momentum = 0.9
        param.snapshot = 10
        setattr(param, field, value)
        with pytest.raises(UserError, match=message):
            caffe_backend.CaffeSolver(path, param)
    s = caffe_backend.CaffeSolver(path)
    with pytest.raises(UserError, match="solver state file not found"):
        s.restore(str(tmp_path / "x.solverstate"))


def test_solver_for_caffe_makes_names_absolute(solver_dir, tmp_path, monkeypatch):
    from mpicaffe.backends.caffe import solver_for_caffe

    monkeypatch.chdir(tmp_path)
    (solver_dir / "w.caffemodel").write_bytes(b"")
    param = prototxt.parse_text('net: "tiny.prototxt" test_net: "tiny.prototxt" weights: "w.caffemodel, w.caffemodel"'
                                ' snapshot_prefix: "out/x"', caffe_pb2.SolverParameter())
    out = solver_for_caffe(param, "models/solver.prototxt")
    assert out.net == out.test_net[0] == str(solver_dir / "tiny.prototxt")
    assert out.weights[0] == ",".join([str(solver_dir / "w.caffemodel")] * 2)
    assert out.snapshot_prefix == "out/x"  # relative to the cwd, as Caffe writes it
    assert param.net == "tiny.prototxt"  # the caller's message is left alone
