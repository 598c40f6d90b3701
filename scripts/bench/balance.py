#!/usr/bin/env python
"""`--balance auto` against equal batches, with two ranks of different speeds.

Rank 0 computes with THREADS0 torch threads and rank 1 with THREADS1 (mpirun's MPMD syntax, one
`-x OMP_NUM_THREADS=` per rank), on a small convolutional net over the bundled digits, global
batch G. Each repetition runs both configurations back to back (so machine noise hits them alike)
and reports the mean time per iteration after the balancing point (from `--metrics`, rank 0;
the ranks are synchronous), the split `--balance auto` chose, and the ratio equal / balanced.

Two ranks with 2 and 1 threads on a 2-core machine contend for the cores, and which rank is
faster then changes from moment to moment. `--slow-quota Q` (root, Linux cgroups) makes the
difference steady instead, as between nodes of different speeds: each rank gets one thread and
a core of its own (taskset), and rank 1 runs in a cgroup allowed Q of a core's time.

    python scripts/bench/balance.py [--threads 2,1 | --slow-quota 0.4] [--global-batch 128]
                                    [--iterations 60] [--balance-iters 10] [--repeats 3]
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


def slow_cgroup(quota: float) -> str:
    """A cgroup allowed `quota` of one core (cgroup v2 or v1's cpu controller); its cgroup.procs file."""
    period = 10_000  # a short period throttles evenly rather than in bursts of whole iterations
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2
        folder = "/sys/fs/cgroup/mpicaffe-bench-slow"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "cpu.max"), "w") as f:
            f.write(f"{int(quota * period)} {period}")
    else:
        folder = "/sys/fs/cgroup/cpu/mpicaffe-bench-slow"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "cpu.cfs_period_us"), "w") as f:
            f.write(str(period))
        with open(os.path.join(folder, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(int(quota * period)))
    return os.path.join(folder, "cgroup.procs")


def rank_commands(train: list[str], procs: str | None) -> list[list[str]]:
    """Each rank's command line: with a cgroup, pinned to core `rank`, and rank 1 inside the cgroup."""
    if procs is None:
        return [train, train]
    pinned = [["taskset", "-c", str(rank), *train] for rank in (0, 1)]
    pinned[1] = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *pinned[1]]
    return pinned


def run(folder: str, solver: str, threads: list[int], procs: str | None, balance: list[str],
        name: str) -> tuple[list[float], str]:
    metrics = os.path.join(folder, f"{name}.jsonl")
    train = [sys.executable, "-m", "mpicaffe", "train", "--solver", solver, "--metrics", metrics,
             "--check-every", "0", *balance]
    first, second = rank_commands(train, procs)
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "1", "-x", f"OMP_NUM_THREADS={threads[0]}",
           *first, ":", "-np", "1", "-x", f"OMP_NUM_THREADS={threads[1]}", *second]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,sm")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    with open(metrics) as f:
        times = [json.loads(line)["time"] for line in f]
    found = re.search(r"per-rank batch (\d+,\d+)", out)
    return times, found.group(1) if found else "equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--slow-quota", type=float, help="one thread per rank, rank 1 limited to this share of a core")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--balance-iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    procs = None
    if args.slow_quota:
        threads, procs = [1, 1], slow_cgroup(args.slow_quota)
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
    slow = f", rank 1 limited to {args.slow_quota:g} of a core" if procs else ""
    print(f"threads per rank {threads}{slow}, global batch {args.global_batch}, {args.iterations} iterations, "
          f"mean s/iter over iterations {skip}..{args.iterations - 1}")
    print(f"{'repeat':>6} {'equal s/iter':>13} {'balanced s/iter':>16} {'split':>8} {'equal/balanced':>15}")
    ratios = []
    for r in range(args.repeats):
        equal, _ = run(folder, solver, threads, procs, [], f"equal{r}")
        balance = ["--balance", "auto", "--balance-iters", str(args.balance_iters)]
        balanced, split = run(folder, solver, threads, procs, balance, f"balanced{r}")
        e, b = statistics.mean(equal[skip:]), statistics.mean(balanced[skip:])
        ratios.append(e / b)
        print(f"{r:>6} {e:>13.4f} {b:>16.4f} {split:>8} {e / b:>15.2f}")
    print(f"median equal/balanced: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
