#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, unit tests, and real `mpirun` tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k prototxt).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
. .venv/bin/activate
ruff check mpicaffe tests scripts
python -m pytest -ra "$@" tests
