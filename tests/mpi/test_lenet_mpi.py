"""Acceptance: the bundled LeNet trains to at least 97% test accuracy on two MPI ranks."""
import os
import re
import shutil
import subprocess
import sys

from tests.mpi_harness import run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lenet_reaches_97_percent_on_two_ranks(tmp_path):
    shutil.copytree(os.path.join(ROOT, "prototxt", "lenet"), tmp_path / "prototxt" / "lenet")
    subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "mnist", "--out", "data/mnist"], cwd=tmp_path,
                   check=True, capture_output=True)
    result = run_mpi(2, ["python", "-m", "mpicaffe", "train", "--solver", "prototxt/lenet/lenet_solver.prototxt"],
                     cwd=str(tmp_path), timeout=1800)
    log = result.rank_stderr(0)
    assert "Training on 2 rank(s) (MPI): global batch 128 (64 per rank" in log
    scores = [float(s) for s in re.findall(r"Test net output #0: accuracy = ([0-9.]+)", log)]
    assert len(scores) == 5 and scores[-1] >= 0.97, scores
    assert (tmp_path / "examples_out/lenet/lenet_iter_2000.caffemodel").exists()
