"""BatchNorm under real `mpirun -np 2`: each rank normalizes with its own batch's statistics and
keeps its own moving sums, as Caffe's data-parallel training does; the gradient average is that of
one process taking the two ranks' batches as two iter_size sub-batches; tests and snapshots use
rank 0's statistics."""
import json
import re

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.data import datasets, lmdb_io
from tests.mpi_harness import run_mpi
from tests.real_caffe import import_pycaffe

B = 16          # per-rank batch of the 2-rank run, sub-batch of the 1-process run
ITERS = 24

# in-place and not-in-place BatchNorm tops, statistics of 4-D and 2-D bottoms
NET = """
name: "bn"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.0625 } data_param { source: "TRAIN_DB" batch_size: 16 backend: LMDB } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.0625 } data_param { source: "TEST_DB" batch_size: 50 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { moving_average_fraction: 0.9 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "relu2" type: "ReLU" bottom: "bn2" top: "bn2" }
layer { name: "ip1" type: "InnerProduct" bottom: "bn2" top: "ip1"
        inner_product_param { num_output: 32 weight_filler { type: "xavier" } } }
layer { name: "bn3" type: "BatchNorm" bottom: "ip1" top: "ip1" }
layer { name: "relu3" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "NET"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
iter_size: ITER_SIZE
max_iter: MAX_ITER
display: 5
test_iter: 4
test_interval: MAX_ITER
snapshot_after_train: true
snapshot_prefix: "PREFIX"
random_seed: 3
"""


def _write_db(path, x, y):
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i])))
                                     for i in range(len(x))))


def _setup(tmp_path, name, x, y, iter_size):
    test_db = tmp_path / "test_db"
    if not test_db.exists():
        dx, dy = datasets.load_digits()
        _write_db(test_db, dx[-200:], dy[-200:])
    train_db = tmp_path / f"{name}_train_db"
    _write_db(train_db, x, y)
    net = tmp_path / f"{name}_net.prototxt"
    net.write_text(NET.replace("TRAIN_DB", str(train_db)).replace("TEST_DB", str(test_db)))
    solver = tmp_path / f"{name}_solver.prototxt"
    solver.write_text(SOLVER.replace("NET", str(net)).replace("PREFIX", str(tmp_path / name))
                      .replace("MAX_ITER", str(ITERS)).replace("ITER_SIZE", str(iter_size)))
    return str(solver), str(net)


def _blobs(path):
    return {layer.name: [np.array(b.data) for b in layer.blobs] for layer in prototxt.read_net(str(path)).layer}


def _losses(path):
    return np.array([json.loads(line)["loss"] for line in open(path)])


def _scores(text, line):
    """Scores from lines `... <line>(name) = value`: the trainer's `Test net output #i: ` lines,
    or the final lines of `mpicaffe test`."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(line + r"(\w+) = ([-\d.e]+)", text)}


def test_two_ranks_with_batchnorm_match_one_process_with_the_ranks_batches_as_sub_batches(tmp_path):
    x, y = datasets.load_digits()
    n = 2 * B * 6                       # each rank's shard holds 6 batches
    shard0, shard1 = np.arange(0, n // 2), np.arange(n // 2, n)
    # the 1-process database alternates the shards' batches, so that with iter_size 2 its
    # iteration k runs rank 0's batch k, then rank 1's batch k, each normalized by itself
    order = np.concatenate([np.concatenate([shard0[k * B:(k + 1) * B], shard1[k * B:(k + 1) * B]])
                            for k in range(6)])
    two, two_net = _setup(tmp_path, "two", x[:n], y[:n], 1)
    one, _ = _setup(tmp_path, "one", x[order], y[order], 2)
    metrics = tmp_path / "two.jsonl"
    result2 = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", two, "--check-every", "4",
                          "--metrics", str(metrics)], timeout=300)
    run_mpi(1, ["python", "-m", "mpicaffe", "train", "--solver", one, "--metrics", str(tmp_path / "one.jsonl")],
            timeout=300)

    # each rank's loss is that of its batch; the 1-process loss is the mean over its sub-batches
    both = (_losses(metrics) + _losses(str(metrics).replace(".jsonl", ".rank1.jsonl"))) / 2
    np.testing.assert_allclose(both, _losses(tmp_path / "one.jsonl"), rtol=2e-4, atol=1e-5)
    w2, w1 = _blobs(tmp_path / f"two_iter_{ITERS}.caffemodel"), _blobs(tmp_path / f"one_iter_{ITERS}.caffemodel")
    for name in w1:
        if name.startswith("bn"):
            # rank 0 accumulated its own batches only (one update per iteration); the 1 process
            # accumulated both sub-batches (two): the same scale factor cannot come out
            assert w2[name][2][0] != pytest.approx(w1[name][2][0])
            continue
        for a, b in zip(w2[name], w1[name]):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=name)

    # the scores the 2-rank run printed at the end are those of rank 0's snapshot, statistics
    # included, over the whole test set (display 5 does not divide max_iter 24: with it, Caffe's
    # closing forward pass, after the snapshot, would move the BatchNorm statistics once more)
    scores2 = _scores(result2.rank_stderr(0), r"Test net output #\d+: ")
    result = run_mpi(1, ["python", "-m", "mpicaffe", "test", "--model", two_net, "--weights",
                         str(tmp_path / f"two_iter_{ITERS}.caffemodel"), "--iterations", "4"], timeout=120)
    scores1 = _scores(result.rank_stderr(0), r"\] ")
    assert scores2.keys() == {"accuracy", "loss"} and scores2.keys() <= scores1.keys()
    for key in scores2:
        assert scores2[key] == pytest.approx(scores1[key], rel=1e-4, abs=1e-5), key


def test_real_caffe_backend_keeps_per_rank_statistics_and_tests_with_rank_0s(tmp_path):
    # Caffe's BatchNorm blobs are parameters there too: the weights checksum must leave them out
    import_pycaffe()
    x, y = datasets.load_digits()
    solver, net = _setup(tmp_path, "caffe", x[:4 * B * 2], y[:4 * B * 2], 1)
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--backend", "caffe",
                         "--check-every", "4"], timeout=300)
    scores2 = _scores(result.rank_stderr(0), r"Test net output #\d+: ")
    result = run_mpi(1, ["python", "-m", "mpicaffe", "test", "--model", net, "--weights",
                         str(tmp_path / f"caffe_iter_{ITERS}.caffemodel"), "--iterations", "4"], timeout=120)
    scores1 = _scores(result.rank_stderr(0), r"\] ")
    assert scores2.keys() == {"accuracy", "loss"} and scores2.keys() <= scores1.keys()
    # real Caffe scored in the run, the engine scores the snapshot: float32 parity
    for key in scores2:
        assert scores2[key] == pytest.approx(scores1[key], rel=1e-4, abs=1e-5), key
