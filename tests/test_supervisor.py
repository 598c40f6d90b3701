"""`mpicaffe launch` without MPI: the exact mpirun and srun command lines, -H and hostfiles in
Open MPI's and MPICH's forms, and the relaunch policy (resume, global batch, shrink after repeated
failures, hostfile shrink and expand, signals, fault events, configuration errors not retried)
against a stand-in mpirun or srun: a real process that replays a plan and records its arguments."""
import json
import os
import signal
import sys
import threading

import pytest

from mpicaffe import cli, supervisor
from mpicaffe.errors import UserError
from mpicaffe.parallel.stall import STALL_EXIT_CODE
from mpicaffe.supervisor import (
    LaunchConfig,
    build_command,
    check_launcher,
    launch,
    parse_host_list,
    read_hostfile,
)

STUB = r'''#!PYTHON
import json, os, signal, sys, time
here = os.path.dirname(os.path.abspath(__file__))
calls = os.path.join(here, "calls.jsonl")
n = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if "--hostfile" in sys.argv:     # what mpirun would read, while the launch runs
    with open(os.path.join(here, "hostfiles.jsonl"), "a") as f:
        f.write(json.dumps(open(sys.argv[sys.argv.index("--hostfile") + 1]).read()) + "\n")
step = json.load(open(os.path.join(here, "plan.json")))[n]
assert os.environ.get("MPICAFFE_PROGRESS") == "1"
start = {"iteration": step["start"], "ranks": int(sys.argv[2]), "global_batch": 192, "resumed_from": step.get("from")}
print("@mpicaffe start " + json.dumps(start), flush=True)
for i in range(step["start"] + 1, step["last"] + 1):
    print("@mpicaffe iteration " + json.dumps({"iteration": i}), flush=True)
print("ordinary output of launch", n, flush=True)
for line in step.get("lines", []):
    print(line, flush=True)
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
    cfg = LaunchConfig(3, list(TRAIN), hostfile="hosts", launcher_args=["--oversubscribe"], python="/py")
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
    assert (cfg.np, cfg.min_np, cfg.launcher_args, cfg.train_args) == (3, 2, ["--oversubscribe", "--bind-to", "none"],
                                                                      ["train", "-solver", "S"])
    with pytest.raises(UserError, match="give the training command after `--`"):
        supervisor.config_from_args(cli.build_parser().parse_args(["launch", "-n", "2"]))


def test_hostfile_slots_in_open_mpis_form_and_mpichs(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode1 slots=4\nnode2   # one slot\n\nnode3 slots=2 max_slots=8\n")
    assert supervisor.read_hostfile_slots(str(hosts)) == 7
    assert not read_hostfile(str(hosts)).translated
    hosts.write_text("# MPICH\nnode1:4\n\nnode2:2  # two\nnode3\n")
    read = read_hostfile(str(hosts))
    assert (read.slots, read.lines, read.translated) == (7, ["node1 slots=4", "node2 slots=2", "node3"], True)


def test_host_list_as_mpiruns_minus_h():
    hosts = parse_host_list("node1:4,node2,node3:2")
    assert (hosts.slots, hosts.lines) == (7, ["node1 slots=4", "node2 slots=1", "node3 slots=2"])
    args = cli.build_parser().parse_args(["launch", "--np", "2", "-H", "localhost:2", "--", "train", "--solver", "S"])
    assert supervisor.config_from_args(args).hosts == "localhost:2"


@pytest.mark.parametrize("text, error", [
    ("node1 slots=many\n", r"hosts:1: slots must be a whole number \(got 'many'\)"),
    ("# c\nnode1:x\n", r"hosts:2: slots must be a whole number \(got 'x'\)"),
    ("node1 4\n", r"hosts:1: '4' is not one of Open MPI's `key=value`"),
    ("node1 slots=2 colour=red\n", r"hosts:1: 'colour=red' is not one of Open MPI's"),
    ("node1 max_slots=x\n", r"hosts:1: max_slots must be a whole number"),
    ("\nnode1:4 slots=2\n", r"hosts:2: expected `host:N` \(MPICH\) or `host slots=N` \(Open MPI\), got 'node1:4 slots=2'"),
])
def test_a_bad_hostfile_line_is_a_one_line_error_naming_the_file_and_line(tmp_path, text, error):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    with pytest.raises(UserError, match=error) as e:
        read_hostfile(str(hosts))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(hosts))


@pytest.mark.parametrize("spec, error", [("node1:x", r"-H node1:x: slots must be a whole number \(got 'x'\)"),
                                         ("node1,,node2", r"-H node1,,node2: an empty host name")])
def test_a_bad_host_list_is_a_one_line_error(spec, error):
    with pytest.raises(UserError, match=error):
        parse_host_list(spec)


def test_minus_h_and_hostfile_go_to_mpirun_and_their_slots_bound_the_ranks(tmp_path):
    plan = [{"start": 0, "last": 5, "exit": 0}] * 2
    assert launch(_cfg(tmp_path, plan, min_np=1, hosts="localhost:2")) == 0
    assert _calls(tmp_path)[0][:4] == ["-np", "2", "-H", "localhost:2"]
    # an MPICH-form hostfile reaches mpirun in Open MPI's form, in a private file removed afterwards
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1  # MPICH\nlocalhost:1\n")
    assert launch(_cfg(tmp_path, plan, min_np=1, hostfile=str(hosts))) == 0
    call = _calls(tmp_path)[1]
    assert call[:3] == ["-np", "2", "--hostfile"] and call[3] != str(hosts) and not os.path.exists(call[3])
    [content] = [json.loads(line) for line in (tmp_path / "hostfiles.jsonl").read_text().splitlines()]
    assert content.splitlines()[1:] == ["localhost slots=1", "localhost slots=1"]


def test_srun_command_inside_a_slurm_allocation_and_its_refusal_outside():
    cfg = LaunchConfig(4, list(TRAIN), launcher="srun", launcher_args=["--mpi=pmix"], python="/py")
    assert build_command(cfg, 3, supervisor.train_args_for(TRAIN, True, 192)) == [
        "srun", "--ntasks", "3", "--kill-on-bad-exit=1", "--export=ALL,MPICAFFE_PROGRESS", "--mpi=pmix", "/py", "-m",
        "mpicaffe", "train", "--solver", "s.prototxt", "--resume", "auto", "--global-batch", "192"]
    check_launcher(cfg, {"SLURM_JOB_ID": "42"})
    with pytest.raises(UserError, match=r"^mpicaffe launch --launcher srun: not inside a Slurm allocation "
                                        r"\(SLURM_JOB_ID is not set\)[^\n]*$"):
        check_launcher(cfg, {})
    with pytest.raises(UserError, match="-H and --hostfile are for mpirun"):
        check_launcher(LaunchConfig(4, list(TRAIN), launcher="srun", hostfile="hosts"), {"SLURM_JOB_ID": "42"})
    args = cli.build_parser().parse_args(["launch", "--np", "2", "--launcher", "srun", "--launcher-args=--mpi=pmix",
                                          "--", "train", "--solver", "S"])
    assert (supervisor.config_from_args(args).launcher, supervisor.config_from_args(args).launcher_args) == \
        ("srun", ["--mpi=pmix"])


def test_srun_reports_of_dead_tasks_are_faults_and_the_job_is_relaunched(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    plan = [{"start": 0, "last": 30, "exit": 137, "lines": ["srun: error: node1: task 1: Killed",
                                                             "srun: error: node1: tasks 0,2-3: Exited with exit code 1"]},
            {"start": 20, "last": 40, "exit": 0}]
    cfg = _cfg(tmp_path, plan, np=4)
    cfg.launcher, cfg.srun = "srun", cfg.mpirun
    assert launch(cfg) == 0
    calls = _calls(tmp_path)
    assert [c[:2] for c in calls] == [["--ntasks", "4"]] * 2 and calls[1][-2:] == ["--global-batch", "192"]
    [event] = _events(tmp_path)
    assert (event["failed_ranks"], event["signals"], event["iterations_lost"]) == ([1, 0, 2, 3], {"1": 9}, 10)


def test_a_job_that_never_completes_an_iteration_is_a_configuration_error_not_retried(tmp_path, caplog):
    plan = [{"start": 0, "last": 0, "exit": 2, "lines": [f"line {i}" for i in range(30)] + ["Error: no such solver"]}]
    assert launch(_cfg(tmp_path, plan, max_restarts=3)) == 2
    assert len(_calls(tmp_path)) == 1
    message = caplog.text
    assert "Configuration error: the job exited with status 2 before completing an iteration; not relaunching" in message
    assert "Error: no such solver" in message and "line 29" in message and "line 10" not in message
    assert not os.path.exists(tmp_path / "events.jsonl")


def test_a_relaunch_that_never_completes_an_iteration_ends_the_supervisor_recording_the_fault(tmp_path):
    plan = [{"start": 0, "last": 30, "exit": 137, "died": [1]}, {"start": 20, "last": 20, "exit": 1},
            {"start": 20, "last": 40, "exit": 0}]
    assert launch(_cfg(tmp_path, plan)) == 1
    assert len(_calls(tmp_path)) == 2
    [event] = _events(tmp_path)
    assert (event["failed_ranks"], event["recovered"]) == ([1], False)


@pytest.mark.parametrize("step", [{"died": [1], "exit": 137}, {"exit": STALL_EXIT_CODE}],
                         ids=["a rank killed by a signal", "a stall"])
def test_faults_before_the_first_iteration_are_still_relaunched(tmp_path, step):
    plan = [{"start": 0, "last": 0, **step}, {"start": 0, "last": 10, "exit": 0}]
    assert launch(_cfg(tmp_path, plan)) == 0
    assert len(_calls(tmp_path)) == 2
    assert supervisor.STALL_EXIT_CODE == STALL_EXIT_CODE


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
