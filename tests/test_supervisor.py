"""`mpicaffe launch` without MPI: the exact mpirun command lines, and the relaunch policy (resume,
global batch, shrink after repeated failures, hostfile shrink and expand, signals, fault events)
against a stand-in mpirun: a real process that replays a plan and records its arguments."""
import json
import os
import signal
import sys
import threading

import pytest

from mpicaffe import cli, supervisor
from mpicaffe.errors import UserError
from mpicaffe.supervisor import LaunchConfig, build_command, launch, read_hostfile_slots

STUB = r'''#!PYTHON
import json, os, signal, sys, time
here = os.path.dirname(os.path.abspath(__file__))
calls = os.path.join(here, "calls.jsonl")
n = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
step = json.load(open(os.path.join(here, "plan.json")))[n]
assert os.environ.get("MPICAFFE_PROGRESS") == "1"
start = {"iteration": step["start"], "ranks": int(sys.argv[2]), "global_batch": 192, "resumed_from": step.get("from")}
print("@mpicaffe start " + json.dumps(start), flush=True)
for i in range(step["start"] + 1, step["last"] + 1):
    print("@mpicaffe iteration " + json.dumps({"iteration": i}), flush=True)
print("ordinary output of launch", n, flush=True)
if step.get("wait_usr1"):
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    if "set_slots" in step:
        with open(step["hostfile"], "w") as f:
            f.write("localhost slots=%d\n" % step["set_slots"])
    t = time.time()
    while not got and time.time() - t < 60:
        time.sleep(0.02)
    sys.exit(75 if got else 99)
for r in step.get("died", []):
    print("prterun noticed that process rank %d with PID 4242 on node n1 exited on\nsignal 9 (Killed)." % r, flush=True)
sys.exit(step["exit"])
'''
TRAIN = ["train", "--solver", "s.prototxt"]


def _stub(tmp_path, plan):
    path = tmp_path / "mpirun"
    path.write_text(STUB.replace("PYTHON", sys.executable))
    path.chmod(0o755)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return str(path)


def _calls(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "calls.jsonl")]


def _cfg(tmp_path, plan, **kw):
    return LaunchConfig(kw.pop("np", 3), list(TRAIN), mpirun=_stub(tmp_path, plan), python="PY",
                        events=str(tmp_path / "events.jsonl"), poll_seconds=0.02, **kw)


def _events(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "events.jsonl")]


def test_the_command_is_mpirun_with_the_progress_variable_and_the_training_command():
    cfg = LaunchConfig(3, list(TRAIN), hostfile="hosts", mpirun_args=["--oversubscribe"], python="/py")
    assert build_command(cfg, 2, supervisor.train_args_for(TRAIN, True, 192)) == [
        "mpirun", "-np", "2", "--hostfile", "hosts", "-x", "MPICAFFE_PROGRESS", "--oversubscribe", "/py", "-m",
        "mpicaffe", "train", "--solver", "s.prototxt", "--resume", "auto", "--global-batch", "192"]
    # what the user gave is kept, in Caffe's spelling too
    assert supervisor.train_args_for(TRAIN + ["-global_batch=96", "--resume", "auto"], True, 192) == \
        TRAIN + ["-global_batch=96", "--resume", "auto"]
    assert supervisor.train_args_for(TRAIN, False, None) == TRAIN


def test_launch_arguments_as_typed():
    args = cli.build_parser().parse_args(cli.normalize_argv(
        ["launch", "-np", "3", "--min-np", "2", "--mpirun-args=--oversubscribe --bind-to none", "--",
         "train", "-solver", "S"]))
    cfg = supervisor.config_from_args(args)
    assert (cfg.np, cfg.min_np, cfg.mpirun_args, cfg.train_args) == (3, 2, ["--oversubscribe", "--bind-to", "none"],
                                                                      ["train", "-solver", "S"])
    with pytest.raises(UserError, match="give the training command after `--`"):
        supervisor.config_from_args(cli.build_parser().parse_args(["launch", "-n", "2"]))


def test_hostfile_slots(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode1 slots=4\nnode2   # one slot\n\nnode3 slots=2 max_slots=8\n")
    assert read_hostfile_slots(str(hosts)) == 7
    hosts.write_text("node1 slots=many\n")
    with pytest.raises(UserError, match=r"hosts:1: slots must be a whole number"):
        read_hostfile_slots(str(hosts))


def test_a_failed_job_is_relaunched_with_resume_auto_and_the_fault_is_recorded(tmp_path, capsys):
    plan = [{"start": 0, "last": 66, "exit": 137, "died": [1]},
            {"start": 40, "last": 150, "exit": 0, "from": "snap_iter_40.solverstate"}]
    assert launch(_cfg(tmp_path, plan)) == 0
    first = ["-np", "3", "-x", "MPICAFFE_PROGRESS", "PY", "-m", "mpicaffe", *TRAIN]
    assert _calls(tmp_path) == [first, first + ["--resume", "auto", "--global-batch", "192"]]
    [event] = _events(tmp_path)
    assert (event["failed_ranks"], event["signals"], event["last_iteration"]) == ([1], {"1": 9}, 66)
    assert (event["resumed_iteration"], event["iterations_lost"], event["recovered"]) == (40, 26, True)
    assert event["resumed_from"] == "snap_iter_40.solverstate" and event["recovery_seconds"] >= 0
    out = capsys.readouterr().out
    assert "ordinary output of launch 0" in out and "ordinary output of launch 1" in out
    assert "@mpicaffe" not in out


def test_repeated_failures_shrink_to_min_np_keeping_the_global_batch(tmp_path):
    plan = [{"start": 0, "last": 10, "exit": 1}, {"start": 0, "last": 5, "exit": 1},
            {"start": 0, "last": 3, "exit": 1}, {"start": 0, "last": 20, "exit": 0}]
    assert launch(_cfg(tmp_path, plan, min_np=2, shrink_after=2)) == 0
    calls = _calls(tmp_path)
    assert [c[1] for c in calls] == ["3", "3", "2", "2"]
    assert all(c[-4:] == ["--resume", "auto", "--global-batch", "192"] for c in calls[1:])
    assert [e["ranks"] for e in _events(tmp_path)] == [3, 3, 2]


def test_too_many_failures_give_up_with_the_jobs_status(tmp_path):
    plan = [{"start": 0, "last": 1, "exit": 3}] * 3
    assert launch(_cfg(tmp_path, plan, max_restarts=1)) == 3
    assert len(_calls(tmp_path)) == 2


def test_hostfile_shrinks_then_expands_when_slots_return(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    plan = [{"start": 0, "last": 30, "wait_usr1": True, "set_slots": 3, "hostfile": str(hosts)},
            {"start": 30, "last": 60, "exit": 0}]
    assert launch(_cfg(tmp_path, plan, min_np=2, hostfile=str(hosts))) == 0
    calls = _calls(tmp_path)
    assert [c[1] for c in calls] == ["2", "3"]
    assert calls[1][-4:] == ["--resume", "auto", "--global-batch", "192"]
    hosts.write_text("localhost slots=1\n")
    with pytest.raises(UserError, match="1 slot\\(s\\), fewer than --min-np 2"):
        launch(_cfg(tmp_path, plan, min_np=2, hostfile=str(hosts)))


def test_sigterm_to_the_supervisor_stops_the_job_with_a_snapshot_and_no_relaunch(tmp_path):
    plan = [{"start": 0, "last": 5, "wait_usr1": True}, {"start": 5, "last": 6, "exit": 0}]
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    before = signal.getsignal(signal.SIGTERM)
    assert launch(_cfg(tmp_path, plan)) == 75
    timer.join()
    assert len(_calls(tmp_path)) == 1
    assert signal.getsignal(signal.SIGTERM) is before
