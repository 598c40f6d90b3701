"""`--comm` under real mpirun: the torch.distributed process group is set up over MPI (no second
launcher), and gradients averaged with gloo train exactly as with MPI; reducers and broadcasts
that stage tensors through host copies (as on a GPU without CUDA-aware MPI) give the same sums.
`--comm nccl` without CUDA is refused in one line."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpicaffe import prototxt
from tests.mpi_harness import run_mpi

ROOT = Path(__file__).resolve().parents[2]

BOOTSTRAP = textwrap.dedent("""
    import numpy as np
    import torch
    from mpicaffe.parallel import buffers
    from mpicaffe.parallel.comm import MPICommunicator
    from mpicaffe.parallel.process_group import ProcessGroup
    from mpicaffe.parallel.reducer import BucketReducer, FusedReducer, ProcessGroupReducer
    from tests.test_buffers import _net

    comm = MPICommunicator()
    group = ProcessGroup(comm, "gloo")
    t = torch.full((5,), float(comm.rank + 1))
    group.all_reduce(t)
    assert t.tolist() == [3.0] * 5, t

    net = _net()
    rng = np.random.default_rng(comm.rank)
    net.blobs["x"].data[...] = rng.standard_normal((4, 2, 6, 6))
    weight = 0.75 if comm.rank == 0 else 1.25
    results = {}
    for name, mode, make in [
            ("mpi view", "view", lambda: BucketReducer(comm, net, weight, bucket_bytes=64)),
            ("mpi staged", "stage", lambda: BucketReducer(comm, net, weight, bucket_bytes=64)),
            ("mpi device pointer", "device", lambda: BucketReducer(comm, net, weight, bucket_bytes=64)),
            ("mpi fused staged", "stage", lambda: FusedReducer(comm, [net.flat_diff], weight)),
            ("gloo buckets", "view", lambda: ProcessGroupReducer(group, net, weight, bucket_bytes=64))]:
        buffers.exchange_mode = lambda device, mode=mode: mode
        reducer = make()
        net.clear_param_diffs()
        reducer.start()
        net.forward_backward()
        reducer.finish()
        results[name] = net.flat_diff.clone()
    for name, r in results.items():
        assert torch.equal(r, results["mpi view"]), name

    buffers.exchange_mode = lambda device: "stage"
    w = torch.full((7,), float(comm.rank))
    comm.Bcast_tensor(w, root=1)
    assert w.tolist() == [1.0] * 7, w
    group.close()
    print("ok", comm.rank, len(BucketReducer(comm, net, 1.0, bucket_bytes=64).buckets))
""")


def test_gloo_group_is_set_up_over_mpi_and_staged_buffers_reduce_alike(tmp_path):
    script = tmp_path / "bootstrap.py"
    script.write_text(BOOTSTRAP)
    result = run_mpi(2, ["python", str(script)], timeout=120, env={"PYTHONPATH": str(ROOT)})
    for rank in (0, 1):
        ok, r, buckets = result.rank_stdout(rank).split()
        assert (ok, r) == ("ok", str(rank)) and int(buckets) >= 3


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "digits", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def digits_solver(data: Path, tmp_path: Path, name: str, max_iter: int) -> str:
    """The bundled digits solver, reading `data`'s LMDBs, writing into tmp_path."""
    net = (ROOT / "prototxt/digits/digits_train_val.prototxt").read_text().replace("data/digits", str(data))
    (tmp_path / "net.prototxt").write_text(net)
    solver = (ROOT / "prototxt/digits/digits_solver.prototxt").read_text()
    solver = (solver.replace("prototxt/digits/digits_train_val.prototxt", str(tmp_path / "net.prototxt"))
              .replace("examples_out/digits/digits", str(tmp_path / name))
              .replace("max_iter: 600", f"max_iter: {max_iter}").replace("snapshot: 300", "snapshot: 0")
              .replace("display: 50", "display: 10").replace("test_interval: 100", "test_interval: 20"))
    path = tmp_path / f"{name}_solver.prototxt"
    path.write_text(solver)
    return str(path)


def _train(tmp_path, solver, name, *flags):
    metrics = tmp_path / f"{name}.jsonl"
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--metrics", str(metrics),
                         "--check-every", "10", "--bucket-mb", "0.01", *flags], timeout=180)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    weights = [b.data for layer in prototxt.read_net(str(tmp_path / f"{name}_iter_40.caffemodel")).layer
               for b in layer.blobs]
    return result, losses, weights


def test_gloo_trains_exactly_as_mpi(digits, tmp_path):
    mpi = _train(tmp_path, digits_solver(digits, tmp_path, "mpi", 40), "mpi", "--comm", "mpi")
    gloo = _train(tmp_path, digits_solver(digits, tmp_path, "gloo", 40), "gloo", "--comm", "gloo")
    # two ranks: each sum is one float32 addition, commutative, so both give the same bits
    assert len(mpi[1]) == len(gloo[1]) == 40
    np.testing.assert_array_equal(mpi[1], gloo[1])
    assert len(mpi[2]) == len(gloo[2]) > 0
    for a, b in zip(mpi[2], gloo[2]):
        np.testing.assert_array_equal(a, b)
    assert "Gradients averaged with gloo (torch.distributed, rendezvous at 127.0.0.1:" in gloo[0].rank_stderr(0)
    assert "Gradients averaged with" not in mpi[0].rank_stderr(0)


def test_comm_nccl_without_cuda_is_refused_in_one_line(digits, tmp_path):
    solver = digits_solver(digits, tmp_path, "nccl", 2)
    proc = subprocess.run([sys.executable, "-m", "mpicaffe", "train", "--solver", solver, "--comm", "nccl"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [("mpicaffe train: error: --comm nccl needs every rank on a CUDA device, but this process "
                       "runs on cpu; use --gpu or --devices cuda:N, or --comm mpi (or gloo) on CPUs")], proc.stderr
    assert "Traceback" not in proc.stderr
