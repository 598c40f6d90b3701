"""How MPI reaches a tensor (mpicaffe.parallel.buffers) and the reducers that use it, without MPI:
CPU tensors are exchanged through views of their own memory; any other tensor only through a
staged host copy (or, with CUDA-aware MPI, the tensor itself), never through `.numpy()`.

The CUDA parts themselves (pinned memory, events, a CUDA-aware MPI reading device pointers)
need a GPU: here the staging and device paths run on CPU tensors, forced with `mode`."""
import numpy as np
import pytest
import torch

from mpicaffe import prototxt
from mpicaffe.backends.engine.net import Net
from mpicaffe.parallel import buffers
from mpicaffe.parallel.buffers import HostBuffer
from mpicaffe.parallel.comm import Communicator, _DoneRequest
from mpicaffe.parallel.reducer import BucketReducer, FusedReducer, ProcessGroupReducer
from mpicaffe.proto import caffe_pb2

NET = """
layer { name: "x" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "c" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "i" type: "InnerProduct" bottom: "c" top: "i"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "l" type: "SoftmaxWithLoss" bottom: "i" bottom: "y" top: "l" }
"""


def _net() -> Net:
    torch.manual_seed(0)
    net = Net(prototxt.net_for_phase(prototxt.parse_text(NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN))
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((4, 2, 6, 6))
    net.blobs["y"].data[...] = rng.integers(0, 5, 4)
    return net


class TwinRanks(Communicator):
    """Two ranks holding the same values, in one process: a sum doubles. Records what MPI is given."""

    size = 2

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def Allreduce_sum(self, buf) -> None:
        self.calls.append(("Allreduce", buf))
        buf *= 2

    def Iallreduce_sum(self, buf):
        self.calls.append(("Iallreduce", buf))
        buf *= 2
        return _DoneRequest()

    def Bcast(self, buf, root: int = 0) -> None:
        self.calls.append(("Bcast", buf))


def test_a_cpu_tensor_is_exchanged_through_a_view_of_its_own_memory():
    t = torch.arange(6, dtype=torch.float32)
    b = HostBuffer(t)
    assert b.mode == "view" and isinstance(b.message, np.ndarray)
    assert b.message.__array_interface__["data"][0] == t.data_ptr()
    part = b.part(2, 5)
    part.message[...] = -1  # a bucket writes straight into the tensor
    assert t.tolist() == [0, 1, -1, -1, -1, 5]
    b.stage()
    assert b.ready()
    b.unstage()


def test_a_staged_tensor_is_copied_to_the_host_before_and_back_after():
    t = torch.arange(6, dtype=torch.float32)
    b = HostBuffer(t, mode="stage")
    assert not np.shares_memory(b.message, t.numpy())
    part = b.part(1, 4)
    part.stage()
    assert part.ready() and part.message.tolist() == [1, 2, 3]
    part.message *= 10  # what MPI writes lands in the host copy only
    assert t.tolist() == [0, 1, 2, 3, 4, 5]
    b.unstage()  # the whole buffer's copy back carries every bucket
    assert t.tolist()[1:4] == [10, 20, 30]


def test_non_cpu_tensors_are_staged_and_never_viewed():
    assert buffers.exchange_mode(torch.device("cpu")) == "view"
    meta = torch.empty(8, device="meta")
    assert buffers.exchange_mode(meta.device) == "stage"
    staged = HostBuffer(meta)  # allocates a host copy, never calls .numpy() on the tensor
    assert staged.mode == "stage" and staged.message.shape == (8,)
    with pytest.raises(ValueError, match="has no host view"):
        HostBuffer(meta, mode="view")


def test_cuda_aware_mpi_can_be_set_by_environment(monkeypatch):
    buffers.cuda_aware_mpi.cache_clear()
    monkeypatch.setenv(buffers.CUDA_AWARE_ENV, "1")
    try:
        assert buffers.cuda_aware_mpi()
        buffers.cuda_aware_mpi.cache_clear()
        monkeypatch.setenv(buffers.CUDA_AWARE_ENV, "0")
        assert not buffers.cuda_aware_mpi()
    finally:
        buffers.cuda_aware_mpi.cache_clear()


def test_host_array_reads_a_cpu_tensor_without_copying():
    t = torch.ones(3)
    assert np.shares_memory(buffers.host_array(t), t.numpy())


@pytest.fixture
def forbid_numpy_on(monkeypatch):
    """Make `.numpy()` fail on the given tensors' memory, as it does for a CUDA tensor."""
    forbidden: list[torch.Tensor] = []
    real = torch.Tensor.numpy

    def numpy(self, *args, **kwargs):
        for f in forbidden:
            lo, hi = f.data_ptr(), f.data_ptr() + f.numel() * f.element_size()
            if lo <= self.data_ptr() < hi:
                raise AssertionError(".numpy() called on a tensor treated as a device tensor")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    return forbidden


@pytest.mark.parametrize("mode", ["view", "stage", "device"])
def test_bucket_reducer_starts_buckets_during_backward_in_every_mode(monkeypatch, forbid_numpy_on, mode):
    net = _net()
    net.forward_backward()
    expected = net.flat_diff.clone() * 0.75  # two equal ranks, weight 0.75: the mean is the weighted gradient
    monkeypatch.setattr(buffers, "exchange_mode", lambda device: mode)
    if mode != "view":
        forbid_numpy_on.append(net.flat_diff)
    comm = TwinRanks()
    reducer = BucketReducer(comm, net, 0.75, bucket_bytes=64)
    net.clear_param_diffs()
    reducer.start()
    net.forward_backward()
    started_in_backward = [kind for kind, _ in comm.calls]
    reducer.finish()
    assert len(reducer.buckets) >= 3
    # every bucket but the last starts while backward runs, whatever the mode (the overlap)
    assert started_in_backward == ["Iallreduce"] * (len(reducer.buckets) - 1)
    assert [kind for kind, _ in comm.calls][-1] == "Allreduce"
    if mode == "device":
        assert all(isinstance(buf, torch.Tensor) for _, buf in comm.calls)
    else:
        assert all(isinstance(buf, np.ndarray) for _, buf in comm.calls)
    torch.testing.assert_close(net.flat_diff, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["view", "stage", "device"])
def test_fused_reducer_and_broadcast_take_tensors_in_every_mode(monkeypatch, forbid_numpy_on, mode):
    net = _net()
    net.forward_backward()
    expected = net.flat_diff.clone() * 1.25
    monkeypatch.setattr(buffers, "exchange_mode", lambda device: mode)
    if mode != "view":
        forbid_numpy_on.append(net.flat_diff)
        forbid_numpy_on.append(net.flat_data)
    comm = TwinRanks()
    FusedReducer(comm, [net.flat_diff], 1.25).finish()
    torch.testing.assert_close(net.flat_diff, expected, rtol=0, atol=0)
    comm.rank = 1  # a receiving rank writes what it was sent back into the tensor
    comm.Bcast_tensor(net.flat_data, root=0)
    comm.Bcast_arrays([net.flat_data[:3], net.flat_data[5:9]], root=0)
    assert [kind for kind, _ in comm.calls] == ["Allreduce", "Bcast", "Bcast"]


def test_fused_reducer_packs_numpy_arrays_in_place():
    a, b = np.ones((2, 3), np.float32), np.full(4, 2, np.float32)
    FusedReducer(TwinRanks(), [a, b], 0.5).finish()
    assert a.tolist() == [[0.5] * 3] * 2 and b.tolist() == [1.0] * 4


class TwinGroup:
    """A torch.distributed group of two equal ranks, in one process: records each all_reduce."""

    size = 2

    def __init__(self):
        self.calls: list[bool] = []

    def all_reduce(self, tensor, async_op=False):
        self.calls.append(async_op)
        tensor.mul_(2)
        return _DoneWork()


class _DoneWork:
    def wait(self):
        pass


def test_process_group_reducer_starts_the_same_buckets_during_backward():
    net = _net()
    net.forward_backward()
    expected = net.flat_diff.clone()
    group = TwinGroup()
    reducer = ProcessGroupReducer(group, net, 1.0, bucket_bytes=64)
    mpi = BucketReducer(TwinRanks(), net, 1.0, bucket_bytes=64)
    assert reducer.buckets == mpi.buckets
    net.clear_param_diffs()
    reducer.start()
    net.forward_backward()
    assert group.calls == [True] * (len(reducer.buckets) - 1)
    reducer.finish()
    assert group.calls[-1] is False
    torch.testing.assert_close(net.flat_diff, expected, rtol=0, atol=0)


def test_reducers_divide_by_the_ranks_there_are_now():
    """ULFM recovery shrinks the communicator under a reducer built before."""
    net = _net()
    net.forward_backward()
    expected = net.flat_diff.clone() * 2 / 3  # summed over two equal ranks, then divided by three
    comm = TwinRanks()
    reducer = BucketReducer(comm, net, 1.0, bucket_bytes=64)
    comm.size = 3
    net.clear_param_diffs()
    reducer.start()
    net.forward_backward()
    reducer.finish()
    torch.testing.assert_close(net.flat_diff, expected)
