"""The CPU container image (docker/Dockerfile.cpu), built with buildah by scripts/build_images.sh,
trains the bundled LeNet under `mpirun -np 2` inside the image, on real Caffe and on the engine.

The build is cached by content: the first run compiles Caffe in the image (about 15 minutes on
two cores), later runs find the image by its tag in seconds. Needs root and buildah
(scripts/test.sh installs buildah and debootstrap with apt-get); skipped, saying why, without them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SCRIPT = os.path.join(ROOT, "scripts", "build_images.sh")
BUILDAH = ["buildah", "--storage-driver", "vfs"]
CONTAINER_PREFIX = "mpicaffe-test-"
ITERS = 60


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "buildah here needs root (vfs storage, chroot isolation)"
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed, and scripts/test.sh could not install it with apt-get"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _run(argv: list[str], timeout: float, merge: bool = False) -> subprocess.CompletedProcess:
    """Run a command from the repository root; with `merge`, stderr goes into stdout in order."""
    return subprocess.run(argv, check=False, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE)


def _remove_stale_containers() -> None:
    """Remove working containers left by test runs that were killed (each holds a full rootfs)."""
    names = _run(BUILDAH + ["containers", "--format", "{{.ContainerName}}"], 60).stdout.split()
    for name in names:
        m = re.fullmatch(re.escape(CONTAINER_PREFIX) + r"(\d+)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run(BUILDAH + ["rm", name], 120)


def run_in(container: str, script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a bash script inside the working container, in the image's working directory."""
    return _run(BUILDAH + ["run", "--isolation", "chroot", container, "--", "bash", "-c", script],
                timeout, merge=True)


@pytest.fixture(scope="module")
def cpu_container():
    """A working container of the freshly built (or cached) CPU image, with the MNIST subset
    converted and a short copy of LeNet's solver (ITERS iterations, tested at the end)."""
    build = _run([BUILD_SCRIPT, "cpu"], timeout=3600)
    assert build.returncode == 0, f"scripts/build_images.sh cpu failed:\n{build.stdout}\n{build.stderr}"
    image = _run([BUILD_SCRIPT, "--print-tag"], 60).stdout.strip()
    _remove_stale_containers()
    name = f"{CONTAINER_PREFIX}{os.getpid()}"
    _run(BUILDAH + ["rm", name], 120)
    made = _run(BUILDAH + ["from", "--pull-never", "--quiet", "--name", name, image], 600)
    assert made.returncode == 0, made.stderr
    try:
        prep = run_in(name, f"""set -euo pipefail
            mpicaffe convert mnist --out data/mnist
            sed -e 's/^max_iter:.*/max_iter: {ITERS}/' -e 's/^test_interval:.*/test_interval: {ITERS}/' \\
                -e 's/^display:.*/display: 20/' -e 's/^snapshot:.*/snapshot: 0/' \\
                prototxt/lenet/lenet_solver.prototxt >/tmp/lenet_short_solver.prototxt
            """, timeout=600)
        assert prep.returncode == 0, prep.stdout
        yield name
    finally:
        _run(BUILDAH + ["rm", name], 300)


@pytest.mark.parametrize("backend, banner", [
    ("engine", "Backend: the built-in engine"),
    ("caffe", "Backend: real Caffe (pycaffe)"),
])
def test_lenet_trains_on_two_ranks_inside_the_cpu_image(cpu_container, backend, banner):
    result = run_in(cpu_container, "mpirun -np 2 --oversubscribe mpicaffe train "
                    f"--solver /tmp/lenet_short_solver.prototxt --backend {backend}", timeout=600)
    log = result.stdout
    assert result.returncode == 0, log
    assert "Training on 2 rank(s) (MPI): global batch 128" in log, log
    assert banner in log, log
    # ends with the test phase after the last iteration, and the net has learnt (chance is 0.1)
    last_test = log.find(f"Iteration {ITERS}, Testing net (#0)")
    assert last_test >= 0, log
    accuracy = re.search(r"Test net output #0: accuracy = ([0-9.]+)", log[last_test:])
    assert accuracy and float(accuracy.group(1)) > 0.5, log
    assert "Optimization Done." in log[last_test:], log
