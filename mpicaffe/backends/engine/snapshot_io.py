"""Caffe's weight and solver-state files: .caffemodel(.h5) and .solverstate(.h5).

Binary files are the protobuf messages Caffe writes (NetParameter, SolverState). HDF5 files use
Caffe's layout: a weights file has groups `data/<layer>/<i>` (owner parameters only) and, with
snapshot_diff, `diff/<layer>/<i>`; a solver state has int datasets `iter` and `current_step`, a
string `learned_net` and a group `history/<i>`. HDF5 needs h5py.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from mpicaffe import prototxt
from mpicaffe.atomic import write_bytes_atomic, write_file_atomic
from mpicaffe.backends.engine.net import Net, ParamInfo, blob_proto_to_tensor
from mpicaffe.data.mean_file import array_to_blobproto
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def require_h5py():
    """The h5py module, or a UserError saying how to get it."""
    try:
        import h5py
    except ImportError:
        raise UserError("HDF5 snapshots (.caffemodel.h5, .solverstate.h5, snapshot_format: HDF5) need h5py: "
                        "pip install h5py (or mpicaffe[hdf5]), or use snapshot_format: BINARYPROTO") from None
    return h5py


def is_hdf5_file(path: str) -> bool:
    """True for a name ending in .h5 (Caffe's test) or a file starting with HDF5's signature."""
    if path.endswith(".h5"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def snapshot_filename(prefix: str, iter: int, extension: str) -> str:
    """Caffe's SnapshotFilename: `<prefix>_iter_<iter><extension>`."""
    return f"{prefix}_iter_{iter}{extension}"


def _open_error(path: str, what: str, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write {what}: {e.strerror or e}")


# --- weights ---

def write_caffemodel(net: Net, path: str, write_diff: bool = False) -> None:
    """Write the net's weights as a binary NetParameter (Caffe's Net::ToProto + WriteProtoToBinaryFile)."""
    proto = net.to_proto(write_diff)
    try:
        write_bytes_atomic(path, proto.SerializeToString())
    except OSError as e:
        raise _open_error(path, "weights", e) from None


def _flat_slice(flat: torch.Tensor, info: ParamInfo) -> torch.Tensor:
    return flat[info.offset:info.offset + info.count].detach().cpu()


def write_caffemodel_hdf5(net: Net, path: str, write_diff: bool = False) -> None:
    """Write the net's weights in Caffe's HDF5 layout (Net::ToHDF5): every layer gets a group under
    `data` holding its owned parameter blobs; `diff` (if asked) holds every blob's diff."""
    h5py = require_h5py()

    def write(p: str) -> None:
        with h5py.File(p, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if write_diff else None
            for layer in net.layers:
                lg = data.create_group(layer.name)
                dg = diff.create_group(layer.name) if diff is not None else None
                for j, t in enumerate(layer.blobs):
                    info, owner = net.blob_owner(layer.name, j)
                    if owner:
                        lg.create_dataset(str(j), data=_flat_slice(net.flat_data, info).numpy().reshape(t.shape))
                    if dg is not None:
                        dg.create_dataset(str(j), data=_flat_slice(net.flat_diff, info).numpy().reshape(t.shape))

    try:
        write_file_atomic(path, write)
    except OSError as e:
        raise _open_error(path, "weights", e) from None


def _shape_string(shape) -> str:
    return " ".join(str(d) for d in shape) + f" ({int(np.prod(shape, dtype=np.int64))})"


def copy_from_hdf5(net: Net, path: str) -> None:
    """Copy weights by layer name from a Caffe .caffemodel.h5 (Net::CopyTrainedLayersFromHDF5).

    Layers missing from the net are ignored; a blob missing from the file is an error unless the
    net shares it from another layer; shapes must match exactly.
    """
    h5py = require_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: cannot open HDF5 weights: {e}") from None
    with f:
        if "data" not in f:
            raise UserError(f"{path}: Error reading weights: no 'data' group (not a Caffe HDF5 weights file)")
        data = f["data"]
        for name in data:
            if name not in net.layer_names:
                log.info("Ignoring source layer %s", name)
                continue
            layer = net.layer(name)
            group = data[name]
            if len(group) > len(layer.blobs):
                raise UserError(f"{path}: Incompatible number of blobs for layer {name}: {len(group)} in the "
                                f"weights, {len(layer.blobs)} in the net")
            for j, target in enumerate(layer.blobs):
                if str(j) not in group:
                    if not net.blob_owner(name, j)[1]:
                        continue  # shared in the net: its owner's weights come from the owner's layer
                    raise UserError(f"{path}: Incompatible number of blobs for layer {name}: blob {j} is missing")
                ds = group[str(j)]
                if ds.dtype.kind not in "fiu":
                    raise UserError(f"{path}: data/{name}/{j}: datatype {ds.dtype} is not a number type")
                if tuple(ds.shape) != tuple(target.shape):
                    raise UserError(f"{path}: Cannot load blob from hdf5; shape mismatch. Source shape is "
                                    f"{_shape_string(ds.shape)} target shape is {_shape_string(target.shape)} "
                                    f"(layer '{name}', blob {j})")
                with torch.no_grad():
                    target.copy_(torch.from_numpy(np.asarray(ds, dtype=np.float32)).view(target.shape))


def read_weights(path: str) -> caffe_pb2.NetParameter:
    """A binary .caffemodel, upgraded if legacy (Caffe's ReadNetParamsFromBinaryFileOrDie)."""
    param = prototxt.read_binary(path, caffe_pb2.NetParameter(), "weights (.caffemodel)")
    return prototxt.upgrade_net_as_needed(param, path)


def load_weights(net: Net, path: str) -> None:
    """Caffe's Net::CopyTrainedLayersFrom(filename): HDF5 or binary proto weights, by layer name."""
    if is_hdf5_file(path):
        copy_from_hdf5(net, path)
    else:
        weights = read_weights(path)
        if not weights.layer and any(layer.blobs for layer in net.layers):
            # Caffe reads an empty file as a net without layers and copies nothing: random weights
            raise UserError(f"{path}: holds no layers, so no weights for this net (an empty or truncated file?)")
        net.copy_from(weights, source=path)


# --- solver state ---

@dataclass
class SolverStateData:
    """What a .solverstate(.h5) holds; `history` in Caffe's order, each with its stored shape."""

    iter: int
    current_step: int
    learned_net: str | None
    history: list[np.ndarray] = field(default_factory=list)
    exact_shapes: bool = False  # HDF5 history must match shapes; binary only counts (Blob::FromProto)


def write_solver_state(state: caffe_pb2.SolverState, path: str) -> None:
    """Write a binary SolverState."""
    try:
        write_bytes_atomic(path, state.SerializeToString())
    except OSError as e:
        raise _open_error(path, "solver state", e) from None


def _write_h5_string(h5py, f, name: str, value: str) -> None:
    # H5LTmake_dataset_string: a scalar, fixed-length, NUL-terminated C string
    raw = value.encode() + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    ds = h5py.h5d.create(f.id, name.encode(), tid, space)
    ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"), mtype=tid)


def write_solver_state_hdf5(state: caffe_pb2.SolverState, history: list[np.ndarray], path: str) -> None:
    """Write a solver state in Caffe's HDF5 layout (SGDSolver::SnapshotSolverStateToHDF5); `history`
    replaces the state's history blobs, which are not read."""
    h5py = require_h5py()

    def write(p: str) -> None:
        with h5py.File(p, "w") as f:
            f.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
            if state.HasField("learned_net"):
                _write_h5_string(h5py, f, "learned_net", state.learned_net)
            f.create_dataset("current_step", data=np.array([state.current_step], dtype=np.int32))
            g = f.create_group("history")
            for i, h in enumerate(history):
                g.create_dataset(str(i), data=np.asarray(h, dtype=np.float32))

    try:
        write_file_atomic(path, write)
    except OSError as e:
        raise _open_error(path, "solver state", e) from None


def _h5_int(f, name: str, path: str) -> int:
    if name not in f:
        raise UserError(f"{path}: solver state has no '{name}' dataset")
    return int(np.asarray(f[name]).reshape(-1)[0])


def read_solver_state(path: str) -> SolverStateData:
    """Read a .solverstate (binary) or .solverstate.h5 (by the .h5 suffix, as Caffe's Restore)."""
    if path.endswith(".h5"):
        h5py = require_h5py()
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"{path}: Couldn't open solver state file: {e}") from None
        with f:
            learned = None
            if "learned_net" in f:
                raw = f["learned_net"][()]
                learned = (os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)).rstrip("\0")
            if "history" not in f:
                raise UserError(f"{path}: Error reading history: no 'history' group")
            g = f["history"]
            history = []
            for i in range(len(g)):
                if str(i) not in g:
                    raise UserError(f"{path}: history/{i} is missing")
                history.append(np.asarray(g[str(i)], dtype=np.float32))
            return SolverStateData(_h5_int(f, "iter", path), _h5_int(f, "current_step", path), learned,
                                   history, exact_shapes=True)
    state = prototxt.read_solver_state(path)
    history = [blob_proto_array(bp) for bp in state.history]
    learned = state.learned_net if state.HasField("learned_net") else None
    if isinstance(learned, bytes):  # protobuf's value for a string that is not UTF-8: a path still, as for Caffe
        learned = os.fsdecode(learned)
    return SolverStateData(state.iter, state.current_step, learned, history)


def blob_proto_array(bp: caffe_pb2.BlobProto) -> np.ndarray:
    """A BlobProto's data as a float32 array of its shape."""
    return blob_proto_to_tensor(bp).numpy()


def resolve_learned_net(learned_net: str, state_path: str) -> str:
    """The weights file a solver state names: as stored (Caffe opens it relative to the working
    directory); failing that, the same file name next to the state file (a moved snapshot folder)."""
    if os.path.isfile(learned_net):
        return learned_net
    beside = os.path.join(os.path.dirname(state_path), os.path.basename(learned_net))
    if os.path.basename(learned_net) and os.path.isfile(beside):
        return beside
    raise UserError(f"{state_path}: the solver state's learned_net {learned_net!r} was not found (looked in "
                    f"the working directory {os.getcwd()} and next to the state file)")


@dataclass
class ResumeState:
    """A snapshot as rank 0 read it, to be restored on every rank: a binary SolverState without
    learned_net, and the bytes of the weights file it named."""

    iter: int
    current_step: int
    state: bytes
    weights: bytes | None
    weights_suffix: str


def read_resume_state(path: str) -> ResumeState:
    """Read a .solverstate(.h5) and the weights it names (as Caffe finds them, or next to it)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: solver state file not found")
    data = read_solver_state(path)
    state = caffe_pb2.SolverState(iter=data.iter, current_step=data.current_step)
    state.history.extend(array_to_blobproto(h) for h in data.history)
    weights, suffix = None, ""
    if data.learned_net:
        weights_path = resolve_learned_net(data.learned_net, path)
        with open(weights_path, "rb") as f:
            weights = f.read()
        suffix = ".caffemodel.h5" if weights_path.endswith(".h5") else ".caffemodel"
    return ResumeState(data.iter, data.current_step, state.SerializeToString(), weights, suffix)
