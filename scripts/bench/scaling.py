#!/usr/bin/env python
"""Weak scaling of `mpirun -np N mpicaffe train` on the bundled nets, against raw MPI and PyTorch DDP.

For LeNet and CIFAR-10-quick (batch 64 per rank, one thread per rank) one run measures, with the
configurations interleaved within each repetition so that machine noise hits them alike:

1. mpicaffe's time per iteration at np=1 and np=2 (from `--metrics`), and the weak-scaling
   efficiency t(np=1) / t(np=2);
2. the share of an np=2 iteration spent in gradient communication, with buckets overlapped with
   backward (the default) and with one fused allreduce after it (`--no-overlap`);
3. one allreduce of the net's whole gradient (its parameter count in float32) through mpicaffe's
   MPICommunicator against a raw `MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`, at np=2;
4. the same layers in a torch.nn.Module trained by DistributedDataParallel (gloo) at np=2, and
   without DDP at np=1, on random tensors made in memory (mpicaffe reads LMDB, so its compute
   time, forward + backward without data wait, is shown too), and again reading each rank's
   shard of the same LMDB through the same prefetching reader and transform mpicaffe uses
   (the engine's Data layer), so that both sides pay for the same input pipeline.

    python scripts/bench/scaling.py [--iterations 50] [--warmup 10] [--repeats 5] [--json FILE]

Data (the built-in `mnist` and `synth32` sets), nets and solvers are written to a temporary
folder: the train phase only, no test phase, no snapshots, no display. Times are medians over the
iterations after the warmup (of the ranks' mean time per iteration), then the median over the
repetitions; ratios are taken within each repetition, then their median. Every process is started
by the same `mpirun` command line; a run during which other processes kept a core busy (from
/proc/stat, less our own processes' CPU time) is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOLVERS = {
    "LeNet": "prototxt/lenet/lenet_solver.prototxt",
    "CIFAR-10-quick": "prototxt/cifar10_quick/cifar10_quick_solver.prototxt",
}
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
# (label, ranks, what runs, extra `mpicaffe train` flags)
CONFIGS = [
    ("mpicaffe np=1", 1, "mpicaffe", []),
    ("mpicaffe np=2", 2, "mpicaffe", []),
    ("mpicaffe np=2 no-overlap", 2, "mpicaffe", ["--no-overlap"]),
    ("torch np=1", 1, "ddp", []),
    ("DDP np=2", 2, "ddp", []),
    ("torch np=1 LMDB", 1, "ddp", ["lmdb"]),
    ("DDP np=2 LMDB", 2, "ddp", ["lmdb"]),
]
EFFICIENCY_TARGET = 0.9


# --- preparing data, nets and solvers ---
def _relative_data_path(path: str) -> str | None:
    """'data/<set>/...' part of a path the bundled prototxts name (relative to the repo root)."""
    m = re.search(r"(?:^|/)(data/[^/]+/.+)$", path)
    return m.group(1) if m else None


def prepare(name: str, work: str, args) -> dict:
    """Write the benchmark copy of a bundled net and its solver under `work`; convert the built-in
    data set it reads if not done yet. Returns what the runs and the DDP peer need."""
    from mpicaffe import prototxt
    from mpicaffe.data import datasets
    from mpicaffe.proto import caffe_pb2

    solver_path = os.path.join(ROOT, SOLVERS[name])
    solver = prototxt.read_solver(solver_path)
    # the bundled solvers name their net relative to the repository root
    net = prototxt.net_for_phase(prototxt.read_net(os.path.join(ROOT, solver.net)), caffe_pb2.TRAIN)
    for lp in net.layer:
        if lp.type != "Data":
            continue
        lp.data_param.batch_size = args.batch
        for holder, field in ((lp.data_param, "source"), (lp.transform_param, "mean_file")):
            value = getattr(holder, field)
            rel = _relative_data_path(value) if value else None
            if rel is None:
                continue
            dataset = rel.split("/")[1]
            out = os.path.join(work, "data", dataset)
            if dataset in datasets.BUILTIN and not os.path.exists(out):
                _check([sys.executable, "-m", "mpicaffe", "convert", dataset, "--out", out], f"convert {dataset}")
            setattr(holder, field, os.path.join(work, rel))
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower())
    bench_net = os.path.join(work, f"{slug}_train.prototxt")
    prototxt.write_text(net, bench_net)

    run = caffe_pb2.SolverParameter()
    run.CopyFrom(solver)
    for f in ("test_iter", "test_interval", "test_initialization", "snapshot_prefix", "net"):
        run.ClearField(f)
    run.net = bench_net
    run.display = 0
    run.snapshot = 0
    run.snapshot_after_train = False
    run.max_iter = args.iterations
    bench_solver = os.path.join(work, f"{slug}_solver.prototxt")
    prototxt.write_text(run, bench_solver)

    # the engine's own view of the net: input shape, parameter count (the fused gradient buffer)
    from mpicaffe.backends.engine.net import Net

    engine = Net(net, device="cpu", source=bench_net)
    data_top = next(lp.top[0] for lp in net.layer if lp.type == "Data")
    shape = list(engine.blobs[data_top].tensor.shape)
    params = int(engine.flat_diff.numel())
    # the torch peer must be the same model: every top the same shape, the same parameter count
    model, _, tops = torch_model(bench_net, shape)
    engine_tops = {n: tuple(engine.blobs[n].tensor.shape) for n in tops}
    engine.close()
    peer_params = sum(q.numel() for q in model.parameters())
    if engine_tops != tops or peer_params != params:
        raise SystemExit(f"scaling.py: the torch peer of {name} differs from mpicaffe's net: shapes {tops} and "
                         f"{peer_params} parameters, against {engine_tops} and {params}")
    return {"name": name, "slug": slug, "net": bench_net, "solver": bench_solver, "input_shape": shape,
            "params": params, "lr": solver.base_lr, "momentum": solver.momentum,
            "weight_decay": solver.weight_decay}


def _check(cmd: list[str], what: str, env: dict | None = None, cwd: str | None = None) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"scaling.py: {what} failed (status {proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout


# --- the torch peer ---
def torch_model(net_path: str, input_shape: list[int]):
    """An nn.Sequential with the layers of a chain-shaped Caffe train net (Caffe's pooling rounds
    its output size up, hence ceil_mode); data, loss and accuracy layers are left out. Returns the
    module, the number of classes, and each top's shape for `input_shape`."""
    import torch
    from torch import nn

    from mpicaffe import prototxt

    net = prototxt.read_net(net_path)
    layers: list = []
    tops: dict[str, tuple[int, ...]] = {}
    x = torch.zeros(input_shape)
    for lp in net.layer:
        if lp.type in ("Data", "SoftmaxWithLoss", "Accuracy"):
            continue
        if lp.type == "Convolution":
            cp = lp.convolution_param
            if cp.kernel_h or cp.stride_h or cp.pad_h or list(cp.dilation) not in ([], [1]) or len(cp.kernel_size) > 1:
                raise SystemExit(f"scaling.py: layer '{lp.name}': only square kernels, strides and pads are mapped")
            layer = nn.Conv2d(x.shape[1], cp.num_output, cp.kernel_size[0], stride=(cp.stride or [1])[0],
                              padding=(cp.pad or [0])[0], groups=cp.group, bias=cp.bias_term)
        elif lp.type == "Pooling":
            pp = lp.pooling_param
            if pp.global_pooling or pp.kernel_h or pp.stride_h or pp.pad_h:
                raise SystemExit(f"scaling.py: layer '{lp.name}': only square, non-global pooling is mapped")
            kind = nn.MaxPool2d if pp.pool == pp.MAX else nn.AvgPool2d
            layer = kind(pp.kernel_size, stride=pp.stride, padding=pp.pad, ceil_mode=True)
        elif lp.type == "InnerProduct":
            if x.dim() > 2:
                layers.append(nn.Flatten())
                x = layers[-1](x)
            layer = nn.Linear(x.shape[1], lp.inner_product_param.num_output,
                              bias=lp.inner_product_param.bias_term)
        elif lp.type == "ReLU":
            layer = nn.ReLU(inplace=True)
        elif lp.type == "Dropout":
            layer = nn.Dropout(lp.dropout_param.dropout_ratio)
        else:
            raise SystemExit(f"scaling.py: no torch peer for layer '{lp.name}' of type {lp.type}")
        layers.append(layer)
        with torch.no_grad():
            x = layer(x)
        tops[lp.top[0]] = tuple(x.shape)
    return nn.Sequential(*layers), x.shape[1], tops


def lmdb_reader(net_path: str, rank: int, size: int):
    """An engine net holding only the train net's Data layer, reading `rank`'s shard: the input
    pipeline mpicaffe's ranks run (prefetch thread, Datum decoding, transform_param)."""
    from mpicaffe import prototxt
    from mpicaffe.backends.engine.net import Net

    net = prototxt.read_net(net_path)
    keep = [lp for lp in net.layer if lp.type == "Data"]
    del net.layer[:]
    net.layer.extend(keep)
    reader = Net(net, device="cpu", source=net_path, retain_diffs=False)
    if size > 1:
        reader.layers[0].set_shard(rank, size)
    return reader


def ddp_worker(spec_path: str) -> None:
    """One rank of the torch peer, started by mpirun: time `iterations` SGD steps on random data."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    model, classes, _ = torch_model(spec["net"], spec["input_shape"])
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{spec['rendezvous']}", rank=rank, world_size=size)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                          weight_decay=spec["weight_decay"])
    x = torch.randn(spec["input_shape"])
    y = torch.randint(0, classes, (spec["input_shape"][0],))
    reader = lmdb_reader(spec["net"], rank, size) if spec["lmdb"] else None
    times = []
    for _ in range(spec["iterations"]):
        start = time.perf_counter()
        if reader is not None:
            reader.forward()
            x, y = (reader.blobs[top].tensor for top in reader.layers[0].param.top)
            y = y.long()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    if size > 1:
        dist.destroy_process_group()
    if reader is not None:
        reader.close()
    with open(f"{spec['out']}.rank{rank}", "w") as f:
        json.dump(times, f)


# --- the allreduce microbenchmark ---
def allreduce_worker(spec_path: str) -> None:
    """Under mpirun: time allreduces of each buffer size, mpicaffe's communicator against raw mpi4py,
    alternating the three in every repetition. Rank 0 writes the medians (seconds)."""
    import numpy as np
    from mpi4py import MPI

    from mpicaffe.parallel.comm import MPICommunicator

    with open(spec_path) as f:
        spec = json.load(f)
    comm = MPICommunicator()
    world = MPI.COMM_WORLD
    results = {}
    for count in spec["counts"]:
        buf = np.ones(count, np.float32)
        ways = {
            "mpicaffe Allreduce_sum": comm.Allreduce_sum,
            "mpicaffe allreduce_mean_": comm.allreduce_mean_,
            "mpicaffe Iallreduce_sum+Wait": lambda b: comm.Iallreduce_sum(b).Wait(),
            "raw MPI Allreduce": lambda b: world.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM),
        }
        samples: dict[str, list[float]] = {k: [] for k in ways}
        names = list(ways)
        for rep in range(spec["warmup"] + spec["repeats"]):
            for k in names[rep % len(names):] + names[:rep % len(names)]:
                buf[:] = 1.0  # sums of sums would overflow to inf over many repetitions
                world.Barrier()
                start = time.perf_counter()
                ways[k](buf)
                seconds = time.perf_counter() - start
                if rep >= spec["warmup"]:
                    samples[k].append(seconds)
        # the slower rank's time of each repetition
        for k in names:
            slowest = np.array(samples[k])
            world.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
            results.setdefault(str(count), {})[k] = float(np.median(slowest))
    if comm.rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f)


# --- running the configurations ---
class Launcher:
    """Builds the one `mpirun` command line every measured process is started with."""

    def __init__(self, extra: list[str]):
        self.env = dict(os.environ, **ONE_THREAD)
        self.env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.extra = extra

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        exports = [a for k in ONE_THREAD for a in ("-x", k)]
        # mpirun binds each rank to a core; it refuses more ranks than cores unless told
        over = ["--oversubscribe"] if ranks > len(os.sched_getaffinity(0)) else []
        return ["mpirun", "-np", str(ranks), *over, *exports, *self.extra, sys.executable, *argv]

    def run(self, ranks: int, argv: list[str], what: str, cwd: str) -> float:
        """Run to the end; returns the cores other processes kept busy meanwhile (a noise gauge)."""
        before = _cpu_seconds()
        _check(self.command(ranks, argv), what, env=self.env, cwd=cwd)
        after = _cpu_seconds()
        wall = after[2] - before[2]
        return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our finished children, wall clock)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = children.ru_utime + children.ru_stime
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = mine  # no /proc: no gauge
    return busy, mine, time.perf_counter()


def _rank_files(path: str, ranks: int) -> list[str]:
    root, ext = os.path.splitext(path)
    return [path] + [f"{root}.rank{r}{ext}" for r in range(1, ranks)]


def run_mpicaffe(launcher: Launcher, net: dict, ranks: int, flags: list[str], work: str, tag: str,
                 warmup: int) -> dict:
    """One `mpicaffe train` run: medians over its iterations of each phase (mean over the ranks) from
    its metrics files, and the share of the run's time in communication."""
    metrics = os.path.join(work, f"{tag}.jsonl")
    foreign = launcher.run(ranks, ["-m", "mpicaffe", "train", "--solver", net["solver"], "--metrics", metrics,
                                   *flags], f"mpicaffe train ({tag})", cwd=work)
    per_rank = []
    for path in _rank_files(metrics, ranks):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        per_rank.append([r for r in rows if r["iteration"] >= warmup])
        os.remove(path)
    its = list(zip(*per_rank))

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    # ranks run in lockstep, so their times per iteration agree on average; the max of each
    # iteration's pair would count every jitter against np=2
    def med(key: str) -> float:
        return statistics.median(mean(r[key] for r in it) for it in its)

    comm_share = mean(sum(r["communication"] for r in rows) / sum(r["time"] for r in rows) for rows in per_rank)
    return {"time": med("time"), "compute": med("compute"), "data_wait": med("data_wait"),
            "forward": med("forward"), "backward": med("backward"),
            "communication": med("communication"), "update": med("update"), "comm_share": comm_share,
            "foreign": foreign}


def run_ddp(launcher: Launcher, net: dict, ranks: int, flags: list[str], work: str, tag: str, args) -> dict:
    out = os.path.join(work, f"{tag}.json")
    spec = dict(net, iterations=args.iterations, out=out, rendezvous=os.path.join(work, f"{tag}.rendezvous"),
                lmdb="lmdb" in flags)
    spec_path = os.path.join(work, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    foreign = launcher.run(ranks, [os.path.abspath(__file__), "--worker", "ddp", spec_path], f"torch peer ({tag})",
                           cwd=work)
    per_rank = []
    for r in range(ranks):
        with open(f"{out}.rank{r}") as f:
            per_rank.append(json.load(f)[args.warmup:])
    return {"time": statistics.median(sum(t) / ranks for t in zip(*per_rank)), "foreign": foreign}


def run_allreduce(launcher: Launcher, nets: list[dict], work: str, args) -> dict:
    out = os.path.join(work, "allreduce.json")
    spec_path = os.path.join(work, "allreduce.spec.json")
    with open(spec_path, "w") as f:
        json.dump({"counts": [n["params"] for n in nets], "warmup": 20, "repeats": args.allreduce_repeats,
                   "out": out}, f)
    launcher.run(2, [os.path.abspath(__file__), "--worker", "allreduce", spec_path], "allreduce benchmark", cwd=work)
    with open(out) as f:
        return json.load(f)


# --- facts and report ---
def machine_facts(launcher: Launcher) -> dict:
    import mpi4py
    import torch

    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, env=launcher.env,
                             check=False).stdout
    m = re.search(r"\(Open MPI\)\s*(\S+)", version)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "threads_per_rank": 1,
            "torch": torch.__version__, "open_mpi": m.group(1) if m else version.strip().splitlines()[0],
            "mpi4py": mpi4py.__version__, "python": platform.python_version()}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _median(values) -> float:
    return statistics.median(list(values))


def summarize(net: dict, runs: dict, allreduce: dict) -> dict:
    """The figures of one net. Ratios are taken within each repetition (runs close in time share
    the machine's state), then their median."""
    def t(label: str) -> float:
        return _median(r["time"] for r in runs[label])

    def paired(a: str, b: str) -> float:
        return _median(x["time"] / y["time"] for x, y in zip(runs[a], runs[b]))

    def phases(label: str) -> dict:
        keys = ("data_wait", "forward", "backward", "communication", "update", "compute")
        return {k: _median(r[k] for r in runs[label]) * 1e3 for k in keys}

    ar = allreduce[str(net["params"])]
    raw = ar["raw MPI Allreduce"]
    return {
        "params": net["params"], "input_shape": net["input_shape"],
        "ms_per_iter": {label: t(label) * 1e3 for label in runs},
        "weak_scaling_efficiency": paired("mpicaffe np=1", "mpicaffe np=2"),
        "ddp_weak_scaling_efficiency": paired("torch np=1", "DDP np=2"),
        "comm_share_overlap": _median(r["comm_share"] for r in runs["mpicaffe np=2"]),
        "comm_share_no_overlap": _median(r["comm_share"] for r in runs["mpicaffe np=2 no-overlap"]),
        "phases_ms": {label: phases(label) for label in runs if label.startswith("mpicaffe")},
        "allreduce_ms": {k: v * 1e3 for k, v in ar.items()},
        "allreduce_over_raw": {k: v / raw for k, v in ar.items()},
        "mpicaffe_over_ddp": paired("mpicaffe np=2", "DDP np=2"),
        "mpicaffe_compute_over_ddp": _median(x["compute"] / y["time"] for x, y in
                                             zip(runs["mpicaffe np=2"], runs["DDP np=2"])),
        "ddp_lmdb_weak_scaling_efficiency": paired("torch np=1 LMDB", "DDP np=2 LMDB"),
        "mpicaffe_over_ddp_lmdb": paired("mpicaffe np=2", "DDP np=2 LMDB"),
        "repetitions": runs,
    }


def report(facts: dict, nets: list[dict], res: dict, allreduce: dict, args, command: str) -> dict:
    print(f"# command: {command}")
    print(f"# machine: {facts['cpu']}, {facts['cores']} cores ({facts['usable_cores']} usable), "
          f"{facts['threads_per_rank']} thread per rank; torch {facts['torch']}, Open MPI {facts['open_mpi']}, "
          f"mpi4py {facts['mpi4py']}, Python {facts['python']}")
    print(f"# batch {args.batch} per rank; {args.iterations} iterations per run, first {args.warmup} dropped; "
          f"median over iterations (mean of the ranks), then over {args.repeats} interleaved repetitions; "
          f"ratios paired within a repetition")
    summary: dict = {"command": command, "machine": facts,
                     "nets": {n["name"]: summarize(n, res[n["name"]], allreduce) for n in nets}}
    out = summary["nets"]
    print("\n1. Weak scaling, mpicaffe (ms per iteration)")
    print(f"{'net':<16} {'np=1':>9} {'np=2':>9} {'efficiency':>11}")
    for name, s in out.items():
        ms = s["ms_per_iter"]
        print(f"{name:<16} {ms['mpicaffe np=1']:>9.2f} {ms['mpicaffe np=2']:>9.2f} "
              f"{s['weak_scaling_efficiency']:>11.3f}")
    print("\n2. Communication at np=2: share of the iteration (ms per iteration; phases of the overlapped run)")
    print(f"{'net':<16} {'overlap':>9} {'comm':>7} {'no-overlap':>11} {'comm':>7} "
          f"{'data wait':>10} {'forward':>8} {'backward':>9} {'update':>7}")
    for name, s in out.items():
        ms, ph = s["ms_per_iter"], s["phases_ms"]["mpicaffe np=2"]
        print(f"{name:<16} {ms['mpicaffe np=2']:>9.2f} {s['comm_share_overlap']:>7.1%} "
              f"{ms['mpicaffe np=2 no-overlap']:>11.2f} {s['comm_share_no_overlap']:>7.1%} "
              f"{ph['data_wait']:>10.2f} {ph['forward']:>8.2f} {ph['backward']:>9.2f} {ph['update']:>7.2f}")
    print(f"\n3. One allreduce of the whole gradient at np=2 (ms, median of {args.allreduce_repeats}, slower rank)")
    ways = list(next(iter(out.values()))["allreduce_ms"])
    print(f"{'net':<16} {'params':>8} {'MiB':>5} " + " ".join(f"{w:>26}" for w in ways))
    for name, s in out.items():
        cells = " ".join(f"{s['allreduce_ms'][w]:>13.3f} ({s['allreduce_over_raw'][w]:>5.2f}x raw)" for w in ways)
        print(f"{name:<16} {s['params']:>8} {s['params'] * 4 / 2**20:>5.2f} {cells}")
    print("\n4. PyTorch peer, same layers and batch, random data in memory (ms per iteration)")
    print(f"{'net':<16} {'torch np1':>9} {'DDP np2':>9} {'DDP eff':>8} {'mpicaffe2':>10} {'mc/DDP':>7} "
          f"{'mc compute':>11} {'compute/DDP':>12}")
    for name, s in out.items():
        ms = s["ms_per_iter"]
        print(f"{name:<16} {ms['torch np=1']:>9.2f} {ms['DDP np=2']:>9.2f} {s['ddp_weak_scaling_efficiency']:>8.3f} "
              f"{ms['mpicaffe np=2']:>10.2f} {s['mpicaffe_over_ddp']:>7.2f} "
              f"{s['phases_ms']['mpicaffe np=2']['compute']:>11.2f} {s['mpicaffe_compute_over_ddp']:>12.2f}")
    print("   mpicaffe reads and transforms LMDB records in a prefetch thread; 'mc compute' is its forward +")
    print("   backward without data wait, communication wait and update.")
    print("\n5. PyTorch peer reading the same LMDB shards through mpicaffe's prefetching Data layer (ms per iteration)")
    print(f"{'net':<16} {'torch np1':>9} {'DDP np2':>9} {'DDP eff':>8} {'mpicaffe2':>10} {'mc/DDP':>7}")
    for name, s in out.items():
        ms = s["ms_per_iter"]
        print(f"{name:<16} {ms['torch np=1 LMDB']:>9.2f} {ms['DDP np=2 LMDB']:>9.2f} "
              f"{s['ddp_lmdb_weak_scaling_efficiency']:>8.3f} {ms['mpicaffe np=2']:>10.2f} "
              f"{s['mpicaffe_over_ddp_lmdb']:>7.2f}")
    print("\nRepetitions: ms per iteration [cores kept busy by other processes during the run; * = rerun]")
    for name, s in out.items():
        for label, runs in s["repetitions"].items():
            cells = "  ".join(f"{r['time'] * 1e3:7.2f} [{r['foreign']:.1f}]{'*' if r['attempts'] > 1 else ' '}"
                              for r in runs)
            print(f"  {name:<15} {label:<25} {cells}")

    checks = []
    if "LeNet" in out:
        eff = out["LeNet"]["weak_scaling_efficiency"]
        checks.append((f"LeNet weak-scaling efficiency at np=2 >= {EFFICIENCY_TARGET}", eff >= EFFICIENCY_TARGET,
                       f"{eff:.3f}"))
    for name, s in out.items():
        checks.append((f"{name}: mpicaffe np=2 time per iteration <= DDP np=2 (in-memory data)",
                       s["mpicaffe_over_ddp"] <= 1.0, f"{s['mpicaffe_over_ddp']:.2f}x"))
        checks.append((f"{name}: mpicaffe np=2 time per iteration <= DDP np=2 (same LMDB reader)",
                       s["mpicaffe_over_ddp_lmdb"] <= 1.0, f"{s['mpicaffe_over_ddp_lmdb']:.2f}x"))
    print("\nAcceptance (issue 5)")
    for what, ok, value in checks:
        print(f"  [{'met' if ok else 'NOT met'}] {what}: {value}")
    summary["acceptance"] = [{"check": w, "met": ok, "value": v} for w, ok, v in checks]
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        sys.path.insert(0, ROOT)
        {"ddp": ddp_worker, "allreduce": allreduce_worker}[argv[1]](argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--batch", type=int, default=64, help="batch per rank (default 64)")
    p.add_argument("--iterations", type=int, default=50, help="iterations per run (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="first iterations of a run left out (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of every run (default 5)")
    p.add_argument("--allreduce-repeats", type=int, default=300, help="allreduces timed per way (default 300)")
    p.add_argument("--max-foreign", type=float, default=0.25, metavar="CORES",
                   help="run again a run during which other processes kept more than this many cores busy "
                        "(default 0.25)")
    p.add_argument("--retries", type=int, default=2, help="at most this many reruns of a disturbed run (default 2)")
    p.add_argument("--mpirun-args", default="", help="extra mpirun arguments, quoted as one string")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.iterations <= args.warmup:
        p.error("--iterations must exceed --warmup")
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), ROOT), *argv])
    sys.path.insert(0, ROOT)
    launcher = Launcher(shlex.split(args.mpirun_args))
    facts = machine_facts(launcher)

    with tempfile.TemporaryDirectory(prefix="mpicaffe-scaling-") as tmp:
        work = os.path.abspath(args.keep) if args.keep else tmp
        os.makedirs(work, exist_ok=True)
        nets = [prepare(name, work, args) for name in args.nets]
        res: dict = {n["name"]: {c[0]: [] for c in CONFIGS} for n in nets}
        started = time.perf_counter()
        for rep in range(args.repeats):
            for net in nets:
                # rotate the order each repetition so no configuration always runs first
                shift = rep % len(CONFIGS)
                for label, ranks, kind, flags in CONFIGS[shift:] + CONFIGS[:shift]:
                    tag = f"{net['slug']}_{re.sub(r'[^a-z0-9]+', '_', label.lower())}_{rep}"
                    # a run during which other processes kept a core busy is run again
                    for attempt in range(1, args.retries + 2):
                        if kind == "mpicaffe":
                            r = run_mpicaffe(launcher, net, ranks, flags, work, tag, args.warmup)
                        else:
                            r = run_ddp(launcher, net, ranks, flags, work, tag, args)
                        if r["foreign"] <= args.max_foreign:
                            break
                    r["attempts"] = attempt
                    res[net["name"]][label].append(r)
            sys.stdout.flush()
            print(f"# repetition {rep + 1}/{args.repeats} done after {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
        allreduce = run_allreduce(launcher, nets, work, args)
    summary = report(facts, nets, res, allreduce, args, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
