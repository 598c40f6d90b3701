"""Divergence (a non-finite loss or weights) under real `mpirun`: caught on the iteration it
appears, named by iteration and layer, never snapshotted; `--on-divergence rollback` goes back to
the newest verified snapshot with a smaller learning rate and finishes the run."""
import re

import numpy as np
import pytest

from mpicaffe import prototxt, snapshot
from mpicaffe.backends.engine.net import Net
from mpicaffe.data import datasets
from mpicaffe.proto import caffe_pb2
from tests.mpi.test_train_mpi import _write_db
from tests.mpi_harness import run_mpi

# a linear regression of the digit's value on its pixels (a quadratic loss: a rate above 2 / the
# largest curvature makes every step multiply the error); the rate jumps 1,000,000-fold at
# iteration 40 (a bad schedule, or a resumed run given the wrong gamma), and the weights
# overflow to inf, then the loss to NaN, within a few iterations
NET = """
name: "regression"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.0625 } data_param { source: "TRAIN_DB" batch_size: BATCH backend: LMDB } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.0625 } data_param { source: "TEST_DB" batch_size: 50 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 1 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """
net: "NET"
base_lr: 0.001
momentum: 0.9
lr_policy: "multistep"
gamma: 1000000
stepvalue: 40
max_iter: 100
display: 10
test_iter: 4
test_interval: 100
snapshot: 20
snapshot_prefix: "PREFIX"
random_seed: 7
"""


def _setup(tmp_path, batch=16):
    x, y = datasets.load_digits()
    _write_db(tmp_path / "train_db", x[:1280], y[:1280])
    _write_db(tmp_path / "test_db", x[-200:], y[-200:])
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("TRAIN_DB", str(tmp_path / "train_db")).replace("TEST_DB", str(tmp_path / "test_db"))
                   .replace("BATCH", str(batch)))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER.replace("NET", str(net)).replace("PREFIX", str(tmp_path / "snap")))
    return str(solver), str(tmp_path / "snap")


def _finite_weights(path):
    return all(np.isfinite(np.array(b.data)).all() for layer in prototxt.read_net(path).layer for b in layer.blobs)


@pytest.mark.parametrize("ranks,backend", [(2, "engine"), (1, "caffe")])
def test_a_nan_run_stops_naming_iteration_and_layer_and_keeps_its_last_finite_snapshot(tmp_path, ranks, backend):
    if backend == "caffe":
        from tests.real_caffe import import_pycaffe

        import_pycaffe()
    solver, prefix = _setup(tmp_path, 32 // ranks)
    result = run_mpi(ranks, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--backend", backend,
                             "--keep-snapshots", "1"], timeout=300, check=False)
    assert result.returncode == 1, result.output
    err = result.rank_stderr(0)
    found = re.search(r"Training diverged at iteration (\d+): loss = (nan|inf|-inf) on rank\(s\) [\d, ]+; "
                      r"first non-finite: layer '(\w+)' \((\w+)\)", err)
    assert found, err[-3000:]
    assert 40 <= int(found.group(1)) < 60 and found.group(3) in ("ip", "loss")
    assert "Traceback" not in result.output
    records = snapshot.read_manifest(prefix)
    # the newest snapshot is finite and verifies; --keep-snapshots 1 kept exactly it
    assert len(records) == 1 and records[0].iteration < int(found.group(1)) + 1
    _, record = snapshot.latest_verified_snapshot(prefix)
    assert record == records[0] and _finite_weights(str(tmp_path / record.caffemodel))


def test_rollback_goes_back_to_the_last_finite_snapshot_with_a_smaller_rate_and_finishes(tmp_path):
    solver, prefix = _setup(tmp_path)
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--on-divergence", "rollback",
                         "--divergence-lr-factor", "0.000001"], timeout=300)
    err = result.rank_stderr(0)
    rolled = re.findall(r"Training diverged at iteration (\d+).*Rolling back \(1 of at most 3\) to the snapshot of "
                        r"iteration (\d+) \(\S+\) with base_lr 1e-09 \(0\.001 x 1e-06\)", err)
    assert len(rolled) == 1, err[-3000:]
    diverged, back = map(int, rolled[0])
    assert (back, diverged // 20) == (40, 2)
    # after it the rate is 0.001 again (1e-09 x 1,000,000): the run finishes, and learned
    first = float(re.search(r"Iteration 0 .*, loss = ([\d.e+-]+)", err).group(1))
    final = float(re.findall(r"Test net output #0: loss = ([\d.e+-]+)", err)[-1])
    assert np.isfinite(final) and final < first / 2, err[-3000:]
    assert snapshot.read_manifest(prefix)[-1].iteration == 100
    assert all(_finite_weights(str(tmp_path / r.caffemodel)) for r in snapshot.read_manifest(prefix))


def test_the_first_non_finite_place_is_the_first_layer_in_forward_order():
    net = prototxt.parse_text("""
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 3
                weight_filler { type: "constant" value: 1 } } }
        layer { name: "log" type: "Log" bottom: "ip" top: "log" }
        layer { name: "ip2" type: "InnerProduct" bottom: "log" top: "ip2" inner_product_param { num_output: 2 } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "ip2" top: "loss" }""",
                              caffe_pb2.NetParameter())
    net.state.phase = caffe_pb2.TRAIN
    net = Net(net)
    net.blobs["x"].tensor.data.fill_(1.0)
    net.forward()
    assert net.first_non_finite() is None
    net.blobs["x"].tensor.data.fill_(-1.0)  # the log of a negative sum: NaN from layer 'log' on
    net.forward()
    net.backward()
    assert net.first_non_finite() == "layer 'log' (Log): its top 'log' in forward"
