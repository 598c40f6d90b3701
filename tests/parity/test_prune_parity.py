"""Pruned files in real Caffe: the pruned prototxt, .caffemodel and .solverstate load in Caffe and
compute what the built-in engine computes from them.

Tolerance: the parity tolerance of tests/parity/common.py (float32 sums in a different order).
With ratio 0 the files describe the same net, and Caffe's outputs must be bit-identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpicaffe import cli, prototxt
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune import criteria
from mpicaffe.prune.model import PrunableModel, build_net
from tests.parity import solver_setup
from tests.parity.common import assert_close, compare_params, pycaffe
from tests.prune import nets


def _write(tmp_path, name: str, net: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter) -> tuple[str, str]:
    model, w = tmp_path / f"{name}.prototxt", tmp_path / f"{name}.caffemodel"
    model.write_text(prototxt.to_text(net))
    w.write_bytes(weights.SerializeToString())
    return str(model), str(w)


def _caffe_outputs(caffe, model: str, weights: str, x: np.ndarray) -> dict[str, np.ndarray]:
    net = caffe.Net(model, caffe.TEST, weights=weights)
    net.blobs["data"].data[...] = x
    return {k: v.copy() for k, v in net.forward().items()}


def _engine_outputs(net_param, weights, x) -> dict[str, np.ndarray]:
    net = build_net(net_param, caffe_pb2.TEST, "<pruned>", weights)
    net.blobs["data"].data[...] = x
    with torch.no_grad():
        net.forward()
    return {k: net.blobs[k].data.copy() for k in net.outputs}


@pytest.mark.parametrize("criterion", ["l1", "apoptosis"])
def test_pruned_branchy_net_runs_the_same_in_caffe(criterion, tmp_path):
    caffe = pycaffe()
    torch.manual_seed(3)
    model = PrunableModel.load("<branchy>", param=nets.parse())
    for net in model.nets.values():
        nets.randomize_batchnorm(net, 3)
    original = _write(tmp_path, "original", model.param, model.weights_param())
    removed = model.select(criterion, ratio=criteria.parse_amounts("0.5,ip1=0.25", "--ratio"), samples=3,
                           feed=nets.feeder(1))
    assert set(removed) == nets.PRUNABLE
    net, weights, _ = model.pruned_files(model.cuts(removed))
    pruned = _write(tmp_path, "pruned", net, weights)
    identity = _write(tmp_path, "identity", *model.pruned_files(model.cuts({}))[:2])
    cnet = caffe.Net(pruned[0], caffe.TEST, weights=pruned[1])
    assert cnet.params["conv1"][0].data.shape == (4, 6, 3, 3)
    assert cnet.params["ip1"][0].data.shape == (12, 5 * 16)
    for seed in range(2):
        x = nets.inputs(seed)
        ours = _engine_outputs(net, weights, x)
        theirs = _caffe_outputs(caffe, *pruned, x)
        assert ours.keys() == theirs.keys() == {"ip2"}
        assert_close(ours["ip2"], theirs["ip2"], f"pruned net, input {seed}")
        same = _caffe_outputs(caffe, *identity, x)
        np.testing.assert_array_equal(same["ip2"], _caffe_outputs(caffe, *original, x)["ip2"])


def test_pruned_solver_state_restores_in_caffe_and_trains_the_same(tmp_path):
    """Train 3 steps, snapshot, prune with `mpicaffe prune`; Caffe and the engine both restore the
    pruned state (weights and momentum) and train 6 more steps: same losses and weights."""
    from mpicaffe.backends.caffe import CaffeSolver

    pycaffe()
    net_path = solver_setup.write_problem(tmp_path)
    solver_path = solver_setup.write_solver(tmp_path, net_path, 'type: "SGD" base_lr: 0.1 momentum: 0.9 '
                                            'lr_policy: "fixed" weight_decay: 0.001')
    writer = CaffeSolver(solver_path, prototxt.read_solver(solver_path))
    writer.step(3)
    model, state = writer.snapshot()
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--model", net_path, "--weights", model, "--solverstate", state,
                     "--out", str(out), "--ratio", "0.5", "--test-iterations", "0"]) == 0
    pruned_net = str(out / "mlp.prototxt")
    assert "num_output: 3" in (out / "mlp.prototxt").read_text().split('name: "ip1"')[1]
    param = prototxt.read_solver(solver_path)
    param.net = pruned_net
    pruned_state = str(out / state.rsplit("/", 1)[1])
    theirs = CaffeSolver(solver_path, param)
    theirs.restore(pruned_state)
    ours = get_solver(param, solver_path)
    ours.restore(pruned_state)
    assert theirs.iter == ours.iter == 3
    compare_params(ours.net, theirs.net, "restored pruned weights", rtol=0, atol=0)
    losses = {}
    for which, s in (("caffe", theirs), ("engine", ours)):
        losses[which] = []
        for _ in range(6):
            s.step(1)
            losses[which].append(s.loss)
    assert_close(losses["engine"], losses["caffe"], "losses after restoring the pruned state")
    compare_params(ours.net, theirs.net, "weights after 6 steps")
    # momentum was carried: a fresh start from the pruned weights alone goes elsewhere
    fresh = get_solver(param, solver_path)
    fresh.restore(pruned_state)
    fresh.set_history([np.zeros(h.shape, np.float32) for h in fresh.history_blobs()])
    fresh.step(6)
    assert not np.allclose(fresh.net.params["ip1"][0].data, ours.net.params["ip1"][0].data, rtol=1e-4)
