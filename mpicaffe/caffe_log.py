"""Caffe's log lines, in one place for the engine's solver and the trainer (both backends):
numbers as C++'s ostream prints them, the per-output lines, and the smoothed loss."""
from __future__ import annotations

import numpy as np

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
