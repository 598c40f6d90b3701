"""The container images, built with buildah by scripts/build_images.sh, train the bundled LeNet
under `mpirun -np 2` inside: the CPU image (docker/Dockerfile.cpu) on real Caffe and on the
engine, the GPU image (docker/Dockerfile.gpu) on the engine on the CPU, which also shows that
its PyTorch is a CUDA build (no GPU here).

The builds are cached by content: the first run compiles Caffe in the CPU image (about 15
minutes on two cores) and installs the GPU image's 6 GB of PyTorch (about 7), a change to
mpicaffe's source rebuilds their last layers (about 6 and 3 minutes), and an unchanged tree
finds both images by their tags in seconds. Needs root and buildah (scripts/test.sh installs
buildah and debootstrap with apt-get); skipped, saying why, without them.
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
        m = re.fullmatch(re.escape(CONTAINER_PREFIX) + r"(?:[a-z]+-)?(\d+)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run(BUILDAH + ["rm", name], 120)


def run_in(container: str, script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a bash script inside the working container, in the image's working directory."""
    return _run(BUILDAH + ["run", "--isolation", "chroot", container, "--", "bash", "-c", script],
                timeout, merge=True)


def _lenet_container(target: str):
    """A working container of the freshly built (or cached) image of `target` (cpu or gpu), with
    the MNIST subset converted and a short copy of LeNet's solver (ITERS iterations, tested at
    the end); removed afterwards."""
    build = _run([BUILD_SCRIPT, target], timeout=3600)
    assert build.returncode == 0, f"scripts/build_images.sh {target} failed:\n{build.stdout}\n{build.stderr}"
    image = _run([BUILD_SCRIPT, target, "--print-tag"], 60).stdout.strip()
    _remove_stale_containers()
    name = f"{CONTAINER_PREFIX}{target}-{os.getpid()}"
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


@pytest.fixture(scope="module")
def cpu_container():
    yield from _lenet_container("cpu")


@pytest.fixture(scope="module")
def gpu_container():
    yield from _lenet_container("gpu")


def assert_lenet_trained(log: str, banner: str) -> None:
    """The log of a short LeNet run on 2 ranks ends with the test phase after the last iteration,
    and the net has learnt (chance is 0.1)."""
    assert "Training on 2 rank(s) (MPI): global batch 128" in log, log
    assert banner in log, log
    last_test = log.find(f"Iteration {ITERS}, Testing net (#0)")
    assert last_test >= 0, log
    accuracy = re.search(r"Test net output #0: accuracy = ([0-9.]+)", log[last_test:])
    assert accuracy and float(accuracy.group(1)) > 0.5, log
    assert "Optimization Done." in log[last_test:], log


TRAIN = "mpirun -np 2 --oversubscribe mpicaffe train --solver /tmp/lenet_short_solver.prototxt"


@pytest.mark.parametrize("backend, banner", [
    ("engine", "Backend: the built-in engine"),
    ("caffe", "Backend: real Caffe (pycaffe)"),
])
def test_lenet_trains_on_two_ranks_inside_the_cpu_image(cpu_container, backend, banner):
    result = run_in(cpu_container, f"{TRAIN} --backend {backend}", timeout=600)
    assert result.returncode == 0, result.stdout
    assert_lenet_trained(result.stdout, banner)


def test_gpu_image_holds_a_cuda_build_of_pytorch(gpu_container):
    result = run_in(gpu_container, "python -c 'import torch; print(torch.version.cuda)'", timeout=300)
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(r"\d+\.\d+", result.stdout.strip().splitlines()[-1]), result.stdout


def test_lenet_trains_on_two_ranks_inside_the_gpu_image_on_the_cpu(gpu_container):
    result = run_in(gpu_container, f"{TRAIN} --backend engine", timeout=600)
    assert result.returncode == 0, result.stdout
    assert_lenet_trained(result.stdout, "Backend: the built-in engine")
