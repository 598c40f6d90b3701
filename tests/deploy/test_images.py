"""The container images, built by scripts/build_images.sh, train the bundled LeNet under
`mpirun -np 2` inside: the CPU image (docker/Dockerfile.cpu, buildah) on real Caffe and on the
engine; the GPU image (docker/Dockerfile.gpu) on the engine on the CPU, after showing that its
PyTorch is a CUDA build (there is no GPU here); the Apptainer image (docker/mpicaffe.def, built
from the CPU image) on real Caffe, run with `apptainer exec`.

The builds are cached by content: the first run compiles Caffe in the CPU image (about 20
minutes on two cores), installs the GPU image's 6 GB of PyTorch (about 5) and makes the Debian
sid root that runs Apptainer here (about 1); a change to mpicaffe's source rebuilds the images'
last layers and the SIF (about 2.5, 2 and 2 minutes); with nothing to rebuild the module takes
about 1.5 minutes.
Needs root, buildah and debootstrap (scripts/test.sh installs them with apt-get); skipped,
saying why, without them.
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


# outside CI a machine without the tools skips these tests; in CI, where scripts/test.sh installs
# them, their absence fails every test here (as tests/real_caffe.py does for Caffe)
if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _skip_reason() is not None:
    pytestmark = pytest.mark.usefixtures("_fail_without_tools")
else:
    pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture
def _fail_without_tools():
    pytest.fail(f"the container tools are required in CI: {_skip_reason()}")


def _run(argv: list[str], timeout: float, merge: bool = False,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; with `merge`, stderr goes into stdout in order."""
    return subprocess.run(argv, check=False, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                          env=None if env is None else {**os.environ, **env})


def _remove_stale_containers() -> None:
    """Remove working containers left by test runs that were killed (each holds a full rootfs)."""
    names = _run(BUILDAH + ["containers", "--format", "{{.ContainerName}}"], 60).stdout.split()
    for name in names:
        m = re.fullmatch(re.escape(CONTAINER_PREFIX) + r"(?:[a-z]+-)?(\d+)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run(BUILDAH + ["rm", name], 120)


# buildah re-executes itself from a sealed in-memory copy of its binary before it runs anything;
# the kernel can refuse the seal for a moment (EBUSY while a page of the copy is still held
# elsewhere), and buildah then exits 1 having run nothing, so such a failure is safe to retry.
REEXEC_FAILED = "sealing memfd copy"


def run_in(container: str, script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a bash script inside the working container, in the image's working directory."""
    argv = BUILDAH + ["run", "--isolation", "chroot", container, "--", "bash", "-c", script]
    for _ in range(3):
        result = _run(argv, timeout, merge=True)
        if result.returncode == 0 or REEXEC_FAILED not in result.stdout.partition("\n")[0]:
            break
    return result


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


@pytest.fixture(scope="module")
def cpu_sif(cpu_container):
    """build/images/mpicaffe-cpu.sif, made by `apptainer build` of docker/mpicaffe.def from the CPU
    image (cached since cpu_container; lz4: a minute instead of four for gzip); cached by its inputs."""
    build = _run([BUILD_SCRIPT, "cpu", "apptainer"], timeout=3600, env={"MPICAFFE_SIF_COMPRESSION": "lz4"})
    assert build.returncode == 0, f"scripts/build_images.sh cpu apptainer failed:\n{build.stdout}\n{build.stderr}"
    return "mpicaffe-cpu.sif"


def test_lenet_trains_on_two_ranks_inside_the_apptainer_image(cpu_sif):
    # Apptainer starts in the caller's folder (a fresh one here), which gets a link to the image's
    # models; mpicaffe makes the snapshot folder, which real Caffe would not.
    script = f"""set -euo pipefail
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        cd "$work"
        ln -s /opt/mpicaffe/prototxt prototxt
        mpicaffe convert mnist --out data/mnist
        sed -e 's/^max_iter:.*/max_iter: {ITERS}/' -e 's/^test_interval:.*/test_interval: {ITERS}/' \\
            -e 's/^display:.*/display: 20/' -e 's/^snapshot:.*/snapshot: 0/' \\
            prototxt/lenet/lenet_solver.prototxt >lenet_short_solver.prototxt
        mpirun -np 2 --oversubscribe mpicaffe train --solver lenet_short_solver.prototxt --backend caffe
        """
    result = _run([BUILD_SCRIPT, "--apptainer", "exec", cpu_sif, "bash", "-c", script], timeout=600, merge=True)
    assert result.returncode == 0, result.stdout
    assert_lenet_trained(result.stdout, "Backend: real Caffe (pycaffe)")
