"""`--fault-tolerance ulfm` under real `mpirun --with-ft ulfm`: kill -9 one rank of three in the
middle of training; the survivors finish the run without a restart, keep identical weights, and
from the recovery on train exactly as a fresh two-rank run resumed at that iteration with the same
global batch."""
import re
import shutil

import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.data import datasets
from tests.fault.rank_faults import BackgroundMPI, losses_by_iteration
from tests.mpi.test_train_mpi import _setup
from tests.mpi_harness import run_mpi

GLOBAL_BATCH = 48   # 16 per rank on 3 ranks, 24 on 2
ITERS = 120
ULFM = ["--with-ft", "ulfm"]


def _metrics(base, world_rank: int) -> str:
    return str(base) if world_rank == 0 else str(base).replace(".jsonl", f".rank{world_rank}.jsonl")


# rank 0 (its duties move), the last rank, and a middle one with stall detection on as well
@pytest.mark.parametrize(("victim", "extra"), [(0, []), (2, []), (1, ["--stall-timeout", "10"])])
def test_survivors_recover_in_run_and_continue_as_a_fresh_smaller_run(tmp_path, victim, extra):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "ulfm", x[:960], y[:960], 16, max_iter=ITERS)
    metrics = tmp_path / "ulfm.jsonl"
    job = BackgroundMPI(3, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--fault-tolerance", "ulfm",
                            "--global-batch", str(GLOBAL_BATCH), "--metrics", str(metrics), "--check-every", "1",
                            *extra],
                        str(tmp_path / "ulfm.out"), mpirun_args=ULFM)
    try:
        job.wait_for_lines(_metrics(metrics, victim), 30)
        job.stop_then_kill(victim)
        result = job.finish()
    finally:
        job.kill()
    assert result.returncode == 0, result.output
    survivors = [r for r in range(3) if r != victim]
    new_rank0 = survivors[0]
    log0 = result.rank_stderr(new_rank0)
    found = re.search(r"Recovered from the failure of rank\(s\) (\d+) .* (\d+) rank\(s\) go on from iteration (\d+) "
                      r"with global batch 48 \(24 per rank\)", log0)
    assert found, result.output
    assert (int(found.group(1)), int(found.group(2))) == (victim, 2)
    k = int(found.group(3))
    assert 0 < k < ITERS
    # the lowest survivor took over rank 0's duties: the log, the snapshots
    assert "Optimization Done." in log0
    assert (tmp_path / f"ulfm_iter_{k}.solverstate").exists()
    final = tmp_path / "ulfm_final.caffemodel"
    shutil.copy(tmp_path / f"ulfm_iter_{ITERS}.caffemodel", final)
    # --check-every 1 compared the survivors' weights after every iteration; the last one too
    assert "ranks disagree" not in result.output

    # the reference: a fresh 2-rank run from the recovery snapshot, same global batch
    ref_solver = _setup(tmp_path, "ref", x[:960], y[:960], 16, max_iter=ITERS)
    ref_metrics = tmp_path / "ref.jsonl"
    run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", ref_solver, "--global-batch", str(GLOBAL_BATCH),
                "--snapshot", str(tmp_path / f"ulfm_iter_{k}.solverstate"), "--metrics", str(ref_metrics)],
            timeout=300)
    for new_rank, world_rank in enumerate(survivors):
        ulfm = losses_by_iteration(_metrics(metrics, world_rank))
        ref = losses_by_iteration(_metrics(ref_metrics, new_rank))
        assert sorted(ref) == list(range(k, ITERS))
        np.testing.assert_allclose([ulfm[i] for i in ref], [ref[i] for i in ref], rtol=1e-6, atol=1e-7)
    got, want = prototxt.read_net(str(final)).layer, prototxt.read_net(str(tmp_path / f"ref_iter_{ITERS}.caffemodel")).layer
    for a, b in zip(got, want):
        for ba, bb in zip(a.blobs, b.blobs):
            np.testing.assert_allclose(ba.data, bb.data, rtol=1e-6, atol=1e-7)


def test_ulfm_with_the_caffe_backend_is_refused_with_the_reason(tmp_path):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "caffe", x[:200], y[:200], 16, max_iter=2)
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--fault-tolerance", "ulfm",
                         "--backend", "caffe"], timeout=120, check=False, mpirun_args=ULFM)
    assert result.returncode != 0
    assert "--fault-tolerance ulfm needs the built-in engine" in result.output
    assert "fixes each Data layer's batch size" in result.output
