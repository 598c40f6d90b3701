"""`--balance auto` under real `mpirun`: two ranks of different speeds (2 threads and 1 thread,
set per rank with mpirun's MPMD syntax) re-split a fixed global batch by measured speed, and the
training equals one process fed, batch by batch, the union of the two ranks' batches."""
import json
import re
import sys

import numpy as np

from mpicaffe import prototxt
from mpicaffe.data import datasets, lmdb_io
from tests.mpi_harness import run_mpi

B = 16           # per-rank batch before balancing; the global batch is 2B throughout
ITERS = 16
MEASURE = 4      # --balance-iters
SHARD = 160      # records per rank's shard: the balanced batches wrap around inside it

NET = """
name: "balanced"
layer { name: "d" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.0625 } data_param { source: "SOURCE" batch_size: BATCH backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 32 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "NET"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "fixed"
max_iter: MAX_ITER
display: 4
snapshot_after_train: true
snapshot_prefix: "PREFIX"
random_seed: 5
"""


def _setup(tmp_path, name, x, y, batch):
    db = tmp_path / f"{name}_db"
    lmdb_io.write_datums(str(db), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i])))
                                   for i in range(len(x))))
    net = tmp_path / f"{name}_net.prototxt"
    net.write_text(NET.replace("SOURCE", str(db)).replace("BATCH", str(batch)))
    solver = tmp_path / f"{name}_solver.prototxt"
    solver.write_text(SOLVER.replace("NET", str(net)).replace("PREFIX", str(tmp_path / name))
                      .replace("MAX_ITER", str(ITERS)))
    return str(solver)


def _losses(path):
    return np.array([json.loads(line)["loss"] for line in open(path)])


def _weights(path):
    return [np.array(b.data) for layer in prototxt.read_net(str(path)).layer for b in layer.blobs]


def _positions(split, rank):
    """The shard positions rank `rank` reads at each iteration: B a step while measuring, then its
    balanced batch from where a run with that batch would be (EngineTraining.reshard)."""
    batch = [B if k < MEASURE else split[rank] for k in range(ITERS)]
    return [[(k * b + j) % SHARD for j in range(b)] for k, b in enumerate(batch)]


def test_balanced_ranks_match_one_process_with_the_global_batch(tmp_path):
    x, y = datasets.load_digits()
    two = _setup(tmp_path, "two", x[:2 * SHARD], y[:2 * SHARD], B)
    metrics = tmp_path / "two_metrics.jsonl"
    train = ["train", "--solver", two, "--metrics", str(metrics), "--balance", "auto",
             "--balance-iters", str(MEASURE), "--check-every", "1", "--devices", "cpu,cpu"]
    # MPMD: rank 0 computes with 2 threads, rank 1 with 1
    result = run_mpi(1, ["python", "-m", "mpicaffe", *train, ":", "-np", "1", "-x", "OMP_NUM_THREADS=1",
                         sys.executable, "-m", "mpicaffe", *train],
                     mpirun_args=["-x", "OMP_NUM_THREADS=2"], timeout=300)
    out = result.rank_stderr(0)
    found = re.search(rf"Balance at iteration {MEASURE}: median compute per sample ([\d.]+), ([\d.]+) ms; "
                      r"per-rank batch (\d+),(\d+) \(global 32\)", out)
    assert found, out
    split = [int(found.group(3)), int(found.group(4))]
    assert sum(split) == 2 * B and min(split) >= 1

    # the one-process database holds, batch by batch, the records both ranks read
    order = np.concatenate([np.concatenate([p0, SHARD + np.array(p1)])
                            for p0, p1 in zip(_positions(split, 0), _positions(split, 1))])
    one = _setup(tmp_path, "one", x[order], y[order], 2 * B)
    run_mpi(1, ["python", "-m", "mpicaffe", "train", "--solver", one, "--metrics", str(tmp_path / "one.jsonl")],
            timeout=300)

    rank0, rank1 = _losses(metrics), _losses(str(metrics).replace(".jsonl", ".rank1.jsonl"))
    batches = np.array([[B, B] if k < MEASURE else split for k in range(ITERS)])
    # each rank's loss is the mean over its batch: weighted by batch, they give the global mean
    np.testing.assert_allclose((batches[:, 0] * rank0 + batches[:, 1] * rank1) / (2 * B),
                               _losses(tmp_path / "one.jsonl"), rtol=2e-4, atol=1e-5)
    for a, b in zip(_weights(tmp_path / f"two_iter_{ITERS}.caffemodel"),
                    _weights(tmp_path / f"one_iter_{ITERS}.caffemodel")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
