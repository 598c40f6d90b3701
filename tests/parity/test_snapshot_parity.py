"""Snapshot parity: .caffemodel and .solverstate (binary and HDF5) cross between the backends.

The writer (Caffe or the engine) trains 6 steps and snapshots; 6 steps is two passes over the
LMDB, so the writer's data cursor is back at the first record, as it is in a fresh solver. Then
the writer goes on for 10 steps while a fresh solver of the *other* backend and a fresh one of
the writer's backend restore the snapshot and run the same 10 steps: all three must agree
(losses per step, final weights) within the parity tolerance of tests/parity/common.py, and the
restored weights must be bit-identical to the written ones.

File level: each backend's .caffemodel loads into the other's net bit-exactly; the engine's
.caffemodel holds the same layer messages and blobs Caffe writes for the same net (Caffe's file
adds the Split layers it inserts); the
.solverstate messages agree in iter, current_step, learned_net and history shapes; HDF5 files
have Caffe's groups, datasets, shapes and dtypes.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.solver import get_solver
from mpicaffe.proto import caffe_pb2
from tests.parity import solver_setup
from tests.parity.common import assert_close, compare_params, copy_params, pycaffe

SOLVER = ('type: "{type}" base_lr: 0.05 momentum: 0.9 {extra} lr_policy: "multistep" gamma: 0.5 '
          'stepvalue: 2 stepvalue: 4 stepvalue: 9 weight_decay: 0.001 snapshot_format: {fmt}')
TYPES = {"SGD": "", "Adam": "momentum2: 0.999", "AdaDelta": "delta: 1e-6"}
FIRST, MORE = 6, 10

# cases where the engine is known to differ from Caffe: {case id: reason}
KNOWN_DIFFERENCES: dict[str, str] = {}


class Backends:
    """Builds solvers of either backend on the shared problem."""

    def __init__(self, tmp_path, solver_type: str, fmt: str):
        pycaffe()
        net = solver_setup.write_problem(tmp_path)
        body = SOLVER.format(type=solver_type, extra=TYPES[solver_type], fmt=fmt)
        self.path = solver_setup.write_solver(tmp_path, net, body)

    def make(self, which: str, prefix: str):
        from mpicaffe.backends.caffe import CaffeSolver

        param = prototxt.read_solver(self.path)
        param.snapshot_prefix = prefix
        return CaffeSolver(self.path, param) if which == "caffe" else get_solver(param, self.path)


def run(solver, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        solver.step(1)
        losses.append(solver.loss)
    return losses


def _case_ids():
    out = []
    for fmt in ("BINARYPROTO", "HDF5"):
        for t in TYPES:
            for writer in ("caffe", "engine"):
                cid = f"{writer}-writes-{t}-{fmt}"
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[cid])] if cid in KNOWN_DIFFERENCES else []
                out.append(pytest.param(writer, t, fmt, id=cid, marks=marks))
    return out


@pytest.mark.parametrize("writer, solver_type, fmt", _case_ids())
def test_restore_in_the_other_backend_continues_identically(writer, solver_type, fmt, tmp_path):
    b = Backends(tmp_path, solver_type, fmt)
    other = "engine" if writer == "caffe" else "caffe"
    w = b.make(writer, str(tmp_path / "w"))
    if writer == "engine":  # start from Caffe's filled weights: the engine draws its own
        copy_params(b.make("caffe", str(tmp_path / "init")).net, w.net)
    run(w, FIRST)
    model, state = w.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model == f"{tmp_path}/w_iter_{FIRST}.caffemodel{suffix}"
    assert state == f"{tmp_path}/w_iter_{FIRST}.solverstate{suffix}"
    written = {name: [blob.data.copy() for blob in blobs] for name, blobs in w.net.params.items()}

    restored = {}
    for which in (other, writer):
        r = b.make(which, str(tmp_path / f"r_{which}"))
        r.restore(state)
        assert r.iter == FIRST, which
        for name, blobs in written.items():
            for j, data in enumerate(blobs):
                np.testing.assert_array_equal(r.net.params[name][j].data, data, err_msg=f"{which}: {name}[{j}]")
        restored[which] = r

    reference = run(w, MORE)
    for which, r in restored.items():
        losses = run(r, MORE)
        assert_close(losses, reference, f"{which} restoring {writer}'s {fmt} snapshot: losses")
        compare_params(r.net, w.net, f"{which} restoring {writer}'s {fmt} snapshot: weights")
        assert r.iter == w.iter == FIRST + MORE


def _snapshots(tmp_path, fmt: str = "BINARYPROTO"):
    """Both backends trained 3 steps from the same weights, snapshotted: {which: (model, state, solver)}."""
    b = Backends(tmp_path, "Adam", fmt)
    out = {}
    caffe_solver = b.make("caffe", str(tmp_path / "snap_c"))
    engine = b.make("engine", str(tmp_path / "snap_e"))
    copy_params(caffe_solver.net, engine.net)
    for which, s in (("caffe", caffe_solver), ("engine", engine)):
        run(s, 3)
        out[which] = (*s.snapshot(), s)
    return out


def test_caffemodels_load_in_the_other_backend_bit_exactly(tmp_path):
    snaps = _snapshots(tmp_path)
    caffe = pycaffe()
    net_path = str(tmp_path / "mlp.prototxt")
    # the engine's file in Caffe's C++ reader
    cnet = caffe.Net(net_path, caffe.TEST, weights=snaps["engine"][0])
    for name, blobs in snaps["engine"][2].net.params.items():
        for j, blob in enumerate(blobs):
            np.testing.assert_array_equal(cnet.params[name][j].data, blob.data, err_msg=f"{name}[{j}]")
    # Caffe's file in the engine's reader
    engine = snaps["engine"][2]
    snapshot_io.load_weights(engine.net, snaps["caffe"][0])
    for name, blobs in snaps["caffe"][2].net.params.items():
        for j, blob in enumerate(blobs):
            np.testing.assert_array_equal(engine.net.params[name][j].data, blob.data, err_msg=f"{name}[{j}]")


RICH_NET = """name: "rich"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _rich_models(tmp_path, phase: int) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter]:
    """(engine's, Caffe's) .caffemodel of RICH_NET in `phase`, with the same weights, parsed."""
    from tests.parity.common import caffe_net, engine_net

    pycaffe()
    cnet = caffe_net(RICH_NET, phase, tmp_path / "rich.prototxt")
    enet = engine_net(RICH_NET, phase)
    copy_params(cnet, enet)
    cnet.save(str(tmp_path / "caffe.caffemodel"))
    snapshot_io.write_caffemodel(enet, str(tmp_path / "engine.caffemodel"))
    return tuple(prototxt.read_binary(str(tmp_path / f"{w}.caffemodel"), caffe_pb2.NetParameter(), "weights")
                 for w in ("engine", "caffe"))


def _without_splits(model: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    """Caffe's layers minus the Split layers its Net inserts, bottoms renamed back to the split blobs."""
    source = {}
    for lp in model.layer:
        if lp.type == "Split":
            source.update({t: lp.bottom[0] for t in lp.top})
    out = []
    for lp in model.layer:
        if lp.type != "Split":
            lp = _copy(lp)
            names = [source.get(b, b) for b in lp.bottom]
            del lp.bottom[:]
            lp.bottom.extend(names)
            out.append(lp)
    return out


def _copy(lp: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(lp)
    return out


def _compare_layers(engine: list, caffe: list) -> None:
    assert [lp.name for lp in engine] == [lp.name for lp in caffe]
    for e, c in zip(engine, caffe):
        e, c = _copy(e), _copy(c)
        assert [tuple(bp.shape.dim) for bp in e.blobs] == [tuple(bp.shape.dim) for bp in c.blobs], c.name
        for j, (eb, cb) in enumerate(zip(e.blobs, c.blobs)):
            np.testing.assert_array_equal(eb.data, cb.data, err_msg=f"{c.name} blob {j}")
        e.ClearField("blobs")
        c.ClearField("blobs")
        assert e == c, f"layer {c.name}: engine writes\n{e}\nCaffe writes\n{c}"


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST], ids=["TRAIN", "TEST"])
def test_caffemodel_messages_match_caffes(phase, tmp_path):
    """Layer by layer the same messages and blobs as Caffe's Net::ToProto, except for Caffe's
    Split layers (internal; weights load by layer name). Both add loss_weight: 1 to loss layers."""
    engine, caffe = _rich_models(tmp_path, phase)
    assert engine.name == caffe.name
    assert {f.name for f, _ in engine.ListFields()} == {f.name for f, _ in caffe.ListFields()} == {"name", "layer"}
    _compare_layers(list(engine.layer), _without_splits(caffe))


def test_solverstate_messages_match_caffes(tmp_path):
    snaps = _snapshots(tmp_path)
    states = {w: prototxt.read_solver_state(snaps[w][1]) for w in snaps}
    c, e = states["caffe"], states["engine"]
    assert (e.iter, e.current_step) == (c.iter, c.current_step)
    assert e.learned_net == snaps["engine"][0] and c.learned_net == snaps["caffe"][0]
    assert [tuple(h.shape.dim) for h in e.history] == [tuple(h.shape.dim) for h in c.history]
    assert len(c.history) == 2 * 4  # Adam: m then v, for each of the 4 parameter blobs
    for i, (eh, ch) in enumerate(zip(e.history, c.history)):
        assert_close(eh.data, ch.data, f"history {i}")


def test_hdf5_files_have_caffes_layout(tmp_path):
    snaps = _snapshots(tmp_path, "HDF5")

    def layout(path):
        entries = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: entries.__setitem__(
                name, (obj.shape, obj.dtype.str) if isinstance(obj, h5py.Dataset) else "group"))
        return entries

    for i in (0, 1):
        assert layout(snaps["engine"][i]) == layout(snaps["caffe"][i]), snaps["engine"][i]
