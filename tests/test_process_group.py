"""`--comm`: what carries the gradients for each choice and set of rank devices, and the flags it
cannot go with (mpicaffe.parallel.process_group.choose_comm, TrainConfig.check)."""
import pytest

from mpicaffe.config import TrainConfig
from mpicaffe.errors import UserError
from mpicaffe.parallel.process_group import _rank0_address, choose_comm


@pytest.mark.parametrize("requested,devices,nccl,chosen", [
    ("mpi", ["cuda:0", "cuda:1"], [True, True], "mpi"),
    ("gloo", ["cpu", "cpu"], [False, False], "gloo"),
    ("gloo", ["cuda:0", "cpu"], [True, False], "gloo"),
    ("nccl", ["cuda:0", "cuda:1"], [True, True], "nccl"),
    ("auto", ["cuda:0", "cuda:1"], [True, True], "nccl"),
    ("auto", ["cuda:0", "cpu"], [True, True], "mpi"),      # mixed CPU/GPU ranks: MPI
    ("auto", ["cuda:0", "cuda:0"], [True, False], "mpi"),  # a rank's PyTorch without NCCL
    ("auto", ["cpu"], [False], "mpi"),
])
def test_comm_choice_follows_the_ranks_devices(requested, devices, nccl, chosen):
    assert choose_comm(requested, devices, nccl) == chosen


@pytest.mark.parametrize("devices,nccl,message", [
    (["cpu"], [True], "--comm nccl needs every rank on a CUDA device, but this process runs on cpu"),
    (["cuda:0", "cpu"], [True, True], "but rank 1 runs on cpu"),
    (["cuda:0", "cuda:1"], [True, False], "rank 1's PyTorch has no NCCL"),
])
def test_nccl_without_cuda_is_refused_naming_the_rank(devices, nccl, message):
    with pytest.raises(UserError, match=message):
        choose_comm("nccl", devices, nccl)


@pytest.mark.parametrize("options,backend,message", [
    ({"comm": "gloo"}, "caffe", "--comm gloo needs the built-in engine"),
    ({"comm": "nccl", "fault_tolerance": "ulfm"}, "engine", "--comm nccl cannot be combined with --fault-tolerance"),
    ({"comm": "tcp"}, "engine", "--comm tcp: expected"),
])
def test_comm_flags_that_cannot_go_together_are_refused(options, backend, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(solver="s.prototxt", **options).check(backend, 2)


def test_auto_goes_with_ulfm_and_the_caffe_backend():
    TrainConfig(solver="s.prototxt", comm="auto", fault_tolerance="ulfm").check("engine", 2)
    TrainConfig(solver="s.prototxt", comm="auto").check("caffe", 2)


def test_rendezvous_address_is_local_on_one_node_and_configurable(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert _rank0_address(["node1", "node1"]) == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert _rank0_address(["node1", "node2"]) == "10.0.0.7"

