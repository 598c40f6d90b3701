"""Finding real BVLC Caffe (built by scripts/install_caffe.sh) from tests.

Outside CI a missing Caffe skips the test with a reason; in CI (CI=true), where .ci/run builds
Caffe first, a missing Caffe fails the test instead, so parity tests cannot silently skip there.
"""
from __future__ import annotations

import importlib
import os
import shutil

import pytest


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real Caffe is required in CI: {reason}")
    pytest.skip(reason)


def caffe_tool(name: str) -> str:
    """Path of a Caffe command-line tool (caffe, upgrade_net_proto_text, ...), or skip/fail."""
    caffe = shutil.which("caffe")
    if caffe is None:
        _missing("the caffe binary is not on PATH (run scripts/install_caffe.sh)")
    path = os.path.join(os.path.dirname(os.path.realpath(caffe)), name)
    if not os.access(path, os.X_OK):
        _missing(f"Caffe's {name} is not installed next to {os.path.realpath(caffe)}")
    return path


def caffe_python_script(name: str) -> str:
    """Path of one of the scripts Caffe installs in <prefix>/python (classify.py, draw_net.py, ...)."""
    caffe = shutil.which("caffe")
    if caffe is None:
        _missing("the caffe binary is not on PATH (run scripts/install_caffe.sh)")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(caffe))), "python", name)
    if not os.path.isfile(path):
        _missing(f"Caffe's python/{name} is not installed ({path})")
    return path


def import_pycaffe():
    """Import pycaffe (`caffe`), or skip/fail. Its glog, which reads GLOG_minloglevel when the
    library loads, logs warnings and errors only (unless the environment says otherwise); the
    variable is not left set, since mpicaffe honours it too and its subprocesses would inherit it."""
    quiet = "GLOG_minloglevel" not in os.environ
    if quiet:
        os.environ["GLOG_minloglevel"] = "2"
    try:
        return importlib.import_module("caffe")
    except ImportError as e:
        _missing(f"pycaffe is not importable (run scripts/install_caffe.sh): {e}")
    finally:
        if quiet:
            del os.environ["GLOG_minloglevel"]
