"""`--stall-timeout` under real `mpirun`, without ULFM: SIGSTOP one rank of three (a wedged node);
the others name it and where they wait, the lowest live rank snapshots the last good state, and
the job exits with the stall exit code instead of hanging."""
import re
import signal
import time

import pytest

from mpicaffe.data import datasets
from mpicaffe.parallel.stall import STALL_EXIT_CODE
from tests.fault.rank_faults import BackgroundMPI
from tests.mpi.test_train_mpi import _setup
from tests.mpi_harness import run_mpi

TIMEOUT = 10
ITERS = 200
PHASES = (r"(gradient allreduce|display \(loss average\)|weights checksum|test phase \(score sums\)|"
          r"signal agreement at the iteration boundary)")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_stopped_rank_is_named_snapshotted_around_and_aborted(tmp_path, victim):
    x, y = datasets.load_digits()
    solver = _setup(tmp_path, "stall", x[:960], y[:960], 16, max_iter=ITERS)
    metrics = tmp_path / "stall.jsonl"
    job = BackgroundMPI(3, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--stall-timeout", str(TIMEOUT),
                            "--metrics", str(metrics)], str(tmp_path / "stall.out"))
    try:
        job.wait_for_lines(str(metrics).replace(".jsonl", ".rank1.jsonl") if victim else str(metrics), 30)
        job.signal_rank(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        result = job.finish(timeout=180)
        waited = time.monotonic() - stopped
    finally:
        job.kill()
    assert result.returncode == STALL_EXIT_CODE, result.output
    # the timeout, a grace period of at most 5 s for the answers, and a generous margin for a loaded machine
    assert TIMEOUT <= waited < TIMEOUT + 5 + 60
    writer = 1 if victim == 0 else 0
    for rank in {0, 1, 2} - {victim}:
        # the phase the training code labelled its collectives with (Communicator.labelled)
        assert re.search(rf"rank {rank}: rank\(s\) {victim} stalled: rank\(s\) .* waited \d+\.\d s for them in the "
                         rf"{PHASES} \(solver at iteration \d+\) and they did not answer", result.rank_stderr(rank)), \
            result.output
    found = re.search(r"snapshot of the last good state: (\S+\.caffemodel), (\S+\.solverstate)",
                      result.rank_stderr(writer))
    assert found, result.output
    # the snapshot is usable: training resumes from it and finishes
    run_mpi(1, ["python", "-m", "mpicaffe", "train", "--solver", solver, "--snapshot", found.group(2)], timeout=300)
