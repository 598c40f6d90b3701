"""Snapshot manifest: records with checksums, newest verified snapshot first, corrupt ones skipped
with a warning, --keep-snapshots; and the signal handlers' agreement at an iteration boundary."""
import json
import logging
import os
import re
import signal

import pytest

from mpicaffe import snapshot
from mpicaffe.errors import UserError
from mpicaffe.parallel.comm import Communicator
from mpicaffe.signals import STOPPED_EXIT_CODE, RunControl
from mpicaffe.supervisor import STOPPED_EXIT_CODE as SUPERVISOR_STOPPED


def _write_pair(prefix, iteration, payload=b"weights"):
    weights, state = f"{prefix}_iter_{iteration}.caffemodel", f"{prefix}_iter_{iteration}.solverstate"
    with open(weights, "wb") as f:
        f.write(payload * 100 + str(iteration).encode())
    with open(state, "wb") as f:
        f.write(b"state" * 50 + str(iteration).encode())
    return weights, state


def _record(prefix, iteration, keep=0):
    weights, state = _write_pair(prefix, iteration)
    return snapshot.record_snapshot(prefix, weights, state, iteration, ranks=3, global_batch=192, keep=keep)


def test_manifest_names_the_newest_complete_snapshot_with_checksums(tmp_path):
    prefix = str(tmp_path / "net")
    _record(prefix, 10)
    _record(prefix, 20)
    with open(snapshot.manifest_path(prefix)) as f:
        data = json.load(f)
    assert data["latest"]["iteration"] == 20
    assert [r["iteration"] for r in data["snapshots"]] == [10, 20]
    assert data["latest"]["sha256"]["caffemodel"] == snapshot.file_sha256(f"{prefix}_iter_20.caffemodel")
    assert (data["latest"]["ranks"], data["latest"]["global_batch"]) == (3, 192)
    path, record = snapshot.latest_verified_snapshot(prefix)
    assert path == f"{prefix}_iter_20.solverstate" and record.iteration == 20


def test_truncated_and_bit_flipped_snapshots_are_skipped_with_a_warning(tmp_path, caplog):
    prefix = str(tmp_path / "net")
    for it in (10, 20, 30):
        _record(prefix, it)
    with open(f"{prefix}_iter_30.caffemodel", "r+b") as f:      # truncated
        f.truncate(100)
    with open(f"{prefix}_iter_20.solverstate", "r+b") as f:     # one bit flipped
        f.seek(7)
        byte = f.read(1)[0]
        f.seek(7)
        f.write(bytes([byte ^ 0x04]))
    with caplog.at_level(logging.WARNING, logger="mpicaffe"):
        path, record = snapshot.latest_verified_snapshot(prefix)
    assert record.iteration == 10 and path.endswith("net_iter_10.solverstate")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("iteration 30" in w and "net_iter_30.caffemodel" in w for w in warnings), warnings
    assert any("iteration 20" in w and "net_iter_20.solverstate" in w for w in warnings), warnings


def test_no_manifest_or_nothing_verified_means_a_fresh_start(tmp_path):
    prefix = str(tmp_path / "net")
    assert snapshot.latest_verified_snapshot(prefix) is None
    _write_pair(prefix, 10)                       # written but never recorded: not trusted
    assert snapshot.latest_verified_snapshot(prefix) is None
    _record(prefix, 20)
    os.remove(f"{prefix}_iter_20.solverstate")
    assert snapshot.latest_verified_snapshot(prefix) is None


def test_keep_snapshots_deletes_the_oldest_files(tmp_path):
    prefix = str(tmp_path / "net")
    for it in (10, 20, 30, 40):
        _record(prefix, it, keep=2)
    assert [r.iteration for r in snapshot.read_manifest(prefix)] == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ["net.manifest.json", "net_iter_30.caffemodel", "net_iter_30.solverstate",
                                            "net_iter_40.caffemodel", "net_iter_40.solverstate"]


def test_an_unreadable_manifest_is_a_user_error_naming_it(tmp_path):
    prefix = str(tmp_path / "net")
    with open(snapshot.manifest_path(prefix), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match=r"net\.manifest\.json: not a readable snapshot manifest"):
        snapshot.latest_verified_snapshot(prefix)


def test_signals_are_counted_and_acted_upon_at_the_boundary():
    control = RunControl(Communicator(), sigint_effect="none", sighup_effect="snapshot")
    # what was there before (Python's KeyboardInterrupt handler, or SIG_IGN in a background job)
    before = signal.getsignal(signal.SIGINT)
    control.install()
    try:
        assert not control.at_boundary(1).snapshot
        os.kill(os.getpid(), signal.SIGHUP)
        action = control.at_boundary(2)
        assert (action.snapshot, action.stop) == (True, False) and "SIGHUP" in action.reason
        os.kill(os.getpid(), signal.SIGINT)            # effect none: no KeyboardInterrupt, nothing to do
        action = control.at_boundary(3)
        assert (action.snapshot, action.stop) == (False, False) and "SIGINT" in action.reason
        os.kill(os.getpid(), signal.SIGUSR1)
        action = control.at_boundary(4)
        assert (action.snapshot, action.stop) == (True, True)
        assert not control.at_boundary(5).stop          # each request is acted upon once
    finally:
        control.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_the_snapshot_timer_requests_a_snapshot():
    control = RunControl(Communicator(), snapshot_every_minutes=1e-9)
    assert control.at_boundary(1).snapshot
    control = RunControl(Communicator(), snapshot_every_minutes=60)
    assert not control.at_boundary(1).snapshot


def test_bad_effects_are_refused_and_exit_codes_agree():
    with pytest.raises(UserError, match="--sigint-effect quit: must be one of snapshot, stop, none"):
        RunControl(Communicator(), sigint_effect="quit")
    assert STOPPED_EXIT_CODE == SUPERVISOR_STOPPED


@pytest.mark.parametrize("text,problem", [
    ("[1, 2, 3]", "format is 'list'"),
    ('{"format": "mpicaffe-snapshots/1", "snapshots": 5}', "'snapshots' is not a list"),
    ("RECORD:iteration=12.5", "'iteration' is 12.5, not an integer >= 0"),
    ("RECORD:iteration=true", "'iteration' is True, not an integer >= 0"),
    ("RECORD:ranks=0", "'ranks' is 0, not an integer >= 1"),
    ('RECORD:caffemodel="../../elsewhere.caffemodel"', "not a file name"),
    ("RECORD:sha256=null", "'sha256' is None"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_field(tmp_path, text, problem):
    prefix = str(tmp_path / "s")
    if text.startswith("RECORD:"):
        field, value = text[len("RECORD:"):].split("=", 1)
        record = {"iteration": 10, "caffemodel": "s_iter_10.caffemodel", "solverstate": "s_iter_10.solverstate",
                  "sha256": {"caffemodel": "0" * 64, "solverstate": "0" * 64}, "ranks": 2, "global_batch": 64,
                  "written": "2026-12-05T00:00:00+0000"}
        record[field] = json.loads(value)
        text = json.dumps({"format": snapshot.MANIFEST_FORMAT, "latest": record, "snapshots": [record]})
    with open(snapshot.manifest_path(prefix), "w") as f:
        f.write(text)
    with pytest.raises(UserError, match=re.escape(problem)):
        snapshot.read_manifest(prefix)
