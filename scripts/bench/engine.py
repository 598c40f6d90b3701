#!/usr/bin/env python
"""Forward+backward time per iteration: the built-in engine vs real Caffe, one CPU thread each.

For each bundled net (LeNet, CIFAR-10-quick) the TRAIN net is made deploy-style: its Data
layers become Input layers (image shape from the net's *_deploy.prototxt, batch 64 by default)
filled once with random data and labels, so no data is read, while the loss stays in. Each
backend runs in its own worker process with one thread (torch.set_num_threads(1);
OMP/MKL/OpenBLAS_NUM_THREADS=1), and the parent alternates between the workers: after warmup,
each repetition times `--iterations` passes (clear param diffs, forward, backward) in one worker,
then the other. The table shows the median ms per iteration over the repetitions.

    python scripts/bench/engine.py [--batch 64] [--iterations 10] [--repeats 7] [--warmup 3]

Caffe's column is left out when pycaffe is not importable.
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NETS = {
    "LeNet": "prototxt/lenet/lenet_train_val.prototxt",
    "CIFAR-10-quick": "prototxt/cifar10_quick/cifar10_quick_train_val.prototxt",
}
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def benchmark_net(train_val: str, batch: int) -> str:
    """The TRAIN phase of `train_val` with each Data layer replaced by an Input layer of the same
    tops: data (batch, C, H, W) with C, H, W from the sibling *_deploy.prototxt, label (batch,)."""
    sys.path.insert(0, ROOT)
    from mpicaffe import prototxt
    from mpicaffe.proto import caffe_pb2

    net = prototxt.net_for_phase(prototxt.read_net(train_val), caffe_pb2.TRAIN)
    deploy = prototxt.read_net(train_val.replace("_train_val.prototxt", "_deploy.prototxt"))
    image = next(lp.input_param.shape[0].dim[1:] for lp in deploy.layer if lp.type == "Input")
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


# --- workers: one process per backend, driven over stdin/stdout ---
def _fill(blobs, inputs, classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    for name in inputs:
        data = blobs[name].data
        if name == "label":
            data[...] = rng.integers(0, classes, data.shape)
        else:
            data[...] = rng.standard_normal(data.shape)


def _engine_iteration(path: str, classes: int):
    import torch

    torch.set_num_threads(1)
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


def _caffe_iteration(path: str, classes: int):
    os.environ.setdefault("GLOG_minloglevel", "2")
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


def worker(backend: str, path: str, classes: int) -> None:
    """Answer each line `n` on stdin with the seconds n iterations took, as JSON."""
    sys.path.insert(0, ROOT)
    iteration = (_engine_iteration if backend == "engine" else _caffe_iteration)(path, classes)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            iteration()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class Worker:
    def __init__(self, backend: str, path: str, classes: int):
        env = dict(os.environ, **ONE_THREAD, GLOG_minloglevel=os.environ.get("GLOG_minloglevel", "2"))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", backend, path,
                                      str(classes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def time(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

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


def measure(net_path: str, backends: list[str], args) -> dict[str, float]:
    """Median ms per iteration of each backend on the deploy-style form of `net_path`."""
    text = benchmark_net(net_path, args.batch)
    classes = num_classes(text)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    try:
        workers = {b: Worker(b, f.name, classes) for b in backends}
        for w in workers.values():
            w.time(args.warmup)
        samples: dict[str, list[float]] = {b: [] for b in backends}
        for rep in range(args.repeats):
            order = backends if rep % 2 == 0 else backends[::-1]
            for b in order:
                samples[b].append(workers[b].time(args.iterations) * 1000 / args.iterations)
        for w in workers.values():
            w.close()
    finally:
        os.remove(f.name)
    return {b: statistics.median(s) for b, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], int(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iterations", type=int, default=10, help="iterations per timed repetition")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per backend (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    import torch

    backends = ["engine"] + (["caffe"] if caffe_importable() else [])
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; one thread per backend; "
          f"torch {torch.__version__}; batch {args.batch}; median of {args.repeats} x {args.iterations} "
          f"iterations after {args.warmup} warmup")
    if "caffe" not in backends:
        print("# pycaffe is not importable: engine only (run scripts/install_caffe.sh for the comparison)")
    header = f"{'net':<16} {'engine ms/iter':>15} {'caffe ms/iter':>14} {'caffe/engine':>13}"
    print(header)
    print("-" * len(header))
    for name in args.nets:
        ms = measure(os.path.join(ROOT, NETS[name]), backends, args)
        caffe_ms = ms.get("caffe")
        ratio = f"{caffe_ms / ms['engine']:.2f}x" if caffe_ms else "n/a"
        caffe_col = f"{caffe_ms:.2f}" if caffe_ms else "n/a"
        print(f"{name:<16} {ms['engine']:>15.2f} {caffe_col:>14} {ratio:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
