#!/usr/bin/env python
"""Recovery from rank failures on the bundled LeNet, one function per fault-tolerance mode:

- ulfm (`bench_ulfm`): `mpirun --with-ft ulfm -np 3 mpicaffe train --fault-tolerance ulfm`;
  once a rank has run `--kill-after` iterations it is frozen (SIGSTOP) and killed (SIGKILL).
  Reported per repetition: kill to detection (the kill's wall-clock time to the first survivor's
  "a rank failed" log line), detection to resume (measured by the trainer: shrink, state sync,
  re-shard), the snapshot of the recovered state it then writes, the iterations redone, and the
  time per iteration before and after (3 ranks, then 2, same global batch).
- launch (`bench_launch`): `mpicaffe launch -np 3 -- train` with a snapshot every
  `--snapshot-every` iterations; rank 1 is killed (SIGKILL) after `--kill-after` iterations.
  Reported per repetition (from the supervisor's `--events` record): kill to detection (mpirun's
  report of the dead rank reaching the supervisor), detection to resume (to the first iteration
  the relaunched job completes: mpirun and Python start-up, reading the snapshot, the data
  shards), and the iterations lost (last iteration completed minus the one resumed from).
- stall (`bench_stall`): the cost of `--stall-timeout` while nothing stalls (time per iteration
  at np=2 with and without it), and the time from SIGSTOP of one rank of 3 to mpirun's exit
  with the stall exit code.

    python scripts/bench/recovery.py [--modes ulfm,stall,launch] [--repeats 3] [--json FILE]

Runs from the repository root, reading data/mnist (written by `mpicaffe convert mnist --out
data/mnist` when missing); solvers and snapshots go to a temporary folder. Times are medians over
the repetitions; every number comes from real mpirun jobs on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENET = "prototxt/lenet/lenet_solver.prototxt"
GLOBAL_BATCH = 192  # 64 per rank on 3 ranks, 96 on 2
_GLOG = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")


# --- shared by the modes ---
def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl=os.environ.get("OMPI_MCA_btl", "self,sm"),
                PRTE_MCA_prte_silence_shared_fs="1")


def write_solver(work: str, max_iter: int) -> str:
    """The bundled LeNet solver with `max_iter`, no test phase, display every 10, snapshots in `work`."""
    from mpicaffe import prototxt

    if not os.path.exists(os.path.join(ROOT, "data/mnist/mnist_train_lmdb")):
        subprocess.run([sys.executable, "-m", "mpicaffe", "convert", "mnist", "--out", "data/mnist"], cwd=ROOT,
                       check=True)
    solver = prototxt.read_solver(os.path.join(ROOT, LENET))
    solver.net = os.path.join(ROOT, solver.net)
    for f in ("test_iter", "test_interval", "test_initialization"):
        solver.ClearField(f)
    solver.max_iter = max_iter
    solver.display = 10
    solver.snapshot = 0
    solver.snapshot_after_train = False
    solver.snapshot_prefix = os.path.join(work, "lenet")
    path = os.path.join(work, f"lenet_solver_{max_iter}.prototxt")
    prototxt.write_text(solver, path)
    return path


class Job:
    """One background `mpirun` in its own session, output to a file."""

    def __init__(self, np: int, train_args: list[str], output: str, mpirun_args: list[str] = ()):
        cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--tag-output", *mpirun_args,
               sys.executable, "-m", "mpicaffe", "train", *train_args]
        self.output = output
        with open(output, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                         start_new_session=True)

    def rank_pid(self, rank: int) -> int:
        marker = f"OMPI_COMM_WORLD_RANK={rank}".encode()
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(entry) != self.proc.pid and os.getsid(int(entry)) == self.proc.pid:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if marker in f.read().split(b"\0"):
                            return int(entry)
            except OSError:
                continue
        raise SystemExit(f"recovery.py: rank {rank} is not running; see {self.output}")

    def wait_lines(self, path: str, count: int, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"recovery.py: the job ended before {path} had {count} lines; see {self.output}")
            if os.path.exists(path):
                with open(path) as f:
                    if sum(1 for _ in f) >= count:
                        return
            time.sleep(0.002)
        raise SystemExit(f"recovery.py: {path} did not reach {count} lines; see {self.output}")

    def finish(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise SystemExit(f"recovery.py: the job did not end in {timeout} s; see {self.output}") from None

    def text(self) -> str:
        with open(self.output, errors="replace") as f:
            return f.read()


def _seconds_of_day(line: str) -> float | None:
    """Time of day of a glog line (`[1,2]<stderr>: W1129 05:27:24.187486 ...`), in seconds."""
    m = _GLOG.match(line.split(">: ", 1)[-1])
    return None if m is None else int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _local_seconds_of_day(t: float) -> float:
    lt = time.localtime(t)
    return lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec + (t % 1)


def _iteration_times(path: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(r["iteration"], r["time"]) for r in map(json.loads, f)]


# --- modes ---
def bench_ulfm(work: str, repeats: int, kill_after: int = 40, after: int = 60, victim: int = 1) -> dict:
    """Kill -9 rank `victim` of 3 after `kill_after` iterations under --fault-tolerance ulfm."""
    solver = write_solver(work, kill_after + after)
    runs = []
    for rep in range(repeats):
        metrics = os.path.join(work, f"ulfm{rep}.jsonl")
        job = Job(3, ["--solver", solver, "--fault-tolerance", "ulfm", "--global-batch", str(GLOBAL_BATCH),
                      "--metrics", metrics], os.path.join(work, f"ulfm{rep}.out"), ["--with-ft", "ulfm"])
        job.wait_lines(metrics if victim == 0 else metrics.replace(".jsonl", f".rank{victim}.jsonl"), kill_after)
        pid = job.rank_pid(victim)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        status = job.finish()
        text = job.text()
        if status != 0:
            raise SystemExit(f"recovery.py: the ulfm job exited {status}; see {job.output}")
        detected = min(t for t in (_seconds_of_day(line) for line in text.splitlines() if "a rank failed" in line)
                       if t is not None)
        rec = re.search(r"detected in the (.*) at iteration (\d+)\): \d+ rank\(s\) go on from iteration (\d+) .*"
                        r"detection to resume (\d+\.\d+) s", text)
        snap = re.search(r"Snapshot of the recovered state at iteration \d+ written in (\d+\.\d+) s", text)
        k = int(rec.group(3))
        survivor = 0 if victim != 0 else 1
        times = _iteration_times(metrics.replace(".jsonl", f".rank{survivor}.jsonl") if survivor else metrics)
        before = [t for i, t in times[:kill_after] if 5 <= i < k]
        after_t = [t for i, t in times[kill_after:] if i >= k + 5]
        runs.append({"kill_to_detection_s": detected - _local_seconds_of_day(killed),
                     "detection_to_resume_s": float(rec.group(4)), "snapshot_s": float(snap.group(1)),
                     "phase": rec.group(1), "iterations_redone": int(rec.group(2)) - k + 1,
                     "iteration_s_np3": statistics.median(before), "iteration_s_np2": statistics.median(after_t)})
        print(f"ulfm run {rep + 1}: {runs[-1]}", flush=True)
    keys = ("kill_to_detection_s", "detection_to_resume_s", "snapshot_s", "iteration_s_np3", "iteration_s_np2")
    return {"runs": runs, **{k: statistics.median(r[k] for r in runs) for k in keys}}


COLLECTIVE_COST = """
import json, sys, time
import numpy as np
from mpicaffe.parallel.comm import MPICommunicator
comm = MPICommunicator()
out = {}
for size in (1, 431080):  # one float; LeNet's gradient
    buf = np.ones(size, np.float32)
    for label in ("off", "on"):
        if label == "on":
            comm.watch_stalls(10)
        comm.barrier()
        start = time.perf_counter()
        for _ in range(N):
            comm.Allreduce_sum(buf)
        out[f"{label} {size}"] = (time.perf_counter() - start) / N
        comm.watch = None
if comm.rank == 0:
    print(json.dumps(out))
"""


def collective_cost(work: str, repeats: int, n: int = 2000) -> dict:
    """Seconds per Allreduce through MPICommunicator at np=2, without and with a stall watch."""
    script = os.path.join(work, "collective_cost.py")
    with open(script, "w") as f:
        f.write(f"N = {n}\n" + COLLECTIVE_COST)
    runs = []
    for _ in range(repeats):
        out = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", sys.executable, script], env=_env(), cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_stall(work: str, repeats: int, iterations: int = 200, timeout: float = 10) -> dict:
    """The cost of a stall watch per collective and per LeNet iteration at np=2; SIGSTOP of one
    rank of 3 to mpirun's exit."""
    per_collective = collective_cost(work, repeats)
    print(f"seconds per Allreduce: {per_collective}", flush=True)
    solver = write_solver(work, iterations)
    cost = {"off": [], "on": []}
    for rep in range(repeats):
        for label, extra in (("off", []), ("on", ["--stall-timeout", str(timeout)])):
            metrics = os.path.join(work, f"stall_{label}{rep}.jsonl")
            job = Job(2, ["--solver", solver, "--global-batch", "128", "--metrics", metrics, *extra],
                      os.path.join(work, f"stall_{label}{rep}.out"))
            if job.finish() != 0:
                raise SystemExit(f"recovery.py: {job.output} failed")
            cost[label].append(statistics.median(t for i, t in _iteration_times(metrics) if i >= 10))
    exits = []
    for rep in range(repeats):
        metrics = os.path.join(work, f"stop{rep}.jsonl")
        job = Job(3, ["--solver", solver, "--stall-timeout", str(timeout), "--metrics", metrics],
                  os.path.join(work, f"stop{rep}.out"))
        job.wait_lines(metrics.replace(".jsonl", ".rank1.jsonl"), 30)
        os.kill(job.rank_pid(1), signal.SIGSTOP)
        stopped = time.monotonic()
        status = job.finish()
        exits.append({"status": status, "stop_to_exit_s": time.monotonic() - stopped})
        print(f"stall run {rep + 1}: {exits[-1]}", flush=True)
    off, on = statistics.median(cost["off"]), statistics.median(cost["on"])
    return {"allreduce_s": per_collective, "iteration_s_without": off, "iteration_s_with": on, "overhead": on / off - 1, "timeout_s": timeout,
            "stop_to_exit_s": statistics.median(e["stop_to_exit_s"] for e in exits), "exits": exits}


def bench_launch(work: str, repeats: int, kill_after: int = 50, snapshot_every: int = 20, after: int = 30,
                 victim: int = 1) -> dict:
    """Kill -9 rank `victim` of 3 after `kill_after` iterations under `mpicaffe launch`."""
    from mpicaffe import prototxt

    runs = []
    for rep in range(repeats):
        solver = write_solver(work, kill_after + after)
        param = prototxt.read_solver(solver)
        param.snapshot = snapshot_every
        param.snapshot_prefix = os.path.join(work, f"launch{rep}")
        prototxt.write_text(param, solver)
        metrics = os.path.join(work, f"launch{rep}.jsonl")
        events = os.path.join(work, f"launch{rep}.events.jsonl")
        output = os.path.join(work, f"launch{rep}.out")
        cmd = [sys.executable, "-m", "mpicaffe", "launch", "-np", "3", "--mpirun-args=--oversubscribe", "--events",
               events, "--", "train", "--solver", solver, "--metrics", metrics]
        with open(output, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                    start_new_session=True)
        job = Job.__new__(Job)  # reuse its helpers on the supervisor's session (mpirun has its own)
        job.proc, job.output = proc, output
        job.wait_lines(metrics.replace(".jsonl", f".rank{victim}.jsonl"), kill_after)
        pid = _rank_of(metrics, victim)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        if job.finish() != 0:
            raise SystemExit(f"recovery.py: mpicaffe launch failed; see {output}")
        with open(events) as f:
            [event] = [json.loads(line) for line in f]
        runs.append({"kill_to_detection_s": event["detected_at"] - killed,
                     "detection_to_resume_s": event["recovery_seconds"],
                     "iterations_lost": event["iterations_lost"], "resumed_iteration": event["resumed_iteration"]})
        print(f"launch run {rep + 1}: {runs[-1]}", flush=True)
    keys = ("kill_to_detection_s", "detection_to_resume_s", "iterations_lost")
    return {"runs": runs, **{k: statistics.median(r[k] for r in runs) for k in keys}}


def _rank_of(marker: str, rank: int) -> int:
    """The pid of MPI rank `rank` of the job whose command line holds `marker`."""
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(entry)
        except OSError:
            continue
    raise SystemExit(f"recovery.py: rank {rank} of the job writing {marker} is not running")


MODES = {"ulfm": bench_ulfm, "stall": bench_stall, "launch": bench_launch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--work", help="keep solvers, logs and snapshots in this folder (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mpicaffe-recovery-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        for mode in args.modes.split(","):
            results[mode] = MODES[mode](work, args.repeats)
            summary = {k: v for k, v in results[mode].items() if k not in ("runs", "exits")}
            print(f"{mode}: {json.dumps(summary, indent=1)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
