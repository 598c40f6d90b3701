"""Console logging in glog's line format, which Caffe's log parsers and plotters read.

A line looks like `I1129 01:50:19.123456  4242 trainer.py:120] Iteration 100, loss = 0.25`.
"""
from __future__ import annotations

import logging
import os
import sys
import time

_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                 logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """Format records as glog does: severity letter, date, time with microseconds, pid, file:line."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1e6)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        prefix = (f"{letter}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
                  f".{micros:06d} {record.process:5d} {os.path.basename(record.pathname)}:{record.lineno}] ")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def setup_logging(verbose: bool = False, stream=None, quiet: bool = False) -> None:
    """Send the package's log records to stderr (as glog does) in glog's format; `quiet` keeps
    only warnings and errors (ranks other than 0)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    root = logging.getLogger("mpicaffe")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
