#!/usr/bin/env python
"""Apoptosis during training against plain training of the bundled LeNet, side by side.

One run trains the bundled LeNet (prototxt/lenet, its solver unchanged: 2,000 iterations on the
4,000/1,000 MNIST subset) twice, plainly and with `--prune-every 100` (docs/pruning.md's recommended
flags; others with `--prune-flags`), and prints for both: the final test accuracy (the log's last
`Test net output #N: accuracy`), the training time, the parameters and multiply-adds per image
of the net at the end (the last pruned prototxt the run wrote, measured as `mpicaffe prune`'s
report does), the ratios, and one PASS/FAIL line per acceptance criterion of issue 7 (accuracy
within 0.5 points, at least 1.5x less training time, at least 3x fewer parameters).

The two trainings run concurrently, one process each with one thread (OMP_NUM_THREADS=1, so
torch's intra-op threads are 1 too), one per core of a 2-core machine, so machine noise (other
jobs, thermal limits) hits both alike. Training time is the wall time of the log from
"Initializing solver" to "Optimization Done." (so the test passes, snapshots and the pruning
decisions are counted; the Python start-up before it is not); the sum of the per-iteration times
of `--metrics` is printed beside it. With `--repeats N` each repetition uses a different solver
`random_seed` (1, 2, ...); the criteria are judged on the means over the repetitions (accuracy)
and on the medians of the per-repetition ratios (time, parameters).

    python scripts/bench/prune.py [--repeats N] [--prune-flags "--prune-every 100"] [--json FILE]

Data (the built-in `mnist` set), the net and solver copies, logs and snapshots are written to a
temporary folder (`--work DIR` to keep them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOLVER = "prototxt/lenet/lenet_solver.prototxt"
RECOMMENDED = "--prune-every 100"
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
ACCURACY_POINTS, TIME_RATIO, PARAM_RATIO = 0.5, 1.5, 3.0

_STAMP = re.compile(r"^[IWEF]\d{4} (\d\d:\d\d:\d\d\.\d+)")
_ACCURACY = re.compile(r"Test net output #\d+: accuracy = ([0-9.eE+-]+)")
_PRUNED_NET = re.compile(r"Apoptosis: the pruned net \(from .*\) is in (\S+)$")


def prepare(work: str, seed: int) -> tuple[str, str]:
    """Write the bundled LeNet and its solver under `work` reading `work`/data/mnist (converted
    once), with solver random_seed `seed`. Returns (net path, solver path)."""
    from mpicaffe import prototxt

    data = os.path.join(work, "data", "mnist")
    if not os.path.exists(data):
        _check([sys.executable, "-m", "mpicaffe", "convert", "mnist", "--out", data], "convert mnist")
    solver = prototxt.read_solver(os.path.join(ROOT, SOLVER))
    net = prototxt.read_net(os.path.join(ROOT, solver.net))  # the bundled solver names it from the repo root
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = os.path.join(data, os.path.basename(lp.data_param.source))
    net_path = os.path.join(work, "lenet_train_val.prototxt")
    prototxt.write_text(net, net_path)
    solver.net = net_path
    solver.random_seed = seed
    solver_path = os.path.join(work, f"lenet_solver_seed{seed}.prototxt")
    prototxt.write_text(solver, solver_path)
    return net_path, solver_path


def _check(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"prune.py: {what} failed (status {proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout


def train_both(work: str, solver: str, prune_flags: list[str], tag: str) -> dict[str, dict]:
    """Start the plain and the pruning training at once (one thread each); wait for both."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    procs = {}
    for kind, extra in (("plain", []), ("apoptosis", prune_flags)):
        out = os.path.join(work, f"{tag}_{kind}")
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "-m", "mpicaffe", "train", "--solver", solver,
               "--metrics", os.path.join(out, "metrics.jsonl"), *extra]
        # snapshots of each run go to its own folder (the solver's snapshot_prefix made relative)
        with open(os.path.join(out, "train.log"), "w") as log:  # the child keeps its own descriptor
            procs[kind] = (subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT), out, cmd)
    results = {}
    for kind, (proc, out, cmd) in procs.items():
        status = proc.wait()
        if status != 0:
            with open(os.path.join(out, "train.log")) as f:
                sys.stderr.write(f.read()[-4000:])
            raise SystemExit(f"prune.py: {kind} training failed (status {status}): {shlex.join(cmd)}")
        results[kind] = {"command": "mpicaffe " + shlex.join(cmd[3:]), **read_run(out)}
    return results


def read_run(out: str) -> dict:
    """Accuracy, times and the final net of one training, from its log and metrics in `out`."""
    start = done = None
    accuracy, net = None, None
    with open(os.path.join(out, "train.log")) as f:
        for line in f:
            stamp = _STAMP.match(line)
            if stamp and start is None and "Initializing solver" in line:
                start = stamp.group(1)
            if stamp and "Optimization Done." in line:
                done = stamp.group(1)
            if m := _ACCURACY.search(line):
                accuracy = float(m.group(1))
            if m := _PRUNED_NET.search(line.rstrip()):
                net = os.path.join(out, m.group(1))  # relative to the run's folder, its cwd
    if start is None or done is None or accuracy is None:
        raise SystemExit(f"prune.py: {out}/train.log lacks the solver start, 'Optimization Done.' or a test accuracy")
    wall = _seconds(done) - _seconds(start)
    wall += 86400 if wall < 0 else 0  # the log's clock went past midnight
    with open(os.path.join(out, "metrics.jsonl")) as f:
        iteration_sum = sum(json.loads(line)["time"] for line in f if line.strip())
    return {"accuracy": accuracy, "wall_s": wall, "iterations_s": iteration_sum, "final_net": net}


def _seconds(hms: str) -> float:
    t = datetime.strptime(hms, "%H:%M:%S.%f")
    return timedelta(hours=t.hour, minutes=t.minute, seconds=t.second, microseconds=t.microsecond).total_seconds()


def net_size(path: str) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of the TEST net of the prototxt at `path`."""
    from mpicaffe import prototxt
    from mpicaffe.proto import caffe_pb2
    from mpicaffe.prune.model import build_net
    from mpicaffe.prune.report import net_costs

    net = build_net(prototxt.read_net(path), caffe_pb2.TEST, path, None)
    try:
        costs = net_costs(net)
    finally:
        net.close()
    return sum(c.params for c in costs), sum(c.macs for c in costs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1, help="repetitions, with solver random_seed 1, 2, ...")
    p.add_argument("--prune-flags", default=RECOMMENDED, help=f"flags of the pruning run (default: {RECOMMENDED})")
    p.add_argument("--work", help="keep data, logs and snapshots in this folder (default: a temporary one)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    prune_flags = shlex.split(args.prune_flags)
    with tempfile.TemporaryDirectory(prefix="mpicaffe_prune_bench_") as tmp:
        work = os.path.abspath(args.work or tmp)
        os.makedirs(work, exist_ok=True)
        runs = []
        for r in range(args.repeats):
            net_path, solver = prepare(work, seed=r + 1)
            res = train_both(work, solver, prune_flags, f"seed{r + 1}")
            for run in res.values():
                run["params"], run["macs"] = net_size(run["final_net"] or net_path)
            runs.append(res)
            _print_repeat(r + 1, res)
    summary = _summary(runs)
    _print_summary(summary, args.repeats, args.prune_flags)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prune_flags": args.prune_flags, "runs": runs, "summary": summary}, f, indent=1)
    return 0 if all(c["pass"] for c in summary["criteria"]) else 1


def _ratios(res: dict) -> dict[str, float]:
    a, b = res["plain"], res["apoptosis"]
    return {"time": a["wall_s"] / b["wall_s"], "iterations_time": a["iterations_s"] / b["iterations_s"],
            "params": a["params"] / b["params"], "macs": a["macs"] / b["macs"]}


def _print_repeat(seed: int, res: dict) -> None:
    print(f"\nrandom_seed {seed}: both trainings at once, one process and one thread each "
          f"(so machine noise hits both alike)")
    print(f"{'':<26}{'plain':>14}{'apoptosis':>14}{'ratio':>10}")
    a, b = res["plain"], res["apoptosis"]
    q = _ratios(res)
    print(f"{'test accuracy':<26}{a['accuracy'] * 100:>13.2f}%{b['accuracy'] * 100:>13.2f}%"
          f"{(b['accuracy'] - a['accuracy']) * 100:>+9.2f}pt")
    print(f"{'training wall time':<26}{a['wall_s']:>13.1f}s{b['wall_s']:>13.1f}s{q['time']:>9.2f}x")
    print(f"{'sum of iteration times':<26}{a['iterations_s']:>13.1f}s{b['iterations_s']:>13.1f}s"
          f"{q['iterations_time']:>9.2f}x")
    print(f"{'parameters at the end':<26}{a['params']:>14,}{b['params']:>14,}{q['params']:>9.2f}x")
    print(f"{'multiply-adds per image':<26}{a['macs']:>14,}{b['macs']:>14,}{q['macs']:>9.2f}x")
    print(f"  plain:     {a['command']}\n  apoptosis: {b['command']}", flush=True)


def _summary(runs: list[dict]) -> dict:
    acc_plain = statistics.mean(r["plain"]["accuracy"] for r in runs) * 100
    acc_prune = statistics.mean(r["apoptosis"]["accuracy"] for r in runs) * 100
    ratios = {k: statistics.median(_ratios(r)[k] for r in runs) for k in ("time", "iterations_time", "params", "macs")}
    criteria = [
        {"name": f"accuracy within {ACCURACY_POINTS} points of plain training",
         "value": f"{acc_prune:.2f}% vs {acc_plain:.2f}% ({acc_prune - acc_plain:+.2f} points)",
         "pass": acc_prune >= acc_plain - ACCURACY_POINTS},
        {"name": f"at least {TIME_RATIO}x less training time", "value": f"{ratios['time']:.2f}x",
         "pass": ratios["time"] >= TIME_RATIO},
        {"name": f"at least {PARAM_RATIO}x fewer parameters at the end", "value": f"{ratios['params']:.2f}x",
         "pass": ratios["params"] >= PARAM_RATIO},
    ]
    return {"accuracy_plain": acc_plain, "accuracy_apoptosis": acc_prune, "ratios": ratios, "criteria": criteria}


def _print_summary(s: dict, repeats: int, flags: str) -> None:
    over = f" (accuracy: mean of {repeats} runs; ratios: median)" if repeats > 1 else ""
    print(f"\nIssue 7 acceptance, apoptosis ({flags}) against plain training{over}:")
    for c in s["criteria"]:
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['value']}")
    print(f"  (multiply-adds per image: {s['ratios']['macs']:.2f}x fewer; sum of iteration times: "
          f"{s['ratios']['iterations_time']:.2f}x less)")


if __name__ == "__main__":
    sys.exit(main())
