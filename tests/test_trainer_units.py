"""The trainer's own units, in one process: the batch plan, the solver each rank runs, the
recovery state, the telemetry files and the phase labels of collectives."""
import json

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.config import TrainConfig
from mpicaffe.data.sharding import plan_batches
from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import Communicator, failed_phase
from mpicaffe.parallel.recovery import TrainingState
from mpicaffe.proto import caffe_pb2
from mpicaffe.telemetry import Telemetry
from mpicaffe.trainer import NEVER, prepare_solver

NET = """name: "units"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_lmdb" batch_size: 10 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { source: "test_lmdb" batch_size: 5 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
base_lr: 0.1
lr_policy: "fixed"
display: 7
max_iter: 20
test_iter: 4
test_interval: 10
snapshot: 10
snapshot_prefix: "out/units"
"""


def test_plan_keeps_the_prototxt_batch_or_splits_the_global_batch_evenly():
    plan = plan_batches(10, 4, 3, None)
    assert (plan.local, plan.global_batch, plan.weight) == (10, 40, 1.0)
    plans = [plan_batches(10, 3, r, 10) for r in range(3)]
    assert [p.local for p in plans] == [4, 3, 3]  # earlier ranks take the remainder
    assert sum(p.weight for p in plans) == pytest.approx(3.0)  # a weighted mean of the ranks' gradients
    assert {p.global_batch for p in plans} == {10}
    with pytest.raises(UserError, match="smaller than the number of ranks"):
        plan_batches(10, 4, 0, 3)


def _files(tmp_path, net=NET):
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    (tmp_path / "train_lmdb").mkdir(exist_ok=True)
    return str(tmp_path / "solver.prototxt")


def test_each_rank_runs_the_solver_with_inline_nets_its_batch_and_no_testing_display_or_snapshots(tmp_path,
                                                                                                  monkeypatch):
    solver = _files(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # sources resolve against the net's folder, as Caffe would find them
    original, run, plan = prepare_solver(TrainConfig(solver=solver, global_batch=6, stages=["s"]), Communicator())
    assert (plan.local, plan.global_batch) == (6, 6)
    assert (original.display, original.test_interval, original.snapshot) == (7, 10, 10)  # as written
    assert list(original.train_state.stage) == ["s"]
    assert (run.display, run.test_interval, run.snapshot, run.test_initialization) == (0, NEVER, 0, False)
    assert run.net == "" and run.HasField("train_net_param") and len(run.test_net_param) == 1
    train = run.train_net_param
    # the layers are filtered when the net is built: the TRAIN reader gets the rank's batch
    assert [lp.data_param.batch_size for lp in train.layer if lp.type == "Data"] == [6, 5]
    assert train.layer[0].data_param.source == str(tmp_path / "train_lmdb")
    # the test net keeps its own batch: test batches are split across ranks by count, not size
    assert run.test_net_param[0].layer[1].data_param.batch_size == 5


def test_scale_lr_scales_the_rate_by_the_global_batch_over_the_prototxts(tmp_path):
    solver = _files(tmp_path)
    _, run, _ = prepare_solver(TrainConfig(solver=solver, global_batch=30, scale_lr=True), Communicator())
    assert run.base_lr == pytest.approx(0.3)


def test_a_distributed_run_needs_one_batch_size_and_a_data_layer(tmp_path):
    two = NET.replace('layer { name: "ip"', 'layer { name: "data2" type: "Data" top: "d2" top: "l2" '
                      'include { phase: TRAIN } data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }\n'
                      'layer { name: "ip"')
    solver = _files(tmp_path, two)
    with pytest.raises(UserError, match=r"different batch sizes \[10, 8\]"):
        prepare_solver(TrainConfig(solver=solver, global_batch=4), Communicator())
    no_data = NET.replace('type: "Data" top: "data" top: "label" include { phase: TRAIN }',
                          'type: "Input" top: "data" top: "label" include { phase: TRAIN }')
    solver = _files(tmp_path, no_data)
    with pytest.raises(UserError, match="needs a Data or ImageData layer"):
        prepare_solver(TrainConfig(solver=solver, global_batch=4), Communicator())


def test_recovery_state_restores_the_committed_weights_history_and_iteration():
    net = prototxt.parse_text("""
        layer { name: "x" type: "DummyData" top: "x" top: "y" dummy_data_param {
                shape { dim: 4 dim: 3 } shape { dim: 4 } data_filler { type: "gaussian" }
                data_filler { type: "constant" value: 1 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 2
                weight_filler { type: "gaussian" std: 0.1 } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "y" top: "loss" }""",
                              caffe_pb2.NetParameter())
    param = prototxt.parse_text('base_lr: 0.5 lr_policy: "fixed" momentum: 0.9 max_iter: 10', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(net)
    solver = get_solver(param)
    solver.step(2)
    state = TrainingState(solver)
    state.commit()
    weights, history = solver.net.flat_data.detach().clone(), [h.clone() for h in solver.history]
    solver.step(3)
    assert solver.iter == 5 and not np.array_equal(solver.net.flat_data.detach().numpy(), weights.numpy())
    state.restore()
    assert solver.iter == 2
    assert np.array_equal(solver.net.flat_data.detach().numpy(), weights.numpy())
    assert all(np.array_equal(h.numpy(), g.numpy()) for h, g in zip(solver.history, history))


class _Timed:
    def __init__(self):
        self.timings = {"data": 0.0, "forward": 0.0, "backward": 0.0}


class _Reducer:
    seconds = 0.0


def test_telemetry_writes_one_metrics_line_per_iteration_and_a_timeline_of_the_first_and_last(tmp_path):
    timed, reducer = _Timed(), _Reducer()
    t = Telemetry(1, str(tmp_path / "m.jsonl"), str(tmp_path / "t.json"), 2, max_iter=6)
    for it in range(6):
        t.begin_iteration(it, timed, reducer)
        timed.timings["forward"] += 0.002
        timed.timings["data"] += 0.001
        timed.timings["backward"] += 0.003
        reducer.seconds += 0.0005
        t.end_iteration(it, timed, reducer, loss=1.0 / (it + 1), lr=0.01)
    t.close()
    lines = [json.loads(line) for line in (tmp_path / "m.rank1.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(6)) and lines[0]["rank"] == 1
    assert lines[2]["data_wait"] == pytest.approx(0.001) and lines[2]["forward"] == pytest.approx(0.001)
    assert lines[2]["communication"] == pytest.approx(0.0005) and lines[3]["loss"] == pytest.approx(0.25)
    events = json.loads((tmp_path / "t.rank1.json").read_text())["traceEvents"]
    assert sorted({e["args"]["iteration"] for e in events}) == [0, 1, 4, 5]


def test_collectives_are_labelled_by_the_code_that_runs_them_and_a_failure_keeps_its_phase():
    comm = Communicator()
    assert comm.phase == "start-up"
    with comm.labelled("test phase (score sums)"):
        assert comm.phase == "test phase (score sums)"
        with comm.labelled("weights checksum"):
            assert comm.phase == "weights checksum"
        assert comm.phase == "test phase (score sums)"
    assert comm.phase == "start-up"
    with pytest.raises(RuntimeError) as caught, comm.labelled("gradient allreduce"), \
            comm.labelled("display (loss average)"):
        raise RuntimeError("a rank died")
    assert failed_phase(caught.value, "?") == "display (loss average)"  # the innermost
    assert comm.phase == "start-up" and failed_phase(ValueError(), "start-up") == "start-up"
