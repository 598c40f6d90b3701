"""Device selection per rank: --gpu lists, 'all', solver_mode GPU, the CPU fallback."""
import pytest
import torch

from mpicaffe.devices import rank_device, select_device
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2


def test_cpu_by_default_and_when_solver_asks_for_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device(None) == "cpu"
    solver = caffe_pb2.SolverParameter(solver_mode=caffe_pb2.SolverParameter.GPU, device_id=1)
    assert select_device(None, solver, local_rank=1) == "cpu"
    with pytest.raises(UserError, match="--gpu 0: no CUDA device"):
        select_device("0")


def test_gpu_lists_are_spread_over_local_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [select_device("2,3", local_rank=r) for r in range(3)] == ["cuda:2", "cuda:3", "cuda:2"]
    assert [select_device("all", local_rank=r) for r in (0, 5)] == ["cuda:0", "cuda:1"]
    solver = caffe_pb2.SolverParameter(solver_mode=caffe_pb2.SolverParameter.GPU, device_id=3)
    assert select_device(None, solver, local_rank=2) == "cuda:1"
    with pytest.raises(UserError, match="there are 4 CUDA devices"):
        select_device("7")
    with pytest.raises(UserError, match="comma-separated GPU ids"):
        select_device("x")


def test_devices_gives_each_rank_its_entry_or_one_for_all(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [rank_device("cuda:0,cuda:1,cpu", r, 3) for r in range(3)] == ["cuda:0", "cuda:1", "cpu"]
    assert [rank_device("cpu", r, 4) for r in range(4)] == ["cpu"] * 4
    assert rank_device("cuda", 1, 2) == "cuda:0"
    with pytest.raises(UserError, match="one device for all ranks or one per rank \\(3\\), not 2"):
        rank_device("cpu,cpu", 0, 3)
    with pytest.raises(UserError, match="'gpu1' is not"):
        rank_device("gpu1,cpu", 0, 2)
    with pytest.raises(UserError, match="rank 0 is to use cuda:2, but its node has 2"):
        rank_device("cuda:2,cpu", 0, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("cuda:0,cpu", 1, 2) == "cpu"
    with pytest.raises(UserError, match="no CUDA device is available"):
        rank_device("cuda:0,cpu", 0, 2)
