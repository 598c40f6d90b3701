"""Python layers (`type: "Python"`) on the engine, as Caffe's PythonLayer runs them: setup once,
reshape before every forward, the user's backward inside the net's backward, param_str and phase,
the module found on sys.path or in the prototxt's folder, clear errors, and parameter blobs the
user adds that are saved in .caffemodel files and learned by the solver."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from mpicaffe import caffe, prototxt
from mpicaffe.backends.engine import solver_ranks
from mpicaffe.errors import UserError

LAYERS = textwrap.dedent('''
    import numpy as np
    from mpicaffe import caffe


    class Cube(caffe.Layer):
        """top = w[c] * bottom^3 + sin(bottom), w a learnable blob starting at param_str."""

        def setup(self, bottom, top):
            self.setups = getattr(self, "setups", 0) + 1
            self.reshapes = 0
            self.blobs.add_blob(bottom[0].channels)
            self.blobs[0].data[...] = float(self.param_str)

        def reshape(self, bottom, top):
            self.reshapes += 1
            top[0].reshape(*bottom[0].shape)

        def forward(self, bottom, top):
            x = bottom[0].data
            top[0].data[...] = self.blobs[0].data * x ** 3 + np.sin(x)

        def backward(self, top, propagate_down, bottom):
            x = bottom[0].data
            self.blobs[0].diff[...] += (top[0].diff * x ** 3).sum(axis=0)
            if propagate_down[0]:
                bottom[0].diff[...] = top[0].diff * (3 * self.blobs[0].data * x ** 2 + np.cos(x))


    class SumSquaresLoss(caffe.Layer):
        """0.5 * sum(bottom^2), a one-element loss."""

        def reshape(self, bottom, top):
            top[0].reshape(1)

        def forward(self, bottom, top):
            top[0].data[0] = 0.5 * np.sum(bottom[0].data.astype(np.float64) ** 2)

        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = top[0].diff[0] * bottom[0].data


    class Counter:
        """A data layer, not deriving caffe.Layer: top = the number of forwards so far, per row."""

        def setup(self, bottom, top):
            self.forwards = 0
            self.seen = (self.param_str, self.phase)

        def reshape(self, bottom, top):
            top[0].reshape(2, 3)

        def forward(self, bottom, top):
            self.forwards += 1
            top[0].data[...] = self.forwards

        def backward(self, top, propagate_down, bottom):
            raise AssertionError("a data layer is never backpropagated")


    class AddsBlobLate(caffe.Layer):
        def reshape(self, bottom, top):
            self.blobs.add_blob(3)
            top[0].reshape(1)

        def forward(self, bottom, top):
            pass


    class FailsInSetup(caffe.Layer):
        def setup(self, bottom, top):
            raise ValueError("param_str must name a file")
''')

NET = '''
name: "python_layers"
force_backward: true
layer {{ name: "input" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "cube" type: "Python" bottom: "x" top: "y" {param}
        python_param {{ module: "{module}" layer: "Cube" param_str: "0.75" }} }}
layer {{ name: "loss" type: "Python" bottom: "y" top: "loss" loss_weight: 2
        python_param {{ module: "{module}" layer: "SumSquaresLoss" }} }}
'''

_modules = iter(range(1_000_000))


@pytest.fixture
def layers_module(tmp_path, monkeypatch):
    """A fresh module name holding LAYERS, written next to the test's prototxts in tmp_path."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the engine appends prototxt folders
    name = f"pylayers_{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(LAYERS)
    yield name
    sys.modules.pop(name, None)


def _net(tmp_path, text: str, phase: int = caffe.TRAIN, name: str = "net.prototxt") -> caffe.Net:
    path = tmp_path / name
    path.write_text(text)
    return caffe.Net(str(path), phase)


def _user(net: caffe.Net, layer: str):
    return net.layer_dict[layer].user


def _loss(net: caffe.Net, x: np.ndarray) -> float:
    net.blobs["x"].data[...] = x
    net.forward()
    return 2 * float(net.blobs["loss"].data[0])


def test_backward_matches_finite_differences_through_the_net(tmp_path, layers_module):
    net = _net(tmp_path, NET.format(module=layers_module, param=""))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3)).astype(np.float32)
    net.blobs["x"].data[...] = x
    assert net.forward()["loss"].shape == (1,)
    net.backward()
    analytic_x = net.blobs["x"].diff.copy()
    analytic_w = net.params["cube"][0].diff.copy()
    assert np.abs(analytic_x).min() > 0

    eps = 1e-2
    numeric_x = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        numeric_x[i] = (_loss(net, x + d) - _loss(net, x - d)) / (2 * eps)
    w = net.params["cube"][0].data
    numeric_w = np.zeros_like(w)
    for c in range(w.size):
        w[c] += eps
        up = _loss(net, x)
        w[c] -= 2 * eps
        down = _loss(net, x)
        w[c] += eps
        numeric_w[c] = (up - down) / (2 * eps)
    np.testing.assert_allclose(analytic_x, numeric_x, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(analytic_w, numeric_w, rtol=1e-2, atol=1e-3)


def test_setup_runs_once_and_reshape_before_every_forward(tmp_path, layers_module):
    net = _net(tmp_path, NET.format(module=layers_module, param=""))
    cube = _user(net, "cube")
    assert (cube.setups, cube.reshapes) == (1, 1)
    net.forward()
    net.forward()
    assert (cube.setups, cube.reshapes) == (1, 3)


def test_param_diffs_accumulate_until_cleared_as_in_caffe(tmp_path, layers_module):
    net = _net(tmp_path, NET.format(module=layers_module, param=""))
    net.blobs["x"].data[...] = 0.5
    net.forward()
    net.backward()
    once = net.params["cube"][0].diff.copy()
    net.forward()
    net.backward()
    np.testing.assert_allclose(net.params["cube"][0].diff, 2 * once, rtol=1e-6)
    assert np.abs(once).min() > 0


def test_data_layer_gets_param_str_and_phase_and_runs_every_forward(tmp_path, layers_module):
    text = f'''
    layer {{ name: "count" type: "Python" top: "n"
            python_param {{ module: "{layers_module}" layer: "Counter" param_str: "{{'batch': 2}}" }} }}
    layer {{ name: "loss" type: "Python" bottom: "n" top: "loss" loss_weight: 1
            python_param {{ module: "{layers_module}" layer: "SumSquaresLoss" }} }}
    '''
    for phase in (caffe.TRAIN, caffe.TEST):
        net = _net(tmp_path, text, phase)
        counter = _user(net, "count")
        assert counter.seen == ("{'batch': 2}", phase)
        net.forward()
        net.backward()
        net.forward()
        np.testing.assert_array_equal(net.blobs["n"].data, np.full((2, 3), 2.0))
        assert counter.forwards == 2
        assert net._net.blobs["n"].tensor.requires_grad is False


def test_module_found_in_the_prototxt_folder_only(tmp_path, layers_module, monkeypatch):
    sub = tmp_path / "model"
    sub.mkdir()
    (tmp_path / f"{layers_module}.py").rename(sub / f"{layers_module}.py")
    monkeypatch.chdir(tmp_path)
    net = _net(sub, NET.format(module=layers_module, param=""))
    assert str(sub) in sys.path
    assert _user(net, "cube").param_str == "0.75"


def test_module_found_in_the_nets_folder_when_the_solver_is_elsewhere(tmp_path, layers_module, monkeypatch):
    # mpicaffe train hands the net on inside the solver; the net's folder must still be searched
    sub = tmp_path / "model"
    sub.mkdir()
    (tmp_path / f"{layers_module}.py").rename(sub / f"{layers_module}.py")
    net = NET.format(module=layers_module, param="").replace(
        'type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } }',
        'type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } }')
    assert "DummyData" in net
    (sub / "net.prototxt").write_text(net)
    solvers = tmp_path / "solvers"
    solvers.mkdir()
    (solvers / "solver.prototxt").write_text(f'net: "{sub / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                                             f'max_iter: 2\nsnapshot_after_train: false\n')
    monkeypatch.chdir(tmp_path)
    from mpicaffe.cli import main

    assert main(["train", "--solver", str(solvers / "solver.prototxt")]) == 0


def test_module_found_on_sys_path(tmp_path, layers_module, monkeypatch):
    elsewhere = tmp_path / "lib"
    elsewhere.mkdir()
    (tmp_path / f"{layers_module}.py").rename(elsewhere / f"{layers_module}.py")
    monkeypatch.syspath_prepend(str(elsewhere))
    net = _net(tmp_path, NET.format(module=layers_module, param=""), name="net2.prototxt")
    assert net.layers[1].type == "Python"


def test_missing_module_is_a_clear_error(tmp_path, layers_module):
    with pytest.raises(UserError) as e:
        _net(tmp_path, NET.format(module="no_such_layers_module", param=""))
    msg = str(e.value)
    assert "net.prototxt" in msg and "layer 'cube' (Python)" in msg
    assert "cannot find Python module 'no_such_layers_module'" in msg and str(tmp_path) in msg


def test_missing_class_is_a_clear_error(tmp_path, layers_module):
    text = NET.format(module=layers_module, param="").replace('layer: "Cube"', 'layer: "Cubic"')
    with pytest.raises(UserError, match=rf"layer 'cube' \(Python\): Python module '{layers_module}' \(.*\) "
                                        r"has no class 'Cubic'"):
        _net(tmp_path, text)


def test_module_that_fails_to_import_is_a_clear_error(tmp_path, layers_module):
    (tmp_path / "broken_layers_module.py").write_text("import numpy\n\nraise RuntimeError('no GPU here')\n")
    try:
        with pytest.raises(UserError, match=r"layer 'cube' \(Python\): importing Python module "
                                            r"'broken_layers_module' failed: RuntimeError: no GPU here "
                                            r"\(.*broken_layers_module.py:3\)"):
            _net(tmp_path, NET.format(module="broken_layers_module", param=""))
    finally:
        sys.modules.pop("broken_layers_module", None)


def test_exception_in_setup_names_the_layer_and_the_line(tmp_path, layers_module):
    text = NET.format(module=layers_module, param="").replace('layer: "Cube"', 'layer: "FailsInSetup"')
    with pytest.raises(UserError) as e:
        _net(tmp_path, text)
    msg = str(e.value)
    assert f"layer 'cube' (Python): {layers_module}.FailsInSetup.setup failed: " in msg
    assert "ValueError: param_str must name a file" in msg and f"{layers_module}.py:" in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_blobs_can_be_added_in_setup_only(tmp_path, layers_module):
    text = NET.format(module=layers_module, param="").replace('layer: "Cube"', 'layer: "AddsBlobLate"')
    with pytest.raises(UserError, match="add_blob must be called in setup"):
        _net(tmp_path, text)


def test_user_blobs_are_saved_and_loaded_in_caffemodel(tmp_path, layers_module):
    net = _net(tmp_path, NET.format(module=layers_module, param=""))
    assert [b.data.tolist() for b in net.params["cube"]] == [[0.75, 0.75, 0.75]]
    net.params["cube"][0].data[...] = [1.0, -2.0, 3.5]
    net.save(str(tmp_path / "w.caffemodel"))
    saved = prototxt.read_net(str(tmp_path / "w.caffemodel"))
    cube = next(lp for lp in saved.layer if lp.name == "cube")
    assert list(cube.blobs[0].shape.dim) == [3] and list(cube.blobs[0].data) == [1.0, -2.0, 3.5]

    other = _net(tmp_path, NET.format(module=layers_module, param=""))
    other.copy_from(str(tmp_path / "w.caffemodel"))
    np.testing.assert_array_equal(_user(other, "cube").blobs[0].data, [1.0, -2.0, 3.5])


def test_solver_learns_user_blobs_with_their_lr_mult(tmp_path, layers_module):
    (tmp_path / "net.prototxt").write_text(NET.format(module=layers_module, param="param { lr_mult: 2 }"))
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 10\nsnapshot_after_train: false\n')
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    net = solver.net
    net.blobs["x"].data[...] = 0.5
    grads = []
    solver.add_callback(lambda: None, lambda: grads.append(net.params["cube"][0].diff.copy()))
    before = net.params["cube"][0].data.copy()
    solver.step(1)
    after = net.params["cube"][0].data.copy()
    assert np.abs(grads[0]).min() > 0
    np.testing.assert_allclose(after, before - 0.1 * 2 * grads[0], rtol=1e-6)
    # the user's self.blobs is the net's weight, not a copy
    np.testing.assert_array_equal(_user(net, "cube").blobs[0].data, after)


def test_solver_count_and_rank_default_to_one_process():
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    try:
        solver_ranks.set_solvers(4, 3)
        assert (caffe.solver_count(), caffe.solver_rank(), solver_ranks.multiprocess()) == (4, 3, True)
        with pytest.raises(ValueError):
            caffe.set_solver_rank(-1)
    finally:
        solver_ranks.set_solvers(1, 0)
    assert solver_ranks.multiprocess() is False
