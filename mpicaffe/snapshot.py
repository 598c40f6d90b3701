"""Snapshots that a crash cannot half-write, a manifest of the complete ones, and `--resume auto`.

A snapshot is Caffe's pair `<prefix>_iter_<N>.caffemodel` + `<prefix>_iter_<N>.solverstate` (or
their `.h5` forms). The built-in engine writes each file atomically (temporary file, fsync,
rename: mpicaffe.atomic); real Caffe writes them in place itself, so after it returns they are
fsynced here. Only then is the pair recorded in the manifest `<prefix>.manifest.json` (itself
written atomically), with the iteration, the sha256 of both files, the number of ranks and the
global batch. The manifest is therefore the list of complete snapshots: a process killed while
writing leaves the manifest naming the previous one.

`latest_verified_snapshot(prefix)` walks the manifest from the newest entry and returns the
first whose files still hash to the recorded sums, warning about each one skipped (truncated,
bit-flipped, deleted). Snapshot files the manifest does not list are never picked up: their
completeness cannot be checked. `--keep-snapshots K` deletes the files of all but the K newest
entries once the manifest no longer names them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass

from mpicaffe.atomic import write_bytes_atomic
from mpicaffe.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "mpicaffe-snapshots/1"


@dataclass
class SnapshotRecord:
    """One complete snapshot as the manifest lists it; file names relative to the manifest's folder."""

    iteration: int
    caffemodel: str
    solverstate: str
    sha256: dict[str, str]
    ranks: int
    global_batch: int
    written: str


def check_writable(prefix: str) -> None:
    """Make the snapshot folder of `prefix` if needed and write a probe file there: a run that
    could not write its snapshots is refused at start, before any time is spent training."""
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mpicaffe-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"snapshot_prefix {prefix}: cannot write snapshots in {folder}: {e.strerror or e}") from None


def manifest_path(prefix: str) -> str:
    """The manifest of the snapshots written under `prefix` (the solver's snapshot_prefix)."""
    return prefix + ".manifest.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_manifest(prefix: str) -> list[SnapshotRecord]:
    """The manifest's records, oldest first; none when it does not exist. A manifest that is not
    ours (or was edited by hand into something unreadable) is a UserError naming the file."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"format is {found!r}, expected {MANIFEST_FORMAT!r}")
        if not isinstance(data.get("snapshots"), list):
            raise TypeError("'snapshots' is not a list")
        records = [SnapshotRecord(**entry) for entry in data["snapshots"]]
        for i, record in enumerate(records):
            _check_record(i, record)
        return records
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable snapshot manifest ({e}); move it away to start a new one") from None


def _check_record(i: int, r: SnapshotRecord) -> None:
    """Every field of a record has the type the manifest gives it (a hand edit must not get as
    far as a resume, or fail only when the next snapshot is recorded)."""
    def is_int(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    problems = [f"'{name}' is {value!r}, not an integer >= {least}" for name, value, least in
                (("iteration", r.iteration, 0), ("ranks", r.ranks, 1), ("global_batch", r.global_batch, 1))
                if not is_int(value, least)]
    problems += [f"'{name}' is {value!r}, not a file name" for name, value in
                 (("caffemodel", r.caffemodel), ("solverstate", r.solverstate))
                 if not isinstance(value, str) or not value or os.path.basename(value) != value]
    if not (isinstance(r.sha256, dict) and all(isinstance(r.sha256.get(k), str) for k in ("caffemodel", "solverstate"))):
        problems.append(f"'sha256' is {r.sha256!r}, not the two files' digests")
    if problems:
        raise ValueError(f"snapshot {i}: {'; '.join(problems)}")


def write_manifest(prefix: str, records: list[SnapshotRecord]) -> None:
    """Replace the manifest atomically with `records` (oldest first); `latest` names the newest."""
    records = sorted(records, key=lambda r: r.iteration)
    data = {"format": MANIFEST_FORMAT, "latest": asdict(records[-1]) if records else None,
            "snapshots": [asdict(r) for r in records]}
    write_bytes_atomic(manifest_path(prefix), (json.dumps(data, indent=1) + "\n").encode())


def record_snapshot(prefix: str, weights: str, state: str, iteration: int, ranks: int, global_batch: int,
                    keep: int = 0) -> SnapshotRecord:
    """After a solver wrote `weights` and `state` for `iteration`: make them durable, add them to
    the manifest (replacing an older record of the same iteration), and, with `keep` > 0, delete
    the files of all but the `keep` newest records. Returns the new record."""
    folder = os.path.dirname(os.path.abspath(manifest_path(prefix)))
    for path in (weights, state):
        if os.path.dirname(os.path.abspath(path)) != folder:
            raise UserError(f"{path}: a snapshot must be in the folder of its manifest ({folder})")
        _fsync(path)  # a no-op cost for the engine's files, needed for Caffe's in-place writes
    record = SnapshotRecord(iteration, os.path.basename(weights), os.path.basename(state),
                            {"caffemodel": file_sha256(weights), "solverstate": file_sha256(state)},
                            ranks, global_batch, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    records = [r for r in read_manifest(prefix) if r.iteration != iteration] + [record]
    records.sort(key=lambda r: r.iteration)
    dropped = records[:-keep] if keep > 0 else []
    kept = records[len(dropped):]
    write_manifest(prefix, kept)
    in_use = {name for r in kept for name in (r.caffemodel, r.solverstate)}
    for r in dropped:
        for name in (r.caffemodel, r.solverstate):
            if name not in in_use and os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        log.info("Removed the snapshot at iteration %d (--keep-snapshots %d)", r.iteration, keep)
    return record


def verify(prefix: str, record: SnapshotRecord) -> str | None:
    """Why `record`'s files are not the ones recorded (missing, or a different sha256); None when
    they are."""
    folder = os.path.dirname(os.path.abspath(manifest_path(prefix)))
    for kind, name in (("caffemodel", record.caffemodel), ("solverstate", record.solverstate)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if file_sha256(path) != record.sha256.get(kind):
            return f"{path} does not match its recorded sha256 (truncated or corrupted)"
    return None


def latest_verified_snapshot(prefix: str) -> tuple[str, SnapshotRecord] | None:
    """The newest snapshot of the manifest whose files verify, as (solver state path, record);
    None when there is none. Each newer snapshot skipped is logged as a warning with the reason."""
    folder = os.path.dirname(os.path.abspath(manifest_path(prefix)))
    for record in reversed(read_manifest(prefix)):
        problem = verify(prefix, record)
        if problem is None:
            return os.path.join(folder, record.solverstate), record
        log.warning("Skipping the snapshot at iteration %d: %s", record.iteration, problem)
    return None
