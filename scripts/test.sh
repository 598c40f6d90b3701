#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, unit tests, real `mpirun` tests, and
# parity tests against real Caffe (built from source on the first run, about 5 minutes).
# Extra arguments go to pytest (e.g. scripts/test.sh -k prototxt).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
. .venv/bin/activate
# real BVLC Caffe, the reference for parity tests (cached: a rerun takes seconds)
./scripts/install_caffe.sh
# buildah and debootstrap for tests/deploy, which build the container images (cached by content)
./scripts/setup_containers.sh
# a one-node Slurm for the test of `mpicaffe launch --launcher srun` (tests/fault/test_launch_hosts.py)
./scripts/setup_slurm.sh
ruff check mpicaffe tests scripts
# the architecture contracts in pyproject.toml (no import cycles, mpi4py only in mpicaffe.parallel, ...)
lint-imports
python -m pytest -ra "$@" tests
