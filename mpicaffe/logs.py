"""Caffe's log, in one place: console logging in glog's line format, which Caffe's log parsers and
plotters read, and the contents of Caffe's lines (numbers as its ostream prints them, the
per-output lines, the smoothed loss), used by the engine's solver and the trainer (both backends).

A line looks like `I1129 01:50:19.123456  4242 trainer.py:120] Iteration 100, loss = 0.25`.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

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


_f32 = np.float32


def format_float(x) -> str:
    """A number as C++'s default ostream prints it (6 significant digits)."""
    return f"{float(x):.6g}"


def output_lines(kind: str, names: list[str], values, loss_weights: list[float]) -> list[str]:
    """Caffe's per-output lines, e.g. `    Test net output #0: loss = 0.25 (* 1 = 0.25 loss)`.

    `kind` is "Train" or "Test"; one entry per output element, with its blob's name and loss weight.
    """
    lines = []
    for i, (name, v, w) in enumerate(zip(names, values, loss_weights)):
        v = _f32(v)
        extra = f" (* {format_float(w)} = {format_float(_f32(w) * v)} loss)" if w else ""
        lines.append(f"    {kind} net output #{i}: {name} = {format_float(v)}{extra}")
    return lines


class SmoothedLoss:
    """Caffe's Solver::UpdateSmoothedLoss: the mean of the last `window` (average_loss) losses,
    updated in float32 as Caffe holds it (a running sum corrected by the loss that leaves the
    window, so its rounding is Caffe's, not a fresh mean's)."""

    def __init__(self, window: int):
        self.window = max(1, window)
        self.value = _f32(0)
        self._losses: list[np.float32] = []
        self._oldest = 0  # where the next loss goes once the window is full

    def add(self, loss) -> np.float32:
        loss = _f32(loss)
        if len(self._losses) < self.window:
            self._losses.append(loss)
            n = _f32(len(self._losses))
            self.value = _f32((self.value * (n - 1) + loss) / n)
        else:
            i = self._oldest
            self.value = _f32(self.value + (loss - self._losses[i]) / _f32(self.window))
            self._losses[i] = loss
            self._oldest = (i + 1) % self.window
        return self.value
