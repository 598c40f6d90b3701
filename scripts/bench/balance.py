#!/usr/bin/env python
"""`--balance auto` against equal batches, with two ranks of different speeds.

Rank 0 computes with THREADS0 torch threads and rank 1 with THREADS1 (mpirun's MPMD syntax, one
`-x OMP_NUM_THREADS=` per rank), on a small convolutional net over the bundled digits, global
batch G. Each repetition runs both configurations back to back (so machine noise hits them alike)
and reports the median time per iteration after the balancing point (from `--metrics`, rank 0;
the ranks are synchronous), the split `--balance auto` chose, and the ratio equal / balanced.

    python scripts/bench/balance.py [--threads 2,1] [--global-batch 128] [--iterations 60]
                                    [--balance-iters 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from mpicaffe.data import datasets, lmdb_io

NET = """
name: "bench"
layer { name: "d" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.0625 } data_param { source: "SOURCE" batch_size: BATCH backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 64 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 64 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "NET"
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
max_iter: ITERS
display: 0
random_seed: 1
"""


def run(folder: str, solver: str, threads: list[int], balance: list[str], name: str) -> tuple[list[float], str]:
    metrics = os.path.join(folder, f"{name}.jsonl")
    train = [sys.executable, "-m", "mpicaffe", "train", "--solver", solver, "--metrics", metrics,
             "--check-every", "0", *balance]
    cmd = ["mpirun", "--oversubscribe", "-np", "1", "-x", f"OMP_NUM_THREADS={threads[0]}", *train,
           ":", "-np", "1", "-x", f"OMP_NUM_THREADS={threads[1]}", *train]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,sm")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    with open(metrics) as f:
        times = [json.loads(line)["time"] for line in f]
    found = re.search(r"per-rank batch (\d+,\d+)", out)
    return times, found.group(1) if found else "equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--balance-iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    folder = tempfile.mkdtemp(prefix="mpicaffe-balance-")
    x, y = datasets.load_digits()
    db = os.path.join(folder, "db")
    lmdb_io.write_datums(db, ((lmdb_io.datum_key(i), lmdb_io.array_to_datum(x[i], int(y[i])))
                              for i in range(len(x))))
    with open(os.path.join(folder, "net.prototxt"), "w") as f:
        f.write(NET.replace("SOURCE", db).replace("BATCH", str(args.global_batch // 2)))
    solver = os.path.join(folder, "solver.prototxt")
    with open(solver, "w") as f:
        f.write(SOLVER.replace("NET", os.path.join(folder, "net.prototxt")).replace("ITERS", str(args.iterations)))
    skip = args.balance_iters + 2  # after the balancing point (and its re-read of the data)
    print(f"threads per rank {threads}, global batch {args.global_batch}, {args.iterations} iterations, "
          f"median s/iter over iterations {skip}..{args.iterations - 1}")
    print(f"{'repeat':>6} {'equal s/iter':>13} {'balanced s/iter':>16} {'split':>8} {'equal/balanced':>15}")
    ratios = []
    for r in range(args.repeats):
        equal, _ = run(folder, solver, threads, [], f"equal{r}")
        balanced, split = run(folder, solver, threads, ["--balance", "auto", "--balance-iters",
                                                        str(args.balance_iters)], f"balanced{r}")
        e, b = statistics.median(equal[skip:]), statistics.median(balanced[skip:])
        ratios.append(e / b)
        print(f"{r:>6} {e:>13.4f} {b:>16.4f} {split:>8} {e / b:>15.2f}")
    print(f"median equal/balanced: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
