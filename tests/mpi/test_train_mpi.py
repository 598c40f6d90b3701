"""Distributed training under real `mpirun`: equivalence with one process, identical weights on
every rank, test scores combined across ranks, and clear errors instead of hangs."""
import json
import textwrap

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.data import datasets, lmdb_io
from tests.mpi_harness import run_mpi

B = 16          # per-rank batch of the 2-rank run
ITERS = 60

NET = """
name: "tiny"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 } data_param { source: "TRAIN_DB" batch_size: BATCH backend: LMDB } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.00390625 } data_param { source: "TEST_DB" batch_size: 50 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "NET"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 20
max_iter: MAX_ITER
display: 10
test_iter: 4
test_interval: 30
snapshot_after_train: true
snapshot_prefix: "PREFIX"
random_seed: 7
"""


def _write_db(path, x, y):
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i])))
                                     for i in range(len(x))))


def _setup(tmp_path, name, train_x, train_y, batch, max_iter=ITERS):
    x, y = datasets.load_digits()
    test_db = tmp_path / "test_db"
    if not test_db.exists():
        _write_db(test_db, x[-200:], y[-200:])
    train_db = tmp_path / f"{name}_train_db"
    _write_db(train_db, train_x, train_y)
    net = tmp_path / f"{name}_net.prototxt"
    net.write_text(NET.replace("TRAIN_DB", str(train_db)).replace("TEST_DB", str(test_db))
                   .replace("BATCH", str(batch)))
    solver = tmp_path / f"{name}_solver.prototxt"
    solver.write_text(SOLVER.replace("NET", str(net)).replace("PREFIX", str(tmp_path / name))
                      .replace("MAX_ITER", str(max_iter)))
    return str(solver)


def _train(np_, solver, tmp_path, name, *extra, check=True):
    metrics = tmp_path / f"{name}_metrics.jsonl"
    argv = ["python", "-m", "mpicaffe", "train", "--solver", solver, "--metrics", str(metrics),
            "--check-every", "10", *extra]
    result = run_mpi(np_, argv, timeout=300, check=check)
    return result, metrics


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def _weights(path):
    return prototxt.read_net(str(path)).layer


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    x, y = datasets.load_digits()
    n = 2 * B * 4                       # each rank's shard holds 4 batches
    shard0, shard1 = np.arange(0, n // 2), np.arange(n // 2, n)
    # the 1-process database interleaves the shards batch by batch, so that its batch k of 2B
    # holds exactly the two ranks' batch k
    order = np.concatenate([np.concatenate([shard0[k * B:(k + 1) * B], shard1[k * B:(k + 1) * B]])
                            for k in range(4)])
    two = _setup(tmp_path, "two", x[:n], y[:n], B)
    one = _setup(tmp_path, "one", x[order], y[order], 2 * B)
    result2, metrics2 = _train(2, two, tmp_path, "two")
    result1, metrics1 = _train(1, one, tmp_path, "one")

    rank0 = _losses(metrics2)
    rank1 = _losses(str(metrics2).replace(".jsonl", ".rank1.jsonl"))
    losses1 = _losses(metrics1)
    assert len(rank0) == len(rank1) == len(losses1) == ITERS
    # per-rank losses are means over B; their average is the mean over the 2B samples
    np.testing.assert_allclose((np.array(rank0) + np.array(rank1)) / 2, losses1, rtol=2e-4, atol=1e-5)

    w2 = _weights(tmp_path / f"two_iter_{ITERS}.caffemodel")
    w1 = _weights(tmp_path / f"one_iter_{ITERS}.caffemodel")
    for a, b in zip(w2, w1):
        for ba, bb in zip(a.blobs, b.blobs):
            np.testing.assert_allclose(ba.data, bb.data, rtol=1e-4, atol=1e-5)
    out = result2.rank_stderr(0)
    assert "Training on 2 rank(s) (MPI): global batch 32 (16 per rank; the prototxt says 16)" in out
    # test_iter 4 batches of 50 split over 2 ranks covers the 200 test images once, as 1 process does
    acc2 = [line for line in out.splitlines() if "Test net output #0: accuracy" in line]
    acc1 = [line for line in result1.rank_stderr(0).splitlines() if "Test net output #0: accuracy" in line]
    assert len(acc2) == len(acc1) == 3                          # iterations 0, 30 and 60
    for a2, a1 in zip(acc2, acc1):
        assert float(a2.split("=")[-1]) == pytest.approx(float(a1.split("=")[-1]), abs=0.011)
    # only rank 0 logs
    assert "Iteration" not in result2.rank_stderr(1)


def test_global_batch_is_split_and_weighted(tmp_path):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "gb", x[:300], y[:300], 16, max_iter=6)
    result, _ = _train(2, solver, tmp_path, "gb", "--global-batch", "33", "--scale-lr", "--no-overlap")
    out = result.rank_stderr(0)
    assert "global batch 33 (16 to 17 per rank; the prototxt says 16); effective base_lr 0.103125" in out


def test_mismatched_solvers_fail_clearly_on_every_rank(tmp_path):
    x, y = datasets.load_digits()
    a = _setup(tmp_path, "a", x[:300], y[:300], 16)
    b = _setup(tmp_path, "b", x[:300], y[:300], 8)
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, sys
        from mpicaffe.cli import main
        solver = {a!r} if os.environ["OMPI_COMM_WORLD_RANK"] == "0" else {b!r}
        sys.exit(main(["train", "--solver", solver]))
    """))
    result = run_mpi(2, ["python", str(wrapper)], timeout=120, check=False)
    assert result.returncode != 0
    assert "ranks disagree on the solver and net definitions" in result.output


def test_missing_data_on_one_rank_and_tiny_shards_are_errors(tmp_path):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "small", x[:40], y[:40], 32)
    result, _ = _train(2, solver, tmp_path, "small", check=False)
    assert result.returncode != 0
    assert "shard holds 20 records, fewer than one batch (32)" in result.output

    solver = _setup(tmp_path, "gone", x[:300], y[:300], 16)
    wrapper = tmp_path / "hide.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, shutil, sys
        from mpicaffe.cli import main
        if os.environ["OMPI_COMM_WORLD_RANK"] == "1":
            import mpicaffe.data.lmdb_io as io
            real = io.shared_env
            def missing(path, error=None):
                if "gone_train_db" in str(path):
                    raise (error or io.UserError)(f"{{path}}: does not exist on this node")
                return real(path, error) if error else real(path)
            io.shared_env = missing
        sys.exit(main(["train", "--solver", {solver!r}]))
    """))
    result = run_mpi(2, ["python", str(wrapper)], timeout=120, check=False)
    assert result.returncode != 0
    assert "failed on rank(s) 1" in result.output and "does not exist on this node" in result.output


def test_uneven_shards_run_the_same_iterations(tmp_path):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "uneven", x[:101], y[:101], 16, max_iter=12)
    _, metrics = _train(2, solver, tmp_path, "uneven")
    assert len(_losses(metrics)) == len(_losses(str(metrics).replace(".jsonl", ".rank1.jsonl"))) == 12


def test_ranks_given_different_options_are_refused_naming_them(tmp_path):
    import sys

    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "mpmd", x[:256], y[:256], B)
    train = ["-m", "mpicaffe", "train", "--solver", solver]
    # an MPMD launch (or a wrapper script) giving rank 1 another global batch and rollback setting
    result = run_mpi(1, ["python", *train, "--global-batch", "64", ":", "-np", "1", sys.executable, *train,
                         "--global-batch", "48", "--on-divergence", "rollback"], check=False)
    assert result.returncode == 1, result.output
    err = result.rank_stderr(0)
    assert ("the ranks were given different options (--global-batch: rank 0 64, rank 1 48; --on-divergence: "
            "rank 0 'stop', rank 1 'rollback')") in err, err[-2000:]
    assert "Iteration 0" not in err
