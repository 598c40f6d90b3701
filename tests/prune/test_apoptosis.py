"""Pruning a running engine solver, and apoptosis in `mpicaffe train`.

Live surgery must equal the file route (snapshot, prune the files, restore into a solver of the
pruned net): same losses and weights afterwards, to float32 rounding (rtol 1e-6; the same
operations run on the same values, only in freshly allocated buffers).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from mpicaffe import prototxt, trainer
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import create_communicator
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune.apoptosis import ApoptosisConfig
from mpicaffe.prune.live import analyze_solver, parameter_count, prune_solver
from mpicaffe.prune.model import PrunableModel
from mpicaffe.prune.surgery import plan_cuts
from tests.parity import solver_setup

SOLVER = 'type: "Adam" base_lr: 0.05 momentum: 0.9 momentum2: 0.999 lr_policy: "fixed" weight_decay: 0.001'


def _steps(solver, n: int) -> list[float]:
    out = []
    for _ in range(n):
        solver.step(1)
        out.append(solver.loss)
    return out


def test_live_surgery_equals_pruning_the_snapshot_files(tmp_path):
    net_path = solver_setup.write_problem(tmp_path)
    solver_path = solver_setup.write_solver(tmp_path, net_path, SOLVER)
    live = get_solver(solver_path)
    _steps(live, 3)  # 3 batches of 8 = the whole LMDB: the reader is back at record 0
    model_file, state_file = live.snapshot()
    removed = {"ip1": [1, 4]}
    assert [g.name for g in analyze_solver(live).groups] == ["ip1"]
    prune_solver(live, removed)
    assert tuple(live.net.params["ip1"][0].data.shape) == (4, 16)
    assert tuple(live.net.params["ip2"][0].data.shape) == (3, 4)

    files = PrunableModel.load(net_path, model_file)
    cuts = files.cuts({k: np.array(v) for k, v in removed.items()})
    net, weights, history = files.pruned_files(cuts, snapshot_io.read_solver_state(state_file), state_file)
    files.close()
    (tmp_path / "pruned.prototxt").write_text(prototxt.to_text(net))
    param = prototxt.read_solver(solver_path)
    param.net = str(tmp_path / "pruned.prototxt")
    restored = get_solver(param, solver_path)
    restored.net.copy_from(weights)
    restored.iter = live.iter
    restored.set_history(history)

    np.testing.assert_allclose(_steps(live, 5), _steps(restored, 5), rtol=1e-6)
    for name, blobs in restored.net.params.items():
        for j, b in enumerate(blobs):
            np.testing.assert_allclose(live.net.params[name][j].data, b.data, rtol=1e-6, atol=1e-7)


def test_apoptosis_in_train_shrinks_the_net_and_writes_loadable_files(tmp_path, caplog):
    net_path = solver_setup.write_problem(tmp_path)
    solver_path = solver_setup.write_solver(tmp_path, net_path, 'type: "SGD" base_lr: 0.05 momentum: 0.9 '
                                            'lr_policy: "fixed"\nsnapshot_after_train: true')
    path = tmp_path / "solver.prototxt"
    path.write_text(path.read_text().replace("max_iter: 20", "max_iter: 12"))
    cfg = trainer.TrainConfig(solver=solver_path, apoptosis=ApoptosisConfig(every=3, criterion="apoptosis",
                                                                            target=0.4, step=0.25, samples=2))
    with caplog.at_level(logging.INFO, logger="mpicaffe.prune.apoptosis"):
        t = trainer.train(cfg, create_communicator())
    assert t.solver.iter == 12
    start = 6 * 16 + 6 + 3 * 6 + 3  # ip1 and ip2 weights and biases
    now = parameter_count(t.solver.net)
    assert now <= 0.6 * start < parameter_count(t.solver.net) + 16 + 3  # stops once the target is reached
    events = [r.getMessage() for r in caplog.records if "Apoptosis at iteration" in r.getMessage()]
    assert [e.split(":")[0] for e in events] == [f"Apoptosis at iteration {i}" for i in (3, 6, 9)]
    assert "ip1 6->5" in events[0] and "ip1 4->3" in events[2]
    # the last pruned net definition loads the final snapshot
    last = max(int(r.split("iteration ")[1].split(":")[0]) for r in events)
    pruned_net = str(tmp_path / f"solver_iter_{last}.prototxt")
    net = PrunableModel.load(pruned_net, str(tmp_path / "solver_iter_12.caffemodel"))
    assert parameter_count(net.nets[caffe_pb2.TRAIN]) == now
    net.close()


def test_apoptosis_options_are_checked():
    with pytest.raises(UserError, match="--prune-target"):
        ApoptosisConfig(every=5, target=1.5).check()
    with pytest.raises(UserError, match="--prune-every"):
        ApoptosisConfig(every=0).check()


def test_multiply_add_count_matches_the_report_and_the_cut_net():
    from mpicaffe.prune.live import multiply_add_count, rebuild_net
    from mpicaffe.prune.report import net_costs
    from tests.prune import nets
    from tests.prune.test_surgery import load

    model = load()
    net = model.nets[caffe_pb2.TEST]
    assert multiply_add_count(net) == sum(c.macs for c in net_costs(net)) > 0
    analysis = analyze_solver(type("S", (), {"net": net, "test_nets": []})())
    assert {g.name for g in analysis.groups} == nets.PRUNABLE
    cuts = plan_cuts(analysis, {"conv1": np.array([1, 6]), "conv3+conv3s": np.array([0, 3, 9]), "ip1": np.array([4])})
    smaller = rebuild_net(net, cuts)
    assert multiply_add_count(net, cuts) == multiply_add_count(smaller) == sum(c.macs for c in net_costs(smaller))
    assert multiply_add_count(smaller) < multiply_add_count(net)
    model.close()
    smaller.close()


def test_apoptosis_goes_on_until_the_multiply_adds_reach_the_target_too():
    from mpicaffe.prune.apoptosis import Size, choose_removal
    from tests.prune.test_surgery import load

    model = load()
    net = model.nets[caffe_pb2.TEST]
    solver = type("S", (), {"net": net, "test_nets": []})()
    analysis = analyze_solver(solver)
    start = Size.of(net)
    cfg = ApoptosisConfig(every=1, criterion="l1", step=1.0)
    # the parameters alone already meet this goal: nothing to remove
    removed, _ = choose_removal(solver, cfg, Size(start.params, start.macs), analysis)
    assert removed == {}
    # half the multiply-adds must go, however few parameters that takes
    removed, ratio = choose_removal(solver, cfg, Size(start.params, start.macs // 2), analysis)
    after = Size.of(net, plan_cuts(analysis, {k: np.array(v) for k, v in removed.items()}))
    assert after.macs <= start.macs // 2 and 0 < ratio < 1
    # a size is within a goal when both measures are
    assert not start.within(Size(start.params, start.macs // 2)) and after.within(Size(start.params, start.macs // 2))
    assert not Size(start.params + 1, 0).within(start)
    model.close()
