"""`mpicaffe python SCRIPT`: a pycaffe training loop (`import caffe`, `caffe.SGDSolver`,
`solver.step`, `net.blobs[...]`, `net.save`) runs unedited, alone and under real `mpirun -np 2`.

Two ranks with batch B each must train as one process with batch 2B: same losses (the loss blob
after each step holds the mean over ranks) and same weights. Each rank reads a contiguous shard
of the LMDB; the single process reads a copy whose batch k is rank 0's batch k followed by rank
1's, so both see the same images at every step. Tolerances, for float32 sums taken in a different
order (one batch of 2B against two of B averaged) over 20 SGD steps at lr 0.1 with momentum 0.9:
losses rtol 1e-4; weights (of magnitude 0.01 to 1) atol 2e-5, where the largest difference
measured was 3.1e-6.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.data import datasets, lmdb_io
from mpicaffe.proto import caffe_pb2
from tests.mpi_harness import mpi_env, run_mpi

BATCH, STEPS = 16, 20

SCRIPT = '''
import json
import sys

import caffe

caffe.set_mode_cpu()
solver = caffe.SGDSolver(sys.argv[1])
if sys.argv[4:] == ["timing"]:  # BVLC python/train.py's --timing: a timer around each layer
    fprop = [caffe.Timer() for _ in solver.net.layers]
    bprop = [caffe.Timer() for _ in solver.net.layers]
    solver.net.before_forward(lambda layer: fprop[layer].start())
    solver.net.after_forward(lambda layer: fprop[layer].stop())
    solver.net.before_backward(lambda layer: bprop[layer].start())
    solver.net.after_backward(lambda layer: bprop[layer].stop())
losses = []
for _ in range(int(sys.argv[3])):
    solver.step(1)
    losses.append(float(solver.net.blobs["loss"].data))
print("LOSSES " + json.dumps(losses))
print("RANKS", caffe.solver_count())
solver.net.save(sys.argv[2])
'''


def _net(source: str, batch: int) -> str:
    return (f'layer {{ name: "data" type: "Data" top: "data" top: "label" transform_param {{ scale: 0.0625 }} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}\n'
            'layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 32 '
            'weight_filler { type: "xavier" } } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }\n'
            'layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 '
            'weight_filler { type: "xavier" } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }\n')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("script")
    data, labels = datasets.load_digits()
    n = 2 * BATCH * STEPS  # each rank's shard: STEPS batches, read once
    data, labels = data[:n], labels[:n]
    half = n // 2
    lmdb_io.write_datums(str(folder / "ranks_lmdb"), datasets.array_records(data, labels))
    # batch k of one process = rank 0's batch k, then rank 1's
    order = np.concatenate([np.r_[k * BATCH:(k + 1) * BATCH, half + k * BATCH:half + (k + 1) * BATCH]
                            for k in range(STEPS)])
    lmdb_io.write_datums(str(folder / "one_lmdb"), datasets.array_records(data[order], labels[order]))
    for name, source, batch in (("ranks", "ranks_lmdb", BATCH), ("one", "one_lmdb", 2 * BATCH)):
        (folder / f"{name}_net.prototxt").write_text(_net(str(folder / source), batch))
        (folder / f"{name}_solver.prototxt").write_text(
            f'net: "{folder / f"{name}_net.prototxt"}"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "fixed"\n'
            f'max_iter: 1000\nrandom_seed: 7\nsnapshot_prefix: "{folder / name}"\n')
    (folder / "train.py").write_text(SCRIPT)
    return folder


def _losses(output: str) -> list[float]:
    lines = [line for line in output.splitlines() if "LOSSES " in line]
    assert len(lines) == 1, output  # rank 0 alone prints
    return json.loads(lines[0].split("LOSSES ", 1)[1])


def _weights(path) -> dict[str, list[np.ndarray]]:
    net = prototxt.read_binary(str(path), caffe_pb2.NetParameter(), "weights")
    return {lp.name: [np.array(b.data, np.float32) for b in lp.blobs] for lp in net.layer if lp.blobs}


def test_a_pycaffe_loop_on_two_ranks_matches_one_process_with_twice_the_batch(setup):
    # the two ranks also time every layer with Net.before_forward & co., as BVLC's python/train.py
    # does; backward then runs layer by layer and the gradients are averaged after it
    one = subprocess.run([sys.executable, "-m", "mpicaffe", "python", str(setup / "train.py"),
                          str(setup / "one_solver.prototxt"), str(setup / "one.caffemodel"), str(STEPS)],
                         env=mpi_env(), capture_output=True, text=True, timeout=300, check=True)
    two = run_mpi(2, ["python", "-m", "mpicaffe", "python", str(setup / "train.py"),
                      str(setup / "ranks_solver.prototxt"), str(setup / "ranks.caffemodel"), str(STEPS), "timing"],
                  timeout=300)
    assert "RANKS 1" in one.stdout and "RANKS 2" in two.output
    got, want = _losses(two.output), _losses(one.stdout)
    assert len(got) == STEPS and got[-1] < got[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    w_two, w_one = _weights(setup / "ranks.caffemodel"), _weights(setup / "one.caffemodel")
    assert w_two.keys() == w_one.keys() == {"ip1", "ip2"}
    for name in w_one:
        for a, b in zip(w_two[name], w_one[name]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_an_error_on_one_rank_stops_every_rank_with_its_traceback(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import caffe\nif caffe.solver_rank() == 1:\n    raise ValueError('rank one broke')\n"
                      "import time\ntime.sleep(60)\n")
    result = run_mpi(2, ["python", "-m", "mpicaffe", "python", str(script)], timeout=120, check=False)
    assert result.returncode != 0
    assert "ValueError: rank one broke" in result.rank_stderr(1)
    assert f"mpicaffe python: rank 1: {script} failed; stopping every rank" in result.output
