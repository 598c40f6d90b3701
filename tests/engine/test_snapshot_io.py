"""Caffe's weight and solver-state files: binary and HDF5 layouts, loading, errors."""
import logging
import os
import sys

import h5py
import numpy as np
import pytest

from mpicaffe import prototxt
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.net import Net
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from tests.engine.test_solver import make_solver, weights

SHARED = """
name: "shared"
layer { name: "data" type: "TestSeqData" top: "x" top: "t" data_param { batch_size: 2 } }
layer { name: "fc1" type: "TestLinear" bottom: "x" top: "y1" param { name: "w" } param { name: "b1" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "fc2" type: "TestLinear" bottom: "y1" top: "y2" param { name: "w" } param { name: "b2" }
        inner_product_param { num_output: 3 bias_filler { type: "gaussian" std: 1 } } }
"""


def shared_net(seed: int = 0) -> Net:
    import torch

    torch.manual_seed(seed)
    param = prototxt.parse_text(SHARED, caffe_pb2.NetParameter(), "<shared>")
    return Net(prototxt.net_for_phase(param, caffe_pb2.TRAIN), source="<shared>")


def blobs(net: Net) -> dict:
    return {(name, j): b.data.copy() for name, bl in net.params.items() for j, b in enumerate(bl)}


# --- weights ---

def test_hdf5_weights_layout_keeps_only_owned_blobs_under_data(tmp_path):
    net = shared_net()
    net.flat_diff.copy_(net.flat_data * 3)
    path = str(tmp_path / "w.caffemodel.h5")
    snapshot_io.write_caffemodel_hdf5(net, path, write_diff=True)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["data", "diff"]
        assert sorted(f["data"]) == ["data", "fc1", "fc2"]
        assert len(f["data/data"]) == 0
        assert sorted(f["data/fc1"]) == ["0", "1"]
        assert sorted(f["data/fc2"]) == ["1"]  # the shared weight is stored by its owner only
        assert sorted(f["diff/fc2"]) == ["0", "1"]
        w = f["data/fc1/0"]
        assert w.dtype == np.float32 and w.shape == (3, 3)
        np.testing.assert_array_equal(w[()], net.params["fc1"][0].data)
        np.testing.assert_array_equal(f["diff/fc2/0"][()], net.params["fc1"][0].data * 3)
    assert os.listdir(tmp_path) == ["w.caffemodel.h5"]


def test_copy_from_hdf5_round_trip_with_shared_blob(tmp_path):
    src = shared_net(0)
    path = str(tmp_path / "w.caffemodel.h5")
    snapshot_io.write_caffemodel_hdf5(src, path)
    dst = shared_net(1)
    assert not np.array_equal(dst.params["fc1"][0].data, src.params["fc1"][0].data)
    snapshot_io.copy_from_hdf5(dst, path)
    for key, value in blobs(src).items():
        np.testing.assert_array_equal(blobs(dst)[key], value, err_msg=str(key))
    assert np.shares_memory(dst.params["fc2"][0].data, dst.params["fc1"][0].data)


def test_copy_from_hdf5_ignores_unknown_layers_and_checks_shapes(tmp_path, caplog):
    net = shared_net()
    path = str(tmp_path / "w.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/other/0", data=np.zeros(2, np.float32))
        f.create_dataset("data/fc1/0", data=np.ones((3, 3), np.float32))
        f.create_dataset("data/fc1/1", data=np.full(3, 2, np.int32))
    with caplog.at_level(logging.INFO, logger="mpicaffe"):
        snapshot_io.copy_from_hdf5(net, path)
    assert "Ignoring source layer other" in caplog.messages
    np.testing.assert_array_equal(net.params["fc1"][1].data, [2, 2, 2])
    with h5py.File(path, "w") as f:
        f.create_dataset("data/fc1/0", data=np.ones((3, 2), np.float32))
        f.create_dataset("data/fc1/1", data=np.ones(3, np.float32))
    with pytest.raises(UserError, match=r"Cannot load blob from hdf5; shape mismatch. Source shape is 3 2 \(6\) "
                                        r"target shape is 3 3 \(9\)"):
        snapshot_io.copy_from_hdf5(net, path)


@pytest.mark.parametrize("datasets, message", [
    ({"data/fc2/1": np.ones(3)}, None),  # fc2's blob 0 is shared: fine to be missing
    ({"data/fc1/0": np.ones((3, 3))}, "Incompatible number of blobs for layer fc1: blob 1 is missing"),
    ({"data/fc1/0": np.ones((3, 3)), "data/fc1/1": np.ones(3), "data/fc1/2": np.ones(1)},
     "Incompatible number of blobs for layer fc1: 3 in the weights, 2 in the net"),
])
def test_copy_from_hdf5_blob_count_rules(tmp_path, datasets, message):
    path = str(tmp_path / "w.h5")
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=np.asarray(value, np.float32))
    net = shared_net()
    if message is None:
        snapshot_io.copy_from_hdf5(net, path)
        np.testing.assert_array_equal(net.params["fc2"][1].data, np.ones(3))
    else:
        with pytest.raises(UserError, match=message):
            snapshot_io.copy_from_hdf5(net, path)


def test_copy_from_hdf5_needs_data_group(tmp_path):
    path = str(tmp_path / "w.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones(1))
    with pytest.raises(UserError, match="no 'data' group"):
        snapshot_io.copy_from_hdf5(shared_net(), path)


def test_load_weights_dispatches_binary_hdf5_and_hdf5_without_suffix(tmp_path):
    src = shared_net(0)
    binary = str(tmp_path / "w.caffemodel")
    snapshot_io.write_caffemodel(src, binary)
    h5 = str(tmp_path / "w.caffemodel.h5")
    snapshot_io.write_caffemodel_hdf5(src, h5)
    odd = str(tmp_path / "weights.bin")
    os.rename(h5, odd)
    assert snapshot_io.is_hdf5_file(odd) and not snapshot_io.is_hdf5_file(binary)
    for path in (binary, odd):
        dst = shared_net(1)
        snapshot_io.load_weights(dst, path)
        for key, value in blobs(src).items():
            np.testing.assert_array_equal(blobs(dst)[key], value)


def test_binary_caffemodel_with_diff_gives_shared_blobs_the_owners_diff(tmp_path):
    net = shared_net()
    net.flat_diff.copy_(net.flat_data + 1)
    path = str(tmp_path / "w.caffemodel")
    snapshot_io.write_caffemodel(net, path, write_diff=True)
    proto = snapshot_io.read_weights(path)
    fc2 = next(lp for lp in proto.layer if lp.name == "fc2")
    np.testing.assert_array_equal(np.array(fc2.blobs[0].diff), net.params["fc1"][0].data.ravel() + 1)
    np.testing.assert_array_equal(np.array(fc2.blobs[0].data), net.params["fc1"][0].data.ravel())


def test_unwritable_path_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write weights"):
        snapshot_io.write_caffemodel(shared_net(), str(tmp_path / "file" / "w.caffemodel"))
    with pytest.raises(UserError, match="cannot write weights"):
        snapshot_io.write_caffemodel_hdf5(shared_net(), str(tmp_path / "file" / "w.caffemodel.h5"))
    assert os.listdir(tmp_path) == ["file"]


# --- solver state ---

def test_hdf5_solver_state_layout(tmp_path):
    s = make_solver(f'type: "Adam" snapshot_format: HDF5 snapshot_prefix: "{tmp_path}/h" '
                    'lr_policy: "multistep" gamma: 0.5 stepvalue: 1')
    s.step(3)
    model, state = s.snapshot()
    assert sorted(os.listdir(tmp_path)) == ["h_iter_3.caffemodel.h5", "h_iter_3.solverstate.h5"]
    with h5py.File(state, "r") as f:
        assert sorted(f) == ["current_step", "history", "iter", "learned_net"]
        assert f["iter"].dtype == np.int32 and f["iter"].shape == (1,) and f["iter"][0] == 3
        assert f["current_step"][0] == 1
        tid = f["learned_net"].id.get_type()
        assert f["learned_net"].shape == ()
        assert tid.get_strpad() == h5py.h5t.STR_NULLTERM and tid.get_size() == len(model) + 1
        assert f["learned_net"][()].rstrip(b"\0").decode() == model
        assert sorted(f["history"], key=int) == ["0", "1", "2", "3"]
        assert [f["history"][str(i)].shape for i in range(4)] == [(2, 3), (2,), (2, 3), (2,)]
        np.testing.assert_array_equal(f["history/2"][()], s.history_blobs()[2].numpy())
    with h5py.File(model, "r") as f:
        np.testing.assert_array_equal(f["data/fc/0"][()], weights(s)[0])


def test_read_solver_state_gives_the_same_for_both_formats(tmp_path):
    states = []
    for fmt in ("BINARYPROTO", "HDF5"):
        s = make_solver(f'type: "AdaDelta" snapshot_format: {fmt} snapshot_prefix: "{tmp_path}/{fmt}"')
        s.step(2)
        _, path = s.snapshot()
        states.append(snapshot_io.read_solver_state(path))
    binary, hdf5 = states
    assert (binary.iter, binary.current_step) == (hdf5.iter, hdf5.current_step) == (2, 0)
    assert binary.learned_net.endswith("BINARYPROTO_iter_2.caffemodel")
    assert hdf5.learned_net.endswith("HDF5_iter_2.caffemodel.h5")
    assert not binary.exact_shapes and hdf5.exact_shapes
    for a, b in zip(binary.history, hdf5.history):
        np.testing.assert_array_equal(a, b)


def test_state_without_learned_net_keeps_weights(tmp_path):
    s = make_solver('type: "SGD" momentum: 0.9')
    s.step(2)
    state = s.solver_state()
    path = str(tmp_path / "x.solverstate")
    snapshot_io.write_solver_state(state, path)
    fresh = make_solver('type: "SGD" momentum: 0.9 random_seed: 8')
    before = weights(fresh)
    fresh.restore(path)
    assert fresh.iter == 2
    np.testing.assert_array_equal(weights(fresh)[0], before[0])
    np.testing.assert_array_equal(fresh.history_blobs()[0].numpy(), s.history_blobs()[0].numpy())


def test_hdf5_history_shapes_must_match(tmp_path):
    path = str(tmp_path / "x.solverstate.h5")
    state = caffe_pb2.SolverState(iter=1)
    snapshot_io.write_solver_state_hdf5(state, [np.zeros(6), np.zeros(2)], path)
    s = make_solver('type: "SGD"')
    with pytest.raises(UserError, match=r"history blob 0 has shape \(6,\)"):
        s.restore(path)
    # a binary state's blobs are reshaped as Caffe's Blob::FromProto does: only the count matters
    bin_path = str(tmp_path / "x.solverstate")
    state.history.add().data.extend(np.arange(6, dtype=np.float32))
    state.history[0].shape.dim.append(6)
    state.history.add().data.extend([1, 2])
    state.history[1].shape.dim.append(2)
    snapshot_io.write_solver_state(state, bin_path)
    s.restore(bin_path)
    np.testing.assert_array_equal(s.history_blobs()[0].numpy(), np.arange(6).reshape(2, 3))


def test_missing_h5py_is_a_clear_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(UserError, match="need h5py: pip install h5py"):
        snapshot_io.write_caffemodel_hdf5(shared_net(), str(tmp_path / "w.caffemodel.h5"))
    with pytest.raises(UserError, match="need h5py"):
        make_solver(f'snapshot_format: HDF5 snapshot: 2 snapshot_prefix: "{tmp_path}/x"')


def test_snapshot_filename():
    assert snapshot_io.snapshot_filename("snap/lenet", 500, ".caffemodel") == "snap/lenet_iter_500.caffemodel"
