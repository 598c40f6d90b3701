"""`mpicaffe python SCRIPT [ARGS]` (or `python -m mpicaffe.run SCRIPT [ARGS]`): run an unmodified
pycaffe script on mpicaffe's API.

The script's `import caffe` (and `caffe.io`, `caffe.proto.caffe_pb2`, `from caffe import layers
as L`, ...) resolves to `mpicaffe.caffe`, even where real pycaffe is installed. The script runs as
`python SCRIPT ARGS` would run it: as `__main__`, with `sys.argv` = [SCRIPT, *ARGS] and its
folder first on `sys.path`.

Under `mpirun -np N`, its solvers train data-parallel (mpicaffe.caffe.distributed), rank 0
alone prints (the others' stdout is discarded, their warnings and errors still show) and writes
snapshots; an exception on any rank prints its traceback (mpicaffe's refusals: one line naming
the script's line) and stops every rank.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys
import traceback

from mpicaffe.errors import UserError


class CaffeAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `caffe` and `caffe.X` to `mpicaffe.caffe` and `mpicaffe.caffe.X`."""

    def find_spec(self, name, path, target=None):
        if name == "caffe" or name.startswith("caffe."):
            target_name = "mpicaffe." + name
            if importlib.util.find_spec(target_name) is None:
                return None
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("mpicaffe." + spec.name)

    def exec_module(self, module) -> None:
        """Already executed when imported under its own name."""


def alias_caffe() -> None:
    """From now on `import caffe` gives mpicaffe.caffe (first among the import finders)."""
    if not any(isinstance(f, CaffeAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, CaffeAlias())
    for name in [n for n in sys.modules if n == "caffe" or n.startswith("caffe.")]:
        del sys.modules[name]  # a real pycaffe imported earlier must not be the one the script gets


def run_script(script: str, args: list[str], verbose: bool = False) -> int:
    """Run `script` with `args` as described above; returns the exit status."""
    from mpicaffe.logs import setup_logging
    from mpicaffe.parallel.comm import create_communicator

    if not os.path.isfile(script):
        raise UserError(f"{script}: no such script")
    comm = create_communicator()
    setup_logging(verbose, quiet=comm.rank != 0)
    from mpicaffe.caffe import distributed

    distributed.enable(comm)
    alias_caffe()
    if comm.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code and comm.size > 1:
            comm.abort(code)
        return code
    except UserError as e:  # a refusal, as Caffe's CHECKs: the message and the script's line
        lines = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == os.path.abspath(script)]
        where = f" (at {lines[-1]})" if lines else ""
        print(f"mpicaffe python: error: {e}{where}", file=sys.stderr)
        return _failed(comm, script)
    except BaseException:  # noqa: BLE001 (any failure of the script must stop every rank)
        traceback.print_exc()
        return _failed(comm, script)
    finally:
        sys.stdout.flush()
    return 0


def _failed(comm, script: str) -> int:
    """After the script raised on this rank: stop every rank (they may wait in a collective)."""
    if comm.size > 1:
        print(f"mpicaffe python: rank {comm.rank}: {script} failed; stopping every rank", file=sys.stderr)
        comm.abort(1)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mpicaffe.run SCRIPT [ARGS...]\n\n" + __doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if argv else 2
    try:
        return run_script(argv[0], argv[1:])
    except UserError as e:
        print(f"mpicaffe python: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
