"""scripts/gpu_check.sh, the check run on a GPU machine when one is lent: on this CPU machine its
parity script runs with the CPU as the device (so its use of the engine cannot rot), and the
whole check stops at its first step with a clear report."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_parity_script_runs_and_compares_real_gradients():
    proc = subprocess.run([sys.executable, "scripts/gpu_parity.py", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["PASS LeNet", "PASS ResNet-20"]
    assert all("differ by 0.00e+00 and the gradients by 0.00e+00" in line for line in lines)


def test_without_a_gpu_the_check_fails_at_device_query():
    if torch.cuda.is_available():
        return  # the real check is for scripts/gpu_check.sh itself on a GPU machine
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PATH": os.path.dirname(sys.executable)
                                                         + os.pathsep + os.environ["PATH"]})
    assert proc.returncode == 1
    assert "FAIL device_query: no usable CUDA device 0" in proc.stdout
