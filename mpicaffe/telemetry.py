"""Per-rank training telemetry: a JSON-lines metrics file, a Chrome-trace timeline, a progress bar.

Per iteration: total seconds, data wait (time the data layers waited for prefetched batches),
forward and backward compute, communication (gradient allreduce: launching buckets during
backward plus waiting after it), and the rest (the update). With overlap, communication happens
during backward, so the timeline draws the phases end to end in the order they start; durations
are exact, positions inside backward are not. The timeline covers the first and last K iterations.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

from mpicaffe import logs, progress


class Telemetry:
    """Collects what each iteration spent where, for one rank."""

    def __init__(self, rank: int, metrics_path: str | None, timeline_path: str | None,
                 timeline_iters: int, max_iter: int):
        self.rank = rank
        # kept open for the whole run (one line per iteration); closed by close()
        self.metrics = open(_per_rank(metrics_path, rank), "a") if metrics_path else None  # noqa: SIM115
        self.timeline_path = _per_rank(timeline_path, rank) if timeline_path else None
        self.events: list[dict] = []
        self.timeline_iters = timeline_iters
        self.max_iter = max_iter
        self.origin = time.perf_counter()
        self.bar_stream = progress.bar_stream() if rank == 0 else None
        self.bar = None  # made at the first iteration (it starts where the run resumed)
        self._start = 0.0
        self._before: dict = {}
        self._first_iter: int | None = None

    def _traced(self, it: int) -> bool:
        if self.timeline_path is None:
            return False
        if self._first_iter is None:
            self._first_iter = it
        return it < self._first_iter + self.timeline_iters or it >= self.max_iter - self.timeline_iters

    def _event(self, name: str, start: float, seconds: float, it: int) -> None:
        self.events.append({"name": name, "ph": "X", "pid": self.rank, "tid": 0, "ts": (start - self.origin) * 1e6,
                            "dur": seconds * 1e6, "args": {"iteration": it}})

    def begin_iteration(self, it: int, timed, reducer) -> None:
        """`timed.timings` holds the seconds so far in data wait, forward (data wait included) and
        backward (an engine net, or a backend adapter); `reducer.seconds` those in communication."""
        self._start = time.perf_counter()
        self._before = dict(timed.timings, comm=reducer.seconds)

    def end_iteration(self, it: int, timed, reducer, loss: float, lr: float) -> None:
        total = time.perf_counter() - self._start
        b = self._before
        timings = timed.timings
        data = timings["data"] - b["data"]
        forward = timings["forward"] - b["forward"] - data
        backward = timings["backward"] - b["backward"]
        comm = reducer.seconds - b["comm"]
        update = max(0.0, total - data - forward - backward - comm)
        if self.metrics:
            self.metrics.write(json.dumps({
                "rank": self.rank, "iteration": it, "loss": float(loss), "lr": float(lr), "time": total,
                "data_wait": data, "forward": forward, "backward": backward, "compute": forward + backward,
                "communication": comm, "update": update}) + "\n")
        if self._traced(it):
            t = self._start
            for name, seconds in (("data wait", data), ("forward", forward), ("backward", backward),
                                  ("allreduce", comm), ("update", update)):
                self._event(name, t, seconds, it)
                t += seconds
        if self.bar_stream is not None:
            if self.bar is None:
                self.bar = logs.progress_bar(self.bar_stream, self.max_iter, it)
            self.bar.set_postfix_str(f"loss {float(loss):.4g}", refresh=False)
            self.bar.update(1)

    @contextlib.contextmanager
    def phase(self, name: str, it: int):
        """Time a phase outside the iteration (test, snapshot) into the timeline."""
        start = time.perf_counter()
        yield
        if self.timeline_path is not None:
            self._event(name, start, time.perf_counter() - start, it)

    def close(self) -> None:
        if self.bar is not None:
            logs.close_progress_bar(self.bar)
            self.bar = None
        if self.metrics:
            self.metrics.close()
        if self.timeline_path is not None:
            with open(self.timeline_path, "w") as f:
                json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)


def _per_rank(path: str, rank: int) -> str:
    """`{rank}` in the path is replaced by the rank; otherwise ranks > 0 get `.rank<N>` appended."""
    if "{rank}" in path:
        return path.replace("{rank}", str(rank))
    if rank == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"
