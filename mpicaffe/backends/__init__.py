"""Backends: one solver interface over the built-in engine and over real Caffe (pycaffe).

Both expose what pycaffe's Solver exposes, which is all the trainer uses:

    solver.iter                      current iteration
    solver.param                     the SolverParameter in force
    solver.net, solver.test_nets     nets with .blobs / .params (numpy .data / .diff) and .outputs
    solver.step(n)                   Caffe's Solver::Step
    solver.add_callback(on_start, on_gradients_ready)
    solver.apply_update()            Caffe's ApplyUpdate (no iter increment)
    solver.snapshot()                write <prefix>_iter_<N>.caffemodel/.solverstate
    solver.restore(path)             resume from a .solverstate(.h5)

`create_solver` picks the backend: "engine", "caffe", or "auto" (real Caffe when importable,
else the engine) and logs which one it picked.
"""
from __future__ import annotations

import importlib.util
import logging

from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "engine", "caffe")


def caffe_available() -> bool:
    """True when pycaffe (`import caffe`) can be found."""
    return importlib.util.find_spec("caffe") is not None


def resolve_backend(name: str) -> str:
    """'auto' -> 'caffe' when pycaffe is importable, else 'engine'; others checked and returned."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        chosen = "caffe" if caffe_available() else "engine"
        why = "pycaffe is importable" if chosen == "caffe" else "pycaffe is not importable"
        log.info("Backend auto: using %s (%s)", "real Caffe" if chosen == "caffe" else "the built-in engine", why)
        return chosen
    if name == "caffe" and not caffe_available():
        raise UserError("--backend caffe: pycaffe is not importable; run scripts/install_caffe.sh "
                        "in this virtual environment, or use --backend engine")
    return name
