"""MPI smoke test: two real ranks under mpirun agree on an allreduce and a broadcast."""
import textwrap

import pytest

from tests.mpi_harness import run_mpi

SCRIPT = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    x = np.full(4, comm.rank + 1, dtype=np.float32)
    comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    token = comm.bcast("from-root" if comm.rank == 0 else None, root=0)
    print(f"rank={comm.rank} size={comm.size} sum={x.tolist()} token={token}")
""")


def test_two_ranks_allreduce_and_broadcast(tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text(SCRIPT)
    result = run_mpi(2, ["python", str(script)], timeout=120)
    for rank in (0, 1):
        assert result.rank_stdout(rank) == f"rank={rank} size=2 sum=[3.0, 3.0, 3.0, 3.0] token=from-root"


def test_failure_is_reported_with_rank_output(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("from mpi4py import MPI\nimport sys\nprint('about to fail')\n"
                      "sys.exit(3 if MPI.COMM_WORLD.rank == 1 else 0)\n")
    result = run_mpi(2, ["python", str(script)], timeout=120, check=False)
    assert result.returncode != 0
    assert result.rank_stdout(1) == "about to fail"


def test_deadlock_fails_after_timeout_with_output(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nfrom mpi4py import MPI\ncomm = MPI.COMM_WORLD\n"
                      "print('waiting', flush=True)\n"
                      "comm.Barrier() if comm.rank == 0 else time.sleep(600)\n")
    with pytest.raises(pytest.fail.Exception, match="timed out after 5s(.|\\n)*waiting"):
        run_mpi(2, ["python", str(script)], timeout=5)
