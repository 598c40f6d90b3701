#!/usr/bin/env python
"""TRAIN step time and peak memory per net: the built-in engine vs real Caffe, side by side.

Nets: the bundled LeNet, CIFAR-10-quick and ResNet-20, made deploy-style (their Data layers become
Input layers of the same tops, image shape from the net's deploy prototxt), and model-zoo
architectures from tests/zoo/nets.py (TRAIN variant: Input data and label, Dropout kept,
SoftmaxWithLoss). Inputs are filled once with random data and labels, so no data is read.

Method: each backend runs in its own worker process, and the parent alternates between them.
After warmup, the number of iterations per repetition is set so that one repetition takes about
`--seconds`; each repetition times that many TRAIN steps (clear param diffs, forward, backward)
in one worker, then the other (the order flips every repetition). The table shows the median
ms per step over `--repeats` repetitions, and each worker's peak resident memory (VmHWM, read in
the worker after its last step, so it includes the interpreter and libraries).

Threads: `--threads 1` runs each worker on one thread (torch.set_num_threads(1);
OMP/MKL/OPENBLAS_NUM_THREADS=1), `--threads all` on every CPU; both by default. Some hosts set
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow OpenBLAS (Caffe's BLAS) several-fold: both are
removed from the workers' environment, and the OpenBLAS kernel Caffe runs is printed.

    python scripts/bench/engine.py [--nets LeNet ResNet-50 ...] [--threads 1 all] [--repeats 5]
                                   [--seconds 1.0] [--warmup 2] [--batch N] [--markdown]

Caffe's columns are left out when pycaffe is not importable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# environment variables that change which OpenBLAS kernel runs, and how fast (see the docstring)
OPENBLAS_TUNING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class BenchNet:
    """A net to time: a bundled train_val prototxt (with its deploy prototxt for the image shape),
    or a model-zoo architecture at `size` pixels."""

    batch: int
    train_val: str = ""
    deploy: str = ""
    zoo: str = ""
    size: int = 0


NETS: dict[str, BenchNet] = {
    "LeNet": BenchNet(64, "prototxt/lenet/lenet_train_val.prototxt", "prototxt/lenet/lenet_deploy.prototxt"),
    "CIFAR-10-quick": BenchNet(64, "prototxt/cifar10_quick/cifar10_quick_train_val.prototxt",
                               "prototxt/cifar10_quick/cifar10_quick_deploy.prototxt"),
    "ResNet-20": BenchNet(64, "prototxt/resnet20/resnet20_synth32_train_val.prototxt",
                          "prototxt/resnet20/resnet20_deploy.prototxt"),
    "SqueezeNet-1.1": BenchNet(8, zoo="squeezenet1_1", size=224),
    "MobileNet-v1": BenchNet(8, zoo="mobilenet_v1", size=224),
    "MobileNet-v2": BenchNet(8, zoo="mobilenet_v2", size=224),
    "GoogLeNet": BenchNet(8, zoo="googlenet", size=224),
    "ResNet-50": BenchNet(8, zoo="resnet50", size=224),
    "DenseNet-121": BenchNet(8, zoo="densenet121", size=224),
    "VGG-16": BenchNet(2, zoo="vgg16", size=224),
}
ZOO_CLASSES = 1000


def benchmark_net(train_val: str, batch: int, deploy: str | None = None) -> str:
    """The TRAIN phase of `train_val` with each Data layer replaced by an Input layer of the same
    tops: data (batch, C, H, W) with C, H, W from the deploy prototxt (default: the sibling
    *_deploy.prototxt), label (batch,)."""
    sys.path.insert(0, ROOT)
    from mpicaffe import prototxt
    from mpicaffe.proto import caffe_pb2

    net = prototxt.net_for_phase(prototxt.read_net(train_val), caffe_pb2.TRAIN)
    # read_net turns legacy input/input_shape fields into an Input layer
    deploy_net = prototxt.read_net(deploy or train_val.replace("_train_val.prototxt", "_deploy.prototxt"))
    image = next(lp.input_param.shape[0].dim[1:] for lp in deploy_net.layer if lp.type == "Input")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        if lp.type == "Data":
            inp = out.layer.add(name=lp.name, type="Input", top=lp.top)
            inp.input_param.shape.add(dim=[batch, *image])
            if len(lp.top) > 1:
                inp.input_param.shape.add(dim=[batch])
        else:
            out.layer.add().CopyFrom(lp)
    return prototxt.to_text(out)


def num_classes(net_text: str) -> int:
    """num_output of the layer feeding the loss layer's scores (for random labels)."""
    from mpicaffe import prototxt
    from mpicaffe.proto import caffe_pb2

    net = prototxt.parse_text(net_text, caffe_pb2.NetParameter())
    loss = next(lp for lp in net.layer if lp.type == "SoftmaxWithLoss")
    producer = next(lp for lp in net.layer if loss.bottom[0] in lp.top)
    return producer.inner_product_param.num_output


def net_text(bench: BenchNet, batch: int) -> tuple[str, int, str]:
    """(prototxt text, number of classes, input shape as text) of a benchmark net."""
    if bench.zoo:
        sys.path.insert(0, ROOT)
        from tests.zoo.nets import zoo_net

        text = zoo_net(bench.zoo, batch, bench.size, train=True, dropout=True, num_classes=ZOO_CLASSES)
        return text, ZOO_CLASSES, f"{batch}x3x{bench.size}x{bench.size}"
    text = benchmark_net(os.path.join(ROOT, bench.train_val), batch, os.path.join(ROOT, bench.deploy))
    from mpicaffe import prototxt
    from mpicaffe.proto import caffe_pb2

    data = next(lp for lp in prototxt.parse_text(text, caffe_pb2.NetParameter()).layer if lp.type == "Input")
    return text, num_classes(text), "x".join(str(d) for d in data.input_param.shape[0].dim)


# --- workers: one process per backend, driven over stdin/stdout ---
def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _fill(blobs, inputs, classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    for name in inputs:
        data = blobs[name].data
        if name == "label":
            data[...] = rng.integers(0, classes, data.shape)
        else:
            data[...] = rng.standard_normal(data.shape)


def _engine_iteration(path: str, classes: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    from mpicaffe import prototxt
    from mpicaffe.backends.engine.net import Net
    from mpicaffe.proto import caffe_pb2

    net = Net(prototxt.net_for_phase(prototxt.read_net(path), caffe_pb2.TRAIN))
    _fill(net.blobs, net.inputs, classes)

    def iteration():
        net.clear_param_diffs()
        net.forward()
        net.backward()

    return iteration


def _caffe_iteration(path: str, classes: int, threads: int):
    import caffe

    caffe.set_mode_cpu()
    net = caffe.Net(path, caffe.TRAIN)
    _fill(net.blobs, net.inputs, classes)
    last = len(net.layers) - 1

    def iteration():
        net.clear_param_diffs()
        net._forward(0, last)
        net._backward(last, 0)

    return iteration


def _libraries(backend: str) -> str:
    """What computes: torch's BLAS and CPU capability, or the OpenBLAS that Caffe links and its kernel."""
    if backend == "engine":
        import torch

        return (f"torch {torch.__version__} (MKL {'on' if torch.backends.mkl.is_available() else 'off'}, "
                f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}, "
                f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} thread(s)")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown (pip install threadpoolctl to see which OpenBLAS kernel runs)"
    # Caffe links the system libopenblas; numpy and scipy wheels bring their own (libscipy_openblas)
    blas = [i for i in threadpool_info() if i.get("prefix") == "libopenblas"]
    if not blas:
        return "no system OpenBLAS found by threadpoolctl: " + ", ".join(
            f"{i.get('internal_api')} {i.get('filepath')}" for i in threadpool_info() if i.get("user_api") == "blas")
    return ", ".join(f"OpenBLAS {i.get('version')} ({i.get('filepath')}), kernel {i.get('architecture')}, "
                     f"{i.get('num_threads')} thread(s)" for i in blas)


def worker(backend: str, path: str, classes: int, threads: int) -> None:
    """Answer each line `n` on stdin with the seconds n iterations took, as JSON; the line `peak`
    with the peak resident memory."""
    sys.path.insert(0, ROOT)
    if backend == "engine":
        import torch  # noqa: F401 (counted in the libraries' memory below)
    else:
        import caffe  # noqa: F401
    libraries_mb = peak_rss_mb()
    iteration = (_engine_iteration if backend == "engine" else _caffe_iteration)(path, classes, threads)
    print(json.dumps({"libraries": _libraries(backend), "libraries_mb": libraries_mb}), flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            print(json.dumps({"peak_mb": peak_rss_mb()}), flush=True)
            continue
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            iteration()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def worker_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_TUNING}
    env.update({k: str(threads) for k in THREAD_VARS})
    env["GLOG_minloglevel"] = os.environ.get("GLOG_minloglevel", "2")
    return env


class Worker:
    def __init__(self, backend: str, path: str, classes: int, threads: int):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", backend, path,
                                      str(classes), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=worker_env(threads))
        self.info: dict = {}

    def ready(self) -> None:
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()
        return self._read()

    def time(self, n: int) -> float:
        return self._ask(str(n))["seconds"]

    def peak_mb(self) -> float:
        return self._ask("peak")["peak_mb"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def caffe_importable() -> bool:
    env = dict(os.environ, GLOG_minloglevel="2")
    return subprocess.run([sys.executable, "-c", "import caffe"], env=env, capture_output=True, check=False).returncode == 0


@dataclass
class Result:
    ms: dict[str, float]
    peak_mb: dict[str, float]
    iterations: int
    info: dict[str, dict]


def measure(text: str, classes: int, backends: list[str], threads: int, args) -> Result:
    """Median ms per TRAIN step and peak memory of each backend on net `text`."""
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    workers: dict[str, Worker] = {}
    try:
        # the workers build their nets at the same time; timing starts once both are ready
        workers = {b: Worker(b, f.name, classes, threads) for b in backends}
        for w in workers.values():
            w.ready()
        for w in workers.values():
            w.time(args.warmup)
        n = args.iterations or max(1, round(args.seconds / max(w.time(1) for w in workers.values())))
        samples: dict[str, list[float]] = {b: [] for b in backends}
        for rep in range(args.repeats):
            order = backends if rep % 2 == 0 else backends[::-1]
            for b in order:
                samples[b].append(workers[b].time(n) * 1000 / n)
        peak = {b: w.peak_mb() for b, w in workers.items()}
        info = {b: w.info for b, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        os.remove(f.name)
    return Result({b: statistics.median(s) for b, s in samples.items()}, peak, n, info)


def _cells(r: Result, times: str) -> list[str]:
    """engine ms, Caffe ms, Caffe / engine, engine MB, Caffe MB ('n/a' for Caffe without pycaffe)."""
    engine, caffe = r.ms["engine"], r.ms.get("caffe")
    if caffe is None:
        return [f"{engine:.1f}", "n/a", "n/a", f"{r.peak_mb['engine']:.0f}", "n/a"]
    return [f"{engine:.1f}", f"{caffe:.1f}", f"{caffe / engine:.2f}{times}", f"{r.peak_mb['engine']:.0f}",
            f"{r.peak_mb['caffe']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS), metavar="NET",
                   help=f"nets to time (default all: {', '.join(NETS)})")
    p.add_argument("--threads", nargs="+", default=["1", "all"], choices=["1", "all"],
                   help="one thread per worker, every CPU, or both (default both)")
    p.add_argument("--batch", type=int, help="batch size for every net (default: each net's own)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per backend (median)")
    p.add_argument("--seconds", type=float, default=1.0, help="target seconds per timed repetition")
    p.add_argument("--iterations", type=int, default=0, help="iterations per repetition (default: from --seconds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    backends = ["engine"] + (["caffe"] if caffe_importable() else [])
    tuned = {k: os.environ[k] for k in OPENBLAS_TUNING if k in os.environ}
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; TRAIN step (clear diffs, forward, backward); median of "
          f"{args.repeats} repetitions of ~{args.seconds:g} s after {args.warmup} warmup iterations")
    if tuned:
        print(f"# removed from the workers' environment: {' '.join(f'{k}={v}' for k, v in tuned.items())}")
    if "caffe" not in backends:
        print("# pycaffe is not importable: engine only (run scripts/install_caffe.sh for the comparison)")
    header = (f"{'net':<15} {'input':>13} {'thr':>3} {'engine ms':>10} {'caffe ms':>10} {'caffe/engine':>12} "
              f"{'engine MB':>10} {'caffe MB':>9}")
    rows: list[tuple[str, str, str, Result]] = []
    libraries: dict[str, float] = {}  # what computes -> MB resident before the net is built
    for name in args.nets:
        text, classes, shape = net_text(NETS[name], args.batch or NETS[name].batch)
        for mode in args.threads:
            threads = 1 if mode == "1" else os.cpu_count() or 1
            r = measure(text, classes, backends, threads, args)
            for b, info in r.info.items():
                libraries.setdefault(f"{b}, {mode} thread(s): {info['libraries']}", info["libraries_mb"])
            if not rows:
                print(header)
                print("-" * len(header))
            rows.append((name, shape, mode, r))
            print(f"{name:<15} {shape:>13} {mode:>3} " + " ".join(
                f"{v:>{w}}" for v, w in zip(_cells(r, "x"), (10, 10, 12, 10, 9))), flush=True)
    for what, mb in libraries.items():
        print(f"# {what}; {mb:.0f} MB resident before the net was built")
    if args.markdown:
        print()
        print("| net | input | threads | engine ms | Caffe ms | Caffe / engine | engine peak MB | Caffe peak MB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, shape, mode, r in rows:
            print(f"| {name} | {shape} | {mode} | {' | '.join(_cells(r, '×'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
