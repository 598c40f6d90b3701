"""Prints the worst engine-vs-Caffe error of each zoo parity case at the end of the run."""
from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    module = sys.modules.get("tests.zoo.test_zoo_parity")
    worst = getattr(module, "WORST", None)
    if not worst:
        return
    terminalreporter.section("zoo parity: worst error (relative to the blob's max magnitude)")
    for case, (err, what, tol) in worst.items():
        terminalreporter.write_line(f"{case:36s} {err:9.2e} of {tol:7.0e}  {what}")
