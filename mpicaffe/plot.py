"""`mpicaffe plot`: learning curves from Caffe-format logs and `--metrics` files, and per-rank time
breakdowns from `--metrics` files, drawn with matplotlib's Agg canvas (no window, no torch).

A log is whatever `mpicaffe train` or real Caffe's `caffe train` wrote to stderr: glog lines in
the classic (`I1205 21:47:31.681437 ...`) or year-prefixed (`I20261205 21:47:31.681437 ...`) form,
also when mpirun's `--tag-output` prefixed them (`[1,0]<stderr>:`; other ranks' lines are left
out). The lines read are Caffe's own, as its tools/extra/parse_log.py reads them:

    Iteration 100 (312.5 iter/s, 0.32s/100 iters), loss = 0.2     -> train loss (the displayed one)
    Iteration 100, Testing net (#0)                               -> test outputs that follow
        Test net output #0: accuracy = 0.97                       -> test accuracy
    Iteration 100, lr = 0.01                                      -> lr

Seconds count from the `Solving ...` line (else the first timestamped line), as Caffe's
extract_seconds.py counts them; in a metrics file they are the summed iteration times, so test
phases and start-up are left out.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mpicaffe.errors import UserError

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_TAG = re.compile(r"^\[\d+,(\d+)\]<std(?:out|err)>: ?")
# glog: severity, [year]month day, time, thread id, file:line]
_GLOG = re.compile(r"^[IWEF](\d{4})?(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6})\s+\d+ [^\]]*\] ?")
_TRAIN_LOSS = re.compile(rf"Iteration (\d+)(?: \([^)]*\))?, loss = {_NUMBER}")
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_TEST_OUTPUT = re.compile(rf"Test net output #\d+: (\S+) = {_NUMBER}")
_LR = re.compile(rf"Iteration (\d+), lr = {_NUMBER}")

# --breakdown's categories: (label, metrics field); the four add up to the iteration's time
CATEGORIES = (("compute", "compute"), ("data wait", "data_wait"), ("communication", "communication"),
              ("update", "update"))
X_AXES = ("iterations", "seconds")


@dataclass
class Series:
    """One curve: values by iteration, with seconds since the start of training where known."""

    iterations: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seconds: list[float | None] = field(default_factory=list)

    def add(self, iteration: int, value: float, seconds: float | None) -> None:
        self.iterations.append(iteration)
        self.values.append(value)
        self.seconds.append(seconds)


@dataclass
class Run:
    """One file's curves under its label: series by name (`train loss`, `test accuracy`, `lr`)."""

    label: str
    path: str
    series: dict[str, Series]


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _clock(match: re.Match, year: int) -> datetime.datetime:
    _, month, day, hour, minute, second, micros = match.groups()
    return datetime.datetime(year, int(month), int(day), int(hour), int(minute), int(second), int(micros))


def parse_log(path: str) -> dict[str, Series]:
    """The curves of a Caffe-format training log: `train loss`, `test <output>` for test net #0
    (`test#<k> <output>` for net #k) and `lr`, in the order they first appear; only the series the
    log printed are there. Seconds are None where a line carries no glog prefix."""
    points: list[tuple[str, int, float, datetime.datetime | None]] = []
    start = previous = None
    year = 2000  # a leap year, so Feb 29 of a year-less log parses; only differences matter
    test_iter, test_net = None, 0
    for line in _read_lines(path):
        tag = _TAG.match(line)
        if tag:
            if tag.group(1) != "0":
                continue
            line = line[tag.end():]
        clock = None
        stamp = _GLOG.match(line)
        if stamp:
            if stamp.group(1):
                year = int(stamp.group(1))
            clock = _clock(stamp, year)
            if previous is not None and not stamp.group(1) and clock < previous - datetime.timedelta(days=1):
                year += 1  # a year-less log that ran past New Year
                clock = _clock(stamp, year)
            previous = clock
            line = line[stamp.end():]
            if start is None or line.startswith("Solving "):
                start = clock
        if m := _TESTING.search(line):
            test_iter, test_net = int(m.group(1)), int(m.group(2))
        elif (m := _TEST_OUTPUT.search(line)) and test_iter is not None:
            name = f"test {m.group(1)}" if test_net == 0 else f"test#{test_net} {m.group(1)}"
            points.append((name, test_iter, float(m.group(2)), clock))
        elif m := _TRAIN_LOSS.search(line):
            points.append(("train loss", int(m.group(1)), float(m.group(2)), clock))
        elif m := _LR.search(line):
            points.append(("lr", int(m.group(1)), float(m.group(2)), clock))
    series: dict[str, Series] = {}
    for name, iteration, value, clock in points:
        seconds = None if clock is None else (clock - start).total_seconds()
        series.setdefault(name, Series()).add(iteration, value, seconds)
    return series


def _metrics_records(path: str) -> list[dict]:
    lines = [(n, line) for n, line in enumerate(_read_lines(path), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "iteration" not in record:
                raise ValueError
        except ValueError:
            if i == len(lines) - 1 and records:
                break  # a run killed while writing its last line
            raise UserError(f"{path}:{n}: not a line of `mpicaffe train --metrics` (JSON with an "
                            f"iteration)") from None
        records.append(record)
    return records


def _latest_per_iteration(records: list[dict]) -> list[dict]:
    """The last record of each iteration, in iteration order: a resumed or repeated run appends
    to the same file, and its later lines replace the earlier ones."""
    by_iteration = {}
    for record in records:
        by_iteration[record["iteration"]] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def parse_metrics(path: str) -> dict[str, Series]:
    """The curves of a `--metrics` file (one rank's): `train loss` (each iteration's loss, not
    smoothed) and `lr`; seconds are the iteration times summed."""
    series: dict[str, Series] = {}
    elapsed = 0.0
    for record in _latest_per_iteration(_metrics_records(path)):
        elapsed += float(record.get("time", 0.0))
        for name, key in (("train loss", "loss"), ("lr", "lr")):
            if key in record:
                series.setdefault(name, Series()).add(int(record["iteration"]), float(record[key]), elapsed)
    return series


def time_breakdown(path: str) -> dict[int, dict[str, float]]:
    """Mean milliseconds per iteration in each of CATEGORIES, by rank, from a `--metrics` file."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for record in _latest_per_iteration(_metrics_records(path)):
        missing = [key for _, key in CATEGORIES if key not in record]
        if missing:
            raise UserError(f"{path}: metrics lines lack {', '.join(missing)} (written by an older mpicaffe?)")
        rank = int(record.get("rank", 0))
        totals = sums.setdefault(rank, dict.fromkeys((label for label, _ in CATEGORIES), 0.0))
        for label, key in CATEGORIES:
            totals[label] += float(record[key]) * 1e3
        counts[rank] = counts.get(rank, 0) + 1
    return {rank: {label: total / counts[rank] for label, total in sums[rank].items()} for rank in sorted(sums)}


def is_metrics_file(path: str) -> bool:
    """Whether a file is a `--metrics` file (its first line a JSON object) rather than a log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.lstrip().startswith("{")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return False


def default_labels(paths: Sequence[str]) -> list[str]:
    """Each file's name; the path as given where two files share a name."""
    names = [os.path.basename(p) for p in paths]
    return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def _figure(height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError(f"plotting needs matplotlib ({e}): pip install 'mpicaffe[plot]'") from None

    figure = Figure(figsize=(8, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, never a window: no pyplot, no display needed
    return figure


def draw(runs: Sequence[Run], x: str = "iterations"):
    """A matplotlib Figure with one panel per series name (train loss, each test output, lr, in
    order of first appearance) and, in each panel, one line per run that has it, labelled with the
    run's label and drawn in the run's colour in every panel."""
    names: list[str] = []
    for run in runs:
        names += [name for name in run.series if name not in names]
    names.sort(key=lambda name: (name != "train loss", name == "lr"))
    figure = _figure(max(3.0, 2.2 * len(names) + 0.6))
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        for i, run in enumerate(runs):
            s = run.series.get(name)
            if s is None:
                continue
            xs = s.iterations if x == "iterations" else s.seconds
            marker = "o" if len(s.values) < 30 else None
            ax.plot(xs, s.values, color=f"C{i}", label=run.label, marker=marker, markersize=3)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration" if x == "iterations" else "seconds")
    axes[0].legend(loc="best", fontsize="small")
    return figure


def draw_breakdown(bars: Sequence[tuple[str, dict[str, float]]]):
    """A matplotlib Figure of stacked bars, one per (name, mean ms per category) given, one
    colour per category of CATEGORIES."""
    figure = _figure(4.5)
    ax = figure.subplots()
    positions = range(len(bars))
    bottom = [0.0] * len(bars)
    for c, (label, _) in enumerate(CATEGORIES):
        heights = [ms[label] for _, ms in bars]
        ax.bar(positions, heights, bottom=bottom, color=f"C{c}", label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(list(positions), [name for name, _ in bars])
    ax.set_ylabel("mean ms per iteration")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the bars, never on them
    return figure


def save(figure, output: str) -> None:
    """Write the figure; the format is the output's extension."""
    ext = os.path.splitext(output)[1].lstrip(".").lower()
    supported = figure.canvas.get_supported_filetypes()
    if ext not in supported:
        raise UserError(f"cannot write {output}: give an image file ending in "
                        f"{', '.join('.' + e for e in sorted(supported))}")
    try:
        figure.savefig(output)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None


def plot_files(paths: Sequence[str], output: str, labels: Sequence[str] = (), x: str = "iterations",
               breakdown: bool = False):
    """What `mpicaffe plot` does: read every file (a log or a metrics file, told apart by its
    content), draw learning curves (or, with `breakdown`, the per-rank time breakdown of metrics
    files) and write them to `output`. Returns the figure; raises UserError naming the file at fault."""
    if labels and len(labels) != len(paths):
        raise UserError(f"give one --label per file: {len(labels)} label(s) for {len(paths)} file(s)")
    if x not in X_AXES:
        raise UserError(f"--x is one of {', '.join(X_AXES)} (got {x!r})")
    labels = list(labels) or default_labels(paths)
    if breakdown:
        ranks = []
        for path, label in zip(paths, labels):
            if not is_metrics_file(path):
                raise UserError(f"{path} is not a metrics file: --breakdown reads the files of "
                                "`mpicaffe train --metrics FILE`")
            found = time_breakdown(path)
            if not found:
                raise UserError(f"{path}: no iterations to plot")
            ranks += [(label, rank, ms) for rank, ms in found.items()]
        several_runs = len({rank for _, rank, _ in ranks}) < len(ranks)
        bars = [(f"{label}\nrank {rank}" if several_runs else f"rank {rank}", ms) for label, rank, ms in ranks]
        figure = draw_breakdown(bars)
    else:
        runs = []
        for path, label in zip(paths, labels):
            series = parse_metrics(path) if is_metrics_file(path) else parse_log(path)
            if not series:
                raise UserError(f"{path}: nothing to plot (no `Iteration N ..., loss = `, `Test net output` "
                                "or `lr = ` lines of a Caffe log, nor metrics lines)")
            if x == "seconds" and any(s is None for v in series.values() for s in v.seconds):
                raise UserError(f"{path}: its lines carry no glog timestamps: plot it with --x iterations")
            runs.append(Run(label, path, series))
        figure = draw(runs, x)
    save(figure, output)
    return figure
