"""`mpicaffe launch`: run `mpicaffe train` under mpirun (or srun) and relaunch it when it dies.

    mpicaffe launch -np 4 [--min-np 2] [--max-restarts 3] [-H h1:2,h2:2 | --hostfile H]
                    [--launcher mpirun|srun] -- train --solver S ...

The supervisor only starts and watches processes (it imports nothing of the training code, and
`build_command` gives the exact mpirun or srun command line). When the job fails, it relaunches
it with `--resume auto`, so training continues from the newest snapshot whose checksums verify
(mpicaffe.snapshot), and with `--global-batch` set to the first run's global batch, so the
trajectory does not depend on how many ranks are left.

A job that ends before completing its first iteration (mpirun refused to start it, a bad flag or
solver path, an error while the nets are built) is a configuration error: relaunching it would
fail the same way, so the supervisor logs its last lines of output and exits with its status.
Only a rank killed by a signal, or a stall (status 76), counts as a fault at that point.

How many ranks: `-H host:slots,...` (as mpirun's) or `--hostfile` bound the rank count by their
slots. A hostfile may be in Open MPI's form (`host slots=N max_slots=M`, 1 slot when not given)
or MPICH's (`host:N`); the latter is translated into Open MPI's in a private file for mpirun. The
hostfile is read again before each launch; without one, `--shrink-after` failures in a row at the
same count (default 2) lower it by one. Never below `--min-np`. While running below `-np`, the
supervisor watches the hostfile; when slots return it asks the job to snapshot and stop
(SIGUSR1) and relaunches it larger (expand).

`--launcher srun` (inside a Slurm allocation) starts the ranks with `srun --ntasks N
--kill-on-bad-exit=1` instead; the allocation decides where they run, so -H and --hostfile are
refused with it.

Signals: SIGTERM, SIGINT, SIGHUP or SIGUSR1 to the supervisor become SIGUSR1 to mpirun or srun,
which forward it to the ranks: they snapshot and stop (Open MPI's mpirun would kill them 0.25 s
after forwarding a SIGTERM; srun ends the step on a second SIGINT), and the supervisor exits with
the job's status without relaunching.

Faults are logged (and, with `--events FILE`, written as JSON lines): when the failure was
detected, which ranks mpirun or srun reported, the last iteration completed, and, once the
relaunched job completes its first iteration, the iteration it resumed from, the iterations lost
and the time from detection to that first iteration. The job reports its progress through the
launcher's output (mpicaffe.progress), which the supervisor reads and does not echo.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from mpicaffe import progress
from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

# mpicaffe.signals.STOPPED_EXIT_CODE (a test pins them equal): the job stopped on request
STOPPED_EXIT_CODE = 75
# mpicaffe.parallel.stall.STALL_EXIT_CODE (pinned equal too): a rank stalled, a fault even before
# the first iteration
STALL_EXIT_CODE = 76
# prterun's report of a rank that died ("process rank 1 with PID 123 on node n exited on signal 9")
# or exited non-zero ("Process name: [prterun-n-123@1,2]")
_DIED = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on\s+signal (\d+)")
_EXITED = re.compile(r"Process name: \[[^\]@]*@\d+,(\d+)\]")
# srun's report of tasks that ended badly ("srun: error: node1: task 1: Killed", "srun: error:
# node1: tasks 0-1: Exited with exit code 1"); the text after the tasks is strsignal's for a signal
_SRUN_TASKS = re.compile(r"srun: error: \S+: tasks? ([\d,-]+): ([^\n]+)")
_SIGNAL_BY_TEXT = {signal.strsignal(s): int(s) for s in signal.valid_signals() if signal.strsignal(s)}
# what a hostfile line may say besides its slots (Open MPI's hostfile keywords)
_HOSTFILE_KEYS = {"slots", "count", "max_slots", "max-slots", "slots_max", "slots-max", "user", "username", "port"}
_SLOTS_KEYS = ("slots", "count")
LAUNCHERS = ("mpirun", "srun")


@dataclass
class LaunchConfig:
    """What `mpicaffe launch` was asked to do."""

    np: int
    train_args: list[str]
    min_np: int | None = None
    max_restarts: int = 3
    hostfile: str | None = None
    shrink_after: int = 2
    mpirun: str = "mpirun"
    launcher_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    events: str | None = None
    poll_seconds: float = 0.5
    hosts: str | None = None      # mpirun's -H: `host:slots,...`
    launcher: str = "mpirun"      # or "srun"
    srun: str = "srun"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--np", "-n", type=int, required=True, help="number of ranks to run (mpirun -np)")
    p.add_argument("--min-np", type=int, metavar="M", help="never relaunch with fewer ranks (default: -np)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="K", help="relaunch at most K times (default 3)")
    p.add_argument("-H", "--host", dest="hosts", metavar="HOSTS",
                   help="mpirun's -H: host:slots,host2:slots (1 slot when not given); the slots bound the rank count")
    p.add_argument("--hostfile", metavar="H",
                   help="a hostfile in Open MPI's form (host slots=N) or MPICH's (host:N), read again before "
                        "each launch: its slots bound the rank count")
    p.add_argument("--shrink-after", type=int, default=2, metavar="F",
                   help="after F failures in a row at one rank count, relaunch with one rank fewer (default 2)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="mpirun",
                   help="start the ranks with mpirun (default) or, inside a Slurm allocation, srun")
    p.add_argument("--mpirun", default="mpirun", help="the mpirun to run (default: mpirun on the PATH)")
    p.add_argument("--srun", default="srun", help="the srun to run with --launcher srun (default: srun on the PATH)")
    p.add_argument("--launcher-args", "--mpirun-args", dest="launcher_args", default="", metavar="ARGS",
                   help="more mpirun (or srun) arguments, one string: --mpirun-args='--oversubscribe --bind-to none'")
    p.add_argument("--events", metavar="FILE", help="append one JSON line per fault to FILE")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train --solver S ... (the mpicaffe command)")


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command or command[0] != "train":
        raise UserError("mpicaffe launch: give the training command after `--`: "
                        "mpicaffe launch -np N -- train --solver S ...")
    if args.np < 1 or (args.min_np is not None and not 1 <= args.min_np <= args.np):
        raise UserError(f"mpicaffe launch: need 1 <= --min-np <= -np (got -np {args.np}, --min-np {args.min_np})")
    if args.hosts and args.hostfile:
        raise UserError("mpicaffe launch: give -H or --hostfile, not both")
    return LaunchConfig(args.np, command, args.min_np, args.max_restarts, args.hostfile, args.shrink_after,
                        args.mpirun, shlex.split(args.launcher_args), events=args.events, hosts=args.hosts,
                        launcher=args.launcher, srun=args.srun)


def check_launcher(cfg: LaunchConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse what the launcher cannot do: srun outside a Slurm allocation, or with hosts of its own."""
    if cfg.launcher != "srun":
        return
    if not environ.get("SLURM_JOB_ID"):
        raise UserError("mpicaffe launch --launcher srun: not inside a Slurm allocation (SLURM_JOB_ID is not set); "
                        "run it in an sbatch script or under salloc, or use --launcher mpirun")
    if cfg.hosts or cfg.hostfile:
        raise UserError("mpicaffe launch --launcher srun: the Slurm allocation decides where ranks run; "
                        "-H and --hostfile are for mpirun")


@dataclass
class Hosts:
    """Where a launch may put its ranks: hostfile lines in Open MPI's form, and their total slots."""

    lines: list[str]
    slots: int
    translated: bool = False   # some line was in MPICH's `host:N` form


def _whole(value: str, where: str, what: str = "slots") -> int:
    if not value.isdigit():
        raise UserError(f"{where}: {what} must be a whole number (got '{value}')")
    return int(value)


def parse_host_list(spec: str) -> Hosts:
    """Hosts of mpirun's -H: `host[:slots],...` (1 slot when not given)."""
    lines, total = [], 0
    for entry in spec.split(","):
        name, colon, value = entry.strip().partition(":")
        if not name:
            raise UserError(f"-H {spec}: an empty host name in '{entry}' (expected host:slots,host2:slots)")
        slots = _whole(value, f"-H {spec}") if colon else 1
        lines.append(f"{name} slots={slots}")
        total += slots
    return Hosts(lines, total)


def read_hostfile(path: str) -> Hosts:
    """A hostfile in Open MPI's form (`host [slots=N] [max_slots=M]`, 1 slot when not given) or
    MPICH's (`host:N`), with `#` comments and blank lines; errors name the file and line."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"--hostfile {path}: {e.strerror}") from None
    hosts = Hosts([], 0)
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}"
        name, colon, value = words[0].partition(":")
        if colon:   # MPICH: host:N
            if len(words) > 1:
                raise UserError(f"{where}: expected `host:N` (MPICH) or `host slots=N` (Open MPI), got '{line.strip()}'")
            slots = _whole(value, where)
            hosts.lines.append(f"{name} slots={slots}")
            hosts.translated = True
        else:
            slots = 1
            for word in words[1:]:
                key, equals, value = word.partition("=")
                if not equals or key not in _HOSTFILE_KEYS:
                    raise UserError(f"{where}: '{word}' is not one of Open MPI's `key=value` "
                                    f"({', '.join(sorted(_HOSTFILE_KEYS))})")
                if key in _SLOTS_KEYS:
                    slots = _whole(value, where)
                elif key not in ("user", "username"):
                    _whole(value, where, key)
            hosts.lines.append(" ".join(words))
        hosts.slots += slots
    return hosts


def read_hostfile_slots(path: str) -> int:
    """Total slots of a hostfile (see read_hostfile)."""
    return read_hostfile(path).slots


def has_flag(args: list[str], name: str) -> bool:
    """Whether `args` holds the flag `--name` (or Caffe's `-name`, dashes or underscores, `=value`)."""
    pattern = re.compile("^--?" + re.escape(name).replace("\\-", "[-_]") + "(=|$)")
    return any(pattern.match(a) for a in args)


def train_args_for(train_args: list[str], resume: bool, global_batch: int | None) -> list[str]:
    """The training command of a launch: a relaunch adds `--resume auto` and the first run's
    global batch, unless the user gave them."""
    out = list(train_args)
    if resume and not has_flag(out, "resume"):
        out += ["--resume", "auto"]
    if global_batch and not has_flag(out, "global-batch"):
        out += ["--global-batch", str(global_batch)]
    return out


def build_command(cfg: LaunchConfig, np: int, train_args: list[str], hostfile: str | None = None) -> list[str]:
    """The mpirun (or srun) command line of one launch on `np` ranks; `hostfile` replaces
    cfg.hostfile (the translation of an MPICH-form one)."""
    job = [cfg.python, "-m", "mpicaffe", *train_args]
    if cfg.launcher == "srun":
        # a rank that dies ends the step (the others would wait for it in the next allreduce);
        # the progress variable is exported by name, whatever the allocation's --export says
        return [cfg.srun, "--ntasks", str(np), "--kill-on-bad-exit=1", f"--export=ALL,{progress.PROGRESS_ENV}",
                *cfg.launcher_args, *job]
    cmd = [cfg.mpirun, "-np", str(np)]
    if cfg.hosts:
        cmd += ["-H", cfg.hosts]
    if hostfile or cfg.hostfile:
        cmd += ["--hostfile", hostfile or cfg.hostfile]
    # Open MPI passes a variable named by -x to every rank (rank 0 may run on another node)
    return cmd + ["-x", progress.PROGRESS_ENV, *cfg.launcher_args, *job]


class Job:
    """One mpirun (or srun) in its own session; its output echoed, progress lines, dead ranks and
    the last lines of output noted."""

    TAIL_LINES = 15

    def __init__(self, cmd: list[str]):
        env = dict(os.environ, **{progress.PROGRESS_ENV: "1"})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                     errors="replace", start_new_session=True)
        self.start: dict | None = None          # the trainer's start event
        self.last_iteration: int | None = None  # the last iteration completed
        self.first_iteration_at: float | None = None  # when the supervisor saw the first one
        self.failed_ranks: list[int] = []
        self.signals: dict[int, int] = {}        # failed rank -> signal that killed it
        self.first_failure_at: float | None = None
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)   # its last lines of output
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        recent: list[str] = []
        for line in self.proc.stdout:
            event = progress.parse(line)
            if event is not None:
                name, fields = event
                if name == "start":
                    self.start = fields
                elif name == "iteration":
                    self.last_iteration = fields["iteration"]
                    if self.first_iteration_at is None:
                        self.first_iteration_at = time.time()
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line.rstrip("\n"))
            recent = (recent + [line])[-3:]
            text = " ".join(recent)
            for m in _DIED.finditer(text):
                self._failed(int(m.group(1)), int(m.group(3)))
            for m in _EXITED.finditer(text):
                self._failed(int(m.group(1)), None)
            for m in _SRUN_TASKS.finditer(line):
                for rank in task_ranks(m.group(1)):
                    self._failed(rank, _SIGNAL_BY_TEXT.get(m.group(2).strip()))

    def _failed(self, rank: int, signum: int | None) -> None:
        if self.first_failure_at is None:
            self.first_failure_at = time.time()
        if rank not in self.failed_ranks:
            self.failed_ranks.append(rank)
        if signum is not None:
            self.signals[rank] = signum

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self) -> int:
        status = self.proc.wait()
        self._reader.join()
        return status

    def never_started(self, status: int) -> bool:
        """Whether the job ended before completing an iteration for a reason a relaunch would meet
        again: no rank was killed by a signal, and it did not stall."""
        return self.last_iteration is None and not self.signals and status != STALL_EXIT_CODE


def task_ranks(text: str) -> list[int]:
    """The ranks of srun's task list: `1`, `0-3`, `0,2-3`."""
    ranks = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ranks += range(int(first), int(last or first) + 1)
    return ranks


class Supervisor:
    """The launch loop (see the module docstring)."""

    def __init__(self, cfg: LaunchConfig):
        self.cfg = cfg
        self.min_np = cfg.min_np or cfg.np
        self.ceiling = cfg.np   # lowered after repeated failures, raised again when the hostfile changes
        self.requested: int | None = None   # a signal the supervisor received
        self.global_batch: int | None = None
        self.pending: dict | None = None    # the last fault, until the relaunched job completes an iteration
        check_launcher(cfg)
        self.hosts = self._read_hosts()
        self.slots = None if self.hosts is None else self.hosts.slots
        self.job: Job | None = None
        self._translated: str | None = None  # the private Open MPI copy of an MPICH-form hostfile

    def _read_hosts(self) -> Hosts | None:
        if self.cfg.hosts:
            return parse_host_list(self.cfg.hosts)
        return read_hostfile(self.cfg.hostfile) if self.cfg.hostfile else None

    def _hostfile_for_mpirun(self) -> str | None:
        """The hostfile mpirun reads: the user's, or Open MPI's form of an MPICH-form one (Open
        MPI would take `node1:4` for a host named so)."""
        if self.hosts is None or not self.hosts.translated:
            return None
        if self._translated is None:
            fd, self._translated = tempfile.mkstemp(prefix="mpicaffe-hostfile-")   # mode 0600
            os.close(fd)
        with open(self._translated, "w") as f:
            f.write(f"# {self.cfg.hostfile}, in Open MPI's form, for mpicaffe launch\n")
            f.write("".join(line + "\n" for line in self.hosts.lines))
        return self._translated

    def _ranks(self) -> int:
        return self.ceiling if self.slots is None else min(self.ceiling, self.slots)

    def _on_signal(self, signum, frame) -> None:
        if self.requested is not None and self.job is not None:
            self.job.signal(signal.SIGTERM)  # a second signal: stop now
        self.requested = signum

    def run(self) -> int:
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in signals}
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self._translated is not None:
                os.unlink(self._translated)

    def _run(self) -> int:
        cfg = self.cfg
        np_, restarts, failures_here, resume = self._ranks(), 0, 0, False
        if np_ < self.min_np:
            where = f"-H {cfg.hosts}" if cfg.hosts else f"--hostfile {cfg.hostfile}"
            raise UserError(f"{where}: {self.slots} slot(s), fewer than --min-np {self.min_np}")
        attempt = 0
        while True:
            attempt += 1
            cmd = build_command(cfg, np_, train_args_for(cfg.train_args, resume, self.global_batch),
                                self._hostfile_for_mpirun())
            log.info("Launch %d on %d rank(s): %s", attempt, np_, shlex.join(cmd))
            self.job = job = Job(cmd)
            grow_to = self._watch(job, np_)
            status = job.wait()
            self._note_recovery(job)
            if self.global_batch is None and job.start and not has_flag(cfg.train_args, "global-batch"):
                self.global_batch = job.start["global_batch"]
            if status == 0:
                log.info("The job finished (launch %d, %d restart(s))", attempt, restarts)
                return 0
            if self.requested is not None:
                log.info("Stopped on %s: the job exited with status %d", signal.Signals(self.requested).name, status)
                return status
            if status == STOPPED_EXIT_CODE and grow_to:
                log.info("Relaunching on %d rank(s) (slots returned)", grow_to)
                np_, failures_here, resume = grow_to, 0, True
                continue
            if status == STOPPED_EXIT_CODE:
                log.info("The job stopped on a signal to its ranks (status %d); not relaunching", status)
                return status
            if job.never_started(status):
                if self.pending is not None:   # the fault that led to this launch stays unrecovered
                    self._write_event(self.pending)
                log.error("Configuration error: the job exited with status %d before completing an iteration; "
                          "not relaunching (a relaunch would fail the same way). Its last lines of output:\n%s",
                          status, "\n".join("    " + line for line in job.tail) or "    (none)")
                return status
            fault = self._record_failure(job, status, np_)
            restarts += 1
            if restarts > cfg.max_restarts:
                log.error("Giving up after %d restart(s) (--max-restarts %d)", restarts - 1, cfg.max_restarts)
                self._write_event(fault)
                return status
            failures_here += 1
            if failures_here >= cfg.shrink_after and np_ > self.min_np:
                self.ceiling = np_ - 1
                log.warning("%d failure(s) in a row on %d rank(s): relaunching with fewer", failures_here, np_)
            if cfg.hostfile:
                self.hosts = read_hostfile(cfg.hostfile)
                self.slots = self.hosts.slots
            new = self._ranks()
            if new < self.min_np:
                log.error("Only %d rank(s) available, fewer than --min-np %d: giving up", new, self.min_np)
                self._write_event(fault)
                return status
            if new != np_:
                failures_here = 0
            fault["ranks_after"] = new
            np_, resume, self.pending = new, True, fault

    def _watch(self, job: Job, np_: int) -> int | None:
        """Wait for the job; forward a signal the supervisor got; when the hostfile offers more slots
        while running below -np, ask the job to snapshot and stop, and return the larger count."""
        grow_to, asked = None, False
        while job.proc.poll() is None:
            time.sleep(self.cfg.poll_seconds)
            self._note_recovery(job)
            if self.requested is not None and not asked:
                log.info("Got %s: asking the job to snapshot and stop (SIGUSR1 to %s)",
                         signal.Signals(self.requested).name, self.cfg.launcher)
                job.signal(signal.SIGUSR1)
                asked = True
            if self.cfg.hostfile and np_ < self.cfg.np and not asked and job.last_iteration is not None:
                try:
                    hosts = read_hostfile(self.cfg.hostfile)
                except UserError as e:
                    log.warning("%s", e)
                    continue
                slots = hosts.slots
                if slots != self.slots:
                    self.hosts, self.slots, self.ceiling = hosts, slots, self.cfg.np
                if self._ranks() > np_:
                    grow_to = self._ranks()
                    log.info("%s now has %d slot(s): asking the job to snapshot and stop to grow from %d to %d "
                             "rank(s)", self.cfg.hostfile, slots, np_, grow_to)
                    job.signal(signal.SIGUSR1)
                    asked = True
        return grow_to

    def _record_failure(self, job: Job, status: int, np_: int) -> dict:
        detected = job.first_failure_at or time.time()
        if self.pending is not None:  # the previous relaunch died before completing an iteration
            self._write_event(self.pending)
        how = ", ".join(f"{r} (signal {job.signals[r]})" if r in job.signals else str(r) for r in job.failed_ranks)
        log.warning("Fault detected at %s: %s exited with status %d; failed rank(s): %s; last iteration "
                    "completed: %s", time.strftime("%H:%M:%S", time.localtime(detected)), self.cfg.launcher, status, how or "unknown",
                    "none" if job.last_iteration is None else job.last_iteration)
        return {"detected_at": detected, "exit_status": status, "failed_ranks": job.failed_ranks,
                "signals": {str(r): s for r, s in job.signals.items()}, "ranks": np_,
                "last_iteration": job.last_iteration, "recovered": False}

    def _note_recovery(self, job: Job) -> None:
        """Once the relaunched job completed an iteration: log and record the recovery."""
        fault = self.pending
        if fault is None or job.first_iteration_at is None or job.start is None:
            return
        resumed = job.start["iteration"]
        lost = None if fault["last_iteration"] is None else fault["last_iteration"] - resumed
        fault.update(recovered=True, resumed_iteration=resumed, iterations_lost=lost,
                     resumed_from=job.start.get("resumed_from"),
                     recovery_seconds=job.first_iteration_at - fault["detected_at"])
        log.info("Recovered: relaunched on %d rank(s), resumed at iteration %d from %s; %s iteration(s) lost; "
                 "%.2f s from fault detection to the first iteration completed", job.start["ranks"], resumed,
                 fault["resumed_from"] or "scratch", "unknown" if lost is None else lost, fault["recovery_seconds"])
        self._write_event(fault)
        self.pending = None

    def _write_event(self, fault: dict) -> None:
        if self.cfg.events:
            with open(self.cfg.events, "a") as f:
                f.write(json.dumps(fault) + "\n")


def launch(cfg: LaunchConfig) -> int:
    """Run the job to the end, relaunching it on failure; returns the exit status."""
    return Supervisor(cfg).run()
