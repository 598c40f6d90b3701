"""Read and write Caffe's protobuf files: nets, solvers, blobs, solver states.

Text files (.prototxt) are parsed with protobuf's text format, as Caffe does, but errors name the
file, line, column and offending token. Binary files (.caffemodel, .binaryproto, .solverstate) are
protobuf wire format. Nets and solvers are upgraded from legacy formats on read, and nets are
filtered by NetState exactly as Caffe's Net::FilterNet does.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from mpicaffe import upgrade
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
BINARY_SUFFIXES = (".caffemodel", ".binaryproto", ".solverstate", ".pb")


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: expected a {what} file, found a directory") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} file: {e.strerror}") from None


def _short_type_names(text: str) -> str:
    return text.replace(f"{caffe_pb2.DESCRIPTOR.package}.", "")


def parse_text(text: str, message: Message, source: str = "<string>") -> Message:
    """Parse protobuf text format into `message` (cleared first) and return it.

    A syntax error or an unknown field raises UserError naming `source`, the line, the column,
    and showing the offending line with a caret.
    """
    message.Clear()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        detail = str(e)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        detail = _short_type_names(detail)
        where = f"{source}:{line}:{column}" if line else source
        snippet = ""
        lines = text.splitlines()
        if line and 0 < line <= len(lines):
            src_line = lines[line - 1]
            snippet = f"\n    {src_line}\n    {' ' * max(column - 1, 0)}^"
        raise UserError(f"{where}: {detail}{snippet}") from None
    return message


def read_text(path: str, message: Message, what: str) -> Message:
    """Read a text-format protobuf file into `message`; errors name the file, line and column."""
    data = _read_bytes(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not a text {what} file (byte {e.start} is not UTF-8); binary files "
            f"are read with a .caffemodel/.binaryproto/.solverstate name"
        ) from None
    return parse_text(text, message, path)


def read_binary(path: str, message: Message, what: str) -> Message:
    """Read a binary (wire-format) protobuf file into `message`."""
    data = _read_bytes(path, what)
    message.Clear()
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise UserError(f"{path}: not a valid binary {what} file ({e})") from None
    return message


def is_binary_path(path: str) -> bool:
    """True where Caffe's tools would read `path` as binary protobuf (by its suffix)."""
    return path.endswith(BINARY_SUFFIXES)


def read_net(path: str) -> caffe_pb2.NetParameter:
    """Read a NetParameter (text .prototxt or binary .caffemodel) and upgrade it if legacy."""
    net = caffe_pb2.NetParameter()
    if is_binary_path(path):
        read_binary(path, net, "net")
    else:
        read_text(path, net, "net")
    return upgrade_net_as_needed(net, path)


def upgrade_net_as_needed(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    """Upgrade a legacy net (V0, V1, input fields, BatchNorm params) as Caffe does on load."""
    if not upgrade.net_needs_upgrade(net):
        return net
    upgraded, messages = upgrade.upgrade_net(net, source)
    for m in messages:
        log.info(m)
    return upgraded


def read_solver(path: str) -> caffe_pb2.SolverParameter:
    """Read a text SolverParameter and upgrade a deprecated `solver_type`."""
    solver = read_text(path, caffe_pb2.SolverParameter(), "solver")
    if upgrade.solver_needs_upgrade(solver):
        solver, messages = upgrade.upgrade_solver(solver, path)
        for m in messages:
            log.info(m)
    default_snapshot_prefix(solver, path)
    return solver


def default_snapshot_prefix(solver: caffe_pb2.SolverParameter, path: str) -> None:
    """Caffe's UpgradeSnapshotPrefixProperty: no prefix means the solver file's path without its
    extension; a prefix naming a directory means that directory plus the solver file's stem."""
    stem = os.path.splitext(path)[0]
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = stem
        log.info("snapshot_prefix was not specified and is set to %s", solver.snapshot_prefix)
    elif os.path.isdir(solver.snapshot_prefix):
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, os.path.basename(stem))
        log.info("snapshot_prefix is a directory and is replaced by %s", solver.snapshot_prefix)


def read_blob(path: str) -> caffe_pb2.BlobProto:
    """Read a binary BlobProto (a mean file written by compute_image_mean, say)."""
    return read_binary(path, caffe_pb2.BlobProto(), "blob (.binaryproto)")


def read_solver_state(path: str) -> caffe_pb2.SolverState:
    """Read a binary SolverState (.solverstate)."""
    return read_binary(path, caffe_pb2.SolverState(), "solver state")


def to_text(message: Message) -> str:
    """Text format as Caffe's WriteProtoToTextFile prints it (two-space indent)."""
    return text_format.MessageToString(message, as_utf8=True)


def write_text(message: Message, path: str) -> None:
    """Write `message` as text format."""
    with open(path, "w") as f:
        f.write(to_text(message))


def write_binary(message: Message, path: str) -> None:
    """Write `message` in wire format."""
    with open(path, "wb") as f:
        f.write(message.SerializeToString())


# --- NetState filtering (Caffe's Net::FilterNet and Net::StateMeetsRule) ---

def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    """True if `state` satisfies every condition that `rule` sets."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_included(state: caffe_pb2.NetState, layer: caffe_pb2.LayerParameter, source: str = "") -> bool:
    """Caffe's rule: no include rules means included unless an exclude rule matches;
    with include rules, included only if one matches."""
    if layer.include and layer.exclude:
        raise UserError(
            f"{source}: layer '{layer.name}': specify either include rules or exclude rules; not both"
        )
    if layer.include:
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


def filter_net(net: caffe_pb2.NetParameter, source: str = "") -> caffe_pb2.NetParameter:
    """Return a copy of `net` keeping only the layers its `state` includes."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    for layer in net.layer:
        if layer_included(net.state, layer, source):
            filtered.layer.add().CopyFrom(layer)
    return filtered


def net_for_phase(
    net: caffe_pb2.NetParameter,
    phase: int,
    level: int = 0,
    stages: tuple[str, ...] = (),
    source: str = "",
) -> caffe_pb2.NetParameter:
    """Set the net's state as Caffe's Net(param_file, phase, level, stages) does, then filter."""
    param = caffe_pb2.NetParameter()
    param.CopyFrom(net)
    param.state.phase = phase
    param.state.level = level
    param.state.stage.extend(stages)
    return filter_net(param, source)


def phase_from_name(name: str) -> int:
    """'TRAIN'/'TEST' (any case) to the Phase enum value."""
    try:
        return caffe_pb2.Phase.Value(name.upper())
    except ValueError:
        raise UserError(f"unknown phase '{name}': use TRAIN or TEST") from None


# --- Solver nets (Caffe's Solver::InitTrainNet and Solver::InitTestNets) ---

def resolve_path(path: str, base_dir: str, field: str, source: str) -> str:
    """Find a file named in a prototxt field: relative to the working directory as Caffe does,
    else relative to `base_dir` (the folder of the file that named it)."""
    if os.path.exists(path):
        return path
    alt = os.path.join(base_dir, path)
    if not os.path.isabs(path) and os.path.exists(alt):
        return alt
    raise UserError(
        f"{source}: {field}: file not found: {path} (looked in the working directory "
        f"{os.getcwd()} and in {base_dir or '.'})"
    )


@dataclass
class SolverNets:
    """The train net and test nets a solver names, as NetParameters with their states set."""

    train: caffe_pb2.NetParameter
    train_source: str
    tests: list[caffe_pb2.NetParameter] = field(default_factory=list)
    test_sources: list[str] = field(default_factory=list)


def solver_nets(solver: caffe_pb2.SolverParameter, solver_path: str) -> SolverNets:
    """Read the nets a solver names, with Caffe's checks and NetState merging.

    The train net's state is phase TRAIN merged with the net's own state and `train_state`; test
    net i gets phase TEST merged with its state and `test_state[i]`. The nets are not filtered yet.
    """
    base = os.path.dirname(solver_path)
    train_fields = [f for f in ("train_net_param", "train_net", "net_param", "net") if solver.HasField(f)]
    if not train_fields:
        raise UserError(
            f"{solver_path}: the solver must name a train net with one of: "
            "train_net_param, train_net, net_param, net"
        )
    if len(train_fields) > 1:
        raise UserError(
            f"{solver_path}: the solver names the train net more than once ({', '.join(train_fields)}); "
            "use exactly one of train_net_param, train_net, net_param, net"
        )

    def load(field_name: str, value) -> tuple[caffe_pb2.NetParameter, str]:
        if isinstance(value, str):
            path = resolve_path(value, base, field_name, solver_path)
            return read_net(path), path
        net = caffe_pb2.NetParameter()
        net.CopyFrom(value)
        where = f"{solver_path} ({field_name})"
        return upgrade_net_as_needed(net, where), where

    f = train_fields[0]
    train, train_source = load(f, getattr(solver, f))
    state = caffe_pb2.NetState(phase=TRAIN)
    state.MergeFrom(train.state)
    state.MergeFrom(solver.train_state)
    train.state.CopyFrom(state)
    nets = SolverNets(train=train, train_source=train_source)

    has_generic = solver.HasField("net_param") or solver.HasField("net")
    n_specific = len(solver.test_net_param) + len(solver.test_net)
    n_generic = len(solver.test_iter) - n_specific if has_generic else 0
    if has_generic and n_generic < 0:
        raise UserError(f"{solver_path}: test_iter must be specified for each test network")
    n_tests = n_specific + n_generic
    if len(solver.test_iter) != n_tests:
        raise UserError(
            f"{solver_path}: test_iter must be specified for each test network "
            f"({n_tests} test nets, {len(solver.test_iter)} test_iter values)"
        )
    if solver.test_state and len(solver.test_state) != n_tests:
        raise UserError(
            f"{solver_path}: test_state must be unspecified or specified once per test net "
            f"({n_tests} test nets, {len(solver.test_state)} test_state values)"
        )
    sources = [("test_net_param", p) for p in solver.test_net_param]
    sources += [("test_net", p) for p in solver.test_net]
    generic = ("net_param", solver.net_param) if solver.HasField("net_param") else ("net", solver.net)
    sources += [generic] * n_generic
    for i, (field_name, value) in enumerate(sources):
        net, source = load(field_name, value)
        state = caffe_pb2.NetState(phase=TEST)
        state.MergeFrom(net.state)
        if solver.test_state:
            state.MergeFrom(solver.test_state[i])
        net.state.CopyFrom(state)
        nets.tests.append(net)
        nets.test_sources.append(source)
    return nets
