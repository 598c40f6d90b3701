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


# glog's severities by number (GLOG_minloglevel, -minloglevel), and its log file names
_GLOG_LEVELS = (logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
_GLOG_FILES = (("INFO", logging.DEBUG), ("WARNING", logging.WARNING), ("ERROR", logging.ERROR))
_file_handlers: dict[tuple[str, str], logging.Handler] = {}


class GlogFileHandler(logging.Handler):
    """glog's log file for one severity and up, made at the first record that reaches it:
    `DIR/PROGRAM.HOST.USER.log.SEVERITY.YYYYMMDD-HHMMSS.PID`, with the link `DIR/PROGRAM.SEVERITY`
    pointing at the newest (as `caffe` leaves `caffe.INFO`)."""

    def __init__(self, log_dir: str, severity: str, level: int, program: str = "mpicaffe"):
        super().__init__(level)
        self.log_dir, self.severity, self.program = log_dir, severity, program
        self.stream = None
        self.failed = False
        self.setFormatter(GlogFormatter())

    def _open(self):
        import getpass
        import socket

        now = time.localtime()
        host = socket.gethostname()
        name = (f"{self.program}.{host}.{getpass.getuser()}.log.{self.severity}."
                f"{time.strftime('%Y%m%d-%H%M%S', now)}.{os.getpid()}")
        path = os.path.join(self.log_dir, name)
        stream = open(path, "a")  # noqa: SIM115 (kept open: the log of the whole run)
        stream.write(f"Log file created at: {time.strftime('%Y/%m/%d %H:%M:%S', now)}\n"
                     f"Running on machine: {host}\n"
                     "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n")
        link = os.path.join(self.log_dir, f"{self.program}.{self.severity}")
        try:
            if os.path.islink(link):
                os.remove(link)
            os.symlink(name, link)
        except OSError:
            pass  # glog too goes on without its link
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except OSError as e:  # said once; stderr still gets every line
            self.failed = True
            print(f"mpicaffe: cannot write glog's {self.severity} log file in {self.log_dir}: {e}", file=sys.stderr)


class _BarAwareHandler(logging.StreamHandler):
    """Console lines that print above a progress bar (tqdm's write clears and redraws it), and
    onto the bar's stream while one is drawn, so that they never interleave with it."""

    bar = None

    def emit(self, record: logging.LogRecord) -> None:
        bar = _BarAwareHandler.bar
        if bar is None:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=bar.fp)
        except Exception:  # noqa: BLE001 (logging's own rule: a log line never raises)
            self.handleError(record)


def progress_bar(stream, total: int, start: int):
    """A progress bar on `stream` (rate and time left, as tqdm draws them) from iteration `start`
    of `total`; console log lines print above it until `close_progress_bar`."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, file=stream, unit="iter", dynamic_ncols=True, mininterval=0.2,
               smoothing=0.1, leave=True)
    _BarAwareHandler.bar = bar
    return bar


def close_progress_bar(bar) -> None:
    _BarAwareHandler.bar = None
    bar.close()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "y", "t")


def setup_logging(verbose: bool = False, stream=None, quiet: bool = False, minloglevel: int | None = None,
                  log_dir: str | None = None, logtostderr: bool | None = None) -> None:
    """Send the package's log records to stderr (as glog does) in glog's format; `quiet` keeps
    only warnings and errors (ranks other than 0).

    As glog under `caffe`: nothing below `minloglevel` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL;
    default GLOG_minloglevel) is logged; with `log_dir` (default GLOG_log_dir) the records also
    go to glog's INFO, WARNING and ERROR files there, unless `logtostderr` (GLOG_logtostderr)."""
    if minloglevel is None:
        try:
            minloglevel = int(os.environ.get("GLOG_minloglevel", "0"))
        except ValueError:
            minloglevel = 0
    log_dir = log_dir if log_dir is not None else os.environ.get("GLOG_log_dir", "")
    logtostderr = logtostderr if logtostderr is not None else _env_flag("GLOG_logtostderr")
    handler = _BarAwareHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    handlers: list[logging.Handler] = [handler]
    if log_dir and not logtostderr:
        for severity, level in _GLOG_FILES:
            key = (os.path.abspath(log_dir), severity)
            if key not in _file_handlers:  # one file per severity for the whole process
                _file_handlers[key] = GlogFileHandler(log_dir, severity, level)
            handlers.append(_file_handlers[key])
    root = logging.getLogger("mpicaffe")
    root.handlers[:] = handlers
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    root.setLevel(max(level, _GLOG_LEVELS[min(max(minloglevel, 0), 3)]))
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
