"""Distributed training on the real Caffe backend (pycaffe) under real `mpirun`: the same
trajectory as one process with twice the batch, identical weights on every rank, a resume that
continues the trajectory, and the per-rank shard copies Caffe's Data layer reads.

Needs real Caffe: skipped outside CI without it, failing in CI (tests/real_caffe.py).
"""
import json
import os
import re
import textwrap

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.data import datasets, lmdb_io
from mpicaffe.data.sharding import shard_bounds
from tests.mpi_harness import run_mpi
from tests.real_caffe import import_pycaffe

B = 10           # per-rank batch of the 2-rank runs
SHARD = 5        # batches in each rank's shard: the data wraps around every 5 iterations
ITERS = 50
RESUME_AT = 22    # not a multiple of SHARD: the resumed shards start part-way

NET = """
name: "caffe_tiny"
layer { name: "digits" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 } data_param { source: "@TRAIN@" batch_size: @BATCH@ backend: LMDB } }
layer { name: "digits" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.00390625 } data_param { source: "@TEST@" batch_size: 25 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "@NET@"
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 15
max_iter: @MAX_ITER@
display: 10
test_iter: 4
test_interval: 25
snapshot: @RESUME_AT@
snapshot_prefix: "@PREFIX@"
random_seed: 5
"""

# float32 sums in different orders (batch 2B in one gemm, or two batches of B and an allreduce)
RTOL, ATOL = 1e-4, 1e-6


def _fill(template, **values):
    for k, v in values.items():
        template = template.replace(f"@{k}@", str(v))
    return template


def _write_db(path, x, y):
    lmdb_io.write_datums(str(path), ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i])))
                                     for i in range(len(x))))


def _setup(folder, name, x, y, batch, max_iter=ITERS):
    test_db = folder / "test_db"
    if not test_db.exists():
        dx, dy = datasets.load_digits()
        _write_db(test_db, dx[-100:], dy[-100:])
    train_db = folder / f"{name}_train_db"
    if not train_db.exists():
        _write_db(train_db, x, y)
    net = folder / f"{name}_net.prototxt"
    net.write_text(_fill(NET, TRAIN=train_db, TEST=test_db, BATCH=batch))
    solver = folder / f"{name}_solver.prototxt"
    solver.write_text(_fill(SOLVER, NET=net, PREFIX=folder / name, MAX_ITER=max_iter, RESUME_AT=RESUME_AT))
    return str(solver)


def _train(np_, solver, folder, name, *extra, check=True, backend="caffe"):
    argv = ["python", "-m", "mpicaffe", "train", "--solver", solver, "--backend", backend,
            "--metrics", str(folder / f"{name}_metrics.jsonl"), "--check-every", "10", *extra]
    env = {"MPICAFFE_SHARD_CACHE": str(folder / "shards")}
    return run_mpi(np_, argv, timeout=120, env=env, check=check)


def _losses(folder, name, rank=0):
    suffix = "" if rank == 0 else f".rank{rank}"
    with open(folder / f"{name}_metrics{suffix}.jsonl") as f:
        return np.array([json.loads(line)["loss"] for line in f])


def _weights(path):
    return [np.array(b.data, np.float32) for layer in prototxt.read_net(str(path)).layer for b in layer.blobs]


def _accuracies(log):
    return [float(v) for v in re.findall(r"Test net output #0: accuracy = ([0-9.e-]+)", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run with batch B and one 1-process run with batch 2B over the same sample order."""
    import_pycaffe()
    folder = tmp_path_factory.mktemp("caffe_mpi")
    x, y = datasets.load_digits()
    n = 2 * B * SHARD
    # batch k of the 1-process database holds rank 0's batch k, then rank 1's batch k
    order = np.concatenate([np.concatenate([np.arange(k * B, (k + 1) * B), n // 2 + np.arange(k * B, (k + 1) * B)])
                            for k in range(SHARD)])
    two = _setup(folder, "two", x[:n], y[:n], B)
    one = _setup(folder, "one", x[order], y[order], 2 * B)
    return folder, x[:n], _train(2, two, folder, "two"), _train(1, one, folder, "one")


def test_two_ranks_match_one_process_with_twice_the_batch(runs):
    folder, _, two, one = runs
    rank0, rank1, single = _losses(folder, "two"), _losses(folder, "two", 1), _losses(folder, "one")
    assert len(rank0) == len(rank1) == len(single) == ITERS
    # each rank's loss is the mean over its B samples; their average is the mean over all 2B
    np.testing.assert_allclose((rank0 + rank1) / 2, single, rtol=RTOL, atol=ATOL)
    assert single[-1] < single[0] / 2   # it learned something
    for a, b in zip(_weights(folder / f"two_iter_{ITERS}.caffemodel"), _weights(folder / f"one_iter_{ITERS}.caffemodel")):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)

    log = two.rank_stderr(0)
    assert "Training on 2 rank(s) (MPI): global batch 20 (10 per rank; the prototxt says 10)" in log
    assert "Backend: real Caffe (pycaffe)" in log
    # 4 test batches of 25, 2 per rank, cover the 100 test images once, as one process does
    acc2, acc1 = _accuracies(log), _accuracies(one.rank_stderr(0))
    assert len(acc2) == len(acc1) == 3                               # iterations 0, 25 and 50
    np.testing.assert_allclose(acc2, acc1, atol=0.011)
    assert "Iteration" not in two.rank_stderr(1)                    # rank 0 alone logs


def test_resume_continues_the_two_rank_trajectory(runs):
    # the state and weights travel from rank 0; each rank's shard copy starts where it was
    folder, _, _, _ = runs
    resumed = folder / "resumed_solver.prototxt"   # the same net and data, its own snapshot names
    resumed.write_text((folder / "two_solver.prototxt").read_text().replace(
        f'snapshot_prefix: "{folder / "two"}"', f'snapshot_prefix: "{folder / "resumed"}"'))
    _train(2, str(resumed), folder, "resumed", "--snapshot", str(folder / f"two_iter_{RESUME_AT}.solverstate"))
    for rank in (0, 1):
        np.testing.assert_array_equal(_losses(folder, "resumed", rank), _losses(folder, "two", rank)[RESUME_AT:])
    for a, b in zip(_weights(folder / f"resumed_iter_{ITERS}.caffemodel"),
                    _weights(folder / f"two_iter_{ITERS}.caffemodel")):
        np.testing.assert_array_equal(a, b)


def test_ranks_that_diverge_are_stopped(runs):
    folder, _, _, _ = runs
    wrapper = folder / "diverge.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, sys
        from mpicaffe.backends import caffe_training
        from mpicaffe.cli import main
        if os.environ["OMPI_COMM_WORLD_RANK"] == "1":
            real = caffe_training.CaffeTraining._broadcast_parameters
            def nudged(self):
                real(self)
                self.solver.parameter_arrays()[0][0] += 1e-3
            caffe_training.CaffeTraining._broadcast_parameters = nudged
        sys.exit(main(["train", "--solver", {str(folder / "two_solver.prototxt")!r}, "--backend", "caffe",
                       "--check-every", "5"]))
    """))
    env = {"MPICAFFE_SHARD_CACHE": str(folder / "shards")}
    result = run_mpi(2, ["python", str(wrapper)], timeout=120, env=env, check=False)
    assert result.returncode != 0
    assert "ranks disagree on the weights at iteration 5 (ranks diverged)" in result.output


def test_auto_picks_caffe_and_shard_copies_are_cached(runs, tmp_path):
    _, records, _, _ = runs
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "auto", x[:2 * B * SHARD], y[:2 * B * SHARD], B, max_iter=2)
    first = _train(2, solver, tmp_path, "auto", backend="auto")
    log = first.rank_stderr(0)
    assert "Backend auto: using real Caffe (pycaffe is importable)" in log
    assert "reads records 0..49 of " in log and "from a new copy" in log

    shards = tmp_path / "shards"
    copies = sorted(os.listdir(shards))
    assert len(copies) == 4           # train and test databases, one copy per rank
    n = len(records)
    for rank in (0, 1):
        [train] = [c for c in copies if c.startswith(f"auto_train_db.rank{rank}of2.")]
        start, end = shard_bounds(n, rank, 2)
        held = [d for _, d in lmdb_io.iter_datums(str(shards / train))]
        assert len(held) == end - start
        for i, d in zip(range(start, end), held):
            np.testing.assert_array_equal(lmdb_io.decode_datum(d)[0], records[i])
    stamps = {c: os.stat(shards / c / "data.mdb").st_mtime_ns for c in copies}

    second = _train(2, solver, tmp_path, "auto", backend="auto")
    assert "from its cached copy" in second.rank_stderr(0) and "from a new copy" not in second.rank_stderr(0)
    assert {c: os.stat(shards / c / "data.mdb").st_mtime_ns for c in os.listdir(shards)} == stamps


def test_a_shard_smaller_than_a_batch_is_an_error_on_every_rank(runs, tmp_path):
    _, records, _, _ = runs
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "small", x[:len(records)], y[:len(records)], len(records) // 2 + 1)
    result = _train(2, solver, tmp_path, "small", check=False)
    assert result.returncode != 0
    assert f"shard holds {len(records) // 2} records, fewer than one batch ({len(records) // 2 + 1})" in result.output


def _apoptosis_events(log):
    return re.findall(r"Apoptosis at iteration \d+: removed [0-9.e-]+ of each layer's channels \([^)]*\)", log)


def test_apoptosis_on_caffe_matches_the_engine_and_its_files_load_in_caffe(tmp_path):
    # snapshot, prune in the engine mirror, rebuild and restore: the same cuts and trajectory as
    # the engine pruning in place, every rank alike (--check-every 1)
    caffe = import_pycaffe()
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "apo", x[:2 * B * SHARD], y[:2 * B * SHARD], B, max_iter=30)
    init = str(tmp_path / "init.caffemodel")  # the backends' fillers draw different numbers
    caffe.Net(str(tmp_path / "apo_net.prototxt"), caffe.TEST).save(init)
    prune = ["--weights", init, "--prune-every", "8", "--prune-criterion", "l1", "--prune-target", "0.6", "--prune-step", "0.5",
             "--check-every", "1"]
    logs = {}
    for backend in ("caffe", "engine"):
        run = _train(2, solver, tmp_path, backend, *prune, backend=backend)
        logs[backend] = run.rank_stderr(0)
        os.replace(tmp_path / "apo_iter_30.caffemodel", tmp_path / f"{backend}_iter_30.caffemodel")
    events = _apoptosis_events(logs["caffe"])
    assert [e.split(":")[0] for e in events] == [f"Apoptosis at iteration {i}" for i in (8, 16)]
    assert events == _apoptosis_events(logs["engine"])
    assert "(conv 4->2)" in events[0] and "(conv 2->1)" in events[1]
    # float32 sums in different orders (measured: losses within 2e-6 relative)
    for rank in (0, 1):
        np.testing.assert_allclose(_losses(tmp_path, "caffe", rank), _losses(tmp_path, "engine", rank),
                                   rtol=RTOL, atol=ATOL)
    for a, b in zip(_weights(tmp_path / "caffe_iter_30.caffemodel"), _weights(tmp_path / "engine_iter_30.caffemodel")):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    net = caffe.Net(str(tmp_path / "apo_iter_16.prototxt"), str(tmp_path / "caffe_iter_30.caffemodel"), caffe.TEST)
    assert net.params["conv"][0].data.shape[0] == 1


def test_a_missing_snapshot_folder_is_made(tmp_path):
    # real Caffe's snapshot aborts (io.cpp "Check failed: proto.SerializeToOstream") without it
    import_pycaffe()
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "made", x[:2 * B * SHARD], y[:2 * B * SHARD], B, max_iter=3)
    path = tmp_path / "made_solver.prototxt"
    path.write_text(path.read_text().replace(f'snapshot_prefix: "{tmp_path / "made"}"',
                                             f'snapshot_prefix: "{tmp_path / "new" / "folder" / "made"}"'))
    _train(2, solver, tmp_path, "made")
    assert (tmp_path / "new" / "folder" / "made_iter_3.caffemodel").exists()
